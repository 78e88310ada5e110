"""Token log-probabilities log softmax(x)_t: what DPO, GRPO and PPO trainers gather from an LLM's
(N, V) logits at the sampled or labelled token (N, V = vocabulary). The value is in nats (<= 0);
`mean` averages the rows. It is −cross_entropy exactly, so its reference is cross_entropy's,
negated (certified there), and `stable` is cross_entropy's, negated.

Implementations: `naive` log(softmax(x))[t] in the dtype (underflows to −inf where the
probability does); `stable`; `torch` log_softmax(x).gather(t), the form that holds the (N, V)
log-probabilities. `gather_logsumexp` is the memory-saving form of TRL #2799 / OpenRLHF #718
(x_t − logsumexp(x): no (N, V) output), shipped for auditing as a custom implementation
(`--impl token_logprobs=losscheck.losses.token_logprobs:gather_logsumexp`): in bfloat16 both
terms are rounded to 8 bits before they are subtracted, and the difference, a log-probability
near 0, loses what the two large terms rounded away (genlm-backend #66's 0.126 nats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as R
from ..catalog import LOSS_INFO
from . import cross_entropy as ce
from .base import Impl, Loss, reduce_naive
from .divergence import with_exact


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values if reduction == "none" else values.sum() if reduction == "sum" else values.mean()


def naive(x, t, reduction="mean"):
    """log(softmax(x))[t] in the dtype, the mean as −(1/N)·Σ in the dtype."""
    return reduce_naive(torch.log(torch.softmax(x, -1)).gather(-1, t[:, None]).squeeze(-1), reduction)


def stable(x, t, reduction="mean"):
    """−cross_entropy's stable: (x_t − m) − log1p(Σ_{j≠k} e^{x_j − m}) one precision up, rounded once."""
    return -ce.stable(x, t, reduction)


def framework(x, t, reduction="mean"):
    """F.log_softmax(x, -1).gather(-1, t)."""
    return _reduce(F.log_softmax(x, -1).gather(-1, t[:, None]).squeeze(-1), reduction)


def gather_logsumexp(x, t, reduction="mean"):
    """x.gather(t) − torch.logsumexp(x, -1) in the dtype (TRL's selective_log_softmax for
    float32/float64, OpenRLHF #718): no (N, V) log-probabilities held."""
    return _reduce(x.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(x, -1), reduction)


def _negated(fn):
    def chunk(x, t, **options):
        loss, grad = fn(x, t, **options)
        return -loss, -grad

    return chunk


def _negated_dd(fn):
    def chunk(x, t, **options):
        (lh, ll, lk), (gh, gl, gk) = fn(x, t, **options)
        return (-lh, -ll, lk), (-gh, -gl, gk)

    return chunk


_ce = ce.reference_chunk
reference_chunk = R.chunk_function(
    _negated(_ce.on_tensors), _negated(_ce.extended), _negated_dd(_ce.dd), rowwise=_ce.rowwise
)


def _rows(x, t):
    return reference_chunk(x, t)[0]


INFO = LOSS_INFO["token_logprobs"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="token_logprobs",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "log(softmax(x))[t] in the dtype"),
        "stable": Impl("stable", "stable", stable, "−cross_entropy's stable: max-shifted log1p, rounded once"),
        "torch": Impl("torch", "framework", framework, "F.log_softmax(x, -1).gather(-1, t)"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    reference_fn=with_exact(_rows),
)
