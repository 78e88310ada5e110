"""The floating-point formats losscheck audits, and their properties.

One table so that every module agrees on names, significand widths and on the
integer type used to read a value's bits (for ULP distances).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("float64", torch.float64, 53, 64, torch.int64),
        FloatFormat("float32", torch.float32, 24, 32, torch.int32),
        FloatFormat("float16", torch.float16, 11, 16, torch.int16),
        FloatFormat("bfloat16", torch.bfloat16, 8, 16, torch.int16),
    )
}

_BY_TORCH = {f.torch_dtype: f for f in FORMATS.values()}


def fmt(dtype: torch.dtype | str) -> FloatFormat:
    """The format of a torch dtype or a dtype name."""
    if isinstance(dtype, str):
        return FORMATS[dtype]
    return _BY_TORCH[dtype]
