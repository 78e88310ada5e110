"""Implementations in a worker process: audited code that crashes, exits or hangs in C loses
its point, not the run (issue 16).

`produce` is the one place an implementation is called for its numbers: the sweep calls it
in this process (built-ins, ``isolation: none``) and a worker calls it in its own; the
outputs (the loss per element, the reduced loss, the gradient) come back to the sweep, which
audits them against the reference with the same code either way (sweep.py, `_audit`).

A `Worker` is one spawned process per implementation (spawn, not fork: a forked CUDA context
is unusable), started once, kept warm across points, and started again at the next request
after it died. It imports the user's module itself (the parent never runs user code when
isolated); an import failure is the ConfigError it would be in process. It runs with:

* fd 1 on stderr, so that what user code prints never reaches bench's or probe's stdout;
* a higher ``oom_score_adj`` than the parent, so that the kernel's OOM killer takes it first;
* PR_SET_PDEATHSIG, so that it does not outlive a killed run.

The worker enforces the timeout as in process (SIGALRM); the parent kills it later
(`kill_after`), which stops a C call that never returns too.
A death becomes a `WorkerFailure` whose message is the cause: "killed by signal 11
(SIGSEGV)", "exited with status 0 during evaluation", "out of memory (killed by the kernel,
signal 9)" (the cgroup's ``oom_kill`` count rose), "timed out after 300 s".

Tensors travel through torch.multiprocessing's shared memory (a file descriptor per
storage): the point's inputs once per implementation, the outputs back (moved to the CPU
first in the worker, so that CUDA memory is never shared between processes). Timing runs in
the worker, block by block on the parent's request, so that its rounds stay interleaved with
those of the implementations in the parent (timing.py).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import types
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.multiprocessing  # registers the shared-memory pickling of tensors

from . import memory, precision
from .custom import ImplementationError, NoGradient
from .errors import ConfigError
from .families import Unsupported
from .isolation import GlobalState, WorkerFailure, deadline, failure_message

# oom_score_adj added to the parent's for a worker (the kernel's scale ends at 1000).
OOM_SCORE_BONUS = 500
_PR_SET_PDEATHSIG = 1
# How a death while timing is told (the sweep's message starts "while timing: ").
_TIMED = "in its worker process"


@dataclass
class Outputs:
    """What an implementation returned at one point (detached)."""

    elements: torch.Tensor  # reduction "none", evaluated without autograd
    out: torch.Tensor  # the point's reduction
    grad: torch.Tensor | None  # of `out` with respect to the input; None: forward only
    note: str = ""  # the record's message when the point is still ok ("forward only: ...")

    def cpu(self) -> Outputs:
        return Outputs(self.elements.cpu(), self.out.cpu(), None if self.grad is None else self.grad.cpu(), self.note)


def produce(
    fn,
    data,
    device: str,
    reduction: str,
    shape: tuple,
    state: GlobalState | None = None,
    trusted: bool = False,
    policy: str = "native",
) -> Outputs:
    """Call `fn` as the sweep does (reduction "none" without autograd, then the point's
    reduction and its backward) on a copy of `data` (sweep.PointData) on `device`, and check
    what it returned and what it left behind: an implementation that changed its inputs in
    place or the global state is an ImplementationError (the state is put back first).
    `shape` is the reference's per-element shape; `state`: what to keep (default: now).
    `trusted` (the built-ins, which tests/test_inputs.py shows never write into their inputs):
    the point's own tensors, neither copied nor compared afterwards (a copy and a comparison
    of a large input cost about a fifth of a forward+backward each). `policy`: the precision
    policy the call runs under (precision.py; its outputs may then be wider than the input)."""
    state = state or GlobalState.capture()
    fn = precision.wrap(fn, policy, device)
    x, t, opts = data.on(device, copy=not trusted)
    try:
        with torch.no_grad():
            elements = fn(x, t, "none", **opts)
        check_output(elements, shape, x.dtype, x.device, "none", policy)
        # A view of the input that requires grad: no copy of it (large vocabularies).
        xg = x.detach().requires_grad_(True)
        out = fn(xg, t, reduction, **opts)
        check_output(out, shape if reduction == "none" else (), x.dtype, x.device, reduction, policy)
        grad, note = None, ""
        try:
            # The point's upstream gradient (sweep.PointData.grad_output) for "none": ones by default.
            up = getattr(data, "grad_output", None) if reduction == "none" else None
            out.backward(up.to(x.device) if up is not None else torch.ones_like(out) if reduction == "none" else None)
        except NoGradient as e:
            note = f"forward only: {e}"
        else:
            if xg.grad is None:
                raise ImplementationError(f"the {reduction!r} result does not depend on the input (no gradient)")
            grad = xg.grad
    finally:
        changed = state.restore()
    if changed:
        raise ImplementationError(f"changed the global state ({'; '.join(changed)}); put back")
    pairs = (
        ()
        if trusted
        else (("input", x, data.inp), ("target", t, data.target), *((k, opts[k], v) for k, v in data.options.items()))
    )
    modified = [
        name for name, mine, original in pairs if isinstance(original, torch.Tensor) and not _same_bits(mine, original)
    ]
    if modified:
        raise ImplementationError(
            f"modified its {', '.join(modified)} in place (its results are not those of the point's inputs)"
        )
    return Outputs(elements.detach(), out.detach(), grad, note)


def check_output(out, shape, dtype, device, reduction, policy: str = "native") -> None:
    if not isinstance(out, torch.Tensor):
        raise ImplementationError(f"reduction={reduction!r} returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise ImplementationError(f"reduction={reduction!r} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
    if not precision.accepts(out.dtype, dtype, policy):
        wider = "" if policy == "native" else " or a wider floating dtype"
        raise ImplementationError(f"reduction={reduction!r} returned {out.dtype}, expected {dtype}{wider}")
    if out.device != device:
        raise ImplementationError(f"reduction={reduction!r} returned a tensor on {out.device}, expected {device}")


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and -0 included), on the CPU."""
    a = a.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        a, b = a.view(_INT_OF_SIZE[a.element_size()]), b.view(_INT_OF_SIZE[b.element_size()])
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The parent's side.


class Worker:
    """One implementation's process. `name` is a built-in implementation's name or a custom
    `spec` (config.CustomSpec); `timeout`: seconds a request may take (None: no limit)."""

    def __init__(self, name: str, spec=None, source: str = "<config>", timeout: float | None = None):
        self.name, self.spec, self.source, self.timeout = name, spec, source, timeout
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self.starts = 0
        # loss -> the family hooks its implementation has in the worker ("prepare", "take_record").
        self.hooks: dict[str, tuple[str, ...]] = {}

    def start(self) -> None:
        if self._proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve,
            args=(child, self.name, self.spec, self.source, self.timeout),
            name=f"losscheck-worker-{self.name}",
            daemon=True,
        )
        proc.start()
        child.close()  # ours closed: the worker's death is an EOF here
        self._proc, self._conn, self._ready = proc, parent, False
        self._finalizer = weakref.finalize(self, _stop, proc, parent)
        self.starts += 1

    def ready(self) -> None:
        """Wait until the worker has imported the implementation; a failed import is the
        ConfigError it would be in this process."""
        self.start()
        if self._ready:
            return
        try:
            reply = self._pipe().recv()
        except (EOFError, OSError):
            raise WorkerFailure(self._death("while starting")) from None
        if reply[0] == "config_error":
            self.stop()
            raise ConfigError(*reply[1:])
        self._ready = True

    def request(self, message: tuple, during: str):
        """Send `message`, return the worker's answer; its exception, crash or timeout is a
        WorkerFailure (the worker is then stopped, and started again at the next request)."""
        if self._proc is not None and not self._proc.is_alive():
            self.stop()  # died between requests (killed from outside): not this request's fault
        self.ready()
        oom_before = _oom_kills()
        limit = kill_after(self.timeout)
        conn = self._pipe()
        try:
            conn.send(message)
            if limit is not None and not conn.poll(limit):
                self.stop()
                raise WorkerFailure(
                    f"timed out after {limit:g} s {during}: its worker process did not answer and was killed"
                )
            reply = conn.recv()
        except (EOFError, OSError):
            raise WorkerFailure(self._death(during, oom_before)) from None
        if reply[0] == "error":
            raise WorkerFailure(reply[1])
        if reply[0] == "skipped":
            raise Unsupported(reply[1])
        return reply[1]

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _pipe(self) -> Connection:
        # Called after start(): the process and its pipe are set together.
        assert self._conn is not None, "the worker is not started"
        return self._conn

    def _death(self, during: str, oom_before: int | None = None) -> str:
        proc = self._proc
        assert proc is not None, "a worker that died was started"
        proc.join(5)
        code = proc.exitcode
        self.stop()
        oom = oom_before is not None and (_oom_kills() or 0) > oom_before
        return describe_exit(code, during, oom)

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._conn = self._finalizer = None


def kill_after(timeout: float | None) -> float | None:
    """Seconds after which a request is given up and its worker killed. The worker enforces
    the timeout itself where it can (`isolation.deadline`: Python code, with the message it
    has in process); the parent kills later, for C code that never returns, with room for
    the traffic around the call and a loaded machine."""
    return None if timeout is None else timeout + min(timeout, 30.0) + 1.0


def _stop(proc, conn) -> None:
    try:
        conn.close()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def describe_exit(code: int | None, during: str, oom: bool = False) -> str:
    """The cause of a worker's death from its exit code (negative: the signal)."""
    if code is None:
        return f"the worker process stopped answering {during}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        if -code == signal.SIGKILL and oom:
            return f"out of memory (killed by the kernel, signal 9) {during}"
        return f"killed by signal {-code} ({name}) {during}"
    return f"exited with status {code} {during}"


def _oom_kills() -> int | None:
    """OOM kills so far in this process's memory cgroup (v2 memory.events, v1 memory.oom_control),
    or None where unreadable. A worker lives in the parent's cgroup, so its kill counts there."""
    own = memory._own_cgroups()
    for path in (
        (os.path.join(memory._CGROUP_ROOT, own["v2"].lstrip("/"), "memory.events") if "v2" in own else None),
        (
            os.path.join(memory._CGROUP_ROOT, "memory", own["v1"].lstrip("/"), "memory.oom_control")
            if "v1" in own
            else None
        ),
    ):
        text = memory._read_text(path) if path else None
        for line in (text or "").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return None


class RemoteFn:
    """An implementation of `loss` evaluated in `worker` (what `Impl.fn` holds when isolated)."""

    def __init__(self, worker: Worker, loss: str, policy: str = "native"):
        self.worker, self.loss, self.policy = worker, loss, policy

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.worker.name} runs in a worker process: use evaluate() or timing.time_case")

    def with_policy(self, policy: str) -> RemoteFn:
        """This implementation called under a precision policy (precision.wrap), in its worker."""
        return RemoteFn(self.worker, self.loss, policy)

    def evaluate(self, data, device: str, reduction: str, shape: tuple, threads: int) -> tuple[Outputs, dict | None]:
        """`produce` in the worker: (outputs on the CPU, the worker's peak memory)."""
        outputs, peak, hooks = self.worker.request(
            (
                "evaluate",
                self.loss,
                data.inp,
                data.target,
                data.options,
                device,
                reduction,
                threads,
                self.policy,
                shape,
                data.grad_output,
            ),
            "during evaluation",
        )
        self.worker.hooks[self.loss] = hooks
        return outputs, peak

    # A family's hooks (families/__init__.py: `prepare`, `take_record`), called in the worker on
    # the implementation that evaluated the point there: torch_compile compiles before timing and
    # reports its `compile` field from the worker, as it does in process.

    def prepare(self, x, target, reduction, options) -> None:
        if "prepare" in self.worker.hooks.get(self.loss, ()):
            self.worker.request(
                (
                    "prepare",
                    self.loss,
                    *_to_cpu(x, target, options),
                    str(x.device),
                    reduction,
                    torch.get_num_threads(),
                    self.policy,
                ),
                "while preparing",
            )

    def take_record(self) -> dict | None:
        # Asked too while the hooks are not known yet (the point's evaluation failed or was
        # skipped, e.g. torch.compile fell back to eager: that is in the record, and the state
        # must not pass to the next point). Not from a worker that died since (its successor
        # knows nothing of this point): asking would only start a new one.
        hooks = self.worker.hooks.get(self.loss)
        if (hooks is not None and "take_record" not in hooks) or not self.worker.alive():
            return None
        return self.worker.request(("take_record", self.loss), "while reporting")

    def timers(self, x, target, reduction, options, threads, min_run_time, rounds) -> dict:
        """timing.timers_for in the worker; each block is measured there on request."""
        device = str(x.device)
        made = self.worker.request(
            (
                "calibrate",
                self.loss,
                *_to_cpu(x, target, options),
                device,
                reduction,
                threads,
                self.policy,
                min_run_time,
                rounds,
            ),
            _TIMED,
        )
        return {
            part: (_RemoteTimer(self.worker, part), number, calibration) for part, (number, calibration) in made.items()
        }


def _to_cpu(x, target, options) -> tuple:
    """A point's tensors as they travel to a worker (on the CPU: CUDA memory is never shared)."""
    return (
        x.detach().cpu(),
        target.cpu(),
        {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()},
    )


class _RemoteTimer:
    def __init__(self, worker: Worker, part: str):
        self.worker, self.part = worker, part

    def timeit(self, number: int):
        times = self.worker.request(("block", self.part, number), _TIMED)
        return types.SimpleNamespace(times=times)


# ---------------------------------------------------------------------------------------------
# The worker's side.


def _harden() -> None:
    """Before any user code: stdout to stderr, first in line for the OOM killer, and killed
    with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops us)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:
            score = int(f.read().strip() or 0)
            f.seek(0)
            f.write(str(min(1000, score + OOM_SCORE_BONUS)))
    except (OSError, ValueError):
        pass  # not Linux, or not allowed: the parent is then as likely a victim as before
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _serve(conn, name: str, spec, source: str, timeout: float | None) -> None:
    _harden()
    from . import custom, timing
    from .losses import LOSSES, implementation
    from .sweep import PointData

    custom.REDIRECT_STDOUT = False  # fd 1 is stderr already
    try:
        loaded = custom.load(spec, source) if spec is not None else None
    except ConfigError as e:
        conn.send(("config_error", e.source, e.key, e.problem, e.allowed))
        return

    def lookup(loss: str):
        # The same object at every request: a family's implementation keeps its state (compiled
        # graphs, the point's compile record) across them.
        if loaded is not None:
            return LOSSES[loss].custom(custom.for_loss(loaded, loss).fn)
        return implementation(LOSSES[loss], name).fn

    state = GlobalState.capture()
    conn.send(("ready",))
    timers: dict = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind, args = message[0], message[1:]
        device = "cpu"
        try:
            if kind in ("evaluate", "calibrate", "prepare"):
                loss, inp, target, options, device, reduction, threads, policy = args[:8]
                fn = lookup(loss)
                timers.clear()
                torch.set_num_threads(threads)
                state = GlobalState(state.cwd, state.default_dtype, threads, state.grad_enabled)
                state.restore()  # what timing may have changed
                data = PointData(inp, target, options)
            if kind == "evaluate":
                peak = memory.PeakMemory(device)
                with peak, deadline(timeout, f"{name} (evaluation)"):
                    data.grad_output = args[9]  # the point's upstream gradient (None: ones)
                    outputs = produce(fn, data, device, reduction, args[8], state, policy=policy).cpu()
                hooks = tuple(h for h in ("prepare", "take_record") if callable(getattr(fn, h, None)))
                reply: tuple[str, Any] = ("ok", (outputs, peak.result(), hooks))
                del outputs
            elif kind == "calibrate":
                x, t, opts = data.on(device)
                fn = precision.wrap(fn, policy, device)
                timers.update(timing.timers_for(fn, x, t, reduction, opts, threads, *args[8:]))
                reply = ("ok", {part: (number, calibration) for part, (_, number, calibration) in timers.items()})
            elif kind == "prepare":  # as the sweep's _prepare: the bare implementation, untimed
                x, t, opts = data.on(device)
                with deadline(timeout, f"{name} (preparation)"):
                    fn.prepare(x, t, reduction, opts)
                reply = ("ok", None)
            elif kind == "take_record":
                take = getattr(lookup(args[0]), "take_record", None)
                reply = ("ok", take() if callable(take) else None)
            elif kind == "block":
                part, number = args
                reply = ("ok", list(timers[part][0].timeit(number=number).times))
            else:
                reply = ("error", f"unknown request {kind!r}")
        except Unsupported as e:  # the point is skipped, saying why
            reply = ("skipped", str(e))
        except (Exception, SystemExit) as e:  # the implementation's failure is its point's
            reply = ("error", failure_message(e))
            memory.release(device)
        conn.send(reply)
        del reply
