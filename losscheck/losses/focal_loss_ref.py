"""Focal loss in working precision: the formulas shared by the references and by `stable`
(focal_loss.py), written once for torch tensors and numpy long double arrays.

Every focal loss of hard targets is one scalar function of one number, the *margin*
z (how far the logits are on the wrong side):

    f(z)  = σ(z)^γ · softplus(z)
    f'(z) = σ(z)^γ · (γ·σ(−z)·softplus(z) + σ(z))

* binary (torchvision's sigmoid_focal_loss): z = x for y = 0, −x for y = 1; 1 − p_t = σ(z)
  and the cross entropy is softplus(z);
* multi-class: z = logsumexp_{j≠t}(x_j) − x_t, since 1 − p_t = r/(1 + r) = σ(z) and
  −log p_t = log1p(r) = softplus(z) with r = Σ_{j≠t} e^{x_j − x_t}; dz/dx_t = −1 and
  dz/dx_j = softmax over the non-targets (j ≠ t).

σ(z)^γ is a power of σ(z) evaluated as such, never of a rounded 1 − p: (1 − p)^(γ−1), which
the textbook derivative has, is +inf at p = 1 for γ < 1 and multiplies σ'(z) = 0 there
(the NaN of optax #1267, kornia #918, sam3 #576); here it cancelled analytically against
σ'(z) = σ(z)σ(−z) before anything is evaluated. γ = 0 gives the factor 1 exactly (also at
z = −inf, where 0·∞ would be NaN). Every sum is of terms of one sign: no cancellation.

Soft binary targets (y strictly between 0 and 1) have no margin; their loss is
α_t·m^γ·ce with m = y·σ(−x) + (1−y)·σ(x) > 0 and ce = y·softplus(−x) + (1−y)·softplus(x),
gradient α_t·m^γ·(γ·m'·ce/m + σ(x) − y), m' = (1−2y)·σ(x)σ(−x). σ(x) − y and the sum of
the two terms cancel near the gradient's zero: the references evaluate them in numpy long
double (x86: 64-bit significand), 11 bits beyond float64, which keeps float32 and the halves
within the contract; a float64 target's soft gradient within a few ULP of 0 is the one place
this reference is not certified to 1/64 ULP (docs/METRICS.md).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference as R


def _xp(a):
    return torch if isinstance(a, torch.Tensor) else np


def alpha_factor(y, alpha: float):
    """α_t = α·y + (1 − α)·(1 − y) (torchvision's; 1 when alpha < 0: no weighting)."""
    if alpha < 0:
        return None
    return alpha * y + (1 - alpha) * (1 - y)


def margin_terms(z, gamma: float, r=None):
    """f(z), f'(z) of the module's docstring, elementwise; exact limits at z = ±inf. `r`: e^z
    where z ≤ 0, when the caller has it more accurately than exp(z) (a sum of exponentials)."""
    xp = _xp(z)
    sp_pos, s_pos, s_neg = R.softplus(z), R.sigmoid(z), R.sigmoid(-z)
    if r is not None:
        # From r itself: exp(log r) would cost |z|·ε of relative accuracy (|z| ≈ 50: 6 bits).
        low = z <= 0
        sp_pos = xp.where(low, xp.log1p(r), sp_pos)
        s_pos, s_neg = xp.where(low, r / (1 + r), s_pos), xp.where(low, 1 / (1 + r), s_neg)
    # σ(z)^γ as a power of the accurate σ(z) (ε·γ relative), not exp(−γ·softplus(−z)), whose
    # error grows with γ·|z|; 0^0 = 1 (γ = 0 at z = −inf).
    factor = xp.ones_like(z) if gamma == 0 else s_pos**gamma
    # σ(−z)·softplus(z) → 0 as z → +inf (z·e^−z), not 0·∞.
    tail = xp.where(z == np.inf, 0.0, s_neg * sp_pos)
    return factor * sp_pos, factor * (gamma * tail + s_pos)


def binary_hard(x, y, gamma: float, alpha: float):
    """Loss and d loss/dx of hard 0/1 targets."""
    xp = _xp(x)
    positive = y > 0.5
    z = xp.where(positive, -x, x)
    f, fp = margin_terms(z, gamma)
    g = xp.where(positive, -fp, fp)
    a = alpha_factor(y, alpha)
    return (f, g) if a is None else (a * f, a * g)


def binary_soft(x, y, gamma: float, alpha: float):
    """Loss and d loss/dx of soft targets 0 < y < 1 (the general form above)."""
    xp = _xp(x)
    s_pos, s_neg = R.sigmoid(x), R.sigmoid(-x)
    ce = y * R.softplus(-x) + (1 - y) * R.softplus(x)
    m = y * s_neg + (1 - y) * s_pos
    factor = xp.ones_like(x) if gamma == 0 else xp.exp(gamma * xp.log(m))
    # m'·ce → 0 at x = ±inf (σσ' decays like e^−|x|, ce grows like |x|).
    dm_ce = xp.where(xp.isinf(x), 0.0, (1 - 2 * y) * s_pos * s_neg * ce)
    loss = factor * ce
    grad = factor * (gamma * dm_ce / m + ((1 - y) * s_pos - y * s_neg))
    a = alpha_factor(y, alpha)
    return (loss, grad) if a is None else (a * loss, a * grad)


def binary(x, y, gamma: float = 2.0, alpha: float = -1.0):
    """Binary focal loss and gradient, hard and soft targets mixed (soft ones: module docstring)."""
    xp = _xp(x)
    if xp is np:
        y = y.astype(x.dtype)  # float64 targets with long double logits: every product in long double
    loss, grad = binary_hard(x, y, gamma, alpha)
    soft = (y != 0) & (y != 1)
    if bool(soft.any()):
        ls, gs = binary_soft(x[soft], y[soft], gamma, alpha)
        loss, grad = (xp.where(soft, 0.0, loss), xp.where(soft, 0.0, grad))
        loss[soft], grad[soft] = ls, gs
    return loss, grad


def _rows_index(x, n):
    return torch.arange(n, device=x.device) if isinstance(x, torch.Tensor) else np.arange(n)


def _exp_diff(a, b):
    """e^(a − b); in long double with a − b's rounding error restored (two_diff): a float64
    x_j − m can need 65 bits (700 − 0.1), and exp turns its error into 700·ε relative."""
    if isinstance(a, torch.Tensor):
        return torch.exp(a - b)
    with np.errstate(invalid="ignore"):
        d, e = R.two_diff(a, b)
        return np.exp(d) * (1 + np.where(np.isfinite(e), e, 0.0))


def _row_max(a):
    return a.max(1).values if isinstance(a, torch.Tensor) else a.max(1)


def multiclass(x, t, gamma: float = 2.0, alpha: float = -1.0):
    """Softmax focal loss −α·(1 − p_t)^γ·log p_t of rows `x` (R, C), class indices `t`, and its
    gradient, through the margin z = logsumexp_{j≠t} x_j − x_t."""
    xp = _xp(x)
    n = x.shape[0]
    rows = _rows_index(x, n)
    t = t.to(torch.int64) if isinstance(t, torch.Tensor) else t.astype(np.int64)
    xt = x[rows, t]
    others = x.copy() if xp is np else x.clone()
    others[rows, t] = -np.inf
    m = _row_max(others)
    finite = xp.isfinite(m)
    shift = xp.where(finite, m, 0.0)
    e = _exp_diff(others, shift[:, None])
    s = e.sum(1)
    # (m − x_t) first: the difference of two input values, exact or nearly so.
    z = xp.where(finite, (shift - xt) + xp.log(xp.where(finite, s, 1.0)), m - xt)
    # e^z = Σ_{j≠t} e^{x_j − x_t} directly where z ≤ 0 (x_t is the maximum there: no overflow).
    f, fp = margin_terms(z, gamma, _exp_diff(others, xt[:, None]).sum(1))
    # Softmax over the non-targets: e/s; one +inf logit among them takes it all (several: how
    # they share depends on the path to the limit, NaN); none but −inf: 0.
    top = others == np.inf
    count = top.sum(1)[:, None]
    limit = xp.where(top & (count > 1), np.nan, top / xp.where(count > 0, count, 1))
    share = xp.where(finite[:, None], e / xp.where(s > 0, s, 1.0)[:, None], limit)
    # Beside a +inf logit a finite one's softmax is 0 on every path, whatever z (NaN with a +inf target).
    grad = xp.where((m == np.inf)[:, None] & ~top, 0.0, fp[:, None] * share)
    grad[rows, t] = -fp
    if alpha >= 0:
        f, grad = alpha * f, alpha * grad
    return f, grad


def long_double(a):
    return R.to_work(a, np.longdouble) if a.is_floating_point() else a.detach().cpu().numpy()


def _binary_tensors(x, y, gamma: float = 2.0, alpha: float = -1.0):
    loss, grad = binary_hard(x, y, gamma, alpha)
    soft = (y != 0) & (y != 1)
    if bool(soft.any()):
        # The soft elements in long double on the host (module docstring), back in float64.
        ls, gs = binary_soft(long_double(x[soft]), long_double(y[soft]), gamma, alpha)
        loss, grad = loss.clone(), grad.clone()
        loss[soft] = torch.from_numpy(ls.astype(np.float64)).to(x.device)
        grad[soft] = torch.from_numpy(gs.astype(np.float64)).to(x.device)
    return loss, grad


binary_reference = R.chunk_function(_binary_tensors, binary)
multiclass_reference = R.chunk_function(multiclass, multiclass)
