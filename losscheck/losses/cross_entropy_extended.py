"""Cross entropy's float64 reference in numpy x86 long double (the *extended* path: the fast
one on an x86 CPU; `reference.path`): the formulation of `cross_entropy._reference_tensors`,
operation for operation, with x − m carried exactly (`two_diff`). `cross_entropy_dd` is the
same in double-double on any device."""

from __future__ import annotations

import numpy as np

from .. import reference as R


def _reference_extended(
    x: np.ndarray, t: np.ndarray, weight=None, label_smoothing: float = 0.0, ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and gradient of the summed loss; at ±inf logits, their limits (see `_limits`).

    Options as torch defines them: the row of a hard target t is w_t·(−log p_t), with label
    smoothing ε (1 − ε)·w_t·(−log p_t) + (ε/C)·Σ_j w_j·(−log p_j); an ignored row is 0;
    soft targets q (rows of probabilities, smoothed to (1 − ε)q + ε/C) give
    Σ_j w_j·q_j·(−log p_j). The gradient of Σ_j c_j·(−log p_j) is (Σ_j c_j)·p − c.
    """
    w = x.dtype.type
    classes = x.shape[1]
    if t.ndim == 2:  # soft targets
        q = t.astype(x.dtype)
        if label_smoothing:
            q = (w(1) - w(label_smoothing)) * q + w(label_smoothing) / w(classes)
        return _weighted_extended(x, q if weight is None else q * weight)
    ignored = None if ignore_index is None else t == ignore_index
    safe = t if ignored is None else np.where(ignored, 0, t)
    finite = np.isfinite(x)
    loss, grad = _finite_extended(x, safe) if finite.all() else _limits_extended(x, safe, finite)
    if weight is not None:
        # A zero class weight removes the row: 0 and gradient 0 even at an infinite loss
        # (a −inf target logit) or one without a limit (several +inf logits), as for the
        # binary losses; a row with a NaN logit stays undefined.
        wt = np.asarray(weight, dtype=x.dtype)[safe]
        nan_row = np.isnan(x).any(axis=1)
        loss, grad = R.weigh(loss, wt, nan_row), R.weigh(grad, wt[:, None], nan_row[:, None])
    if label_smoothing:
        eps = w(label_smoothing)
        cw = np.ones(classes, dtype=x.dtype) if weight is None else np.asarray(weight, dtype=x.dtype)
        s_loss, s_grad = _weighted_extended(x, np.broadcast_to(cw, x.shape))
        loss = (w(1) - eps) * loss + eps / w(classes) * s_loss
        grad = (w(1) - eps) * grad + eps / w(classes) * s_grad
    if ignored is not None:
        loss = np.where(ignored, w(0), loss)
        grad = np.where(ignored[:, None], w(0), grad)
    return loss, grad


def _denominators_extended(t: np.ndarray, weight=None, label_smoothing: float = 0.0, ignore_index: int | None = None):
    """Each row's share of the mean's denominator (torch): w_t, or 1, for a kept hard
    target, 0 for an ignored one; 1 for soft targets."""
    if t.ndim == 2:
        return np.ones(t.shape[0])
    keep = np.ones(t.shape[0]) if ignore_index is None else (t != ignore_index).astype(np.float64)
    if weight is None:
        return keep
    safe = t if ignore_index is None else np.where(t == ignore_index, 0, t)
    return keep * np.asarray(weight)[safe]


def _weighted_extended(x, cw):
    """Σ_j c_j·(−log p_j) and its gradient (Σ_j c_j)·p − c, with the limits at ±inf logits:
    −log p_j is +inf for a logit of probability 0 (a −inf logit, or any finite one beside a
    +inf), 0 for a unique +inf logit, undefined (NaN) where the split is undefined. Terms
    with c_j = 0 are left out (0·inf)."""
    nll, p = _nll_extended(x)
    w = x.dtype.type
    loss = np.where(cw > 0, cw * nll, w(0)).sum(axis=1)
    total = cw.sum(axis=1)[:, None]
    # Every coefficient 0 (a zero-weighted soft row): removed, gradient 0 even where p has
    # no limit (several +inf logits); a NaN logit stays undefined.
    grad = R.weigh(total * p - cw, (total != 0).astype(x.dtype), np.isnan(x).any(axis=1)[:, None])
    return loss, grad


def _nll_extended(x):
    """−log p_j and p_j = softmax(x)_j in working precision (x − m carried exactly, as in
    `_finite_extended`), with their limits where logits are ±inf."""
    w = x.dtype.type
    rows = np.arange(x.shape[0])
    pos, neg = x == np.inf, x == -np.inf
    npos = pos.sum(axis=1)
    allneg = neg.all(axis=1)
    special = (npos > 0) | allneg  # rows whose maximum is not finite
    xf = np.where(special[:, None], w(0), x)
    masked = neg & ~special[:, None]
    unmasked = np.where(masked, -np.inf, xf)
    m, k = unmasked.max(axis=1), unmasked.argmax(axis=1)  # k: never a masked logit
    xs = np.where(masked, m[:, None], xf)
    if x.dtype == np.float64:
        e = np.exp(xs - m[:, None])
    else:
        d, err = R.two_diff(xs, m[:, None])
        e = np.exp(d) * (w(1) + err)
    e[masked] = 0
    e[rows, k] = 0
    s = e.sum(axis=1)
    lse = np.log1p(s)
    e[rows, k] = 1
    p = e / (w(1) + s)[:, None]
    gap = m[:, None] - xs
    gap[rows, k] = 0
    nll = np.where(masked, w(np.inf), gap + lse[:, None])
    # +inf rows: a unique +inf takes all the probability; several share it in an undefined
    # way (NaN for them), but the finite logits beside them have probability 0 either way
    # (−log p = +inf), as in `_limits_extended` and `_Stable`. Every logit −inf: undefined.
    one = (npos == 1)[:, None]
    several = np.where(pos, w(np.nan), w(0))
    p = np.where(special[:, None], np.where(one, pos.astype(x.dtype), several), p)
    nll = np.where(special[:, None], np.where(pos, np.where(one, w(0), w(np.nan)), w(np.inf)), nll)
    p = np.where(allneg[:, None], w(np.nan), p)
    nll = np.where(allneg[:, None], w(np.nan), nll)
    return nll, p


def _finite_extended(x, t, masked=None):
    # The formulation of `_Stable`, in working precision. In long double (float64
    # targets) x − m is carried as an unevaluated sum (two_diff) so that exp(x − m) keeps
    # full working precision even when the subtraction rounds (x and m of very different
    # magnitudes).
    # `masked`: −inf logits of rows with a finite maximum, probability 0. They are
    # replaced by the row's maximum before the subtraction (inf − inf would be NaN in
    # two_diff) and their exponential set to 0 after it.
    rows = np.arange(x.shape[0])
    one = x.dtype.type(1)
    m = x.max(axis=1)
    xt = x[rows, t]
    k = np.where(xt == m, t, x.argmax(axis=1))
    xs = x if masked is None else np.where(masked, m[:, None], x)
    if x.dtype == np.float64:
        # float64 work means a float32 or half target: the rounding of x − m costs at
        # most |x − m|·2**-53 relative in exp, far below 1/64 ULP of the target (the
        # terms that matter have |x − m| < 745), so the correction is not needed.
        e = np.exp(xs - m[:, None])
    else:
        d, err = R.two_diff(xs, m[:, None])
        e = np.exp(d) * (one + err)
    if masked is not None:
        e[masked] = 0
    e[rows, k] = 0
    s = e.sum(axis=1)
    total = one + s
    loss = (m - xt) + np.log1p(s)  # a −inf target: +inf
    grad = e / total[:, None]
    grad[rows, k] = one / total
    rest = np.where(t == k, s, total - e[rows, t])  # a −inf target: e_t = 0, gradient −1
    grad[rows, t] = -rest / total
    return loss, grad


def _limits_extended(x, t, finite):
    """`_limits` in numpy long double (float64 targets): the same limits, line for line."""
    rows = np.arange(x.shape[0])
    w = x.dtype.type
    pos = x == np.inf
    neg = x == -np.inf
    npos = pos.sum(axis=1)
    allneg = neg.all(axis=1)
    special = (npos > 0) | allneg  # rows whose maximum is not finite
    allneg &= x.shape[1] > 1  # a single −inf logit: loss 0 from the zeros below
    # Rows with a finite maximum: the finite formulation with −inf logits masked out.
    # The other rows are computed on zeros (no inf − inf) and replaced below.
    xf = np.where(special[:, None], w(0), x)
    masked = neg & ~special[:, None]
    loss, grad = _finite_extended(xf, t, masked)
    # +inf rows
    target_pos = pos[rows, t]
    lim_loss = np.where(target_pos, np.where(npos == 1, w(0), w(np.nan)), w(np.inf))
    lim_grad = np.where(pos, np.where(npos == 1, w(1), w(np.nan))[:, None], w(0))
    lim_grad[rows, t] -= 1  # NaN − 1 is NaN (no warning): a +inf target among several
    loss = np.where(npos > 0, lim_loss, loss)
    grad = np.where((npos > 0)[:, None], lim_grad, grad)
    # all −inf rows
    loss = np.where(allneg, w(np.nan), loss)
    grad = np.where(allneg[:, None], w(np.nan), grad)
    return loss, grad
