"""The runner: sweep points -> records. Failures are isolated to their point.

A record is a plain dict (it goes to JSON as is); `results.py` owns the file format.
Points of one input (same loss, device, dtype, batch, classes, distribution, scale)
share their inputs and their reference, which is computed once.
"""
from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import inputs, timing
from .config import Config
from .dtypes import FORMATS
from .environment import device_problem
from .errors import ReferenceUnavailable
from .losses import LOSSES, Loss, Reference, reference
from .metrics import ErrorStats
from .results import record_key


@dataclass(frozen=True)
class Case:
    """One input of the sweep; every implementation is evaluated on it."""

    index: int  # position in the config's sweep order: sharding and merging rely on it
    loss: str
    device: str
    dtype: str
    batch: int
    classes: int | None
    distribution: str
    scale: float

    def key(self, impl: str) -> dict:
        return {"loss": self.loss, "impl": impl, "dtype": self.dtype, "device": self.device,
                "batch": self.batch, "classes": self.classes, "scale": self.scale,
                "distribution": self.distribution}


def cases(config: Config) -> Iterator[Case]:
    # Devices and dtypes vary fastest: they share one float64 input (see `run`).
    index = 0
    for loss_name in config.losses:
        loss = LOSSES[loss_name]
        classes = config.classes if loss.multiclass else (None,)
        for batch, c, dist, scale, device, dtype in itertools.product(
            config.batch_sizes, classes, config.distributions, config.scales,
            config.devices, config.dtypes,
        ):
            # A distribution that does not apply to this loss (ties for a binary loss,
            # infinite logits for probabilities) yields no points for it.
            if inputs.applies(dist, loss.multiclass, loss.input_kind):
                yield Case(index, loss_name, device, dtype, batch, c, dist, scale)
                index += 1


def selected(config: Config, shard: tuple[int, int] | None = None, done: set | None = None) -> Iterator[Case]:
    """The cases to run: this shard's (every N-th case, a deterministic 1/N), less those
    whose points are all in `done` (keys of records already measured, for --resume)."""
    for case in cases(config):
        if shard and case.index % shard[1] != shard[0] - 1:
            continue
        if done and all(record_key(case.key(i)) in done for i in config.implementations):
            continue
        yield case


def count_points(config: Config, shard: tuple[int, int] | None = None, done: set | None = None) -> int:
    return sum(1 for _ in selected(config, shard, done)) * len(config.implementations)


def run(config: Config, threads: int, on_record: Callable[[dict], None] | None = None,
        shard: tuple[int, int] | None = None, done: set | None = None) -> list[dict]:
    """Run the points of `config` (of one shard, less those `done`); `on_record` sees each
    record as soon as it exists."""
    records: list[dict] = []
    torch.set_num_threads(threads)
    inputs_cache = _InputCache(config.seed)
    for case in selected(config, shard, done):
        for record in run_case(config, case, threads, inputs_cache):
            if done and record_key(record) in done:
                continue  # measured before an interruption in the middle of this case
            records.append(record)
            if on_record:
                on_record(record)
    return records


class _InputCache:
    """The float64 inputs of the last (loss, batch, classes, distribution, scale)."""

    def __init__(self, seed: int):
        self.seed, self.key, self.value = seed, None, None

    def get(self, loss: Loss, case: Case):
        key = (case.loss, case.batch, case.classes, case.distribution, case.scale)
        if key != self.key:
            self.value = None  # free the previous input before making the next
            self.value = inputs.generate(case.loss, loss.multiclass, case.batch, case.classes,
                                         case.scale, case.distribution, self.seed)
            self.key = key
        return self.value


def run_case(config: Config, case: Case, threads: int, cache: _InputCache | None = None) -> list[dict]:
    loss = LOSSES[case.loss]
    impls = [loss.implementations[name] for name in config.implementations]
    problem = device_problem(case.device)
    if problem:
        return [_record(config, case, i, "skipped", problem) for i in impls]
    dtype = FORMATS[case.dtype].torch_dtype
    try:
        logits, labels = (cache or _InputCache(config.seed)).get(loss, case)
        inp, target = loss.make_input(logits, dtype), loss.make_target(labels, dtype)
        ref = reference(loss, inp, target)
    except ReferenceUnavailable as e:
        return [_record(config, case, i, "skipped", str(e)) for i in impls]
    except Exception as e:  # a bug of ours at one point must not lose the rest of the sweep
        return [_record(config, case, i, "error", f"reference: {_one_line(e)}") for i in impls]
    out = [evaluate(config, case, loss, impl, inp, target, ref) for impl in impls]
    if config.timing.applies(case.distribution, case.scale):
        ok = {impl.name: impl.fn for impl, r in zip(impls, out) if r["status"] == "ok"}
        if ok:
            x, t = inp.to(case.device), target.to(case.device)
            timed = timing.time_case(ok, x, t, config.timing.min_run_time, threads)
            for r in out:
                result = timed.get(r["impl"])
                if isinstance(result, Exception):
                    r["status"], r["message"] = "error", f"while timing: {_one_line(result)}"
                    r["forward"] = r["backward"] = None
                elif result is not None:
                    r["timing"] = result
    return out


def _record(config: Config, case: Case, impl, status: str, message: str = "") -> dict:
    return {**case.key(impl.name), "index": case.index, "kind": impl.kind, "reduction": "mean", "seed": config.seed,
            "threshold_bits": config.threshold_bits(case.dtype),
            "status": status, "message": message,
            "forward": None, "backward": None, "timing": None}


def evaluate(config: Config, case: Case, loss: Loss, impl, inp: torch.Tensor,
             target: torch.Tensor, ref: Reference) -> dict:
    """Accuracy and overflow of one implementation at one point (timing: see `run_case`)."""
    threshold = config.threshold_bits(case.dtype)
    record = _record(config, case, impl, "ok")
    try:
        x = inp.to(case.device)
        t = target.to(case.device)
        with torch.no_grad():
            elements = impl.fn(x, t, "none")
        _check_output(elements, (inp.shape[0],), inp.dtype, x.device, "none")
        xg = x.detach().clone().requires_grad_(True)
        mean = impl.fn(xg, t, "mean")
        _check_output(mean, (), inp.dtype, x.device, "mean")
        mean.backward()
        if xg.grad is None:
            raise ImplementationError("the 'mean' result does not depend on the input (no gradient)")
        fwd, bwd = ErrorStats(threshold), ErrorStats(threshold)
        fwd.add(elements, ref.loss)
        fwd.set_reduced(mean.detach(), ref.mean)
        bwd.add(xg.grad, ref.grad)
        record["forward"], record["backward"] = fwd.as_dict(), bwd.as_dict()
        record["forward"]["reference_value"] = ref.mean_value
    except Exception as e:  # an implementation failing is a result, not a crash
        record["status"] = "error"
        record["message"] = _one_line(e)
    return record


class ImplementationError(Exception):
    """An implementation returned something unusable (shape, dtype, device, no gradient)."""


def _check_output(out, shape, dtype, device, reduction) -> None:
    if not isinstance(out, torch.Tensor):
        raise ImplementationError(f"reduction={reduction!r} returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise ImplementationError(
            f"reduction={reduction!r} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ImplementationError(f"reduction={reduction!r} returned {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ImplementationError(f"reduction={reduction!r} returned a tensor on {out.device}, expected {device}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {first}{loc}"
