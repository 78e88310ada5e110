"""Kullback–Leibler divergence between the softmax distributions of two logit tensors, a
student's and a teacher's (N, V), as distillation and RL trainers compute it (in nats).

    fn(student, teacher, target, reduction="mean", direction="forward", log_target=False,
       temperature=1.0)

`direction` forward is KL(P_teacher ‖ Q_student) (F.kl_div(log q, p)), reverse is
KL(Q_student ‖ P_teacher) (on-policy distillation, GKD); both distributions are
softmax(logits / temperature) (no T² factor: multiply it yourself). `log_target` tells the
torch implementation to pass the target distribution as log-probabilities
(F.kl_div(..., log_target=True)); it does not change the value. The target (class indices)
is not used. **`mean` is the mean over rows — torch's `batchmean`**, the divergence per
sample; torch's own `reduction="mean"` divides by N·V, V times smaller (Teacher-free-KD #41),
and is what a custom implementation gets wrong if it maps `mean` to it. Both logit tensors
are differentiated: `backward` is d/dstudent, `backward_teacher` d/dteacher. Inside the sweep
they travel packed, (2N, V), student rows first (divergence.unpack).

`naive`: softmax in the dtype, Σ p (log p − log q) as printed (0·log 0 = NaN where a
probability underflows, Soup #719's NaN gradient). `stable`: divergence.kl_rows one precision
up, gradients explicit. `torch`: F.kl_div(F.log_softmax(s/T), F.softmax(t/T) or
F.log_softmax(t/T) with log_target, reduction="batchmean"). The reference is kl_rows in
float64 (long double for float64 points), divergence.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import divergence as dv
from .base import Impl, reduce_naive


def naive(student, teacher, target=None, reduction="mean", direction="forward", log_target=False, temperature=1.0):
    """p = softmax(teacher/T), q = softmax(student/T) in the dtype; Σ p (log p − log q)
    (reverse: Σ q (log q − log p)); the mean as Σ/N in the dtype."""
    q = torch.softmax(student / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    a, b = (p, q) if direction == "forward" else (q, p)
    return reduce_naive((a * (torch.log(a) - torch.log(b))).sum(-1), reduction)


def stable(student, teacher, target=None, reduction="mean", direction="forward", log_target=False, temperature=1.0):
    """Σ P φ(log P − log Q), φ(δ) = δ − 1 + e^{−δ} >= 0, one precision up, rounded once."""
    return dv.stable_pair("kl", student, teacher, reduction, direction, temperature)


def framework(student, teacher, target=None, reduction="mean", direction="forward", log_target=False, temperature=1.0):
    """F.kl_div(log_softmax(input/T), softmax(target/T) [log_softmax with log_target], batchmean)."""
    ls = F.log_softmax(student / temperature, -1)
    lt = F.log_softmax(teacher / temperature, -1)
    inp, tgt = (ls, lt) if direction == "forward" else (lt, ls)
    torch_reduction = {"mean": "batchmean", "sum": "sum", "none": "none"}[reduction]
    out = F.kl_div(inp, tgt if log_target else tgt.exp(), reduction=torch_reduction, log_target=log_target)
    return out.sum(-1) if reduction == "none" else out


LOSS = dv.pair_loss(
    "kl_div",
    {
        "naive": Impl("naive", "naive", dv.adapt(naive), "softmax in the dtype, Σ p (log p − log q)"),
        "stable": Impl("stable", "stable", dv.adapt(stable), "Σ P φ(δ), φ >= 0, one precision up, rounded once"),
        "torch": Impl("torch", "framework", dv.adapt(framework), "F.kl_div(log_softmax(s/T), softmax(t/T), batchmean)"),
    },
    "kl",
)
