"""The `torch_compile` family: each loss's torch implementation under `torch.compile` (Inductor).

Inductor fuses the loss into generated kernels (C++ on the CPU, Triton on CUDA), which can
change its numerics: this family audits what people who compile their training step run.

Choices, and why:

* `dynamic=True`: batch, classes and sequence length are symbolic, so the sweep's sizes
  share one graph; what still recompiles is the dtype, autograd on/off, the reduction and
  which options are set (guards on them cannot be avoided: they change the graph).
* `torch._dynamo.config.recompile_limit` raised to RECOMPILE_LIMIT for our calls only (the
  default 8 is below one loss's dtypes x reductions x autograd modes), with
  `fail_on_recompile_limit_hit`: past the limit torch.compile would silently run the
  function eagerly; here it raises, and the point is `skipped` with the reason in its
  `compile` field. Never reported as compiled.
* A compilation that fails (no C++ compiler, a dtype Inductor cannot lower...) makes the
  point `skipped` with the compiler's one-line message.
* Compilation is timed and kept out of the timing: the sweep calls `prepare` (the timed
  calls' forms, compiled once, untimed) before timing; a compilation during timing all the
  same (the counters tell) drops that point's timing. Each record carries `compile`:
  seconds spent compiling at that point (0 when its graphs were compiled at an earlier
  point), graphs compiled, graph breaks (each one runs part of the loss eagerly).
* Gradients go through the compiled function: AOTAutograd compiles the backward graph.
"""

from __future__ import annotations

import shutil
import time
import warnings

from . import Family, Unsupported

RECOMPILE_LIMIT = 64


def _compiler() -> str | None:
    # Inductor's CPU kernels are C++ built with the system compiler ($CXX, else c++/g++/clang++).
    import os

    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if any(shutil.which(n) for n in names):
        return None
    return "torch_compile needs a C++ compiler for Inductor's CPU kernels (install g++)"


def _one_line(e: BaseException) -> str:
    """The compiler's own reason in one line: dynamo wraps a backend's exception (its first
    line is only "backend='inductor' raised:"), so the innermost cause, first non-blank line."""
    seen = 0
    while seen < 8 and (getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
        seen += 1
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:300]


def _counts() -> tuple[int, int, int]:
    """(frames compiled, graphs captured, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return (
        counters["frames"]["total"],
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
    )


class Compiled:
    """The compiled function of one eager implementation, with its per-point compile record."""

    def __init__(self, eager, label: str, backend="inductor"):
        self.eager = eager
        self.label = label
        self.backend = backend  # tests pass others (a failing one, "eager" for speed)
        self._compiled = None
        self._frozen: tuple | None = None  # counts when `prepare` ended: compilation since then was timed
        self._reset()

    def _reset(self) -> None:
        self.seconds = 0.0
        self.graphs = 0
        self.breaks = 0
        self.fallback: str | None = None

    def _fn(self):
        if self._compiled is None:
            import torch

            self._compiled = torch.compile(self.eager, dynamic=True, backend=self.backend)
        return self._compiled

    def __call__(self, x, target, reduction="mean", **options):
        if self._frozen is not None:  # being timed: the bare compiled call
            return self._compiled(x, target, reduction, **options)
        import torch

        before = _counts()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch._dynamo.config.patch(
                recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
            ):
                # Importing Inductor warns of torch's own deprecations (torch.jit): noise to the
                # user, an error under pytest's filterwarnings.
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                out = self._fn()(x, target, reduction, **options)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise  # the function's own error, which eager torch raises too
            if "FailOnRecompileLimitHit" in type(e).__name__ or "recompile" in str(e).lower():
                self.fallback = f"recompile limit ({RECOMPILE_LIMIT}) hit: torch.compile would run it eagerly"
                raise Unsupported(f"torch.compile fell back to eager: {self.fallback}") from None
            raise Unsupported(f"torch.compile failed: {_one_line(e)}") from None
        after = _counts()
        if after[0] > before[0]:  # this call compiled: its time is compilation (and one run)
            self.seconds += time.perf_counter() - start
            self.graphs += after[1] - before[1]
            self.breaks += after[2] - before[2]
            if after[1] == before[1]:
                self.fallback = "no graph captured: torch.compile ran it eagerly"
                raise Unsupported(f"torch.compile fell back to eager: {self.fallback}")
        return out

    def prepare(self, x, target, reduction, options) -> None:
        """Compile what timing runs (forward without autograd, forward+backward), untimed."""
        import torch

        with torch.no_grad():
            self(x, target, reduction, **options)
        xg = x.detach().requires_grad_(True)
        out = self(xg, target, reduction, **options)
        out.backward(torch.ones_like(out) if reduction == "none" else None)
        self._frozen = _counts()

    def take_record(self) -> dict:
        """The point's `compile` field (results.py), and "skip" if it did not run compiled."""
        timed_compile = self._frozen is not None and _counts()[0] > self._frozen[0]
        out: dict = {
            "compile": {
                "seconds": self.seconds,
                "graphs": self.graphs,
                "graph_breaks": self.breaks,
                "fallback": self.fallback,
            }
        }
        if timed_compile:  # compiled while being timed: that timing is not of the compiled code
            out["compile"]["compiled_while_timed"] = True
            out["timing"] = None
        if self.fallback:
            out["skip"] = f"torch.compile fell back to eager: {self.fallback}"
        self._frozen = None
        self._reset()
        return out


_COMPILED: dict[tuple, Compiled] = {}


def provide(loss):
    eager = loss.implementations.get("torch")
    if eager is None:
        return None
    # One compiled function per loss and eager function, kept for the process: its compiled
    # graphs serve every later point (and run) of that loss.
    key = (loss.name, eager.fn)
    if key not in _COMPILED:
        _COMPILED[key] = Compiled(eager.fn, loss.name)
    return _COMPILED[key]


def describe(loss) -> str:
    eager = loss.implementations.get("torch")
    return f"torch.compile(dynamic=True) of: {eager.summary}" if eager else FAMILY.summary


FAMILY = Family(
    "torch_compile",
    "framework",
    "torch.nn.functional under torch.compile (Inductor, dynamic shapes)",
    provide,
    order=40,
    describe=describe,
    check=_compiler,
    devices=("cpu", "cuda"),
    default=False,
)
