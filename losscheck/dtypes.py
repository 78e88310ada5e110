"""The floating-point formats losscheck audits, with their torch dtypes.

One table so that every module agrees on names, significand widths and on the
integer type used to read a value's bits (for ULP distances). The torch-free facts
(name, widths) live in `formats.py`; this adds the torch dtype lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import formats


@dataclass(frozen=True)
class FloatFormat:
    name: str
    torch_dtype: torch.dtype
    # Significand width including the implicit bit, as METRICS.md counts it:
    # `bits` equal to this means no correct bit is left.
    significand_bits: int
    total_bits: int
    int_dtype: torch.dtype

    @property
    def default_threshold_bits(self) -> float:
        # METRICS.md: a point breaks when half the significand bits are lost.
        return self.significand_bits / 2

    @property
    def max_finite(self) -> float:
        return float(torch.finfo(self.torch_dtype).max)


_TORCH = {
    "float64": (torch.float64, torch.int64),
    "float32": (torch.float32, torch.int32),
    "float16": (torch.float16, torch.int16),
    "bfloat16": (torch.bfloat16, torch.int16),
}

# Same names, order and widths as formats.FORMATS, with the torch dtypes added.
FORMATS: dict[str, FloatFormat] = {
    f.name: FloatFormat(f.name, _TORCH[f.name][0], f.significand_bits, f.total_bits, _TORCH[f.name][1])
    for f in formats.FORMATS.values()
}

_BY_TORCH = {f.torch_dtype: f for f in FORMATS.values()}


def fmt(dtype: torch.dtype | str) -> FloatFormat:
    """The format of a torch dtype or a dtype name."""
    if isinstance(dtype, str):
        return FORMATS[dtype]
    return _BY_TORCH[dtype]
