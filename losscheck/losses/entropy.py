"""The entropy of softmax(x) per row, H = −Σ_j p_j log p_j in nats, of (N, V) logits: the
entropy bonus of PPO/GRPO trainers and a common monitoring statistic. The target is not used
(class indices are passed, as for every multi-class loss, and ignored).

`naive` is the printed formula in the dtype: where a probability underflows to 0, 0·log 0 is
NaN (the loss and its gradient), at ordinary logit spreads in float16/bfloat16. `stable`
evaluates divergence.entropy_rows — H = log1p(s) + Σ p_j (m − x_j), non-negative terms only —
one precision up, gradient explicit, rounded once. `torch` is
torch.distributions.Categorical(logits=x).entropy(), which clamps the log-probabilities to the
dtype's most negative finite value (0 times a finite number, no NaN). The reference is
entropy_rows in float64 (long double for float64 points), see divergence.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as R
from ..catalog import LOSS_INFO
from .base import Impl, Loss, reduce_accurate, reduce_naive, scale_grad
from .divergence import entropy_rows, narrow, widen, with_exact


def naive(x, t=None, reduction="mean"):
    """p = softmax(x), −Σ p log p in the dtype."""
    p = torch.softmax(x, -1)
    return reduce_naive(-(p * torch.log(p)).sum(-1), reduction)


class _Stable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, reduction):
        with np.errstate(all="ignore"):
            h, g = entropy_rows(widen(x))
        ctx.save_for_backward(narrow(g, x)[0])
        ctx.reduction = reduction
        hi, lo = narrow(h, x)
        return reduce_accurate(hi, reduction, x.dtype, lo)

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return scale_grad(g, grad_output, ctx.reduction, g.shape[0]).to(grad_output.dtype), None


def stable(x, t=None, reduction="mean"):
    """log1p(s) + Σ p (m − x), one precision up, explicit gradient p (a − ā), rounded once."""
    return _Stable.apply(x, reduction)


def framework(x, t=None, reduction="mean"):
    """torch.distributions.Categorical(logits=x).entropy()."""
    h = torch.distributions.Categorical(logits=x, validate_args=False).entropy()
    return h if reduction == "none" else h.sum() if reduction == "sum" else h.mean()


def _reference_chunk(x, t=None, **options):
    return entropy_rows(x)


reference_chunk = R.chunk_function(_reference_chunk, _reference_chunk)


def _rows(x, t):
    return entropy_rows(x)[0]


INFO = LOSS_INFO["entropy"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="entropy",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "−Σ softmax(x)·log softmax(x) in the dtype"),
        "stable": Impl("stable", "stable", stable, "log1p(s) + Σ p (m − x), one precision up, rounded once"),
        "torch": Impl("torch", "framework", framework, "torch.distributions.Categorical(logits=x).entropy()"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    reference_fn=with_exact(_rows),
)
