"""Certification of losscheck.doubledouble, the float64 targets' reference arithmetic.

* Each function against mpmath (300 bits), with hypothesis on tiny, huge, subnormal and
  ±inf/NaN arguments: the double-double is within 1/64 ULP of float64 of the exact value
  (the reference's contract, METRICS.md "Reference"); typical errors are ~2**-98 relative.
* `round_scaled` rounds (hi + lo)·2**k correctly, ties and subnormals included (exact
  arithmetic with fractions).
* The float64 references of every loss: identical, bit for bit, to the x86 long-double path on
  a randomised set where both agree with mpmath (where they differ, mpmath sides with dd), and
  float64 points are audited, not skipped, where long double is not extended precision.
"""
from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from losscheck import doubledouble as D
from losscheck import reference as R
from losscheck.losses import LOSSES
from losscheck.losses.base import reference

mpmath.mp.prec = 300
F = torch.float64
LONGDOUBLE_OK = np.finfo(np.longdouble).nmant >= 63
# Derandomized, as the project's other property tests: CI runs the same examples every time (a
# fresh clone has no example database), and a failure found once is pinned with @example.
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# The low part of a plain (unscaled) double-double cannot resolve below the smallest subnormal:
# for results under 2**-1016, 1/64 ULP of float64 is finer than that, and each operation rounds
# the low part to 2**-1074 (found by hypothesis: logsumexp([0, -706, -706]) = 4.9e-307 is 0.53 of
# 2**-1074 off). Functions whose results may be that small carry a scale (`*_scaled`).
DD_FLOOR = mpmath.mpf(2) ** -1074


def _ulp(v) -> mpmath.mpf:
    """The float64 ULP at the exact value v (2**-1074 in the subnormal range)."""
    if v == 0:
        return mpmath.mpf(2) ** -1074
    e = int(mpmath.floor(mpmath.log(abs(v), 2)))
    return mpmath.mpf(2) ** (max(e, -1022) - 52)


def _value(out) -> mpmath.mpf:
    hi, lo = float(out[0]), float(out[1])
    k = int(out[2]) if len(out) == 3 else 0
    return (mpmath.mpf(hi) + mpmath.mpf(lo)) * mpmath.mpf(2) ** k


def _check(fn, exact, xs, scaled=False):
    """Every finite exact value within 1/64 ULP; exact ±inf/NaN limits as IEEE's."""
    x = torch.tensor(xs, dtype=F)
    out = fn(x) if scaled else fn(D.dd(x))
    problems = []
    for i, xv in enumerate(xs):
        got = tuple(o[i] for o in out)
        want = exact(xv)
        if not isinstance(want, float) and abs(want) >= mpmath.mpf(2) ** 1024 * (1 - mpmath.mpf(2) ** -54):
            want = math.copysign(math.inf, want)  # rounds to ±inf
        if isinstance(want, float):  # a limit: inf, nan
            r = float(D.round_scaled(*(g.reshape(1) for g in got))[0]) if scaled else float(got[0])
            if not ((math.isnan(want) and math.isnan(r)) or r == want):
                problems.append(f"{xv!r}: {r} != {want}")
            continue
        err = abs(_value(got) - want)
        if err > _ulp(want) / 64:
            problems.append(f"{xv!r}: error {mpmath.nstr(err / _ulp(want), 5)} ULP")
    assert not problems, problems[:10]


def _mp(fn, limits):
    """An mpmath oracle with IEEE's limits for ±inf/NaN arguments."""
    def exact(x):
        if math.isnan(x):
            return math.nan
        if math.isinf(x):
            return limits[x > 0]
        return fn(mpmath.mpf(x))
    return exact


FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
ARGS = st.one_of(
    st.floats(-750, 720),  # exp's whole range, its underflow and overflow boundaries
    st.floats(-1, 1),
    st.floats(-1e-12, 1e-12),  # tiny
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, -745.1332191019411,
                     -744.4400719213812, 709.782712893384, 709.7827128933841, -708.3964185322641,
                     math.inf, -math.inf, math.nan]),
)
POSITIVE = st.one_of(
    st.floats(0, 1e308),
    st.floats(0.5, 2.0),  # near 1 (log's cancellation)
    st.floats(5e-324, 1e-300),  # subnormal and tiny
    st.sampled_from([0.0, 5e-324, 1.0, 1 - 2 ** -53, 1 + 2 ** -52, 1.7976931348623157e308, math.inf]),
)


@SETTINGS
@given(st.lists(ARGS, min_size=1, max_size=12))
def test_exp_within_1_64_ulp(xs):
    _check(lambda x: D.exp_scaled(D.dd(x)), _mp(mpmath.exp, {True: math.inf, False: 0.0}), xs, scaled=True)


@SETTINGS
@given(st.lists(ARGS, min_size=1, max_size=12))
def test_expm1_within_1_64_ulp(xs):
    _check(D.expm1, _mp(mpmath.expm1, {True: math.inf, False: -1.0}), xs)


@SETTINGS
@given(st.lists(POSITIVE, min_size=1, max_size=12))
def test_log_within_1_64_ulp(xs):
    _check(D.log, _mp(mpmath.log, {True: math.inf, False: math.nan}),
           xs, scaled=False) if 0.0 not in xs else None
    if 0.0 in xs:
        assert float(D.log(D.dd(torch.zeros(1, dtype=F)))[0]) == -math.inf


@SETTINGS
@given(st.lists(st.one_of(POSITIVE, st.floats(-1, 0), st.floats(-1e-12, 0)), min_size=1, max_size=12))
def test_log1p_within_1_64_ulp(xs):
    xs = [x for x in xs if x != -1.0]
    if xs:
        _check(D.log1p, _mp(mpmath.log1p, {True: math.inf, False: math.nan}), xs)


@SETTINGS
@given(st.lists(ARGS, min_size=1, max_size=12))
def test_softplus_within_1_64_ulp(xs):
    _check(D.softplus_scaled, _mp(lambda z: mpmath.log1p(mpmath.exp(z)), {True: math.inf, False: 0.0}),
           xs, scaled=True)


@SETTINGS
@given(st.lists(ARGS, min_size=1, max_size=12))
def test_sigmoid_within_1_64_ulp(xs):
    _check(D.sigmoid_scaled, _mp(lambda z: 1 / (1 + mpmath.exp(-z)), {True: 1.0, False: 0.0}), xs, scaled=True)


@SETTINGS
@given(st.lists(st.lists(st.one_of(st.floats(-800, 800), st.floats(-1e300, 1e300)), min_size=3, max_size=3),
                min_size=1, max_size=6))
@example([[0.0, -706.0, -706.0]])
def test_logsumexp_within_1_64_ulp(rows):
    x = torch.tensor(rows, dtype=F)
    out = D.logsumexp(x)
    for i, row in enumerate(rows):
        m = max(row)
        rest = list(row)
        rest.remove(m)
        # m + log1p(Σ e^(x_j − m)): log(1 + tiny) at 300 bits would keep too few of tiny's bits
        want = m + mpmath.log1p(mpmath.fsum(mpmath.exp(mpmath.mpf(v) - m) for v in rest))
        assert abs(_value((out[0][i], out[1][i])) - want) <= max(_ulp(want) / 64, DD_FLOOR)


@SETTINGS
@given(st.lists(st.tuples(FINITE, FINITE), min_size=1, max_size=12))
def test_add_mul_div_within_2_pow_minus_100(pairs):
    a = torch.tensor([p[0] for p in pairs], dtype=F)
    b = torch.tensor([p[1] for p in pairs], dtype=F)
    # dd operands with a non-trivial low part: a + a·2**-60 (exactly representable as a dd)
    da, db = D.two_sum(a, a * 2.0 ** -60), D.two_sum(b, -b * 2.0 ** -61)
    for op, mp_op in ((D.add, lambda u, v: u + v), (D.mul, lambda u, v: u * v), (D.div, lambda u, v: u / v)):
        out = op(da, db)
        for i in range(len(pairs)):
            u, v = _value((da[0][i], da[1][i])), _value((db[0][i], db[1][i]))
            if op is D.div and v == 0:
                continue
            if any(0 < abs(w) < mpmath.mpf(2) ** -900 or abs(w) > mpmath.mpf(2) ** 1000 for w in (u, v)):
                continue  # operands whose low part is subnormal are not 106-bit dds
            want = mp_op(u, v)
            if abs(want) > mpmath.mpf(2) ** 1000 or (want != 0 and abs(want) < mpmath.mpf(2) ** -960):
                continue  # outside the range where a dd carries 106 bits (lo would be subnormal)
            if op is D.add and want != 0 and abs(want) < max(abs(u), abs(v)) * mpmath.mpf(2) ** -40:
                continue  # cancellation: the absolute error bound applies, not a relative one
            assert abs(_value((out[0][i], out[1][i])) - want) <= abs(want) * mpmath.mpf(2) ** -100 + \
                mpmath.mpf(2) ** -1074, (op.__name__, pairs[i])


def test_exp_table_is_2_pow_j_over_256_to_2_pow_minus_106():
    """Tang's table (doubledouble._pow2_fractions, from decimal): every entry against mpmath."""
    table = D._pow2_fractions()
    assert len(table) == 1 << D._TABLE_BITS
    half = 1 << (D._TABLE_BITS - 1)
    for j, (hi, lo) in zip(range(-half, half), table, strict=True):
        want = mpmath.mpf(2) ** (mpmath.mpf(j) / (2 * half))
        assert abs(lo) <= math.ulp(hi) / 2
        assert abs(mpmath.mpf(hi) + mpmath.mpf(lo) - want) <= want * mpmath.mpf(2) ** -106, j


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.floats(-740, 705), st.floats(-0.34, 0.34)), st.floats(-1, 1)),
                min_size=1, max_size=12))
def test_exp_and_expm1_within_2_pow_minus_98(args):
    """Far tighter than the 1/64 ULP the reference needs: a wrong table entry or reduction
    constant shows here (dd arguments with a low part, as two_sum(x, −m) gives)."""
    hi = torch.tensor([a for a, _ in args], dtype=F)
    a = D.two_sum(hi, hi * torch.tensor([f for _, f in args], dtype=F) * 2.0 ** -60)
    e, m = D.exp_scaled(a), D.expm1(a)
    for i in range(len(args)):
        x = _value((a[0][i], a[1][i]))
        want = mpmath.exp(x)
        assert abs(_value((e[0][i], e[1][i], e[2][i])) - want) <= want * mpmath.mpf(2) ** -98, args[i]
        want = mpmath.expm1(x)
        if abs(x) < 0.34 and x != 0 and abs(x) > mpmath.mpf(2) ** -900:
            assert abs(_value((m[0][i], m[1][i])) - want) <= abs(want) * mpmath.mpf(2) ** -98, args[i]


@pytest.mark.parametrize("fn", ["expm1", "log1p", "log", "softplus_scaled", "sigmoid_scaled", "exp_scaled"])
def test_formulations_on_their_own_elements_give_the_same_bits(fn, monkeypatch):
    """`_select` computes each of a function's formulations only where it applies (CPU,
    large tensors) or both everywhere: the same bits, mixed and special arguments included."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(3000, dtype=F, generator=g) * s for s in (1e-3, 0.3, 3.0, 300.0)])
    x[:12] = torch.tensor([0.0, -0.0, 5e-324, -1.0, 1.0, 0.25, -0.25, 0.34, math.inf, -math.inf, math.nan, 1e-310])
    if fn in ("log", "log1p"):
        x = x.abs() - (1.0 if fn == "log1p" else 0.0)
    scaled = fn in ("softplus_scaled", "sigmoid_scaled")
    arg = x if scaled else D.dd(x)
    outs = []
    for limit in (1 << 40, 1):
        monkeypatch.setattr(D, "_SELECT_ELEMENTS", limit)
        outs.append(getattr(D, fn)(arg))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_round_scaled_of_normal_results_by_one_product_gives_the_same_bits(monkeypatch):
    """`round_scaled` rounds normal results with one product on large CPU tensors and takes
    the full way for the rest: the same bits as the full way everywhere, with normal,
    subnormal (ties broken by lo either way), underflowing and overflowing results, scales
    beyond ±1022 and special values mixed in one tensor."""
    g = torch.Generator().manual_seed(7)
    n = 6000
    hi = torch.randn(n, dtype=F, generator=g) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).to(F))
    lo = hi * torch.randn(n, dtype=F, generator=g) * 2.0**-54
    k = torch.randint(-1200, 1200, (n,), generator=g)
    # Subnormal ties: (2j + 1)·2**-1075, lo breaking them up, down or not at all.
    j = torch.randint(0, 1 << 40, (300,), generator=g).to(F)
    hi[:300], k[:300] = 2 * j + 1, -1075
    lo[:300] = torch.tensor([2.0**-30, -(2.0**-30), 0.0], dtype=F).repeat(100)
    k[300:400] = torch.randint(-3000, 3000, (100,), generator=g)
    hi[400:410] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0**1023, 5e-324, 1.5], dtype=F)
    lo[400:410] = torch.tensor([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0**969, 0.0, -(2.0**-54)], dtype=F)
    k[400:410] = torch.tensor([5, -5, 3000, -3000, 0, 1023, -1074, 0, 1074, -1075])
    outs = []
    for limit in (1 << 40, 1):
        monkeypatch.setattr(D, "_SELECT_ELEMENTS", limit)
        outs.append(D.round_scaled(hi, lo, k))
    subnormal = (outs[0] != 0) & (outs[0].abs() < 2.0**-1022)
    assert int(subnormal.sum()) > 300 and bool(outs[0].isinf().any()) and bool(((outs[0] == 0) & (hi != 0)).any())
    assert torch.equal(outs[0].view(torch.int64), outs[1].view(torch.int64))


def test_softplus_and_sigmoid_of_z_and_minus_z_share_one_exponential():
    """BCE-with-logits and the soft-target binary losses compute exp(−|z|) (and its log1p)
    once for softplus(±z) and σ(±z): the same bits as each function on its own, special
    arguments and both signs included."""
    g = torch.Generator().manual_seed(6)
    z = torch.cat([torch.randn(2000, dtype=F, generator=g) * s for s in (1e-3, 3.0, 300.0)])
    z[:10] = torch.tensor([0.0, -0.0, 5e-324, -700.0, 700.0, -760.0, 760.0, math.inf, -math.inf, math.nan])
    e = D.exp_neg_abs(z)
    l1 = D.log1p_scaled(e)
    for arg in (z, -z):
        for shared, alone in ((D.softplus_scaled(arg, e, l1), D.softplus_scaled(arg)),
                              (D.sigmoid_scaled(arg, e), D.sigmoid_scaled(arg))):
            for a, b in zip(shared, alone, strict=True):
                assert torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_two_prod_of_operands_beyond_the_split_range_is_exact():
    a = torch.tensor([1.7976931348623157e308, 1.7976931214684583e308, 3.0], dtype=F)
    b = torch.tensor([0.5, 1.0, 1e300], dtype=F)
    p, e = D.two_prod(a, b)
    for i in range(3):
        assert Fraction(float(p[i])) + Fraction(float(e[i])) == Fraction(float(a[i])) * Fraction(float(b[i]))


# ---- round_scaled: correct rounding, ties and subnormals ----------------------------------------

def _rounded(hi: float, lo: float, k: int) -> float:
    """(hi + lo)·2**k correctly rounded (CPython's int/int division rounds correctly)."""
    v = (Fraction(hi) + Fraction(lo)) * Fraction(2) ** k
    try:
        return v.numerator / v.denominator
    except OverflowError:
        return math.inf if v > 0 else -math.inf


@SETTINGS
@given(st.lists(st.tuples(st.floats(0.5, 2.0), st.sampled_from([-1, 1]), st.sampled_from([0, 1, -1]),
                          st.integers(-1130, 1030)), min_size=1, max_size=20))
def test_round_scaled_ties_and_subnormals(cases):
    # hi + lo exactly at the midpoint between two subnormals (or two floats), or a hair to
    # either side of it: lo decides, and round_scaled must see it.
    his, los, ks, want = [], [], [], []
    for hi, sign, nudge, k in cases:
        if k < -1022:
            grid = 2.0 ** (-1074 - k)  # the subnormal spacing at hi's scale
            hi = math.floor(hi / grid) * grid + grid / 2  # exactly a tie after scaling
            hi = hi if hi > 0 else grid / 2
        lo = sign * math.ulp(hi) * 2.0 ** -20 * abs(nudge)
        his.append(hi)
        los.append(lo)
        ks.append(k)
        want.append(_rounded(hi, lo, k))
    got = D.round_scaled(torch.tensor(his, dtype=F), torch.tensor(los, dtype=F), torch.tensor(ks))
    assert got.tolist() == want


def test_round_scaled_limits():
    hi = torch.tensor([math.inf, -math.inf, math.nan, 0.0, 1.0], dtype=F)
    got = D.round_scaled(hi, torch.zeros_like(hi), torch.tensor([0, 0, 0, -5000, 1024]))
    assert got[0] == math.inf and got[1] == -math.inf and got[2].isnan() and got[3] == 0 and got[4] == math.inf


# ---- the losses' float64 references -------------------------------------------------------------

def _both(loss, x, t, opts, reduction, monkeypatch):
    monkeypatch.setattr(R, "FLOAT64_PATH", "extended")
    old = reference(loss, x, t, opts, reduction)
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    new = reference(loss, x, t, opts, reduction)
    return old, new


def _bits_equal(a, b):
    return bool(((a.view(torch.int64) == b.view(torch.int64)) | (a.isnan() & b.isnan())).all())


def _differences(a, b):
    return (~((a.view(torch.int64) == b.view(torch.int64)) | (a.isnan() & b.isnan()))).nonzero().tolist()


@pytest.mark.skipif(not LONGDOUBLE_OK, reason="needs x86 long double to compare with")
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 800.0, 1e300])
def test_dd_matches_long_double_or_mpmath_binary(scale, monkeypatch):
    # Same float64 reference as the long-double path, bit for bit — except where the long
    # double path double-rounds (11 extra bits: about 1 element in 2**10 near a tie), where
    # mpmath must side with dd.
    g = torch.Generator().manual_seed(7)
    n = 600
    x = torch.randn(n, dtype=F, generator=g) * scale
    y = (torch.rand(n, generator=g) > 0.5).to(F)
    w = torch.rand(n, dtype=F, generator=g)
    checked = 0
    for name, inp in (("bce_with_logits", x), ("bce", torch.sigmoid(x))):
        for opts in ({}, {"weight": w}, {"pos_weight": torch.tensor([3.7], dtype=F)}):
            old, new = _both(LOSSES[name], inp, y, opts, "none", monkeypatch)
            for which, (a, b) in enumerate(((old.loss, new.loss), (old.grad, new.grad))):
                for (i,) in _differences(a, b):
                    xv = mpmath.mpf(inp[i].item())
                    f = mpmath.mpf(w[i].item() if "weight" in opts else 1) * (3.7 if "pos_weight" in opts and y[i] else 1)
                    if name == "bce":
                        exact = (-mpmath.log(xv), -1 / xv) if y[i] else (-mpmath.log1p(-xv), 1 / (1 - xv))
                    else:
                        z = -xv if y[i] else xv
                        s = 1 / (1 + mpmath.exp(-z))
                        exact = (mpmath.log1p(mpmath.exp(z)), -s if y[i] else s)
                    assert float(b[i]) == float(exact[which] * f), (name, opts, inp[i].item(), float(a[i]), float(b[i]))
                    checked += 1
    assert checked < 12 * n * 5 // 100  # differences are rare (of 12·n values)


@pytest.mark.parametrize("loss_name", ["cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dd_reference_does_not_depend_on_the_chunk_size(loss_name, reduction, monkeypatch):
    """The dd path's chunks (`HOST_DD_CHUNK_ELEMENTS` on the CPU) hold whole rows: elements,
    gradient and reduced value are the same bits for chunks of a few rows or of the whole
    input (exp's vector kernels and scalar tails, and `_select`'s subsets, meet other
    elements then), and of rows that do not divide the chunk."""
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    g = torch.Generator().manual_seed(9)
    shape = (300, 97) if loss_name == "cross_entropy" else (29_100,)
    x = torch.randn(shape, dtype=F, generator=g) * torch.tensor([1.0, 30.0, 800.0], dtype=F).repeat(10_000)[
        : math.prod(shape)
    ].reshape(shape)
    x.view(-1)[1000:1004] = torch.tensor([1.7e308, -1.7e308, math.inf, 5e-324], dtype=F)  # one chunk's `_shift`
    t = torch.randint(0, 97, (300,), generator=g) if loss_name == "cross_entropy" else (torch.rand(shape, generator=g) > 0.5).to(F)
    outs = []
    for chunk in (1 << 20, 5_000, 1_000):
        monkeypatch.setattr(R, "HOST_DD_CHUNK_ELEMENTS", chunk)
        outs.append(reference(LOSSES[loss_name], x, t, {}, reduction))
    for other in outs[1:]:
        for a, b in ((outs[0].loss, other.loss), (outs[0].grad, other.grad), (outs[0].reduced, other.reduced)):
            assert torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("rows", [64, 48])
def test_dd_mean_is_the_sum_divided(loss_name, rows, monkeypatch):
    """The dd path's mean: over a power-of-two count (64 rows, 2048 elements) its gradient
    moves the scale (no division), else (48, 1536) it divides in dd. Either way it is the
    sum's gradient over the count: bit for bit where dividing the float64 gradient by a power
    of two is exact (no subnormal entry here), within 1 ULP otherwise."""
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    g = torch.Generator().manual_seed(3)
    multiclass = loss_name == "cross_entropy"
    x = torch.randn((rows, 30) if multiclass else (rows * 32,), dtype=F, generator=g) * 20
    t = torch.randint(0, 30, (rows,), generator=g) if multiclass else (torch.rand(rows * 32, generator=g) > 0.5).to(F)
    loss = LOSSES[loss_name]
    mean, total = reference(loss, x, t, {}, "mean"), reference(loss, x, t, {}, "sum")
    count = rows if multiclass else rows * 32
    if count & (count - 1) == 0:
        assert torch.equal(mean.grad, total.grad / count)
    else:
        ulp = torch.finfo(F).eps * mean.grad.abs()
        assert bool(((mean.grad - total.grad / count).abs() <= ulp).all())
    assert mean.value == pytest.approx(total.value / count, rel=1e-15)


@pytest.mark.skipif(not LONGDOUBLE_OK, reason="needs x86 long double to compare with")
@pytest.mark.parametrize("scale", [1.0, 10.0, 800.0])
def test_dd_matches_long_double_cross_entropy(scale, monkeypatch):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, 30, dtype=F, generator=g) * scale
    x[0, 3], x[1, :] = -math.inf, -math.inf  # masked logit, a row of −inf (undefined)
    x[2, 5] = math.inf
    t = torch.randint(0, 30, (200,), generator=g)
    w = torch.rand(30, dtype=F, generator=g)
    same = total = 0
    for opts in ({}, {"weight": w}, {"ignore_index": 4}, {"label_smoothing": 0.1}):
        for reduction in ("none", "sum", "mean"):
            old, new = _both(LOSSES["cross_entropy"], x, t, opts, reduction, monkeypatch)
            for a, b in ((old.loss, new.loss), (old.grad, new.grad)):
                total += a.numel()
                same += a.numel() - len(_differences(a, b))
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
                # Any difference is one ULP (a long-double double rounding near a tie).
                diff = (a - b).abs()
                fin = a.isfinite()
                assert bool((diff[fin] <= torch.finfo(F).eps * a[fin].abs()).all())
            if reduction != "none" and not old.reduced.isnan():
                assert float((old.reduced - new.reduced).abs()) <= torch.finfo(F).eps * float(old.reduced.abs())
    assert same >= total * 0.99


def test_float64_is_audited_where_long_double_is_not_extended(monkeypatch):
    # aarch64 / Apple silicon: numpy long double is float64. Disabling the extended path must
    # leave float64 points audited through double-double, with the same references.
    monkeypatch.setattr(R, "FLOAT64_PATH", "extended")
    monkeypatch.setattr(R, "_LONGDOUBLE_OK", False)
    assert R.path(torch.float64) == "dd"
    loss = LOSSES["cross_entropy"]
    x = torch.randn(64, 10, dtype=F, generator=torch.Generator().manual_seed(3)) * 5
    t = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(4))
    ref = reference(loss, x, t, {}, "mean")
    xg = x.clone().requires_grad_(True)
    out = loss.implementations["torch"].fn(xg, t, "mean")
    out.backward()
    out = out.detach()
    assert abs(float(out) - float(ref.reduced)) <= 4 * torch.finfo(F).eps * abs(float(ref.reduced))
    assert torch.allclose(xg.grad, ref.grad, rtol=1e-13, atol=1e-300)
    if LONGDOUBLE_OK:
        monkeypatch.setattr(R, "_LONGDOUBLE_OK", True)
        old = reference(loss, x, t, {}, "mean")
        assert _bits_equal(old.reduced, ref.reduced) and _bits_equal(old.loss, ref.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the dd path's device run is untested")
def test_float64_reference_on_cuda_equals_cpu():
    # Device-agnostic: the same double-double evaluation on the GPU gives the same bits.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 40, dtype=F, generator=g) * 20
    t = torch.randint(0, 40, (256,), generator=g)
    for name, inp, tgt in (("cross_entropy", x, t), ("bce_with_logits", x[:, 0] * 40, (t > 20).to(F))):
        cpu = reference(LOSSES[name], inp, tgt, {}, "mean")
        gpu = reference(LOSSES[name], inp.cuda(), tgt.cuda(), {}, "mean")
        assert gpu.grad.device.type == "cuda"
        assert _bits_equal(cpu.grad, gpu.grad.cpu()) and _bits_equal(cpu.reduced, gpu.reduced.cpu())


# ---- per loss, the double-double float64 reference against mpmath ---------------------------------
# test_reference.py's float64 certification (every element, its rounding, mean and sum against
# mpmath), run with the double-double path forced. (Its raw-value checks read the long-double
# formulation, hence the skip where there is none; the functions above are certified everywhere.)

import test_reference as TR  # tests/ is on sys.path (as for test_options)


@pytest.mark.skipif(not LONGDOUBLE_OK, reason="test_reference's certify also reads the long-double formulation")
@pytest.mark.parametrize("loss_name,case", list(TR._cases()))
def test_dd_reference_matches_mpmath(loss_name, case, monkeypatch):
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    TR.test_reference_matches_mpmath(loss_name, case, "float64")


@pytest.mark.skipif(not LONGDOUBLE_OK, reason="test_reference's certify also reads the long-double formulation")
@pytest.mark.parametrize("test", ["test_cross_entropy_reference_random", "test_cross_entropy_reference_random_with_infinities",
                                  "test_bce_with_logits_reference_random", "test_bce_reference_random"])
def test_dd_reference_random_matches_mpmath(test, monkeypatch):
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    getattr(TR, test)("float64", 64)
