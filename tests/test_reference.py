"""Certify the references against mpmath at 60 decimal digits (METRICS.md, "Reference").

For every loss, on random and extreme inputs, the exact per-element loss and gradient are
computed with mpmath from the exact input values, and

* the raw working-precision output of `reference_chunk` must be within 1/64 ULP of the
  *target* dtype (relative) wherever the true value is a normal number of that dtype;
* the rounded output of `losscheck.losses.reference` (per element, gradient of the mean,
  mean and sum) must be the exact value correctly rounded to the dtype, except where the
  exact value lies within 1/64 ULP of a rounding boundary, where either neighbour is allowed.

Correct rounding of an mpmath value is done here with integers (`round_exact`), not with
any code path of losscheck.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losscheck import inputs
from losscheck import reference as R
from losscheck import rounding
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, reference
from helpers import FLAT_LOSSES

MP = mpmath.MPContext()
MP.dps = 60

LONGDOUBLE_OK = np.finfo(np.longdouble).nmant >= 63
needs_longdouble = pytest.mark.skipif(
    not LONGDOUBLE_OK, reason="float64 references need x86 long double (64-bit significand)")


def _dtype_params():
    return [pytest.param(n, marks=needs_longdouble) if n == "float64" else n for n in FORMATS]


DTYPES = _dtype_params()
TIE = Fraction(1, 64)  # ULPs: the tie region and the working-precision error bound


# ---- exact rounding of an mpmath value ------------------------------------------------------

class Rounded(NamedTuple):
    nearest: float  # correctly rounded, ties to even
    tie: bool  # within 1/64 ULP of a rounding boundary
    below: float  # the two neighbours around the exact value (toward 0, away from 0)
    above: float


def _limits(name: str) -> tuple[int, int, int, Fraction]:
    """(significand bits p, emin, emax, largest finite) of a format."""
    fi = torch.finfo(FORMATS[name].torch_dtype)
    return (FORMATS[name].significand_bits, math.frexp(fi.tiny)[1] - 1,
            math.frexp(fi.max)[1] - 1, Fraction(fi.max))


def round_exact(v, name: str) -> Rounded:
    """`v` (an mpf) rounded to nearest-even in format `name`, with subnormals and overflow."""
    if MP.isnan(v):
        return Rounded(math.nan, False, math.nan, math.nan)
    if MP.isinf(v):
        x = math.inf if v > 0 else -math.inf
        return Rounded(x, False, x, x)
    if v == 0:
        return Rounded(0.0, False, 0.0, 0.0)
    p, emin, emax, largest = _limits(name)
    sign, man, exp, bc = v._mpf_
    s = -1.0 if sign else 1.0
    e = exp + bc - 1  # 2**e <= |v| < 2**(e+1)
    if e > emax + 1:  # far beyond the largest finite value: inf, nowhere near a boundary
        return Rounded(s * math.inf, False, s * math.inf, s * math.inf)
    if e < emin - p - 1:  # below a quarter of the smallest subnormal: 0, not a tie
        return Rounded(s * 0.0, False, s * 0.0, s * 0.0)
    q = max(e, emin) - (p - 1)  # exponent of the ULP at |v|
    n = Fraction(man) * Fraction(2) ** (exp - q)  # |v| in ULPs
    lo = math.floor(n)

    def value(k: int) -> float:
        x = Fraction(k) * Fraction(2) ** q
        return math.inf if x > largest else float(x)

    return Rounded(s * value(round(n)), abs(n - lo - Fraction(1, 2)) <= TIE,
                   s * value(lo), s * value(lo + 1))


def to_mp(w):
    """A float64 or long double numpy scalar, exactly, as an mpf."""
    if np.isnan(w):
        return MP.nan
    if np.isinf(w):
        return MP.inf if w > 0 else -MP.inf
    m, e = np.frexp(w)
    hi = float(m)
    lo = float(m - type(m)(hi))  # exact: a long double significand is 53 + 11 bits
    return MP.ldexp(MP.mpf(hi) + MP.mpf(lo), int(e))


def test_round_exact_self_check():
    # The oracle's own corner cases, against values known by construction.
    assert round_exact(MP.mpf(1) + MP.mpf(2) ** -11, "float16") == (1.0, True, 1.0, 1 + 2**-10)
    assert round_exact(MP.mpf(1) + 3 * MP.mpf(2) ** -11, "float16").nearest == 1 + 2**-9
    assert round_exact(MP.mpf(65520), "float16").nearest == math.inf
    assert round_exact(MP.mpf(65519), "float16").nearest == 65504.0
    assert round_exact(MP.mpf(2) ** -25, "float16").nearest == 0.0
    assert round_exact(MP.mpf(2) ** -25 * (1 + MP.mpf(2) ** -30), "float16").nearest == 2.0**-24
    assert round_exact(MP.mpf(2) ** -1074, "float64").nearest == 5e-324
    assert round_exact(MP.mpf(-0.1), "float64") == (-0.1, False, -0.1, -0.1 - 2.0**-56)
    assert round_exact(MP.mpf(0.1) * (1 + MP.mpf(2) ** -60), "float64") == \
        (0.1, False, 0.1, 0.1 + 2.0**-56)
    assert round_exact(MP.mpf(0.1) + MP.mpf(2) ** -57, "float64").tie
    assert round_exact(MP.mpf(1) / 3, "float32").nearest == float(np.float32(1 / 3))
    assert round_exact(MP.mpf(1) / 3, "bfloat16").nearest == float(torch.tensor(1 / 3).bfloat16())
    assert round_exact(MP.mpf(10) ** 400, "float64").nearest == math.inf
    assert round_exact(-MP.mpf(10) ** -400, "float32").nearest == 0.0


# ---- the exact losses -----------------------------------------------------------------------

def exact_bce(p: float, y: float):
    P = MP.mpf(p)
    if y > 0.5:
        if p == 0:
            return MP.inf, -MP.inf
        return -MP.log(P), -1 / P
    if p == 1:
        return MP.inf, MP.inf
    return -MP.log1p(-P), 1 / (1 - P)


def exact_bce_with_logits(x: float, y: float):
    # loss = log(1 + exp(z)), z = x (y = 0) or −x (y = 1); d/dx = σ(x) − y = ±σ(z)
    z = MP.mpf(-x if y > 0.5 else x)
    sign = -1 if y > 0.5 else 1
    if z > 0:
        ez = MP.exp(-z)
        return z + MP.log1p(ez), sign / (1 + ez)
    ez = MP.exp(z)
    return MP.log1p(ez), sign * ez / (1 + ez)


def exact_cross_entropy(row, t: int):
    if all(math.isfinite(v) for v in row):
        return _exact_cross_entropy(row, t)
    return _exact_limit(_exact_cross_entropy, row, t)


# ±inf logits: the loss and gradient are limits. They are found here without any case
# analysis: ±inf is replaced by ±BIG·r_j along several paths (growth rates r_j: all equal,
# increasing, decreasing with j), BIG beyond every dtype's range and e^−BIG below every
# subnormal. A component is +inf (−inf) where every path gives more than HUGE (less than
# −HUGE), 0 where every path is below NEGLIGIBLE in magnitude, the common value where the
# paths agree to 40 digits, and undefined (NaN) where the paths disagree. Finite logits
# give values within (NEGLIGIBLE, HUGE): at most |m − x_t| ≈ 3.6e308, at least e^−3.6e308.
BIG = MP.mpf(10) ** 400
HUGE = MP.ldexp(1, 1200)  # ≈ 1e361: above every finite logit's loss, below BIG
NEGLIGIBLE = MP.ldexp(1, -3 * 10**399)  # ≈ 10**−9e398: above e^−BIG, below e^−3.6e308


def _exact_limit(exact, row, t: int):
    c = len(row)
    paths = [[1] * c, [1 + j for j in range(c)], [c - j for j in range(c)]]
    results = []
    for rates in paths:
        sub = [v if math.isfinite(v) else MP.mpf(math.copysign(1, v)) * BIG * r for v, r in zip(row, rates)]
        results.append(exact(sub, t))
    loss = _agree([r[0] for r in results])
    grad = [_agree([r[1][j] for r in results]) for j in range(c)]
    return loss, grad


def _agree(values):
    if all(v > HUGE for v in values):
        return MP.inf
    if all(v < -HUGE for v in values):
        return -MP.inf
    if all(abs(v) < NEGLIGIBLE for v in values):
        return MP.mpf(0)
    if all(abs(v - values[0]) <= abs(values[0]) * MP.mpf(10) ** -40 for v in values):
        return values[0]
    return MP.nan


def _exact_cross_entropy(row, t: int):
    X = [MP.mpf(v) for v in row]
    k = max(range(len(X)), key=lambda j: X[j])
    m = X[k]
    e = [MP.exp(MP.fsub(xj, m, exact=True)) for xj in X]  # e[k] == 1
    s = MP.fsum(e[j] for j in range(len(X)) if j != k)
    total = 1 + s
    loss = MP.fsub(m, X[t], exact=True) + MP.log1p(s)
    grad = [ej / total for ej in e]
    # softmax_t − 1 = −Σ_{j≠t} softmax_j, without cancellation
    grad[t] = -MP.fsum(e[j] for j in range(len(X)) if j != t) / total
    return loss, grad


def exact_nll_loss(row, t: int):
    """−x_t, gradient −1 at the target: the input is the log-probability itself."""
    return -MP.mpf(row[t]), [MP.mpf(-1 if j == t else 0) for j in range(len(row))]


def exact_token_logprobs(row, t: int):
    """log softmax(row)_t = −cross entropy, gradient e_t − softmax."""
    loss, grad = exact_cross_entropy(row, t)
    return -loss, [-g for g in grad]


def _exact_entropy(row, t=None):
    X = [MP.mpf(v) for v in row]
    k = max(range(len(X)), key=lambda j: X[j])
    e = [MP.exp(MP.fsub(xj, X[k], exact=True)) for xj in X]
    s = MP.fsum(e[j] for j in range(len(X)) if j != k)  # log1p(s), not log(1 + s): s may be 1e−300
    p = [ej / (1 + s) for ej in e]
    a = [MP.fsub(X[k], xj, exact=True) + MP.log1p(s) for xj in X]  # −log p_j >= 0
    h = MP.fsum(pj * aj for pj, aj in zip(p, a))
    # −p_j (log p_j + H) = p_j (a_j − H) = p_j Σ_k p_k (x_k − x_j): exact differences, where
    # a_j − H would cancel beyond 60 digits (ties at the maximum: 1e−85 next to log 3).
    return h, [pj * MP.fsum(pk * MP.fsub(xk, xj, exact=True) for pk, xk in zip(p, X)) for pj, xj in zip(p, X)]


def exact_entropy(row, t: int):
    """H(softmax(row)), gradient −p_j (log p_j + H); ±inf logits as limits."""
    if all(math.isfinite(v) for v in row):
        return _exact_entropy(row)
    return _exact_limit(_exact_entropy, row, t)


def exact_focal(x: float, y: float, gamma=2.0, alpha=-1.0):
    """torchvision's sigmoid focal loss α_t·(1 − p_t)^γ·BCE(x, y) and its derivative, by the
    chain rule on p = σ(x) (hard or soft y); ±inf logits: the limits."""
    X, Y, G = MP.mpf(x), MP.mpf(y), MP.mpf(gamma)
    a = 1 if alpha < 0 else alpha * Y + (1 - alpha) * (1 - Y)
    if MP.isinf(X):  # σ(±∞) ∈ {0, 1}: the cross entropy is +∞ unless y sits on the logit's side
        p = 1 if X > 0 else 0
        m = Y * (1 - p) + (1 - Y) * p  # 1 − p_t
        right = (p == 1 and y == 1) or (p == 0 and y == 0)
        # d/dx: (1 − p_t)^γ·(p − y) (the γ-term's σ'·ce decays like |x|e^−|x|); 0 where m = 0, γ > 0.
        grad = (MP.power(m, G) if m else (1 if gamma == 0 else 0)) * (p - Y)
        return (MP.mpf(0) if right else MP.inf), a * grad
    # σ(x), σ(−x) and their logs each from its own formula: 1 − σ(x) cancels at 60 digits too.
    p, pn = 1 / (1 + MP.exp(-X)), 1 / (1 + MP.exp(X))
    log_p, log_q = -MP.log1p(MP.exp(-X)), -MP.log1p(MP.exp(X))
    ce = -(Y * log_p + (1 - Y) * log_q)
    m = Y * pn + (1 - Y) * p
    dm = (1 - 2 * Y) * p * pn
    loss = a * MP.power(m, G) * ce
    # d[m^γ·ce] = γ·m^(γ−1)·m'·ce + m^γ·(p − y): exact at 60 digits, m > 0 for finite x.
    return loss, a * (G * MP.power(m, G - 1) * dm * ce + MP.power(m, G) * ((1 - Y) * p - Y * pn))


def _exact_softmax_focal(row, t: int, gamma=2.0, alpha=-1.0):
    X = [MP.mpf(v) for v in row]
    k = max(range(len(X)), key=lambda j: X[j])
    e = [MP.exp(MP.fsub(xj, X[k], exact=True)) for xj in X]  # e[k] == 1
    rest = MP.fsum(e[j] for j in range(len(X)) if j != k)
    s = [ej / (1 + rest) for ej in e]
    q = MP.fsum(s[j] for j in range(len(X)) if j != t)  # 1 − p_t without cancellation
    p, log_p = s[t], -(MP.fsub(X[k], X[t], exact=True) + MP.log1p(rest))
    G, a = MP.mpf(gamma), (1 if alpha < 0 else alpha)
    loss = -a * MP.power(q, G) * log_p
    # dℓ/dp = γ(1−p)^(γ−1)·log p − (1−p)^γ/p, dp/dx_j = p·([j = t] − s_j)
    dldp = G * MP.power(q, G - 1) * log_p - MP.power(q, G) / p
    grad = [a * dldp * p * ((1 if j == t else 0) - s[j]) for j in range(len(X))]
    grad[t] = a * dldp * p * q
    return loss, grad


def exact_softmax_focal(row, t: int, gamma=2.0, alpha=-1.0):
    def exact(r, k):
        return _exact_softmax_focal(r, k, gamma, alpha)

    return exact(row, t) if all(math.isfinite(v) for v in row) else _exact_limit(exact, row, t)


EXACT = {"bce": exact_bce, "bce_with_logits": exact_bce_with_logits, "sigmoid_bce": exact_bce_with_logits,
         "cross_entropy": exact_cross_entropy, "nll_loss": exact_nll_loss,
         "sharded_cross_entropy": exact_cross_entropy,  # its reference is the unsharded one
         "token_logprobs": exact_token_logprobs, "entropy": exact_entropy,
         "focal_loss": exact_focal, "softmax_focal_loss": exact_softmax_focal}


# ---- certification --------------------------------------------------------------------------

class Checker:
    def __init__(self, name: str):
        self.name = name
        p, emin, _, largest = _limits(name)
        self.rel = MP.mpf(2) ** -(p - 1) / 64
        self.tiny = MP.ldexp(1, emin)
        self.largest = MP.mpf(largest.numerator)
        self.problems: list[str] = []
        self.rounded = 0
        self.ties = 0
        self.raw_checked = 0

    def raw(self, w, v, what: str) -> None:
        """Working-precision value `w` against the exact `v`."""
        if MP.isnan(v):  # undefined (a limit that depends on the path): NaN
            if not np.isnan(w):
                self.problems.append(f"{what}: raw {w!r}, exact undefined (NaN)")
            return
        if MP.isinf(v):
            if not (np.isinf(w) and (w > 0) == (v > 0)):
                self.problems.append(f"{what}: raw {w!r}, exact {v}")
            return
        if v == 0:
            if w != 0:
                self.problems.append(f"{what}: raw {w!r}, exact 0")
            return
        if not (self.tiny <= abs(v) <= self.largest):
            return  # subnormal or beyond the range: compared as rounded only
        self.raw_checked += 1
        err = abs(to_mp(w) - v) / abs(v) if np.isfinite(w) else MP.inf
        if not err < self.rel:
            self.problems.append(
                f"{what}: raw {w!r} exact {MP.nstr(v, 25)}: error {MP.nstr(err / self.rel / 64, 5)} ULP")

    def rounded_(self, got: float, v, what: str) -> None:
        """Value `got` of the target dtype against the exact `v`, correctly rounded."""
        r = round_exact(v, self.name)
        self.rounded += 1
        if MP.isnan(v):
            ok = math.isnan(got)
        elif r.tie:
            self.ties += 1
            ok = got in (r.below, r.above)
        else:
            ok = got == r.nearest
        if not ok:
            self.problems.append(f"{what}: got {got!r}, exact {MP.nstr(v, 25)} rounds to {r}")

    def done(self) -> None:
        assert not self.problems, f"{len(self.problems)} problems:\n" + "\n".join(self.problems[:25])


def certify(loss_name: str, inp: torch.Tensor, target: torch.Tensor) -> Checker:
    loss = LOSSES[loss_name]
    name = {f.torch_dtype: n for n, f in FORMATS.items()}[inp.dtype]
    chk = Checker(name)
    work = R.work_dtype(inp.dtype)
    x = R.to_work(inp, work)
    t = target.double().numpy() if target.is_floating_point() else target.numpy()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lw, gw = loss.reference_chunk(x, t)
    assert lw.dtype == work and gw.dtype == work
    assert lw.shape == (inp.shape[0],) and gw.shape == tuple(inp.shape)
    ref = reference(loss, inp, target)
    assert ref.loss.dtype == inp.dtype and ref.grad.dtype == inp.dtype
    n = inp.shape[0]
    xs = inp.double().numpy()
    losses = []
    for i in range(n):
        lv, gv = EXACT[loss_name](xs[i].tolist() if loss.multiclass else float(xs[i]),
                                  int(t[i]) if loss.multiclass else float(t[i]))
        losses.append(lv)
        chk.raw(lw[i], lv, f"loss[{i}] x={xs[i].tolist()} t={t[i]}")
        chk.rounded_(float(ref.loss[i]), lv, f"rounded loss[{i}] x={xs[i].tolist()} t={t[i]}")
        for j, g in (enumerate(gv) if loss.multiclass else [(None, gv)]):
            idx = (i, j) if loss.multiclass else (i,)
            chk.raw(gw[idx], g, f"grad{list(idx)} x={xs[i].tolist()} t={t[i]}")
            chk.rounded_(float(ref.grad[idx]), g / n, f"rounded grad/N{list(idx)} x={xs[i].tolist()}")
    total = MP.fsum(losses)
    chk.rounded_(float(ref.mean), total / n, "mean")
    chk.rounded_(float(reference(loss, inp, target, reduction="sum").reduced), total, "sum")
    if math.isfinite(ref.mean_value) and abs(total / n) > 1e-300:
        # The float64 mean of a float32/half point comes from float64 tensors, where x_j − m is
        # not exact once the exponents differ by more than 29 bits: hypothesis found a row
        # [17.0, 5.050428825148501e-11] whose mean is 2**-49.7 off (4.8 ULP of float64). 2**-48
        # is still 2**24 times finer than the float32 value it backs (certified above).
        assert abs(MP.mpf(ref.mean_value) - total / n) <= abs(total / n) * MP.mpf(2) ** -48
    chk.done()
    return chk


# ---- inputs ---------------------------------------------------------------------------------

N, C = 40, 6


def _logits(loss_name: str, name: str, case: str, seed: int = 0):
    loss = LOSSES[loss_name]
    rng = np.random.default_rng([seed, len(case), sum(map(ord, case + loss_name + name))])
    shape = (N, C) if loss.multiclass else (N,)
    labels = rng.integers(0, C, N) if loss.multiclass else rng.integers(0, 2, N).astype(np.float64)
    big = float(torch.finfo(FORMATS[name].torch_dtype).max)
    if case.startswith("normal_"):
        x = rng.standard_normal(shape) * float(case.split("_")[1])
    elif case == "tiny":
        x = rng.standard_normal(shape) * 1e-30
    elif case == "huge":
        x = np.where(rng.integers(0, 2, shape) == 1, 1.0, -1.0) * big * rng.uniform(0.5, 1.0, shape)
        x.reshape(-1)[:4] = [big, -big, big, -big]
    elif case.startswith("extreme_"):
        x, labels = inputs.generate(loss_name, loss.multiclass, N, C, float(case.split("_")[1]),
                                    "extreme", seed)
    elif case == "confident_correct":  # target logit +50, others N(0, 1)
        x, labels = inputs.generate(loss_name, loss.multiclass, N, C, 50.0, "confident_correct", seed)
    elif case == "confident_wrong":
        x, labels = inputs.generate(loss_name, loss.multiclass, N, C, 50.0, "confident_wrong", seed)
    elif case == "ties":  # all logits equal (and huge): loss = log C
        x = np.repeat(big * rng.uniform(0.25, 1.0, (N, 1)), C, axis=1)
    elif case == "wide":
        # max m and the others of very different magnitudes: x − m rounds in working
        # precision, which two_diff must correct (for float64, m = 700: e^(x−m) stays normal).
        # (uniform() has 53 random bits below 1, so it is scaled by a non-dyadic factor to
        # fill the low bits of small x_j, which are the ones x − m loses.)
        m = 700.0 if name == "float64" else 80.0
        x = -rng.uniform(0.0, 0.3, shape) * 1.1
        x[:, 0] = m
        x[:, 1] = -0.1
        labels[: N // 2] = 0  # half the rows: target on the max
    elif "_" in case and case.rsplit("_", 1)[0] in inputs.DISTRIBUTIONS:
        # the value sets of inputs.py: ties, dominant, target_min, nonfinite at a scale
        dist, scale = case.rsplit("_", 1)
        x, labels = inputs.generate(loss_name, loss.multiclass, N, C, float(scale), dist, seed)
    elif case == "undefined":
        # Rows whose limits are partly or wholly undefined (NaN in the reference), which
        # the `nonfinite` value set leaves out, next to defined ones, by row index mod 4:
        # two +inf non-targets (loss +inf), two +inf with the target (undefined), every
        # logit −inf (undefined), a +inf non-target with a −inf target and a −inf other.
        rows = np.arange(N)
        x = rng.standard_normal(shape) * 10
        other, third = (labels + 1) % C, (labels + 2) % C
        kind = rows % 4
        x[rows[kind == 0], other[kind == 0]] = np.inf
        x[rows[kind == 0], third[kind == 0]] = np.inf
        x[rows[kind == 1], labels[kind == 1]] = np.inf
        x[rows[kind == 1], other[kind == 1]] = np.inf
        x[kind == 2] = -np.inf
        x[rows[kind == 3], other[kind == 3]] = np.inf
        x[rows[kind == 3], labels[kind == 3]] = -np.inf
        x[rows[kind == 3], third[kind == 3]] = -np.inf
    else:
        raise AssertionError(case)
    return loss.make_input(np.asarray(x, dtype=np.float64), FORMATS[name].torch_dtype), \
        loss.make_target(np.asarray(labels), FORMATS[name].torch_dtype)


COMMON = ["normal_1", "normal_30", "normal_1000", "tiny", "huge", "extreme_100", "extreme_10000"]
MULTICLASS_ONLY = ["confident_correct", "confident_wrong", "ties", "wide",
                   "ties_1e8", "dominant_30", "dominant_10000", "target_min_1", "target_min_10000",
                   "undefined"]
LOGITS_ONLY = ["nonfinite_1", "nonfinite_10000"]  # ±inf logits: the reference's limits


def _cases():
    for loss_name, loss in FLAT_LOSSES.items():
        for case in COMMON + (MULTICLASS_ONLY if loss.multiclass else []) + \
                (LOGITS_ONLY if loss.input_kind == "logits" else []):
            if loss_name == "nll_loss" and case == "undefined":
                # Its log-probabilities of rows without a limit are NaN: inputs out of the domain,
                # with no true value (METRICS.md; tests/test_out_of_domain.py).
                continue
            yield loss_name, case


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("loss_name,case", list(_cases()))
def test_reference_matches_mpmath(loss_name, case, name):
    if (loss_name, name) == ("entropy", "float64"):
        # Its gradient p_j (a_j − ā) cancels where a_j ≈ ā; long double's 11 bits beyond float64
        # do not cover that (losses/divergence.py): certified for the other dtypes, and for float64
        # on random, confident and tied rows in tests/test_token_logprobs.py.
        pytest.skip("entropy's float64 gradient reference is not certified to 1/64 ULP where it cancels")
    inp, target = _logits(loss_name, name, case)
    chk = certify(loss_name, inp, target)
    assert chk.rounded > N  # every element was compared
    # The tie allowance must stay an exception (random values: ~1/32), or the check says little.
    assert chk.ties <= max(3, chk.rounded // 8), (chk.ties, chk.rounded)


@needs_longdouble
def test_wide_rows_need_the_two_diff_correction(monkeypatch):
    # Guards the certification itself: without two_diff's error term, float64 rows with
    # m = 700 and x_j ∈ (−1, 0) lose ~1/8 ULP in exp(x_j − m), and `certify` must see it.
    inp, target = _logits("cross_entropy", "float64", "wide")
    certify("cross_entropy", inp, target)
    monkeypatch.setattr(R, "two_diff", lambda a, b: (a - b, np.zeros_like(a - b)))
    with pytest.raises(AssertionError, match="raw"):
        certify("cross_entropy", inp, target)


@pytest.mark.parametrize("name", DTYPES)
def test_cross_entropy_ties_are_log_c(name):
    inp, target = _logits("cross_entropy", name, "ties")
    ref = reference(LOSSES["cross_entropy"], inp, target)
    expected = round_exact(MP.log(C), name).nearest
    assert ref.loss.double().tolist() == [expected] * N
    # gradient: 1/C − [j = t], over N
    g = ref.grad.double()
    rows = torch.arange(N)
    assert g[rows, target].tolist() == [round_exact(-MP.mpf(C - 1) / C / N, name).nearest] * N


@needs_longdouble
def test_confident_correct_float64_loss_is_the_tiny_sum():
    # loss = log1p(Σ_{j≠t} e^{x_j − x_t}) ≈ Σ e^{x_j − 50}: nowhere near 0, nowhere near log C.
    inp, target = _logits("cross_entropy", "float64", "confident_correct")
    ref = reference(LOSSES["cross_entropy"], inp, target)
    assert (ref.loss > 0).all() and (ref.loss < 1e-19).all()


# ---- hypothesis: random float64/float32 inputs --------------------------------------------

def _floats(width, **kw):
    return st.floats(allow_nan=False, allow_infinity=False, width=width, **kw)


HYP_DTYPES = [pytest.param("float64", 64, marks=needs_longdouble), ("float32", 32)]


@pytest.mark.parametrize("name,width", HYP_DTYPES)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_cross_entropy_reference_random(name, width, data):
    c = data.draw(st.integers(1, 5), label="classes")
    n = data.draw(st.integers(1, 4), label="rows")
    scale = data.draw(st.sampled_from([None, 1.0, 30.0, 1000.0]), label="scale")
    if scale is None:
        elem = _floats(width)
    else:
        elem = _floats(width, min_value=-scale, max_value=scale)
    rows = data.draw(st.lists(st.lists(elem, min_size=c, max_size=c), min_size=n, max_size=n))
    t = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    dt = FORMATS[name].torch_dtype
    certify("cross_entropy", torch.tensor(rows, dtype=torch.float64).to(dt), torch.tensor(t))


@pytest.mark.parametrize("name,width", HYP_DTYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_cross_entropy_reference_random_with_infinities(name, width, data):
    # ±inf logits in any number and place: the limits (and NaN where there is none) of
    # `reference_chunk` against the path oracle of `_exact_limit`.
    c = data.draw(st.integers(1, 5), label="classes")
    n = data.draw(st.integers(1, 4), label="rows")
    elem = st.one_of(st.sampled_from([math.inf, -math.inf]),
                     _floats(width, min_value=-100.0, max_value=100.0), _floats(width))
    rows = data.draw(st.lists(st.lists(elem, min_size=c, max_size=c), min_size=n, max_size=n))
    t = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    dt = FORMATS[name].torch_dtype
    certify("cross_entropy", torch.tensor(rows, dtype=torch.float64).to(dt), torch.tensor(t))


@pytest.mark.parametrize("name,width", HYP_DTYPES)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_bce_with_logits_reference_random(name, width, data):
    n = data.draw(st.integers(1, 8), label="n")
    # ±inf included: the limits (loss 0 or +inf, gradient σ − y ∈ {0, ±1})
    x = data.draw(st.lists(st.one_of(_floats(width), st.sampled_from([math.inf, -math.inf])),
                           min_size=n, max_size=n))
    y = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    dt = FORMATS[name].torch_dtype
    certify("bce_with_logits", torch.tensor(x, dtype=torch.float64).to(dt),
            torch.tensor(y, dtype=torch.float64).to(dt))


@pytest.mark.parametrize("name,width", HYP_DTYPES)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_bce_reference_random(name, width, data):
    n = data.draw(st.integers(1, 8), label="n")
    p = data.draw(st.lists(_floats(width, min_value=0.0, max_value=1.0), min_size=n, max_size=n))
    y = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    dt = FORMATS[name].torch_dtype
    certify("bce", torch.tensor(p, dtype=torch.float64).to(dt),
            torch.tensor(y, dtype=torch.float64).to(dt))


# ---- round_to -------------------------------------------------------------------------------

HALF = ["float16", "bfloat16"]


def _naive(values, dt):
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).float().to(dt)


def screened(values, dt) -> list[float]:
    """`values` rounded by round_to's screened path (`_round_half_screened`, which large
    tensors take), among 16 times as many values that are no midpoint suspects (π): the
    correction of the suspects among them runs, not the fallback of mostly exact values."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float64))
    x = torch.full((17 * values.numel() + 16,), math.pi, dtype=torch.float64)
    x[1::17][: values.numel()] = values
    assert int(rounding._midpoint_mask(x.float()).count_nonzero()) * 16 <= x.numel()
    return rounding._round_half_screened(x, dt)[1::17][: values.numel()].double().tolist()


@pytest.mark.parametrize("name", HALF)
def test_round_to_exact_halfway_ties_to_even(name):
    p = FORMATS[name].significand_bits
    dt = FORMATS[name].torch_dtype
    u = 2.0 ** -(p - 1)  # ULP at 1
    halfway = [1 + u / 2, 1 + 3 * u / 2, 2 - u / 2, -(1 + u / 2), -(1 + 3 * u / 2)]
    expected = [1.0, 1 + 2 * u, 2.0, -1.0, -(1 + 2 * u)]
    assert R.round_to(np.array(halfway), dt).double().tolist() == expected


@pytest.mark.parametrize("name", HALF)
def test_round_to_in_pieces_is_one_rounding_of_the_whole(monkeypatch, name):
    """Large tensors are rounded piece by piece (cache-sized temporaries): the same bits as
    one call on the whole, ties, values just off them, ±0, subnormals, overflow and NaN
    among them, each piece boundary in the middle of the (3, 67) shape's rows, the values
    checked against the exact rounding by mpmath."""
    p = FORMATS[name].significand_bits
    dt = FORMATS[name].torch_dtype
    u = 2.0 ** -(p - 1)
    special = [1 + u / 2, 1 + u / 2 + 2.0**-40, -(1 + 3 * u / 2), 0.0, -0.0, 2.0**-140, 1e300, -1e300,
               math.inf, math.nan, float(torch.finfo(dt).max) * (1 + u / 4)]
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(3 * 67, dtype=torch.float64, generator=gen).mul_(1e3)
    x[:: 201 // len(special)][: len(special)] = torch.tensor(special, dtype=torch.float64)
    x = x.reshape(3, 67)
    whole = rounding._round_half(x, dt)
    monkeypatch.setattr(rounding, "_ROUND_PIECE", 10)
    pieces = rounding._round_half_pieces(x, dt)
    assert pieces.shape == whole.shape and pieces.dtype == dt
    assert torch.equal(pieces.view(torch.int16), whole.view(torch.int16))
    for a, b in zip(x.reshape(-1).tolist(), pieces.reshape(-1).double().tolist(), strict=True):
        if math.isnan(a):
            assert math.isnan(b)
        else:
            assert round_exact(MP.mpf(a), name).nearest == b or (math.isinf(b) and abs(a) > torch.finfo(dt).max)


def _near_midpoints(name, gen, n):
    """n float64 values at, and a few float64 ULPs either side of, midpoints of the half
    format `name`: normal ones, subnormal ones and the overflow threshold, both signs."""
    p = FORMATS[name].significand_bits
    finfo = torch.finfo(FORMATS[name].torch_dtype)
    tiny = float(finfo.smallest_normal) * 2.0 ** -(p - 1)  # the smallest subnormal
    ks = torch.randint(1, 2 ** (p - 1), (n,), generator=gen, dtype=torch.float64)
    exps = torch.randint(-10, 10, (n,), generator=gen, dtype=torch.float64)
    normal = (1 + (ks + 0.5) * 2.0 ** -(p - 1)) * torch.pow(2.0, exps)
    sub = (torch.randint(0, 2 ** (p - 1), (n,), generator=gen, dtype=torch.float64) + 0.5) * tiny
    top = torch.full((n,), float(finfo.max) * (1 + 2.0**-p / (1 - 2.0**-p)), dtype=torch.float64)
    which = torch.randint(0, 3, (n,), generator=gen)
    mid = torch.where(which == 0, normal, torch.where(which == 1, sub, top))
    nudge = torch.randint(-2, 3, (n,), generator=gen)  # float64 ULPs off the midpoint
    out = mid.clone()
    for step in (1, 2):
        out = torch.where(nudge >= step, torch.nextafter(out, torch.tensor(math.inf, dtype=torch.float64)), out)
        out = torch.where(nudge <= -step, torch.nextafter(out, torch.tensor(-math.inf, dtype=torch.float64)), out)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return out * sign


@pytest.mark.parametrize("piece", [None, 70_000])
@pytest.mark.parametrize("name", HALF)
def test_round_to_screened_is_round_to_odd_everywhere(monkeypatch, name, piece):
    """On the CPU, round_to keeps torch's two casts but where the float32 value may be a
    midpoint of the half format (`_round_half_screened`): the same bits as round to odd on
    every value, on random values with values at and just off midpoints (normal, subnormal,
    the overflow threshold), ±0, ±inf, NaN and values beyond float32's range among them; the
    specials checked against mpmath. Without the correction (the plain casts) the midpoints
    double-round: the test is not vacuous. `piece`: the tensor screened in pieces (as one
    larger than `_SCREEN_PIECE` is), the last one small enough to be rounded to odd."""
    if piece:
        monkeypatch.setattr(rounding, "_SCREEN_PIECE", piece)
    dt = FORMATS[name].torch_dtype
    gen = torch.Generator().manual_seed(FORMATS[name].significand_bits)
    n = 2 * rounding._SCREEN_MIN
    x = torch.randn(n, dtype=torch.float64, generator=gen) * torch.pow(
        10.0, torch.randint(-8, 8, (n,), generator=gen, dtype=torch.float64))
    special = torch.cat([_near_midpoints(name, gen, n // 40), torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, 1e300, -1e300, 2.0**-140, 1e-45], dtype=torch.float64)])
    where = torch.randperm(x.numel(), generator=gen)[: special.numel()]
    x[where] = special
    x = x.reshape(256, -1)

    def no_fallback(*args):
        raise AssertionError("few suspects: the screened path, not round to odd everywhere")
    with monkeypatch.context() as m:
        m.setattr(rounding, "_round_half_pieces", no_fallback)
        got = R.round_to(x, dt)
    everywhere = rounding._round_half_pieces(x, dt)
    assert got.shape == x.shape and got.dtype == dt
    assert torch.equal(got.view(torch.int16), everywhere.view(torch.int16))
    assert not torch.equal(_naive(x.numpy(), dt).view(torch.int16), everywhere.view(torch.int16))
    for a, b in zip(special.tolist(), got.reshape(-1)[where].double().tolist(), strict=True):
        if math.isnan(a):
            assert math.isnan(b)
        else:
            assert round_exact(MP.mpf(a), name).nearest == b or (math.isinf(b) and abs(a) > torch.finfo(dt).max)


@pytest.mark.parametrize("name", HALF)
def test_round_to_mostly_exact_values_at_once(monkeypatch, name):
    """Mostly exact values (zeros, small integers: every one a suspect of the screen) are
    rounded to odd everywhere, at once, whether the sample or the whole count finds them:
    the same bits either way."""
    dt = FORMATS[name].torch_dtype
    x = torch.zeros(rounding._SCREEN_MIN + 7, dtype=torch.float64)
    x[::7] = torch.arange(x[::7].numel(), dtype=torch.float64) * 0.37
    calls = []
    real = rounding._round_half_pieces
    monkeypatch.setattr(rounding, "_round_half_pieces", lambda *a: calls.append(1) or real(*a))
    got = R.round_to(x, dt)
    assert calls and torch.equal(got.view(torch.int16), rounding._round_half(x, dt).view(torch.int16))
    # Exact values everywhere but where the sample looks: the screen's own count falls back.
    calls.clear()
    x = torch.zeros(rounding._SCREEN_MIN + 7, dtype=torch.float64)
    x[:: rounding._SAMPLE_STRIDE] = torch.randn(x[:: rounding._SAMPLE_STRIDE].shape, dtype=torch.float64)
    got = R.round_to(x, dt)
    assert calls and torch.equal(got.view(torch.int16), rounding._round_half(x, dt).view(torch.int16))


@pytest.mark.parametrize("name", HALF)
def test_round_to_just_off_halfway_avoids_double_rounding(name):
    # 1 + u/2 ± 2**-40 is not a tie, but float64 -> float32 rounds it to one (1 + u/2),
    # and float32 -> half then ties to even: the wrong neighbour half of the time.
    p = FORMATS[name].significand_bits
    dt = FORMATS[name].torch_dtype
    u = 2.0 ** -(p - 1)
    eps = 2.0**-40
    values = np.array([1 + u / 2 + eps, 1 + 3 * u / 2 - eps, -(1 + u / 2 + eps), -(1 + 3 * u / 2 - eps),
                       1 + u / 2 - eps, 1 + 3 * u / 2 + eps])
    expected = [1 + u, 1 + u, -(1 + u), -(1 + u), 1.0, 1 + 2 * u]
    for v, e in zip(values, expected):
        assert round_exact(MP.mpf(float(v)), name).nearest == e
    assert R.round_to(values, dt).double().tolist() == expected
    assert screened(values, dt) == expected
    # the naive path really is wrong on the first four: the test is not vacuous
    naive = _naive(values, dt).double().tolist()
    assert naive[:4] != expected[:4]


@pytest.mark.parametrize("name", HALF)
def test_round_to_subnormal_halfway(name):
    dt = FORMATS[name].torch_dtype
    smallest = float(torch.finfo(dt).smallest_normal) * 2.0 ** -(FORMATS[name].significand_bits - 1)
    eps = smallest * 2.0**-30
    values = np.array([smallest / 2, smallest / 2 + eps, 3 * smallest / 2, 3 * smallest / 2 - eps,
                       -smallest / 2 - eps, smallest / 4])
    expected = [0.0, smallest, 2 * smallest, smallest, -smallest, 0.0]
    got = R.round_to(values, dt).double().tolist()
    assert got == expected
    assert screened(values, dt) == expected
    assert _naive(values[[1, 3, 4]], dt).double().tolist() != [smallest, smallest, -smallest]


@pytest.mark.parametrize("name", HALF)
def test_round_to_overflows_to_inf(name):
    dt = FORMATS[name].torch_dtype
    p = FORMATS[name].significand_bits
    big = float(torch.finfo(dt).max)
    half_ulp = big * 2.0 ** -p / (2 - 2.0 ** -(p - 1))  # ulp(max)/2
    values = np.array([big, big + half_ulp * 0.999, big + half_ulp, big + 2 * half_ulp, -big - half_ulp,
                       1e39, -1e300, math.inf, -math.inf])
    expected = [big, big, math.inf, math.inf, -math.inf, math.inf, -math.inf, math.inf, -math.inf]
    assert R.round_to(values, dt).double().tolist() == expected
    assert screened(values, dt) == expected
    assert math.isnan(float(R.round_to(np.array([math.nan]), dt)[0]))


@pytest.mark.parametrize("name", HALF)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_round_to_is_correct_rounding(name, data):
    dt = FORMATS[name].torch_dtype
    p = FORMATS[name].significand_bits
    kind = data.draw(st.sampled_from(["any", "near_halfway"]))
    if kind == "any":
        v = data.draw(_floats(64))
    else:
        # a representable value, half an ULP above it, nudged by a few float64 ULPs
        base = float(torch.tensor(data.draw(_floats(64, min_value=-7e4, max_value=7e4))).to(dt))
        if not math.isfinite(base) or base == 0:
            return
        ulp = 2.0 ** (math.frexp(abs(base))[1] - p)
        v = base + math.copysign(ulp / 2, base)
        v = float(np.nextafter(v, math.inf * data.draw(st.sampled_from([-1, 1])))) \
            if data.draw(st.booleans()) else v
    got = float(R.round_to(np.array([v]), dt)[0])
    assert got == round_exact(MP.mpf(v), name).nearest, v
    assert screened([v], dt) == [got], v


@needs_longdouble
def test_round_to_float64_from_long_double():
    one = np.longdouble(1)
    tiny = np.longdouble(2) ** -63
    half = np.longdouble(2) ** -53
    values = np.array([one + half, one + half + tiny, one + 3 * half, one + 3 * half - tiny,
                       -(one + half + tiny)], dtype=np.longdouble)
    expected = [1.0, 1 + 2**-52, 1 + 2**-51, 1 + 2**-52, -(1 + 2**-52)]
    out = R.round_to(values, torch.float64)
    assert out.dtype == torch.float64
    assert out.tolist() == expected
    huge = np.array([np.longdouble(np.finfo(np.float64).max) * 2], dtype=np.longdouble)
    assert R.round_to(huge, torch.float64).tolist() == [math.inf]


def test_round_to_float32_from_float64():
    values = np.array([1 + 2.0**-24, 1 + 2.0**-24 + 2.0**-50, 1e39, -1e39, 2.0**-150, 2.0**-150 + 2.0**-170])
    expected = [1.0, 1 + 2.0**-23, math.inf, -math.inf, 0.0, 2.0**-149]
    out = R.round_to(values, torch.float32)
    assert out.dtype == torch.float32
    assert out.double().tolist() == expected


# ---- CompensatedSum -------------------------------------------------------------------------------

def test_compensated_sum_catastrophic_float64():
    s = R.CompensatedSum()
    s.add(np.array([1e100, 1.0, -1e100]))
    assert s.mean(1, np.float64) == 1.0
    assert s.mean(3, np.float64) == np.float64(1.0) / 3
    # in chunks, and with values whose naive sum is off by far more than 1 ULP
    s = R.CompensatedSum()
    for chunk in ([1e100], [1.0, 2.0**-60], [-1e100, 3e-17], [1e-300]):
        s.add(np.array(chunk))
    assert s.mean(1, np.float64) == math.fsum([1.0, 2.0**-60, 3e-17, 1e-300])
    assert s.mean(1, np.float64) != float(np.sum([1e100, 1.0, 2.0**-60, -1e100, 3e-17, 1e-300]))


@needs_longdouble
def test_compensated_sum_catastrophic_long_double():
    ld = np.longdouble
    s = R.CompensatedSum()
    s.add(np.array([1e100, 1.0, -1e100], dtype=ld))
    out = s.mean(1, ld)
    assert isinstance(out, ld) and out == 1
    # bits below float64's precision must survive: (1 + 2**-60) − 1 = 2**-60 exactly
    s = R.CompensatedSum()
    s.add(np.array([ld(1) + ld(2) ** -60, ld(1e100), -ld(1), -ld(1e100)], dtype=ld))
    assert s.mean(1, ld) == ld(2) ** -60
    # across chunks (non-negative values, as losses are: a chunk is kept to ~2**-106)
    s = R.CompensatedSum()
    s.add(np.array([ld(1) + ld(2) ** -60], dtype=ld))
    s.add(np.array([ld(2) ** -62, ld(0)], dtype=ld))
    s.add(np.array([ld(2) ** -62 * 3], dtype=ld))
    assert s.mean(1, ld) == ld(1) + ld(2) ** -59
    s = R.CompensatedSum()
    s.add(np.array([ld(1) + ld(2) ** -62] * 3, dtype=ld))
    assert s.mean(3, ld) == ld(1) + ld(2) ** -62


def test_compensated_sum_propagates_non_finite():
    s = R.CompensatedSum()
    s.add(np.array([1.0, 2.0]))
    s.add(np.array([math.inf, 1.0]))
    assert s.mean(2, np.float64) == math.inf
    s = R.CompensatedSum()
    s.add(np.array([math.inf, -math.inf]))
    assert math.isnan(s.mean(1, np.float64))


def test_compensated_sum_overflowing_float64_is_inf_not_an_exception():
    # Regression: math.fsum raised OverflowError ("intermediate overflow in fsum") on two
    # float64 losses near 1e308, which crashed the float64 reference of bce_with_logits at
    # logits near float64's max.
    s = R.CompensatedSum()
    s.add(np.array([1.7e308, 1.7e308, 1.0]))
    assert s.mean(1, np.float64) == math.inf
    s = R.CompensatedSum()
    s.add(np.array([1.7e308]))
    s.add(np.array([1.7e308]))
    assert s.mean(1, np.float64) == math.inf
    assert s.mean(4, np.float64) == math.inf  # the sum overflows float64 before the division


@needs_longdouble
def test_compensated_sum_beyond_float64_range_in_long_double():
    # Regression: a float64 cross entropy at logits ±max has m − x_t ≈ 3.6e308, finite in long
    # double; the sum must stay finite there and the mean come back into float64's range.
    ld = np.longdouble
    big = ld(np.finfo(np.float64).max)
    s = R.CompensatedSum()
    s.add(np.array([2 * big, ld(0), big], dtype=ld))
    s.add(np.array([ld(1)], dtype=ld))
    mean = s.mean(4, ld)
    assert np.isfinite(mean)
    assert abs(mean / ((3 * big + 1) / 4) - 1) < ld(2) ** -60


@needs_longdouble
@pytest.mark.parametrize("loss_name", list(FLAT_LOSSES))
def test_float64_reference_at_the_largest_logits_does_not_raise(loss_name):
    # Regression for the two bugs above, end to end, with numpy warnings as errors.
    loss = LOSSES[loss_name]
    big = np.finfo(np.float64).max
    if loss.multiclass:
        x, t = np.array([[big, -big, 1.0], [big, -big, 0.5]]), np.array([1, 0])
    else:
        x, t = np.array([big, big, -big, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])
    inp, target = loss.make_input(x, torch.float64), loss.make_target(t, torch.float64)
    certify(loss_name, inp, target)


def test_float64_reference_refuses_degraded_long_double(monkeypatch):
    """If a native library sets the x87 precision control to 53 bits, long double rounds like
    float64: the float64 reference must then be refused (skipped points), not silently wrong."""
    from losscheck.errors import ReferenceUnavailable
    if LONGDOUBLE_OK:
        assert R._extended_now()
    monkeypatch.setattr(R, "_LONGDOUBLE_OK", True)
    monkeypatch.setattr(R, "_extended_now", lambda: False)
    with pytest.raises(ReferenceUnavailable, match="precision control"):
        R.work_dtype(torch.float64)
    # ... and float64 references then take the double-double path instead of being skipped.
    monkeypatch.setattr(R, "FLOAT64_PATH", "extended")
    assert R.path(torch.float64) == "dd"
    assert R.work_dtype(torch.float32) is np.float64
