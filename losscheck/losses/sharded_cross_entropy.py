"""Vocabulary-parallel (tensor-parallel) cross entropy (issue 18 item 2).

The vocabulary of (N, V) logits is split into `shards` contiguous shards, as tensor-parallel
training holds it (Megatron-LM's vocab_parallel_cross_entropy, Liger-Kernel's
LigerVocabParallelCrossEntropy): each shard computes its max, its sum of exponentials, its
part of the target logit and of the smoothing term, and the shards' numbers are combined as
the all-reduces combine them. Shards follow `torch.tensor_split` (the first V mod k shards one
entry longer), so a count that does not divide V is covered. The value is compared with the
unsharded reference (cross_entropy's, options included): a correct sharding changes nothing.

* ``naive``: the per-shard transcription, in the dtype: m = max of the shards' maxima,
  S = Σ_r Σ_{j∈r} exp(x_j − m), the target logit summed over the shards that own it,
  loss = log S − (x_t − m), smoothing through the mean log-probability all-reduced.
  With ``shard_mistake`` it makes one known mistake (never by default):
  ``local_smoothing`` (Megatron-LM #737: the smoothing coefficient and the mean
  log-probability from shard 0's own vocabulary, the loss shard 0 reports), ``log_shards``
  (every shard adds the whole vocabulary's sum of exp, so the loss is log(shards) too high:
  the gathered-logits path of Megatron-LM #7452), ``uneven_split`` (Megatron-LM #1754: ⌊V/k⌋
  entries per shard, the remainder in none, a target there contributes logit 0) and
  ``smoothing_formula`` (Liger-Kernel #1260: the other label-smoothing convention than asked).
* ``stable``: per shard in float64 (float32 on MPS) the max m_r, its argmax and
  s_r = Σ_{j≠argmax} exp(x_j − m_r); combined S = s_{r*} + Σ_{r≠r*} (1 + s_r)·exp(m_r − m)
  and loss = (m − x_t) + log1p(S), the form of cross_entropy's stable; the gradient
  p − onehot explicit, shard by shard; rounded once.
* ``torch``: F.cross_entropy of the gathered logits (torch.cat of the shards).

A point with a mistake runs naive only (stable and torch are skipped, saying so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import families, reference as R
from ..catalog import IGNORE_INDEX, LOSS_INFO
from . import cross_entropy as ce
from .base import Impl, Loss, accumulate_dtype, reduce_accurate, reduce_naive, scale_grad, two_sum
from .cross_entropy_lm import ignoring, smoothing


def bounds(classes: int, shards: int, mistake: str = "none") -> list[tuple[int, int]]:
    """Each shard's [start, stop) of the vocabulary, empty shards left out: torch.tensor_split's,
    or ⌊V/k⌋ entries each with the remainder in none (`uneven_split`, Megatron-LM #1754)."""
    if mistake == "uneven_split":
        size = classes // shards
        return [(r * size, (r + 1) * size) for r in range(shards) if size]
    base, extra = divmod(classes, shards)
    out, start = [], 0
    for r in range(shards):
        stop = start + base + (1 if r < extra else 0)
        if stop > start:
            out.append((start, stop))
        start = stop
    return out


def _convention(conv: str, mistake: str) -> str:
    if mistake != "smoothing_formula":
        return conv
    return "alpha_over_k" if conv != "alpha_over_k" else "alpha_v_over_v_minus_1"


def _no_mistake(name: str, mistake: str) -> None:
    if mistake != "none":
        raise families.Unsupported(
            f"shard_mistake {mistake} is a mistake of the naive transcription; {name} makes none"
        )


def _ignored(t, ignore_index):
    ignored = (t == ignore_index) if ignore_index is not None else None
    return ignored, (t if ignored is None else torch.where(ignored, 0, t))


def _denominator(ignored, dtype):
    return None if ignored is None else (~ignored).to(dtype).sum()


def naive(
    x,
    t,
    reduction="mean",
    shards=1,
    shard_mistake="none",
    label_smoothing=0.0,
    smoothing_convention="alpha_over_k",
    ignore_index=None,
):
    """The per-shard transcription in the dtype, as tensor-parallel code writes it."""
    classes = x.shape[1]
    parts = bounds(classes, int(shards), shard_mistake)
    ignored, safe = _ignored(t, ignore_index)
    # all-reduce MAX of the shards' maxima, all-reduce SUM of their sums of exp
    m = torch.stack([x[:, a:b].max(1).values for a, b in parts]).max(0).values[:, None]
    sums = [torch.exp(x[:, a:b] - m).sum(1) for a, b in parts]
    total = sum(sums[1:], sums[0])
    if shard_mistake == "log_shards":
        total = total * len(parts)
    # the target logit: each shard contributes x_t − m where it owns t, 0 elsewhere
    predicted = torch.zeros_like(total)
    for a, b in parts:
        own = (safe >= a) & (safe < b)
        local = torch.where(own, safe - a, 0)[:, None]
        predicted = predicted + torch.where(own, (x[:, a:b] - m).gather(1, local).squeeze(1), 0.0)
    loss = torch.log(total) - predicted
    if label_smoothing:
        conv = _convention(smoothing_convention, shard_mistake)
        if shard_mistake == "local_smoothing":  # shard 0's vocabulary as if it were the whole one
            a, b = parts[0]
            eps = smoothing(label_smoothing, conv, b - a)
            mean_log = (x[:, a:b] - m - torch.log(total)[:, None]).mean(1)
        else:
            eps = smoothing(label_smoothing, conv, classes)
            logs = [(x[:, a:b] - m - torch.log(total)[:, None]).sum(1) for a, b in parts]
            mean_log = sum(logs[1:], logs[0]) / classes
        loss = (1 - eps) * loss - eps * mean_log
    if ignored is not None:
        loss = torch.where(ignored, 0.0, loss)
    return reduce_naive(loss, reduction, _denominator(ignored, x.dtype))


class _Stable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, reduction, parts, eps, ignore_index):
        c = accumulate_dtype(x.device)
        xc = x.to(c)
        n, classes = x.shape
        rows = torch.arange(n, device=x.device)
        ignored, safe = _ignored(t, ignore_index)
        # float64 inputs are computed in float64 itself: exp(x − m) then carries the rounding
        # error of x − m (cross_entropy's `_shifted_exp`, TwoSum), as cross entropy's stable does.
        native = c == x.dtype
        stats = []  # per shard: max, global index of its argmax, Σ_{j≠argmax} exp(x_j − max)
        for a, b in parts:
            xr = xc[:, a:b]
            mr, kr = xr.max(1)
            e = ce._shifted_exp(xr, torch.where(mr.isfinite(), mr, 0.0)[:, None], native)
            e[rows, kr] = 0.0
            stats.append((mr, kr + a, e.sum(1)))
        maxima = torch.stack([s[0] for s in stats])
        m, star = maxima.max(0)
        k = torch.stack([s[1] for s in stats]).gather(0, star[None]).squeeze(0)
        total = torch.zeros_like(m)
        for r, (mr, _, sr) in enumerate(stats):
            # A shard entirely −inf (masked padding) adds nothing (not exp(−inf + inf)).
            scale = ce._shifted_exp(mr[:, None], m[:, None], native).squeeze(1)
            other = torch.where(mr == -math.inf, 0.0, (1 + sr) * scale)
            total = total + torch.where(star == r, sr, other)
        xt = xc[rows, safe]
        lse = torch.log1p(total)
        gap, gap_low = two_sum(m, -xt)
        summed, summed_low = two_sum(gap, lse)
        loss = torch.where(xt == m, lse, summed)
        low = torch.where(xt == m, 0.0, gap_low + summed_low)  # the additions' rounding errors
        if eps:
            # Σ_j −log p_j = Σ_j (m − x_j) + V·log1p(S), every term ≥ 0.
            gaps = sum(((m[:, None] - xc[:, a:b]).sum(1) for a, b in parts), torch.zeros_like(m))
            loss = (1 - eps) * loss + eps / classes * (gaps + classes * lse)
            low = (1 - eps) * low
        special = ~m.isfinite()
        if special.any():
            # Rows whose maximum is +inf or NaN (or every logit −inf): the limits, as cross
            # entropy's stable takes them; where the limit exists sharding cannot change it.
            loss[special] = ce.stable(x[special], t[special], "none", None, eps, ignore_index).to(c)
            low[special] = 0.0
        if ignored is not None:
            loss = torch.where(ignored, 0.0, loss)
            low = torch.where(ignored, 0.0, low)
        denominator = _denominator(ignored, c)
        ctx.save_for_backward(x, t, m, total, k, denominator)
        ctx.meta = (reduction, parts, eps, ignore_index)
        return reduce_accurate(loss, reduction, x.dtype, low, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        x, t, m, total, k, denominator = ctx.saved_tensors
        reduction, parts, eps, ignore_index = ctx.meta
        c = m.dtype
        n, classes = x.shape
        rows = torch.arange(n, device=x.device)
        ignored, safe = _ignored(t, ignore_index)
        one = 1 + total
        p = torch.zeros(x.shape, dtype=c, device=x.device)
        native = c == x.dtype
        for a, b in parts:  # each shard's softmax, exp(x_j − m)/(1 + S)
            p[:, a:b] = ce._shifted_exp(x[:, a:b].to(c), m[:, None], native) / one[:, None]
        p[rows, k] = 1 / one
        e_t = ce._shifted_exp(x[rows, safe].to(c)[:, None], m[:, None], native).squeeze(1)
        rest = torch.where(safe == k, total, one - e_t)  # 1 − p_t without cancellation
        g = p.clone()
        g[rows, safe] = -rest / one
        if eps:
            g = (1 - eps) * g + eps * (p - 1.0 / classes)
        special = ~m.isfinite()
        if special.any():  # the limits, as in the forward
            with torch.enable_grad():
                sub = x[special].detach().requires_grad_()
                ce.stable(sub, t[special], "sum", None, eps, ignore_index).backward()
            g[special] = sub.grad.to(c)
        if ignored is not None:
            g = torch.where(ignored[:, None], 0.0, g)
        return scale_grad(g, grad_output, reduction, denominator if denominator is not None else n).to(x.dtype), *(
            None,
        ) * 5


def stable(
    x,
    t,
    reduction="mean",
    shards=1,
    shard_mistake="none",
    label_smoothing=0.0,
    smoothing_convention="alpha_over_k",
    ignore_index=None,
):
    """Per-shard statistics one precision up, combined without cancellation, rounded once."""
    _no_mistake("stable", shard_mistake)
    eps = smoothing(label_smoothing, smoothing_convention, x.shape[1])
    return _Stable.apply(x, t, reduction, bounds(x.shape[1], int(shards)), eps, ignore_index)


def framework(
    x,
    t,
    reduction="mean",
    shards=1,
    shard_mistake="none",
    label_smoothing=0.0,
    smoothing_convention="alpha_over_k",
    ignore_index=None,
):
    """torch.nn.functional.cross_entropy of the gathered logits."""
    _no_mistake("torch", shard_mistake)
    gathered = torch.cat(x.tensor_split(int(shards), 1), 1)
    return F.cross_entropy(
        gathered,
        t,
        reduction=reduction,
        label_smoothing=smoothing(label_smoothing, smoothing_convention, x.shape[1]),
        ignore_index=IGNORE_INDEX if ignore_index is None else ignore_index,
    )


# The unsharded reference: cross_entropy's, the shard options dropped.
_SHARD_OPTIONS = ("shards", "shard_mistake")
reference_chunk = R.chunk_function(
    ignoring(ce.reference_chunk.on_tensors, _SHARD_OPTIONS),
    ignoring(ce.reference_chunk.extended, _SHARD_OPTIONS),
    ignoring(ce.reference_chunk.dd, _SHARD_OPTIONS),
    rowwise=ce.reference_chunk.rowwise,
)

INFO = LOSS_INFO["sharded_cross_entropy"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="sharded_cross_entropy",
    summary=INFO.summary,
    multiclass=True,
    input_kind="logits",
    implementations={
        "naive": Impl("naive", "naive", naive, "per shard in the dtype: log Σ_r Σ exp(x − m) − (x_t − m)"),
        "stable": Impl(
            "stable", "stable", stable, "per shard (m_r, s_r) one precision up, (m − x_t) + log1p(S), explicit gradient"
        ),
        "torch": Impl("torch", "framework", framework, "torch.nn.functional.cross_entropy(torch.cat(shards, 1))"),
    },
    reference_chunk=reference_chunk,
    formulas=INFO.formulas,
    options=INFO.options,
    denominators=ce.denominators,
)
