"""Test oracle: losscheck.metrics as it was before the port to torch (commit 2478e5a), kept
verbatim apart from the imports and the class name, so that tests can show that the torch
implementation gives every number of the old one (issue 13: "every number unchanged").

Everything here reads the values' bits through numpy on the host, as the old code did.
Do not "fix" this file: it is the reference behaviour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from losscheck.dtypes import FloatFormat, fmt

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


def _clamped(v: _Bits, r: _Bits) -> np.ndarray:
    """A finite value where the reference is ±inf, other than the largest finite value of
    the reference's sign (overflow rounding: what round-to-nearest gives a value just
    beyond the range, 1 ULP). The value is finite but has no correct bit: clamped."""
    overflow_rounding = (v.magnitude == v._inf_bits - 1) & (v.negative == r.negative)
    return r.inf & v.finite & ~overflow_rounding


def _underflow(v: _Bits, r: _Bits) -> np.ndarray:
    """Exactly 0 (either sign) where the reference is finite and non-zero: flushed to zero."""
    return (v.magnitude == 0) & r.finite & (r.magnitude != 0)


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
    vnan, rnan, vinf, rinf = v.nan, r.nan, v.inf, r.inf
    if vnan.any() or rnan.any() or vinf.any() or rinf.any():
        d[vnan != rnan] = math.inf
        d[vnan & rnan] = 0.0
        differs = (v.magnitude != r.magnitude) | (v.negative != r.negative)
        d[vinf & differs] = math.inf
        # A finite value against ±inf is not a finite number of steps away: the ordinal
        # distance (100.0 to +inf in float32 is ~1e9 ULP, "29.9 bits") would pretend some
        # bits were right. It scores the full width; overflow rounding keeps its 1 ULP.
        d[_clamped(v, r)] = math.inf
    return d


def ulp_distance(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance in ULPs between `value` and `reference` (same dtype and shape), as float64.

    NaN against NaN is 0 (both undefined); NaN against a number or an infinity, an
    infinite value against a different reference, and a finite value against an infinite
    reference (clamped) are inf — except the largest finite value of the reference's
    sign against ±inf, which is overflow rounding: 1 ULP.
    """
    if value.dtype != reference.dtype:
        raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
    return torch.from_numpy(_distance(_Bits.of(value), _Bits.of(reference)))


def _precision(dtype: torch.dtype | str | FloatFormat) -> int:
    return (dtype if isinstance(dtype, FloatFormat) else fmt(dtype)).significand_bits


def bits(ulp, dtype: torch.dtype | str | FloatFormat):
    """Bits of error of a ULP distance in `dtype` (a torch dtype, its name or a FloatFormat):
    min(log2(1 + ulp), p) with p the significand precision (53, 24, 11, 8). 0 is correctly
    rounded; p means no correct bit is left, and no error scores more (an infinite distance
    included). A float gives a float; a tensor or numpy array gives the same, elementwise.
    """
    p = _precision(dtype)
    if isinstance(ulp, torch.Tensor):
        return torch.clamp(torch.log2(1 + ulp.double()), max=p)
    if isinstance(ulp, np.ndarray):
        return np.minimum(np.log2(1 + ulp.astype(np.float64)), p)
    ulp = float(ulp)
    if math.isnan(ulp):
        raise ValueError("a ULP distance is never NaN")
    return min(math.log2(1 + ulp), float(p))


def bits_of_error(ulps: torch.Tensor, dtype: torch.dtype | str | FloatFormat | None = None) -> torch.Tensor:
    """log2(1 + ulp) elementwise; capped at `dtype`'s precision when given (as `bits`).
    Kept for callers of the uncapped form; new code uses `bits`."""
    return torch.log2(1 + ulps) if dtype is None else bits(ulps, dtype)


def ulp_threshold(threshold_bits: float) -> float:
    """The ULP distance matching `threshold_bits` lost: bits > t  <=>  ulp > 2**t - 1."""
    return 2.0**threshold_bits - 1


@dataclass
class NumpyErrorStats:
    """Streams (value, reference) pairs into the per-point numbers of METRICS.md.

    Counters, per element:
    * `nan`: NaN wherever the reference is not NaN (a NaN where the true value is ±inf is
      as wrong as one where it is finite);
    * `posinf`/`neginf`: an infinity where the reference is finite, or the opposite
      infinity (the same infinity is exact);
    * `clamped`: a finite value where the reference is ±inf (torch's BCE at 100 against
      +inf), other than overflow rounding (the largest finite value of that sign, 1 ULP);
      it scores p bits (infinite ULP);
    * `underflow`: exactly 0 where the reference is finite and non-zero; its distance is
      kept as measured (a flushed subnormal is a few ULP): the counter carries the verdict;
    * `saturated`: finite values whose error exceeds the threshold (silent saturation),
      clamped values included (they score p bits), flushed-to-zero ones when far enough off.
    Bits are capped at the precision p (`bits`): `max_bits` ≤ p, and in `mean_bits` each
    element scores at most p, a non-finite one exactly p.
    """

    threshold_bits: float
    n: int = 0
    max_ulp: float = 0.0
    _bits_sum: float = 0.0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    saturated: int = 0
    clamped: int = 0
    underflow: int = 0
    reduced_ulp: float | None = None
    reduced_value: float | None = None
    reduced_reference: float | None = None
    _format: FloatFormat | None = field(default=None, repr=False)

    def add(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        value = value.detach().cpu().reshape(-1)
        reference = reference.detach().cpu().reshape(-1)
        if value.dtype != reference.dtype:
            raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
        self._format = fmt(value.dtype)
        # Bounded chunks: the temporaries are several int64/float64 copies of the input.
        for start in range(0, value.numel(), CHUNK):
            self._add(_Bits.of(value[start:start + CHUNK]), _Bits.of(reference[start:start + CHUNK]))

    def _add(self, v: _Bits, r: _Bits) -> None:
        ulps = _distance(v, r)
        self.n += ulps.size
        self.max_ulp = max(self.max_ulp, float(ulps.max()))
        self._bits_sum += float(bits(ulps, v.f).sum())
        v_finite = v.finite
        # Clamped values are among these: their distance is inf.
        self.saturated += int((v_finite & (ulps > ulp_threshold(self.threshold_bits))).sum())
        self.underflow += int(_underflow(v, r).sum())
        if v_finite.all() and r.finite.all():
            return
        self.clamped += int(_clamped(v, r).sum())
        self.nan += int((v.nan & ~r.nan).sum())
        wrong_inf = v.inf & (r.finite | (r.inf & (v.negative != r.negative)))
        self.posinf += int((wrong_inf & ~v.negative).sum())
        self.neginf += int((wrong_inf & v.negative).sum())

    def set_reduced(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        # ulp_distance applies the same rules: a finite mean against an infinite reduced
        # reference is inf (clamped), the largest finite value 1 ULP.
        self._format = self._format or fmt(value.dtype)
        self.reduced_ulp = float(ulp_distance(value.reshape(1), reference.reshape(1))[0])
        self.reduced_value = float(value)
        self.reduced_reference = float(reference)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    def as_dict(self) -> dict:
        max_bits = bits(self.max_ulp, self._format) if self.n else None
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
            "clamped": self.clamped,
            "underflow": self.underflow,
        }


def int_or_inf(x: float) -> float | int:
    return int(x) if math.isfinite(x) else x


def _round(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return round(x, 4)
