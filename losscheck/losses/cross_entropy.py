"""Softmax cross entropy over C classes, with class-index targets."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference as R
from .base import Formulas, Impl, Loss, compute_dtype, grad_scale, reduce_accurate, reduce_naive


def naive(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−log(exp(x_t) / Σ_j exp(x_j)), as printed."""
    e = torch.exp(x)
    loss = -torch.log(e.gather(1, t[:, None]).squeeze(1) / e.sum(1))
    return reduce_naive(loss, reduction)


class _Stable(torch.autograd.Function):
    # With m = max_j x_j and k the target if it attains the max (else an argmax):
    #   loss = (m − x_t) + log1p(s),  s = Σ_{j≠k} exp(x_j − m)
    # Both terms are ≥ 0, so nothing cancels: a confident correct prediction gets
    # loss ≈ s to full precision where logsumexp(x) − x_t would round to 0.
    # Gradient: p_j = exp(x_j − m)/(1 + s), and p_t − 1 = −(1 + s − exp(x_t − m))/(1 + s),
    # i.e. −Σ_{j≠t} p_j, again without cancellation.
    @staticmethod
    def forward(ctx, x, t, reduction):
        c = compute_dtype(x.dtype)
        xc = x.to(c)
        t1 = t[:, None]
        m = xc.amax(1, keepdim=True)
        xt = xc.gather(1, t1)
        k = torch.where(xt == m, t1, xc.argmax(1, keepdim=True))
        d = xc - m
        if c == x.dtype:
            # x − m rounds when x and m differ in magnitude, and exp turns that absolute
            # error into a relative one of |x − m|·eps (hundreds of ULPs): carry the
            # rounding error of the subtraction (TwoSum), exp(d + err) ≈ exp(d)·(1 + err).
            # Half inputs computed in float32 do not need it: the terms that survive
            # rounding to float16/bfloat16 have |x − m| < 92, i.e. an error < 2**-17.
            bb = d - xc
            err = (xc - (d - bb)) + (-m - bb)
            e = torch.exp(d) * (1 + err)
        else:
            e = torch.exp(d)
        e = e.scatter(1, k, 0.0)
        s = e.sum(1, keepdim=True)
        loss = ((m - xt) + torch.log1p(s)).squeeze(1)
        ctx.save_for_backward(e, s, k, t1)
        ctx.meta = (reduction, x.dtype)
        return reduce_accurate(loss, reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        e, s, k, t1 = ctx.saved_tensors
        reduction, dtype = ctx.meta
        total = 1 + s
        g = (e / total).scatter(1, k, 1 / total)
        rest = torch.where(t1 == k, s, total - e.gather(1, t1))
        g = g.scatter(1, t1, -rest / total)
        scale = grad_scale(grad_output, reduction, e.shape[0], e.dtype)
        g = g * (scale[:, None] if scale.dim() == 1 else scale)
        return g.to(dtype), None, None


def stable(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Max-shifted log1p form (no cancellation), float32 compute for half inputs, float64 reduction."""
    return _Stable.apply(x, t, reduction)


def framework(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(x, t, reduction=reduction)


def reference_chunk(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The formulation of `_Stable`, in working precision. In long double (float64
    # targets) x − m is carried as an unevaluated sum (two_diff) so that exp(x − m) keeps
    # full working precision even when the subtraction rounds (x and m of very different
    # magnitudes).
    rows = np.arange(x.shape[0])
    one = x.dtype.type(1)
    m = x.max(axis=1)
    xt = x[rows, t]
    k = np.where(xt == m, t, x.argmax(axis=1))
    if x.dtype == np.float64:
        # float64 work means a float32 or half target: the rounding of x − m costs at
        # most |x − m|·2**-53 relative in exp, far below 1/64 ULP of the target (the
        # terms that matter have |x − m| < 745), so the correction is not needed.
        e = np.exp(x - m[:, None])
    else:
        d, err = R.two_diff(x, m[:, None])
        e = np.exp(d) * (one + err)
    e[rows, k] = 0
    s = e.sum(axis=1)
    total = one + s
    loss = (m - xt) + np.log1p(s)
    grad = e / total[:, None]
    grad[rows, k] = one / total
    rest = np.where(t == k, s, total - e[rows, t])
    grad[rows, t] = -rest / total
    return loss, grad


LOSS = Loss(
    name="cross_entropy",
    summary="softmax cross entropy over `classes`, class-index targets",
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "−log(exp(x_t) / Σ_j exp(x_j))"),
        "stable": Impl("stable", "stable", stable, "(m − x_t) + log1p(Σ_{j≠argmax} e^{x_j−m}), gradient without cancellation"),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.cross_entropy"),
    },
    reference_chunk=reference_chunk,
    formulas=Formulas(
        loss=r"\ell(x, t) = -\log \frac{e^{x_t}}{\sum_j e^{x_j}}",
        naive=r"\ell = -\log\left(e^{x_t} \big/ \textstyle\sum_j e^{x_j}\right)",
        stable=r"m = \max_j x_j,\ \ell = (m - x_t) + \operatorname{log1p}\Big(\textstyle\sum_{j \ne k} e^{x_j - m}\Big)",
        gradient=r"\partial\ell/\partial x_j = \operatorname{softmax}(x)_j - [j = t]",
    ),
)
