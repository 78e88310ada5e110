"""Pure functions and accumulators for the accuracy and overflow numbers of METRICS.md.

`ulp_distance` is Herbie's ordinal measure: the number of representable values of the
dtype between two values, +0 and -0 being the same value. Everything works on the raw
bit patterns (numpy integers), which is uniform across float64/32/16 and bfloat16 and
several times faster than torch's elementwise predicates on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .dtypes import FloatFormat, fmt

CHUNK = 1 << 20


@dataclass(frozen=True)
class _Bits:
    """Sign, magnitude bits and classification of a tensor's values."""

    f: FloatFormat
    negative: np.ndarray
    magnitude: np.ndarray  # int64: the bits without the sign

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Bits":
        f = fmt(t.dtype)
        bits = t.detach().cpu().contiguous().view(f.int_dtype).numpy().astype(np.int64, copy=False)
        return cls(f, bits < 0, bits & ((1 << (f.total_bits - 1)) - 1))

    @property
    def _inf_bits(self) -> int:
        # All exponent bits set, fraction zero.
        return ((1 << (self.f.total_bits - 1)) - 1) ^ ((1 << (self.f.significand_bits - 1)) - 1)

    @property
    def nan(self) -> np.ndarray:
        return self.magnitude > self._inf_bits

    @property
    def inf(self) -> np.ndarray:
        return self.magnitude == self._inf_bits

    @property
    def finite(self) -> np.ndarray:
        return self.magnitude < self._inf_bits

    @property
    def ordinal(self) -> np.ndarray:
        return np.where(self.negative, -self.magnitude, self.magnitude)


def ordinal(t: torch.Tensor) -> torch.Tensor:
    """Signed ordinal of each value: consecutive floats have consecutive ordinals."""
    return torch.from_numpy(_Bits.of(t).ordinal)


def _distance(v: _Bits, r: _Bits) -> np.ndarray:
    ov, orf = v.ordinal, r.ordinal
    if v.f.total_bits == 64:
        # Opposite signs: the integer difference can overflow int64; the distance is
        # astronomically large then, so float precision is enough.
        with np.errstate(over="ignore"):
            same = np.abs(ov - orf).astype(np.float64)
        d = np.where(v.negative == r.negative, same,
                     v.magnitude.astype(np.float64) + r.magnitude.astype(np.float64))
    else:
        d = np.abs(ov - orf).astype(np.float64)
    vnan, rnan, vinf = v.nan, r.nan, v.inf
    if vnan.any() or rnan.any() or vinf.any():
        d[vnan != rnan] = math.inf
        d[vnan & rnan] = 0.0
        differs = (v.magnitude != r.magnitude) | (v.negative != r.negative)
        d[vinf & differs] = math.inf
    return d


def ulp_distance(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance in ULPs between `value` and `reference` (same dtype and shape), as float64.

    NaN against NaN is 0 (both undefined); NaN against a number, or an infinite value
    against a different reference, is inf. A finite value against an infinite reference
    keeps its ordinal distance (to the largest finite value, then one more step).
    """
    if value.dtype != reference.dtype:
        raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
    return torch.from_numpy(_distance(_Bits.of(value), _Bits.of(reference)))


def bits_of_error(ulps: torch.Tensor) -> torch.Tensor:
    """bits = log2(1 + ulp): 0 is correctly rounded."""
    return torch.log2(1 + ulps)


def ulp_threshold(threshold_bits: float) -> float:
    """The ULP distance matching `threshold_bits` lost: bits > t  <=>  ulp > 2**t - 1."""
    return 2.0**threshold_bits - 1


@dataclass
class ErrorStats:
    """Streams (value, reference) pairs into the per-point numbers of METRICS.md.

    `nan`/`posinf`/`neginf` count non-finite values where the reference is finite;
    `saturated` counts finite values whose error exceeds the threshold (silent
    saturation). For `mean_bits` a non-finite result counts as the dtype's full bit
    width (as Herbie does), so that one NaN does not make the mean meaningless.
    """

    threshold_bits: float
    n: int = 0
    max_ulp: float = 0.0
    _bits_sum: float = 0.0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    saturated: int = 0
    reduced_ulp: float | None = None
    reduced_value: float | None = None
    reduced_reference: float | None = None
    _width: int = field(default=0, repr=False)

    def add(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        value = value.detach().cpu().reshape(-1)
        reference = reference.detach().cpu().reshape(-1)
        if value.dtype != reference.dtype:
            raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
        # Bounded chunks: the temporaries are several int64/float64 copies of the input.
        for start in range(0, value.numel(), CHUNK):
            self._add(_Bits.of(value[start:start + CHUNK]), _Bits.of(reference[start:start + CHUNK]))

    def _add(self, v: _Bits, r: _Bits) -> None:
        self._width = v.f.total_bits
        ulps = _distance(v, r)
        self.n += ulps.size
        self.max_ulp = max(self.max_ulp, float(ulps.max()))
        self._bits_sum += float(np.minimum(np.log2(1 + ulps), self._width).sum())
        over = ulps > ulp_threshold(self.threshold_bits)
        v_finite = v.finite
        if v_finite.all():
            self.saturated += int(over.sum())
            return
        r_finite = r.finite
        self.nan += int((v.nan & r_finite).sum())
        v_inf = v.inf & r_finite
        self.posinf += int((v_inf & ~v.negative).sum())
        self.neginf += int((v_inf & v.negative).sum())
        self.saturated += int((v_finite & over).sum())

    def set_reduced(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        self.reduced_ulp = float(ulp_distance(value.reshape(1), reference.reshape(1))[0])
        self.reduced_value = float(value)
        self.reduced_reference = float(reference)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    def as_dict(self) -> dict:
        max_bits = math.log2(1 + self.max_ulp) if self.n else None
        return {
            "n": self.n,
            "max_ulp": int_or_inf(self.max_ulp) if self.n else None,
            "max_bits": _round(max_bits),
            "mean_bits": _round(self._bits_sum / self.n) if self.n else None,
            "reduced_ulp": None if self.reduced_ulp is None else int_or_inf(self.reduced_ulp),
            "value": self.reduced_value,
            "reference": self.reduced_reference,
            "nan": self.nan,
            "inf": self.posinf + self.neginf,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "saturated": self.saturated,
        }


def int_or_inf(x: float) -> float | int:
    return int(x) if math.isfinite(x) else x


def _round(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return round(x, 4)
