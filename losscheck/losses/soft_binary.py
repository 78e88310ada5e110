"""Soft binary targets y ∈ [0, 1] (and pos_weight with them): the references of the binary
losses where a target is neither 0 nor 1 (METRICS.md, "Options and special cases").

With a = pos_weight·y and b = 1 − y (both ≥ 0 for y ∈ [0, 1] and pos_weight ≥ 0):

* from logits: ℓ = a·softplus(−x) + b·softplus(x), ∂ℓ/∂x = b·σ(x) − a·σ(−x);
* on probabilities: ℓ = −[a·log p + b·log1p(−p)], ∂ℓ/∂p = b/(1 − p) − a/p, formed inside
  (0, 1) as one fraction (b·p − a·(1 − p))/(p·(1 − p)) whose numerator is exact for
  pos_weight 1 (p − y), so that p = y gives exactly 0.

The gradients cancel where the prediction matches the target (σ(x) ≈ y: the gradient is
near 0 while each term is near y), so they are formed in double-double (losscheck.doubledouble,
~2**-100 relative per term) in all three precision paths: float64 tensors and x86 long double
alike take the dd values and round them once. A coefficient that is exactly 0 removes its
term even where the term is infinite (y = 1 at x = +inf is the hard target's limit 0, not
0·inf = NaN), as a zero weight does. The limits at ±inf follow (pytorch#135359's table):
x = −inf, y = 0.9 → ℓ = +inf, gradient −0.9; x = +inf, y = 0.9 → ℓ = +inf, gradient 0.1;
p = 0, y = 0.5 → ℓ = +inf, gradient −inf.

Hard targets keep the losses' own formulations bit for bit: the soft values replace only the
elements whose target is soft (`soft_mask`), so a chunk of hard targets costs nothing here.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import doubledouble as D


def soft_mask(y):
    """Where a target is soft: neither 0 nor 1 (NaN targets are not soft: they stay NaN)."""
    return (y != 0) & (y != 1) & (y == y)


def hard(x, y) -> bool:
    """Whether every target is hard (0, 1 or NaN): `on_extended` then stays in numpy (the
    binary losses' `rowwise`, reference.chunk_function)."""
    return not bool(soft_mask(y).any())


def _factors(y: torch.Tensor, pos_weight):
    """(a, k, b): a·2**k = pos_weight·y and b = 1 − y, exact (TwoProd of the significands, so
    that a subnormal product keeps its error term; TwoSum)."""
    one = torch.ones_like(y)
    b = D.two_sum(one, -y)
    my, ey = torch.frexp(y)
    if pos_weight is None:
        # y's significand too (exact): a subnormal y times −log p would round in the subnormal
        # range (found: p = y = 2.2e-313 in float64, 3e-11 relative off).
        return D.dd(my), ey.to(torch.int64), b
    mp, ep = torch.frexp(_pos_weight(pos_weight, y))
    return D.two_prod(mp, my), (ep + ey).to(torch.int64), b


def _shift(a, k):
    """A scaled dd times 2**k (exact)."""
    return a[0], a[1], a[2] + k


def _pos_weight(pos_weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """pos_weight per element: its one value, or one per element already (float64)."""
    pw = pos_weight.to(torch.float64).reshape(-1)
    return pw[0].expand_as(like) if pw.numel() == 1 else pw.expand_as(like)


def _add_scaled(u, v):
    """u + v for scaled dds (hi, lo, k): both brought to the larger exponent (a term more
    than 2**1000 below the other is negligible, and is dropped)."""
    u, v = D.normalize_scaled(u), D.normalize_scaled(v)
    k = torch.maximum(u[2], v[2])
    s = D.add(D.ldexp_dd(u[:2], u[2] - k), D.ldexp_dd(v[:2], v[2] - k))
    return s[0], s[1], k


def _weigh(a, factor, nan):
    return D.weigh_scaled(a, factor, nan)


def logits_dd(x: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    """Loss and gradient from logits (float64 tensors), as scaled dds (hi, lo, k)."""
    a, k, b = _factors(y, pos_weight)
    nan = x.isnan()
    # softplus(±x) and σ(±x) share exp(−|x|), and both softpluses its log1p: computed once.
    e = D.exp_neg_abs(x)
    l1 = D.log1p_scaled(e)
    loss = _add_scaled(
        _shift(_weigh(D.softplus_scaled(-x, e, l1), a, nan), k), _weigh(D.softplus_scaled(x, e, l1), b, nan)
    )
    neg_a = (-a[0], -a[1])
    grad = _add_scaled(_weigh(D.sigmoid_scaled(x, e), b, nan), _shift(_weigh(D.sigmoid_scaled(-x, e), neg_a, nan), k))
    return _weighted(loss, grad, weight, nan)


def probabilities_dd(p: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    """Loss and gradient on probabilities (float64 tensors), as scaled dds (hi, lo, k)."""
    a, k, b = _factors(y, pos_weight)
    nan = p.isnan()
    zero_k = torch.zeros_like(p, dtype=torch.int64)
    neg_log_p = (*D.neg(D.log(D.dd(p))), zero_k)
    neg_log_q = (*D.neg(D.log1p(D.dd(-p))), zero_k)
    loss = _add_scaled(_shift(_weigh(neg_log_p, a, nan), k), _weigh(neg_log_q, b, nan))
    one = D.dd(torch.ones_like(p))
    q = D.two_sum(one[0], -p)  # 1 − p, exact
    inv_p = D.reciprocal_scaled(p)  # 1/p, scaled: a subnormal p's reciprocal is beyond float64
    # Inside (0, 1) as one fraction, (b·p − a·(1 − p))/(p·(1 − p)), whose numerator
    # p − pw·y + (pw − 1)·y·p is exact for pw = 1 (p − y: TwoSum), so that the gradient is
    # exactly 0 where p = y (two dd terms would leave their 2**-104 rounding there).
    if pos_weight is None:
        num = D.two_sum(p, -y)
    else:
        pw = _pos_weight(pos_weight, y)
        num = D.add(D.add(D.dd(p), D.neg(D.two_prod(pw, y))), D.mul_d(D.mul_d(D.two_sum(pw, -one[0]), y), p))
    inside = _weigh(inv_p, D.div(num, q), nan)
    # At p = 0 and p = 1 the two terms b/(1 − p) and −a/p, one of them infinite or 0.
    ends = _add_scaled(_weigh((*D.div(one, q), zero_k), b, nan), _shift(_weigh(inv_p, (-a[0], -a[1]), nan), k))
    grad = D.where_scaled((p == 0) | (p == 1), ends, inside)
    return _weighted(loss, grad, weight, nan)


def _weighted(loss, grad, weight, nan):
    if weight is None:
        return loss, grad
    w = weight.to(torch.float64).expand_as(loss[0])
    return _weigh(loss, w, nan), _weigh(grad, w, nan)


# ---- the three precision paths: soft elements replaced, hard ones kept ----------------------------


def on_tensors(fn, x: torch.Tensor, y: torch.Tensor, loss, grad, weight=None, pos_weight=None):
    """float64 tensors (float32/float16/bfloat16 targets): the dd rounded to float64."""
    soft = soft_mask(y)
    if not bool(soft.any()):
        return loss, grad
    sl, sg = fn(x, y, weight, pos_weight)
    return torch.where(soft, D.round_scaled(*sl), loss), torch.where(soft, D.round_scaled(*sg), grad)


def on_dd(fn, x: torch.Tensor, y: torch.Tensor, loss, grad, weight=None, pos_weight=None):
    """Scaled dds (float64 targets on the dd path)."""
    soft = soft_mask(y)
    if not bool(soft.any()):
        return loss, grad
    sl, sg = fn(x, y, weight, pos_weight)
    return D.where_scaled(soft, sl, loss), D.where_scaled(soft, sg, grad)


def on_extended(fn, x: np.ndarray, y: np.ndarray, loss, grad, weight=None, pos_weight=None):
    """numpy long double (float64 targets on x86): the dd's hi + lo, scaled, in long double
    (64 significand bits: within 2**-63 of the dd, far inside 1/64 ULP of float64)."""
    soft = soft_mask(y)
    if not soft.any():
        return loss, grad

    def t(v):
        # float64 values held in long double: exact as float64 (a dtype's values, or weights).
        return None if v is None else torch.from_numpy(np.asarray(v, dtype=np.float64).copy())

    sl, sg = fn(t(x), t(y), t(weight), t(pos_weight))

    def back(s):
        hi, lo, k = (v.numpy() for v in s)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.ldexp(hi.astype(np.longdouble) + lo.astype(np.longdouble), k)

    return np.where(soft, back(sl), loss), np.where(soft, back(sg), grad)
