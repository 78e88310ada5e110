"""Double-double arithmetic on torch float64 tensors: the float64 targets' reference
(METRICS.md, "Reference") without x86 `long double`, on any device.

A double-double (dd) is a pair of float64 tensors (hi, lo) whose unevaluated sum is the value,
with |lo| <= ulp(hi)/2 (hi is the value rounded to float64): about 106 significand bits.
Everything is elementwise and vectorised (torch operations on whole tensors, no reads of a
value on the host). Each torch operation is a separate kernel, so nothing is contracted into
a fused multiply-add behind our back: the error-free transformations below rely on that.

Values that may be far below float64's normal range (exp of −700 and less: subnormal results)
are carried *scaled*: (hi, lo, k) stands for (hi + lo)·2**k, with hi + lo of moderate size,
and `round_scaled` rounds that to float64 correctly, subnormals included.

Accuracy (tests/test_doubledouble.py, against mpmath): relative errors of about 2**-100 for
exp/expm1/log/log1p/softplus/sigmoid, far below the 1/64 ULP of float64 (2**-59) that the
reference needs. inf and NaN propagate as IEEE does; ±inf arguments give the functions' limits.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

F64 = torch.float64
_SPLITTER = 134217729.0  # 2**27 + 1 (Veltkamp)
# a·SPLITTER overflows beyond this: such operands are split scaled down by 2**-28 (exact).
_SPLIT_MAX = 2.0**995
# ln 2 in three float64 parts (mpmath, 300 bits): n·ln2/256 for |n| < 2**20 to ~2**-150.
_LN2 = (0.6931471805599453, 2.3190468138462996e-17, 5.707708438416212e-34)
# Taylor coefficients 1/n! of expm1 as dd (exact fractions rounded twice).
_INV_FACT = []
for _n in range(2, 12):
    _f = Fraction(1, math.factorial(_n))
    _h = float(_f)
    _INV_FACT.append((_h, float(_f - Fraction(_h))))
# exp's argument is reduced to r = a − (k + j/2**_TABLE_BITS)·ln2, |r| <= ~ln2/2**(_TABLE_BITS + 1)
# = 0.0014 (Tang's method: 2**(j/2**_TABLE_BITS) from a table, `_table`); the Taylor series of
# expm1(r) to degree _DEGREE then has a truncation error below 2**-110 relative.
_TABLE_BITS = 8
_DEGREE = 9
# Arguments are clamped here (exp underflows to 0 / overflows to inf far inside).
_EXP_CLAMP = 2000.0


# ---- error-free transformations -----------------------------------------------------------------


def two_sum(a, b):
    """a + b = s + e exactly (Knuth), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a, b):
    """a + b = s + e exactly, for |a| >= |b| (or a = 0) (Dekker)."""
    s = a + b
    return s, b - (s - a)


def split(a):
    """a = hi + lo with hi, lo of 26 significand bits each (Veltkamp), for |a| <= _SPLIT_MAX
    (a tensor, or a Python float: the same operations)."""
    t = a * _SPLITTER
    hi = t - (t - a)
    return hi, a - hi


def _product_error(p, a, b):
    """a·b − p exactly, for p = a·b rounded, from the operands' splits (Dekker): while neither
    split overflows and the error does not underflow."""
    ah, al = a
    bh, bl = b
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def two_prod(a, b):
    """a·b = p + e exactly (Dekker), while p is finite and e does not underflow. Operands
    beyond _SPLIT_MAX (whose split would overflow, or round up to inf), and products near
    overflow, are scaled by 2**-28 for the error term, which is then scaled back (exact)."""
    p = a * b
    # Near overflow, ah·bh may round above the largest float: scale a down too.
    sa = torch.where((a.abs() > _SPLIT_MAX) | (p.abs() > 2.0**1000), 2.0**-28, 1.0)
    sb = torch.where(b.abs() > _SPLIT_MAX, 2.0**-28, 1.0)
    a2, b2 = a * sa, b * sb
    p2 = a2 * b2
    return p, _product_error(p2, split(a2), split(b2)) / (sa * sb)


def _two_prod_by(a, c: float):
    """`two_prod(a, c)` for a number c and operands with |a|, |c| <= _SPLIT_MAX and products
    below 2**1000 (no scaling): the same operations on c's split, made once in Python."""
    p = a * c
    return p, _product_error(p, split(a), split(c))


def _clean(hi, lo):
    """lo = 0 where hi is ±inf or NaN (the error terms there are NaN, meaningless)."""
    return hi, torch.where(hi.isfinite(), lo, 0.0)


def _ieee(plain, hi, lo):
    """(hi, lo), or IEEE's result of the leading parts (`plain`, lo = 0) where that is ±inf or
    NaN: the error terms of inf operands are NaN and must not leak into hi."""
    ok = plain.isfinite() & hi.isfinite()
    # An exact zero keeps IEEE's sign (−0·w is −0, as in the long-double path): fast_two_sum
    # would turn it into +0.
    keep = plain.isfinite() & ((hi != 0) | (plain != 0))
    return torch.where(keep, hi, plain), torch.where(ok, lo, 0.0)


# ---- dd arithmetic --------------------------------------------------------------------------------


def dd(x, lo=None):
    """A float64 tensor (or number, on `lo`'s device) as a dd."""
    x = torch.as_tensor(x, dtype=F64)
    return x, torch.zeros_like(x) if lo is None else lo


def add(a, b):
    """dd + dd (the accurate addition: ~2**-106 relative)."""
    s, e = two_sum(a[0], b[0])
    t, f = two_sum(a[1], b[1])
    s, e = fast_two_sum(s, e + t)
    return _ieee(a[0] + b[0], *fast_two_sum(s, e + f))


def _add(a, b):
    """`add` without the inf/NaN handling (finite operands: the inner loops of exp, whose
    arguments are reduced; torch.where and isfinite cost more than the arithmetic)."""
    s, e = two_sum(a[0], b[0])
    t, f = two_sum(a[1], b[1])
    s, e = fast_two_sum(s, e + t)
    return fast_two_sum(s, e + f)


def _mul(a, b):
    """`mul` for finite operands of moderate size (no inf/NaN handling, no split scaling)."""
    p = a[0] * b[0]
    e = _product_error(p, split(a[0]), split(b[0]))
    return fast_two_sum(p, e + (a[0] * b[1] + a[1] * b[0]))


def neg(a):
    return -a[0], -a[1]


def sub(a, b):
    return add(a, neg(b))


def mul(a, b):
    """dd · dd (~2**-105 relative)."""
    p, e = two_prod(a[0], b[0])
    e = e + (a[0] * b[1] + a[1] * b[0])
    return _ieee(p, *fast_two_sum(p, e))


def mul_d(a, b):
    """dd · float64."""
    p, e = two_prod(a[0], b)
    return _ieee(p, *fast_two_sum(p, e + a[1] * b))


def div(a, b):
    """dd / dd: three quotient digits with exact remainders (~2**-104 relative); b = 0 or
    ±inf give IEEE's answer for the leading parts."""
    # A dividend near overflow is divided scaled by 2**-2 (exact): q1·b may round above it.
    big = a[0].abs() > 2.0**1000
    a = (torch.where(big, a[0] * 0.25, a[0]), torch.where(big, a[1] * 0.25, a[1]))
    q1 = a[0] / b[0]
    r = sub(a, mul_d(b, q1))
    q2 = r[0] / b[0]
    r = sub(r, mul_d(b, q2))
    q3 = r[0] / b[0]
    q = add(fast_two_sum(q1, q2), dd(q3))
    ok = q1.isfinite() & b[0].isfinite() & (b[0] != 0) & (q[0] != 0)  # a zero quotient: IEEE's sign
    hi, lo = torch.where(ok, q[0], q1), torch.where(ok, q[1], 0.0)
    return torch.where(big, hi * 4.0, hi), torch.where(big & (hi * 4.0).isfinite(), lo * 4.0, torch.where(big, 0.0, lo))


def _pow2(k):
    """2.0**k, exactly, for integer tensors k in [−1022, 1023]."""
    return ((k.to(torch.int64) + 1023) << 52).view(F64)


def ldexp(x, k):
    """x·2**k for a float64 tensor and an integer tensor (in two exact steps unless the
    result is subnormal: one rounding there)."""
    k = k.to(torch.int64)
    k1 = k.clamp(-1022, 1023)
    k2 = (k - k1).clamp(-1022, 1023)
    return x * _pow2(k1) * _pow2(k2)


def ldexp_dd(a, k):
    return ldexp(a[0], k), ldexp(a[1], k)


def round_scaled(hi, lo, k=None):
    """The float64 nearest (ties to even) to (hi + lo)·2**k: the correct rounding of a
    (scaled) dd, subnormal and overflowing results included; ±inf and NaN pass through.

    Normal results: hi·2**k exactly (hi is hi + lo rounded). Subnormal ones: hi·2**k rounds
    once more, and lo decides where hi lay exactly halfway between two subnormals."""
    signed_zero = torch.where((hi == 0) & (lo == 0), hi, torch.nan)  # ±0 keeps its sign
    hi, lo = _clean(*fast_two_sum(*_clean(hi, lo)))
    if k is None:
        k = torch.zeros_like(hi, dtype=torch.int64)
    if hi.device.type == "cpu" and hi.numel() >= _SELECT_ELEMENTS:
        # Most results are normal. For those (and those that overflow) the full way's one
        # rounding is that of hi·2**k, which one product makes where |k| <= 1022: the same
        # bits, without its dozens of passes (lo matters at subnormal ties only). Subnormal
        # and zero results of a nonzero hi, and larger scales, take the full way. Picking
        # them reads the host (`any`): large CPU tensors only; elsewhere all take the full way.
        k = k.to(torch.int64)
        h = hi * _pow2(k.clamp(-1022, 1023))
        full = (k.abs() > 1022) | ((h.abs() < 2.0**-1022) & (hi != 0) & hi.isfinite())
        if bool(full.any()):
            h[full] = _round_normalised(hi[full], lo[full], k[full])
    else:
        h = _round_normalised(hi, lo, k)
    return torch.where(signed_zero.isnan(), h, signed_zero)


def _round_normalised(hi, lo, k):
    """`round_scaled` of a normalised dd (hi = hi + lo rounded, lo = 0 at ±inf and NaN)."""
    # Normalise hi to [1/2, 1) (frexp: exact), so that every scaling below is exact but the last.
    m, e = torch.frexp(hi)
    e = torch.where(hi.isfinite() & (hi != 0), e.to(torch.int64), 0)
    lo = ldexp(lo, -e)
    kk = k.to(torch.int64) + e
    kk = kk.clamp(-2100, 2100)
    k1 = kk.clamp(-1021, 1000)
    y = ldexp(m, k1)  # exact: normal
    k2 = kk - k1
    h = ldexp(y, k2)  # the one rounding (subnormal, or overflow to inf)
    # Subnormal ties: d = m − (h as seen at m's scale), exact; a tie is |d| = half the
    # subnormal spacing at that scale, 2**(−1075 − kk).
    back = ldexp(ldexp(h, -k2), -k1)
    d = m - back
    half = ldexp(torch.ones_like(m), (-1075 - kk).clamp(-1022, 1023))
    tie = (kk < -1021) & (d.abs() == half) & (lo * d > 0)
    return torch.where(tie, h + torch.sign(d) * 2.0**-1074, h)


def to_float64(a):
    """A dd rounded to float64 (correctly, subnormals included)."""
    return round_scaled(a[0], a[1])


# ---- elementary functions ------------------------------------------------------------------------


def _pow2_fractions() -> list[tuple[float, float]]:
    """2**(j/2**_TABLE_BITS) for j in [−2**(_TABLE_BITS−1), 2**(_TABLE_BITS−1)) as dds (hi, lo):
    from decimal's correctly rounded exp at 60 digits (2**-199), each part then rounded once
    (exact fractions): within 2**-106 relative of the true power."""
    from decimal import Decimal, localcontext

    half = 1 << (_TABLE_BITS - 1)
    out = []
    with localcontext() as ctx:
        ctx.prec = 60
        ln2 = Decimal(2).ln()
        for j in range(-half, half):
            exact = Fraction((Decimal(j) / (2 * half) * ln2).exp())
            hi = float(exact)
            out.append((hi, float(exact - Fraction(hi))))
    return out


_TABLES: dict = {}  # device -> (hi, lo) of `_pow2_fractions` as float64 tensors


def _table(j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2**(j/2**_TABLE_BITS) as a dd, for integer tensors j in [−2**(_TABLE_BITS−1), 2**(_TABLE_BITS−1))."""
    if j.device not in _TABLES:
        values = torch.tensor(_pow2_fractions(), dtype=F64)
        _TABLES[j.device] = (values[:, 0].contiguous().to(j.device), values[:, 1].contiguous().to(j.device))
    hi, lo = _TABLES[j.device]
    idx = (j + (1 << (_TABLE_BITS - 1))).reshape(-1)
    return hi[idx].reshape(j.shape), lo[idx].reshape(j.shape)


def _expm1_taylor(x):
    """expm1(x) as dd for |x| <= ~0.0014 (a reduced argument): Taylor to degree _DEGREE."""
    # Terms of degree >= 5 are below 2**-54 relative: their sum in float64 is exact enough
    # (2**-107); the leading ones in dd.
    tail = torch.full_like(x[0], _INV_FACT[_DEGREE - 2][0])
    for n in range(_DEGREE - 1, 4, -1):
        tail = tail * x[0] + _INV_FACT[n - 2][0]
    s = dd(tail, torch.zeros_like(tail))
    for n in range(4, 1, -1):
        s = _add(_mul(s, x), (torch.full_like(x[0], _INV_FACT[n - 2][0]), torch.full_like(x[0], _INV_FACT[n - 2][1])))
    return _mul(_add(_mul(s, x), dd(torch.ones_like(x[0]))), x)


def _reduce(a):
    """a = (k + j/2**_TABLE_BITS)·ln2 + r with |r| <= ~ln2/2**(_TABLE_BITS + 1): r as dd, k and
    j (in [−2**(_TABLE_BITS−1), 2**(_TABLE_BITS−1))) as int64; NaN arguments give k = j = 0."""
    hi = a[0].clamp(-_EXP_CLAMP, _EXP_CLAMP)
    lo = torch.where(hi == a[0], a[1], 0.0)
    steps = 1 << _TABLE_BITS
    n = torch.round(hi * (steps / _LN2[0]))
    n = torch.where(hi.isnan(), 0.0, n)
    # n·ln2/steps in three parts: each ln2 part divided by a power of two exactly.
    # |n| <= 2000·2**8/ln2 < 2**20: `_two_prod_by` applies.
    p, e = _two_prod_by(n, _LN2[0] / steps)
    r = _add((hi - p, lo), (-e, -n * (_LN2[2] / steps)))  # hi − p: exact (Sterbenz)
    r = _add(r, neg(_two_prod_by(n, _LN2[1] / steps)))
    ni = n.to(torch.int64)
    j = ((ni + steps // 2) & (steps - 1)) - steps // 2
    return r, (ni - j) >> _TABLE_BITS, j


def exp_scaled(a):
    """exp(a) of a dd as (hi, lo, k): (hi + lo)·2**k, hi + lo in [0.7, 1.42]; exact limits
    (+inf → inf, −inf → 0 through the scale), NaN → NaN. Round with `round_scaled`.

    Tang's method: exp(a) = 2**k·T·(1 + expm1(r)) with T = 2**(j/2**_TABLE_BITS) from a table,
    T + T·expm1(r) in dd (~2**-104 relative)."""
    r, k, j = _reduce(a)
    t = _table(j)
    hi, lo = _add(t, _mul(t, _expm1_taylor(r)))
    inf = a[0] == math.inf
    return hi.masked_fill(inf, math.inf), lo.masked_fill(inf, 0.0), k


def exp(a):
    """exp(a) as a dd (values below ~2**-969 lose low bits: use `exp_scaled` to round them)."""
    hi, lo, k = exp_scaled(a)
    return ldexp(hi, k), ldexp(lo, k)


def expm1(a):
    """expm1(a) of a dd."""
    return _select(a[0].abs() < 0.34, _expm1_small, _expm1_big, a)


def _expm1_small(a):
    # Below 2**-900, expm1(a) = a·(1 + a/2 + …) is a to 2**-900 (and its Taylor terms would
    # lose bits as subnormals).
    tiny = a[0].abs() < 2.0**-900
    r, _, j = _reduce((torch.where(tiny, 0.0, a[0]), torch.where(tiny, 0.0, a[1])))
    # |a| < 0.34: k = 0, and expm1(a) = (T − 1) + T·expm1(r), T − 1 exact (Sterbenz: T in
    # [0.7, 1.42]). The two terms cancel by a factor of 2 at most (|T − 1| is about twice
    # |T·expm1(r)| or more), but at j = 0, where T − 1 = 0 and the sum is expm1(r) itself.
    t = _table(j)
    s = _add(fast_two_sum(t[0] - 1.0, t[1]), _mul(t, _expm1_taylor(r)))
    return torch.where(tiny, a[0], s[0]), torch.where(tiny, a[1], s[1])


def _expm1_big(a):
    return add(exp(a), dd(torch.full_like(a[0], -1.0)))


# Functions with two formulations by argument range compute each only on its own elements
# (`_select`) on the CPU, in tensors of at least this many values: there every formulation
# is dozens of passes over memory, and a gather and a scatter cost two. On accelerators (and
# small tensors) both run everywhere and torch.where picks: no host read, no index kernels.
_SELECT_ELEMENTS = 1 << 12


def _select(cond, when_true, when_false, a):
    """when_true(a) where `cond`, when_false(a) elsewhere, for elementwise functions of a dd
    (each element's result depends on that element alone: the same bits either way)."""
    if cond.device.type != "cpu" or cond.numel() < _SELECT_ELEMENTS:
        t, f = when_true(a), when_false(a)
        return torch.where(cond, t[0], f[0]), torch.where(cond, t[1], f[1])
    flat = cond.reshape(-1)
    count = int(flat.sum())
    if count == flat.numel():
        return when_true(a)
    if count == 0:
        return when_false(a)
    parts = [
        (idx, fn((a[0].reshape(-1)[idx], a[1].reshape(-1)[idx])))
        for idx, fn in ((flat.nonzero().squeeze(1), when_true), ((~flat).nonzero().squeeze(1), when_false))
    ]
    out = []
    for k in range(2):
        o = torch.empty(flat.numel(), dtype=F64, device=cond.device)
        for idx, got in parts:
            o[idx] = got[k]
        out.append(o.reshape(cond.shape))
    return out[0], out[1]


def _log_newton(a):
    """log(a) for a dd a > 0 away from 1: y0 = log(hi), y = y0 + a·exp(−y0) − 1 (Newton:
    the error squares to ~2**-104·|y|). Arguments beyond 2**±900 are scaled by a power
    of two first (log(a) = log(a·2**−e) + e·ln2: no cancellation there)."""
    _, e = torch.frexp(a[0])
    far = (a[0] > 2.0**900) | (a[0] < 2.0**-900)
    e = torch.where(far & a[0].isfinite() & (a[0] > 0), e.to(torch.int64), 0)
    x = ldexp_dd(a, -e)
    y0 = torch.log(x[0])
    y0f = torch.where(y0.isfinite(), y0, 0.0)
    corr = add(mul(x, exp(dd(-y0f))), dd(torch.full_like(y0, -1.0)))
    y = add(dd(y0f), corr)
    ef = e.to(F64)
    y = add(y, add(two_prod(ef, torch.full_like(ef, _LN2[0])), two_prod(ef, torch.full_like(ef, _LN2[1]))))
    ok = y0.isfinite()
    return torch.where(ok, y[0], y0), torch.where(ok, y[1], 0.0)


def log1p(u):
    """log1p(u) of a dd u >= −1 (−1 → −inf, below → NaN, +inf → inf)."""
    return _select(u[0].abs() < 0.25, _log1p_small, _log1p_far, u)


def _log1p_small(u):
    y0 = torch.log1p(u[0])
    # y = y0 + (u − expm1(y0))·exp(−y0), exp(−y0) = 1/(1 + u) to float64 accuracy is enough:
    # the correction is itself ~2**-53·|u|.
    c = sub(u, expm1(dd(y0)))
    near = add(dd(y0), mul_d(c, 1.0 / (1.0 + u[0])))
    # Below 2**-900, log1p(u) = u·(1 − u/2 + …) is u to 2**-900.
    tiny = u[0].abs() < 2.0**-900
    return torch.where(tiny, u[0], near[0]), torch.where(tiny, u[1], near[1])


def _log1p_far(u):
    return _log_newton(add(dd(torch.ones_like(u[0])), u))


def log(a):
    """log(a) of a dd a >= 0 (0 → −inf, negative → NaN, +inf → inf)."""
    # Near 1, log(a) = log1p(a − 1) with a − 1 exact: log(a) is small there and a·exp(−y0) − 1
    # would leave an absolute, not a relative, error.
    return _select((a[0] > 0.75) & (a[0] < 1.5), _log_near_one, _log_newton, a)


def _log_near_one(a):
    return log1p(add(a, dd(torch.full_like(a[0], -1.0))))


def exp_neg_abs(z):
    """exp(−|z|) of float64 z, scaled (`exp_scaled`): what softplus and sigmoid of z, and of
    −z, are made of; callers that need several of the four compute it once and pass it."""
    return exp_scaled(dd(-z.abs()))


def log1p_scaled(e):
    """log1p of a scaled dd e (`exp_neg_abs`'s), for `softplus_scaled`."""
    return log1p((ldexp(e[0], e[2]), ldexp(e[1], e[2])))


def softplus_scaled(z, e=None, l1=None):
    """log(1 + exp(z)) of float64 z as (hi, lo, k) (see `exp_scaled`), with
    e = exp(−|z|): max(z, 0) + log1p(e); for z < −650 the value is e itself to 2**-937
    (log1p(e) = e − e²/2 + …), carried scaled so that subnormal results round correctly.
    `e` and `l1` (`exp_neg_abs(z)`, `log1p_scaled(e)`), where given, are not computed again:
    the same for z and −z."""
    eh, el, ek = e = exp_neg_abs(z) if e is None else e
    l1 = log1p_scaled(e) if l1 is None else l1
    pos = add(dd(torch.clamp(z, min=0.0)), l1)
    tiny = z < -650
    hi = torch.where(tiny, eh, pos[0])
    lo = torch.where(tiny, el, pos[1])
    k = torch.where(tiny, ek, 0)
    hi = torch.where(z == math.inf, math.inf, torch.where(z == -math.inf, 0.0, hi))
    return hi, torch.where(z.isfinite(), lo, 0.0), torch.where(z.isfinite(), k, 0)


def sigmoid_scaled(z, e=None):
    """1/(1 + exp(−z)) of float64 z as (hi, lo, k): 1/(1 + e) for z >= 0, e/(1 + e) below,
    e = exp(−|z|) scaled (subnormal results round correctly; `exp_neg_abs(z)`, computed
    here unless given)."""
    eh, el, ek = exp_neg_abs(z) if e is None else e
    one = dd(torch.ones_like(z))
    denom = add(one, (ldexp(eh, ek), ldexp(el, ek)))
    num = (torch.where(z >= 0, 1.0, eh), torch.where(z >= 0, 0.0, el))
    q = div(num, denom)
    k = torch.where(z >= 0, 0, ek)
    return q[0], q[1], k


def reciprocal_scaled(x):
    """1/x of float64 x as a scaled dd (hi, lo, k): 1/m·2**−e with x = m·2**e (frexp, exact),
    so that 1/x of a subnormal x, beyond float64's range, can still be divided (by a mean's
    denominator) before it is rounded. 0 → inf, ±inf → 0, NaN → NaN."""
    m, e = torch.frexp(x)
    q = div(dd(torch.ones_like(x)), dd(torch.where(x.isfinite(), m, x)))
    return q[0], q[1], torch.where(x.isfinite() & (x != 0), -e.to(torch.int64), 0)


def row_sum(a):
    """Σ over dim 1 of a dd (N, C) to a dd (N,): a pairwise tree of TwoSums over hi and lo,
    the exact errors summed beside it; rows with inf/NaN terms (or partial sums leaving the
    range) are IEEE's plain sum."""
    x = torch.cat([a[0], a[1]], dim=1)
    plain = x.sum(1)
    err = torch.zeros_like(plain)
    while x.shape[1] > 1:
        if x.shape[1] % 2:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
        half = x.shape[1] // 2
        x, e = two_sum(x[:, :half], x[:, half:])
        err = err + e.sum(1)
    s, e = fast_two_sum(x[:, 0], err)
    ok = s.isfinite() & e.isfinite()
    return torch.where(ok, s, plain), torch.where(ok, e, 0.0)


def logsumexp(x):
    """log Σ_j exp(x_ij) over rows of a float64 (N, C) tensor, as dd: m + log1p(Σ_{j≠k} e^{x_j − m})
    with x_j − m exact (TwoSum). Rows with ±inf/NaN: IEEE's torch.logsumexp."""
    m, k = x.max(1)
    d = two_sum(x, -m[:, None])
    e = exp(d)
    e = (e[0].scatter(1, k[:, None], 0.0), e[1].scatter(1, k[:, None], 0.0))
    out = add(dd(m), log1p(row_sum(e)))
    fin = x.isfinite().all(1)
    plain = torch.logsumexp(x, 1)
    return torch.where(fin, out[0], plain), torch.where(fin, out[1], 0.0)


# ---- scaled dds (hi, lo, k) ------------------------------------------------------------------------


def normalize_scaled(a):
    """The same value with hi in [1/2, 1) (frexp: exact), so that products and quotients of
    the mantissa neither underflow nor overflow; zeros, ±inf and NaN are left as they are."""
    hi, lo = a[0], a[1]
    k = a[2] if len(a) == 3 else torch.zeros_like(hi, dtype=torch.int64)
    _, e = torch.frexp(hi)
    e = torch.where(hi.isfinite() & (hi != 0), e.to(torch.int64), 0)
    return ldexp(hi, -e), ldexp(lo, -e), k + e


def where_scaled(c, a, b):
    """torch.where on scaled dds (hi, lo, k); a plain dd (hi, lo) has k = 0."""
    a = a if len(a) == 3 else (*a, torch.zeros_like(a[0], dtype=torch.int64))
    b = b if len(b) == 3 else (*b, torch.zeros_like(b[0], dtype=torch.int64))
    return tuple(torch.where(c, u, v) for u, v in zip(a, b, strict=True))


def exact_scaled(value, like):
    """A scaled dd holding one exact float64 value (a limit: 0, ±1, inf, NaN), shaped as `like`."""
    return torch.full_like(like, value), torch.zeros_like(like), torch.zeros_like(like, dtype=torch.int64)


def weigh_scaled(a, factor, undefined=None):
    """factor·a for a scaled dd a and a factor (float64 tensor or dd) broadcasting against it,
    a zero factor removing the element: 0 even where a is ±inf or NaN (METRICS.md, "Options"),
    except where `undefined` (a NaN input: not the limit of anything)."""
    f = factor if isinstance(factor, tuple) else (factor, torch.zeros_like(factor))
    f = (f[0].expand_as(a[0]), f[1].expand_as(a[0]))
    a = normalize_scaled(a)  # a subnormal hi times f would round, and its error term underflow
    hi, lo = mul(a[:2], f)
    zero = f[0] == 0
    if undefined is not None:
        zero = zero & ~undefined.expand_as(zero)
    return where_scaled(zero, exact_scaled(0.0, hi), (hi, lo, a[2]))
