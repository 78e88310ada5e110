"""High-precision evaluation shared by the losses' references (METRICS.md, "Reference").

References are computed in numpy with at least 10 more significand bits than the dtype
under test: float64 for float32/float16/bfloat16, x86 long double (64-bit significand)
for float64. They never hold more than `CHUNK_ELEMENTS` values in working precision at
once, and are rounded to the target dtype exactly once (correct rounding, see `round_to`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .dtypes import fmt
from .errors import ReferenceUnavailable

# Values held in working precision at once (2 MiB per array in float64, 4 MiB in long double).
CHUNK_ELEMENTS = 1 << 18

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
        if not _extended_now():
            # Some native libraries set the x87 precision control to 53 bits; long double
            # arithmetic then silently rounds like float64, and the reference would be wrong.
            raise ReferenceUnavailable(
                "the x87 FPU is set to double precision in this process (a native library changed "
                "its precision control): long double arithmetic is not extended, so there is no "
                "float64 reference")
        return np.longdouble
    fmt(dtype)  # raises KeyError for unsupported dtypes
    return np.float64


def _extended_now() -> bool:
    """Whether long double arithmetic keeps 64 significand bits right now (1 + 2**-60 > 1)."""
    one = np.longdouble(1)
    return bool(one + np.longdouble(2) ** -60 > one)


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

    float16 and bfloat16 go through float32 with round-to-odd: rounding first to odd in a
    format with at least 2 more bits, then to nearest, equals one rounding to nearest,
    whereas the plain float64 -> float32 -> half path can double-round. (numpy's direct
    float64 -> float16 cast is also correct, but five times slower.)
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
    with np.errstate(over="ignore", invalid="ignore"):
        f = a64.astype(np.float32)  # round to nearest
        back = f.astype(np.float64)
        # Round to odd on the bits: step back toward zero where rounding went away from
        # zero (sign-magnitude: bits − 1 shrinks the magnitude for either sign; a finite
        # value beyond float32's range lands on its largest finite value, which is odd),
        # then set the last bit where the value was inexact. NaN stays NaN.
        away = (np.abs(back) > np.abs(a64)).view(np.int8).astype(np.int32)
        inexact = (back != a64).view(np.int8).astype(np.int32)
        bits = (f.view(np.int32) - away) | inexact
    return torch.from_numpy(bits.view(np.float32)).to(dtype)


class CompensatedSum:
    """Sum of many working-precision values with every rounding error recovered.

    Each chunk is summed by a pairwise tree of TwoSums (vectorised: log2(n) numpy steps);
    the exact rounding errors are added up separately, and chunk sums are combined with
    one more TwoSum. The result (head + tail) carries the sum to about twice the working
    precision, far below 1/64 ULP of the target dtype. inf/NaN terms, or partial sums
    beyond the working format's range, fall back to plain IEEE summation.
    """

    def __init__(self) -> None:
        self._hi = None
        self._lo = None
        self._plain: list = []  # sums that are not finite (or left the range)

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        if values.size == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(values).all():
                self._plain.append(np.sum(values))
                return
            hi, lo = _tree_sum(values)
            if self._hi is None:
                self._hi, self._lo = values.dtype.type(0), values.dtype.type(0)
            total, err = _two_sum(self._hi, hi)
            if np.isfinite(total) and np.isfinite(err):
                self._hi, self._lo = total, self._lo + lo + err
            else:
                # A partial sum left the working format's range (float64 losses near
                # 1e308): IEEE summation gives the rounded answer, inf.
                self._plain.append(np.sum(values))

    def mean(self, count: int, work: type):
        """The sum divided by `count`, in working precision."""
        with np.errstate(over="ignore", invalid="ignore"):
            total = work(0) if self._hi is None else work(self._hi) + work(self._lo)
            for extra in self._plain:
                total = total + work(extra)
            return total / work(count)


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _tree_sum(x: np.ndarray):
    err = x.dtype.type(0)
    while x.size > 1:
        if x.size % 2:
            x = np.append(x, x.dtype.type(0))
        half = x.size // 2
        x, e = _two_sum(x[:half], x[half:])
        if not np.isfinite(x).all():
            return np.sum(x), x.dtype.type(0)
        err = err + e.sum()
    return x[0], err


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


def binary_factor(positive: np.ndarray, weight, pos_weight, work: type):
    """w·(pos_weight if y = 1 else 1) in working precision (exact for the dtypes under
    test: a product of two of their values fits in float64/long double); None if unset."""
    f = None
    if pos_weight is not None:
        f = np.where(positive, np.asarray(pos_weight, dtype=work).reshape(-1)[0], work(1))
    if weight is not None:
        w = np.asarray(weight, dtype=work)
        f = w if f is None else f * w
    return f


def weigh(values: np.ndarray, factor, undefined: np.ndarray | None = None) -> np.ndarray:
    """factor·values, where a zero factor removes its element: 0 even where the unweighted
    value is ±inf or has no limit (METRICS.md, "Options": the limit w → 0 is taken first,
    and w·ℓ(x) → 0 for every x near the limit point). Elements marked `undefined` (a NaN
    input: not the limit of anything) stay NaN. `factor` broadcasts against `values`."""
    out = values * factor
    zero = np.asarray(factor) == 0
    if undefined is not None:
        zero = zero & ~undefined
    return np.where(zero, values.dtype.type(0), out)
