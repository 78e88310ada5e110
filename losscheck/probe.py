"""`losscheck probe LOSS --input X --target Y`: audit the exact inputs that broke a training run.

The inputs come inline (JSON-style lists: ``'[inf, 1.0]'``, ``'[[1, 2], [3, -inf]]'``;
``inf``, ``-inf`` and ``nan`` are accepted) or from files: ``.pt``/``.pth`` (``torch.load``
with ``weights_only=True``: a tensor, a dict holding one tensor, or ``FILE.pt:KEY``),
``.npy``, ``.npz`` (the only array, or ``FILE.npz:KEY``). Each is converted **once** to the
dtype under test (correctly rounded: ``reference.round_to`` from float64 sources,
``tensor.to(dtype)`` otherwise), and the output says whether that conversion changed any
value; the reference is computed from the converted values (METRICS.md, "Inputs").

The numbers are bench's, by construction: the probe builds a `sweep.PointData` and a
`sweep.Case` of the probe's shape, computes `losses.reference` and calls `sweep.evaluate`
for every implementation (naive, stable, torch, and the user's own, ``--impl`` /
``--numpy-impl``), exactly as a sweep point is measured. On top of the record it finds each
implementation's worst element (per-element ULP distances of its ``"none"`` output against
the reference) and explains the points where the true value is a limit (±inf logits) or
undefined (0/0 when every target is ignored; several +inf logits in one row; a NaN input).
Its findings are bench's (`findings.findings` on its records, every kind but `formula`,
which needs a sweep), printed under the table and in the JSON's `findings`.

Shapes: binary losses (``bce`` on probabilities in [0, 1], ``bce_with_logits``) take an
input of any shape with a target of the same shape, flattened to ``(N,)`` (the losses are
elementwise, so the mean and sum do not change; element indices are reported in the
original shape); ``cross_entropy`` takes ``(N, C)`` logits with ``(N,)`` class indices or an
``(N, C)`` floating target (soft targets); ``sequence_cross_entropy`` takes ``(B, T, V)``
logits with ``(B, T)`` class indices, ``-100`` marking padding unless ``--ignore-index``
says otherwise.

Memory: a probe holds what a bench point of the same shape holds (`sweep.INPUT_COPIES`,
6 copies of the input in the dtype under test: the input, an implementation's own copy of
it, the reference's gradient, the implementation's gradient and its working copies), plus the per-row outputs. Files are read
without a float64 copy of the whole input: ``.npy`` files are memory-mapped and ``.pt``
files (zip format, the default since torch 1.6) are loaded with ``mmap=True``; when the
file's dtype is the dtype under test its tensor is used as is, otherwise it is converted in
blocks of 2^20 values into one tensor of the dtype. ``.npz`` members and old-format ``.pt``
files are read whole (one more copy, in the file's dtype). Before converting, the probe
checks the estimate against the memory available (`sweep.memory_problem`, which honours
``LOSSCHECK_MEMORY_LIMIT``) and refuses with a one-line error rather than being killed.

Everything a user can get wrong is a `ProbeError` (a `ConfigError`, so: one line on
stderr and exit code 2 through the CLI's group); an implementation that fails is a result
(``status: error``), as in bench.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from tabulate import tabulate

from . import custom, memory, sweep
from . import reference as R
from .config import BUILTIN_IMPLS, DEVICE_RE, custom_spec, parse_config
from .dtypes import FORMATS, fmt
from .environment import device_problem
from .errors import ConfigError, ReferenceUnavailable
from .losses import IGNORE_INDEX, LOSSES, Impl, Loss, Reference, reference
from .losses.base import REDUCTIONS
from .metrics import int_or_inf, ulp_distance
from .analysis import SCALE_FREE
from .findings import capped_bits
from .findings import findings as findings_of
from .results import _encode

# Values converted (and scanned) at once: bounded temporaries (a float64 block is 8 MiB).
BLOCK = 1 << 20
FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
KEYED_SUFFIXES = (".pt", ".pth", ".npz")
INLINE_HELP = ("a JSON-style list ('[inf, 1.0]', nested for 2-D/3-D; inf, -inf, nan accepted), "
               "or a .pt/.pth, .npy or .npz file (FILE.pt:KEY, FILE.npz:KEY for one entry)")
# Loss option (`Loss.options`) -> the flag that sets it.
OPTION_FLAGS = {"weight": "--weight", "pos_weight": "--pos-weight", "label_smoothing": "--label-smoothing",
                "ignored": "--ignore-index", "targets": "soft targets"}
DISTRIBUTION = "normal"  # any valid value set: the Case only names the point


class ProbeError(ConfigError):
    """A bad probe input: names the flag or file, the problem, and what is allowed (exit 2)."""

    def __init__(self, source: str, problem: str, allowed: str | None = None):
        super().__init__(source, "", problem, allowed)


# ---- loading ------------------------------------------------------------------------------

@dataclass
class Loaded:
    """An array as read (not yet converted): inline values, a file's tensor or (memory-mapped)
    numpy array. `source` names it in messages and in the output."""

    source: str
    data: np.ndarray | torch.Tensor
    origin: str  # "inline", "pt", "npy", "npz", "tensor" (given in Python)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype_name(self) -> str:
        d = self.data.dtype
        return str(d).replace("torch.", "") if isinstance(self.data, torch.Tensor) else np.dtype(d).name

    @property
    def floating(self) -> bool:
        if isinstance(self.data, torch.Tensor):
            return self.data.is_floating_point()
        return self.data.dtype.kind == "f"

    @property
    def format_name(self) -> str | None:
        """The losscheck dtype of the values, if they have one (float64/32/16, bfloat16)."""
        return self.dtype_name if self.dtype_name in FORMATS else None

    def flat_block(self, rows: slice) -> np.ndarray | torch.Tensor:
        # One flat view (a copy only for a non-contiguous array), made once.
        if getattr(self, "_flat", None) is None:
            self._flat = self.data.reshape(-1)
        return self._flat[rows]


_WORD = re.compile(r"(?<![A-Za-z0-9_.])([+-]?)(infinity|inf|nan)(?![A-Za-z0-9_])", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf(inity)?|nan)\s*$", re.IGNORECASE)


def parse_inline(text: str, source: str) -> np.ndarray:
    """A JSON-style (nested) list of numbers -> float64 array (int64 if every value is an integer)."""
    def word(m: re.Match) -> str:
        sign, w = m.groups()
        if w.lower() == "nan":
            return "NaN"
        return ("-" if sign == "-" else "") + "Infinity"

    try:
        data = json.loads(_WORD.sub(word, text))
    except json.JSONDecodeError as e:
        raise ProbeError(source, f"cannot read {_short(text)!r} as a list of numbers: {e.msg} at column {e.colno}",
                         INLINE_HELP) from None
    shape = _nested_shape(data, source)
    if 0 in shape:
        raise ProbeError(source, "empty list", "at least one value")
    leaves = _leaves(data)
    if all(isinstance(v, int) for v in leaves):
        if any(not -2**63 <= v < 2**63 for v in leaves):
            raise ProbeError(source, "an integer beyond the int64 range", "integers of int64")
        return np.array(data, dtype=np.int64)
    try:
        return np.array(data, dtype=np.float64)
    except OverflowError:  # an integer too large for float64
        raise ProbeError(source, "a number beyond float64's range", "finite numbers, inf, -inf, nan") from None


def _nested_shape(obj, source: str, depth: int = 0) -> tuple[int, ...]:
    if isinstance(obj, list):
        if depth > 8:
            raise ProbeError(source, "lists nested more than 8 deep", "at most 3 dimensions")
        if not obj:
            return (0,)
        shapes = {_nested_shape(o, source, depth + 1) for o in obj}
        if len(shapes) != 1:
            raise ProbeError(source, f"ragged nested list (rows of different shapes at depth {depth + 1})",
                             "a rectangular list of lists")
        return (len(obj),) + shapes.pop()
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        raise ProbeError(source, f"{json.dumps(obj)} is not a number", INLINE_HELP)
    return ()


def _leaves(obj) -> list:
    if isinstance(obj, list):
        return [v for o in obj for v in _leaves(o)]
    return [obj]


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def load_array(spec: str, what: str = "--input") -> Loaded:
    """Read `spec` (inline list or file, see the module docstring) without converting it."""
    if not isinstance(spec, str) or not spec.strip():
        raise ProbeError(what, "empty value", INLINE_HELP)
    text = spec.strip()
    if text.startswith("[") or _NUMBER.match(text):
        return Loaded(what, parse_inline(text, what), "inline")
    path, key = Path(text), None
    if ":" in text and not _is_file(path):
        head, tail = text.rsplit(":", 1)
        if head.lower().endswith(KEYED_SUFFIXES + (".npy",)):
            path, key = Path(head), tail
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ProbeError(what, f"{_short(text)!r} is neither a list nor a .pt/.pth/.npy/.npz file", INLINE_HELP)
    if not _is_file(path):
        raise ProbeError(str(path), "file not found", f"an existing file for {what}")
    return _load_file(path, key, text)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _load_file(path: Path, key: str | None, source: str) -> Loaded:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return Loaded(source, _checked_tensor(_torch_entry(path, key), source), "pt")
    if suffix == ".npy":
        if key is not None:
            raise ProbeError(source, "a .npy file holds one array: no ':KEY'", f"{path}")
        try:
            arr = np.load(path, mmap_mode="c", allow_pickle=False)
        except Exception as e:  # not an .npy file, a pickled object array, a truncated file...
            raise ProbeError(str(path), f"cannot read as .npy: {_one_line(e)}") from None
        return Loaded(source, _checked_array(arr, source), "npy")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is None:
                    if len(names) != 1:
                        raise ProbeError(str(path), f"holds {len(names)} arrays ({', '.join(names[:8])}): "
                                         "name one", f"{path}:KEY")
                    key = names[0]
                elif key not in names:
                    raise ProbeError(str(path), f"no array named {key!r}", ", ".join(names[:20]))
                arr = z[key]
        except ProbeError:
            raise
        except Exception as e:
            raise ProbeError(str(path), f"cannot read as .npz: {_one_line(e)}") from None
        return Loaded(source, _checked_array(arr, source), "npz")
    raise ProbeError(str(path), f"unsupported file type {suffix!r}", ".pt, .pth, .npy, .npz")


def _torch_entry(path: Path, key: str | None) -> torch.Tensor:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # an old-format (non-zip) file
    except Exception as e:  # not a torch file, or one holding objects weights_only refuses
        raise ProbeError(str(path), f"cannot read with torch.load(weights_only=True): {_one_line(e)}",
                         "a file saved with torch.save(tensor) or torch.save({'name': tensor})") from None
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise ProbeError(f"{path}:{key}", "the file holds a single tensor, not a dict", str(path))
        return obj
    if isinstance(obj, dict):
        if key is not None:
            if key not in obj:
                raise ProbeError(str(path), f"no entry named {key!r}", ", ".join(map(str, list(obj)[:20])))
            if not isinstance(obj[key], torch.Tensor):
                raise ProbeError(f"{path}:{key}", f"is a {type(obj[key]).__name__}, not a tensor")
            return obj[key]
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ProbeError(str(path), f"holds {len(tensors)} tensors ({', '.join(map(str, tensors[:8]))}): "
                             "name one", f"{path}:KEY")
        return obj[tensors[0]]
    raise ProbeError(str(path), f"holds a {type(obj).__name__}, not a tensor",
                     "a tensor, or a dict of tensors with FILE.pt:KEY")


def _checked_tensor(t: torch.Tensor, source: str) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized:
        raise ProbeError(source, f"a {t.layout} tensor is not supported", "a dense tensor")
    if t.is_complex() or (t.is_floating_point() and t.dtype not in (f.torch_dtype for f in FORMATS.values())):
        raise ProbeError(source, f"unsupported dtype {str(t.dtype).replace('torch.', '')}",
                         ", ".join(FORMATS) + ", integers")
    if t.numel() == 0:
        raise ProbeError(source, f"empty tensor of shape {tuple(t.shape)}", "at least one value")
    return t.detach().cpu()


def _checked_array(a: np.ndarray, source: str) -> np.ndarray:
    if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and a.dtype.itemsize not in (2, 4, 8)):
        raise ProbeError(source, f"unsupported dtype {a.dtype}", "float16, float32, float64, integers")
    if a.size == 0:
        raise ProbeError(source, f"empty array of shape {a.shape}", "at least one value")
    return a


def _as_loaded(x, what: str) -> Loaded:
    if isinstance(x, Loaded):
        return x
    if isinstance(x, str):
        return load_array(x, what)
    if isinstance(x, torch.Tensor):
        return Loaded(what, _checked_tensor(x, what), "tensor")
    if isinstance(x, np.ndarray):
        return Loaded(what, _checked_array(x, what), "tensor")
    if isinstance(x, (list, tuple, float, int)):
        return Loaded(what, parse_inline(json.dumps(x), what), "inline")
    raise ProbeError(what, f"cannot use a {type(x).__name__}", INLINE_HELP)


# ---- conversion ---------------------------------------------------------------------------

@dataclass
class Conversion:
    """What converting one array to the dtype under test did to its values."""

    what: str  # "input", "target", "weight"
    source: str
    from_dtype: str
    to_dtype: str
    shape: tuple[int, ...]
    changed: int = 0
    overflowed: int = 0  # finite values that became ±inf
    flushed: int = 0  # non-zero values that became 0
    example: tuple | None = None  # (index in the original shape, before, after)

    def as_dict(self) -> dict:
        return {"source": self.source, "shape": list(self.shape), "from_dtype": self.from_dtype,
                "dtype": self.to_dtype, "changed": self.changed, "overflowed": self.overflowed,
                "flushed_to_zero": self.flushed,
                "example": None if self.example is None else
                {"index": list(self.example[0]), "before": self.example[1], "after": self.example[2]}}

    def sentence(self) -> str | None:
        if not self.changed:
            return None
        n = int(np.prod(self.shape, dtype=np.int64))
        s = (f"converting the {self.what} ({self.from_dtype}, {_where_from(self.source)}) to {self.to_dtype} "
             f"changed {self.changed} of {n} value{'s' if n > 1 else ''}")
        if self.example is not None:
            idx, before, after = self.example
            s += f" (e.g. {_index(idx)}: {before!r} -> {after!r})"
        extra = []
        if self.overflowed:
            extra.append(f"{_plural(self.overflowed, 'finite value')} overflowed to ±inf")
        if self.flushed:
            extra.append(f"{_plural(self.flushed, 'non-zero value')} became 0")
        if extra:
            s += "; " + ", ".join(extra)
        return s + f"; the reference is computed from the {self.to_dtype} values"


def convert(loaded: Loaded, dtype: torch.dtype, what: str = "input") -> tuple[torch.Tensor, Conversion]:
    """`loaded` rounded once to `dtype`, in blocks of BLOCK values (no float64 copy of the
    whole array); the tensor of the file itself when it already has that dtype."""
    name = fmt(dtype).name
    conv = Conversion(what, loaded.source, loaded.dtype_name, name, loaded.shape)
    data = loaded.data
    if isinstance(data, torch.Tensor) and data.dtype == dtype:
        return data.contiguous(), conv
    same = _numpy_dtype(dtype)  # None for bfloat16: numpy has none (and dtype == None means float64!)
    if (isinstance(data, np.ndarray) and same is not None and data.dtype == same and data.dtype.isnative
            and data.flags.c_contiguous and data.flags.writeable):
        return torch.from_numpy(data), conv
    out = torch.empty(loaded.shape, dtype=dtype)
    flat_out = out.view(-1)
    n = loaded.numel
    wide_source = loaded.dtype_name in ("float64",) or not loaded.floating
    for start in range(0, n, BLOCK):
        rows = slice(start, min(n, start + BLOCK))
        block = loaded.flat_block(rows)
        if isinstance(block, np.ndarray):
            before = torch.from_numpy(np.asarray(block, dtype=np.float64))
            if not wide_source:
                block = torch.from_numpy(np.array(block, dtype=block.dtype.newbyteorder("=")))
        else:
            before = block.to(torch.float64)
        # float64 (and integer) sources are rounded from float64 by round_to: torch's own
        # float64 -> half conversion goes through float32 and can round twice.
        after = R.round_to(before.numpy(), dtype) if wide_source else block.to(dtype)
        flat_out[rows] = after
        _count_changes(conv, before, after.to(torch.float64), start)
    return out, conv


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}.get(dtype)


def _count_changes(conv: Conversion, before: torch.Tensor, after: torch.Tensor, offset: int) -> None:
    same = (before == after) | (before.isnan() & after.isnan())
    changed = ~same
    k = int(changed.sum())
    if not k:
        return
    conv.changed += k
    conv.overflowed += int((before.isfinite() & after.isinf()).sum())
    conv.flushed += int(((before != 0) & (after == 0)).sum())
    if conv.example is None:
        i = int(changed.nonzero()[0, 0])
        index = np.unravel_index(offset + i, conv.shape) if conv.shape else ()
        conv.example = (tuple(int(j) for j in index), float(before[i]), float(after[i]))


# ---- the probe ----------------------------------------------------------------------------

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


def supported_flags(loss: Loss) -> list[str]:
    flags = [OPTION_FLAGS[o] for o in loss.options if o in OPTION_FLAGS]
    if loss.sequence and "--ignore-index" not in flags:
        flags.append("--ignore-index")
    return flags


def _unsupported(loss: Loss, flag: str) -> ProbeError:
    flags = supported_flags(loss)
    return ProbeError(flag, f"{loss.name} does not support {flag}",
                      f"{loss.name}'s options: {', '.join(flags) if flags else 'none'}, --reduction")


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


def run_probe(loss_name: str, input, target, *, dtype: str | None = None, device: str = "cpu",
              reduction: str = "mean", weight=None, pos_weight=None, label_smoothing=None,
              ignore_index=None, impls=(), numpy_impls=()) -> ProbeResult:
    """Evaluate every implementation of `loss_name` on the given input and target, exactly as
    bench evaluates a sweep point. `input`, `target` and `weight` are specs (inline list or
    file), `Loaded`, tensors or numpy arrays; `impls`/`numpy_impls` are 'module:function' specs."""
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
    for option, flag, value in (("weight", "--weight", weight), ("pos_weight", "--pos-weight", pos_weight),
                                ("label_smoothing", "--label-smoothing", label_smoothing),
                                ("ignored", "--ignore-index", ignore_index)):
        if value is not None:
            _check_option(loss, option, flag)
    if pos_weight is not None:
        pos_weight = _number(pos_weight, "--pos-weight", "a positive finite number",
                             lambda x: math.isfinite(x) and x > 0)
    if label_smoothing is not None:
        label_smoothing = _number(label_smoothing, "--label-smoothing", "a number in [0, 1]",
                                  lambda x: 0 <= x <= 1)
    if ignore_index is not None:
        ignore_index = _integer(ignore_index, "--ignore-index")
    if loss.sequence and ignore_index is None:
        ignore_index = IGNORE_INDEX
    customs = _custom_impls(impls, numpy_impls)

    src_in = _as_loaded(input, "--input")
    src_t = _as_loaded(target, "--target")
    if dtype is None:
        dtype = (src_in.format_name if src_in.origin != "inline" else None) or "float32"
    tdtype = FORMATS[dtype].torch_dtype
    shape = _layout(loss, src_in, src_t)
    soft = shape["soft"]
    if soft:
        _check_option(loss, "targets", "--target")
        if ignore_index is not None and not loss.sequence:
            raise ProbeError("--ignore-index", "applies to class-index targets, not to soft targets",
                             "a target of class indices (N,), or no --ignore-index")
    _check_memory(sweep.Case(0, loss_name, device, dtype, shape["batch"], shape["classes"], DISTRIBUTION, 1.0,
                             reduction, (("targets", "soft"),) if soft else (), shape["time"]))

    inp, in_conv = convert(src_in, tdtype, "input")
    in_source, in_shape = src_in.source, src_in.shape
    del src_in  # an .npz member or old-format .pt file is in memory: keep only the converted copy
    if not loss.multiclass:
        inp = inp.reshape(-1)
    stats = _input_stats(loss, inp)
    if loss.input_kind == "probabilities" and stats["outside"]:
        i, v = stats["outside_example"]
        raise ProbeError(in_source, f"{loss.name} takes probabilities in [0, 1]; {stats['outside']} values "
                         f"are outside (e.g. {_index(_unravel(i, in_shape))}: {_fmt(v, dtype)})",
                         "probabilities in [0, 1] (for logits use bce_with_logits)")

    conversions = [in_conv]
    tgt, target_info = _target(loss, src_t, tdtype, soft, shape, ignore_index, conversions)
    del src_t
    options: dict = {}
    if weight is not None:
        options["weight"] = _weight(loss, _as_loaded(weight, "--weight"), tdtype, in_shape, shape, conversions)
    if pos_weight is not None:
        pw = R.round_to(np.array([pos_weight]), tdtype)
        if float(pw[0]) != pos_weight:
            conversions.append(Conversion("pos_weight", "--pos-weight", "float64", dtype, (1,), 1, 0, 0,
                                          ((0,), pos_weight, float(pw[0]))))
        options["pos_weight"] = pw
    if label_smoothing:
        options["label_smoothing"] = label_smoothing
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    case = sweep.Case(0, loss_name, device, dtype, shape["batch"], shape["classes"], DISTRIBUTION, 1.0,
                      reduction, _case_options(options, soft, target_info), shape["time"])

    config = parse_config(_config_text(loss_name, dtype, device, reduction, shape), "<probe>")
    data = sweep.PointData(inp, tgt, options)
    try:
        ref = reference(loss, inp, tgt, options, reduction)
    except ReferenceUnavailable as e:
        raise ProbeError("--dtype", str(e), "float32, float16, bfloat16") from None
    except Exception as e:
        if memory.is_oom(e):
            raise ProbeError("--input", f"out of memory while computing the reference: {_one_line(e)}") from None
        raise
    all_impls = [loss.implementations[i] for i in BUILTIN_IMPLS if i in loss.implementations] + customs
    records = [sweep.evaluate(config, case, loss, impl, data, ref) for impl in all_impls]
    outputs = _elementwise(all_impls, records, data, device)
    results = [_result(impl, rec, outputs.get(impl.name), ref, dtype, shape)
               for impl, rec in zip(all_impls, records)]
    ref_info = _reference_info(ref, stats, shape, loss)
    notes = _notes(loss, shape, stats, conversions, ref, records, outputs, dtype, reduction, target_info, tgt, inp,
                   options)
    return ProbeResult(loss_name, dtype, device, reduction, in_conv, target_info,
                       _options_info(options, soft, dtype), ref_info, results, notes, records, case, ref, data,
                       _findings(records, bool(stats["inf_rows"].any())))


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
            raise ProbeError("--impl", f"two implementations are named {n!r}",
                             "functions of distinct names (rename one)")
    return out


def _layout(loss: Loss, x: Loaded, t: Loaded) -> dict:
    """Validate the shapes; batch, classes, time as a sweep Case has them, and soft targets."""
    xs, ts = x.shape, t.shape
    if not loss.multiclass:
        if ts != xs:
            raise ProbeError("--target", f"shape {_shape(ts)} does not match the input's {_shape(xs)}",
                             f"a target of the input's shape {_shape(xs)}")
        n = max(1, x.numel)
        return {"batch": n, "classes": None, "time": None, "soft": False, "shape": xs, "rows": n}
    if loss.sequence:
        if len(xs) != 3:
            raise ProbeError("--input", f"{loss.name} takes (B, T, V) logits, got shape {_shape(xs)}",
                             "a 3-D input (batch, time, vocab)")
        if ts != xs[:2]:
            hint = " (soft targets are supported by cross_entropy)" if ts == xs else ""
            raise ProbeError("--target", f"shape {_shape(ts)} does not match the input's {_shape(xs)}{hint}",
                             f"class indices of shape {_shape(xs[:2])}")
        return {"batch": xs[0], "classes": xs[2], "time": xs[1], "soft": False, "shape": xs,
                "rows": xs[0] * xs[1]}
    if len(xs) != 2:
        hint = "; for (B, T, V) logits use sequence_cross_entropy" if len(xs) == 3 else ""
        raise ProbeError("--input", f"{loss.name} takes (N, C) logits, got shape {_shape(xs)}{hint}",
                         "a 2-D input (rows, classes)")
    if ts == xs[:1]:
        soft = False
    elif ts == xs:
        if not t.floating:
            raise ProbeError("--target", f"a target of the input's shape {_shape(xs)} holds class probabilities "
                             f"(soft targets), but its dtype is {t.dtype_name}",
                             "floating probabilities, or class indices of shape " + _shape(xs[:1]))
        soft = True
    else:
        raise ProbeError("--target", f"shape {_shape(ts)} does not match the input's {_shape(xs)}",
                         f"class indices {_shape(xs[:1])} or class probabilities {_shape(xs)}")
    return {"batch": xs[0], "classes": xs[1], "time": None, "soft": soft, "shape": xs, "rows": xs[0]}


def _check_memory(case: sweep.Case) -> None:
    problem = sweep.memory_problem(case)
    if problem:
        raise ProbeError("--input", f"too large to probe here: {problem}",
                         "a smaller slice of the input, or more memory (LOSSCHECK_MEMORY_LIMIT caps the estimate)")


def _input_stats(loss: Loss, inp: torch.Tensor) -> dict:
    """NaN/±inf counts of the converted input, rows holding ±inf, and (bce) values outside [0, 1]."""
    rows = inp.reshape(-1, inp.shape[-1]) if loss.multiclass else inp.reshape(-1, 1)
    n = rows.shape[0]
    step = max(1, BLOCK // max(1, rows.shape[1]))
    stats = {"nan": 0, "posinf": 0, "neginf": 0, "outside": 0, "outside_example": None,
             "inf_rows": np.zeros(n, dtype=bool), "nan_rows": np.zeros(n, dtype=bool)}
    for start in range(0, n, step):
        block = rows[start:start + step]
        nan, pinf, ninf = block.isnan(), block == math.inf, block == -math.inf
        stats["nan"] += int(nan.sum())
        stats["posinf"] += int(pinf.sum())
        stats["neginf"] += int(ninf.sum())
        stats["inf_rows"][start:start + step] = (pinf | ninf).any(1).numpy()
        stats["nan_rows"][start:start + step] = nan.any(1).numpy()
        if loss.input_kind == "probabilities":
            outside = (block < 0) | (block > 1)
            k = int(outside.sum())
            if k and stats["outside_example"] is None:
                i = int(outside.reshape(-1).nonzero()[0, 0])
                stats["outside_example"] = (start + i, float(block.reshape(-1)[i]))
            stats["outside"] += k
    return stats


def _target(loss: Loss, t: Loaded, dtype: torch.dtype, soft: bool, shape: dict, ignore_index: int | None,
            conversions: list) -> tuple[torch.Tensor, dict]:
    info = {"source": t.source, "shape": list(t.shape), "from_dtype": t.dtype_name, "kind": "hard"}
    if soft:
        tgt = _nonnegative(t, dtype, "soft target", conversions, "soft targets must be finite probabilities >= 0",
                           "class probabilities (rows of values in [0, 1])")
        info.update(kind="soft", dtype=fmt(dtype).name)
        return tgt, info
    if not loss.multiclass:
        labels = t.data.reshape(-1)
        bad = _first_where(labels, lambda b: (b != 0) & (b != 1))
        if bad is not None:
            i, v = bad
            raise ProbeError(t.source, f"{loss.name} takes hard 0/1 targets; found {_num(v)} at "
                             f"{_index(_unravel(i, t.shape))}", "0 and 1 (soft binary targets are not supported)")
        tgt, _ = convert(t, dtype, "target")
        info.update(dtype=fmt(dtype).name, positives=int(_count(tgt.reshape(-1), lambda b: b == 1)))
        return tgt.reshape(-1), info
    # Class indices, int64.
    data = t.data
    if t.floating:
        values = data.to(torch.float64) if isinstance(data, torch.Tensor) else torch.from_numpy(
            np.asarray(data, dtype=np.float64))
        bad = _first_where(values, lambda b: ~b.isfinite() | (b != b.round()) | (b.abs() > 2.0**62))
        if bad is not None:
            i, v = bad
            raise ProbeError(t.source, f"class indices must be integers; found {v!r} at "
                             f"{_index(_unravel(i, t.shape))}", f"integers in [0, {shape['classes']})")
        tgt = values.to(torch.int64)
    elif isinstance(data, torch.Tensor):
        tgt = data.to(torch.int64)
    else:
        tgt = torch.from_numpy(np.asarray(data, dtype=np.int64))
    c = shape["classes"]
    ignored = tgt == ignore_index if ignore_index is not None else torch.zeros_like(tgt, dtype=torch.bool)
    out = ((tgt < 0) | (tgt >= c)) & ~ignored
    if out.any():
        i = int(out.reshape(-1).nonzero()[0, 0])
        v = int(tgt.reshape(-1)[i])
        hint = (f"; pass --ignore-index {v} if it marks ignored positions" if v < 0 and ignore_index is None
                and "ignored" in loss.options else "")
        allowed = f"class indices in [0, {c})" + (f" or the ignore index {ignore_index}"
                                                  if ignore_index is not None else "")
        raise ProbeError(t.source, f"target {v} at {_index(_unravel(i, t.shape))} is out of range [0, {c}){hint}",
                         allowed)
    info.update(dtype="int64", ignored=int(ignored.sum()), kept=int((~ignored).sum()))
    if ignore_index is not None:
        info["ignore_index"] = ignore_index
    return tgt, info


def _weight(loss: Loss, w: Loaded, dtype: torch.dtype, input_shape: tuple, shape: dict, conversions: list):
    if loss.multiclass:
        want = (shape["classes"],)
        if w.shape != want:
            raise ProbeError("--weight", f"shape {_shape(w.shape)}: {loss.name} takes one weight per class",
                             f"a weight of shape {_shape(want)}")
    elif w.shape != input_shape and w.shape != (shape["rows"],):
        raise ProbeError("--weight", f"shape {_shape(w.shape)}: {loss.name} takes one weight per element",
                         f"a weight of the input's shape {_shape(input_shape)}")
    tensor = _nonnegative(w, dtype, "weight", conversions, f"weights must be finite and >= 0 in {fmt(dtype).name}",
                          "finite non-negative weights")
    return tensor.reshape(-1) if not loss.multiclass else tensor


def _nonnegative(x: Loaded, dtype: torch.dtype, what: str, conversions: list, rule: str, allowed: str) -> torch.Tensor:
    """`x` converted to `dtype` (the conversion noted), refused unless every value is finite and >= 0."""
    tensor, conv = convert(x, dtype, what)
    conversions.append(conv)
    bad = _first_where(tensor, lambda b: ~b.isfinite() | (b < 0))
    if bad is not None:
        i, v = bad
        raise ProbeError(x.source, f"{rule}; found {v!r} at {_index(_unravel(i, x.shape))}", allowed)
    return tensor


def _first_where(t, predicate) -> tuple[int, float] | None:
    """The first flat index (and value) where `predicate(block)` holds, scanning in blocks."""
    flat = t.reshape(-1)
    for start in range(0, flat.shape[0], BLOCK):
        block = flat[start:start + BLOCK]
        block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block, dtype=np.float64))
        hit = predicate(block)
        if bool(hit.any()):
            i = int(hit.nonzero()[0, 0])
            return start + i, float(block[i])
    return None


def _count(t: torch.Tensor, predicate) -> int:
    return sum(int(predicate(t[s:s + BLOCK]).sum()) for s in range(0, t.shape[0], BLOCK))


def _case_options(options: dict, soft: bool, target_info: dict) -> tuple:
    out = {}
    if "weight" in options:
        out["weight"] = "given"
    if "pos_weight" in options:
        out["pos_weight"] = float(options["pos_weight"][0])
    if "label_smoothing" in options:
        out["label_smoothing"] = options["label_smoothing"]
    if target_info.get("ignored"):
        total = target_info["ignored"] + target_info["kept"]
        out["ignored"] = target_info["ignored"] / total
    if soft:
        out["targets"] = "soft"
    return tuple(sorted(out.items()))


def _config_text(loss_name: str, dtype: str, device: str, reduction: str, shape: dict) -> str:
    lines = ["name: probe", f"losses: [{loss_name}]", f"implementations: [{', '.join(BUILTIN_IMPLS)}]",
             "scales: [1]", f"batch_sizes: [{shape['batch']}]", f"dtypes: [{dtype}]",
             f"devices: ['{device}']", f"distributions: [{DISTRIBUTION}]", f"reductions: [{reduction}]",
             "timing: false"]
    if shape["classes"] is not None and shape["classes"] >= 2:
        lines.append(f"classes: [{shape['classes']}]")
    if shape["time"] is not None:
        lines.append(f"sequence_lengths: [{shape['time']}]")
    return "\n".join(lines) + "\n"


def _elementwise(impls: list[Impl], records: list[dict], data: sweep.PointData, device: str) -> dict:
    """Each implementation's "none" output on the CPU (per row: small), for the worst element."""
    out = {}
    x, t, opts = data.on(device)
    for impl, rec in zip(impls, records):
        if rec["status"] != "ok":
            continue
        try:
            with torch.no_grad():
                y = impl.fn(x, t, "none", **opts)
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
    return {"index": list(index), "value": float(y.reshape(-1)[i]), "reference": float(ref.loss.reshape(-1)[i]),
            "ulp": int_or_inf(ulp), "bits": _bits(ulp, dtype)}


def _result(impl: Impl, rec: dict, y: torch.Tensor | None, ref: Reference, dtype: str, shape: dict) -> dict:
    out = {"impl": impl.name, "kind": impl.kind, "status": rec["status"], "message": rec["message"],
           "forward": None, "backward": None, "returned": None}
    if rec["forward"] is not None:
        fwd = dict(rec["forward"])
        fwd["reduced_bits"] = None if fwd["reduced_ulp"] is None else _bits(float(fwd["reduced_ulp"]), dtype)
        fwd["worst"] = None if y is None else _worst(y, ref, dtype, shape)
        out["forward"] = fwd
    if rec["backward"] is not None:
        out["backward"] = dict(rec["backward"])
    if y is not None:
        yf = y.reshape(-1)
        out["returned"] = {"nan": int(yf.isnan().sum()), "posinf": int((yf == math.inf).sum()),
                           "neginf": int((yf == -math.inf).sum())}
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
            why.append(f"{_plural(int(no_limit.sum()), 'row')} without a limit (several +inf logits with the "
                       "target among them, or every logit -inf)")
        if stats["nan"]:
            why.append(f"{_plural(stats['nan'], 'NaN input')}")
        undefined = f"the {ref.reduction} is NaN: " + (" and ".join(why) or "a NaN element") + " (see the notes)"
    limits = np.flatnonzero(stats["inf_rows"] & ~stats["nan_rows"])
    return {"forward": None if ref.reduced is None else float(ref.reduced),
            "value": ref.value, "reduction": ref.reduction, "undefined": undefined,
            "nan": int(nan.sum()), "posinf": int((flat == math.inf).sum()),
            "neginf": int((flat == -math.inf).sum()),
            "limits": {"count": int(len(limits)),
                       "examples": [{"index": list(_unravel(int(i), rows_shape)), "reference": float(flat[int(i)])}
                                    for i in limits[:5]]},
            "no_limit": int(no_limit.sum())}


def _options_info(options: dict, soft: bool, dtype: str) -> dict:
    out: dict = {"targets": "soft" if soft else "hard"}
    if "weight" in options:
        w = options["weight"]
        out["weight"] = {"shape": list(w.shape), "dtype": dtype}
    if "pos_weight" in options:
        out["pos_weight"] = float(options["pos_weight"][0])
    if "label_smoothing" in options:
        out["label_smoothing"] = options["label_smoothing"]
    if "ignore_index" in options:
        out["ignore_index"] = options["ignore_index"]
    return out


# ---- explanations ---------------------------------------------------------------------------

def _notes(loss: Loss, shape: dict, stats: dict, conversions: list, ref: Reference, records: list[dict],
           outputs: dict, dtype: str, reduction: str, target_info: dict, tgt: torch.Tensor, inp: torch.Tensor,
           options: dict) -> list[str]:
    notes: list[str] = []
    if not loss.multiclass and len(shape["shape"]) != 1:
        notes.append(f"the input of shape {_shape(shape['shape'])} is flattened to ({shape['rows']},): "
                     f"{loss.name} is elementwise, so the mean and sum are unchanged; indices are in the input's shape")
    for conv in conversions:
        s = conv.sentence()
        if s:
            notes.append(s)
    if target_info.get("ignored"):
        notes.append(f"ignore_index {target_info['ignore_index']}: {target_info['ignored']} of "
                     f"{target_info['ignored'] + target_info['kept']} targets ignored"
                     + (f"; the mean is over the other {target_info['kept']}" if target_info["kept"] else ""))
    rows_shape = tuple(ref.loss.shape) if loss.multiclass else shape["shape"]
    ref_flat = ref.loss.reshape(-1)
    ref_nan = ref_flat.isnan().numpy()

    # A NaN input: upstream of the loss.
    if stats["nan"]:
        k = int(stats["nan_rows"].sum())
        first = int(np.argmax(stats["nan_rows"]))
        where = "rows" if loss.multiclass else "elements"
        notes.append(f"the input holds {_plural(stats['nan'], 'NaN value')} (in {_plural(k, where[:-1])}, e.g. "
                     f"{_index(_unravel(first, rows_shape))}): "
                     "the loss is undefined there (NaN in, NaN out) — the NaN comes from upstream of the loss")

    # ±inf inputs: the reference is the limit.
    limit_rows = stats["inf_rows"] & ~stats["nan_rows"]
    if limit_rows.any():
        idx = np.flatnonzero(limit_rows)
        has_limit = idx[~ref_nan[idx]]
        first = int(idx[0])
        example = _describe_row(loss, inp, tgt, first, rows_shape, dtype)
        lim = ref_flat[first]
        what = ("the limit does not exist (NaN)" if math.isnan(float(lim))
                else f"limit {_signed(_fmt(float(lim), dtype))}")
        noun = ("row" if loss.multiclass else "element") + ("s" if len(idx) > 1 else "")
        s = (f"{len(idx)} {noun} with ±inf logits: the true loss there is a limit, not a number "
             f"(e.g. {example}: {what})")
        if len(has_limit):
            there = "There" if len(idx) == 1 else (f"At the {len(has_limit)} with a limit"
                                                   if len(has_limit) < len(idx) else f"At these {len(idx)}")
            s += f". {there}: " + _what_each_did(records, outputs, ref_flat, has_limit, rows_shape, dtype)
        notes.append(s)

    # Undefined elements (NaN reference without a NaN input): several +inf logits, or all −inf.
    undefined_rows = ref_nan & ~stats["nan_rows"]
    if undefined_rows.any():
        idx = np.flatnonzero(undefined_rows)
        first = int(idx[0])
        example = _describe_row(loss, inp, tgt, first, rows_shape, dtype)
        notes.append(f"{len(idx)} {'rows have' if len(idx) > 1 else 'row has'} no limit (reference NaN: several "
                     f"+inf logits with the target among them, or every logit -inf; e.g. {example})"
                     + ("" if reduction == "none" else f", so the {reduction} is undefined (NaN) too"))

    # 0/0: every target ignored.
    if ref.undefined:
        notes.append(f"{ref.undefined[0].upper()}{ref.undefined[1:]}. " + _reduced_did(records, dtype))

    # An infinite reference (a probability of exactly 0 or 1 against its target, a −inf target
    # logit, or a loss beyond the dtype's range).
    # (Rows with ±inf logits are explained above.)
    inf_mask = ref_flat.isinf().numpy() & ~stats["inf_rows"]
    inf_ref = int(inf_mask.sum())
    if inf_ref:
        idx = np.flatnonzero(inf_mask)
        first = int(idx[0])
        notes.append(f"the reference is +inf at {inf_ref} element{'s' if inf_ref > 1 else ''} "
                     f"(e.g. {_describe_row(loss, inp, tgt, first, rows_shape, dtype)}): the true loss there is "
                     f"infinite or beyond {dtype}'s range, so +inf is exact and a finite value is silent "
                     "saturation. " + _what_each_did(records, outputs, ref_flat, idx, rows_shape, dtype,
                                                     "the reference"))
    if ref.value is not None and math.isfinite(ref.value) and ref.reduced is not None \
            and not math.isfinite(float(ref.reduced)):
        notes.append(f"the {reduction} {ref.value:.6g} is beyond {dtype}'s range: correctly rounded it is "
                     f"{_fmt(float(ref.reduced), dtype)}")
    for rec in records:
        if rec["status"] == "error":
            notes.append(f"{rec['impl']} failed: {rec['message']}")
        elif rec["message"]:
            notes.append(f"{rec['impl']}: {rec['message']}")
    return notes


def _describe_row(loss: Loss, inp: torch.Tensor, tgt: torch.Tensor, i: int, rows_shape, dtype: str) -> str:
    where = _index(_unravel(i, rows_shape))
    if not loss.multiclass:
        kind = "p" if loss.input_kind == "probabilities" else "input"
        return (f"{where}: {kind} {_signed(_fmt(float(inp.reshape(-1)[i]), dtype))}, "
                f"target {_num(float(tgt.reshape(-1)[i]))}")
    row = inp.reshape(-1, inp.shape[-1])[i]
    pos = int((row == math.inf).sum())
    neg = int((row == -math.inf).sum())
    parts = []
    if pos:
        parts.append(f"{pos} logit{'s' if pos > 1 else ''} +inf")
    if neg:
        parts.append(f"{neg} logit{'s' if neg > 1 else ''} -inf")
    if tgt.is_floating_point():
        return f"row {where}: {', '.join(parts) or 'finite logits'}, soft target"
    t = int(tgt.reshape(-1)[i])
    return (f"row {where}: {', '.join(parts) or 'finite logits'}, target {t} "
            f"(logit {_signed(_fmt(float(row[t]), dtype)) if 0 <= t < row.shape[0] else 'ignored'})")


def _what_each_did(records, outputs, ref_flat, idx, rows_shape, dtype, word: str = "the limit") -> str:
    """What each implementation returned at the elements `idx` (where the reference is a finite limit)."""
    parts = []
    refs = ref_flat[torch.from_numpy(idx)]
    total = len(idx)
    for rec in records:
        name = rec["impl"]
        y = outputs.get(name)
        if y is None:
            parts.append(f"{name} {'failed' if rec['status'] == 'error' else rec['status']}")
            continue
        vals = y.reshape(-1)[torch.from_numpy(idx)]
        d = ulp_distance(vals, refs)
        exact = d == 0
        if total == 1:
            parts.append(f"{name} returned {_fmt(float(vals[0]), dtype)}" + (f" ({word})" if bool(exact[0]) else ""))
            continue
        if bool(exact.all()):
            parts.append(f"{name} returned {word} at all {total}")
            continue
        nan, inf = vals.isnan(), vals.isinf() & ~exact
        finite_off = ~exact & ~nan & ~inf
        bits = []
        if nan.any():
            j = int(torch.nonzero(nan)[0, 0])
            bits.append(f"nan at {int(nan.sum())} (e.g. {_index(_unravel(int(idx[j]), rows_shape))}, "
                        f"{word.split()[-1]} {_signed(_fmt(float(refs[j]), dtype))})")
        if inf.any():
            bits.append(f"a wrong infinity at {int(inf.sum())}")
        if finite_off.any():
            bits.append(f"a finite value off by up to {int_or_inf(float(d[finite_off].max()))} ULP "
                        f"at {int(finite_off.sum())}")
        if exact.any():
            bits.append(f"{word} at {int(exact.sum())}")
        parts.append(f"{name} returned " + ", ".join(bits))
    return "; ".join(parts)


def _reduced_did(records, dtype) -> str:
    parts = []
    for rec in records:
        f, b = rec["forward"], rec["backward"]
        if f is None:
            parts.append(f"{rec['impl']} failed")
            continue
        s = f"{rec['impl']} returned {_fmt(f['value'], dtype)}"
        if b is not None:
            if b["nan"] or b["inf"]:
                s += f" with a non-finite gradient ({b['nan']} nan, {b['inf']} inf)"
            elif b["max_ulp"] == 0:
                s += " with gradient 0"
            else:
                s += f" with a gradient {b['max_bits']:g} bits off"
        parts.append(s)
    return ", ".join(parts)


# ---- output ----------------------------------------------------------------------------------

def _fmt(v, dtype: str) -> str:
    """A value of `dtype` for people: half-precision values exactly (they are short: 21.875,
    0.0999755859375), float32 and float64 with the fewest digits that read back to the same value."""
    if v is None:
        return "—"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if dtype == "float32":
        return repr(float(str(np.float32(v))))  # '0.6566308', not '0.65663081407547'
    return repr(v)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _signed(s: str) -> str:
    return "+inf" if s == "inf" else s


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _bits(ulp: float, dtype: str) -> float:
    """bits = min(log2(1 + ulp), p) (METRICS.md): a NaN or an infinity against a finite
    reference leaves no correct bit, p, never more."""
    return capped_bits(ulp, dtype)


def _unravel(i: int, shape) -> tuple[int, ...]:
    shape = tuple(shape) or (1,)
    return tuple(int(j) for j in np.unravel_index(i, shape))


def _index(idx) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]"


def _shape(s) -> str:
    return "(" + ", ".join(str(i) for i in s) + ("," if len(s) == 1 else "") + ")"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:199] + "…"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _nf(n) -> str:
    return "—" if n is None else str(n)


def _ulp_cell(u) -> str:
    if u is None:
        return "—"
    return "inf" if isinstance(u, float) and math.isinf(u) else str(u)


def _bits_cell(b, dtype: str) -> str:
    if b is None:
        return "—"
    p = FORMATS[dtype].significand_bits
    return "all bits lost" if (math.isinf(b) or b >= p) else f"{b:.1f}"


def table_rows(result: ProbeResult) -> list[list[str]]:
    rows = []
    ref_cell = _fmt(result.reference["forward"], result.dtype) if result.reduction != "none" else "—"
    if result.reference["undefined"]:
        ref_cell += " (undefined)"
    for r in result.results:
        name = r["impl"] if r["kind"] != "custom" else f"{r['impl']} (custom)"
        if r["forward"] is None:
            rows.append([name, r["status"], ref_cell] + ["—"] * 7)
            continue
        f, b = r["forward"], r["backward"]
        w = f.get("worst")
        if w is None:
            worst = "—"
        elif w["ulp"] == 0:
            worst = "all exact"
        else:
            worst = (f"{_index(w['index'])}: {_fmt(w['value'], result.dtype)} vs {_fmt(w['reference'], result.dtype)}"
                     f" ({_ulp_cell(w['ulp'])} ULP)")
        rows.append([
            name,
            _fmt(f["value"], result.dtype) if result.reduction != "none" else "—",
            ref_cell,
            _ulp_cell(f["reduced_ulp"]),
            _bits_cell(f["reduced_bits"], result.dtype),
            _bits_cell(f["max_bits"], result.dtype),
            f"{f['nan']}/{f['inf']}",
            "—" if b is None else _bits_cell(b["max_bits"], result.dtype),
            "—" if b is None else f"{b['nan']}/{b['inf']}",
            worst,
        ])
    return rows


HEADERS = ["impl", "loss", "reference", "ULP", "bits", "fwd max bits", "fwd nan/inf", "grad max bits",
           "grad nan/inf", "worst element (value vs reference)"]


def _where_from(source: str) -> str:
    return "inline" if source.startswith("--") else source


def render_table(result: ProbeResult) -> str:
    """The terminal output: what was probed, one table, then the notes."""
    inp = result.input
    conv = "unchanged" if not inp.changed else f"{_plural(inp.changed, 'value')} changed"
    head = [f"{result.loss}, {result.dtype} on {result.device}, reduction {result.reduction}",
            f"input:  {_where_from(inp.source)} {_shape(inp.shape)} {inp.from_dtype} -> {result.dtype} ({conv})",
            f"target: {_where_from(result.target['source'])} {_shape(result.target['shape'])} "
            f"{result.target['from_dtype']}"
            + (" (soft targets)" if result.target["kind"] == "soft" else "")]
    opts = {k: v for k, v in result.options.items() if k != "targets"}
    if opts:
        head.append("options: " + ", ".join(f"{k} {v if k != 'weight' else _shape(v['shape'])}"
                                            for k, v in opts.items()))
    ref = result.reference
    if result.reduction == "none":
        head.append("reference: per element (reduction none)")
    else:
        value = ("nan: undefined (see below)" if ref["forward"] is not None and math.isnan(ref["forward"]) else
                 f"undefined, 0/0 (the sensible answer: {_fmt(ref['forward'], result.dtype)}; see below)"
                 ) if ref["undefined"] else (
            f"{_fmt(ref['forward'], result.dtype)} (before rounding: {ref['value']!r})"
            if ref["value"] is not None and math.isfinite(ref["value"]) else _fmt(ref["forward"], result.dtype))
        head.append(f"reference {result.reduction}: {value}")
    table = tabulate(table_rows(result), headers=HEADERS, tablefmt="simple", disable_numparse=True)
    out = "\n".join(head) + "\n\n" + table + "\n"
    out += "\nfindings:" + ("".join(f"\n- {f['kind']}: {f['message']}" for f in result.findings)
                             if result.findings else " none (every implementation within tolerance here)") + "\n"
    if result.notes:
        out += "\n" + "\n".join(f"- {n}" for n in result.notes) + "\n"
    out += ("\nULP/bits: the reduced loss against the correctly rounded reference; fwd/grad max bits: the worst "
            "element of the 'none' loss / of the gradient of the reduced loss; nan/inf counted where the "
            "reference is finite (METRICS.md).\n")
    return out


def to_dict(result: ProbeResult) -> dict:
    return {
        "loss": result.loss, "dtype": result.dtype, "device": result.device, "reduction": result.reduction,
        "input": result.input.as_dict(), "target": result.target, "options": result.options,
        "reference": result.reference, "results": result.results, "notes": result.notes,
        "findings": result.findings,
    }


def to_json(result: ProbeResult) -> str:
    """Strict JSON: non-finite numbers as the strings "inf", "-inf", "nan" (as in results files)."""
    return json.dumps(_encode(to_dict(result)), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# ---- the command ---------------------------------------------------------------------------

@click.command("probe")
@click.argument("loss_name", metavar="LOSS")
@click.option("--input", "input_spec", required=True, metavar="LIST|FILE",
              help="The input (logits; probabilities for bce): an inline list such as '[inf, 1.0]' (nested for "
                   "2-D/3-D; inf, -inf, nan accepted) or a .pt/.pth, .npy, .npz file (FILE:KEY for one entry).")
@click.option("--target", "target_spec", required=True, metavar="LIST|FILE",
              help="The target, inline or from a file: 0/1 labels (binary losses, the input's shape), class "
                   "indices (N,) or (B, T), or class probabilities of the input's shape (cross_entropy soft targets).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Evaluate in float64, float32, float16 or bfloat16 (default: the input file's dtype if "
                   "floating, else float32). The input is rounded once to it.")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE", help="cpu, cuda, cuda:N or mps.")
@click.option("--weight", default=None, metavar="LIST|FILE",
              help="Weights: per element for binary losses, per class for cross entropy.")
@click.option("--pos-weight", default=None, metavar="NUMBER", help="Weight of the positive term (binary losses).")
@click.option("--label-smoothing", default=None, metavar="NUMBER", help="Label smoothing in [0, 1] (cross entropy).")
@click.option("--ignore-index", default=None, metavar="INT",
              help="Target value to ignore (cross_entropy; sequence_cross_entropy: padding, default -100).")
@click.option("--reduction", default="mean", show_default=True, metavar="none|mean|sum", help="The reduction.")
@click.option("--impl", "impls", multiple=True, metavar="MODULE:FUNCTION",
              help="Your own torch implementation, fn(input, target, reduction, **options) "
                   "('pkg.mod:fn' or 'file.py:fn'); repeatable.")
@click.option("--numpy-impl", "numpy_impls", multiple=True, metavar="MODULE:FUNCTION",
              help="Your own numpy implementation (returns loss or (loss, grad)); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the table.")
def probe_command(loss_name, input_spec, target_spec, dtype, device, weight, pos_weight, label_smoothing,
                  ignore_index, reduction, impls, numpy_impls, as_json) -> None:
    """Audit LOSS on the exact inputs that broke your training.

    Evaluates every implementation (naive, stable, torch and yours) on the input and target
    given, against losscheck's reference, with bench's measurements: the reduced loss's
    error in ULPs and bits, NaN/inf in the forward and the gradient, the worst element; names
    the cause of each failure as bench's findings do (overflow, saturation, underflow,
    reduction, limit, undefined); and says where the true value is a limit (±inf logits) or
    undefined (0/0).

    \b
    losscheck probe bce_with_logits --input '[inf, 1.0]' --target '[1, 0]' --dtype float32
    losscheck probe cross_entropy --input logits.pt --target labels.pt --dtype bfloat16 --ignore-index -100
    losscheck probe bce --input probs.npy --target y.npy --reduction sum --json
    """
    result = run_probe(loss_name, input_spec, target_spec, dtype=dtype, device=device, reduction=reduction,
                       weight=weight, pos_weight=pos_weight, label_smoothing=label_smoothing,
                       ignore_index=ignore_index, impls=impls, numpy_impls=numpy_impls)
    click.echo(to_json(result) if as_json else render_table(result), nl=False)
