"""The runner: sweep points -> records. Failures are isolated to their point.

A record is a plain dict (it goes to JSON as is); `results.py` owns the file format.
Points of one input (same loss, device, dtype, batch, classes, distribution, scale)
share their inputs and their reference, which is computed once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import custom, families, inputs, memory, precision, timing, worker
from .config import Config
from .environment import device_problem
from .errors import ConfigError, LosscheckError, ReferenceUnavailable
from .formats import widened_threshold
from .isolation import deadline, failure_message, one_line as _one_line
from .losses import LOSSES, Impl, Loss, Reference, implementation, reference
from .metrics import ErrorStats, abs_nats
from .points import (  # noqa: F401  (re-exported: sweep.<name> for its users)
    INPUT_COPIES,
    PointData,
    _InputCache,
    estimate_bytes,
    point_data,
    rows_of,
    spatial_of,
)
from .results import KEY_FIELDS as _KEY_NAMES, record_key


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
    reduction: str = "mean"
    options: tuple = ()  # sorted (name, value) pairs of the options set (see Config.option_sets)
    time: int | None = None  # sequence length (sequence losses)

    @property
    def policy(self) -> str:
        """The precision policy the implementations run under (precision.py)."""
        return dict(self.options).get("precision", "native")

    def key(self, impl: str) -> dict:
        return {
            "loss": self.loss,
            "impl": impl,
            "dtype": self.dtype,
            "device": self.device,
            "batch": self.batch,
            "classes": self.classes,
            "scale": self.scale,
            "distribution": self.distribution,
            "reduction": self.reduction,
            "options": dict(self.options),
            "time": self.time,
        }


def cases(config: Config) -> Iterator[Case]:
    # Devices and dtypes vary fastest, then reductions and options: they share one float64
    # input (see `run`).
    # The config's grid, then its `extra` grids (Config.sweeps), without their points
    # already swept: a point is one record per implementation.
    index = 0
    seen: set[tuple] = set()
    for grid, loss_name in ((g, name) for g in config.sweeps() for name in g.losses):
        loss = LOSSES[loss_name]
        classes = grid.classes if loss.multiclass else (None,)
        times = grid.sequence_lengths if loss.sequence else (None,)
        option_sets = [tuple(sorted(o.items())) for o in grid.option_sets(loss_name)]
        for batch, c, time, dist, scale, opts, reduction, device, dtype in itertools.product(
            grid.batch_sizes,
            classes,
            times,
            grid.distributions,
            grid.scales,
            option_sets,
            grid.reductions,
            grid.devices,
            grid.dtypes,
        ):
            # A distribution that does not apply to this loss (ties for a binary loss,
            # infinite logits for probabilities) yields no points for it.
            if not inputs.applies(dist, loss.multiclass, loss.input_kind):
                continue
            if not precision.applies(dict(opts).get("precision", "native"), dtype):
                continue
            # Upstream gradients are an axis of `reduction: none` points only: a reduced loss
            # has one upstream number, which scales its gradient exactly (METRICS.md).
            for up in grid.grad_outputs if reduction == "none" else ("ones",):
                o = opts if up == "ones" else tuple(sorted((*opts, ("grad_output", up))))
                if config.extra:
                    point = (loss_name, device, dtype, batch, c, dist, scale, reduction, o, time)
                    if point in seen:
                        continue
                    seen.add(point)
                yield Case(index, loss_name, device, dtype, batch, c, dist, scale, reduction, o, time)
                index += 1


def selected(config: Config, shard: tuple[int, int] | None = None, done: set | None = None) -> Iterator[Case]:
    """The cases to run: this shard's (every N-th case, a deterministic 1/N), less those
    whose points are all in `done` (keys of records already measured, for --resume)."""
    for case in cases(config):
        if shard and case.index % shard[1] != shard[0] - 1:
            continue
        if done and all(record_key(case.key(i)) in done for i in config.impls_for(case.loss)):
            continue
        yield case


def count_points(config: Config, shard: tuple[int, int] | None = None, done: set | None = None) -> int:
    return sum(len(config.impls_for(c.loss)) for c in selected(config, shard, done))


def resolve(config: Config) -> dict[str, dict[str, Impl]]:
    """loss -> {name: Impl} for the config: built-in implementations, then custom ones
    (imported here, once, or by their worker process; an import failure is a ConfigError).
    Isolated implementations (`config.isolation`: custom ones by default) get a worker each,
    started here, and their Impl.fn is a `worker.RemoteFn`."""
    isolated = {i for i in config.implementations if config.isolation == "process"}
    isolated |= {spec.name for spec in config.custom if config.isolation != "none"}
    specs = {spec.name: spec for spec in config.custom}
    workers = {i: worker.Worker(i, specs.get(i), config.source, config.timeout) for i in sorted(isolated)}
    for w in workers.values():
        w.start()  # all at once: their imports overlap
    for w in workers.values():
        try:
            w.ready()
        except worker.WorkerFailure as e:
            raise LosscheckError(f"{w.name}: its worker process failed {e} (its error is above)") from None
    loaded = {spec.name: custom.load(spec, config.source) for spec in config.custom if spec.name not in workers}
    out = {}
    for name in config.run_losses:  # every grid's (config.Config.run_losses)
        loss = LOSSES[name]
        row = {}
        for i in config.impls_for(name):
            local = implementation(loss, i) if families.get(i) else loaded.get(i)
            local = custom.for_loss(local, name) if local is not None else None  # loss_name= (custom.py)
            if local is not None and i in loaded:  # called as the loss calls them (several inputs: packed)
                local = Impl(i, local.kind, loss.custom(local.fn), local.summary)
            if i in workers:
                kind, summary = (local.kind, local.summary) if local else ("custom", custom.summary(specs[i]))
                row[i] = Impl(i, kind, worker.RemoteFn(workers[i], name), summary)
            else:
                assert local is not None, "the config's implementations are validated: each exists"
                row[i] = local
        out[name] = row
    return out


def run(
    config: Config,
    threads: int,
    on_record: Callable[[dict], None] | None = None,
    shard: tuple[int, int] | None = None,
    done: set | None = None,
    impls: dict[str, dict[str, Impl]] | None = None,
) -> list[dict]:
    """Run the points of `config` (of one shard, less those `done`); `on_record` sees each
    record as soon as it exists. `impls`: `resolve(config)`, if already done."""
    impls = impls if impls is not None else resolve(config)
    records: list[dict] = []
    torch.set_num_threads(threads)
    inputs_cache = _InputCache(config.seed)
    for case in selected(config, shard, done):
        for record in run_case(config, case, threads, inputs_cache, impls[case.loss]):
            if done and record_key(record) in done:
                continue  # measured before an interruption in the middle of this case
            records.append(record)
            if on_record:
                on_record(record)
    return records


# Points above this many values trim the C heap first (see `_large`).
TRIM_ELEMENTS = 1 << 24


def _large(case: Case) -> bool:
    """Points big enough for the C heap's leftovers to matter to their peak. Trimming is not
    free: the memory handed back must be faulted in again by the next allocations, which
    made the default sweep (points up to 2^21 values) a quarter slower when done throughout."""
    return rows_of(case) * (case.classes or 1) > TRIM_ELEMENTS


def memory_problem(case: Case) -> str | None:
    """Why `case` cannot run in the memory available now, or None."""
    need = estimate_bytes(case)
    try:
        available = memory.available_bytes(case.device)
    except ValueError as e:  # a malformed LOSSCHECK_MEMORY_LIMIT
        raise ConfigError("LOSSCHECK_MEMORY_LIMIT", "", str(e)) from None
    if available is not None and need > available:
        return (
            f"needs about {memory.format_bytes(need)} (estimate: {INPUT_COPIES} copies of the input), "
            f"{memory.format_bytes(available)} available on {case.device}"
        )
    return None


def run_case(
    config: Config, case: Case, threads: int, cache: _InputCache | None = None, impls: dict[str, Impl] | None = None
) -> list[dict]:
    loss = LOSSES[case.loss]
    chosen = list((impls if impls is not None else resolve(config)[case.loss]).values())
    problem = device_problem(case.device) or memory_problem(case)
    if problem:
        return [_record(config, case, i, "skipped", problem) for i in chosen]
    if _large(case):
        memory.trim()  # the previous points' freed memory goes back: this point's peak is its own
    setup = memory.PeakMemory(case.device)
    try:
        with setup:
            data = point_data(loss, case, config.seed, cache)
            ref = reference(loss, data.inp, data.target, data.options, case.reduction, data.grad_output)
    except ReferenceUnavailable as e:
        return [_record(config, case, i, "skipped", str(e)) for i in chosen]
    except Exception as e:  # a bug of ours, or memory, at one point must not lose the rest of the sweep
        what = "out of memory while building the point" if memory.is_oom(e) else "reference"
        memory.release(case.device)
        return [_record(config, case, i, "error", f"{what}: {_one_line(e)}") for i in chosen]
    refs = {ref.loss.dtype: ref}

    def ref_in(dtype: torch.dtype) -> Reference:
        # The point's reference rounded to a wider output's dtype (precision policies): the
        # same exact values (the inputs widen exactly), computed once per point.
        if dtype not in refs:
            widened = {
                k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in data.options.items()
            }
            target = data.target.to(dtype) if data.target.is_floating_point() else data.target
            refs[dtype] = reference(loss, data.inp.to(dtype), target, widened, case.reduction)
        return refs[dtype]

    out = [evaluate(config, case, loss, impl, data, ref, ref_in) for impl in chosen]
    built = setup.result()
    for r in out:
        if r["memory"] and built:
            # The peak while the inputs and the reference were made (shared by the implementations).
            r["memory"]["setup_peak_bytes"] = built["peak_bytes"]
        if r["memory"] and loss.logits_bytes is not None:
            r["memory"]["logits_bytes"] = loss.logits_bytes(case)  # what a fused loss never holds
    if config.timing.applies(case.distribution, case.scale):
        ok = {
            impl.name: precision.wrap(impl.fn, case.policy, case.device)
            for impl, r in zip(chosen, out, strict=True)
            if r["status"] == "ok" and r["backward"] is not None
        }
        if ok:
            x, t, opts = data.on(case.device)
            for impl, r in zip(chosen, out, strict=True):
                if impl.name in ok and _prepare(impl, x, t, case.reduction, opts, r):
                    del ok[impl.name]
            timed = timing.time_case(ok, x, t, config.timing.min_run_time, threads, opts, case.reduction)
            for r in out:
                result = timed.get(r["impl"])
                if isinstance(result, Exception):
                    r["status"], r["message"] = "error", f"while timing: {_one_line(result)}"
                    r["forward"] = r["backward"] = None
                    for name in loss.inputs[1:]:
                        r.pop(f"backward_{name}", None)
                elif result is not None:
                    r["timing"] = result
    for impl, r in zip(chosen, out, strict=True):
        _take_record(impl, r)
    return out


def _prepare(impl: Impl, x, t, reduction: str, opts: dict, record: dict) -> bool:
    """A family's untimed preparation before timing (families/__init__.py: `prepare`, e.g.
    compilation for the timed calls); True if it failed (the record says why)."""
    prepare = getattr(impl.fn, "prepare", None)
    if prepare is None:
        return False
    try:
        prepare(x, t, reduction, opts)
    except families.Unsupported as e:
        record.update(status="skipped", message=str(e), forward=None, backward=None)
        return True
    except Exception as e:  # noqa: BLE001  (the implementation's failure is its point's)
        record.update(status="error", message=f"while preparing: {_one_line(e)}", forward=None, backward=None)
        return True
    return False


def _take_record(impl: Impl, record: dict) -> None:
    """Fields a family adds to its record (families/__init__.py: `take_record`); "skip": the
    point is skipped with that reason, its measurements dropped (never reported as they are)."""
    take = getattr(impl.fn, "take_record", None)
    fields = take() if take is not None else None
    if not fields:
        return
    skip = fields.pop("skip", None)
    record.update(fields)
    if skip and record["status"] == "ok":
        record.update(status="skipped", message=skip, forward=None, backward=None, timing=None)


def remeasurer(
    config: Config, impls: dict[str, dict[str, Impl]], threads: int, rounds: int = timing.REMEASURE_ROUNDS
) -> Callable[[tuple, list], dict]:
    """The gate's re-measure in this run: (record key, implementation names) -> their timings,
    measured again interleaved on the point's inputs (see gate.py)."""
    by_key: dict[tuple, Case] = {}

    def retime(key: tuple, names: list[str]) -> dict:
        if not by_key:
            by_key.update({record_key(c.key("")): c for c in cases(config)})
        case = by_key.get(record_key({**dict(zip(_KEY_NAMES, key, strict=True)), "impl": ""}))
        if case is None:
            raise KeyError(f"no point {key} in the config")
        data = point_data(LOSSES[case.loss], case, config.seed)
        x, t, opts = data.on(case.device)
        fns = {n: impls[case.loss][n].fn for n in names}
        torch.set_num_threads(threads)
        for fn in fns.values():  # compiled families: timed as in the run, after their untimed prepare
            getattr(fn, "prepare", lambda *a: None)(x, t, case.reduction, opts)
        try:
            return timing.time_case(fns, x, t, config.timing.min_run_time, threads, opts, case.reduction, rounds)
        finally:
            for fn in fns.values():
                getattr(fn, "take_record", dict)()

    return retime


def _record(config: Config, case: Case, impl, status: str, message: str = "") -> dict:
    return {
        **case.key(impl.name),
        "index": case.index,
        "kind": impl.kind,
        "seed": config.seed,
        "threshold_bits": config.threshold_bits(case.dtype),
        "status": status,
        "message": message,
        "forward": None,
        "backward": None,
        "timing": None,
        "memory": None,
    }


def evaluate(
    config: Config,
    case: Case,
    loss: Loss,
    impl,
    data: PointData,
    ref: Reference,
    ref_in: Callable[[torch.dtype], Reference] | None = None,
) -> dict:
    """Accuracy, overflow and peak memory of one implementation at one point (timing: see
    `run_case`). Whatever the implementation does — raise, hang past the timeout, run out
    of memory, return garbage — ends up in the record, not in the sweep. `ref_in(dtype)`:
    the reference rounded to a wider dtype, for outputs a precision policy widened."""
    threshold = config.threshold_bits(case.dtype)
    record = _record(config, case, impl, "ok")
    audit = _Audit(ref, threshold, case, loss, data.target, ref_in)
    if _large(case):
        memory.trim()
    peak = memory.PeakMemory(case.device)
    shape = tuple(ref.loss.shape)
    family = families.get(impl.name) if impl.kind in BUILT_IN_KINDS else None
    unsupported = family and family.unsupported(case.dtype, case.device, dict(case.options))
    if unsupported:
        record.update(status="skipped", message=unsupported)
        return record
    try:
        if isinstance(impl.fn, worker.RemoteFn):
            # In its worker process (the timeout is enforced by killing it); audited here.
            remote = impl.fn.with_policy(case.policy)
            outputs, record["memory"] = remote.evaluate(
                data, case.device, case.reduction, shape, torch.get_num_threads()
            )
            audit(outputs, record)
        else:
            with peak, deadline(config.timeout, f"{impl.name} (evaluation)"):
                outputs = worker.produce(
                    impl.fn,
                    data,
                    case.device,
                    case.reduction,
                    shape,
                    trusted=impl.kind in BUILT_IN_KINDS,
                    policy=case.policy,
                )
                audit(outputs, record)
            record["memory"] = peak.result()
        if ref.undefined:
            record["undefined"] = ref.undefined
        if ref.out_of_domain:
            record["out_of_domain"] = {**record.get("out_of_domain", {}), "reference": ref.out_of_domain}
    except families.Unsupported as e:  # the family cannot run this point: skipped, saying why
        record.update(status="skipped", message=str(e), forward=None, backward=None)
    # SystemExit too: audited code calling sys.exit() used to end the sweep (and the gate) with
    # exit 0 and a partial file (issue 16). os._exit and crashes: see worker.py.
    except (Exception, SystemExit) as e:  # an implementation failing is a result, not a crash
        record["status"] = "error"
        record["message"] = failure_message(e)
        record["forward"] = record["backward"] = None
        for name in loss.inputs[1:]:
            record.pop(f"backward_{name}", None)
        memory.release(case.device)
        if not isinstance(impl.fn, worker.RemoteFn):
            record["memory"] = peak.result()
        if ref.out_of_domain:
            record["out_of_domain"] = _outcome(ref, None)
    return record


def _outcome(ref: Reference, o: worker.Outputs | None) -> dict:
    """What an implementation did with the out-of-domain inputs of a point (`ref.outside`):
    raised (no outputs), returned NaN at every such element, loss and gradient, or returned
    a number at some (`forward_numbers`, `backward_numbers`: how many); `reduced_nan`: whether
    its mean or sum is NaN (None for reduction "none")."""
    assert ref.outside is not None, "called for points with out-of-domain inputs only"
    out = {"reference": ref.out_of_domain, "elements": int(ref.outside.sum())}
    if o is None:
        return {**out, "outcome": "raised"}
    rows = ref.outside.to(o.elements.device)
    fwd = int((~o.elements.reshape(rows.shape)[rows].isnan()).sum())
    bwd = None
    if o.grad is not None:
        g = o.grad.reshape(*rows.shape, -1)[rows.to(o.grad.device)]
        bwd = int((~g.isnan()).sum())
    reduced = None if ref.reduced is None else bool(torch.as_tensor(o.out).isnan().all())
    numbers = fwd + (bwd or 0)
    return {
        **out,
        "outcome": "number" if numbers else "nan",
        "forward_numbers": fwd,
        "backward_numbers": bwd,
        "reduced_nan": reduced,
    }


# Implementations of these kinds are ours: they get the point's tensors without a copy (and
# without the check for writes into them, which needs one).
BUILT_IN_KINDS = ("naive", "stable", "framework")


@dataclass
class _Audit:
    """The record's forward and backward from an implementation's outputs (`worker.produce`),
    against the reference, on the reference's device. A forward wider than the input (a
    precision policy's float32 for a bfloat16 point) is audited against the reference rounded
    to its dtype, with the input's threshold moved to its significand (formats.widened_threshold);
    the gradient reaches the input in its own dtype and is audited as always."""

    ref: Reference
    threshold: float
    case: Case
    loss: Loss  # a loss of several inputs: `backward_<input>` for each after the first
    target: torch.Tensor
    ref_in: Callable[[torch.dtype], Reference] | None = None  # evaluate()'s: None where not given

    def __call__(self, o: worker.Outputs, record: dict) -> None:
        case, ref, threshold = self.case, self.ref, self.threshold
        notes = [o.note]
        if case.policy != "native":
            out_dtype = str(o.out.dtype).removeprefix("torch.")
            record["output_dtype"] = out_dtype
            # What the loss computed in: the upcast's float32, or the dtype autocast ran its
            # last operation in, which its output carries.
            record["compute_dtype"] = "float32" if case.policy == "upcast" else out_dtype
            if o.out.dtype != ref.loss.dtype and self.ref_in is not None:
                ref = self.ref_in(o.out.dtype)
                threshold = widened_threshold(threshold, out_dtype, case.dtype)
            notes.append(precision.cuda_note(case.loss, case.policy, case.device))
        dev = ref.loss.device
        # Out-of-domain elements have no true value: scored are the others (and no reduced value,
        # which includes them); what was returned there is recorded apart (`_outcome`).
        keep = None if self.ref.outside is None else ~self.ref.outside
        fwd = ErrorStats(threshold)
        fwd.add(*_kept(o.elements.to(dev), ref.loss, keep))
        if ref.reduced is not None and keep is None:
            fwd.set_reduced(o.out.to(dev), ref.reduced)
        record["forward"] = {**fwd.as_dict(), "reference_value": ref.value}
        if ref.exact is not None and keep is None:  # a loss valued in nats (METRICS.md)
            record["forward"]["abs_nats"] = abs_nats(
                o.elements, ref.exact, o.out if ref.reduced is not None else None, ref.value
            )
        if ref is not self.ref:  # counted in the wider dtype (formats.counted_in)
            record["forward"].update(dtype=record["output_dtype"], threshold_bits=threshold)
        if any(notes):
            record["message"] = "; ".join(n for n in notes if n)
        if o.grad is not None:
            mine, exact = o.grad.to(dev), self.ref.grad
            parts = zip(self.loss.split(mine, self.target), self.loss.split(exact, self.target), strict=True)
            for i, (m, e) in enumerate(parts):
                bwd = ErrorStats(self.threshold)
                bwd.add(*_kept(m, e, keep))
                record["backward" if i == 0 else f"backward_{self.loss.inputs[i]}"] = bwd.as_dict()
        if keep is not None:
            record["out_of_domain"] = _outcome(self.ref, o)


def _kept(values: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor | None):
    """The values and reference at the in-domain elements (`keep`: rows, shaped like the
    loss), flattened; all of them where every input is in the domain."""
    if keep is None:
        return values, reference
    rows = keep.reshape(-1)
    return values.reshape(rows.shape[0], -1)[rows].reshape(-1), reference.reshape(rows.shape[0], -1)[rows].reshape(-1)
