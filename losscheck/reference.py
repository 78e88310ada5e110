"""High-precision evaluation shared by the losses' references (METRICS.md, "Reference").

References are computed in numpy with at least 10 more significand bits than the dtype
under test: float64 for float32/float16/bfloat16, x86 long double (64-bit significand)
for float64. They never hold more than `CHUNK_ELEMENTS` values in working precision at
once, and are rounded to the target dtype exactly once (correct rounding, see `round_to`).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .dtypes import fmt
from .errors import ReferenceUnavailable

# Values held in working precision at once (8 MiB in float64, 16 MiB in long double).
CHUNK_ELEMENTS = 1 << 20

_LONGDOUBLE_OK = np.finfo(np.longdouble).nmant >= 63


def work_dtype(dtype: torch.dtype) -> type:
    """The numpy type the reference for `dtype` is computed in."""
    if dtype == torch.float64:
        if not _LONGDOUBLE_OK:
            raise ReferenceUnavailable(
                "the float64 reference needs x86 extended precision (long double), "
                f"which this platform lacks (numpy long double has {np.finfo(np.longdouble).nmant} "
                "fraction bits)"
            )
        return np.longdouble
    fmt(dtype)  # raises KeyError for unsupported dtypes
    return np.float64


def row_chunks(rows: int, row_elements: int) -> Iterator[slice]:
    """Slices of whole rows holding at most CHUNK_ELEMENTS values (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def to_work(t: torch.Tensor, work: type) -> np.ndarray:
    """A tensor's values, exactly, in working precision (bfloat16 goes through float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    return t.numpy().astype(work)


def round_to(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Correctly round working-precision values to `dtype` (round to nearest, ties to even).

    bfloat16 goes through float32 with round-to-odd: rounding first to odd in a format
    with at least 2 more bits, then to nearest, equals one rounding to nearest, whereas
    the plain float64 -> float32 -> bfloat16 path can double-round.
    """
    # Overflow to ±inf is the correct rounding of a value beyond the dtype's range, not an
    # error: without errstate numpy warns ("overflow encountered in cast") on long double ->
    # float64 and float64 -> float32 (e.g. the mean of float32 cross entropy at logits near
    # float32's max), which pytest's filterwarnings=error turns into a failure.
    if dtype == torch.float64:
        with np.errstate(over="ignore"):
            return torch.from_numpy(np.asarray(a, dtype=np.float64).copy())
    if dtype == torch.float32:
        with np.errstate(over="ignore"):
            return torch.from_numpy(np.asarray(a, dtype=np.float64).astype(np.float32))
    a64 = np.asarray(a, dtype=np.float64)
    if dtype == torch.float16:
        # numpy converts float64 -> float16 directly with one correct rounding
        # (npy_double_to_half), unlike torch, which goes through float32.
        with np.errstate(over="ignore"):
            return torch.from_numpy(a64.astype(np.float16))
    with np.errstate(over="ignore", invalid="ignore"):
        f = a64.astype(np.float32)
        finite = np.isfinite(a64)
        # Beyond float32's largest finite value, truncation gives that value (which is odd).
        f = np.where(np.isinf(f) & finite, np.copysign(np.finfo(np.float32).max, a64), f).astype(np.float32)
        fix = (f != a64) & finite & ((f.view(np.int32) & 1) == 0)
        if fix.any():
            toward = np.where(a64 > f, np.float32(np.inf), np.float32(-np.inf))
            f = np.where(fix, np.nextafter(f, toward), f)
    return torch.from_numpy(f).to(dtype)


class ExactSum:
    """Sum of many working-precision values, exact up to a final rounding.

    Each value is split into a float64 head and tail, and math.fsum sums them without
    rounding error; a chunk's exact sum is kept as two floats (sum and residual), so
    chunks can be combined with a relative error of about 2**-106.
    """

    def __init__(self) -> None:
        self._parts: list[float] = []
        self._fallback: list[float] = []

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        if values.size == 0:
            return
        if not np.all(np.isfinite(values)):
            # inf/nan propagate as IEEE arithmetic says; exactness is moot then.
            with np.errstate(over="ignore", invalid="ignore"):
                self._fallback.append(np.sum(values))
            return
        with np.errstate(over="ignore"):
            hi = values.astype(np.float64)
        try:
            if not np.all(np.isfinite(hi)):
                # Finite long double values beyond float64's range (a float64 cross entropy at
                # logits near ±max has m − x_t ≈ 3.6e308): the head/tail split cannot hold them.
                raise OverflowError
            parts = hi.tolist()
            if values.dtype != np.float64:
                parts += (values - hi.astype(values.dtype)).astype(np.float64).tolist()
            # fsum raises OverflowError ("intermediate overflow") when a partial sum leaves
            # float64's range, e.g. two float64 losses near 1e308.
            s = math.fsum(parts)
            parts.append(-s)
            self._parts += [s, math.fsum(parts)]
        except OverflowError:
            # Sum in working precision instead (long double keeps such sums finite; in
            # float64 the sum overflows to inf, as the exact sum rounded would).
            with np.errstate(over="ignore"):
                self._fallback.append(np.sum(values))

    def mean(self, count: int, work: type):
        """The sum divided by `count`, in working precision."""
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                s = math.fsum(self._parts)
                self._parts.append(-s)
                try:
                    residual = math.fsum(self._parts)
                finally:
                    self._parts.pop()
                total = work(s) + work(residual)
            except OverflowError:
                # Chunk sums whose total leaves float64's range: add them in working precision
                # (inf in float64, as the exact sum rounded; finite in long double).
                total = np.sum(np.asarray(self._parts, dtype=work))
            if self._fallback:
                # The fallback sums are kept in working precision: a long double sum beyond
                # float64's range may still have a mean within it.
                total = total + sum(work(f) for f in self._fallback)
            return total / work(count)


def two_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a - b as an unevaluated sum d + e with |e| <= ulp(d)/2 (Knuth's TwoSum)."""
    d = a - b
    bb = d - a
    e = (a - (d - bb)) + (-b - bb)
    return d, e


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow or cancellation, elementwise."""
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(z))
    one = z.dtype.type(1)
    return np.where(z >= 0, one / (one + e), e / (one + e))


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) without overflow: max(z, 0) + log1p(exp(-|z|)); exact limits at ±inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
