"""Dtype limits for `explain`: computed from `torch.finfo` and by evaluating the operations in
each dtype (bisection over its representable values), never typed in."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from . import reference as R
from .dtypes import FORMATS


@dataclass(frozen=True)
class DtypeLimits:
    dtype: str
    significand_bits: int
    eps: float
    max: float
    log_max: float  # ln(finfo.max): exp(x) overflows above it
    exp_overflow_at: float  # the smallest x of the dtype with exp(x) = inf, evaluated
    log_min_subnormal: float  # ln of the smallest subnormal
    exp_underflow_below: float  # exp(x) = 0 for x <= this (evaluated, negative)
    sigmoid_one_at: float  # the smallest x with 1/(1 + exp(−x)) = 1, evaluated in the dtype
    sigmoid_one_estimate: float  # ln(2/ε): e^−x below ε/2, half an ULP above 1
    p_one_estimate: float  # ln(4/ε): 1 − e^−x within ε/4 (half an ULP below 1) of 1
    p_one_at: float  # the smallest logit whose σ, correctly rounded to the dtype, is 1
    p_zero_below: float  # σ(logit) correctly rounded to the dtype is 0 at and below it


def _as_bits(value: float, dtype: str) -> int:
    f = FORMATS[dtype]
    return int(torch.tensor([value], dtype=f.torch_dtype).view(f.int_dtype).item())


def _from_bits(bits: int, dtype: str) -> torch.Tensor:
    f = FORMATS[dtype]
    return torch.tensor([bits], dtype=f.int_dtype).view(f.torch_dtype)


def first_where(dtype: str, predicate: Callable[[torch.Tensor], bool], lo: float, hi: float) -> float:
    """The smallest representable x ≥ 0 of `dtype` in (lo, hi] with predicate(x) true.

    `predicate` must be false at `lo`, true at `hi` and monotone in between; it gets a
    one-element tensor of `dtype`. Bisection over the bit patterns (ordered like the
    values for non-negative floats), so every representable value is a candidate.
    """
    a, b = _as_bits(lo, dtype), _as_bits(hi, dtype)
    if predicate(_from_bits(a, dtype)) or not predicate(_from_bits(b, dtype)):
        raise ValueError(f"no threshold in [{lo}, {hi}] for {dtype}")
    while b - a > 1:
        mid = (a + b) // 2
        if predicate(_from_bits(mid, dtype)):
            b = mid
        else:
            a = mid
    return float(_from_bits(b, dtype).item())


def _rounded_sigmoid(logit: float, dtype: str) -> float:
    # As the sweep makes probabilities: σ in float64 without overflow, rounded once.
    return float(R.round_to(R.sigmoid(np.array([logit], dtype=np.float64)), FORMATS[dtype].torch_dtype)[0])


@cache
def dtype_limits(dtype: str) -> DtypeLimits:
    """The thresholds of `dtype` that the naive formulas run into, computed now."""
    f = FORMATS[dtype]
    fi = torch.finfo(f.torch_dtype)
    min_subnormal = fi.tiny * fi.eps
    return DtypeLimits(
        dtype=dtype,
        significand_bits=f.significand_bits,
        eps=fi.eps,
        max=fi.max,
        log_max=math.log(fi.max),
        exp_overflow_at=first_where(dtype, lambda t: bool(torch.exp(t).isinf()), 0.0, fi.max),
        log_min_subnormal=math.log(min_subnormal),
        exp_underflow_below=-first_where(dtype, lambda t: bool(torch.exp(-t) == 0), 0.0, fi.max),
        sigmoid_one_at=first_where(dtype, lambda t: bool(1 / (1 + torch.exp(-t)) == 1), 0.0, 1e4),
        sigmoid_one_estimate=math.log(2 / fi.eps),
        p_one_estimate=math.log(4 / fi.eps),
        # The logit is a float64 (the sweep's inputs are), whatever the dtype under test.
        p_one_at=first_where("float64", lambda t: _rounded_sigmoid(float(t), dtype) == 1, 0.0, 1e4),
        p_zero_below=-first_where("float64", lambda t: _rounded_sigmoid(-float(t), dtype) == 0, 0.0, 1e4),
    )


def _num(x: float) -> str:
    """Thresholds as printed: two decimals (log(65504) = 11.0899 -> '11.09')."""
    return f"{x:.2f}"


# Columns of the limits table: key -> (header, legend, value).
LIMIT_COLUMNS: dict[str, tuple[str, str, Callable[[DtypeLimits], str]]] = {
    "log_max": ("ln(max)", "ln(finfo.max): exp(x) overflows to inf above it", lambda L: _num(L.log_max)),
    "exp_overflow": (
        "exp = inf from",
        "the smallest x of the dtype with exp(x) = inf, evaluated in it",
        lambda L: _num(L.exp_overflow_at),
    ),
    "exp_underflow": (
        "exp = 0 at",
        "exp(x) = 0 at and below this x, evaluated (≈ ln(smallest subnormal / 2))",
        lambda L: _num(L.exp_underflow_below),
    ),
    "sigmoid_one": (
        "σ = 1 from",
        "the smallest x with 1/(1 + exp(−x)) = 1 exactly, evaluated in the dtype",
        lambda L: _num(L.sigmoid_one_at),
    ),
    "sigmoid_estimate": (
        "ln(2/ε)",
        "where e^−x drops below ε/2, half an ULP above 1 (ε = finfo.eps), "
        "so that 1 + e^−x rounds to 1: the estimate of “σ = 1 from”",
        lambda L: _num(L.sigmoid_one_estimate),
    ),
    "p_one": (
        "p = 1 from",
        "the smallest logit whose p = σ(logit), made as the sweep makes it (σ in "
        "float64, rounded once to the dtype), is exactly 1 (float64: σ's own rounding, ≈ ln(2/ε))",
        lambda L: _num(L.p_one_at),
    ),
    "p_one_estimate": (
        "ln(4/ε)",
        "where 1 − e^−x comes within ε/4, half an ULP below 1, of 1 (ε = finfo.eps): the estimate of “p = 1 from”",
        lambda L: _num(L.p_one_estimate),
    ),
    "p_zero": (
        "p = 0 at",
        "σ(logit) correctly rounded to the dtype is exactly 0 at and below this logit",
        lambda L: _num(L.p_zero_below),
    ),
}
DEFAULT_LIMIT_COLUMNS = ("log_max", "exp_overflow", "exp_underflow", "sigmoid_one", "sigmoid_estimate")
