"""Binary cross entropy on probabilities p = σ(logit) rounded to the dtype, hard 0/1 or soft
targets in [0, 1], per-element `weight` and `pos_weight` (the positive term multiplied by it,
as in `binary_cross_entropy_with_logits`; torch's `binary_cross_entropy` has no pos_weight)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference as R
from ..catalog import LOSS_INFO
from . import soft_binary
from .base import Impl, Loss, binary_factor, compute_dtype, grad_scale, reduce_accurate, reduce_naive, scale_grad


def naive(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """−w·[pos_weight·y·log p + (1−y)·log(1−p)], as printed."""
    positive = y * torch.log(p)
    if pos_weight is not None:
        positive = pos_weight * positive
    loss = -(positive + (1 - y) * torch.log(1 - p))
    if weight is not None:
        loss = weight * loss
    return reduce_naive(loss, reduction)


def _xdivy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a == 0, torch.zeros_like(a), a / b)


def weigh(values: torch.Tensor, f: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """f·values with a zero factor removing its element (METRICS.md, "Options"): 0 where the
    unweighted value is ±inf too (the limit w → 0 first), as in the reference; NaN inputs
    stay NaN (undefined, not a limit)."""
    return torch.where((f == 0) & ~inp.isnan(), 0.0, values * f)


class _Stable(torch.autograd.Function):
    # loss = −[xlogy(y, p) + xlog1py(1 − y, −p)]: log1p keeps the bits of 1 − p for small
    # p, and 0·log 0 is 0 instead of NaN. No clamping: where p rounded to exactly 0 or 1
    # and the target disagrees, the true loss is +inf and that is what we return.
    # Weights multiply each element's loss and gradient by w·(pos_weight if y = 1 else 1).
    # Soft targets (some y neither 0 nor 1): pos_weight multiplies the positive term only,
    # a = pos_weight·y in xlogy(a, p), and the weight the element.
    @staticmethod
    def forward(ctx, p, y, reduction, weight=None, pos_weight=None):
        c = compute_dtype(p.dtype, p.device)
        pc, yc = p.to(c), y.to(c)
        soft = bool(soft_binary.soft_mask(yc).any())
        a = yc * pos_weight.to(c) if soft and pos_weight is not None else yc
        loss = -(torch.special.xlogy(a, pc) + torch.special.xlog1py(1 - yc, -pc))
        f = binary_factor(yc, weight, None if soft else pos_weight)
        if f is not None:
            loss = weigh(loss, f, pc)
        ctx.save_for_backward(p, y, f, a)
        ctx.reduction = reduction
        return reduce_accurate(loss, reduction, p.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        p, y, f, a = ctx.saved_tensors
        c = compute_dtype(p.dtype, p.device)
        pc, yc = p.to(c), y.to(c)
        # (p − y)/(p(1 − p)) written as (1−y)/(1−p) − y/p: one division per hard target,
        # then the upstream gradient and the 1/N of the mean (two roundings in all). Where
        # −1/p overflows but −1/(N·p) is finite (p tiny), 1/N is applied first instead.
        n = p.numel()
        up = grad_output if f is None else grad_output * f
        g = scale_grad(_xdivy(1 - yc, 1 - pc) - _xdivy(a, pc), up, ctx.reduction, n)
        s = grad_scale(up, ctx.reduction, n, c)
        g_small_p = _xdivy((1 - yc) * s, 1 - pc) - _xdivy(a * s, pc)
        g = torch.where(g.isfinite(), g, g_small_p)
        if f is not None:
            # A zero weight removes the element: gradient 0 where 1/p or 1/(1 − p) is inf
            # (g_small_p gives it too, through 0/0 := 0 in _xdivy; this says so).
            g = torch.where((f == 0) & ~pc.isnan(), 0.0, g)
        return g.to(p.dtype), None, None, None, None


def stable(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """xlogy/xlog1py form computed one precision up, rounded once, no clamp."""
    return _Stable.apply(p, y, reduction, weight, pos_weight)


def framework(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    # binary_cross_entropy has no pos_weight: it is folded into the weight, in the dtype
    # (the products round, which is part of what this implementation is measured for). For a
    # target y, pw·y·log p + (1−y)·log(1−p) = w'·[y'·log p + (1−y')·log(1−p)] with
    # w' = pw·y + 1 − y and y' = pw·y/w': for hard targets w' = pw (y = 1) or 1 (y = 0), y' = y.
    if pos_weight is not None:
        if bool(soft_binary.soft_mask(y).any()):
            a = pos_weight * y
            w = a + (1 - y)
            y = torch.where(w == 0, y, a / torch.where(w == 0, 1.0, w))
        else:
            w = torch.where(y > 0.5, pos_weight, torch.ones_like(y))
        weight = w if weight is None else weight * w
    return F.binary_cross_entropy(p, y, weight=weight, reduction=reduction)


def _reference_tensors(p: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    # Hard targets (soft ones: soft_binary): −log p (y = 1) or −log1p(−p) (y = 0); gradient −1/p or 1/(1 − p).
    # 1 − p is exact in working precision for p ≥ 1/2 and has a relative error of one
    # working-precision rounding below that. p = 0 (or 1) with a disagreeing target gives
    # +inf loss and an infinite gradient: the limit, as METRICS.md asks.
    positive = y > 0.5
    loss = torch.where(positive, -torch.log(p), -torch.log1p(-p))
    grad = torch.where(positive, -torch.reciprocal(p), torch.reciprocal(1 - p))
    # A zero weight removes the element: 0 and gradient 0 where the loss is infinite too.
    loss, grad = R.weigh_binary(loss, grad, p, positive, weight, pos_weight)
    return soft_binary.on_tensors(soft_binary.probabilities_dd, p, y, loss, grad, weight, pos_weight)


def _reference_extended(p: np.ndarray, y: np.ndarray, weight=None, pos_weight=None):
    # `_reference_tensors` in numpy long double (float64 targets), line for line.
    positive = y > 0.5
    one = p.dtype.type(1)
    loss = np.where(positive, -np.log(p), -np.log1p(-p))
    grad = np.where(positive, -one / p, one / (one - p))
    loss, grad = R.weigh_binary(loss, grad, p, positive, weight, pos_weight)
    return soft_binary.on_extended(soft_binary.probabilities_dd, p, y, loss, grad, weight, pos_weight)


def _reference_dd(p: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    # `_reference_tensors` in double-double (float64 targets): −log p or −log1p(−p) to
    # ~2**-100; −1/p or 1/(1 − p) with 1 − p exact (TwoSum). Scaled dds (hi, lo, k).
    from .. import doubledouble as D

    positive = y > 0.5
    lp, l1 = D.log(D.dd(p)), D.log1p(D.dd(-p))
    loss = D.where_scaled(positive, D.neg(lp), D.neg(l1))
    one = D.dd(torch.ones_like(p))
    rh, rl, rk = D.reciprocal_scaled(p)  # 1/p scaled: it may exceed float64's range before the mean
    grad = D.where_scaled(positive, (-rh, -rl, rk), D.div(one, D.two_sum(one[0], -p)))
    loss, grad = R.weigh_binary_dd(loss, grad, p, positive, weight, pos_weight)
    return soft_binary.on_dd(soft_binary.probabilities_dd, p, y, loss, grad, weight, pos_weight)


# Soft targets go through torch (soft_binary): row blocks on threads for hard ones only.
reference_chunk = R.chunk_function(_reference_tensors, _reference_extended, _reference_dd, rowwise=soft_binary.hard)


INFO = LOSS_INFO["bce"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="bce",
    summary=INFO.summary,
    multiclass=False,
    input_kind="probabilities",
    implementations={
        "naive": Impl("naive", "naive", naive, "−[y·log p + (1−y)·log(1−p)]"),
        "stable": Impl("stable", "stable", stable, "−[xlogy(y,p) + xlog1py(1−y,−p)], no clamp, exact limits"),
        "torch": Impl(
            "torch",
            "framework",
            framework,
            "torch.nn.functional.binary_cross_entropy (clamps log at −100; pos_weight folded into weight)",
        ),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
)
