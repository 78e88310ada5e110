"""The probe itself: validate the options and shapes, build bench's point and evaluate every
implementation exactly as a sweep point is measured (`sweep.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import custom, families, inputs, memory, precision as P, reference as R, sweep
from ..analysis import SCALE_FREE
from ..catalog import IGNORE_INDEX, PRECISIONS, REDUCTIONS
from ..config import DEVICE_RE, Config, custom_spec
from ..dtypes import FORMATS
from ..environment import device_problem
from ..errors import ReferenceUnavailable
from ..findings import findings as findings_of
from ..losses import LOSSES, Impl, Loss, Reference, implementation, reference
from ..losses.base import element_shape
from ..metrics import int_or_inf, ulp_distance
from .convert import Conversion, convert
from .load import ProbeError, _as_loaded
from .notes import _notes
from .text import _bits, _one_line, _plural, _shape, _unravel
from .validate import _dim_of, _input_stats, _layout, _target, _weight

# Loss option (`Loss.options`) -> the flag that sets it.
OPTION_FLAGS = {
    "weight": "--weight",
    "pos_weight": "--pos-weight",
    "label_smoothing": "--label-smoothing",
    "ignored": "--ignore-index",
    "targets": "soft targets",
    "dim": "--dim",
}
DISTRIBUTION = "normal"  # any valid value set: the Case only names the point


@dataclass
class ProbeResult:
    """Everything `render_table` and `to_json` show; `records` are bench's records as is."""

    loss: str
    dtype: str
    device: str
    reduction: str
    input: Conversion
    target: dict
    options: dict
    reference: dict
    results: list[dict]
    notes: list[str]
    records: list[dict]
    case: sweep.Case
    ref: Reference = field(repr=False)
    data: sweep.PointData = field(repr=False)
    findings: list[dict] = field(default_factory=list)  # findings.findings of the records

    # Imported when called: render.py imports this module for the class.
    def render(self) -> str:
        """The terminal table, the findings and the notes (what `losscheck probe` prints)."""
        from .render import render_table

        return render_table(self)

    def to_dict(self) -> dict:
        from .render import to_dict

        return to_dict(self)

    def to_json(self) -> str:
        """Strict JSON (what `losscheck probe --json` prints)."""
        from .render import to_json

        return to_json(self)


def probed_families() -> tuple[str, ...]:
    """The families a probe runs: every one that can run here, not only the defaults (the
    user's tensors through every framework installed: optax's #896 shows in `jax` only)."""
    return tuple(f.name for f in families.all_families() if f.unavailable() is None)


def supported_flags(loss: Loss) -> list[str]:
    flags = [OPTION_FLAGS[o] for o in loss.options if o in OPTION_FLAGS]
    if loss.sequence and "--ignore-index" not in flags:
        flags.append("--ignore-index")
    return flags


def _unsupported(loss: Loss, flag: str) -> ProbeError:
    flags = supported_flags(loss)
    return ProbeError(
        flag,
        f"{loss.name} does not support {flag}",
        f"{loss.name}'s options: {', '.join(flags) if flags else 'none'}, --reduction",
    )


def _check_option(loss: Loss, option: str, flag: str) -> None:
    supported = option in loss.options or (option == "ignored" and loss.sequence)
    if not supported:
        raise _unsupported(loss, flag)


def _number(value, flag: str, allowed: str, ok) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ProbeError(flag, f"{value!r} is not a number", allowed) from None
    if not ok(x):
        raise ProbeError(flag, f"bad value {value!r}", allowed)
    return x


def _integer(value, flag: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ProbeError(flag, f"{value!r} is not an integer", "an integer, e.g. -100") from None


def run_probe(
    loss_name: str,
    input,
    target,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    reduction: str = "mean",
    weight=None,
    pos_weight=None,
    label_smoothing=None,
    ignore_index=None,
    impls=(),
    numpy_impls=(),
    grad_output=None,
    dim=None,
    precision: str = "native",
) -> ProbeResult:
    """Evaluate every implementation of `loss_name` on the given input and target, exactly as
    bench evaluates a sweep point. `input`, `target` and `weight` are specs (inline list or
    file), `Loaded`, tensors or numpy arrays; `impls`/`numpy_impls` are 'module:function' specs.
    `grad_output` (reduction "none"): the upstream gradient, a spec like `input`'s or one of
    inputs.GRAD_OUTPUTS (drawn from seed 0 as bench draws them). `dim` (log_softmax): the
    dimension its rows lie along, any of the input's (default -1); log_softmax takes no target
    (None). `precision`: the policy the implementations run under (precision.py; float16 and
    bfloat16 inputs), as bench's `precision:` axis."""
    if loss_name not in LOSSES:
        raise ProbeError("LOSS", f"unknown loss {loss_name!r}", ", ".join(LOSSES))
    loss = LOSSES[loss_name]
    if reduction not in REDUCTIONS:
        raise ProbeError("--reduction", f"unknown value {reduction!r}", ", ".join(REDUCTIONS))
    if dtype is not None and dtype not in FORMATS:
        raise ProbeError("--dtype", f"unknown value {dtype!r}", ", ".join(FORMATS))
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise ProbeError("--device", f"unknown device {device!r}", "cpu, cuda, cuda:N, mps")
    problem = device_problem(device)
    if problem:
        raise ProbeError("--device", problem, "a device present here (cpu always is)")
    # Options the loss does not support: before reading anything.
    for option, flag, value in (
        ("weight", "--weight", weight),
        ("pos_weight", "--pos-weight", pos_weight),
        ("label_smoothing", "--label-smoothing", label_smoothing),
        ("ignored", "--ignore-index", ignore_index),
    ):
        if value is not None:
            _check_option(loss, option, flag)
    if pos_weight is not None and _scalar(pos_weight):
        # Any finite number, zero and negative ones too: torch takes them.
        pos_weight = _number(pos_weight, "--pos-weight", "a finite number", math.isfinite)
    if label_smoothing is not None:
        label_smoothing = _number(label_smoothing, "--label-smoothing", "a number in [0, 1]", lambda x: 0 <= x <= 1)
    if ignore_index is not None:
        ignore_index = _integer(ignore_index, "--ignore-index")
    if dim is not None:
        _check_option(loss, "dim", "--dim")
        dim = _integer(dim, "--dim")
    if precision not in PRECISIONS:
        raise ProbeError("--precision", f"unknown value {precision!r}", ", ".join(PRECISIONS))
    if target is None and not loss.elementwise:
        raise ProbeError("--target", "missing", f"the target {loss.name} compares the input with")
    if grad_output is not None and reduction != "none":
        raise ProbeError(
            "--grad-output", f"applies to --reduction none, not {reduction}", "--reduction none, or no --grad-output"
        )
    if loss.sequence and ignore_index is None:
        ignore_index = IGNORE_INDEX
    customs = _custom_impls(impls, numpy_impls)

    src_in = _as_loaded(input, "--input")
    src_t = None if loss.elementwise else _as_loaded(target, "--target")  # log_softmax: no target
    if dtype is None:
        dtype = (src_in.format_name if src_in.origin != "inline" else None) or "float32"
    if not P.applies(precision, dtype):
        raise ProbeError(
            "--precision", f"{precision} applies to float16 and bfloat16 inputs, not {dtype}", "native, or --dtype"
        )
    tdtype = FORMATS[dtype].torch_dtype
    if loss.elementwise:
        dim = _dim_of(-1 if dim is None else dim, src_in.shape)
    shape = _layout(loss, src_in, src_t, -1 if dim is None else dim)
    soft = shape["soft"]
    if soft:
        _check_option(loss, "targets", "--target")
        if ignore_index is not None and not loss.sequence:
            raise ProbeError(
                "--ignore-index",
                "applies to class-index targets, not to soft targets",
                "a target of class indices (N,), or no --ignore-index",
            )
    layout: tuple[tuple[str, str], ...] = (("targets", "soft"),) if soft else ()
    if len(shape["shape"]) > 2 and not loss.sequence and not loss.elementwise:  # (N, C, d1, d2, …)
        layout += (("spatial", "x".join(map(str, shape["shape"][2:]))),)
    _check_memory(_case(loss_name, device, dtype, shape, reduction, tuple(sorted(layout))))

    inp, in_conv = convert(src_in, tdtype, "input")
    in_shape = src_in.shape
    del src_in  # an .npz member or old-format .pt file is in memory: keep only the converted copy
    if not loss.multiclass:
        inp = inp.reshape(-1)
    layout_opts = {} if dim is None or dim == inp.dim() - 1 else {"dim": dim}  # log_softmax's rows
    stats = _input_stats(loss, inp, layout_opts)
    # Probabilities outside [0, 1] (and NaN inputs) are measured, not refused: the reference marks
    # them out of domain and each implementation's outcome is recorded (raised, NaN or a number).
    conversions = [in_conv]
    if src_t is None:  # an elementwise function: no target (its reference reads none)
        tgt = torch.zeros(shape["rows"], dtype=torch.int64)
        target_info = {"source": "none", "shape": [], "from_dtype": "-", "kind": "none"}
    else:
        tgt, target_info = _target(loss, src_t, tdtype, soft, shape, ignore_index, conversions)
    del src_t
    options: dict = dict(layout_opts)
    if weight is not None:
        options["weight"] = _weight(loss, _as_loaded(weight, "--weight"), tdtype, in_shape, shape, conversions)
    pw_record = None  # a per-class pos_weight as the record names it (the options hold it per element)
    if isinstance(pos_weight, float):
        pw = R.round_to(np.array([pos_weight]), tdtype)
        if float(pw[0]) != pos_weight:
            conversions.append(
                Conversion(
                    "pos_weight", "--pos-weight", "float64", dtype, (1,), 1, 0, 0, ((0,), pos_weight, float(pw[0]))
                )
            )
        options["pos_weight"] = pw
    elif pos_weight is not None:
        per_class = _pos_weight_vector(_as_loaded(pos_weight, "--pos-weight"), tdtype, in_shape, conversions)
        # The binary input is flattened (see the package's docstring): the vector with it.
        options["pos_weight"] = torch.broadcast_to(per_class, in_shape).reshape(-1)
        pw_record = _pos_weight_record(per_class)
    soft = soft or target_info.get("kind") == "soft"  # binary soft labels are told by their values
    if label_smoothing:
        options["label_smoothing"] = label_smoothing
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    upstream, up_name = _upstream(grad_output, loss, loss_name, inp, tgt, tdtype, device, conversions)
    case_options = dict(_case_options(options, soft, target_info, pw_record)) | dict(layout)
    if up_name:
        case_options["grad_output"] = up_name
    if precision != "native":
        case_options["precision"] = precision
    if "dim" in options:
        case_options["dim"] = options["dim"]
    case = _case(loss_name, device, dtype, shape, reduction, tuple(sorted(case_options.items())))

    config = _config(loss_name, dtype, device, reduction, shape)
    data = sweep.PointData(inp, tgt, options, upstream)
    try:
        ref = reference(loss, inp, tgt, options, reduction, upstream)
    except ReferenceUnavailable as e:
        raise ProbeError("--dtype", str(e), "float32, float16, bfloat16") from None
    except Exception as e:
        if memory.is_oom(e):
            raise ProbeError("--input", f"out of memory while computing the reference: {_one_line(e)}") from None
        raise
    all_impls = [implementation(loss, i) for i in probed_families()]
    all_impls += [custom.for_loss(c, loss_name) for c in customs]
    ref_in = _widened(loss, data, reduction, ref)
    records = [sweep.evaluate(config, case, loss, impl, data, ref, ref_in) for impl in all_impls]
    outputs = _elementwise(all_impls, records, data, device, case.policy)
    results = [
        _result(
            impl,
            rec,
            outputs.get(impl.name),
            ref_in(outputs[impl.name].dtype) if impl.name in outputs else ref,
            dtype,
            shape,
        )
        for impl, rec in zip(all_impls, records, strict=True)
    ]
    ref_info = _reference_info(ref, stats, shape, loss)
    notes = _notes(
        loss, shape, stats, conversions, ref, records, outputs, dtype, reduction, target_info, tgt, inp, options
    )
    return ProbeResult(
        loss_name,
        dtype,
        device,
        reduction,
        in_conv,
        target_info,
        _options_info(options, soft, dtype, pw_record),
        ref_info,
        results,
        notes,
        records,
        case,
        ref,
        data,
        _findings(records, bool(stats["inf_rows"].any())),
    )


def _widened(loss: Loss, data: sweep.PointData, reduction: str, ref: Reference):
    """The reference rounded to a wider output's dtype (a precision policy's float32 for a
    bfloat16 input), as bench computes it: the same exact values, the inputs widened exactly."""
    refs = {ref.loss.dtype: ref}

    def ref_in(dtype: torch.dtype) -> Reference:
        if dtype not in refs:
            wide = {
                k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in data.options.items()
            }
            t = data.target.to(dtype) if data.target.is_floating_point() else data.target
            up = None if data.grad_output is None else data.grad_output.to(dtype)
            refs[dtype] = reference(loss, data.inp.to(dtype), t, wide, reduction, up)
        return refs[dtype]

    return ref_in


def _upstream(spec, loss: Loss, loss_name: str, inp, tgt, tdtype, device: str, conversions: list):
    """(the upstream gradient in the dtype, its record name) of `--grad-output`, or (None, None):
    a named kind (inputs.GRAD_OUTPUTS, from seed 0) or values shaped like the per-element loss."""
    if spec is None:
        return None, None
    shape = element_shape(loss, inp, tgt)
    if isinstance(spec, str) and spec in inputs.GRAD_OUTPUTS:
        return R.round_to(inputs.grad_output_values(spec, loss_name, shape, 0, device), tdtype), spec
    loaded = _as_loaded(spec, "--grad-output")
    if tuple(loaded.shape) != tuple(shape):
        raise ProbeError(
            "--grad-output",
            f"shape {_shape(loaded.shape)} is not that of the per-element loss {_shape(shape)}",
            f"values of shape {_shape(shape)}, or one of {', '.join(inputs.GRAD_OUTPUTS)}",
        )
    values, conv = convert(loaded, tdtype, "grad_output")
    conversions.append(conv)
    return values.to(device), "given"


def _findings(records: list[dict], infinite_logits: bool) -> list[dict]:
    """bench's findings (findings.py) for the probe's one point: every kind but `formula`.
    An input holding ±inf logits is judged as bench's `nonfinite` value set, so NaN/inf
    results there are `limit` findings; the record does not say at which rows they occur,
    so with ±inf logits in some rows a NaN in a finite row is reported as `limit` too (the
    notes say which rows)."""
    if infinite_logits:
        records = [{**r, "distribution": SCALE_FREE[0]} for r in records]
    return findings_of(records, sweep=False)


def _custom_impls(impls, numpy_impls) -> list[Impl]:
    out: list[Impl] = []
    for api, specs, where in (("torch", impls, "--impl"), ("numpy", numpy_impls, "--numpy-impl")):
        for spec in specs or ():
            out.append(custom.load(custom_spec(spec, api=api, where=where), "<command line>"))
    names = [i.name for i in out]
    for n in names:
        if names.count(n) > 1:
            raise ProbeError(
                "--impl", f"two implementations are named {n!r}", "functions of distinct names (rename one)"
            )
    return out


def _check_memory(case: sweep.Case) -> None:
    problem = sweep.memory_problem(case)
    if problem:
        raise ProbeError(
            "--input",
            f"too large to probe here: {problem}",
            "a smaller slice of the input, or more memory (LOSSCHECK_MEMORY_LIMIT caps the estimate)",
        )


def _case(loss_name: str, device: str, dtype: str, shape: dict, reduction: str, options: tuple) -> sweep.Case:
    """The probe's inputs as the one sweep point they are (for the memory estimate and the record)."""
    return sweep.Case(
        0,
        loss_name,
        device,
        dtype,
        shape["batch"],
        shape["classes"],
        DISTRIBUTION,
        1.0,
        reduction,
        options,
        shape["time"],
    )


def _scalar(value) -> bool:
    """Whether a --pos-weight is one number (else an array spec: a per-class vector)."""
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _pos_weight_vector(w, dtype: torch.dtype, input_shape: tuple, conversions: list) -> torch.Tensor:
    """A per-class pos_weight: one finite value per class of (N, C) multi-label inputs (the
    input's last dimension), broadcast over the rows as torch does."""
    classes = input_shape[-1] if input_shape else 1
    if w.shape not in ((classes,), (1,)):
        raise ProbeError(
            "--pos-weight",
            f"shape {_shape(w.shape)}: pos_weight is one number or one per class (the input's last dimension)",
            f"a number, or a vector of shape ({classes},)",
        )
    tensor, conv = convert(w, dtype, "pos_weight")
    conversions.append(conv)
    if not bool(tensor.isfinite().all()):
        raise ProbeError(w.source, "pos_weight values must be finite", "finite numbers (zero and negative too)")
    return tensor


def _pos_weight_record(pw: torch.Tensor):
    """pos_weight as records and the JSON hold it: its number, or the list of its values."""
    return float(pw[0]) if pw.numel() == 1 else tuple(float(v) for v in pw)


def _case_options(options: dict, soft: bool, target_info: dict, pw_record=None) -> tuple:
    out: dict[str, object] = {}
    if "weight" in options:
        out["weight"] = "given"
    if "pos_weight" in options:
        out["pos_weight"] = pw_record if pw_record is not None else _pos_weight_record(options["pos_weight"])
    if "label_smoothing" in options:
        out["label_smoothing"] = options["label_smoothing"]
    if target_info.get("ignored"):
        total = target_info["ignored"] + target_info["kept"]
        out["ignored"] = target_info["ignored"] / total
    if soft:
        out["targets"] = "soft"
    return tuple(sorted(out.items()))


def _config(loss_name: str, dtype: str, device: str, reduction: str, shape: dict) -> Config:
    """The one-point config bench would run for this probe (what `sweep.evaluate` reads)."""
    mapping = {
        "name": "probe",
        "losses": [loss_name],
        "implementations": list(probed_families()),
        "scales": [1],
        "batch_sizes": [shape["batch"]],
        "dtypes": [dtype],
        "devices": [device],
        "distributions": [DISTRIBUTION],
        "reductions": [reduction],
        "timing": False,
    }
    if shape["classes"] is not None and shape["classes"] >= 2:
        mapping["classes"] = [shape["classes"]]
    if shape["time"] is not None:
        mapping["sequence_lengths"] = [shape["time"]]
    return Config.from_mapping(mapping, "<probe>")


def _elementwise(impls: list[Impl], records: list[dict], data: sweep.PointData, device: str, policy: str) -> dict:
    """Each implementation's "none" output on the CPU (per row: small), for the worst element,
    called under the precision policy as `sweep.evaluate` called it."""
    out = {}
    x, t, opts = data.on(device)
    for impl, rec in zip(impls, records, strict=True):
        if rec["status"] != "ok":
            continue
        try:
            with torch.no_grad():
                y = P.wrap(impl.fn, policy, device)(x, t, "none", **opts)
            out[impl.name] = y.detach().cpu()
        except Exception:  # evaluate() succeeded with the same call; a flaky implementation is not ours to judge
            continue
    return out


def _worst(y: torch.Tensor, ref: Reference, dtype: str, shape: dict) -> dict | None:
    if tuple(y.shape) != tuple(ref.loss.shape) or y.dtype != ref.loss.dtype:
        return None
    d = ulp_distance(y, ref.loss).reshape(-1)
    i = int(torch.argmax(d))  # the first of the largest
    ulp = float(d[i])
    index = _unravel(i, tuple(ref.loss.shape) if shape["classes"] is not None else shape["shape"])
    return {
        "index": list(index),
        "value": float(y.reshape(-1)[i]),
        "reference": float(ref.loss.reshape(-1)[i]),
        "ulp": int_or_inf(ulp),
        "bits": _bits(ulp, dtype),
    }


def _result(impl: Impl, rec: dict, y: torch.Tensor | None, ref: Reference, dtype: str, shape: dict) -> dict:
    out = {
        "impl": impl.name,
        "kind": impl.kind,
        "status": rec["status"],
        "message": rec["message"],
        "forward": None,
        "backward": None,
        "returned": None,
    }
    if rec["forward"] is not None:
        fwd = dict(rec["forward"])
        fwd["reduced_bits"] = None if fwd["reduced_ulp"] is None else _bits(float(fwd["reduced_ulp"]), dtype)
        fwd["worst"] = None if y is None else _worst(y, ref, dtype, shape)
        out["forward"] = fwd
    if rec["backward"] is not None:
        out["backward"] = dict(rec["backward"])
    if y is not None:
        yf = y.reshape(-1)
        out["returned"] = {
            "nan": int(yf.isnan().sum()),
            "posinf": int((yf == math.inf).sum()),
            "neginf": int((yf == -math.inf).sum()),
        }
    return out


def _reference_info(ref: Reference, stats: dict, shape: dict, loss: Loss) -> dict:
    """The reference as JSON: the reduced value (rounded to the dtype, and exact), why it is
    undefined if it is, and the elements whose reference is a limit (±inf logits) or NaN."""
    flat = ref.loss.reshape(-1)
    rows_shape = tuple(ref.loss.shape) if loss.multiclass else shape["shape"]
    nan = flat.isnan()
    no_limit = nan.numpy() & ~stats["nan_rows"]
    undefined = ref.undefined
    if undefined is None and ref.value is not None and math.isnan(ref.value):
        why = []
        if no_limit.any():
            why.append(
                f"{_plural(int(no_limit.sum()), 'row')} without a limit (several +inf logits with the "
                "target among them, or every logit -inf)"
            )
        if stats["nan"]:
            why.append(f"{_plural(stats['nan'], 'NaN input')}")
        undefined = f"the {ref.reduction} is NaN: " + (" and ".join(why) or "a NaN element") + " (see the notes)"
    limits = np.flatnonzero(stats["inf_rows"] & ~stats["nan_rows"])
    return {
        "forward": None if ref.reduced is None else float(ref.reduced),
        "value": ref.value,
        "reduction": ref.reduction,
        "undefined": undefined,
        "nan": int(nan.sum()),
        "posinf": int((flat == math.inf).sum()),
        "neginf": int((flat == -math.inf).sum()),
        "limits": {
            "count": int(len(limits)),
            "examples": [
                {"index": list(_unravel(int(i), rows_shape)), "reference": float(flat[int(i)])} for i in limits[:5]
            ],
        },
        "no_limit": int(no_limit.sum()),
    }


def _options_info(options: dict, soft: bool, dtype: str, pw_record=None) -> dict:
    out: dict = {"targets": "soft" if soft else "hard"}
    if "weight" in options:
        w = options["weight"]
        out["weight"] = {"shape": list(w.shape), "dtype": dtype}
    if "pos_weight" in options:
        out["pos_weight"] = pw_record if pw_record is not None else _pos_weight_record(options["pos_weight"])
    if "label_smoothing" in options:
        out["label_smoothing"] = options["label_smoothing"]
    if "ignore_index" in options:
        out["ignore_index"] = options["ignore_index"]
    if "dim" in options:
        out["dim"] = options["dim"]
    return out
