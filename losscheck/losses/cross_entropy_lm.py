"""The cross-entropy options of language-model training (issue 18 item 1): z-loss, logit
softcapping and the label-smoothing convention, put around cross_entropy's own
implementations and reference; and the masked (−inf) vocabulary of a point.

The conventions (docs/METRICS.md, "Language-model options"):

* ``softcap`` c > 0: the loss is taken of y = c·tanh(x/c) applied to the finite logits;
  ±inf and NaN logits pass unchanged, so a −inf (masked) entry stays masked. 0: no cap.
* ``z_loss`` λ > 0: every kept row adds λ·lse(y)², lse = log Σ_j exp(y_j) (PaLM's z-loss);
  an ignored row adds 0, class weights do not weigh it, and the mean divides the sum by cross
  entropy's own denominator (the kept rows, or Σ w_t with class weights).
* ``smoothing_convention``: ``alpha_over_k`` (torch: q = (1 − α)·onehot + α/V) or
  ``alpha_v_over_v_minus_1`` (Megatron/NeMo: the target gets 1 − α and every other class
  α/(V − 1)), which is torch's formula with ε = α·V/(V − 1).
* ``masked_vocab``: a share (< 1) or a count (≥ 1) of the vocabulary, its last columns, set to
  −inf in the point's input, as the padding of a 65537- or 256000-entry vocabulary is.

With none of them set every function here calls the wrapped one unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ReferenceUnavailable
from .shared import accumulate_dtype, reduce_naive

CONVENTIONS = ("alpha_over_k", "alpha_v_over_v_minus_1")
LM_OPTIONS = ("z_loss", "softcap", "smoothing_convention")


def smoothing(label_smoothing: float, convention: str, classes: int) -> float:
    """torch's ε for a smoothing α under `convention`: α, or α·V/(V − 1)."""
    if not label_smoothing or convention == "alpha_over_k":
        return float(label_smoothing)
    return float(label_smoothing) * classes / (classes - 1)


def _take(options: dict) -> tuple[float, float, str]:
    """Remove the LM options from `options`: (z_loss, softcap, convention)."""
    return (
        float(options.pop("z_loss", 0.0)),
        float(options.pop("softcap", 0.0)),
        str(options.pop("smoothing_convention", "alpha_over_k")),
    )


def softcap_values(x, cap: float):
    """c·tanh(x/c) on finite logits, the others unchanged (torch tensors or numpy arrays)."""
    xp = np if isinstance(x, np.ndarray) else torch
    with np.errstate(invalid="ignore"):
        return xp.where(xp.isfinite(x), cap * xp.tanh(x / cap), x)


def softcap_slope(x, cap: float):
    """d/dx c·tanh(x/c) = sech²(x/c), written 4e/(1 + e)² with e = exp(−2|x/c|): 1 − tanh²
    is 0 as soon as tanh rounds to 1 (|x| > 9c in float32), where the slope is not. 1 where
    the cap does not apply (non-finite logits)."""
    xp = np if isinstance(x, np.ndarray) else torch
    with np.errstate(invalid="ignore"):
        e = xp.exp(-2 * xp.abs(x / cap))
        return xp.where(xp.isfinite(x), 4 * e / ((1 + e) * (1 + e)), 1.0)


class _Softcap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        ctx.save_for_backward(x)
        ctx.cap = cap
        return softcap_values(x, cap)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * softcap_slope(x, ctx.cap), None


class _LseSquared(torch.autograd.Function):
    # λ·lse² per row, its gradient 2λ·lse·softmax; a +inf logit: lse = +inf, probability 1
    # (not exp(inf − inf)), and a zero probability contributes 0 (not 0·inf).
    @staticmethod
    def forward(ctx, y, lam):
        lse = torch.logsumexp(y, 1)
        ctx.save_for_backward(y, lse)
        ctx.lam = lam
        return lam * lse * lse

    @staticmethod
    def backward(ctx, g):
        y, lse = ctx.saved_tensors
        col = lse[:, None]
        p = torch.where(y == col, 1.0, torch.exp(y - col))
        return torch.where(p == 0, 0.0, (2 * ctx.lam) * col * p) * g[:, None], None


def _mean_denominator(t, weight, ignore_index, n, dtype):
    """Cross entropy's mean denominator: Σ w_t over kept rows, their count, or n."""
    keep = _kept_rows(t, ignore_index)
    if keep is None and (weight is None or t.is_floating_point()):
        return torch.tensor(float(n), dtype=dtype, device=t.device)
    safe = t if keep is None else torch.where(keep, t, 0)
    share = torch.ones(t.shape, dtype=dtype, device=t.device) if keep is None else keep.to(dtype)
    if weight is not None and not t.is_floating_point():
        share = share * weight.to(dtype)[safe]
    return share.sum()


def _add_z(loss, z_rows, t, reduction, weight, ignore_index):
    """`loss` (reduced as `reduction`) plus the z-loss rows reduced the same way."""
    keep = _kept_rows(t, ignore_index)
    if keep is not None:
        z_rows = torch.where(keep, z_rows, 0.0)
    if reduction == "none":
        return loss + z_rows
    total = z_rows.sum()
    if reduction == "mean":
        # z_rows: one per position ((N,) rows, or (N, d1, …) of an image-shaped input)
        total = total / _mean_denominator(t, weight, ignore_index, z_rows.numel(), z_rows.dtype)
    return loss + total


def naive(inner):
    """`inner` (cross entropy's naive, on rows) with the LM options, literally in the dtype:
    the capped logits, lse = log(Σ exp(y)) as printed."""

    def impl(x, t, reduction="mean", **options):
        z, cap, conv = _take(options)
        if "label_smoothing" in options or conv != "alpha_over_k":
            options["label_smoothing"] = smoothing(options.get("label_smoothing", 0.0), conv, x.shape[1])
        y = torch.where(x.isfinite(), cap * torch.tanh(x / cap), x) if cap else x
        if not z:
            return inner(y, t, reduction, **options)
        rows = inner(y, t, "none", **options)
        lse = torch.log(torch.exp(y).sum(1))
        return _naive_reduce(rows, z * lse * lse, t, reduction, options)

    return _named(impl, inner)


def _naive_reduce(rows, z_rows, t, reduction, options):
    keep = _kept_rows(t, options.get("ignore_index"))
    total = rows + (z_rows if keep is None else torch.where(keep, z_rows, 0.0))
    denominator = _mean_denominator(t, options.get("weight"), options.get("ignore_index"), rows.numel(), rows.dtype)
    return reduce_naive(total, reduction, denominator)


def stable(inner):
    """`inner` (cross entropy's stable) on the capped logits computed in float64 (float32 on
    MPS), never rounded to the dtype, the cap's slope without cancellation (`softcap_slope`),
    the z-loss from a max-shifted logsumexp; the result rounded once to the dtype."""

    def impl(x, t, reduction="mean", **options):
        z, cap, conv = _take(options)
        if not (z or cap or conv != "alpha_over_k"):
            return inner(x, t, reduction, **options)
        if options.get("label_smoothing"):
            options["label_smoothing"] = smoothing(options["label_smoothing"], conv, x.shape[1])
        c = accumulate_dtype(x.device) if x.dtype != torch.float64 else torch.float64
        y = x.to(c)
        if cap:
            y = _Softcap.apply(y, cap)
        out = inner(y, t, reduction, **options)
        if z:
            out = _add_z(out, _LseSquared.apply(y, z), t, reduction, options.get("weight"), options.get("ignore_index"))
        return out.to(x.dtype)

    return _named(impl, inner)


def framework(inner):
    """`inner` (torch's F.cross_entropy) with the options as training code writes them:
    `cap * torch.tanh(x / cap)` on every logit (Gemma's expression: a −inf logit becomes
    −cap there), `z_loss * torch.logsumexp(x, 1) ** 2` added per kept row, ε = α·V/(V − 1)
    for the Megatron convention."""

    def impl(x, t, reduction="mean", **options):
        z, cap, conv = _take(options)
        if "label_smoothing" in options or conv != "alpha_over_k":
            options["label_smoothing"] = smoothing(options.get("label_smoothing", 0.0), conv, x.shape[1])
        y = cap * torch.tanh(x / cap) if cap else x
        out = inner(y, t, reduction, **options)
        if z:
            lse = torch.logsumexp(y, 1)
            out = _add_z(out, z * lse**2, t, reduction, options.get("weight"), options.get("ignore_index"))
        return out

    return _named(impl, inner)


def _named(impl, inner):
    impl.__name__ = impl.__qualname__ = inner.__name__
    impl.__doc__ = inner.__doc__
    return impl


def _kept_rows(t, ignore_index):
    """The rows of hard targets not ignored (arrays or tensors); None: every row."""
    soft = t.dtype.kind == "f" if isinstance(t, np.ndarray) else t.is_floating_point()
    return None if soft or ignore_index is None else t != ignore_index


def _z_term(inner, y, lam):
    """λ·lse² and its gradient 2λ·lse·p from `inner` itself: the cross entropy of the
    argmax k is nll_k = lse − y_k ≥ 0 (so lse = y_k + nll_k, no cancellation but where lse
    is near 0) and its gradient is p − e_k; a row with a +inf logit has lse = +inf."""
    xp = np if isinstance(y, np.ndarray) else torch
    k = y.argmax(1)
    nll, g = inner(y, k)
    rows = xp.arange(y.shape[0])
    lse = y[rows, k] + nll
    with np.errstate(invalid="ignore"):
        lse = xp.where((y == math.inf).any(1), math.inf, lse)
        g[rows, k] += 1
        zg = xp.where(g == 0, 0.0, (2 * lam) * lse[:, None] * g)
    return lam * lse * lse, zg


def reference(inner):
    """`inner` (a formulation of cross entropy's reference: float64 tensors or long double
    arrays) with the LM options, in the same precision."""

    def chunk(x, t, z_loss=0.0, softcap=0.0, smoothing_convention="alpha_over_k", label_smoothing=0.0, **options):
        eps = smoothing(label_smoothing, smoothing_convention, x.shape[1])
        if isinstance(x, np.ndarray) and eps != label_smoothing:
            # α·V/(V − 1) in long double: rounded to a float it is off by 2**-53 relative, more
            # than the 1/64 ULP the float64 reference allows.
            eps = np.longdouble(label_smoothing) * x.shape[1] / (x.shape[1] - 1)
        y = softcap_values(x, softcap) if softcap else x
        loss, grad = inner(y, t, label_smoothing=eps, **options)
        if z_loss:
            zl, zg = _z_term(inner, y, z_loss)
            xp = np if isinstance(y, np.ndarray) else torch
            kept = _kept_rows(t, options.get("ignore_index"))
            if kept is not None:
                zl, zg = xp.where(kept, zl, 0.0), xp.where(kept[:, None], zg, 0.0)
            loss, grad = loss + zl, grad + zg
        if softcap:
            grad = grad * softcap_slope(x, softcap)
        return loss, grad

    chunk.__doc__ = inner.__doc__
    return chunk


def reference_dd(inner):
    """The double-double path of float64 targets: without LM options only."""

    def chunk(x, t, z_loss=0.0, softcap=0.0, smoothing_convention="alpha_over_k", **options):
        if z_loss or softcap or smoothing_convention != "alpha_over_k":
            raise ReferenceUnavailable(
                "the float64 reference of z_loss, softcap and smoothing_convention needs x86 long double "
                "(numpy's extended path); the double-double path has none"
            )
        return inner(x, t, **options)

    return chunk


def masked_count(masked: float, classes: int) -> int:
    """Entries masked of a vocabulary of `classes`: a share (< 1) rounded, or a count; at
    least one entry is kept."""
    count = int(round(masked * classes)) if masked < 1 else int(masked)
    return max(0, min(classes - 1, count))


def mask_vocab(inp: torch.Tensor, labels, masked: float):
    """(rows, V) logits with their last `masked_count` columns −inf, and the labels: a label
    in the masked columns moves to column label mod (V − count), its logit swapped with that
    column's, so that the value set's target logit survives (the other masked logits,
    whatever the value set put there, are gone)."""
    classes = inp.shape[1]
    count = masked_count(masked, classes)
    if not count:
        return inp, labels
    keep = classes - count
    lab = torch.as_tensor(labels, device=inp.device).clone()
    moved = (lab >= keep).nonzero().squeeze(1)
    if moved.numel():
        old, new = lab[moved], lab[moved] % keep
        a, b = inp[moved, old].clone(), inp[moved, new].clone()
        inp[moved, new], inp[moved, old] = a, b
        lab[moved] = new
    inp[:, keep:] = -math.inf
    return inp, lab if isinstance(labels, torch.Tensor) else lab.cpu().numpy()


def ignoring(inner, names=LM_OPTIONS + ("shards", "shard_mistake")):
    """`inner(t_or_x, ...)` called without the options `names` (the mean's denominators do
    not depend on them; a sharded loss's reference is the unsharded one)."""

    def fn(*args, **options):
        return inner(*args, **{k: v for k, v in options.items() if k not in names})

    fn.__doc__ = inner.__doc__
    return fn
