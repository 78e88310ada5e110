"""Helpers shared by the losses' implementations (naive, stable, framework): the precision
`stable` computes in, the reductions as printed and as computed accurately, compensated sums,
the scaling of gradients by an upstream gradient. Split from base.py, which re-exports them."""

from __future__ import annotations

import torch


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


def reduce_naive(loss: torch.Tensor, reduction: str, denominator=None) -> torch.Tensor:
    """The textbook reduction, -(1/N)·Σ, transcribed literally: sum in the dtype, then divide
    (by N, or by `denominator`: the weight sum of a weighted cross entropy)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (loss.numel() if denominator is None else denominator)


def reduce_accurate(
    loss: torch.Tensor,
    reduction: str,
    dtype: torch.dtype,
    low: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce in a wide accumulator and round once to `dtype`.

    `low`, when given, holds each element's rounding error (loss + low is the element to
    about twice the compute precision, from TwoSum); the reduction includes it, so that
    errors that repeat over the batch (the same rounding in every element) do not add up.
    `denominator` (default: the number of elements) divides the mean; a zero denominator
    (every target ignored) gives 0, the sum's value, rather than 0/0.
    """
    if reduction == "none":
        return loss.to(dtype)
    loss = loss.reshape(-1)
    if low is not None:
        # Non-finite elements have a meaningless (NaN) error term.
        low = torch.where(loss.isfinite(), low.reshape(-1), 0.0)
    acc_dtype = accumulate_dtype(loss.device)
    wide = loss.to(acc_dtype)
    if wide.dtype == dtype:
        # No wider type to accumulate in (float64, or float32 on MPS): sum with every
        # rounding error recovered (TwoSum), so only the elements' own errors remain.
        acc = compensated_sum(wide, low)
    else:
        acc = (wide + low.to(acc_dtype)).sum() if low is not None else wide.sum()
    if reduction == "mean":
        if denominator is None:
            acc = acc / loss.shape[0]
        else:
            d = denominator.to(acc_dtype)
            acc = torch.where(d == 0, 0.0, acc / torch.where(d == 0, 1.0, d))
    return acc.to(dtype)


def binary_factor(y: torch.Tensor, weight=None, pos_weight=None) -> torch.Tensor | None:
    """Each element's loss multiplier for a binary loss, w·(pos_weight if y = 1 else 1), in
    `y`'s (compute) precision; None when neither option is set."""
    f = None
    if pos_weight is not None:
        f = torch.where(y > 0.5, pos_weight.to(y.dtype), 1.0)
    if weight is not None:
        w = weight.to(y.dtype)
        f = w if f is None else f * w
    return f


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


def safe_denominator(n):
    """The mean's denominator, with 0 (every target ignored) replaced by 1: the gradient
    is 0 there anyway, and 0/1 is the convention `reduce_accurate` follows."""
    if isinstance(n, torch.Tensor):
        return torch.where(n == 0, torch.ones_like(n), n)
    return n or 1


def grad_scale(grad_output: torch.Tensor, reduction: str, n, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss)/d(element loss) times the upstream gradient, in `dtype`."""
    g = grad_output.to(dtype)
    if reduction == "mean":
        return g / safe_denominator(n)
    return g


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, n) -> torch.Tensor:
    """grad · upstream gradient (/ n for the mean), dividing last: (g·u)/n rounds once
    where g·(u/n) rounds twice (u = 1, as for a loss, makes the product exact). `n` is
    the element count or the mean's denominator (a tensor)."""
    u = grad_output.to(grad.dtype)
    if u.dim() == 1 and grad.dim() == 2:
        u = u[:, None]
    out = grad * u
    if reduction != "mean":
        return out
    n = safe_denominator(n)
    return out / (n.to(grad.dtype) if isinstance(n, torch.Tensor) else n)


def class_dim_last(fn):
    """`fn` of (N, C) rows also on (N, C, d1, d2, …) inputs, as torch's cross_entropy and
    nll_loss take them: the class dimension moved last and the positions flattened to rows
    (soft targets likewise), the per-element result shaped (N, d1, d2, …) again. How the
    naive and stable implementations see an image-shaped input; torch's own get it as is."""

    def impl(x: torch.Tensor, t: torch.Tensor, reduction: str = "mean", **options) -> torch.Tensor:
        if x.dim() <= 2:
            return fn(x, t, reduction, **options)
        c = x.shape[1]
        rows = x.movedim(1, -1).reshape(-1, c)
        t_rows = t.movedim(1, -1).reshape(-1, c) if t.is_floating_point() else t.reshape(-1)
        out = fn(rows, t_rows, reduction, **options)
        return out.reshape(x.shape[:1] + x.shape[2:]) if reduction == "none" else out

    impl.__name__ = impl.__qualname__ = fn.__name__
    impl.__doc__ = fn.__doc__
    return impl
