"""log_softmax over a chosen dimension: a function with a tensor output, audited as a loss whose
elements are the output's (METRICS.md "Tensor outputs").

Its "loss" for reduction "none" is the output tensor itself, shaped like the input, compared
with the reference element by element; "sum" and "mean" are the sum and the mean of every
output element. The audited gradient is that of Σ g·out (g: the point's upstream gradient,
ones by default), the vector-Jacobian product g − softmax(x)·Σ_j g_j along `dim` — a row's
gradient is not a multiple of the gradient of its sum, so the reference takes g itself
(`Loss.elementwise`).

`dim` (option): -1, the value set's rows along the last dimension of an (N, C) input; 0, the
same rows as the columns of a (C, N) input (torch's kernel for a non-last dimension is
another code path: pytorch#29429, #158310).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import doubledouble as D, reference as R
from ..catalog import LOSS_INFO
from .base import Impl, Loss, compute_dtype, reduce_accurate, reduce_naive


def naive(x, t=None, reduction: str = "mean", dim: int = -1) -> torch.Tensor:
    """x − log Σ exp(x), as printed, in the dtype (overflows for logits above ~88 in float32)."""
    out = x - torch.log(torch.exp(x).sum(dim, keepdim=True))
    return reduce_naive(out.reshape(-1), reduction).reshape(x.shape if reduction == "none" else ())


class _Stable(torch.autograd.Function):
    """(x_j − x_a) − log1p(r), r = Σ_{k≠a} e^{x_k − x_a}, a the argmax, in the compute dtype;
    log1p, not log: the dominant entry's −r (−1e-16 for a gap of 37) is 0 through
    log Σ e^{x_k − m}, as torch.log_softmax computes it. The backward g_j − p_j·Σg, with the
    dominant entry as (g_a·r − Σ_{k≠a} g_k)/(1 + r): 1 − p_a would cancel (p_a ≈ 1).
    −inf logits are masked by exp; rows with +inf logits get their limits."""

    @staticmethod
    def forward(ctx, x, dim):
        xc = x.to(compute_dtype(x.dtype, x.device))
        # Rows with +inf logits: their limits (METRICS.md "Tensor outputs"), computed on zeros.
        pos = xc == math.inf
        npos = pos.sum(dim, keepdim=True)
        xc = torch.where(npos > 0, 0.0, xc)
        a = xc.argmax(dim, keepdim=True)
        shifted = xc - xc.gather(dim, a)
        e = torch.exp(shifted).scatter(dim, a, 0.0)
        r = e.sum(dim, keepdim=True)
        # The limit's probabilities: 1 at a unique +inf, NaN at several (undefined split), 0 beside.
        p_inf = torch.where(pos, torch.where(npos == 1, 1.0, math.nan), 0.0).to(xc.dtype)
        ctx.save_for_backward(e, r, a, npos, p_inf)
        ctx.dim = dim
        out = shifted - torch.log1p(r)
        return torch.where(npos > 0, torch.where(pos, torch.where(npos == 1, 0.0, math.nan), -math.inf), out)

    @staticmethod
    def backward(ctx, g):
        e, r, a, npos, p_inf = ctx.saved_tensors
        dim = ctx.dim
        g = g.to(e.dtype)
        total = 1 + r
        others = g.scatter(dim, a, 0.0).sum(dim, keepdim=True)  # Σ_{k≠a} g_k
        g_a = g.gather(dim, a)
        grad = g - e * ((g_a + others) / total)
        grad = grad.scatter(dim, a, (g_a * r - others) / total)
        # +inf rows: g_j − p_j·Σg, i.e. g_j beside the +inf and −Σ_{k≠j} g_k at a unique one.
        limit = torch.where(p_inf == 0, g, g - p_inf * g.sum(dim, keepdim=True))
        return torch.where(npos > 0, limit, grad), None


def stable(x, t=None, reduction: str = "mean", dim: int = -1) -> torch.Tensor:
    """The log1p form one precision up, its gradient explicit (`_Stable`), rounded once."""
    out = _Stable.apply(x, dim)
    if reduction == "none":
        return out.to(x.dtype)
    return reduce_accurate(out, reduction, x.dtype)


def framework(x, t=None, reduction: str = "mean", dim: int = -1) -> torch.Tensor:
    out = F.log_softmax(x, dim)
    if reduction == "none":
        return out
    return out.sum() if reduction == "sum" else out.mean()


def _scaled_reference(x: torch.Tensor, g: torch.Tensor | None):
    """(out, grad) of float64 rows (R, C) as scaled dds (hi, lo, k): out_j = (x_j − m) − log1p(r),
    r = Σ_{k≠argmax} exp(x_k − m) (no cancellation: both terms ≤ 0), and g_j − p_j·Σ g with
    p_j = exp(x_j − m)/s carried scaled (a subnormal product rounds correctly). Limits at ±inf
    logits: a −inf logit has out −inf, p 0; a unique +inf logit out 0, p 1 (the others −inf, 0);
    several +inf: NaN for them; every logit −inf (C > 1): NaN."""
    g = torch.ones_like(x) if g is None else g.to(x.dtype)
    pos, neg = x == math.inf, x == -math.inf
    npos = pos.sum(1, keepdim=True)
    allneg = neg.all(1, keepdim=True) & (x.shape[1] > 1)
    special = (npos > 0) | allneg | x.isnan().any(1, keepdim=True)
    # −inf logits take the row's (finite) maximum, masked after the exponential; the rows
    # replaced by their limits below are computed on zeros.
    finite_max = torch.where(neg | special, -math.inf, x).amax(1, keepdim=True)
    xs = torch.where(special, 0.0, torch.where(neg, finite_max, x))
    m, a = torch.where(neg, -math.inf, xs).max(1, keepdim=True)  # a: never a masked logit
    m = torch.where(special, 0.0, m)
    d = D.two_sum(xs, -m)  # x − m exactly
    eh, el, ek = D.exp_scaled(d)
    eh, el = eh.masked_fill(neg, 0.0), el.masked_fill(neg, 0.0)
    # r = Σ_{k≠a} e^{x_k − m} and log s = log1p(r): s = 1 + r as a dd would keep r only to
    # 2**-106 absolute, which for r = 1e-23 is a relative 1e-10 (the dominant entry's −r).
    e = (D.ldexp(eh, ek).scatter(1, a, 0.0), D.ldexp(el, ek).scatter(1, a, 0.0))
    r = D.row_sum(e)
    s = D.add(D.dd(torch.ones_like(r[0])), r)
    log_s = D.log1p(r)
    out = D.sub(d, (log_s[0][:, None].expand_as(x), log_s[1][:, None].expand_as(x)))
    total = D.row_sum((g, torch.zeros_like(g)))
    # p_j·Σg = e_j·(Σg/s), e_j scaled.
    ratio = D.div(total, s)
    ph, pl = D.mul((eh, el), (ratio[0][:, None].expand_as(x), ratio[1][:, None].expand_as(x)))
    diff = D.sub(D.dd(g), (D.ldexp(ph, ek), D.ldexp(pl, ek)))
    zeros = torch.zeros_like(ek)
    grad = D.where_scaled(g == 0, (-ph, -pl, ek), (*diff, zeros))
    out = D.where_scaled(neg, D.exact_scaled(-math.inf, x), (*out, zeros))
    # Rows with +inf logits, every logit −inf, or a NaN: their limits (or NaN).
    one = npos == 1
    lim_out = torch.where(pos, torch.where(one, 0.0, math.nan), -math.inf)
    lim_p = torch.where(pos, torch.where(one, 1.0, math.nan), 0.0)
    # g_j − p_j·Σg: g_j for p_j = 0; for a unique +inf, g_k − Σg in dd (one rounding).
    lim_hi, lim_lo = D.sub(D.dd(g), (total[0][:, None].expand_as(x), total[1][:, None].expand_as(x)))
    lim_grad = torch.where(lim_p == 1, lim_hi, g - lim_p * total[0][:, None])
    lim_lo = torch.where(lim_p == 1, lim_lo, 0.0)
    undefined = allneg | x.isnan().any(1, keepdim=True)
    lim_out = torch.where(undefined, math.nan, lim_out)
    lim_grad = torch.where(undefined, math.nan, lim_grad)
    out = D.where_scaled(special.expand_as(x), (lim_out, torch.zeros_like(x), zeros), out)
    grad = D.where_scaled(special.expand_as(x), (lim_grad, lim_lo, zeros), grad)
    return out, grad


def _reference_tensors(x, t=None, grad_output=None):
    """float64 (float32/float16/bfloat16 targets): the double-double values rounded once to float64."""
    out, grad = _scaled_reference(x, grad_output)
    return D.round_scaled(*out), D.round_scaled(*grad)


def _reference_extended(x, t=None, grad_output=None):
    """float64 targets on the host: the double-double values, hi + lo, in long double."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    g = None if grad_output is None else torch.from_numpy(np.ascontiguousarray(grad_output, dtype=np.float64))
    w = x.dtype.type

    def ld(a):
        hi, lo, k = (v.numpy() for v in a)
        return np.ldexp(hi.astype(w) + lo.astype(w), k)

    out, grad = _scaled_reference(xt, g)
    return ld(out), ld(grad)


def _reference_dd(x, t=None, grad_output=None):
    return _scaled_reference(x, grad_output)


reference_chunk = R.chunk_function(_reference_tensors, _reference_extended, _reference_dd)

INFO = LOSS_INFO["log_softmax"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="log_softmax",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "x − log(Σ exp(x)) along dim, in the dtype"),
        "stable": Impl("stable", "stable", stable, "(x − x_max) − log1p(Σ_{k≠max} e^{x_k − x_max}) one precision up"),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.log_softmax(x, dim)"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    elementwise=True,
)
