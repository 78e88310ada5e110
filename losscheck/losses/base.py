"""The loss-module contract.

Every loss module builds one `Loss`: its implementations (plain functions of torch
tensors, so they run on any device) and its reference (numpy, high precision).

An implementation is called as ``fn(input, target, reduction)`` where

* ``input`` is a floating tensor of the dtype under test: logits of shape ``(N,)`` for
  binary losses, ``(N, C)`` for multi-class ones, or probabilities for ``bce``;
* ``target`` is a tensor of hard 0/1 labels in the input's dtype (binary losses) or of
  int64 class indices (multi-class losses);
* ``reduction`` is ``"none"``, ``"mean"`` or ``"sum"``, as in ``torch.nn.functional``;

and returns the loss in the input's dtype: shape ``(N,)`` for ``"none"``, a scalar
otherwise. losscheck differentiates the ``"mean"`` result through autograd, so an
implementation must be differentiable with respect to ``input``.

A reference evaluates one chunk of rows in working precision (see `reference.py`):
``reference_chunk(x, t) -> (loss, grad)`` with ``x`` the input values exactly, ``loss``
of shape ``(rows,)`` and ``grad`` the gradient of the *summed* loss with respect to the
input, same shape as ``x``; `reference()` below divides by N and rounds once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import reference as R

KINDS = ("naive", "stable", "framework", "custom")
REDUCTIONS = ("none", "mean", "sum")


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str
    fn: Callable[..., torch.Tensor]
    summary: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")


@dataclass(frozen=True)
class Formulas:
    """Text for reports and `explain`: the loss, its literal and its stable forms, its gradient."""

    loss: str
    naive: str
    stable: str
    gradient: str


@dataclass(frozen=True)
class Loss:
    name: str
    summary: str
    multiclass: bool
    input_kind: str  # "logits" or "probabilities"
    implementations: dict[str, Impl]
    reference_chunk: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    formulas: Formulas
    options: tuple[str, ...] = field(default=())

    def make_input(self, logits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """The input under test from float64 logits, rounded once to `dtype`."""
        if self.input_kind == "probabilities":
            return R.round_to(R.sigmoid(logits), dtype)
        limit = torch.finfo(dtype).max
        # Finite logits beyond the dtype's range are saturated to its largest finite value
        # (a scale of 1e8 is a large logit in float16 too, not an infinite one); genuine
        # ±inf logits (the `nonfinite` value set: masking with −inf) stay infinite.
        clipped = np.clip(logits, -limit, limit)
        return R.round_to(np.where(np.isinf(logits), logits, clipped), dtype)

    def make_target(self, labels: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        if self.multiclass:
            return torch.from_numpy(labels.astype(np.int64))
        return torch.from_numpy(labels.astype(np.float64)).to(dtype)


@dataclass(frozen=True)
class Reference:
    """The reference of one sweep point, rounded to the dtype under test."""

    loss: torch.Tensor  # (N,), per element
    grad: torch.Tensor  # like the input: gradient of the mean loss
    mean: torch.Tensor  # scalar
    sum: torch.Tensor  # scalar
    mean_value: float  # in float64, before rounding to the dtype (for display)


def reference(loss: Loss, inp: torch.Tensor, target: torch.Tensor) -> Reference:
    """Evaluate `loss`'s reference on `inp`/`target` chunk by chunk (bounded memory)."""
    dtype = inp.dtype
    work = R.work_dtype(dtype)
    n = inp.shape[0]
    row_elems = inp[0].numel() if n else 1
    loss_out = torch.empty(n, dtype=dtype)
    grad_out = torch.empty(inp.shape, dtype=dtype)
    total = R.CompensatedSum()
    for rows in R.row_chunks(n, row_elems):
        x = R.to_work(inp[rows], work)
        t = target[rows].detach().cpu()
        t = (t.double() if t.is_floating_point() else t).numpy()
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            lw, gw = loss.reference_chunk(x, t)
            loss_out[rows] = R.round_to(lw, dtype)
            grad_out[rows] = R.round_to(gw / work(n), dtype)
        total.add(lw)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        mean = total.mean(max(n, 1), work)
        summ = total.mean(1, work)
    return Reference(
        loss=loss_out,
        grad=grad_out,
        mean=R.round_to(np.asarray([mean], dtype=work), dtype)[0],
        sum=R.round_to(np.asarray([summ], dtype=work), dtype)[0],
        mean_value=float(mean),
    )


# ---- helpers shared by the implementations --------------------------------------------

def compute_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The precision `stable` computes in before rounding once to `dtype`.

    Half precision in float32, float32 in float64 (except on MPS, which has no float64):
    then each result is rounded once, and is correctly rounded but for rare ties, where
    computing natively would leave each exp/log/division's own error of up to an ULP.
    float64 has no wider type: it is computed natively, with compensations.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype == torch.float32 and (device is None or device.type != "mps"):
        return torch.float64
    return dtype


def accumulate_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the reduction is accumulated in float64.
    return torch.float32 if device.type == "mps" else torch.float64


def reduce_naive(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """The textbook reduction, -(1/N)·Σ, transcribed literally: sum in the dtype, then divide."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / loss.shape[0]


def reduce_accurate(loss: torch.Tensor, reduction: str, dtype: torch.dtype,
                    low: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce in a wide accumulator and round once to `dtype`.

    `low`, when given, holds each element's rounding error (loss + low is the element to
    about twice the compute precision, from TwoSum); the reduction includes it, so that
    errors that repeat over the batch (the same rounding in every element) do not add up.
    """
    if reduction == "none":
        return loss.to(dtype)
    if low is not None:
        # Non-finite elements have a meaningless (NaN) error term.
        low = torch.where(loss.isfinite(), low, 0.0)
    acc_dtype = accumulate_dtype(loss.device)
    wide = loss.to(acc_dtype)
    if wide.dtype == dtype:
        # No wider type to accumulate in (float64, or float32 on MPS): sum with every
        # rounding error recovered (TwoSum), so only the elements' own errors remain.
        acc = compensated_sum(wide, low)
    else:
        acc = (wide + low.to(acc_dtype)).sum() if low is not None else wide.sum()
    if reduction == "mean":
        acc = acc / loss.shape[0]
    return acc.to(dtype)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a + b = s + e exactly (Knuth), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def compensated_sum(x: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of a 1-D tensor (plus the small corrections `low`), nearly exact: a pairwise tree
    of TwoSums whose rounding errors are collected and added back with one final rounding
    (log2(N) vectorised steps, any device)."""
    plain = x.sum()
    err = low.sum() if low is not None else x.new_zeros(())
    while x.numel() > 1:
        if x.numel() % 2:
            x = torch.cat([x, x.new_zeros(1)])
        x, e = two_sum(x[0::2], x[1::2])
        err = err + e.sum()
    total = (x.sum() if x.numel() else x.new_zeros(())) + err
    # With an inf or NaN among the terms TwoSum yields NaN; IEEE's plain sum is the answer
    # then (torch.where rather than a branch: no device synchronisation).
    return torch.where(plain.isfinite(), total, plain)


def grad_scale(grad_output: torch.Tensor, reduction: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss)/d(element loss) times the upstream gradient, in `dtype`."""
    g = grad_output.to(dtype)
    if reduction == "mean":
        return g / n
    return g


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """grad · upstream gradient (/ n for the mean), dividing last: (g·u)/n rounds once
    where g·(u/n) rounds twice (u = 1, as for a loss, makes the product exact)."""
    u = grad_output.to(grad.dtype)
    if u.dim() == 1 and grad.dim() == 2:
        u = u[:, None]
    out = grad * u
    return out / n if reduction == "mean" else out
