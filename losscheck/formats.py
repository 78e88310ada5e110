"""The floating-point formats losscheck audits: the facts that need no torch.

Names, significand widths and total widths, in the order every table lists them, and the
ULP distance matching a number of bits lost. `dtypes.py` adds the torch dtypes; modules
that only read results (report, findings, gate, config validation) use this one so that
they do not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    # Significand width including the implicit bit, as METRICS.md counts it:
    # `bits` equal to this means no correct bit is left.
    significand_bits: int
    total_bits: int

    @property
    def default_threshold_bits(self) -> float:
        # METRICS.md: a point breaks when half the significand bits are lost.
        return self.significand_bits / 2


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("float64", 53, 64),
        Format("float32", 24, 32),
        Format("float16", 11, 16),
        Format("bfloat16", 8, 16),
    )
}


def ulp_threshold(threshold_bits: float) -> float:
    """The ULP distance matching `threshold_bits` lost: bits > t  <=>  ulp > 2**t - 1."""
    return 2.0**threshold_bits - 1


def precision(dtype: str | None) -> int | None:
    """The significand precision p of a dtype name (53, 24, 11, 8); None for an unknown name."""
    f = FORMATS.get(dtype) if dtype is not None else None
    return f.significand_bits if f else None


def bits_phrase(bits: float, dtype: str, digits: int = 0) -> str:
    """Bits of error as reports say them, never more than the format's precision p
    (METRICS.md: bits = min(log2(1 + ulp), p)): "all bits lost" at p, else "12 bits off"."""
    p = precision(dtype)
    if p is not None and bits >= p:
        return "all bits lost"
    return f"{bits:.{digits}f} bits off"


def capped_bits(ulp, dtype: str | None) -> float | None:
    """min(log2(1 + ulp), p) of a ULP distance in a dtype named by `dtype` (METRICS.md
    "Accuracy"), unrounded; a non-finite distance is p. None where there is no distance, or
    no p to cap an infinite one at."""
    if ulp is None:
        return None
    p = precision(dtype)
    try:
        ulp = float(ulp)
    except OverflowError:  # an integer beyond float range (a hand-edited file): infinitely far
        ulp = math.inf
    if not math.isfinite(ulp):
        return None if p is None else float(p)
    b = math.log2(1 + max(ulp, 0.0))
    return float(min(b, p)) if p is not None else b


def counted_in(rec: dict, section: str = "forward") -> tuple[str, float]:
    """(dtype, threshold bits) a record section's ULPs and bits are counted in: the record's,
    but for a forward that a precision policy widened (a float32 loss of a bfloat16 point),
    which carries its own (`dtype`, `threshold_bits`: the input's threshold moved to the
    wider significand, METRICS.md "Precision policies")."""
    s = rec.get(section) or {}
    return s.get("dtype", rec.get("dtype", "")), float(s.get("threshold_bits", rec["threshold_bits"]))


def widened_threshold(threshold: float, out_dtype: str, inp_dtype: str) -> float:
    """The input's breakdown threshold in bits of a wider `out_dtype`: the same relative
    error on the wider significand (bfloat16's 4 of 8 bits are float32's 20 of 24)."""
    return threshold + (precision(out_dtype) or 0) - (precision(inp_dtype) or 0)
