"""Softmax cross entropy over C classes, with class-index targets."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import reference as R
from .base import Formulas, Impl, Loss, compute_dtype, reduce_accurate, reduce_naive, scale_grad, two_sum


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
    #
    # ±inf logits give the limits of `reference_chunk` with no extra pass over the (N, C)
    # values: exp(−inf − m) = 0 already gives a −inf logit probability 0, and a +inf
    # maximum makes exp(x_j − m) 0 for the finite x_j and NaN (inf − inf) for any further
    # +inf logit, so s is 0 for one +inf and NaN (undefined) for several. Per-row
    # `torch.where`s on (N, 1) tensors then turn (m − x_t) = inf − inf into 0 and keep a
    # finite target's loss +inf; see the backward for the gradient.
    @staticmethod
    def forward(ctx, x, t, reduction):
        c = compute_dtype(x.dtype, x.device)
        xc = x.to(c)
        t1 = t[:, None]
        m = xc.amax(1, keepdim=True)
        xt = xc.gather(1, t1)
        on_max = xt == m
        k = torch.where(on_max, t1, xc.argmax(1, keepdim=True))
        d = xc - m
        if c == x.dtype:
            # x − m rounds when x and m differ in magnitude, and exp turns that absolute
            # error into a relative one of |x − m|·eps (hundreds of ULPs): carry the
            # rounding error of the subtraction (TwoSum), exp(d + err) ≈ exp(d)·(1 + err).
            # Inputs computed in a wider type do not need it: the terms that survive
            # rounding to the dtype have |x − m| < 104 (float32, in float64: an error
            # < 2**-46) or < 92 (half, in float32: < 2**-17).
            # err = (x − (d − bb)) + (−m − bb), bb = d − x, formed in place (this is the
            # hot loop of float64 inputs: each (N, C) temporary costs a pass over memory).
            bb = d - xc
            err = d - bb
            torch.sub(xc, err, out=err)
            err.add_(bb.neg_().sub_(m))
            # err is NaN where d is infinite (−inf logits, x − m overflowing): exp(d) is 0
            # or NaN there and the correction moot. Zeroed in place, and exp(d)·(1 + err)
            # formed as one in-place exp(d) + exp(d)·err.
            err.nan_to_num_(0.0, 0.0, 0.0)
            e = torch.exp(d)
            e.addcmul_(e, err)
        else:
            e = torch.exp(d)
        e.scatter_(1, k, 0.0)
        s = e.sum(1, keepdim=True)
        lse = torch.log1p(s)
        gap, gap_low = two_sum(m, -xt)
        total, total_low = two_sum(gap, lse)
        # x_t = m: the loss is log1p(s) (0 − 0 is 0 anyway; inf − inf would be NaN).
        # m = +inf above x_t: +inf, whatever s (NaN when several logits are +inf).
        loss = torch.where(on_max, lse, torch.where(m == math.inf, gap, total)).squeeze(1)
        # The rounding errors of both additions, for the reduction (see reduce_accurate).
        low = torch.where(on_max, 0.0, gap_low + total_low).squeeze(1)
        ctx.save_for_backward(e, s, k, t1, m)
        ctx.meta = (reduction, x.dtype)
        return reduce_accurate(loss, reduction, x.dtype, low)

    @staticmethod
    def backward(ctx, grad_output):
        e, s, k, t1, m = ctx.saved_tensors
        reduction, dtype = ctx.meta
        total = 1 + s
        # A +inf maximum: the finite logits have probability 0 whatever the split between
        # several +inf ones (s NaN), so divide the (0 or NaN) e_j by 1, not by NaN; p_k is
        # 1/total, 1 for a unique +inf and NaN (undefined) for several.
        denom = torch.where(m == math.inf, 1.0, total)
        g = (e / denom).scatter(1, k, 1 / total)
        rest = torch.where(t1 == k, s, denom - e.gather(1, t1))
        g = g.scatter(1, t1, -rest / denom)
        g = scale_grad(g, grad_output, reduction, e.shape[0])
        return g.to(dtype), None, None


def stable(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Max-shifted log1p form (no cancellation), computed one precision up, rounded once."""
    return _Stable.apply(x, t, reduction)


def framework(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(x, t, reduction=reduction)


def reference_chunk(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loss and gradient of the summed loss; at ±inf logits, their limits (see `_limits`)."""
    finite = np.isfinite(x)
    if finite.all():
        return _reference_finite(x, t)
    return _reference_limits(x, t, finite)


def _reference_finite(x, t, masked=None):
    # The formulation of `_Stable`, in working precision. In long double (float64
    # targets) x − m is carried as an unevaluated sum (two_diff) so that exp(x − m) keeps
    # full working precision even when the subtraction rounds (x and m of very different
    # magnitudes).
    # `masked`: −inf logits of rows with a finite maximum, probability 0. They are
    # replaced by the row's maximum before the subtraction (inf − inf would be NaN in
    # two_diff) and their exponential set to 0 after it.
    rows = np.arange(x.shape[0])
    one = x.dtype.type(1)
    m = x.max(axis=1)
    xt = x[rows, t]
    k = np.where(xt == m, t, x.argmax(axis=1))
    xs = x if masked is None else np.where(masked, m[:, None], x)
    if x.dtype == np.float64:
        # float64 work means a float32 or half target: the rounding of x − m costs at
        # most |x − m|·2**-53 relative in exp, far below 1/64 ULP of the target (the
        # terms that matter have |x − m| < 745), so the correction is not needed.
        e = np.exp(xs - m[:, None])
    else:
        d, err = R.two_diff(xs, m[:, None])
        e = np.exp(d) * (one + err)
    if masked is not None:
        e[masked] = 0
    e[rows, k] = 0
    s = e.sum(axis=1)
    total = one + s
    loss = (m - xt) + np.log1p(s)  # a −inf target: +inf
    grad = e / total[:, None]
    grad[rows, k] = one / total
    rest = np.where(t == k, s, total - e[rows, t])  # a −inf target: e_t = 0, gradient −1
    grad[rows, t] = -rest / total
    return loss, grad


def _reference_limits(x, t, finite):
    """The limits of loss and gradient where some logits are ±inf.

    * −inf logits have probability 0 (gradient 0); a −inf target gives loss +inf and
      gradient −1 at the target.
    * One +inf logit k takes all the probability: loss 0 and gradient 0 if k is the
      target; else loss +inf, gradient +1 at k and −1 at the target, 0 elsewhere.
    * Two or more +inf logits: the split of the probability between them depends on how
      they grow, so their gradient entries are undefined (NaN); the finite logits still
      have probability 0 (gradient 0, −1 at a finite target), and the loss is +inf for a
      finite target and undefined (NaN) for a +inf one.
    * Every logit −inf (C > 1): undefined, NaN loss and gradient. With C = 1 the loss is
      identically 0 and so is its limit.
    """
    rows = np.arange(x.shape[0])
    w = x.dtype.type
    pos = x == np.inf
    neg = x == -np.inf
    npos = pos.sum(axis=1)
    allneg = neg.all(axis=1)
    special = (npos > 0) | allneg  # rows whose maximum is not finite
    allneg &= x.shape[1] > 1  # a single −inf logit: loss 0 from the zeros below
    # Rows with a finite maximum: the finite formulation with −inf logits masked out.
    # The other rows are computed on zeros (no inf − inf) and replaced below.
    xf = np.where(special[:, None], w(0), x)
    masked = neg & ~special[:, None]
    loss, grad = _reference_finite(xf, t, masked)
    # +inf rows
    target_pos = pos[rows, t]
    lim_loss = np.where(target_pos, np.where(npos == 1, w(0), w(np.nan)), w(np.inf))
    lim_grad = np.where(pos, np.where(npos == 1, w(1), w(np.nan))[:, None], w(0))
    lim_grad[rows, t] -= 1  # NaN − 1 is NaN (no warning): a +inf target among several
    loss = np.where(npos > 0, lim_loss, loss)
    grad = np.where((npos > 0)[:, None], lim_grad, grad)
    # all −inf rows
    loss = np.where(allneg, w(np.nan), loss)
    grad = np.where(allneg[:, None], w(np.nan), grad)
    return loss, grad


LOSS = Loss(
    name="cross_entropy",
    summary="softmax cross entropy over `classes`, class-index targets",
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "−log(exp(x_t) / Σ_j exp(x_j))"),
        "stable": Impl("stable", "stable", stable, "(m − x_t) + log1p(Σ_{j≠argmax} e^{x_j−m}), gradient without cancellation, limits at ±inf"),
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
