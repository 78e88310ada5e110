"""What token_logprobs, entropy, kl_div and js_div share: the row formulas of entropy and of
the two divergences (written once, for torch tensors of any float dtype and for numpy long
double), the plumbing of a loss of two logit tensors (student, teacher), and the exact
per-row values behind the "absolute error in nats" (docs/METRICS.md).

**The formulas** (rows of logits x, working precision; every sum over the vocabulary is of
non-negative terms, or of terms centred at the row's dominant class):

* softmax parts: m = max x, z = x − m <= 0, s = Σ_{j≠k} e^{z_j} (k the first maximum),
  log p = z − log1p(s).
* entropy: H = log1p(s) + Σ p_j a_j with a = −z >= 0; dH/dx_j = p_j (a_j − ā), ā = Σ p a.
* KL(P‖Q), δ = log P − log Q, computed as c_j − Δ from the logits' differences
  c_j = ((a_j − a_r) − (b_j − b_r))/T (r: a's first maximum) and Δ = log(S_a/S_b) by log1p
  (`_pair_parts`): log P − log Q would cancel two values near −log V where P ≈ Q.
  KL = Σ P_j φ(δ_j), φ(δ) = δ − 1 + e^{−δ} >= 0 — Σ P δ plus Σ (Q − P) = 0, each term
  non-negative — φ by its series where |δ| < 1/2, else as P (δ − 1) + Q.
  dKL/da_j = P_j (δ_j − KL)/T, formed as P_j ((c_j − c_r) − Σ P_k (c_k − c_r))/T (`_centered`:
  the dominant class's entry does not cancel); dKL/db_j = (Q_j − P_j)/T = P_j expm1(−δ_j)/T.
* JS(P, Q) = ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q)/2: per class ½ (P + Q)(log 2 − H_b(σ)) with
  σ = P/(P + Q), y = 2σ − 1 = tanh(δ/2) — non-negative (log-sum inequality); log 2 − H_b by
  its series Σ y^{2n}/(2n(2n − 1)) where |y| < 1/2. dJS/da_j = P_j (c_j − Σ P c)/T with
  c = ½ log(2σ), centred as above, its gaps from log1p(y) near σ = ½ and from −softplus(−δ)
  beyond (`_log_sigma_gaps`); likewise for b with Q and 1 − σ.

Where a probability is exactly 0 (a −inf logit) its terms are their limits (0 · log 0 = 0);
a +inf logit makes its row the limit (the +inf classes share the mass; the entropy of several
is undefined, NaN). Accuracy: float64 keeps 2**-53 relative per operation, so the references
are within 1/64 ULP of float32 except where the inputs themselves cancel (a gradient entry with
δ_j ≈ KL relative to the other classes, a_j ≈ ā; δ_j ≈ Δ); long double (float64 points) gives
11 more bits: faithful, and correctly rounded but at such cancellations (tests/test_divergences.py,
tests/test_token_logprobs.py). The divergences' value sets have finite logits only
(inputs.PAIR_APPLIES): −inf entries are handled, no limit with +inf ones is certified.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import reference as R
from ..catalog import LOSS_INFO
from .base import Impl, Loss, Reference

LN2 = math.log(2.0)
# Terms of the series of φ and of log 2 − H_b: |δ|, |y| < 1/2 make the next term < 2**-70.
_PHI_TERMS = 24
_JS_TERMS = 36


class _Ops:
    """The few operations the formulas need, for torch tensors or numpy arrays."""

    def __init__(self, like):
        self.torch = isinstance(like, torch.Tensor)
        self.xp = torch if self.torch else np
        self.ln2 = LN2 if self.torch else np.log(np.longdouble(2))  # a long double log 2 for long double rows

    def amax(self, x):
        return x.amax(-1, keepdim=True) if self.torch else np.max(x, -1, keepdims=True)

    def rsum(self, x):
        return x.sum(-1, keepdim=True) if self.torch else np.sum(x, -1, keepdims=True)

    def first_max(self, x):
        """True at each row's first maximum."""
        if self.torch:
            first = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            return first.scatter_(-1, x.argmax(-1, keepdim=True), True)
        return np.arange(x.shape[-1]) == np.argmax(x, -1)[..., None]

    def where(self, c, a, b):
        return self.xp.where(c, a, b)

    def full(self, like, value):
        return self.xp.full_like(like, value)


def _softmax_parts(o: _Ops, x):
    """(z = x − m, e = e^z, log1p(s), p, log p) of rows x; +inf logits as their limit."""
    xp = o.xp
    pos = xp.isposinf(x)
    x = o.where(o.rsum(pos * 1.0) > 0, o.where(pos, 0.0, -math.inf), x)
    m = o.amax(x)
    z = x - m
    e = xp.exp(z)
    s = o.rsum(o.where(o.first_max(x), 0.0, e))
    l1 = xp.log1p(s)
    p = e / (1 + s)
    return z, l1, p, z - l1


def entropy_rows(x):
    """(H (r,), dH/dx (r, V)) of rows of logits x (tensor or long double array)."""
    o = _Ops(x)
    z, l1, p, _ = _softmax_parts(o, x)
    pa = o.where(p == 0, 0.0, p * -z)
    abar = o.rsum(pa)
    grad = o.where(p == 0, 0.0, p * (-z - abar))
    # Several +inf logits, or only −inf ones: the entropy's limit depends on how they grow
    # (log k if alike, 0 if one outgrows the others): there is none, NaN (one +inf: a point
    # mass, H = 0). The gradient's limit is 0 either way.
    none = (o.rsum(o.xp.isposinf(x) * 1.0) > 1) | (o.amax(x) == -math.inf)
    return o.where(none, math.nan, l1 + abar)[..., 0], o.where(none, 0.0, grad)


def _horner(o: _Ops, u, coefficients):
    out = o.full(u, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * u + c
    return out


def _series_where(o: _Ops, mask, u, coefficients):
    """The series in u where `mask` holds (0 elsewhere), evaluated on those entries only: on a
    152k vocabulary most entries are beyond the series' range, and its 20-36 steps would be
    most of the reference's time."""
    out = o.xp.zeros_like(u)
    out[mask] = _horner(o, u[mask], coefficients)
    return out


def _phi_series(one):
    """φ(δ) = δ² Σ_k u^k/(k+2)! in u = −δ: the coefficients 1/(k+2)!, divided out in `one`'s precision."""
    out, c = [], one / 2
    for k in range(_PHI_TERMS):
        out.append(c)
        c = c / (k + 3)
    return out


def _js_series(one):
    """log 2 − H_b = w Σ_k w^k/((2k+2)(2k+1)) in w = y²."""
    return [one / ((2 * k + 2) * (2 * k + 1)) for k in range(_JS_TERMS)]


def _coefficients(o: _Ops, series):
    return series(1.0 if o.torch else np.longdouble(1))


def _pair_parts(a, b, temperature: float):
    """(ops, P, Q, log P, δ = log P − log Q, both finite, δ + const) of rows of logits a, b at T.

    δ_j = c_j − Δ with c_j = ((a_j − a_r) − (b_j − b_r))/T (r: a's first maximum; differences
    of the inputs) and Δ = log(S_a/S_b), S = Σ_k e^{(x_k − x_r)/T}, as log1p(Σ_k e^{β_k}
    expm1(c_k) / S_b): where P ≈ Q, log P − log Q would cancel two values near −log V (its
    error 2**-53·log V absolute, 1e−13 relative at δ ≈ 1e−6), this form only the inputs'
    differences. Rows where b's logits exceed b_r by 700/T (no such P ≈ Q) keep log P − log Q."""
    o = _Ops(a)
    with np.errstate(all="ignore"):
        _, _, p, lp = _softmax_parts(o, a / temperature)
        _, _, q, lq = _softmax_parts(o, b / temperature)
        # Log-probabilities stay finite where the probabilities underflow (a gap of 104 nats in
        # float32, 745 in float64): δ from them, and a class is masked only at a −inf logit.
        both = (lp > -math.inf) & (lq > -math.inf)
        r = o.first_max(a)
        alpha = (a - o.rsum(o.where(r, a, 0.0))) / temperature
        beta = (b - o.rsum(o.where(r, b, 0.0))) / temperature
        c = ((a - o.rsum(o.where(r, a, 0.0))) - (b - o.rsum(o.where(r, b, 0.0)))) / temperature
        eb = o.xp.exp(beta)
        moved = o.where(o.xp.isfinite(c), eb * o.xp.expm1(c), o.xp.exp(alpha) - eb)
        ratio = o.rsum(moved) / o.rsum(eb)  # S_a/S_b − 1
        # log1p near 0 (P ≈ Q); beyond, log S_a − log S_b (log1p of ≈ −1 would lose S_a/S_b).
        shift = o.where(abs(ratio) < 0.5, o.xp.log1p(ratio), o.xp.log(o.rsum(o.xp.exp(alpha))) - o.xp.log(o.rsum(eb)))
        ok = (o.amax(beta) < 700) & o.xp.isfinite(shift)
        exact_c = ok & o.xp.isfinite(c)
        delta = o.where(both, o.where(exact_c, c - shift, lp - lq), 0.0)
        # δ up to a constant per row, for the softmax's chain rule (which ignores constants):
        # c itself where it is exact, so that its entry at r is exactly 0.
        return o, p, q, lp, delta, both, o.where(exact_c, c, delta)


def kl_rows(a, b, temperature: float = 1.0):
    """(KL(P‖Q) (r,), dKL/da, dKL/db) with P = softmax(a/T), Q = softmax(b/T), rows of logits."""
    o, p, q, lp, d, both, dc = _pair_parts(a, b, temperature)
    small = abs(d) < 0.5
    phi = d * d * _series_where(o, small, -d, _coefficients(o, _phi_series))
    with np.errstate(all="ignore"):
        term = o.where(small, p * phi, p * (d - 1) + q)
        term = o.where(both, term, o.where(lp == -math.inf, q, math.inf))
        kl = o.rsum(term)
        # δ_j − KL = (δ_j − δ_r) − Σ P_k (δ_k − δ_r), r a's first maximum (P's largest class):
        # on a confident row the dominant class's entry then does not cancel (δ_r − KL did:
        # 27 bits at T = 0.05).
        ga = _centered(o, p, dc, a) / temperature
        gb = o.where(both, o.where(small, p * o.xp.expm1(-d), q - p), q - p) / temperature
    return kl[..., 0], ga, gb


def _softplus(o: _Ops, z):
    return o.where(z > 0, z, 0.0) + o.xp.log1p(o.xp.exp(-abs(z)))


def js_rows(a, b, temperature: float = 1.0):
    """(JS(P, Q) (r,), dJS/da, dJS/db), P = softmax(a/T), Q = softmax(b/T), rows of logits."""
    o, p, q, lp, d, both, dc = _pair_parts(a, b, temperature)
    xp = o.xp
    with np.errstate(all="ignore"):
        y = o.where(both, xp.tanh(d / 2), o.where(lp == -math.inf, -1.0, 1.0))
        w = y * y
        series = w * _series_where(o, abs(y) < 0.5, w, _coefficients(o, _js_series))
        sigma = (1 + y) / 2
        direct = o.ln2 - sigma * _softplus(o, -d) - (1 - sigma) * _softplus(o, d)
        g = o.where(abs(y) < 0.5, series, direct)
        term = o.where(both, (p + q) / 2 * g, o.where(lp == -math.inf, q, p) * (o.ln2 / 2))
        js = o.rsum(term)
        # dJS/dP_j = c_j = ½ log(2σ_j), dJS/dQ_j = ½ log(2(1 − σ_j)); the chain rule needs only
        # c_j − c_r (r: the distribution's first maximum, `_centered`).
        ga = _centered(o, p, _log_sigma_gaps(o, d, y, both, a, 1.0), a) / temperature
        gb = _centered(o, q, _log_sigma_gaps(o, d, y, both, b, -1.0), b) / temperature
    return js[..., 0], ga, gb


def _at(o: _Ops, x, r):
    """Each row's value of x at its position r (a one-hot mask)."""
    return o.rsum(o.where(r, x, 0.0))


def _log_sigma_gaps(o: _Ops, d, y, both, logits, sign: float):
    """½ (log σ_j − log σ_r) for σ = sigmoid(sign·δ) (sign −1: 1 − σ), r the first maximum of
    `logits`: from log1p(sign·y) (= log 2σ) where both classes have |y| < 1/2, else from
    −softplus(−sign·δ) (= log σ), which keeps e^−65 next to a value near 0 where log 2 + log σ
    would round it away (a confident class beside another). A class masked in one distribution
    only (y = ±1 exactly, δ set to 0): its σ is 1 or 0, log σ 0 or −inf."""
    r = o.first_max(logits)
    near = abs(y) < 0.5
    close = o.xp.log1p(sign * y)
    far = o.where(both, -_softplus(o, -sign * d), o.xp.log((1 + sign * y) / 2))
    both_near = near & (_at(o, near * 1.0, r) > 0)
    return o.where(both_near, close - _at(o, close, r), far - _at(o, far, r)) / 2


def _centered(o: _Ops, w, c, logits):
    """w_j (c_j − Σ_k w_k c_k), the softmax's chain rule, as w_j ((c_j − c_r) − Σ_k w_k (c_k − c_r))
    with r the first maximum of `logits`: on a confident row (w_r ≈ 1) the dominant entry is then
    −Σ_{k≠r} w_k (c_k − c_r), where c_r − Σ w c would cancel."""
    r = o.first_max(logits)
    dc = o.where(w == 0, 0.0, c - _at(o, c, r))
    return o.where(w == 0, 0.0, w * (dc - o.rsum(w * dc)))


# ---- a loss of two logit tensors (student, teacher) -------------------------------------------

PAIR_INPUTS = ("student", "teacher")


def unpack(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) views of the packed (2N, V) input: the first N = len(target) rows."""
    n = target.shape[0]
    return x[:n], x[n:]


def adapt(fn):
    """`fn(student, teacher, target, reduction, **options)` as the sweep calls an
    implementation, `f(packed, target, reduction, **options)`."""

    def packed(x, t, reduction="mean", **options):
        s, te = unpack(x, t)
        return fn(s, te, t, reduction, **options)

    packed.__name__ = packed.__qualname__ = getattr(fn, "__name__", "divergence")
    packed.__doc__ = fn.__doc__
    return packed


# Options a pair point passes to its implementations: record key -> (keyword, default).
PAIR_OPTIONS = {
    "direction": ("direction", "forward"),
    "log_target": ("log_target", False),
    "temperature": ("temperature", 1.0),
}


def make_point(case, seed: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(packed (2N, V) logits in `dtype`: the student's rows then the teacher's, each an
    independent draw of the case's value set and scale; int64 labels (the student's, unused
    by the divergences); the options of the case: direction, log_target, temperature)."""
    from .. import inputs
    from . import LOSSES

    loss = LOSSES[case.loss]
    n, v = case.batch, int(case.classes)
    out = torch.empty((2 * n, v), dtype=dtype, device=device)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    for half, key in ((0, case.loss), (1, f"{case.loss}/teacher")):
        for block, x, t in inputs.generate_blocks(key, n, v, case.scale, case.distribution, seed, None, device):
            out[half * n + block.start : half * n + block.stop] = loss.make_input(x, dtype)
            if half == 0:
                labels[block] = torch.as_tensor(t, device=device)
    opts = dict(case.options)
    options = {kw: opts[k] for k, (kw, _) in PAIR_OPTIONS.items() if k in loss.options and k in opts}
    return out, labels, options


def input_elements(case) -> int:
    return 2 * case.batch * int(case.classes)


def _read(t: torch.Tensor, ext: bool):
    return R.to_work(t, np.longdouble) if ext else t.detach().to(R.WORK)


def _exact(values, ext: bool, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(device) if ext else values.to(device)


def pair_rows(kind: str, student, teacher, direction: str = "forward", temperature: float = 1.0):
    """(loss, d/dstudent, d/dteacher) of rows: KL in `direction` (forward: KL(teacher‖student),
    reverse: KL(student‖teacher)), or JS."""
    if kind == "js":
        return js_rows(student, teacher, temperature)
    if direction == "reverse":
        return kl_rows(student, teacher, temperature)
    loss, g_teacher, g_student = kl_rows(teacher, student, temperature)
    return loss, g_student, g_teacher


def pair_reference(kind: str):
    """`Loss.reference_fn` of a divergence: rows in chunks, in float64 tensors on the device
    (float32 and half points) or numpy long double on the host (float64), rounded once; the
    mean is over rows (torch's `batchmean`)."""

    def reference_fn(loss, inp, target, options=None, reduction="mean"):
        opts = dict(options or {})
        opts.pop("log_target", None)  # how an implementation is given the teacher: no bearing on the value
        n, v = target.shape[0], inp.shape[1]
        dtype, device = inp.dtype, inp.device
        ext = dtype == torch.float64
        student, teacher = unpack(inp.detach(), target)
        loss_out = torch.empty(n, dtype=dtype, device=device)
        exact = torch.empty(n, dtype=torch.float64, device=device)
        grad = torch.empty_like(inp)
        total = R.CompensatedSum() if ext else R.TensorCompensatedSum()
        divide = reduction == "mean"
        for rows in R.row_chunks(n, 2 * v, R.CHUNK_ELEMENTS if ext else R.chunk_elements(device)):
            lw, gs, gt = pair_rows(kind, _read(student[rows], ext), _read(teacher[rows], ext), **opts)
            loss_out[rows] = R.round_to(lw, dtype)
            exact[rows] = _exact(lw, ext, device)
            for part, g in ((slice(rows.start, rows.stop), gs), (slice(n + rows.start, n + rows.stop), gt)):
                grad[part] = R.round_to(g / n if divide else g, dtype)
            total.add(lw)
        value = None
        reduced = None
        if reduction != "none":
            work = np.longdouble if ext else np.float64
            value = total.mean(1, work) / (n if divide else 1)
            reduced = R.round_to(np.asarray([value], dtype=work) if ext else value.reshape(1), dtype)[0].to(device)
        return Reference(
            loss=loss_out,
            grad=grad,
            reduced=reduced,
            value=None if value is None else float(value),
            reduction=reduction,
            exact=exact,
        )

    return reference_fn


def with_exact(rows_fn):
    """`Loss.reference_fn` of a single-input row loss: the generic chunked reference, plus the
    exact per-row values in float64 (`Reference.exact`, for the error in nats). `rows_fn(x, t)`
    gives the rows' values in working precision (x float64 tensors or long double arrays)."""
    from dataclasses import replace

    def reference_fn(loss, inp, target, options=None, reduction="mean"):
        from .base import reference

        ref = reference(replace(loss, reference_fn=None), inp, target, options, reduction)
        ext = inp.dtype == torch.float64
        x = inp.detach().reshape(-1, inp.shape[-1])
        t = target.reshape(-1)
        exact = torch.empty(x.shape[0], dtype=torch.float64, device=inp.device)
        for rows in R.row_chunks(x.shape[0], x.shape[1], R.CHUNK_ELEMENTS if ext else R.chunk_elements(inp.device)):
            tt = t[rows].cpu().numpy() if ext else t[rows]
            with np.errstate(all="ignore"):
                exact[rows] = _exact(rows_fn(_read(x[rows], ext), tt), ext, inp.device)
        if ref.outside is not None:
            exact = exact.masked_fill(ref.outside.reshape(-1), math.nan)
        return replace(ref, exact=exact.reshape(ref.loss.shape))

    return reference_fn


# ---- the implementations' shared parts ------------------------------------------------------


def widen(x: torch.Tensor):
    """x in the precision `stable` computes in: float64 for float32 and the halves too (not
    compute_dtype's float32: these gradients are products of probabilities, which reach float32's
    subnormals exactly where bfloat16's, of the same exponent range, still hold them), numpy long
    double for float64 on the CPU where that is extended precision (float64 has no wider torch
    type; computed natively a gradient entry p_j (a_j − ā) kept only ~44 of 53 bits). Float64
    on an accelerator: float64 itself; MPS (no float64): compute_dtype."""
    from .base import compute_dtype

    if x.device.type == "mps":
        return x.detach().to(compute_dtype(x.dtype, x.device))
    if x.dtype == torch.float64 and x.device.type == "cpu" and R.path(x.dtype, "cpu") == "extended":
        return R.to_work(x.detach(), np.longdouble)
    return x.detach().to(torch.float64)


def narrow(values, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values from `widen`'s precision as torch tensors on `like`'s device: (high part, the
    rounding error of long double values to float64, or None), for reduce_accurate's `low`."""
    if isinstance(values, torch.Tensor):
        return values, None
    hi = values.astype(np.float64)
    lo = (values - hi).astype(np.float64)
    return torch.from_numpy(hi).to(like.device), torch.from_numpy(lo).to(like.device)


def torch_reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """A framework's reduction of per-row values: the mean over rows (torch's `batchmean`)."""
    return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / rows.shape[0]


class _StablePair(torch.autograd.Function):
    """pair_rows one precision up (compute_dtype), the gradients explicit, rounded once."""

    @staticmethod
    def forward(ctx, student, teacher, kind, reduction, direction, temperature):
        from .base import reduce_accurate

        with np.errstate(all="ignore"):
            loss, gs, gt = pair_rows(kind, widen(student), widen(teacher), direction, temperature)
        ctx.save_for_backward(narrow(gs, student)[0], narrow(gt, student)[0])
        ctx.reduction = reduction
        hi, lo = narrow(loss, student)
        return reduce_accurate(hi, reduction, student.dtype, lo)

    @staticmethod
    def backward(ctx, grad_output):
        from .base import scale_grad

        gs, gt = ctx.saved_tensors
        n = gs.shape[0]
        out = [scale_grad(g, grad_output, ctx.reduction, n).to(grad_output.dtype) for g in (gs, gt)]
        return out[0], out[1], None, None, None, None


def stable_pair(kind, student, teacher, reduction, direction="forward", temperature=1.0):
    return _StablePair.apply(student, teacher, kind, reduction, direction, float(temperature))


def pair_loss(name: str, implementations: dict[str, Impl], kind: str) -> Loss:
    """The `Loss` of a divergence of a student's and a teacher's logits (kl_div, js_div): their
    packed inputs, value sets and reference (`pair_reference(kind)`) are this module's."""
    info = LOSS_INFO[name]  # summary, formulas, options: catalog.py
    return Loss(
        name=name,
        summary=info.summary,
        multiclass=True,
        input_kind="logit_pairs",
        implementations=implementations,
        reference_chunk=None,  # type: ignore[arg-type]  # the whole reference is `reference_fn`
        formulas=info.formulas,
        options=info.options,
        inputs=PAIR_INPUTS,
        unpack=unpack,
        adapt=adapt,
        make_point=make_point,
        reference_fn=pair_reference(kind),
        input_elements=input_elements,
    )
