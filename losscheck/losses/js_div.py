"""Jensen–Shannon divergence between the softmax distributions of a student's and a teacher's
logits (N, V), in nats: JS = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q)/2, symmetric and at most
log 2. Called and packed as kl_div (see kl_div.py): `fn(student, teacher, target, reduction,
temperature=1.0)`, `mean` over rows, both inputs differentiated.

`naive`: the definition in the dtype, log M with M = (p + q)/2 (0·log 0 = NaN where a
probability underflows: Soup #719). `stable`: divergence.js_rows one precision up (per class
½ (P + Q)(log 2 − H_b(P/(P + Q))) >= 0, log 2 − H_b by its series near P = Q). `torch`: what
training code writes with torch's kl_div, ½ (F.kl_div(log M, p) + F.kl_div(log M, q)),
batchmean. The reference is js_rows in float64 (long double for float64 points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import divergence as dv
from .base import Impl, reduce_naive


def naive(student, teacher, target=None, reduction="mean", temperature=1.0):
    """p, q softmax in the dtype, m = (p + q)/2, ½ Σ [p (log p − log m) + q (log q − log m)]."""
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    m = (p + q) / 2
    return reduce_naive(
        ((p * (torch.log(p) - torch.log(m)) + q * (torch.log(q) - torch.log(m))) / 2).sum(-1), reduction
    )


def stable(student, teacher, target=None, reduction="mean", temperature=1.0):
    """½ Σ (P + Q)(log 2 − H_b(σ)) >= 0, one precision up, rounded once."""
    return dv.stable_pair("js", student, teacher, reduction, "forward", temperature)


def framework(student, teacher, target=None, reduction="mean", temperature=1.0):
    """½ (F.kl_div(log m, p) + F.kl_div(log m, q)), m = (softmax(s/T) + softmax(t/T))/2."""
    p = F.softmax(teacher / temperature, -1)
    q = F.softmax(student / temperature, -1)
    log_m = ((p + q) / 2).log()
    torch_reduction = {"mean": "batchmean", "sum": "sum", "none": "none"}[reduction]
    out = (F.kl_div(log_m, p, reduction=torch_reduction) + F.kl_div(log_m, q, reduction=torch_reduction)) / 2
    return out.sum(-1) if reduction == "none" else out


LOSS = dv.pair_loss(
    "js_div",
    {
        "naive": Impl("naive", "naive", dv.adapt(naive), "softmax in the dtype, ½ Σ [p log(p/m) + q log(q/m)]"),
        "stable": Impl("stable", "stable", dv.adapt(stable), "½ Σ (P + Q)(log 2 − H_b), one precision up"),
        "torch": Impl("torch", "framework", dv.adapt(framework), "½ (F.kl_div(log m, p) + F.kl_div(log m, q))"),
    },
    "js",
)
