"""A correct custom BCE-with-logits, the way you would write your own: audit it with

    losscheck bench examples/custom.yaml
    losscheck bench configs/quick.yaml --loss bce_with_logits --impl bce_with_logits=examples/custom_bce_with_logits.py:bce_with_logits

The signature is the one losscheck calls every implementation with (README, "Auditing your
own implementation"): fn(input, target, reduction="mean", **options), torch tensors in, a
tensor of the input's dtype out, differentiable by autograd.
"""
import torch
import torch.nn.functional as F


def bce_with_logits(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", weight=None, pos_weight=None):
    # −[p·y·log σ(x) + (1 − y)·log σ(−x)], with log σ computed without overflow by logsigmoid.
    positive = y * F.logsigmoid(x)
    if pos_weight is not None:
        positive = pos_weight * positive
    loss = -(positive + (1 - y) * F.logsigmoid(-x))
    if weight is not None:
        loss = weight * loss
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
