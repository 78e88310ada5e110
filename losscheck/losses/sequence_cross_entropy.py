"""Token (sequence) cross entropy: (batch, time, vocab) logits, (batch, time) targets with
padding, as language-model training uses it.

Each implementation flattens the tokens to rows, (batch·time, vocab), and applies its
`cross_entropy` counterpart with ignore_index marking the padding, which is how
training code calls it; the mean is over the real (non-padding) tokens. Large
vocabularies (32k, 128k) are the point: `stable` works in blocks of rows, and the
reference in chunks, so their memory does not grow with batch·time·vocab.
"""

from __future__ import annotations

import torch

from ..catalog import LOSS_INFO
from . import cross_entropy as ce
from .base import Impl, Loss


def _tokens(fn):
    def impl(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean", **options) -> torch.Tensor:
        out = fn(x.reshape(-1, x.shape[-1]), t.reshape(-1), reduction, **options)
        return out.reshape(t.shape) if reduction == "none" else out

    impl.__name__ = impl.__qualname__ = fn.__name__
    impl.__doc__ = fn.__doc__
    return impl


naive, stable, framework = _tokens(ce.naive_lm), _tokens(ce.stable_lm), _tokens(ce.framework_lm)

INFO = LOSS_INFO["sequence_cross_entropy"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="sequence_cross_entropy",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "cross_entropy naive on x.view(-1, V), padding masked"),
        "stable": Impl("stable", "stable", stable, "cross_entropy stable on x.view(-1, V), blocks of rows"),
        "torch": Impl(
            "torch",
            "framework",
            framework,
            "torch.nn.functional.cross_entropy(x.view(-1, V), t.view(-1), ignore_index=-100)",
        ),
    },
    reference_chunk=ce.reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    denominators=ce.denominators,
    sequence=True,
)
