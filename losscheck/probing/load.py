"""Reading a probe's arrays: inline lists and .pt/.pth/.npy/.npz files, never converted here.

Everything a user can get wrong is a `ProbeError` (a `ConfigError`: one line, exit code 2)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import safeio
from ..dtypes import FORMATS
from ..errors import ConfigError
from .text import _one_line

# Values converted (and scanned) at once: bounded temporaries (a float64 block is 8 MiB).
BLOCK = 1 << 20
FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
KEYED_SUFFIXES = (".pt", ".pth", ".npz")
INLINE_HELP = (
    "a JSON-style list ('[inf, 1.0]', nested for 2-D/3-D; inf, -inf, nan accepted), "
    "or a .pt/.pth, .npy or .npz file (FILE.pt:KEY, FILE.npz:KEY for one entry)"
)
# Loss option (`Loss.options`) -> the flag that sets it.


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
        if isinstance(self.data, torch.Tensor):
            return str(self.data.dtype).replace("torch.", "")
        return np.dtype(self.data.dtype).name

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

    # Depth is checked on the text first: json's recursive decoder overflows the stack on a
    # few thousand '[' (a RecursionError traceback), before any shape is read.
    depth = _bracket_depth(text)
    if depth > 8:
        raise ProbeError(source, f"lists nested {depth} deep", "at most 3 dimensions")
    try:
        data = json.loads(_WORD.sub(word, text))
    except json.JSONDecodeError as e:
        raise ProbeError(
            source, f"cannot read {_short(text)!r} as a list of numbers: {e.msg} at column {e.colno}", INLINE_HELP
        ) from None
    shape = _nested_shape(data, source)
    if 0 in shape:
        raise ProbeError(source, "empty list", "at least one value")
    leaves = _leaves(data)
    if all(isinstance(v, int) for v in leaves):
        if any(not -(2**63) <= v < 2**63 for v in leaves):
            raise ProbeError(source, "an integer beyond the int64 range", "integers of int64")
        return np.array(data, dtype=np.int64)
    try:
        return np.array(data, dtype=np.float64)
    except OverflowError:  # an integer too large for float64
        raise ProbeError(source, "a number beyond float64's range", "finite numbers, inf, -inf, nan") from None


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "]":
            depth -= 1
    return deepest


def _nested_shape(obj, source: str, depth: int = 0) -> tuple[int, ...]:
    if isinstance(obj, list):
        if not obj:
            return (0,)
        shapes = {_nested_shape(o, source, depth + 1) for o in obj}
        if len(shapes) != 1:
            raise ProbeError(
                source,
                f"ragged nested list (rows of different shapes at depth {depth + 1})",
                "a rectangular list of lists",
            )
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
    return text if len(text) <= n else text[: n - 1] + "…"


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
    try:
        safeio.check_regular(path, "probe file")  # a FIFO would block, /dev/zero never end
    except (FileNotFoundError, NotADirectoryError):
        raise ProbeError(str(path), "file not found", f"an existing file for {what}") from None
    except safeio.UnsafeInput as e:
        raise ProbeError(str(path), str(e)) from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission
        raise ProbeError(str(path), f"cannot read: {e.__class__.__name__}") from None
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
                        raise ProbeError(
                            str(path), f"holds {len(names)} arrays ({', '.join(names[:8])}): name one", f"{path}:KEY"
                        )
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
        raise ProbeError(
            str(path),
            f"cannot read with torch.load(weights_only=True): {_one_line(e)}",
            "a file saved with torch.save(tensor) or torch.save({'name': tensor})",
        ) from None
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
            raise ProbeError(
                str(path), f"holds {len(tensors)} tensors ({', '.join(map(str, tensors[:8]))}): name one", f"{path}:KEY"
            )
        return obj[tensors[0]]
    raise ProbeError(
        str(path), f"holds a {type(obj).__name__}, not a tensor", "a tensor, or a dict of tensors with FILE.pt:KEY"
    )


def _checked_tensor(t: torch.Tensor, source: str) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized:
        raise ProbeError(source, f"a {t.layout} tensor is not supported", "a dense tensor")
    if t.is_complex() or (t.is_floating_point() and t.dtype not in (f.torch_dtype for f in FORMATS.values())):
        raise ProbeError(
            source, f"unsupported dtype {str(t.dtype).replace('torch.', '')}", ", ".join(FORMATS) + ", integers"
        )
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
