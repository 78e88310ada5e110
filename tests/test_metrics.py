"""ULP distances, bits of error and the per-point accumulator (METRICS.md, "Accuracy").

Adjacent values are built from their bit patterns (torch.nextafter has no bfloat16 kernel
on every build), so every dtype is tested the same way and independently of `ordinal`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losscheck.dtypes import FORMATS
from losscheck.metrics import ErrorStats, bits_of_error, ordinal, ulp_distance, ulp_threshold

DTYPES = list(FORMATS)


def _fmt(name):
    return FORMATS[name]


def from_bits(pattern: int, name: str) -> torch.Tensor:
    """The one-element tensor of dtype `name` whose bits are `pattern` (an unsigned int)."""
    f = _fmt(name)
    width = f.total_bits
    signed = pattern - (1 << width) if pattern >= 1 << (width - 1) else pattern
    return torch.tensor([signed], dtype=f.int_dtype).view(f.torch_dtype)


def t(values, name):
    return torch.tensor(values, dtype=torch.float64).to(_fmt(name).torch_dtype)


def d(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(ulp_distance(a, b)[0])


def sign_bit(name):
    return 1 << (_fmt(name).total_bits - 1)


def exp_field(name):
    """Bit pattern of +inf (all exponent bits set, zero fraction)."""
    f = _fmt(name)
    return ((1 << (f.total_bits - f.significand_bits)) - 1) << (f.significand_bits - 1)


# ---- ordinal / ulp_distance -------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_plus_and_minus_zero_are_the_same_value(name):
    pz, nz = from_bits(0, name), from_bits(sign_bit(name), name)
    assert math.copysign(1.0, float(nz)) == -1.0  # really −0
    assert d(pz, nz) == 0
    assert d(nz, pz) == 0
    assert int(ordinal(pz)[0]) == int(ordinal(nz)[0]) == 0


@pytest.mark.parametrize("name", DTYPES)
def test_ulp_distance_returns_float64(name):
    out = ulp_distance(t([1.0, 2.0], name), t([1.0, 3.0], name))
    assert out.dtype == torch.float64
    assert out.shape == (2,)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("start", ["one", "smallest_subnormal", "largest_subnormal", "large"])
@pytest.mark.parametrize("negative", [False, True])
def test_adjacent_floats_are_one_ulp_apart(name, start, negative):
    f = _fmt(name)
    frac_bits = f.significand_bits - 1
    pattern = {
        "one": exp_field(name) >> 1 & ~((1 << frac_bits) - 1),  # bias << frac_bits: the value 1
        "smallest_subnormal": 1,
        # the last subnormal and the first normal: across the subnormal/normal boundary
        "largest_subnormal": (1 << frac_bits) - 1,
        "large": exp_field(name) - 2,  # two below the largest finite value
    }[start]
    if negative:
        pattern |= sign_bit(name)
    a, b = from_bits(pattern, name), from_bits(pattern + 1, name)
    if start == "one":
        assert float(a) == (-1.0 if negative else 1.0)
    if start == "largest_subnormal":
        assert abs(float(b)) == torch.finfo(f.torch_dtype).tiny  # smallest normal
    assert a != b and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert d(a, b) == 1
    assert d(b, a) == 1
    assert abs(int(ordinal(b)[0]) - int(ordinal(a)[0])) == 1


@pytest.mark.parametrize("name", DTYPES)
def test_smallest_subnormals_of_opposite_sign_are_two_apart(name):
    pos, neg = from_bits(1, name), from_bits(sign_bit(name) | 1, name)
    assert float(pos) > 0 > float(neg)
    assert d(pos, neg) == 2
    assert d(neg, pos) == 2
    assert d(pos, from_bits(0, name)) == 1
    assert d(neg, from_bits(0, name)) == 1
    assert d(neg, from_bits(sign_bit(name), name)) == 1


@pytest.mark.parametrize("name", DTYPES)
def test_largest_finite_and_inf_are_adjacent_ordinals(name):
    f = _fmt(name)
    big = t([torch.finfo(f.torch_dtype).max], name)
    inf = t([math.inf], name)
    assert int(ordinal(inf)[0]) - int(ordinal(big)[0]) == 1
    assert int(ordinal(-big)[0]) - int(ordinal(-inf)[0]) == 1
    # The largest finite value against an infinite reference of its sign is overflow
    # rounding, one step (the other finite values are clamped: see test_metric_rules) ...
    assert d(big, inf) == 1
    assert d(-big, -inf) == 1
    # ... but an infinite value against a finite reference is infinitely wrong.
    assert d(inf, big) == math.inf
    assert d(-inf, -big) == math.inf


@pytest.mark.parametrize("name", DTYPES)
def test_nan_handling(name):
    nan, one = t([math.nan], name), t([1.0], name)
    assert d(nan, nan) == 0
    assert d(nan, one) == math.inf
    assert d(one, nan) == math.inf
    assert d(nan, t([math.inf], name)) == math.inf
    # A NaN with the sign bit set is still NaN: same answers.
    negnan = from_bits(sign_bit(name) | exp_field(name) | 1, name)
    assert torch.isnan(negnan).all()
    assert d(negnan, nan) == 0
    assert d(negnan, one) == math.inf


@pytest.mark.parametrize("name", DTYPES)
def test_inf_against_a_different_reference_is_inf(name):
    inf = t([math.inf], name)
    for ref in (0.0, 1.0, -1.0, -math.inf):
        assert d(inf, t([ref], name)) == math.inf
        assert d(-inf, t([-ref], name)) == math.inf
    assert d(inf, inf) == 0
    assert d(-inf, -inf) == 0


@pytest.mark.parametrize("name", DTYPES)
def test_opposite_signs_count_through_zero(name):
    one = t([1.0], name)
    ordinal_one = int(ordinal(one)[0])
    assert d(one, -one) == 2 * ordinal_one
    assert d(-one, one) == 2 * ordinal_one


def test_opposite_sign_large_float64_values_do_not_overflow():
    big = torch.tensor([1e308, torch.finfo(torch.float64).max], dtype=torch.float64)
    out = ulp_distance(big, -big)
    assert torch.isfinite(out).all()
    assert (out > 0).all()
    # 2·ordinal(max) = 2·0x7FEFFFFFFFFFFFFF ≈ 1.8e19, past int64's range.
    expected = 2.0 * 0x7FEFFFFFFFFFFFFF
    assert float(out[1]) == pytest.approx(expected, rel=1e-15)
    assert float(out[1]) > 2.0**63
    assert float(ulp_distance(-big, big)[1]) == float(out[1])


def test_dtype_mismatch_is_an_error():
    with pytest.raises(TypeError):
        ulp_distance(torch.ones(1, dtype=torch.float32), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("name", DTYPES)
def test_ordinal_is_monotone_over_all_finite_values_of_a_sample(name):
    f = _fmt(name)
    rng = np.random.default_rng(0)
    # Random bit patterns cover every binade, subnormals and both signs.
    w = f.total_bits
    pats = rng.integers(0, 1 << w, 2000, dtype=np.uint64).astype(f"uint{w}").view(f"int{w}")
    vals = torch.from_numpy(pats.copy()).view(f.torch_dtype)
    vals = vals[torch.isfinite(vals)]
    o = ordinal(vals)
    v64 = vals.double()
    order = torch.argsort(v64)
    o_sorted, v_sorted = o[order], v64[order]
    assert (o_sorted[1:] >= o_sorted[:-1]).all()
    # Equal ordinals only for equal values (±0).
    same = o_sorted[1:] == o_sorted[:-1]
    assert (v_sorted[1:][same] == v_sorted[:-1][same]).all()


def test_ulp_distance_elementwise_on_tensors():
    a = torch.tensor([1.0, 0.0, math.nan, math.inf], dtype=torch.float32)
    ref = torch.tensor([1.0, -0.0, 2.0, math.inf], dtype=torch.float32)
    out = ulp_distance(a, ref)
    assert out.tolist() == [0.0, 0.0, math.inf, 0.0]


# ---- bits ---------------------------------------------------------------------------------

def test_bits_is_log2_of_one_plus_ulp():
    u = torch.tensor([0.0, 1.0, 3.0, 2.0**23 - 1, 2.0**53 - 1, math.inf], dtype=torch.float64)
    assert bits_of_error(u).tolist() == [0.0, 1.0, 2.0, 23.0, 53.0, math.inf]


def test_ulp_threshold_matches_bits():
    for bits in (4, 5.5, 12, 26.5):
        u = ulp_threshold(bits)
        assert float(bits_of_error(torch.tensor([u], dtype=torch.float64))[0]) == pytest.approx(bits)


@pytest.mark.parametrize("name", DTYPES)
def test_no_correct_bit_left_at_the_significand_width(name):
    # From x to 2x there are 2**(p-1) values; from 1 to 2**p ... ulp = 2**p − 1 means p bits lost.
    f = _fmt(name)
    p = f.significand_bits
    one = t([1.0], name)
    two = t([2.0], name)
    assert d(one, two) == 2 ** (p - 1)
    assert float(bits_of_error(ulp_distance(one, two))[0]) == pytest.approx(math.log2(1 + 2 ** (p - 1)))


# ---- ErrorStats ---------------------------------------------------------------------------

def _next_up(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    f = FORMATS[{torch.float64: "float64", torch.float32: "float32",
                 torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]]
    return (x.view(f.int_dtype) + k).view(x.dtype)  # positive x only


@pytest.mark.parametrize("name", DTYPES)
def test_error_stats_counts_infinities_where_reference_is_finite_and_nan_wherever_it_is_not_nan(name):
    f = _fmt(name)
    inf, nan = math.inf, math.nan
    value = t([nan, inf, -inf, nan, inf, -inf, 1.0, nan], name)
    ref = t([1.0, 2.0, 3.0, inf, inf, -inf, 1.0, nan], name)
    s = ErrorStats(threshold_bits=f.default_threshold_bits)
    s.add(value, ref)
    # NaN against 1.0 and NaN against +inf (METRICS.md, "Overflow"); not NaN against NaN.
    assert (s.nan, s.posinf, s.neginf) == (2, 1, 1)
    assert s.nonfinite == 4
    assert s.n == 8
    assert s.max_ulp == math.inf
    dct = s.as_dict()
    assert dct["nan"] == 2 and dct["inf"] == 2 and dct["posinf"] == 1 and dct["neginf"] == 1
    assert dct["max_ulp"] == math.inf
    # non-finite values are never "saturated" nor "clamped": those are finite results.
    assert s.saturated == 0 and s.clamped == 0


@pytest.mark.parametrize("name", DTYPES)
def test_error_stats_saturated_counts_finite_values_above_threshold(name):
    threshold = 3.0  # bits: more than 2**3 − 1 = 7 ULPs is saturated
    one = t([1.0], name)
    ref = torch.cat([one, one, one, t([math.inf], name), t([5.0], name)])
    value = torch.cat([_next_up(one, 7), _next_up(one, 8), one,
                       # a finite value where the reference is +inf (torch's BCE clamp at
                       # 100): silent saturation
                       t([100.0], name),
                       t([math.nan], name)])
    s = ErrorStats(threshold_bits=threshold)
    s.add(value, ref)
    assert s.saturated == 2  # 8 ULPs and the clamped-but-finite one; not 7, not the NaN
    assert s.max_ulp == math.inf
    assert s.nan == 1
    assert s.posinf == 0


@pytest.mark.parametrize("name", DTYPES)
def test_error_stats_mean_bits_counts_nonfinite_as_the_precision(name):
    f = _fmt(name)
    value = t([1.0, math.nan, 2.0, math.inf], name)
    ref = t([1.0, 1.0, 2.0, 4.0], name)
    s = ErrorStats(threshold_bits=f.default_threshold_bits)
    s.add(value, ref)
    dct = s.as_dict()
    # Two exact elements (0 bits) and two non-finite ones (p bits each, not the total width).
    assert dct["mean_bits"] == pytest.approx(2 * f.significand_bits / 4)
    assert dct["max_bits"] == f.significand_bits
    assert dct["max_ulp"] == math.inf


def test_error_stats_streams_chunks_and_reports_max_and_mean():
    s = ErrorStats(threshold_bits=12)
    one = torch.ones(1, dtype=torch.float32)
    s.add(_next_up(one, 3), one)  # 3 ULPs = 2 bits
    s.add(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.float32))  # ignored
    s.add(torch.cat([one, _next_up(one, 1)]), torch.cat([one, one]))  # 0 and 1 bit
    dct = s.as_dict()
    assert dct["n"] == 3
    assert dct["max_ulp"] == 3
    assert dct["max_bits"] == 2.0
    assert dct["mean_bits"] == pytest.approx(1.0)
    assert dct["reduced_ulp"] is None
    assert dct["saturated"] == 0 and dct["nan"] == 0 and dct["inf"] == 0


def test_error_stats_empty():
    dct = ErrorStats(threshold_bits=4).as_dict()
    assert dct["n"] == 0
    assert dct["max_ulp"] is None and dct["mean_bits"] is None and dct["max_bits"] is None


@pytest.mark.parametrize("name", DTYPES)
def test_error_stats_reduced_ulp(name):
    s = ErrorStats(threshold_bits=4)
    one = t([1.0], name)[0]
    s.set_reduced(_next_up(one.reshape(1), 5)[0], one)
    dct = s.as_dict()
    assert dct["reduced_ulp"] == 5
    assert dct["reference"] == 1.0
    assert dct["value"] == float(_next_up(one.reshape(1), 5)[0])
    s.set_reduced(t([math.nan], name)[0], one)
    assert s.as_dict()["reduced_ulp"] == math.inf
    s.set_reduced(-one, one)
    assert s.reduced_ulp == 2 * int(ordinal(one.reshape(1))[0])


# ---- properties ---------------------------------------------------------------------------

def _finite_floats(width):
    return st.floats(allow_nan=False, allow_infinity=False, width=width)


@pytest.mark.parametrize("name,width", [("float32", 32), ("float16", 16)])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_ulp_distance_is_symmetric_and_additive_along_the_line(name, width, data):
    a, b, c = sorted(data.draw(st.lists(_finite_floats(width), min_size=3, max_size=3)))
    x = t([a, b, c], name)
    assert x.tolist() == [a, b, c]  # exactly representable: hypothesis drew them at this width
    xa, xb, xc = x[0:1], x[1:2], x[2:3]
    assert d(xa, xb) == d(xb, xa)
    assert d(xa, xc) == d(xa, xb) + d(xb, xc)
    assert d(xa, xa) == 0
    # The distance counts exactly the representable values strictly between, plus one.
    if a < c:
        assert d(xa, xc) >= 1
