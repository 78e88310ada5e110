"""BCE exactly as one of our source pages first prints it, with its bracket missing:

    −(1/N)·Σᵢ yᵢ·log ŷᵢ + (1 − yᵢ)·log(1 − ŷᵢ)

The minus sign applies only to the first term, so every element with target 0 gets the
wrong sign: log(1 − ŷ) ≤ 0 where the loss is −log(1 − ŷ) ≥ 0. This is a formula error,
wrong at every logit scale (scale 1 included), which losscheck's report tells apart from
an instability that appears only at large scales:

    losscheck bench examples/custom.yaml
"""
import numpy as np
import torch


def bce(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    loss = -y * torch.log(p) + (1 - y) * torch.log(1 - p)  # the bracket is missing
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / loss.shape[0]


def bce_numpy(p: np.ndarray, y: np.ndarray, reduction: str = "mean"):
    """The same formula in numpy, returning (loss, gradient with respect to p)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = -y * np.log(p) + (1 - y) * np.log(1 - p)
        grad = -y / p - (1 - y) / (1 - p)
    if reduction == "none":
        return loss, grad
    n = 1 if reduction == "sum" else loss.shape[0]
    return (loss.sum() / n).astype(p.dtype), (grad / n).astype(p.dtype)
