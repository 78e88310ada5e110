"""Binary cross entropy computed from logits, with hard 0/1 or soft targets in [0, 1],
per-element `weight` and `pos_weight` (torch's: the positive term is multiplied by it; one
value, or one per class of (N, C) multi-label inputs; zero and negative values as torch takes
them)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference as R
from ..catalog import LOSS_INFO
from . import bce, soft_binary
from .base import Impl, Loss, binary_factor, compute_dtype, reduce_accurate, scale_grad, two_sum


def naive(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """−w·[p·y·log σ(x) + (1−y)·log(1−σ(x))] with σ(x) = 1/(1+exp(−x)), as printed."""
    return bce.naive(1 / (1 + torch.exp(-x)), y, reduction, weight, pos_weight)


class _Stable(torch.autograd.Function):
    # loss = max(x, 0) − x·y + log1p(exp(−|x|)): no overflow. For hard targets the first
    # two terms are max(z, 0) with z = x (y = 0) or −x (y = 1), which is how they are
    # computed: bit for bit the same for finite x (x − x and 0 − 0 cancel exactly, so tiny
    # losses keep every bit), and without x·y = ±inf·0 = NaN at ±inf logits, where it gives
    # the limits: 0 on the target's side, +inf on the wrong side.
    # The gradient σ(x) − y is formed without cancellation: for x ≥ 0 as (1 − y) − σ(−x);
    # at ±inf, σ(−|x|) = 0 gives the limits 1 − y and −y.
    # weight and pos_weight multiply each element's loss and gradient by one factor,
    # w·(pos_weight if y = 1 else 1), formed in the compute precision.
    # Soft targets (some y neither 0 nor 1) take the general form with a = pos_weight·y and
    # b = 1 − y: a·max(−x, 0) + b·max(x, 0) + (a + b)·log1p(e^−|x|), a zero coefficient
    # removing its term at ±inf (the limits of pytorch#135359's table); the gradient
    # b·σ(x) − a·σ(−x) as (1 − y) − σ(−|x|)·(a + b) for x ≥ 0, σ(−|x|)·(a + b) − a below
    # (σ(x) − y for pos_weight 1, as for hard targets). Hard targets keep the form above.
    @staticmethod
    def forward(ctx, x, y, reduction, weight=None, pos_weight=None):
        c = compute_dtype(x.dtype, x.device)
        xc, yc = x.to(c), y.to(c)
        ctx.soft = bool(soft_binary.soft_mask(yc).any())
        log1p_e = torch.log1p(torch.exp(-xc.abs()))
        if ctx.soft:
            a, b = _coefficients(yc, pos_weight)
            loss, low = two_sum(_times(a, torch.relu(-xc)) + _times(b, torch.relu(xc)), (a + b) * log1p_e)
            f = None if weight is None else weight.to(c)
        else:
            z = torch.where(yc > 0.5, -xc, xc)
            loss, low = two_sum(torch.relu(z), log1p_e)
            f = binary_factor(yc, weight, pos_weight)
        if f is not None:
            # A zero weight gives 0 (and no error term) where the loss is +inf.
            loss, low = bce.weigh(loss, f, xc), bce.weigh(low, f, xc)
        ctx.save_for_backward(x, y, f, pos_weight)
        ctx.reduction = reduction
        return reduce_accurate(loss, reduction, x.dtype, low)

    @staticmethod
    def backward(ctx, grad_output):
        x, y, f, pos_weight = ctx.saved_tensors
        c = compute_dtype(x.dtype, x.device)
        xc, yc = x.to(c), y.to(c)
        # σ(−|x|) as e/(1 + e), e = exp(−|x|): 1/(1 + exp(|x|)) would overflow to 0 where
        # the true value is still a (subnormal) number.
        e = torch.exp(-xc.abs())
        small = e / (1 + e)
        if ctx.soft:
            a, b = _coefficients(yc, pos_weight)
            g = torch.where(xc >= 0, b - small * (a + b), small * (a + b) - a)
        else:
            g = torch.where(xc >= 0, (1 - yc) - small, small - yc)
        if f is not None:
            g = bce.weigh(g, f, xc)
        g = scale_grad(g, grad_output, ctx.reduction, x.numel())
        return g.to(x.dtype), None, None, None, None


def _coefficients(y: torch.Tensor, pos_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_weight·y, 1 − y) in y's (compute) precision."""
    return (y if pos_weight is None else pos_weight.to(y.dtype) * y), 1 - y


def _times(coefficient: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """coefficient·term, 0 where the coefficient is exactly 0 (its term removed, even at ±inf)."""
    return torch.where(coefficient == 0, 0.0, coefficient * term)


def stable(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """softplus form computed one precision up (float32 for halves, float64 for float32), rounded once."""
    return _Stable.apply(x, y, reduction, weight, pos_weight)


def framework(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(x, y, weight=weight, pos_weight=pos_weight, reduction=reduction)


def _reference_tensors(x: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    # Hard targets (soft ones: soft_binary): loss = softplus(z) with z = x (y = 0) or −x (y = 1), and
    # σ(x) − y = ±σ(z). Both are evaluated without cancellation, so the working
    # precision's rounding errors are all that remain; weights multiply both exactly
    # enough (one working-precision rounding).
    positive = y > 0.5
    z = R.negate_where(positive, x)
    loss, sig = R.softplus_and_sigmoid(z)
    grad = R.negate_where(positive, sig)
    # A zero weight removes the element: 0 and gradient 0 where the loss is infinite too.
    loss, grad = R.weigh_binary(loss, grad, x, positive, weight, pos_weight)
    return soft_binary.on_tensors(soft_binary.logits_dd, x, y, loss, grad, weight, pos_weight)


def _reference_extended(x: np.ndarray, y: np.ndarray, weight=None, pos_weight=None):
    # `_reference_tensors` in numpy long double (float64 targets), line for line.
    positive = y > 0.5
    z = np.where(positive, -x, x)
    sign = np.where(positive, -1, 1).astype(x.dtype)
    loss, sig = R.softplus_and_sigmoid(z)
    grad = sign * sig
    loss, grad = R.weigh_binary(loss, grad, x, positive, weight, pos_weight)
    return soft_binary.on_extended(soft_binary.logits_dd, x, y, loss, grad, weight, pos_weight)


def _reference_dd(x: torch.Tensor, y: torch.Tensor, weight=None, pos_weight=None):
    # `_reference_tensors` in double-double (float64 targets): softplus(z) and ±σ(z) as
    # scaled dds, so that subnormal losses and gradients (z < −708) round correctly.
    from .. import doubledouble as D

    positive = y > 0.5
    z = R.negate_where(positive, x)
    e = D.exp_neg_abs(z)  # one exponential for both
    loss = D.softplus_scaled(z, e)
    sh, sl, sk = D.sigmoid_scaled(z, e)
    grad = (R.negate_where(positive, sh), R.negate_where(positive, sl), sk)
    loss, grad = R.weigh_binary_dd(loss, grad, x, positive, weight, pos_weight)
    return soft_binary.on_dd(soft_binary.logits_dd, x, y, loss, grad, weight, pos_weight)


# Soft targets go through torch (soft_binary): row blocks on threads for hard ones only.
reference_chunk = R.chunk_function(_reference_tensors, _reference_extended, _reference_dd, rowwise=soft_binary.hard)


INFO = LOSS_INFO["bce_with_logits"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="bce_with_logits",
    summary=INFO.summary,
    multiclass=False,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "−[y·log σ(x) + (1−y)·log(1−σ(x))], σ = 1/(1+e^−x)"),
        "stable": Impl(
            "stable",
            "stable",
            stable,
            "max(x,0) − x·y + log1p(e^−|x|), gradient σ(x) − y without cancellation, limits at ±inf",
        ),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.binary_cross_entropy_with_logits"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
)
