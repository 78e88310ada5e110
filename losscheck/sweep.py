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

from . import custom, inputs, memory, reference as R, timing, worker
from .config import Config
from .dtypes import FORMATS
from .environment import device_problem
from .errors import ConfigError, LosscheckError, ReferenceUnavailable
from .isolation import deadline, failure_message, one_line as _one_line
from .losses import IGNORE_INDEX, LOSSES, Impl, Loss, Reference, reference
from .metrics import ErrorStats
from .results import KEY_FIELDS as _KEY_NAMES, record_key

# The memory estimate of a point, in copies of its input (in the dtype under test): the
# input, the implementation's own copy of it (custom ones; built-ins share the input, so the
# estimate is one copy high for them), the reference's gradient, the implementation's
# gradient and two working copies (naive and torch hold exp(x) or log_softmax(x) for the
# backward); see `estimate_bytes`.
INPUT_COPIES = 6


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
    index = 0
    for loss_name in config.losses:
        loss = LOSSES[loss_name]
        classes = config.classes if loss.multiclass else (None,)
        times = config.sequence_lengths if loss.sequence else (None,)
        option_sets = [tuple(sorted(o.items())) for o in config.option_sets(loss_name)]
        for batch, c, time, dist, scale, opts, reduction, device, dtype in itertools.product(
            config.batch_sizes,
            classes,
            times,
            config.distributions,
            config.scales,
            option_sets,
            config.reductions,
            config.devices,
            config.dtypes,
        ):
            # A distribution that does not apply to this loss (ties for a binary loss,
            # infinite logits for probabilities) yields no points for it.
            if inputs.applies(dist, loss.multiclass, loss.input_kind):
                yield Case(index, loss_name, device, dtype, batch, c, dist, scale, reduction, opts, time)
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
    for name in config.losses:
        loss = LOSSES[name]
        row = {}
        for i in config.impls_for(name):
            local = loss.implementations[i] if i in loss.implementations else loaded.get(i)
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


class _InputCache:
    """The float64 inputs of the last (loss, device, batch, classes, time, distribution,
    scale), for inputs small enough to be generated at once (see `inputs.GENERATE_CHUNK`):
    every dtype, reduction and option set of that input reuses them."""

    def __init__(self, seed: int):
        self.seed = seed
        self.key: tuple | None = None
        self.value: tuple | None = None

    def get(self, loss: Loss, case: Case):
        key = (case.loss, case.device, case.batch, case.classes, case.time, case.distribution, case.scale)
        if key != self.key:
            self.value = None  # free the previous input before making the next
            if loss.multiclass:
                ((_, x, t),) = inputs.generate_blocks(
                    case.loss,
                    case.batch,
                    case.classes,
                    case.scale,
                    case.distribution,
                    self.seed,
                    case.time,
                    case.device,
                )
                self.value = x, t
            else:
                self.value = inputs.generate(
                    case.loss, False, case.batch, None, case.scale, case.distribution, self.seed, case.device
                )
            self.key = key
        return self.value


@dataclass
class PointData:
    """The tensors of one case in the dtype under test, on its device: what every
    implementation gets (a copy of)."""

    inp: torch.Tensor
    target: torch.Tensor
    options: dict  # the implementations' keyword options (tensors and numbers)

    def on(self, device: str, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Copies on `device` (on the CPU too): an implementation that writes into its input
        or options must not corrupt those of the implementations after it (a correct one was
        reported 28 bits off that way, issue 16). `copy=False`: the tensors themselves where
        already on `device`, for the built-in implementations, which never write into their
        inputs (tests/test_inputs.py): a copy of a large input costs a fifth of a forward+backward."""
        opts = {k: (v.to(device, copy=copy) if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()}
        return self.inp.to(device, copy=copy), self.target.to(device, copy=copy), opts


def rows_of(case: Case) -> int:
    return case.batch * (case.time or 1)


def point_data(loss: Loss, case: Case, seed: int, cache: _InputCache | None = None) -> PointData:
    """Inputs, targets and options of `case`, generated from the seed on its device and
    rounded once to the dtype (METRICS.md, "Inputs"). Large multi-class inputs go block by
    block straight into the dtype: they never exist in float64 at once."""
    dtype = FORMATS[case.dtype].torch_dtype
    device = torch.device(case.device)
    rows = rows_of(case)
    options: dict = {}
    if loss.make_point is not None:  # several inputs (hidden states, classifier): the loss's own
        inp, labels, options = loss.make_point(case, seed, dtype, device)
    elif loss.multiclass and case.classes is not None and rows * case.classes > inputs.GENERATE_CHUNK:
        inp = torch.empty((rows, case.classes), dtype=dtype, device=device)
        labels = torch.empty(rows, dtype=torch.int64, device=device)
        for block, x, t in inputs.generate_blocks(
            case.loss, case.batch, case.classes, case.scale, case.distribution, seed, case.time, device
        ):
            inp[block] = loss.make_input(x, dtype)
            labels[block] = torch.as_tensor(t, device=device)
            del x
    else:
        logits, labels = (cache or _InputCache(seed)).get(loss, case)
        inp = loss.make_input(logits, dtype)
    values = inputs.option_values(
        case.loss, loss.multiclass, dict(case.options), rows, case.classes, labels, seed, device
    )
    if "weight" in values:
        options["weight"] = R.round_to(values["weight"], dtype)
    if "pos_weight" in values:
        options["pos_weight"] = R.round_to(
            torch.full((1,), values["pos_weight"], dtype=torch.float64, device=device), dtype
        )
    if "label_smoothing" in values:
        options["label_smoothing"] = values["label_smoothing"]
    if dict(case.options).get("chunks"):
        options["chunks"] = int(dict(case.options)["chunks"])
    if "soft" in values:
        target = R.round_to(values["soft"], dtype)
    else:
        target = loss.make_target(labels, dtype)
    if "ignored" in values or loss.sequence:
        target = target.clone()
        mask = values.get("ignored")
        if loss.sequence:
            assert case.time is not None, "a sequence point has a time"
            mask = inputs.sequence_padding(case.batch, case.time, seed, device).reshape(-1)
        target[torch.as_tensor(mask, device=target.device)] = IGNORE_INDEX
        options["ignore_index"] = IGNORE_INDEX
    if loss.sequence:
        assert case.time is not None and case.classes is not None, "a sequence point has time and classes"
        inp = inp.reshape(case.batch, case.time, case.classes)
        target = target.reshape(case.batch, case.time)
    return PointData(inp, target, options)


def estimate_bytes(case: Case) -> int:
    """Memory one point needs beyond what the process holds already: INPUT_COPIES copies of
    the input in its dtype (soft targets: one more), and the float64 input of a cached case."""
    elements = rows_of(case) * (case.classes or 1)
    copies = INPUT_COPIES + (1 if dict(case.options).get("targets") == "soft" else 0)
    cached = 8 * elements if elements <= inputs.GENERATE_CHUNK else 0
    count = LOSSES[case.loss].input_elements
    if count is not None:
        # Hidden states and classifier: the logits (elements) as the input above, for the
        # implementations that materialise them, plus the packed input and the reference's
        # float64 copies of it and of its gradient (no cached input).
        return elements * FORMATS[case.dtype].torch_dtype.itemsize * copies + 24 * count(case)
    return elements * FORMATS[case.dtype].torch_dtype.itemsize * copies + cached


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
            ref = reference(loss, data.inp, data.target, data.options, case.reduction)
    except ReferenceUnavailable as e:
        return [_record(config, case, i, "skipped", str(e)) for i in chosen]
    except Exception as e:  # a bug of ours, or memory, at one point must not lose the rest of the sweep
        what = "out of memory while building the point" if memory.is_oom(e) else "reference"
        memory.release(case.device)
        return [_record(config, case, i, "error", f"{what}: {_one_line(e)}") for i in chosen]
    out = [evaluate(config, case, loss, impl, data, ref) for impl in chosen]
    built = setup.result()
    for r in out:
        if r["memory"] and built:
            # The peak while the inputs and the reference were made (shared by the implementations).
            r["memory"]["setup_peak_bytes"] = built["peak_bytes"]
        if r["memory"] and loss.logits_bytes is not None:
            r["memory"]["logits_bytes"] = loss.logits_bytes(case)  # what a fused loss never holds
    if config.timing.applies(case.distribution, case.scale):
        ok = {
            impl.name: impl.fn
            for impl, r in zip(chosen, out, strict=True)
            if r["status"] == "ok" and r["backward"] is not None
        }
        if ok:
            x, t, opts = data.on(case.device)
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
    return out


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
        return timing.time_case(fns, x, t, config.timing.min_run_time, threads, opts, case.reduction, rounds)

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


def evaluate(config: Config, case: Case, loss: Loss, impl, data: PointData, ref: Reference) -> dict:
    """Accuracy, overflow and peak memory of one implementation at one point (timing: see
    `run_case`). Whatever the implementation does — raise, hang past the timeout, run out
    of memory, return garbage — ends up in the record, not in the sweep."""
    threshold = config.threshold_bits(case.dtype)
    record = _record(config, case, impl, "ok")
    if _large(case):
        memory.trim()
    peak = memory.PeakMemory(case.device)
    shape = tuple(ref.loss.shape)
    try:
        if isinstance(impl.fn, worker.RemoteFn):
            # In its worker process (the timeout is enforced by killing it); audited here.
            outputs, record["memory"] = impl.fn.evaluate(
                data, case.device, case.reduction, shape, torch.get_num_threads()
            )
            _audit(outputs, ref, threshold, record, loss, data.target)
        else:
            with peak, deadline(config.timeout, f"{impl.name} (evaluation)"):
                outputs = worker.produce(
                    impl.fn, data, case.device, case.reduction, shape, trusted=impl.kind in BUILT_IN_KINDS
                )
                _audit(outputs, ref, threshold, record, loss, data.target)
            record["memory"] = peak.result()
        if ref.undefined:
            record["undefined"] = ref.undefined
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
    return record


# Implementations of these kinds are ours: they get the point's tensors without a copy (and
# without the check for writes into them, which needs one).
BUILT_IN_KINDS = ("naive", "stable", "framework")


def _audit(o: worker.Outputs, ref: Reference, threshold: float, record: dict, loss: Loss, target) -> None:
    """The record's forward and backward from an implementation's outputs (`worker.produce`),
    against the reference, on the reference's device; a loss of several inputs gets
    `backward_<input>` for each one after the first."""
    dev = ref.loss.device
    fwd = ErrorStats(threshold)
    fwd.add(o.elements.to(dev), ref.loss)
    if ref.reduced is not None:
        fwd.set_reduced(o.out.to(dev), ref.reduced)
    record["forward"] = {**fwd.as_dict(), "reference_value": ref.value}
    if o.note:
        record["message"] = o.note
    if o.grad is not None:
        mine, exact = loss.split(o.grad.to(dev), target), loss.split(ref.grad, target)
        for i, name in enumerate(loss.inputs):
            bwd = ErrorStats(threshold)
            bwd.add(mine[i], exact[i])
            record["backward" if i == 0 else f"backward_{name}"] = bwd.as_dict()
