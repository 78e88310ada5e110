"""Binary cross entropy on sigmoid(logits), as training code writes it:
``F.binary_cross_entropy(x.sigmoid(), y)``, audited with respect to the logits.

The loss is bce_with_logits' exactly (its reference is that one), so the report can set the
sigmoid→BCE chain beside the with-logits form: the chain rounds σ(x) to the dtype first, so
1 − σ(x) is 0 from x ≈ 17 in float32 (x ≈ 9 in float16) and the clamped log and the
eps-guarded backward of torch's BCE take over (pytorch#103316: dL/dx = −2.41e-11 at x = −50,
y = 1, where the truth is −1/N; float32 x = 17, y = 0: loss 100 and gradient 0; float16
x = 9, y = 0: a NaN gradient).
"""

from __future__ import annotations

import torch

from ..catalog import LOSS_INFO
from . import bce, bce_with_logits
from .base import Impl, Loss


def naive(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """p = sigmoid(x) in the dtype, then −[y·log p + (1−y)·log(1−p)] as printed."""
    return bce.naive(torch.sigmoid(x), y, reduction, weight, pos_weight)


def framework(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None) -> torch.Tensor:
    """torch's binary_cross_entropy on x.sigmoid(): the chain a training loop writes."""
    return bce.framework(torch.sigmoid(x), y, reduction, weight, pos_weight)


INFO = LOSS_INFO["sigmoid_bce"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="sigmoid_bce",
    summary=INFO.summary,
    multiclass=False,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "p = sigmoid(x) in the dtype, −[y·log p + (1−y)·log(1−p)]"),
        # The advice "use the with-logits form", measured: the same loss, stable.
        "stable": Impl(
            "stable", "stable", bce_with_logits.stable, "the with-logits form: max(x,0) − x·y + log1p(e^−|x|)"
        ),
        "torch": Impl(
            "torch",
            "framework",
            framework,
            "torch.nn.functional.binary_cross_entropy(x.sigmoid(), y) (clamps log at −100; pos_weight folded "
            "into weight)",
        ),
    },
    # The same exact loss as bce_with_logits: its certified reference.
    reference_chunk=bce_with_logits.reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
)
