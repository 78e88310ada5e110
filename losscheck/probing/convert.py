"""Converting a loaded array once to the dtype under test, saying what the rounding changed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import reference as R
from ..dtypes import fmt
from .load import BLOCK, Loaded
from .text import _index, _plural, _where_from


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
        return {
            "source": self.source,
            "shape": list(self.shape),
            "from_dtype": self.from_dtype,
            "dtype": self.to_dtype,
            "changed": self.changed,
            "overflowed": self.overflowed,
            "flushed_to_zero": self.flushed,
            "example": None
            if self.example is None
            else {"index": list(self.example[0]), "before": self.example[1], "after": self.example[2]},
        }

    def sentence(self) -> str | None:
        if not self.changed:
            return None
        n = int(np.prod(self.shape, dtype=np.int64))
        s = (
            f"converting the {self.what} ({self.from_dtype}, {_where_from(self.source)}) to {self.to_dtype} "
            f"changed {self.changed} of {n} value{'s' if n > 1 else ''}"
        )
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
    if (
        isinstance(data, np.ndarray)
        and same is not None
        and data.dtype == same
        and data.dtype.isnative
        and data.flags.c_contiguous
        and data.flags.writeable
    ):
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
        else:
            before = block.to(torch.float64)
        # float64 (and integer) sources are rounded from float64 by round_to: torch's own
        # float64 -> half conversion goes through float32 and can round twice.
        if wide_source:
            after = R.round_to(before.numpy(), dtype)
        elif isinstance(block, np.ndarray):
            after = torch.from_numpy(np.array(block, dtype=block.dtype.newbyteorder("="))).to(dtype)
        else:
            after = block.to(dtype)
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
