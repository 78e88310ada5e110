"""The floating-point formats losscheck audits: the facts that need no torch.

Names, significand widths and total widths, in the order every table lists them, and the
ULP distance matching a number of bits lost. `dtypes.py` adds the torch dtypes; modules
that only read results (report, findings, gate, config validation) use this one so that
they do not import torch.
"""
from __future__ import annotations

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
