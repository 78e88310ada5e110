"""Cross entropy's float64 reference in double-double (`losscheck.doubledouble`): the
formulation of `cross_entropy._reference_tensors` (same options, same limits at ±inf logits),
carried to ~2**-100 so that its float64 rounding is correct without x86 `long double`.

Values are "scaled dds" (hi, lo, k) = (hi + lo)·2**k where they may be subnormal (a
probability exp(x_j − m)/(1 + s), a loss log1p(s) ≈ s of a confident row), so that
`doubledouble.round_scaled` rounds them correctly; k is 0 elsewhere.
"""

from __future__ import annotations

import math

import torch

from .. import doubledouble as D

# Below 2**-600, log1p(s) = s·(1 − s/2 + …) is s to 2**-600: carried scaled (s may be subnormal).
_TINY_EXP = -600


def _zeros_k(t):
    return torch.zeros_like(t, dtype=torch.int64)


def _softmax(x, k, masked):
    """Per row: m = x_k, the exponentials e_j = exp(x_j − m) scaled (0 at k and at masked
    logits), s = Σ e_j scaled per row (S, ks), 1 + s and log1p(s) (scaled where s is tiny)."""
    m = x.gather(1, k[:, None])
    xs = x if masked is None else torch.where(masked, m, x)
    eh, el, ek = D.exp_scaled(D.two_sum(xs, -m))  # x − m exactly
    zero = torch.zeros_like(x, dtype=torch.bool).scatter_(1, k[:, None], True)
    if masked is not None:
        zero |= masked
    eh, el, ek = eh.masked_fill(zero, 0.0), el.masked_fill(zero, 0.0), ek.masked_fill(zero, 0)
    ks = torch.where(eh != 0, ek, -(1 << 40)).amax(1)
    ks = torch.where(ks == -(1 << 40), 0, ks)
    rel = ek - ks[:, None]
    big = D.row_sum((D.ldexp(eh, rel), D.ldexp(el, rel)))
    s = D.ldexp_dd(big, ks)
    total = D.add(D.dd(torch.ones_like(s[0])), s)
    l1p = D.where_scaled(ks < _TINY_EXP, (*big, ks), D.log1p(s))
    return m.squeeze(1), (eh, el, ek), big, ks, s, total, l1p


def _probabilities(e, total, k):
    """p_j = e_j·(1/(1 + s)), scaled as e_j, and p_k = 1/(1 + s) at each row's column k (whose
    e_k is 0): one division per row and a product per entry, ~2**-103 relative (a division per
    entry, three quotient digits, cost a third of the chunk's time)."""
    inverse = D.div(D.dd(torch.ones_like(total[0])), total)
    q = D.mul((e[0], e[1]), (inverse[0][:, None].expand_as(e[0]), inverse[1][:, None].expand_as(e[0])))
    return _set((q[0], q[1], e[2]), k, (*inverse, _zeros_k(total[0])))


def _set(a, idx, v):
    """a[rows, idx] = v for scaled dds (idx: one column per row)."""
    return tuple(u.scatter(1, idx[:, None], w[:, None]) for u, w in zip(a, v, strict=True))


def _finite(x, t, masked=None):
    """Hard targets: loss (m − x_t) + log1p(s) and the gradient p − onehot(t), as `_finite`
    of cross_entropy.py, with k the target where it attains the maximum."""
    m, am = x.max(1)
    rows = torch.arange(x.shape[0], device=x.device)
    xt = x[rows, t]
    k = torch.where(xt == m, t, am)
    m, e, big, ks, _, total, l1p = _softmax(x, k, masked)
    sh = _shift(x)
    gap = D.two_sum(D.ldexp(m, -sh), D.ldexp(-xt, -sh))
    off = (*D.add(gap, D.ldexp_dd(l1p[:2], l1p[2] - sh)), sh.expand_as(m))
    loss = D.where_scaled(t == k, l1p, off)
    loss = D.where_scaled(xt == -math.inf, D.exact_scaled(math.inf, m), loss)
    grad = _probabilities(e, total, k)
    et = D.ldexp_dd((e[0][rows, t], e[1][rows, t]), e[2][rows, t])
    rest_off = D.sub(total, et)
    q_off = D.div(D.neg(rest_off), total)
    q_on = D.div(D.neg(big), total)
    target = D.where_scaled(t == k, (*q_on, ks), q_off)
    return loss, _set(grad, t, target)


def _shift(x):
    """2 where the chunk holds logits beyond 2**1020 (x_j − m and the row sums may exceed
    float64's range while the mean does not): those are carried scaled by 2**-2; else 0."""
    big = bool(((x.abs() > 2.0**1020) & x.isfinite()).any())
    return torch.tensor(2 if big else 0, dtype=torch.int64, device=x.device)


def _special(x):
    pos, neg = x == math.inf, x == -math.inf
    npos = pos.sum(1)
    allneg = neg.all(1)
    return pos, neg, npos, allneg, (npos > 0) | allneg


def _hard(x, t):
    """`cross_entropy._limits` (or `_finite` where every logit is finite) in dd."""
    pos, neg, npos, allneg, special = _special(x)
    allneg &= x.shape[1] > 1
    xf = torch.where(special[:, None], 0.0, x)
    masked = neg & ~special[:, None]
    loss, grad = _finite(xf, t, masked if bool(masked.any()) else None)
    rows = torch.arange(x.shape[0], device=x.device)
    if bool(special.any()):
        target_pos = pos[rows, t]
        lim_loss = torch.where(target_pos, torch.where(npos == 1, 0.0, math.nan), math.inf).to(x.dtype)
        lim_grad = torch.where(pos, torch.where(npos == 1, 1.0, math.nan)[:, None], 0.0).to(x.dtype)
        lim_grad[rows, t] -= 1
        loss = D.where_scaled(npos > 0, (lim_loss, torch.zeros_like(lim_loss)), loss)
        grad = D.where_scaled((npos > 0)[:, None], (lim_grad, torch.zeros_like(lim_grad)), grad)
        loss = D.where_scaled(allneg, D.exact_scaled(math.nan, lim_loss), loss)
        grad = D.where_scaled(allneg[:, None], D.exact_scaled(math.nan, lim_grad), grad)
    return loss, grad


def _nll_and_probabilities(x):
    """−log p_j (dd) and p_j (scaled dd) with their limits at ±inf logits, as
    cross_entropy._nll_and_probabilities."""
    pos, neg, npos, allneg, special = _special(x)
    xf = torch.where(special[:, None], 0.0, x)
    masked = neg & ~special[:, None]
    unmasked = torch.where(masked, -math.inf, xf)
    k = unmasked.argmax(1)
    m, e, _, _, _, total, l1p = _softmax(xf, k, masked)
    p = _probabilities(e, total, k)
    xs = torch.where(masked, m[:, None], xf)
    sh = _shift(x)
    lse = D.ldexp_dd(l1p[:2], l1p[2] - sh)
    nll = D.add(
        D.two_sum(D.ldexp(m[:, None].expand_as(xs), -sh), D.ldexp(-xs, -sh)),
        (lse[0][:, None].expand_as(xs), lse[1][:, None].expand_as(xs)),
    )
    nll = (*nll, sh.expand_as(xs))
    at_k = tuple(v[:, None].expand_as(xs) for v in D.ldexp_dd(l1p[:2], l1p[2] - sh)) + (sh.expand_as(xs),)
    nll = D.where_scaled(torch.zeros_like(masked).scatter_(1, k[:, None], True), at_k, nll)
    nll = D.where_scaled(masked, D.exact_scaled(math.inf, xs), nll)
    one = (npos == 1)[:, None]
    several = torch.where(pos, math.nan, 0.0).to(x.dtype)
    lim_p = torch.where(one, pos.to(x.dtype), several)
    lim_nll = torch.where(pos, torch.where(one, 0.0, math.nan), math.inf).to(x.dtype)
    p = D.where_scaled(special[:, None], (lim_p, torch.zeros_like(lim_p)), p)
    nll = D.where_scaled(special[:, None], (lim_nll, torch.zeros_like(lim_nll)), nll)
    p = D.where_scaled(allneg[:, None], D.exact_scaled(math.nan, lim_p), p)
    nll = D.where_scaled(allneg[:, None], D.exact_scaled(math.nan, lim_p), nll)
    return nll, p


def _weighted(x, cw):
    """Σ_j c_j·(−log p_j) and (Σ_j c_j)·p − c for coefficients c (a dd (N, C)); terms with
    c_j = 0 left out; a row of zero coefficients removed (gradient 0), NaN rows undefined."""
    nll, p = _nll_and_probabilities(x)
    term = D.mul(cw, nll[:2])  # nll's scale is one for the whole chunk (`_shift`)
    zero = cw[0] == 0
    loss = D.row_sum((term[0].masked_fill(zero, 0.0), term[1].masked_fill(zero, 0.0)))
    total = D.row_sum(cw)
    tot = (total[0][:, None].expand_as(x), total[1][:, None].expand_as(x))
    wp = (*D.mul(tot, p[:2]), p[2])
    plain = D.sub(D.ldexp_dd(wp[:2], wp[2]), cw)
    grad = D.where_scaled(zero, wp, plain)
    removed = (total[0] == 0)[:, None] & ~x.isnan().any(1)[:, None]
    grad = D.where_scaled(removed, D.exact_scaled(0.0, x), grad)
    return (*loss, _shift(x).expand_as(loss[0])), grad


def _scale(a, c):
    """c·a for a scaled dd a and a dd constant c (the smoothing's 1 − ε and ε/C)."""
    hi, lo = D.mul(a[:2], (torch.full_like(a[0], c[0]), torch.full_like(a[0], c[1])))
    return hi, lo, a[2]


def _plain_add(a, b):
    return (*D.add(D.ldexp_dd(a[:2], a[2]), D.ldexp_dd(b[:2], b[2])), _zeros_k(a[0]))


def reference_dd(x, t, weight=None, label_smoothing: float = 0.0, ignore_index=None):
    """Loss and gradient (scaled dds) of the summed cross entropy, options as torch defines
    them (see `cross_entropy._reference_tensors`), for float64 x on any device."""
    classes = x.shape[1]
    eps = float(label_smoothing)
    one_minus = D.two_sum(
        torch.tensor(1.0, dtype=x.dtype, device=x.device), torch.tensor(-eps, dtype=x.dtype, device=x.device)
    )
    over_c = D.div(
        D.dd(torch.tensor(eps, dtype=x.dtype, device=x.device)),
        D.dd(torch.tensor(float(classes), dtype=x.dtype, device=x.device)),
    )
    one_minus = (float(one_minus[0]), float(one_minus[1]))
    over_c = (float(over_c[0]), float(over_c[1]))
    if t.is_floating_point():  # soft targets
        q = D.dd(t.to(x.dtype))
        if eps:
            q = D.add(
                D.mul(q, (torch.full_like(q[0], one_minus[0]), torch.full_like(q[0], one_minus[1]))),
                (torch.full_like(q[0], over_c[0]), torch.full_like(q[0], over_c[1])),
            )
        if weight is not None:
            q = D.mul_d(q, weight.to(x.dtype).expand_as(q[0]))
        return _weighted(x, q)
    ignored = None if ignore_index is None else t == ignore_index
    safe = t if ignored is None else torch.where(ignored, 0, t)
    loss, grad = _hard(x, safe)
    if weight is not None:
        wt = weight.to(x.dtype)[safe]
        nan_row = x.isnan().any(1)
        loss, grad = D.weigh_scaled(loss, wt, nan_row), D.weigh_scaled(grad, wt[:, None], nan_row[:, None])
    if eps:
        cw = torch.ones(classes, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
        s_loss, s_grad = _weighted(x, D.dd(cw.expand(x.shape).contiguous()))
        loss = _plain_add(_scale(loss, one_minus), _scale(s_loss, over_c))
        grad = _plain_add(_scale(grad, one_minus), _scale(s_grad, over_c))
    if ignored is not None:
        loss = D.where_scaled(ignored, D.exact_scaled(0.0, loss[0]), loss)
        grad = D.where_scaled(ignored[:, None], D.exact_scaled(0.0, grad[0]), grad)
    return loss, grad
