"""A naive float16 BCE-with-logits (issue 12's planted implementation): the textbook formula
evaluated in float16 whatever the input's dtype, then cast back. Worse than torch in every dtype."""
import torch


def bce_with_logits(x, y, reduction="mean", **options):
    h, t = x.half(), y.half()
    p = 1 / (1 + torch.exp(-h))
    loss = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    loss = loss.to(x.dtype)
    return loss if reduction == "none" else (loss.mean() if reduction == "mean" else loss.sum())
