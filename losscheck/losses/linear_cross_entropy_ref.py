"""linear_cross_entropy's inputs (the value sets) and its reference.

**Inputs** (`make_point`): hidden states (N, H) and a classifier (V, H) drawn in float64 from
the seed on the point's device, rounded once to the dtype. `scale` sets the logits' spread:
hidden entries are N(0, 1) and classifier entries N(0, 1)·scale/√H, so that each logit is
about N(0, scale²). The value sets:

* ``normal``, ``uniform`` (the same spread, uniform entries);
* ``confident_correct``: Cut Cross-Entropy's construction, the hidden state copied into the
  target's classifier row, scaled so that the target logit is `scale` (h·h·scale/|h|²); the
  other rows have spread 1. Targets are distinct while N <= V, so every row is confident:
  softmax(z)_t → 1 as the scale grows (Liger-Kernel #1329's failure lives here);
* ``confident_wrong``: the same copy into another class's row, the target random;
* ``ties``: classifier rows in equal pairs (W_2i = W_2i+1, spread `scale`): every logit is
  tied with another, the maximum included. (Every row equal would make dL/dh exactly 0,
  which no floating-point GEMM returns: every implementation infinitely many ULPs off.)
* ``offset``: a common offset of +scale in every logit, as a bias of `scale` in every class
  (the `bias` argument), on logits of spread 1. (A shared hidden direction would make that
  direction's dL/dh exactly 0, as above.)

**Reference** (`reference`): float32, float16 and bfloat16 inputs in float64 tensors on
their device. The products h_k·W_jk are exact in float64 (at most 48 significand bits), and
the float64 GEMM sums H of them: |δz_ij| <= γ_H·Σ_k |h_ik·W_jk|, γ_H = H·2**-53/(1 − H·2**-53)
(Higham, Accuracy and Stability, §3.1), tested in tests/test_linear_cross_entropy.py. The
loss moves by at most 2·max_j |δz_ij| (relative to the loss on confident rows), so the
reference keeps the required 1/64 ULP of float32 (2**-30) while Σ_k |h_ik·W_jk| <= 2**22/H
times the loss — e.g. logits up to 8192 in magnitude at H = 512 — and far more for half
targets. The logits' cross entropy and its gradient dL/dz are cross_entropy's reference
(`cross_entropy._reference_tensors`); dL/dh = dL/dz @ W and dL/dW = dL/dz^T @ h are float64
GEMMs (their error γ_V or γ_N times the sum of the absolute terms), dL/dW accumulated in
place over chunks of rows so that memory stays at one chunk of logits plus (V, H) float64.
Past those bounds (cancellation in the GEMMs' sums by more than 2**23/H) the reference is
not certified to 1/64 ULP; the value sets stay inside them.

float64 inputs in double-double (losscheck.doubledouble) on their device: products by
TwoProduct (exact), sums of dd terms, the cross entropy of the dd logits in dd
(`_cross_entropy_dd`), both gradients' GEMMs in dd: relative errors near 2**-100 times the
cancellation, rounded once. It costs elementwise work of N·V·H per GEMM: the float64 points
of a config should be small.
"""

from __future__ import annotations

import math

import torch

from .. import doubledouble as D, inputs, reference as R
from . import cross_entropy as ce
from .base import Reference

DEFAULT_HIDDEN = 256
# Values generated (float64) or formed (dd products) at once.
BLOCK = 1 << 20
DD_BLOCK = 1 << 19
# Logits per chunk of rows of the float64 reference (64 MiB): fewer, larger chunks keep the
# in-place dL/dW updates (a pass over (V, H) float64 each) few.
REF_CHUNK = 1 << 23


# Options that tell an implementation how to compute, not what (stable's vocabulary chunks and
# the dtype of its logit GEMMs): the reference ignores them, and `adapt` passes them only to a
# function whose signature names them (or takes **options).
HOW_OPTIONS = ("chunks", "logits_precision")


def hidden_size(options) -> int:
    return int(dict(options).get("hidden", DEFAULT_HIDDEN))


def logits_bytes(case) -> int:
    """The bytes the N × V logits take in the dtype: what a fused loss does not hold."""
    from ..dtypes import FORMATS

    return case.batch * (case.time or 1) * case.classes * FORMATS[case.dtype].torch_dtype.itemsize


def input_elements(case) -> int:
    """Values of the packed input (N + V) × H."""
    return (case.batch * (case.time or 1) + case.classes) * hidden_size(case.options)


def _rows(draw, rows: int, cols: int, dtype, device, scale: float = 1.0):
    """(rows, cols) normal draws times `scale`, rounded to `dtype` block by block (a 128k × 512
    classifier never exists in float64 at once)."""
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    step = max(1, BLOCK // max(1, cols))
    for s in range(0, rows, step):
        e = min(rows, s + step)
        out[s:e] = R.round_to(draw((e - s, cols)).mul_(scale), dtype)
    return out


def make_point(case, seed: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(packed input (N + V, H) in `dtype`, int64 targets (N,), the implementations' options
    the value set needs: a bias) of `case` (see the module)."""
    n, v, hdim = case.batch * (case.time or 1), case.classes, hidden_size(case.options)
    dist, scale = case.distribution, float(case.scale)
    d = inputs.generator_for(seed, case.loss, n, v, hdim, scale, dist, device=device)
    draw = d.normal if dist != "uniform" else (lambda shape: d.symmetric(shape).mul_(math.sqrt(3)))
    h64 = draw((n, hdim))
    options: dict = {}
    if dist in ("confident_correct", "confident_wrong") and n <= v:
        picked = torch.randperm(v, generator=d.g, device=d.device)[:n]
    else:
        picked = d.integers(0, v, (n,))
    spread = scale if dist in ("normal", "uniform", "ties") else 1.0
    w = _rows(draw, v, hdim, dtype, device, spread / math.sqrt(hdim))
    t = picked
    if dist == "confident_wrong":
        t = (picked + d.integers(1, max(2, v), (n,))) % v if v > 1 else picked
    if dist in ("confident_correct", "confident_wrong"):
        # The copied row: target (or wrong class) logit = scale (h·h·scale/|h|²).
        # Where rows share a class (N > V) the last one's copy is kept, chosen explicitly (an
        # indexed write with repeated indices keeps any, by thread); |h|² by cumsum: sequential
        # along the row whatever the thread count (inputs.py).
        rows = torch.arange(n, device=h64.device)
        last = torch.full((v,), -1, dtype=torch.int64, device=h64.device).scatter_reduce_(0, picked, rows, "amax")
        won = last[last >= 0]
        hw = h64[won]
        w[picked[won]] = R.round_to(hw * (scale / (hw * hw).cumsum(1)[:, -1:]), dtype)
    elif dist == "ties":
        w[1::2] = w[0 : v - 1 : 2]
    elif dist == "offset":
        options["bias"] = R.round_to(torch.full((v,), scale, dtype=torch.float64, device=w.device), dtype)
    elif dist not in ("normal", "uniform"):
        raise ValueError(f"distribution {dist!r} does not apply to linear_cross_entropy")
    return torch.cat([R.round_to(h64, dtype), w]), t, options


# ---- the reference -------------------------------------------------------------------------


def _undefined(kept: float, reduction: str) -> str | None:
    if reduction == "mean" and kept == 0:
        return (
            "every target is ignored: the mean is 0/0, undefined; "
            "the sensible answer is 0 with gradient 0 (nothing to learn from)"
        )
    return None


def reference_fn(loss, inp: torch.Tensor, target: torch.Tensor, options: dict | None = None, reduction: str = "mean"):
    """`losses.reference` for linear_cross_entropy: the packed input's loss and gradient
    (dL/dh rows first, then dL/dW), rounded once to the input's dtype."""
    opts = dict(options or {})
    for how in HOW_OPTIONS:  # how an implementation computes: no bearing on the value
        opts.pop(how, None)
    n = target.shape[0]
    ignore_index = opts.get("ignore_index")
    kept = float(n if ignore_index is None else int((target != ignore_index).sum()))
    undefined = _undefined(kept, reduction)
    if inp.dtype == torch.float64:
        return _reference_dd(inp, target, opts, reduction, kept, undefined)
    dtype, device = inp.dtype, inp.device
    x = inp.detach().to(torch.float64)
    h, w = x[:n], x[n:]
    bias = opts.pop("bias", None)
    bias = None if bias is None else bias.detach().to(torch.float64)
    v = w.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float64, device=device)
    grad = torch.zeros_like(x)
    gh, gw = grad[:n], grad[n:]
    total = R.TensorCompensatedSum()
    for rows in R.row_chunks(n, v, REF_CHUNK):
        z = h[rows] @ w.T
        if bias is not None:
            z += bias
        lw, gz = ce._reference_tensors(z, target[rows].to(device), **opts)
        del z
        loss_rows[rows] = lw
        total.add(lw)
        torch.matmul(gz, w, out=gh[rows])
        gw.addmm_(gz.T, h[rows])
        del gz
    divide = reduction == "mean" and not undefined
    if undefined:
        grad.zero_()
    elif divide:
        grad /= kept
    value = None
    if reduction != "none":
        value = torch.zeros((), dtype=torch.float64, device=device) if undefined else total.mean(1)
        if divide:
            value = value / kept
    return Reference(
        loss=R.round_to(loss_rows, dtype),
        grad=R.round_to(grad, dtype),
        reduced=None if value is None else R.round_to(value.reshape(1), dtype)[0],
        value=None if value is None else float(value),
        reduction=reduction,
        undefined=undefined,
    )


def dd_matmul(a, b: torch.Tensor):
    """a @ b for a dd a (r, K) and a float64 b (K, M), as a dd (r, M): every product by
    TwoProduct (exact; a's low part times b adds its own, far smaller, error), the K terms
    of each sum by `doubledouble.row_sum` (a tree of TwoSums)."""
    ah, al = a
    r, kk = ah.shape
    m = b.shape[1]
    bt = b.T
    out_h = torch.empty((r, m), dtype=torch.float64, device=ah.device)
    out_l = torch.empty_like(out_h)
    step = max(1, DD_BLOCK // max(1, r * kk))
    for s in range(0, m, step):
        e = min(m, s + step)
        p, q = D.two_prod(ah[:, None, :], bt[None, s:e, :])
        q = q + al[:, None, :] * bt[None, s:e, :]
        hi, lo = D.row_sum((p.reshape(-1, kk), q.reshape(-1, kk)))
        out_h[:, s:e], out_l[:, s:e] = hi.reshape(r, e - s), lo.reshape(r, e - s)
    return out_h, out_l


def _cross_entropy_dd(z, t, label_smoothing: float, ignore_index):
    """Loss (r,) and gradient dL/dz (r, V) of dd logits, both dd: (z_k − z_t) + log1p(s),
    s = Σ_{j≠k} exp(z_j − z_k) with k the row's maximum, and p − onehot with the target's
    entry −(1 + s − e_t)/(1 + s) (−s/(1 + s) when t = k), as in cross_entropy's stable."""
    zh, zl = z
    r, v = zh.shape
    ignored = (t == ignore_index) if ignore_index is not None else torch.zeros_like(t, dtype=torch.bool)
    safe = torch.where(ignored, 0, t)
    k = zh.argmax(1)
    k = torch.where(zh.gather(1, safe[:, None]).squeeze(1) == zh.gather(1, k[:, None]).squeeze(1), safe, k)
    zk = (zh.gather(1, k[:, None]), zl.gather(1, k[:, None]))
    e = D.exp(D.sub(z, (zk[0].expand(r, v), zk[1].expand(r, v))))
    e = (e[0].scatter(1, k[:, None], 0.0), e[1].scatter(1, k[:, None], 0.0))
    s = D.row_sum(e)
    l1 = D.log1p(s)
    zt = (zh.gather(1, safe[:, None]).squeeze(1), zl.gather(1, safe[:, None]).squeeze(1))
    loss = D.add(D.sub((zk[0].squeeze(1), zk[1].squeeze(1)), zt), l1)
    total = D.add(D.dd(torch.ones_like(s[0])), s)
    tot2 = (total[0][:, None].expand(r, v), total[1][:, None].expand(r, v))
    p = D.div((e[0].scatter(1, k[:, None], 1.0), e[1]), tot2)
    et = (e[0].gather(1, safe[:, None]).squeeze(1), e[1].gather(1, safe[:, None]).squeeze(1))
    rest = D.sub(total, et)
    rest = (torch.where(safe == k, s[0], rest[0]), torch.where(safe == k, s[1], rest[1]))
    gt = D.neg(D.div(rest, total))
    if label_smoothing:
        eps = D.dd(torch.full_like(s[0], label_smoothing))
        eps_v = D.div(eps, D.dd(torch.full_like(s[0], float(v))))
        one_minus = D.sub(D.dd(torch.ones_like(s[0])), eps)
        gaps = D.row_sum(D.sub((zk[0].expand(r, v), zk[1].expand(r, v)), z))  # Σ_j (z_k − z_j) >= 0
        smooth = D.add(D.div(gaps, D.dd(torch.full_like(s[0], float(v)))), l1)
        loss = D.add(D.mul(one_minus, loss), D.mul(eps, smooth))
        p = D.sub(p, (eps_v[0][:, None].expand(r, v), eps_v[1][:, None].expand(r, v)))
        gt = D.add(gt, D.sub(eps, eps_v))
    rows = torch.arange(r, device=zh.device)
    g = (p[0].clone(), p[1].clone())
    g[0][rows, safe], g[1][rows, safe] = gt[0], gt[1]
    keep = (~ignored).to(torch.float64)
    return (loss[0] * keep, loss[1] * keep), (g[0] * keep[:, None], g[1] * keep[:, None])


def _reference_dd(inp, target, opts, reduction, kept, undefined):
    device = inp.device
    n = target.shape[0]
    x = inp.detach()
    h, w = x[:n], x[n:]
    v = w.shape[0]
    bias = opts.get("bias")
    zero = torch.zeros_like(h)
    hdd = (h, zero)
    loss_h = torch.empty(n, dtype=torch.float64, device=device)
    loss_l = torch.empty_like(loss_h)
    gh = (torch.empty_like(h), torch.empty_like(h))
    gw = (torch.zeros_like(w), torch.zeros_like(w))
    for rows in R.row_chunks(n, v * max(1, w.shape[1] // 8), R.chunk_elements(device)):
        z = dd_matmul((h[rows], zero[rows]), w.T)
        if bias is not None:
            b = bias.detach().to(torch.float64)[None, :].expand_as(z[0])
            z = D.add(z, D.dd(b))
        lw, gz = _cross_entropy_dd(
            z, target[rows].to(device), float(opts.get("label_smoothing", 0.0)), opts.get("ignore_index")
        )
        loss_h[rows], loss_l[rows] = lw
        gh[0][rows], gh[1][rows] = dd_matmul(gz, w)
        gw = D.add(gw, dd_matmul((gz[0].T, gz[1].T), hdd[0][rows]))
    total = D.row_sum((loss_h[None, :], loss_l[None, :]))
    divide = reduction == "mean" and not undefined
    grads = []
    for g in (gh, gw):
        if undefined:
            g = (torch.zeros_like(g[0]), torch.zeros_like(g[0]))
        elif divide:
            g = D.div(g, D.dd(torch.full_like(g[0], kept)))
        grads.append(D.to_float64(g))
    value = None
    if reduction != "none":
        value = D.dd(torch.zeros(1, dtype=torch.float64, device=device)) if undefined else total
        if divide:
            value = D.div(value, D.dd(torch.full_like(value[0], kept)))
    return Reference(
        loss=D.to_float64((loss_h, loss_l)),
        grad=torch.cat(grads),
        reduced=None if value is None else D.to_float64(value)[0],
        value=None if value is None else float(value[0][0] + value[1][0]),
        reduction=reduction,
        undefined=undefined,
    )
