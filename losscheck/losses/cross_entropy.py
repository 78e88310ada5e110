"""Softmax cross entropy over C classes, with class-index targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as R
from ..catalog import IGNORE_INDEX, LOSS_INFO
from . import cross_entropy_dd, cross_entropy_lm as lm
from .base import (
    Impl,
    Loss,
    accumulate_dtype,
    class_dim_last,
    compute_dtype,
    reduce_accurate,
    reduce_naive,
    scale_grad,
    two_sum,
)
from .cross_entropy_extended import _denominators_extended, _reference_extended

# Rows per block of `stable`: at most this many values in the compute precision at once,
# so that a 512 × 128k float32 point needs a few MiB of float64 work space, not 512 MiB.
BLOCK_ELEMENTS = 1 << 20
# Inputs of at most this many values keep exp(x − m) from the forward for the backward
# (32 MiB in float64); larger ones recompute it block by block (bounded memory).
KEEP_ELEMENTS = 1 << 22


def _targets(t, ignore_index):
    """(soft, ignored rows or None, class indices safe to gather with)."""
    if t.is_floating_point():
        return True, None, None
    ignored = (t == ignore_index) if ignore_index is not None else None
    safe = t if ignored is None else torch.where(ignored, 0, t)
    return False, ignored, safe


def _denominator(t, weight, ignore_index, n, dtype):
    """The mean's denominator as torch defines it: Σ w_t over the kept targets (a count
    without weights); N for soft targets."""
    soft, ignored, safe = _targets(t, ignore_index)
    if soft:
        return None
    keep = torch.ones_like(safe, dtype=dtype) if ignored is None else (~ignored).to(dtype)
    if weight is not None:
        keep = keep * weight.to(dtype)[safe]
    if ignored is None and weight is None:
        return None
    return keep.sum()


def naive(
    x: torch.Tensor,
    t: torch.Tensor,
    reduction: str = "mean",
    weight=None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """−Σ_j w_j q_j log p_j with p = exp(x)/Σ exp(x) and q the one-hot (or soft, or
    smoothed) target, as printed; the mean divided by Σ w_t."""
    e = torch.exp(x)
    soft, ignored, safe = _targets(t, ignore_index)
    c = x.shape[1]
    if soft or label_smoothing:
        p = e / e.sum(1, keepdim=True)
        q = t if soft else F.one_hot(safe, c).to(x.dtype)
        if label_smoothing:
            q = (1 - label_smoothing) * q + label_smoothing / c
        wq = q if weight is None else q * weight
        if not soft and weight is not None:
            # torch weights the target term by w_t and the smoothing term by each w_j.
            wq = (1 - label_smoothing) * weight[safe][:, None] * F.one_hot(safe, c) + label_smoothing / c * weight
        loss = -(wq * torch.log(p)).sum(1)
    else:
        loss = -torch.log(e.gather(1, safe[:, None]).squeeze(1) / e.sum(1))
        if weight is not None:
            loss = weight[safe] * loss
    if ignored is not None:
        loss = torch.where(ignored, 0.0, loss)
    return reduce_naive(loss, reduction, _denominator(t, weight, ignore_index, x.shape[0], x.dtype))


def _shifted_exp(xc, m, native):
    """exp(x − m), with the rounding error of x − m carried where x − m is computed in the
    dtype itself (see `_Stable`)."""
    d = xc - m
    if not native:
        return torch.exp(d)
    # x − m rounds when x and m differ in magnitude, and exp turns that absolute error
    # into a relative one of |x − m|·eps (hundreds of ULPs): carry the rounding error of
    # the subtraction (TwoSum), exp(d + err) ≈ exp(d)·(1 + err). Inputs computed in a
    # wider type do not need it: the terms that survive rounding to the dtype have
    # |x − m| < 104 (float32, in float64: an error < 2**-46) or < 92 (half, in float32).
    # err = (x − (d − bb)) + (−m − bb), bb = d − x, formed in place (this is the hot loop
    # of float64 inputs: each (N, C) temporary costs a pass over memory).
    bb = d - xc
    err = d - bb
    torch.sub(xc, err, out=err)
    err.add_(bb.neg_().sub_(m))
    # err is NaN where d is infinite (−inf logits, x − m overflowing): exp(d) is 0 or NaN
    # there and the correction moot. Zeroed in place, and exp(d)·(1 + err) formed as one
    # in-place exp(d) + exp(d)·err.
    err.nan_to_num_(0.0, 0.0, 0.0)
    e = torch.exp(d)
    e.addcmul_(e, err)
    return e


def _blocks(n, c):
    step = max(1, BLOCK_ELEMENTS // max(1, c))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class _Stable(torch.autograd.Function):
    # With m = max_j x_j and k the target if it attains the max (else an argmax):
    #   loss = (m − x_t) + log1p(s),  s = Σ_{j≠k} exp(x_j − m)
    # Both terms are ≥ 0, so nothing cancels: a confident correct prediction gets
    # loss ≈ s to full precision where logsumexp(x) − x_t would round to 0.
    # Gradient: p_j = exp(x_j − m)/(1 + s), and p_t − 1 = −(1 + s − exp(x_t − m))/(1 + s),
    # i.e. −Σ_{j≠t} p_j, again without cancellation.
    #
    # Options: a class weight multiplies the row's loss and gradient by w_t (ignored rows:
    # 0); soft or smoothed targets q give loss Σ_j c_j·nll_j with c_j = w_j·q_j and
    # nll_j = −log p_j = (m − x_j) + log1p(s) ≥ 0 (a sum of non-negative terms), gradient
    # (Σ_j c_j)·p − c. Label smoothing with hard targets is (1 − ε) times the hard row plus
    # ε/C times the soft row of uniform q, as torch defines it.
    #
    # ±inf logits give the limits of `reference_chunk` with no extra pass over the (N, C)
    # values: exp(−inf − m) = 0 already gives a −inf logit probability 0, and a +inf
    # maximum makes exp(x_j − m) 0 for the finite x_j and NaN (inf − inf) for any further
    # +inf logit, so s is 0 for one +inf and NaN (undefined) for several. Per-row
    # `torch.where`s on (N, 1) tensors then turn (m − x_t) = inf − inf into 0 and keep a
    # finite target's loss +inf; see the backward for the gradient.
    #
    # Memory: rows are processed in blocks of BLOCK_ELEMENTS values; beyond KEEP_ELEMENTS
    # only per-row numbers (m, s, k) are kept for the backward, which recomputes exp(x − m)
    # block by block (the same values: the backward is bit for bit the same either way).
    @staticmethod
    def forward(ctx, x, t, reduction, weight=None, label_smoothing=0.0, ignore_index=None):
        c = compute_dtype(x.dtype, x.device)
        n, classes = x.shape
        soft, ignored, safe = _targets(t, ignore_index)
        wc = None if weight is None else weight.to(c)
        loss = torch.empty(n, dtype=c, device=x.device)
        low = torch.zeros(n, dtype=c, device=x.device)
        m_all = torch.empty(n, 1, dtype=c, device=x.device)
        s_all = torch.empty(n, 1, dtype=c, device=x.device)
        k_all = torch.empty(n, 1, dtype=torch.int64, device=x.device)
        kept: list | None = [] if n * classes <= KEEP_ELEMENTS else None
        for rows in _blocks(n, classes):
            xc = x[rows].to(c)
            m = xc.amax(1, keepdim=True)
            k = xc.argmax(1, keepdim=True)
            if not soft:
                t1 = safe[rows][:, None]
                xt = xc.gather(1, t1)
                on_max = xt == m
                k = torch.where(on_max, t1, k)
            e = _shifted_exp(xc, m, c == x.dtype)
            e.scatter_(1, k, 0.0)
            if kept is not None:
                kept.append(e)
            s = e.sum(1, keepdim=True)
            lse = torch.log1p(s)
            m_all[rows], s_all[rows], k_all[rows] = m, s, k
            if not soft:
                gap, gap_low = two_sum(m, -xt)
                total, total_low = two_sum(gap, lse)
                # x_t = m: the loss is log1p(s) (0 − 0 is 0 anyway; inf − inf would be NaN).
                # m = +inf above x_t: +inf, whatever s (NaN when several logits are +inf).
                hard = torch.where(on_max, lse, torch.where(m == math.inf, gap, total)).squeeze(1)
                # The rounding errors of both additions, for the reduction (see reduce_accurate).
                hard_low = torch.where(on_max, 0.0, gap_low + total_low).squeeze(1)
                if wc is not None:
                    # A zero class weight removes the row (0, no error term) even where its
                    # loss is +inf or has no limit; a NaN logit (m NaN) stays undefined.
                    wt = wc[safe[rows]]
                    drop = (wt == 0) & ~m.squeeze(1).isnan()
                    hard = torch.where(drop, 0.0, hard * wt)
                    hard_low = torch.where(drop, 0.0, hard_low * wt)
                if label_smoothing:
                    hard = (1 - label_smoothing) * hard + label_smoothing / classes * _weighted_nll(xc, m, lse, wc)
                    hard_low = (1 - label_smoothing) * hard_low
                loss[rows], low[rows] = hard, hard_low
            else:
                q = t[rows].to(c)
                if label_smoothing:
                    q = (1 - label_smoothing) * q + label_smoothing / classes
                loss[rows] = _weighted_nll(xc, m, lse, q if wc is None else q * wc)
        if ignored is not None:
            loss = torch.where(ignored, 0.0, loss)
            low = torch.where(ignored, 0.0, low)
        denominator = _denominator(t, weight, ignore_index, n, accumulate_dtype(x.device))
        ctx.save_for_backward(x, t, m_all, s_all, k_all, weight, denominator)
        ctx.meta = (reduction, label_smoothing, ignore_index)
        ctx.kept = kept
        return reduce_accurate(loss, reduction, x.dtype, low, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        x, t, m_all, s_all, k_all, weight, denominator = ctx.saved_tensors
        reduction, label_smoothing, ignore_index = ctx.meta
        c = compute_dtype(x.dtype, x.device)
        n, classes = x.shape
        soft, ignored, safe = _targets(t, ignore_index)
        wc = None if weight is None else weight.to(c)
        grad = torch.empty_like(x)
        scale = denominator if denominator is not None else n
        kept, ctx.kept = ctx.kept, None
        for i, rows in enumerate(_blocks(n, classes)):
            m, s, k = m_all[rows], s_all[rows], k_all[rows]
            if kept is not None:
                e = kept[i]
            else:
                e = _shifted_exp(x[rows].to(c), m, c == x.dtype)
                e.scatter_(1, k, 0.0)
            total = 1 + s
            # A +inf maximum: the finite logits have probability 0 whatever the split between
            # several +inf ones (s NaN), so divide the (0 or NaN) e_j by 1, not by NaN; p_k is
            # 1/total, 1 for a unique +inf and NaN (undefined) for several.
            denom = torch.where(m == math.inf, 1.0, total)
            p = (e / denom).scatter(1, k, 1 / total)
            if soft:
                q = t[rows].to(c)
                if label_smoothing:
                    q = (1 - label_smoothing) * q + label_smoothing / classes
                cw = q if wc is None else q * wc
                total_c = cw.sum(1, keepdim=True)
                # Every coefficient 0: the row is removed, gradient 0 even where p is
                # undefined (several +inf logits).
                g = torch.where((total_c == 0) & ~m.isnan(), 0.0, total_c * p - cw)
            else:
                t1 = safe[rows][:, None]
                rest = torch.where(t1 == k, s, denom - e.gather(1, t1))
                g = p.scatter(1, t1, -rest / denom)
                if wc is not None:
                    wt = wc[safe[rows]][:, None]
                    g = torch.where((wt == 0) & ~m.isnan(), 0.0, g * wt)  # as in the forward
                if label_smoothing:
                    w_all = wc if wc is not None else torch.ones(classes, dtype=c, device=x.device)
                    smooth = w_all.sum() * p - w_all
                    g = (1 - label_smoothing) * g + label_smoothing / classes * smooth
                if ignored is not None:
                    g = torch.where(ignored[rows][:, None], 0.0, g)
            u = grad_output if grad_output.dim() == 0 else grad_output[rows]
            grad[rows] = scale_grad(g, u, reduction, scale).to(x.dtype)
        return grad, None, None, None, None, None


def _weighted_nll(xc, m, lse, cw):
    """Σ_j c_j·(−log p_j), −log p_j = (m − x_j) + log1p(s) ≥ 0; c_j = 0 terms are left out
    (0·inf would be NaN at a −inf logit); c_j is a row (N, C) or the class weights (C,)."""
    # m = +inf above a finite x_j: p_j = 0, −log p_j = +inf (not inf + NaN when several
    # logits are +inf and s is NaN), as the reference's limit.
    nll = torch.where(xc == m, lse, torch.where(m == math.inf, math.inf, (m - xc) + lse))
    if cw is None:
        return nll.sum(1)
    cw = cw.expand_as(nll)
    return torch.where(cw > 0, cw * nll, 0.0).sum(1)


def stable(
    x: torch.Tensor,
    t: torch.Tensor,
    reduction: str = "mean",
    weight=None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Max-shifted log1p form (no cancellation), computed one precision up in blocks of rows, rounded once."""
    return _Stable.apply(x, t, reduction, weight, label_smoothing, ignore_index)


def framework(
    x: torch.Tensor,
    t: torch.Tensor,
    reduction: str = "mean",
    weight=None,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    return F.cross_entropy(
        x,
        t,
        weight=weight,
        reduction=reduction,
        label_smoothing=label_smoothing,
        ignore_index=IGNORE_INDEX if ignore_index is None else ignore_index,
    )


def _reference_tensors(
    x: torch.Tensor, t: torch.Tensor, weight=None, label_smoothing: float = 0.0, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of the summed loss; at ±inf logits, their limits (see `_limits`).

    Options as torch defines them: the row of a hard target t is w_t·(−log p_t), with label
    smoothing ε (1 − ε)·w_t·(−log p_t) + (ε/C)·Σ_j w_j·(−log p_j); an ignored row is 0;
    soft targets q (rows of probabilities, smoothed to (1 − ε)q + ε/C) give
    Σ_j w_j·q_j·(−log p_j). The gradient of Σ_j c_j·(−log p_j) is (Σ_j c_j)·p − c.

    float64 tensors on any device (float32/float16/bfloat16 targets). For float64 targets the
    same formulation in numpy long double (`cross_entropy_extended`) or double-double
    (`cross_entropy_dd`), see `reference.path`.
    """
    classes = x.shape[1]
    if t.is_floating_point():  # soft targets
        q = t.to(x.dtype)
        if label_smoothing:
            q = (1.0 - label_smoothing) * q + label_smoothing / classes
        return _weighted(x, q if weight is None else q * weight)
    ignored = None if ignore_index is None else t == ignore_index
    safe = t if ignored is None else torch.where(ignored, 0, t)
    # Every logit finite iff each row's max and min are (NaN propagates through both): two
    # reductions instead of an elementwise test. One read of a flag per chunk (a device
    # synchronisation on CUDA): the limits' extra passes are paid only by chunks with a
    # ±inf (or NaN) logit.
    m, am = x.max(1)
    finite = m.isfinite().all() & x.amin(1).isfinite().all()
    loss, grad = _finite(x, safe, top=(m, am)) if bool(finite) else _limits(x, safe)
    if weight is not None:
        # A zero class weight removes the row: 0 and gradient 0 even at an infinite loss
        # (a −inf target logit) or one without a limit (several +inf logits), as for the
        # binary losses; a row with a NaN logit stays undefined.
        wt = weight[safe]
        nan_row = x.isnan().any(1)
        loss, grad = R.weigh(loss, wt, nan_row), R.weigh(grad, wt[:, None], nan_row[:, None])
    if label_smoothing:
        eps = label_smoothing
        cw = torch.ones(classes, dtype=x.dtype, device=x.device) if weight is None else weight
        s_loss, s_grad = _weighted(x, cw.expand(x.shape))
        loss = (1.0 - eps) * loss + eps / classes * s_loss
        grad = (1.0 - eps) * grad + eps / classes * s_grad
    if ignored is not None:
        loss = torch.where(ignored, 0.0, loss)
        grad = torch.where(ignored[:, None], 0.0, grad)
    return loss, grad


def _denominators_tensors(
    t: torch.Tensor, weight=None, label_smoothing: float = 0.0, ignore_index: int | None = None
) -> torch.Tensor:
    """Each row's share of the mean's denominator (torch): w_t, or 1, for a kept hard
    target, 0 for an ignored one; 1 for soft targets. float64, on the targets' device."""
    ones = torch.ones(t.shape[0], dtype=torch.float64, device=t.device)
    if t.is_floating_point():
        return ones
    keep = ones if ignore_index is None else (t != ignore_index).to(torch.float64)
    if weight is None:
        return keep
    safe = t if ignore_index is None else torch.where(t == ignore_index, 0, t)
    return keep * weight.to(torch.float64)[safe]


def _weighted(x, cw):
    """Σ_j c_j·(−log p_j) and its gradient (Σ_j c_j)·p − c, with the limits at ±inf logits:
    −log p_j is +inf for a logit of probability 0 (a −inf logit, or any finite one beside a
    +inf), 0 for a unique +inf logit, undefined (NaN) where the split is undefined. Terms
    with c_j = 0 are left out (0·inf)."""
    nll, p = _nll_and_probabilities(x)
    loss = torch.where(cw > 0, cw * nll, 0.0).sum(1)
    total = cw.sum(1)[:, None]
    # Every coefficient 0 (a zero-weighted soft row): removed, gradient 0 even where p has
    # no limit (several +inf logits); a NaN logit stays undefined.
    grad = R.weigh(total * p - cw, (total != 0).to(x.dtype), x.isnan().any(1)[:, None])
    return loss, grad


def _nll_and_probabilities(x):
    """−log p_j and p_j = softmax(x)_j in working precision, with their limits where logits
    are ±inf. (float64 work is for float32 or half targets: the rounding of x − m costs at
    most |x − m|·2**-53 relative in exp, far below 1/64 ULP of the target — see `_finite`.)"""
    rows = torch.arange(x.shape[0], device=x.device)
    pos, neg = x == math.inf, x == -math.inf
    npos = pos.sum(1)
    allneg = neg.all(1)
    special = (npos > 0) | allneg  # rows whose maximum is not finite
    xf = torch.where(special[:, None], 0.0, x)
    masked = neg & ~special[:, None]
    unmasked = torch.where(masked, -math.inf, xf)
    m, k = unmasked.amax(1), unmasked.argmax(1)  # k: never a masked logit
    xs = torch.where(masked, m[:, None], xf)
    e = torch.exp(xs - m[:, None])
    e.masked_fill_(masked, 0.0)
    e[rows, k] = 0.0
    s = e.sum(1)
    lse = torch.log1p(s)
    e[rows, k] = 1.0
    p = e / (1 + s)[:, None]
    gap = m[:, None] - xs
    gap[rows, k] = 0.0
    nll = torch.where(masked, math.inf, gap + lse[:, None])
    # +inf rows: a unique +inf takes all the probability; several share it in an undefined
    # way (NaN for them), but the finite logits beside them have probability 0 either way
    # (−log p = +inf), as in `_limits` and `_Stable`. Every logit −inf: undefined.
    one = (npos == 1)[:, None]
    several = torch.where(pos, math.nan, 0.0).to(x.dtype)
    p = torch.where(special[:, None], torch.where(one, pos.to(x.dtype), several), p)
    nll = torch.where(special[:, None], torch.where(pos, torch.where(one, 0.0, math.nan), math.inf).to(x.dtype), nll)
    p = torch.where(allneg[:, None], math.nan, p)
    nll = torch.where(allneg[:, None], math.nan, nll)
    return nll, p


def _finite(x, t, masked=None, top=None):
    # The formulation of `_Stable`, in working precision: float64 work means a float32 or
    # half target, where the rounding of x − m costs at most |x − m|·2**-53 relative in exp,
    # far below 1/64 ULP of the target (the terms that matter have |x − m| < 745), so x − m
    # needs no correction term (the extended path carries one: `two_diff`).
    # `masked`: −inf logits of rows with a finite maximum, probability 0. They are
    # replaced by the row's maximum before the subtraction and their exponential set to 0
    # after it. `top`: each row's max and its (first) argmax, when already known.
    # (N, C) temporaries are formed in place: each one costs a pass over memory.
    rows = torch.arange(x.shape[0], device=x.device)
    m, am = x.max(1) if top is None else top
    xt = x[rows, t]
    k = torch.where(xt == m, t, am)
    xs = x if masked is None else torch.where(masked, m[:, None], x)
    e = torch.sub(xs, m[:, None]).exp_()
    if masked is not None:
        e.masked_fill_(masked, 0.0)
    e[rows, k] = 0.0
    s = e.sum(1)
    total = 1 + s
    loss = (m - xt) + torch.log1p(s)  # a −inf target: +inf
    et = e[rows, t]
    grad = e.div_(total[:, None])
    grad[rows, k] = torch.reciprocal(total)
    rest = torch.where(t == k, s, total - et)  # a −inf target: e_t = 0, gradient −1
    grad[rows, t] = -rest / total
    return loss, grad


def _limits(x, t):
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
    rows = torch.arange(x.shape[0], device=x.device)
    pos = x == math.inf
    neg = x == -math.inf
    npos = pos.sum(1)
    allneg = neg.all(1)
    special = (npos > 0) | allneg  # rows whose maximum is not finite
    allneg &= x.shape[1] > 1  # a single −inf logit: loss 0 from the zeros below
    # Rows with a finite maximum: the finite formulation with −inf logits masked out.
    # The other rows are computed on zeros (no inf − inf) and replaced below.
    xf = torch.where(special[:, None], 0.0, x)
    masked = neg & ~special[:, None]
    loss, grad = _finite(xf, t, masked)
    target_pos = pos[rows, t]
    lim_loss = torch.where(target_pos, torch.where(npos == 1, 0.0, math.nan), math.inf).to(x.dtype)
    lim_grad = torch.where(pos, torch.where(npos == 1, 1.0, math.nan)[:, None], 0.0).to(x.dtype)
    lim_grad[rows, t] -= 1  # NaN − 1 is NaN: a +inf target among several
    loss = torch.where(npos > 0, lim_loss, loss)
    grad = torch.where((npos > 0)[:, None], lim_grad, grad)
    loss = torch.where(allneg, math.nan, loss)
    grad = torch.where(allneg[:, None], math.nan, grad)
    return loss, grad


# With the LM options (z_loss, softcap, smoothing_convention: cross_entropy_lm.py) around them.
reference_chunk = R.chunk_function(
    lm.reference(_reference_tensors),
    lm.reference(_reference_extended),
    lm.reference_dd(cross_entropy_dd.reference_dd),
    rowwise=R.always,
)
naive_lm, stable_lm, framework_lm = lm.naive(naive), lm.stable(stable), lm.framework(framework)
denominators = R.chunk_function(
    *(lm.ignoring(f) for f in (_denominators_tensors, _denominators_extended, _denominators_tensors))
)


INFO = LOSS_INFO["cross_entropy"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="cross_entropy",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", class_dim_last(naive_lm), "−log(exp(x_t) / Σ_j exp(x_j))"),
        "stable": Impl(
            "stable",
            "stable",
            class_dim_last(stable_lm),
            "(m − x_t) + log1p(Σ_{j≠argmax} e^{x_j−m}), gradient without cancellation, limits at ±inf",
        ),
        "torch": Impl("torch", "framework", framework_lm, "torch.nn.functional.cross_entropy"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    denominators=denominators,
)
