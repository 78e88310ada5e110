"""Binary cross entropy on probabilities p = σ(logit) rounded to the dtype, hard 0/1 targets."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Formulas, Impl, Loss, compute_dtype, grad_scale, reduce_accurate, reduce_naive, scale_grad


def naive(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−[y·log p + (1−y)·log(1−p)], as printed."""
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    return reduce_naive(loss, reduction)


def _xdivy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a == 0, torch.zeros_like(a), a / b)


class _Stable(torch.autograd.Function):
    # loss = −[xlogy(y, p) + xlog1py(1 − y, −p)]: log1p keeps the bits of 1 − p for small
    # p, and 0·log 0 is 0 instead of NaN. No clamping: where p rounded to exactly 0 or 1
    # and the target disagrees, the true loss is +inf and that is what we return.
    @staticmethod
    def forward(ctx, p, y, reduction):
        c = compute_dtype(p.dtype, p.device)
        pc, yc = p.to(c), y.to(c)
        loss = -(torch.special.xlogy(yc, pc) + torch.special.xlog1py(1 - yc, -pc))
        ctx.save_for_backward(p, y)
        ctx.reduction = reduction
        return reduce_accurate(loss, reduction, p.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        p, y = ctx.saved_tensors
        c = compute_dtype(p.dtype, p.device)
        pc, yc = p.to(c), y.to(c)
        # (p − y)/(p(1 − p)) written as (1−y)/(1−p) − y/p: one division per hard target,
        # then the upstream gradient and the 1/N of the mean (two roundings in all). Where
        # −1/p overflows but −1/(N·p) is finite (p tiny), 1/N is applied first instead.
        n = p.shape[0]
        g = scale_grad(_xdivy(1 - yc, 1 - pc) - _xdivy(yc, pc), grad_output, ctx.reduction, n)
        s = grad_scale(grad_output, ctx.reduction, n, c)
        g_small_p = _xdivy((1 - yc) * s, 1 - pc) - _xdivy(yc * s, pc)
        g = torch.where(g.isfinite(), g, g_small_p)
        return g.to(p.dtype), None, None


def stable(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """xlogy/xlog1py form computed one precision up, rounded once, no clamp."""
    return _Stable.apply(p, y, reduction)


def framework(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy(p, y, reduction=reduction)


def reference_chunk(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Hard targets: −log p (y = 1) or −log1p(−p) (y = 0); gradient −1/p or 1/(1 − p).
    # 1 − p is exact in working precision for p ≥ 1/2 and has a relative error of one
    # working-precision rounding below that. p = 0 (or 1) with a disagreeing target gives
    # +inf loss and an infinite gradient: the limit, as METRICS.md asks.
    positive = y > 0.5
    one = p.dtype.type(1)
    loss = np.where(positive, -np.log(p), -np.log1p(-p))
    grad = np.where(positive, -one / p, one / (one - p))
    return loss, grad


LOSS = Loss(
    name="bce",
    summary="binary cross entropy on probabilities p = σ(logit) rounded to the dtype, hard 0/1 targets",
    multiclass=False,
    input_kind="probabilities",
    implementations={
        "naive": Impl("naive", "naive", naive, "−[y·log p + (1−y)·log(1−p)]"),
        "stable": Impl("stable", "stable", stable, "−[xlogy(y,p) + xlog1py(1−y,−p)], no clamp, exact limits"),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.binary_cross_entropy (clamps log at −100)"),
    },
    reference_chunk=reference_chunk,
    formulas=Formulas(
        loss=r"\ell(p, y) = -\left[y \log p + (1-y)\log(1-p)\right]",
        naive=r"\ell = -\left[y\log p + (1-y)\log(1-p)\right]",
        stable=r"\ell = -\left[\operatorname{xlogy}(y, p) + \operatorname{xlog1py}(1-y, -p)\right]",
        gradient=r"\partial\ell/\partial p = \frac{p - y}{p(1-p)}",
    ),
)
