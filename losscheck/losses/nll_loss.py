"""Negative log likelihood on log-probabilities (`torch.nn.functional.nll_loss`): the second half
of `log_softmax` + `nll_loss`, as classifiers that return log-probabilities are trained.

ℓ_i = −w_{t_i}·x_{i,t_i}: one product per row, so the element losses are exact (the product
of two dtype values fits in the work precision) and what can go wrong is the reduction: a
mean of many losses accumulated in float16/bfloat16 (the sum passes 65504 long before the mean
does), a denominator Σ w_t rounded in the dtype. The input is log_softmax of the value set's
logits, computed in float64 and rounded once (`Loss.make_input`, input kind
"log_probabilities"); (N, C, d1, d2, …) inputs as torch takes them (`spatial` option).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import doubledouble as D, reference as R
from ..catalog import IGNORE_INDEX, LOSS_INFO
from . import cross_entropy as ce
from .base import Impl, Loss, accumulate_dtype, class_dim_last, compute_dtype, reduce_accurate, reduce_naive


def _picked(x, t, weight, ignore_index, dtype):
    """(−w_t·x_t per row in `dtype`, the mean's denominator Σ w_t over kept rows or None)."""
    _, ignored, safe = ce._targets(t, ignore_index)
    xt = x.to(dtype).gather(1, safe[:, None])[:, 0]
    loss = -xt if weight is None else -(weight.to(dtype)[safe] * xt)
    if ignored is not None:
        loss = torch.where(ignored, 0.0, loss)
    return loss, ce._denominator(t, weight, ignore_index, x.shape[0], dtype)


def naive(x, t, reduction: str = "mean", weight=None, ignore_index: int | None = None) -> torch.Tensor:
    """−w_t·x_t, summed in the dtype and divided by Σ w_t (also in the dtype)."""
    loss, denominator = _picked(x, t, weight, ignore_index, x.dtype)
    return reduce_naive(loss, reduction, denominator)


def stable(x, t, reduction: str = "mean", weight=None, ignore_index: int | None = None) -> torch.Tensor:
    """−w_t·x_t one precision up, the sum and Σ w_t accumulated wide, rounded once."""
    c = compute_dtype(x.dtype, x.device)
    loss, _ = _picked(x, t, weight, ignore_index, c)
    denominator = ce._denominator(t, weight, ignore_index, x.shape[0], accumulate_dtype(x.device))
    return reduce_accurate(loss, reduction, x.dtype, None, denominator)


def framework(x, t, reduction: str = "mean", weight=None, ignore_index: int | None = None) -> torch.Tensor:
    return F.nll_loss(
        x, t, weight=weight, reduction=reduction, ignore_index=IGNORE_INDEX if ignore_index is None else ignore_index
    )


def _reference_tensors(x, t, weight=None, ignore_index: int | None = None):
    """−w_t·x_t (exact in float64: two values of at most 24 bits) and its gradient, −w_t at
    the target. A zero weight removes the row even at x_t = −inf (probability 0); an ignored
    row is 0. float64 tensors (float32/float16/bfloat16 targets)."""
    rows = torch.arange(x.shape[0], device=x.device)
    ignored = torch.zeros_like(t, dtype=torch.bool) if ignore_index is None else t == ignore_index
    safe = torch.where(ignored, 0, t)
    w = torch.ones_like(x[:, 0]) if weight is None else weight.to(x.dtype)[safe]
    w = torch.where(ignored, 0.0, w)
    xt = x[rows, safe]
    loss = R.weigh(-xt, w, xt.isnan())
    grad = torch.zeros_like(x)
    grad[rows, safe] = -w
    return loss, grad


def _reference_extended(x, t, weight=None, ignore_index: int | None = None):
    """`_reference_tensors` in numpy long double (float64 targets): −w_t·x_t to 2**-64."""
    rows = np.arange(x.shape[0])
    ignored = np.zeros(t.shape, dtype=bool) if ignore_index is None else t == ignore_index
    safe = np.where(ignored, 0, t)
    w = np.ones(x.shape[0], dtype=x.dtype) if weight is None else np.asarray(weight, dtype=x.dtype)[safe]
    w = np.where(ignored, x.dtype.type(0), w)
    xt = x[rows, safe]
    loss = R.weigh(-xt, w, np.isnan(xt))
    grad = np.zeros_like(x)
    grad[rows, safe] = -w
    return loss, grad


def _reference_dd(x, t, weight=None, ignore_index: int | None = None):
    """`_reference_tensors` as scaled dds (float64 targets on any device): w_t·x_t exactly
    (TwoProd, hi and lo), the gradient −w_t exact."""
    loss, grad = _reference_tensors(x, t, weight, ignore_index)
    if weight is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        safe = t if ignore_index is None else torch.where(t == ignore_index, 0, t)
        xt, w = x[rows, safe], torch.where(loss == 0, 0.0, weight.to(x.dtype)[safe])
        hi, lo = D.two_prod(-xt, w)
        lo = torch.where(hi.isfinite() & (loss != 0), lo, 0.0)
        loss_dd = (torch.where(loss == 0, loss, hi), lo, torch.zeros_like(hi, dtype=torch.int64))
    else:  # −x_t: exact
        loss_dd = (loss, torch.zeros_like(loss), torch.zeros_like(loss, dtype=torch.int64))
    return loss_dd, (grad, torch.zeros_like(grad), torch.zeros_like(grad, dtype=torch.int64))


def _denominators(t, weight=None, ignore_index: int | None = None):
    return ce.denominators(t, weight, 0.0, ignore_index)


reference_chunk = R.chunk_function(_reference_tensors, _reference_extended, _reference_dd, rowwise=R.always)

INFO = LOSS_INFO["nll_loss"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="nll_loss",
    summary=INFO.summary,
    multiclass=True,
    input_kind="log_probabilities",
    implementations={
        "naive": Impl("naive", "naive", class_dim_last(naive), "−w_t·x_t, sum and Σ w_t in the dtype"),
        "stable": Impl("stable", "stable", class_dim_last(stable), "−w_t·x_t, accumulated wide, rounded once"),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.nll_loss"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    denominators=_denominators,
)
