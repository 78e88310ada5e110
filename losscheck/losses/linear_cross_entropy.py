"""Fused linear cross entropy: hidden states (N, H) and a classifier weight (V, H) in, the
loss of the logits z = hidden @ classifier.T (+ bias) out, differentiated with respect to
both the hidden states and the classifier — what language-model trainers compute without
ever holding the N × V logits (Liger-Kernel, Cut Cross-Entropy, torch's chunked loss).

An implementation is called as

    fn(hidden, classifier, target, reduction="mean", bias=None, **options)

with ``target`` int64 class indices (N,), ``ignore_index`` marking ignored tokens,
``label_smoothing`` a float, ``bias`` an optional (V,) tensor (not differentiated by the
audit) and ``chunks`` the number of vocabulary chunks a chunked implementation uses (passed
to a custom implementation only when its signature names it). The audit differentiates the
result with respect to ``hidden`` (the record's ``backward``) and ``classifier``
(``backward_classifier``).

Inside the sweep both inputs travel as one packed tensor, ``cat([hidden, classifier])``
of shape (N + V, H) (`pack`, `unpack`): the generic code (the worker processes, the timing,
the check for writes into the input) then handles a second differentiated input without
knowing it; the implementations receive views of it.

`stable` chunks over the vocabulary (`_StableLinear`): the forward computes each chunk's
logits (N, V/chunks) by a GEMM in the dtype `logits_precision` names (see below) and keeps an
online logsumexp per row, in the compute dtype (float64 for float32 inputs, float32 for half
ones) — the running maximum m, its index k and s = Σ_{j≠k} exp(z_j − m), rescaled when m
grows — so that the loss is (m − z_t) + log1p(s), two non-negative terms (nothing cancels on
confident rows). The backward recomputes each chunk's logits by the same GEMM (bit for bit:
m and s must come from the logits the gradient's p is formed of, or Σp = 1 breaks) and forms
its gradient dL/dz exactly as cross_entropy's stable does (p_t − 1 = −(1 + s − e_t)/(1 + s),
without cancellation); dL/dhidden is accumulated over the chunks by float64 GEMMs of the
unrounded dL/dz and rounded once, and dL/dclassifier of a chunk is that chunk's rows'
complete sum over the N tokens (one float64 GEMM, whatever the input's dtype — Liger-Kernel
#1391 — rounded once): chunking over the vocabulary needs no dL/dclassifier accumulator
across chunks. Memory beyond the inputs and gradients: a few (N, V/chunks) blocks in the compute
dtype and (N, H) in it; by default a chunk holds at most CHUNK_ELEMENTS logits.

``logits_precision`` (an option of stable only, swept by the config key `logits_precisions`):

* ``float32`` (the default): the logits' GEMMs in float32 (float64 for float64 inputs), as torch
  forms them. Each logit then carries the GEMM's rounding, about 2**-24·Σ_k|h_k·W_jk|, and so
  does every p_j: dL/dclassifier loses about as many bits as torch's on confident rows (18.7
  against torch's 24 at confident_correct, scale 50, V 1000; at most 1 more than torch at any
  point of configs/linear.yaml's value sets: tests/test_linear_cross_entropy.py); the loss and
  dL/dhidden stay ahead of torch's. 1.67× torch's time at 2048 × 512 × 128000 float32 on the
  quiet 2-core dev machine (benchmarks/linear_ce_memory.py, fastest of 3; 1.68× at V 16000;
  docs/METRICS.md).
* ``float64``: the logits' GEMMs and the softmax work in float64 (every product of float32 or
  half values exact there, sums within γ_H): dL/dclassifier correctly rounded but for a bit,
  at every point; the logit GEMMs in float64 (twice a float32 one's work) but no float32 to
  float64 copy of each block: 2.07× torch's time at that point, 2.03× at V 16000.

Both sum dL/dhidden and dL/dclassifier in float64 GEMMs (see `_StableLinear.backward`).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ..catalog import IGNORE_INDEX, LOGITS_PRECISIONS, LOSS_INFO
from . import cross_entropy as ce, linear_cross_entropy_ref as ref
from .base import Impl, Loss, accumulate_dtype, compute_dtype, reduce_accurate

# stable's default vocabulary chunk: at most this many logits (N × chunk) at once.
CHUNK_ELEMENTS = 1 << 22


def unpack(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, classifier) views of the packed input: the first N = len(target) rows are
    the hidden states."""
    n = target.shape[0]
    return x[:n], x[n:]


def pack(hidden: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, classifier])


def _takes(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # a C function: let the call tell
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def adapt(fn):
    """`fn(hidden, classifier, target, reduction, **options)` as the sweep calls an
    implementation, `f(packed, target, reduction, **options)`; `chunks` and
    `logits_precision` are dropped for a function that does not take them (they only tell
    chunked implementations how to chunk and in what precision to form the logits)."""
    dropped = [name for name in ref.HOW_OPTIONS if not _takes(fn, name)]

    def packed(x, t, reduction="mean", **options):
        for name in dropped:
            options.pop(name, None)
        h, w = unpack(x, t)
        return fn(h, w, t, reduction, **options)

    packed.__name__ = packed.__qualname__ = getattr(fn, "__name__", "linear_cross_entropy")
    packed.__doc__ = fn.__doc__
    return packed


def _logits(hidden, classifier, bias):
    z = hidden @ classifier.T
    return z if bias is None else z + bias


def naive(hidden, classifier, target, reduction="mean", bias=None, label_smoothing=0.0, ignore_index=None, chunks=None):
    """The logits materialised in the dtype, then cross_entropy's textbook formula."""
    return ce.naive(
        _logits(hidden, classifier, bias), target, reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )


def framework(
    hidden, classifier, target, reduction="mean", bias=None, label_smoothing=0.0, ignore_index=None, chunks=None
):
    """torch.nn.functional.cross_entropy(F.linear(hidden, classifier, bias), target)."""
    return F.cross_entropy(
        F.linear(hidden, classifier, bias),
        target,
        reduction=reduction,
        label_smoothing=label_smoothing,
        ignore_index=IGNORE_INDEX if ignore_index is None else ignore_index,
    )


class _Blocks:
    """Two (N, chunk) buffers reused by every chunk: the logits in the GEMM's dtype and
    exp(z − m) in the compute dtype `c` (one buffer where the two dtypes agree). A fresh block
    per chunk (32 MiB in float64) costs a page fault per page on first touch, and a subtraction
    of mixed dtypes a hidden copy."""

    def __init__(self, n: int, parts: list[slice], lg: torch.dtype, c: torch.dtype, device):
        size = n * max(p.stop - p.start for p in parts)
        self.n, self.c = n, c
        self.z = torch.empty(size, dtype=lg, device=device)
        self.e = torch.empty(size, dtype=c, device=device) if c != lg else self.z

    def _view(self, buf: torch.Tensor, part: slice) -> torch.Tensor:
        width = part.stop - part.start
        return buf[: self.n * width].view(self.n, width)

    def logits(self, hg, classifier, part, bias):
        """The chunk's logits: in the GEMM's dtype, or in `c` with the bias added there."""
        z = torch.mm(hg, classifier[part].to(hg.dtype).T, out=self._view(self.z, part))
        if bias is None:
            return z
        e = self._view(self.e, part)
        return (e if e is z else e.copy_(z)).add_(bias[part].to(self.c))

    def exp_shifted(self, z, m, part):
        """exp(z − m) in `c` (z of `logits`; overwritten where it has the dtype `c`)."""
        e = self._view(self.e, part)
        return (e if e.data_ptr() == z.data_ptr() else e.copy_(z)).sub_(m[:, None]).exp_()


def _dtypes(dtype: torch.dtype, device, logits_precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(the logits' GEMM dtype, the softmax work's dtype) of stable for inputs of `dtype`.

    "float32": the logits' GEMMs in float32 (float64 for float64 inputs), as torch computes
    them; the softmax work, dL/dW's GEMM and the sums in the compute dtype. "float64": the
    logits' GEMMs and the softmax work in float64 (the products of float32 or half inputs are
    exact there): about twice the time of the float32 GEMMs on CPUs."""
    if logits_precision not in LOGITS_PRECISIONS:
        raise ValueError(f"logits_precision {logits_precision!r}: expected one of {', '.join(LOGITS_PRECISIONS)}")
    c = compute_dtype(dtype, device)
    if logits_precision == "float64":
        c = torch.promote_types(c, accumulate_dtype(device))
        return c, c
    return torch.promote_types(dtype, torch.float32), c


def _chunk_slices(n: int, v: int, chunks: int | None):
    step = math.ceil(v / chunks) if chunks else max(1, CHUNK_ELEMENTS // max(1, n))
    return [slice(s, min(v, s + step)) for s in range(0, v, step)]


class _StableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, classifier, target, reduction, bias, label_smoothing, ignore_index, chunks, precision):
        lg, c = _dtypes(hidden.dtype, hidden.device, precision)
        n, v = hidden.shape[0], classifier.shape[0]
        ignored = (target == ignore_index) if ignore_index is not None else None
        safe = target if ignored is None else torch.where(ignored, 0, target)
        hg = hidden.to(lg)
        m = torch.full((n,), -math.inf, dtype=c, device=hidden.device)
        s = torch.zeros(n, dtype=c, device=hidden.device)  # Σ_{j≠k} exp(z_j − m)
        k = torch.zeros(n, dtype=torch.int64, device=hidden.device)
        zt = torch.zeros(n, dtype=c, device=hidden.device)
        gaps = torch.zeros(n, dtype=c, device=hidden.device) if label_smoothing else None  # Σ_j (m − z_j)
        parts = _chunk_slices(n, v, chunks)
        blocks = _Blocks(n, parts, lg, c, hidden.device)
        for part in parts:
            z = blocks.logits(hg, classifier, part, bias)
            inside = (safe >= part.start) & (safe < part.stop)
            local = (safe - part.start).clamp(0, part.stop - part.start - 1)
            zt = torch.where(inside, z.gather(1, local[:, None]).squeeze(1).to(c), zt)
            cm, ck = z.max(1)
            cm = cm.to(c)
            moved = cm > m  # ties keep the earlier maximum
            new_m = torch.where(moved, cm, m)
            if gaps is not None:
                # All terms m − z_j >= 0: the old ones grow by (new m − old m) each.
                seen = float(part.start)
                grow = torch.where(m == -math.inf, 0.0, (new_m - m) * seen)
                gaps = gaps + grow + (new_m[:, None] - z).sum(1)
            e = blocks.exp_shifted(z, new_m, part)
            del z
            rows = torch.arange(n, device=hidden.device)
            e[rows[moved], ck[moved]] = 0.0  # the new maximum is the 1 outside s
            # The old maximum (1) and the old s, rescaled to the new maximum.
            s = torch.where(moved, (s + 1) * torch.exp(m - cm), s) + e.sum(1)
            k = torch.where(moved, ck + part.start, k)
            m = new_m
        # A target on the maximum is the k of the gradient's formula (s is the same either way).
        k = torch.where(zt == m, safe, k)
        lse = torch.log1p(s)
        loss = (m - zt) + lse
        if label_smoothing:
            eps = label_smoothing
            loss = (1 - eps) * loss + eps / v * gaps + eps * lse
        denominator = None
        if ignored is not None:
            loss = torch.where(ignored, 0.0, loss)
            denominator = (~ignored).sum().to(torch.float64)
        ctx.save_for_backward(hidden, classifier, target, bias, m, s, k, denominator)
        ctx.meta = (reduction, label_smoothing, ignore_index, chunks, precision)
        return reduce_accurate(loss, reduction, hidden.dtype, None, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, classifier, target, bias, m, s, k, denominator = ctx.saved_tensors
        reduction, label_smoothing, ignore_index, chunks, precision = ctx.meta
        lg, c = _dtypes(hidden.dtype, hidden.device, precision)
        n, v = hidden.shape[0], classifier.shape[0]
        ignored = (target == ignore_index) if ignore_index is not None else None
        safe = target if ignored is None else torch.where(ignored, 0, target)
        # Each row's factor: the upstream gradient, divided by the mean's denominator.
        u = grad_output.to(c).expand(n) if grad_output.dim() == 0 else grad_output.to(c)
        if reduction == "mean":
            d = float(n) if denominator is None else max(float(denominator), 1.0)
            u = u / d
        if ignored is not None:
            u = torch.where(ignored, 0.0, u)
        total = 1 + s
        eps = label_smoothing
        hg = hidden.to(lg)  # the forward's logits, bit for bit: m and s are theirs
        # dL/dh = Σ_chunks g·W and dL/dW = gᵀ·(u·h), with g = p − e_t of the chunk and u each
        # row's factor, in float64 (accumulate_dtype) whatever the input: the sum over the
        # vocabulary cancels (on a confident wrong row dL/dh is about W_k − W_t, down to 2**-20
        # of the terms; on spread rows many terms cancel), and g narrowed to float32 with float32
        # GEMMs (as torch does) lost up to 2 bits more than torch's own float32 roundings, by the
        # luck of which rounding lands where (float32: 12.1 vs 10.2 bits at offset, scale 50,
        # V 1000; 18.0 vs 12.4 at confident_wrong, scale 50, N 512, V 65537, ignored 0.25). Both
        # GEMMs then take g as computed, unrounded; float64 GEMMs cost twice float32 ones on CPUs
        # (see the module's figures). u stays out of g: it multiplies dL/dh's rows once at the
        # end and h's rows for dL/dW.
        acc = accumulate_dtype(hidden.device)
        wide = torch.promote_types(c, acc)
        hu = hidden.to(wide) * u.to(wide)[:, None]
        dh = torch.zeros(hidden.shape, dtype=wide, device=hidden.device)
        dw = torch.empty_like(classifier)
        db = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[4] else None
        rows = torch.arange(n, device=hidden.device)
        # p_j = e_j·(1/(1 + s)): one pass over the chunk for the division.
        factor = (1 / total)[:, None]
        parts = _chunk_slices(n, v, chunks)
        blocks = _Blocks(n, parts, lg, c, hidden.device)
        for part in parts:
            g = blocks.exp_shifted(blocks.logits(hg, classifier, part, bias), m, part)
            et = g.gather(1, (safe - part.start).clamp(0, part.stop - part.start - 1)[:, None]).squeeze(1)
            g.mul_(factor)
            if eps:
                g.sub_(eps / v)
            # p_t − 1 = −(1 + s − e_t)/(1 + s) (= −s/(1 + s) when t is the maximum), plus
            # smoothing's ε − ε/V: no cancellation on confident rows.
            inside = (safe >= part.start) & (safe < part.stop)
            rest = torch.where(safe == k, s, total - et)
            gt = -rest / total + (eps - eps / v if eps else 0.0)
            g[rows[inside], safe[inside] - part.start] = gt[inside]
            g = g.to(wide)
            dh.addmm_(g, classifier[part].to(wide))
            dw[part] = (g.T @ hu).to(dw.dtype)
            if db is not None:
                db[part] = (g.T @ u.to(wide)).to(db.dtype)
            del g
        return dh.mul_(u.to(wide)[:, None]).to(hidden.dtype), dw, None, None, db, None, None, None, None


def stable(
    hidden,
    classifier,
    target,
    reduction="mean",
    bias=None,
    label_smoothing=0.0,
    ignore_index=None,
    chunks=None,
    logits_precision="float32",
):
    """Chunked over the vocabulary with an online logsumexp, in the compute dtype, never the N × V logits;
    the logits' GEMMs in `logits_precision` (see `_dtypes`)."""
    _dtypes(hidden.dtype, hidden.device, logits_precision)  # a bad value fails here, before any work
    return _StableLinear.apply(
        hidden, classifier, target, reduction, bias, label_smoothing, ignore_index, chunks, logits_precision
    )


INFO = LOSS_INFO["linear_cross_entropy"]  # summary, formulas, options: catalog.py

LOSS = Loss(
    name="linear_cross_entropy",
    summary=INFO.summary,
    multiclass=True,
    input_kind="hidden",
    implementations={
        "naive": Impl("naive", "naive", adapt(naive), "logits = h @ W.T in the dtype, then −log(e^{z_t}/Σ e^{z_j})"),
        "stable": Impl(
            "stable",
            "stable",
            adapt(stable),
            "vocabulary chunks, online logsumexp, (m − z_t) + log1p(s), one precision up, rounded once",
        ),
        "torch": Impl("torch", "framework", adapt(framework), "F.cross_entropy(F.linear(h, W, b), t)"),
    },
    reference_chunk=ce.reference_chunk,  # the logits' cross entropy; the whole reference is `ref.reference`
    formulas=INFO.formulas,
    options=INFO.options,
    denominators=ce.denominators,
    inputs=("hidden", "classifier"),
    unpack=unpack,
    adapt=adapt,
    make_point=ref.make_point,
    reference_fn=ref.reference_fn,
    input_elements=ref.input_elements,
    logits_bytes=ref.logits_bytes,
)
