"""The rules of METRICS.md that turn distances into verdicts (issue 12, item 5), one test each,
in the four dtypes, on hand-made tensors built from their bit patterns:

* a finite value against ±inf is clamped (inf ULP, p bits, counted), except overflow
  rounding (the largest finite value of the reference's sign: 1 ULP, not counted);
* bits never exceed the precision p (53, 24, 11, 8): `bits`, `max_bits`, `mean_bits`;
* exactly 0 against a finite non-zero reference is underflow (its distance as measured);
* NaN against ±inf is counted as NaN; an infinity of the wrong sign as an infinity;
* the reduced value follows the same rules.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losscheck.dtypes import FORMATS
from losscheck.metrics import ErrorStats, bits, bits_of_error, ulp_distance
from test_metrics import exp_field, from_bits, sign_bit, t

DTYPES = list(FORMATS)
P = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}  # written out, not read from the code


def stats(value, ref, threshold=None, name=None) -> dict:
    s = ErrorStats(threshold_bits=P[name] / 2 if threshold is None else threshold)
    s.add(value, ref)
    return s.as_dict()


def largest(name) -> int:
    """Bit pattern of the largest finite value (one below +inf)."""
    return exp_field(name) - 1


# ---- clamped against overflow rounding -------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_finite_against_infinite_reference_is_clamped_with_infinite_distance(name):
    inf = from_bits(exp_field(name), name)
    below_max = from_bits(largest(name) - 1, name)  # one step short of overflow rounding
    for v in (t([100.0], name), t([0.0], name), t([1.0], name), below_max, t([-100.0], name)):
        assert ulp_distance(v, inf).tolist() == [math.inf], (name, float(v))
        assert ulp_distance(-v, -inf).tolist() == [math.inf], (name, float(v))
    value = torch.cat([t([100.0, 0.0, -5.0], name), below_max])
    dct = stats(value, inf.expand(4).contiguous(), name=name)
    assert dct["clamped"] == 4
    assert dct["max_ulp"] == math.inf
    assert dct["max_bits"] == P[name] and dct["mean_bits"] == P[name]
    # Clamped values are finite and far off: silent saturation too (the counter says why).
    assert dct["saturated"] == 4
    assert dct["nan"] == dct["inf"] == dct["underflow"] == 0


@pytest.mark.parametrize("name", DTYPES)
def test_largest_finite_against_infinity_of_its_sign_is_overflow_rounding(name):
    big, inf = from_bits(largest(name), name), from_bits(exp_field(name), name)
    assert float(big) == torch.finfo(FORMATS[name].torch_dtype).max
    assert ulp_distance(big, inf).tolist() == [1.0]
    assert ulp_distance(-big, -inf).tolist() == [1.0]
    dct = stats(torch.cat([big, -big]), torch.cat([inf, -inf]), name=name)
    assert dct["clamped"] == 0 and dct["saturated"] == 0
    assert dct["max_ulp"] == 1 and dct["max_bits"] == 1.0
    # ... but not against the infinity of the other sign: clamped.
    assert ulp_distance(-big, inf).tolist() == [math.inf]
    dct = stats(-big, inf, name=name)
    assert dct["clamped"] == 1 and dct["max_bits"] == P[name]


@pytest.mark.parametrize("name", DTYPES)
def test_infinite_against_finite_reference_is_counted_as_inf_not_clamped(name):
    inf = from_bits(exp_field(name), name)
    big = from_bits(largest(name), name)
    dct = stats(torch.cat([inf, -inf]), torch.cat([big, t([1.0], name)]), name=name)
    assert dct["max_ulp"] == math.inf and dct["max_bits"] == P[name]
    assert (dct["posinf"], dct["neginf"], dct["inf"]) == (1, 1, 2)
    assert dct["clamped"] == 0 and dct["saturated"] == 0


@pytest.mark.parametrize("name", DTYPES)
def test_reduced_value_follows_the_clamped_rule(name):
    inf = from_bits(exp_field(name), name)[0]
    big = from_bits(largest(name), name)[0]
    s = ErrorStats(threshold_bits=4)
    s.set_reduced(t([100.0], name)[0], inf)
    assert s.as_dict()["reduced_ulp"] == math.inf
    s.set_reduced(big, inf)
    assert s.as_dict()["reduced_ulp"] == 1
    s.set_reduced(-big, -inf)
    assert s.as_dict()["reduced_ulp"] == 1


# ---- bits capped at the precision --------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_bits_helper_is_capped_at_the_precision(name):
    p = P[name]
    f = FORMATS[name]
    for spec in (name, f.torch_dtype, f):
        assert bits(0, spec) == 0.0
        assert bits(1, spec) == 1.0
        assert bits(2.0**(p - 1) - 1, spec) == p - 1
        assert bits(2.0**p - 1, spec) == p
        assert bits(2.0**(p + 10), spec) == p
        assert bits(math.inf, spec) == p
    u = torch.tensor([0.0, 3.0, 2.0**60, math.inf], dtype=torch.float64)
    assert bits(u, name).tolist() == [0.0, 2.0, p, p]
    assert bits(u.numpy(), name).tolist() == [0.0, 2.0, p, p]
    assert bits_of_error(u, name).tolist() == [0.0, 2.0, p, p]
    with pytest.raises(ValueError):
        bits(math.nan, name)


@pytest.mark.parametrize("name", DTYPES)
def test_max_bits_and_mean_bits_are_capped_at_the_precision(name):
    p = P[name]
    # 1 against −1: 2·ordinal(1) ULP apart, far more than 2**p (every bit wrong, sign included).
    value = t([1.0, 1.0, 1.0, 1.0], name)
    ref = t([-1.0, 1.0, -1.0, 1.0], name)
    assert float(ulp_distance(value[:1], ref[:1])[0]) > 2.0**p
    dct = stats(value, ref, name=name)
    assert dct["max_bits"] == p
    # Two elements at p (not log2 of their distance, 62 bits in float64), two exact.
    assert dct["mean_bits"] == p / 2


@pytest.mark.parametrize("name", DTYPES)
def test_errors_below_the_precision_are_not_capped(name):
    one = t([1.0], name)
    three_up = (one.view(FORMATS[name].int_dtype) + 3).view(one.dtype)  # 3 ULP: 2 bits
    dct = stats(three_up, one, name=name)
    assert dct["max_ulp"] == 3 and dct["max_bits"] == 2.0 and dct["mean_bits"] == 2.0


# ---- underflow ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_zero_against_a_normal_reference_is_underflow(name):
    zero, negzero = from_bits(0, name), from_bits(sign_bit(name), name)
    tiny = t([torch.finfo(FORMATS[name].torch_dtype).tiny], name)  # smallest normal
    ref = torch.cat([t([1.0], name), tiny, -tiny])
    value = torch.cat([zero, negzero, zero])
    d = ulp_distance(value, ref)
    # Distances as measured: 0 to the smallest normal is 2**(p−1) steps of subnormals.
    assert d.tolist()[1:] == [2.0**(P[name] - 1)] * 2
    dct = stats(value, ref, name=name)
    assert dct["underflow"] == 3
    assert dct["clamped"] == 0 and dct["nan"] == 0 and dct["inf"] == 0


@pytest.mark.parametrize("name", DTYPES)
def test_flush_of_a_subnormal_reference_is_underflow_at_its_few_ulp(name):
    # The smallest subnormal (1 ULP from 0) and the third (3 ULP): few bits, still counted.
    zero, negzero = from_bits(0, name), from_bits(sign_bit(name), name)
    ref = torch.cat([from_bits(1, name), from_bits(3, name), from_bits(sign_bit(name) | 1, name)])
    assert 0 < float(ref[0]) < torch.finfo(FORMATS[name].torch_dtype).tiny
    value = torch.cat([zero, negzero, zero])
    assert ulp_distance(value, ref).tolist() == [1.0, 3.0, 1.0]
    dct = stats(value, ref, name=name)
    assert dct["underflow"] == 3
    assert dct["max_ulp"] == 3 and dct["max_bits"] == 2.0  # the score as measured
    assert dct["saturated"] == 0  # below the threshold: the counter alone carries the verdict


@pytest.mark.parametrize("name", DTYPES)
def test_zero_is_not_underflow_against_zero_infinity_or_nan(name):
    zero, negzero = from_bits(0, name), from_bits(sign_bit(name), name)
    ref = torch.cat([negzero, zero, t([math.inf, math.nan], name)])
    value = torch.cat([zero, negzero, zero, zero])
    dct = stats(value, ref, name=name)
    assert dct["underflow"] == 0
    assert dct["clamped"] == 1  # 0 against +inf is clamped, not underflow
    # And a small non-zero value against a larger reference is not underflow.
    assert stats(from_bits(1, name), t([1.0], name), name=name)["underflow"] == 0


@pytest.mark.parametrize("name", DTYPES)
def test_all_zero_gradient_against_a_non_zero_reference_shows_as_underflow(name):
    ref = t([0.5, -0.25, 1e-3, 0.0, 3.0], name)
    value = torch.zeros(5, dtype=FORMATS[name].torch_dtype)
    measured = ulp_distance(value, ref)
    dct = stats(value, ref, name=name)
    assert dct["underflow"] == 4  # the exact zero is right
    assert dct["max_ulp"] == float(measured.max())
    assert dct["max_bits"] == pytest.approx(min(math.log2(1 + float(measured.max())), P[name]), abs=1e-4)
    expected_mean = sum(min(math.log2(1 + float(u)), P[name]) for u in measured) / 5
    assert dct["mean_bits"] == pytest.approx(expected_mean, abs=1e-4)


# ---- NaN and infinities against infinite references ---------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_nan_against_infinite_reference_is_counted_as_nan(name):
    inf, nan = math.inf, math.nan
    dct = stats(t([nan, nan, nan], name), t([inf, -inf, nan], name), name=name)
    assert dct["nan"] == 2  # not against NaN: both undefined
    assert dct["clamped"] == 0 and dct["inf"] == 0
    assert dct["max_bits"] == P[name]


@pytest.mark.parametrize("name", DTYPES)
def test_infinity_of_the_wrong_sign_is_counted(name):
    inf = math.inf
    dct = stats(t([-inf, inf, inf, -inf], name), t([inf, -inf, inf, -inf], name), name=name)
    assert (dct["posinf"], dct["neginf"]) == (1, 1)  # the two matching infinities are exact
    assert dct["max_ulp"] == math.inf and dct["mean_bits"] == P[name] / 2


# ---- streaming ---------------------------------------------------------------------------------

def test_counters_accumulate_over_chunks(monkeypatch):
    from losscheck import metrics
    monkeypatch.setattr(metrics, "CHUNK", 3)
    name = "float32"
    inf = math.inf
    value = t([100.0, 0.0, math.nan, 1.0, 0.0, 100.0, 2.0], name)
    ref = t([inf, 1.0, inf, 1.0, 1e-30, inf, 2.0], name)
    dct = stats(value, ref, name=name)
    assert (dct["clamped"], dct["underflow"], dct["nan"], dct["n"]) == (2, 2, 1, 7)
    one_at_a_time = ErrorStats(threshold_bits=12)
    for i in range(7):
        one_at_a_time.add(value[i:i + 1], ref[i:i + 1])
    assert one_at_a_time.as_dict() == dct  # the same numbers however it is chunked
    # mean_bits: three elements at p = 24 (two clamped, one NaN), the two flushed ones as
    # measured (0 against 1.0 and 1e-30 are both over 2**24 ULP away: capped), two exact.
    assert ulp_distance(value, ref)[[1, 4]].min() > 2.0**24
    assert dct["mean_bits"] == pytest.approx(5 * 24 / 7, abs=1e-4)
