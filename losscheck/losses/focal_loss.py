"""Focal loss (Lin et al. 2017), binary and multi-class, options `gamma` (γ ≥ 0, default 2) and
`alpha` (α in [0, 1]; −1, the default, is no α-weighting, as torchvision's alpha < 0).

* `focal_loss`: torchvision.ops.sigmoid_focal_loss's definition, on logits with hard 0/1 or
  soft targets: α_t·(1 − p_t)^γ·BCE(x, y), p_t = p·y + (1 − p)·(1 − y), p = σ(x),
  α_t = α·y + (1 − α)·(1 − y);
* `softmax_focal_loss`: −α·(1 − p_t)^γ·log p_t, p_t = softmax(x)_t, class-index targets.

The known failure is the derivative of (1 − p_t)^γ for γ < 1 (and of its derivative for
γ < 2): autograd of `(1 - p_t) ** gamma` multiplies γ·(1 − p_t)^(γ−1) = +inf by
dp_t/dx = 0 once p_t rounds to 1, a NaN gradient (optax #1267 at logit 1000 with γ = 0.0,
#1346 the Hessian; kornia #918 at logit 100 with γ = 0.5; sam3 #576's Triton backward at
logit 18 with γ = 0). `stable` and the references never form it (focal_loss_ref.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference as R
from ..catalog import LOSS_INFO
from . import focal_loss_ref as FR
from .base import Impl, Loss, compute_dtype, reduce_accurate, reduce_naive, scale_grad

GAMMA, ALPHA = 2.0, -1.0  # catalog.OPTION_DEFAULTS: the values a point without the option has


def _alpha_t(y: torch.Tensor, alpha: float):
    return None if alpha < 0 else alpha * y + (1 - alpha) * (1 - y)


def naive(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA) -> torch.Tensor:
    """The textbook formula on probabilities in the dtype: −α_t·(1 − p_t)^γ·log p_t with
    p = 1/(1 + e^−x) and log p_t written out per target, as printed."""
    p = 1 / (1 + torch.exp(-x))
    p_t = p * y + (1 - p) * (1 - y)
    ce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    loss = ce * (1 - p_t) ** gamma
    a = _alpha_t(y, alpha)
    return reduce_naive(loss if a is None else a * loss, reduction)


def framework(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, expression for expression (no torchvision import)."""
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        loss = alpha_t * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


class _Stable(torch.autograd.Function):
    # The margin form of focal_loss_ref.py (soft targets: its general form), computed in
    # compute_dtype and rounded once; the mean reduced wide. The gradient is the analytic
    # one, kept from the forward: no (1 − p_t)^(γ−1) is ever formed.
    @staticmethod
    def forward(ctx, x, target, reduction, gamma, alpha, multiclass):
        c = compute_dtype(x.dtype, x.device)
        fn = FR.multiclass if multiclass else FR.binary
        if c == x.dtype == torch.float64 and x.device.type == "cpu" and R.extended(c):
            # float64 has no wider torch type: numpy long double where it is wider (x86).
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                out = fn(FR.long_double(x), FR.long_double(target), gamma, alpha)
            loss, grad = (R.round_to(v, c) for v in out)
        else:
            loss, grad = fn(x.to(c), target if multiclass else target.to(c), gamma, alpha)
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.rows, ctx.dtype = reduction, loss.numel(), x.dtype
        return reduce_accurate(loss, reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return scale_grad(grad, grad_output, ctx.reduction, ctx.rows).to(ctx.dtype), None, None, None, None, None


def stable(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA) -> torch.Tensor:
    """Margin form σ(z)^γ·softplus(z), z = ±x (never 1 − p rounded), one precision up, rounded once."""
    return _Stable.apply(x, y, reduction, float(gamma), float(alpha), False)


def naive_multiclass(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA):
    """softmax as exp(x)/Σexp(x) in the dtype, then −α·(1 − p_t)^γ·log p_t as printed."""
    e = torch.exp(x)
    p_t = (e / e.sum(-1, keepdim=True)).gather(-1, t[:, None])[:, 0]
    loss = -((1 - p_t) ** gamma) * torch.log(p_t)
    return reduce_naive(loss if alpha < 0 else alpha * loss, reduction)


def framework_multiclass(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA):
    """The usual torch transcription: ce = cross_entropy(x, t, 'none'), p_t = exp(−ce),
    α·(1 − p_t)^γ·ce (torch has no multi-class focal loss)."""
    ce = F.cross_entropy(x, t, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1 - p_t) ** gamma * ce
    if alpha >= 0:
        loss = alpha * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def stable_multiclass(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean", gamma=GAMMA, alpha=ALPHA):
    """Margin z = logsumexp_{j≠t} x_j − x_t, then the binary margin form, one precision up."""
    return _Stable.apply(x, t, reduction, float(gamma), float(alpha), True)


INFO = LOSS_INFO["focal_loss"]  # summary, formulas, options: catalog.py
INFO_MULTICLASS = LOSS_INFO["softmax_focal_loss"]

LOSS = Loss(
    name="focal_loss",
    summary=INFO.summary,
    multiclass=False,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "p = 1/(1+e^−x) in the dtype, −α_t·(1−p_t)^γ·log p_t as printed"),
        "stable": Impl(
            "stable", "stable", stable, "σ(z)^γ·softplus(z), z = ±x, σ(z) without cancellation, analytic gradient"
        ),
        "torch": Impl(
            "torch", "framework", framework, "torchvision.ops.sigmoid_focal_loss's expression: ce·(1 − p_t)**γ"
        ),
    },
    reference_chunk=FR.binary_reference,
    formulas=INFO.formulas,
    options=INFO.options,
)

MULTICLASS = Loss(
    name="softmax_focal_loss",
    summary=INFO_MULTICLASS.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl(
            "naive", "naive", naive_multiclass, "p = exp(x)/Σexp(x) in the dtype, −α·(1−p_t)^γ·log p_t as printed"
        ),
        "stable": Impl(
            "stable", "stable", stable_multiclass, "margin z = lse_{j≠t} x_j − x_t, σ(z)^γ·softplus(z), analytic"
        ),
        "torch": Impl(
            "torch", "framework", framework_multiclass, "ce = cross_entropy(x, t), p_t = exp(−ce), (1 − p_t)**γ·ce"
        ),
    },
    reference_chunk=FR.multiclass_reference,
    formulas=INFO_MULTICLASS.formulas,
    options=INFO_MULTICLASS.options,
)
