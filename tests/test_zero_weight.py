"""A zero weight removes its element in every loss (METRICS.md, "Options and special cases"):
contribution 0 and gradient 0 even where the unweighted loss is infinite or has no limit —
the limit w → 0 is taken first — in the reference and in `stable` alike (issue 12, item 5).

Oracles: mpmath (test_options' transcriptions of torch's definitions). At a limit point
(p = 0 or 1 exactly, x = ±inf) the weighted loss w·ℓ is evaluated on finite inputs that
approach it (10**±4, 10**±40, 10**±400 away), at 450 digits: with w = 0 every term of the
sequence is 0, so the limit is 0; with w > 0 the sequence tends to the reference's value
(+inf or a finite limit).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from losscheck import reference as R
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, reference
from losscheck.losses import cross_entropy as ce_module
from losscheck.metrics import ErrorStats, ulp_distance
from test_options import MP, WORKS, Bounds, _rounded, ce_coefficients, exact_binary, exact_weighted_row
from test_reference import needs_longdouble

INF, NAN = math.inf, math.nan
DTYPES = [pytest.param("float64", marks=needs_longdouble), "float32", "float16", "bfloat16"]
DEEP = mpmath.MPContext()
DEEP.dps = 450  # 1 − 10**-400 must not round to 1


def _tdtype(name):
    return FORMATS[name].torch_dtype


def _approach(kind: str, v: float):
    """Finite inputs tending to the limit point `v` (as mpf at 1100 digits)."""
    ks = (4, 40, 400)
    if kind == "bce_with_logits":
        return [DEEP.mpf(10) ** k * (1 if v > 0 else -1) for k in ks]
    eps = [DEEP.mpf(10) ** -k for k in ks]
    return eps if v == 0 else [1 - e for e in eps]


def _deep_binary(kind: str, v, y: float, f):
    """f·ℓ and f·dℓ/dx at a finite input v (mpf), f = w·(pos_weight if y = 1 else 1)."""
    if kind == "bce_with_logits":
        s = 1 / (1 + DEEP.exp(-v))
        loss = DEEP.log1p(DEEP.exp(-v)) if y > 0.5 else DEEP.log1p(DEEP.exp(v))
        return f * loss, f * (s - y)
    if y > 0.5:
        return -f * DEEP.log(v), -f / v
    return -f * DEEP.log1p(-v), f / (1 - v)


def limit_oracle(kind: str, v: float, y: float, f: float):
    """(loss, grad) at the limit point v for the factor f, from the approaching sequence:
    exactly 0 if every term is 0; ±inf if the terms grow without bound (tenfold and more
    from one term to the next: a loss −log p grows like k at p = 10**-k); 0 if they vanish
    (below 10**-200: −log1p(−p) at p = 10**-400); else the last term (the others converge
    at least like 10**-k)."""
    terms = [_deep_binary(kind, u, y, DEEP.mpf(f)) for u in _approach(kind, v)]
    out = []
    for i in range(2):
        seq = [t[i] for t in terms]
        if all(s == 0 for s in seq):
            out.append(MP.mpf(0))
        elif abs(seq[-1]) > 100 and abs(seq[-1]) >= 9 * abs(seq[-2]):
            out.append(MP.inf if seq[-1] > 0 else -MP.inf)
        elif abs(seq[-1]) < DEEP.mpf(10) ** -200:
            out.append(MP.mpf(0))
        else:
            out.append(MP.mpf(seq[-1]))
    return out


def _binary_case(kind: str, name: str):
    """Limit points and saturated inputs with both labels, each with weight 0 and weight 2."""
    if kind == "bce_with_logits":
        xs = [-INF, INF, -30.0, 30.0, 0.5]
    else:
        xs = [0.0, 1.0, float(R.sigmoid(np.array([-30.0]))[0]), 0.3]
    x, y, w = [], [], []
    for v in xs:
        for label in (0.0, 1.0):
            for weight in (0.0, 2.0):
                x.append(v), y.append(label), w.append(weight)
    return np.array(x), np.array(y), np.array(w)


def _is_limit(kind, v):
    return math.isinf(v) if kind == "bce_with_logits" else v in (0.0, 1.0)


@pytest.mark.parametrize("kind", ["bce", "bce_with_logits"])
@pytest.mark.parametrize("name,work,rel", WORKS)
@pytest.mark.parametrize("pos_weight", [None, 3.0, 1000.0])
def test_binary_zero_weight_reference_matches_mpmath(kind, name, work, rel, pos_weight):
    x, y, w = _binary_case(kind, name)
    x = _rounded(x, name, work)
    opts = {"weight": w.astype(work)}
    if pos_weight is not None:
        opts["pos_weight"] = np.array([pos_weight], dtype=work)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lw, gw = LOSSES[kind].reference_chunk(x, y.astype(work), **opts)
    chk = Bounds(rel, work)
    zeros = 0
    for i in range(x.size):
        f = w[i] * (pos_weight if (pos_weight is not None and y[i] > 0.5) else 1.0)
        what = f"x={x[i]!r} y={y[i]} w={w[i]}"
        if _is_limit(kind, float(x[i])):
            lv, gv = limit_oracle(kind, float(x[i]), y[i], f)
        else:
            lv, gv = exact_binary(kind, x[i], float(y[i]), w[i], 1.0 if pos_weight is None else pos_weight)
        if f == 0:
            assert lv == 0 and gv == 0  # the oracle's own answer, not assumed
            zeros += 1
            # exactly 0, never NaN: bitwise (−0 is 0 too)
            assert lw[i] == 0 and gw[i] == 0, (what, lw[i], gw[i])
        chk.value(lw[i], lv, f"loss {what}")
        chk.value(gw[i], gv, f"grad {what}")
    chk.done()
    assert zeros == x.size // 2
    # With w > 0 the limit points keep their +inf (the rule changes only w = 0): checked by
    # chk.value against the oracle's inf; make sure there were some.
    assert np.isinf(lw[w > 0]).any()


@pytest.mark.parametrize("kind", ["bce", "bce_with_logits"])
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("pos_weight", [None, 1000.0])
def test_stable_binary_matches_the_reference_with_zero_weights(kind, name, pos_weight):
    x, y, w = _binary_case(kind, name)
    loss = LOSSES[kind]
    dt = _tdtype(name)
    inp = R.round_to(x, dt)
    tgt, wt = torch.tensor(y).to(dt), torch.tensor(w).to(dt)
    opts = {"weight": wt}
    if pos_weight is not None:
        opts["pos_weight"] = torch.tensor([pos_weight]).to(dt)
    fn = loss.implementations["stable"].fn
    for reduction in ("none", "mean", "sum"):
        ref = reference(loss, inp, tgt, opts, reduction)
        xg = inp.clone().requires_grad_(True)
        out = fn(xg, tgt, reduction, **opts)
        out.backward(torch.ones_like(out) if reduction == "none" else None)
        zero = w == 0
        if reduction == "none":
            assert (out.detach()[zero] == 0).all()
            assert not out.detach().isnan().any()
            # (float64 stable rounds w·ℓ twice: 1 ULP happens on the kept elements)
            assert float(ulp_distance(out.detach(), ref.loss).max()) <= 1
        else:
            # Every kept element with w > 0 at a limit point is +inf: the reduced value is +inf
            # (no NaN from the removed ones) for bce; finite otherwise.
            assert float(ulp_distance(out.detach().reshape(1), ref.reduced.reshape(1))[0]) <= 1
            assert not math.isnan(float(out.detach()))
        assert (xg.grad[zero] == 0).all(), xg.grad
        assert not ref.grad.isnan().any() and not ref.loss.isnan().any()
        assert float(ulp_distance(xg.grad, ref.grad).max()) <= 1


def test_probe_examples_of_issue_12_through_the_reference_and_metrics():
    # bce, float32, p = [1.0, 0.3], y = [0, 1], w = [0, 1]: the first element is removed, the
    # mean is −log(0.3f)/2 (mpmath), and torch's (correct) answer is 0 ULP from it.
    loss = LOSSES["bce"]
    p = torch.tensor([1.0, 0.3], dtype=torch.float32)
    y = torch.tensor([0.0, 1.0], dtype=torch.float32)
    w = torch.tensor([0.0, 1.0], dtype=torch.float32)
    ref = reference(loss, p, y, {"weight": w}, "mean")
    exact = -MP.log(MP.mpf(float(p[1]))) / 2
    assert float(ref.reduced) == float(np.float32(float(exact)))
    assert abs(ref.value - float(exact)) <= 2.0**-52 * float(exact)
    assert str(np.float32(ref.reduced)).startswith("0.6019864")
    torch_mean = loss.implementations["torch"].fn(p, y, "mean", weight=w)
    assert float(ulp_distance(torch_mean.reshape(1), ref.reduced.reshape(1))[0]) == 0

    # bce_with_logits, x = [−inf, 1.0], y = [1, 0], w = [0, 1]: reference softplus(1)/2
    # (0.6566308), torch NaN (counted), stable exact.
    loss = LOSSES["bce_with_logits"]
    x = torch.tensor([-INF, 1.0], dtype=torch.float32)
    y = torch.tensor([1.0, 0.0], dtype=torch.float32)
    ref = reference(loss, x, y, {"weight": w}, "mean")
    exact = MP.log1p(MP.e) / 2
    assert float(ref.reduced) == float(np.float32(float(exact)))
    assert str(np.float32(ref.reduced)).startswith("0.6566308")
    for impl, bad in (("torch", True), ("stable", False)):
        fn = loss.implementations[impl].fn
        s = ErrorStats(12.0)
        s.add(fn(x, y, "none", weight=w), ref.loss)
        s.set_reduced(fn(x, y, "mean", weight=w), ref.reduced)
        d = s.as_dict()
        if bad:
            assert d["nan"] == 1 and d["reduced_ulp"] == INF and math.isnan(d["value"])
        else:
            assert d["nan"] == 0 and d["reduced_ulp"] == 0 and d["max_ulp"] == 0

    # bce, float32, p = 1.0, y = 0: torch returns 100.0 against +inf: clamped, 24 bits.
    loss = LOSSES["bce"]
    p, y = torch.tensor([1.0]), torch.tensor([0.0])
    ref = reference(loss, p, y, {}, "mean")
    s = ErrorStats(12.0)
    s.add(loss.implementations["torch"].fn(p, y, "none"), ref.loss)
    s.set_reduced(loss.implementations["torch"].fn(p, y, "mean"), ref.reduced)
    d = s.as_dict()
    assert d["value"] == 100.0 and d["reference"] == INF
    assert d["clamped"] == 1 and d["max_bits"] == 24 and d["reduced_ulp"] == INF


# ---- cross entropy: the same rule, and the two families agree -------------------------------------

def _ce_rows(name, work):
    """Rows whose target class has weight 0: a −inf target logit (loss +inf), a +inf logit
    elsewhere (+inf), several +inf logits with the target among them (no limit), and a
    finite row; then the same with a class of weight 1.5 as target (unaffected)."""
    x = np.array([[0.5, -INF, 1.0], [INF, 0.0, 2.0], [INF, INF, 0.0], [0.25, -1.0, 3.0],
                  [1.0, -INF, 0.5], [0.0, 1.0, -2.0]])
    t = np.array([1, 1, 1, 1, 0, 2])
    w = np.array([1.5, 0.0, 2.0])  # class 1 weighs 0
    return _rounded(x, name, work), t, _rounded(w, name, work)


@pytest.mark.parametrize("name,work,rel", WORKS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_zero_class_weight_removes_the_row_in_the_reference(name, work, rel, eps):
    x, t, w = _ce_rows(name, work)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lw, gw = ce_module.reference_chunk(x, t, weight=w, label_smoothing=eps)
    chk = Bounds(rel, work)
    for i in range(x.shape[0]):
        row = x[i].tolist()
        if eps == 0 and w[t[i]] == 0:
            # w_t·ℓ with w_t = 0: 0 at every finite row near this one, so 0 in the limit.
            assert lw[i] == 0 and (gw[i] == 0).all(), (row, lw[i], gw[i])
            continue
        if sum(v == INF for v in row) > 1:
            # The smoothing term ε/C·Σ_j w_j·(−log p_j) has w_j > 0 on a +inf logit of several:
            # no limit, NaN (the rule removes only what a zero weight multiplies).
            assert math.isnan(lw[i])
            continue
        coeff = ce_coefficients(3, int(t[i]), w, eps)
        loss, grad, mag = exact_weighted_row(row, coeff)
        chk.value(lw[i], loss, f"loss row {i}")
        for j in range(3):
            chk.value(gw[i, j], grad[j], f"grad row {i} [{j}]", magnitude=mag[j] if grad[j] != 0 else None)
    chk.done()
    # Before the rule, rows 0-2 were NaN (+inf·0) without smoothing, and row 0 with it (a −inf
    # target logit of coefficient (1 − ε)·0 + ε/C·0 = 0: a finite loss).
    assert np.isfinite(lw[0])


@pytest.mark.parametrize("name,work,rel", WORKS)
def test_soft_targets_zero_coefficient_rows_are_removed(name, work, rel):
    x = _rounded(np.array([[INF, INF, 0.0], [-INF, 0.0, 1.0], [0.5, 0.0, 1.0]]), name, work)
    q = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=work)
    w = np.array([0.0, 0.0, 1.0], dtype=work)  # row 0, 1 and 2: every c_j = w_j·q_j is 0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lw, gw = ce_module.reference_chunk(x, q, weight=w)
    assert lw.tolist() == [0.0, 0.0, 0.0]
    assert (gw == 0).all(), gw


@pytest.mark.parametrize("loss_name", ["cross_entropy", "sequence_cross_entropy"])
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"ignore_index": -100}])
def test_stable_cross_entropy_matches_the_reference_with_zero_class_weights(loss_name, name, options):
    x, t, w = _ce_rows(name, np.float64)
    dt = _tdtype(name)
    inp, tgt = torch.from_numpy(x).to(dt), torch.from_numpy(t)
    if "ignore_index" in options:
        tgt = tgt.clone()
        tgt[5] = -100
    loss = LOSSES[loss_name]
    if loss.sequence:
        inp, tgt = inp.reshape(2, 3, 3), tgt.reshape(2, 3)
    opts = {"weight": torch.from_numpy(w).to(dt), **options}
    fn = loss.implementations["stable"].fn
    for reduction in ("none", "sum"):
        ref = reference(loss, inp, tgt, opts, reduction)
        xg = inp.clone().requires_grad_(True)
        out = fn(xg, tgt, reduction, **opts)
        out.backward(torch.ones_like(out) if reduction == "none" else None)
        if reduction == "none":
            assert torch.equal(out.detach().isnan(), ref.loss.isnan())
            assert float(ulp_distance(out.detach(), ref.loss).max()) <= 1
        assert torch.equal(xg.grad.isnan(), ref.grad.isnan())
        # Known limitation (README, xfail in test_options): float64 stable forms the smoothed
        # gradient W·p_j − c_j in float64; entries that cancel lose up to ~11 bits.
        bound = 2**11 if name == "float64" and "label_smoothing" in options else 2
        assert float(ulp_distance(xg.grad, ref.grad).max()) <= bound
        if "label_smoothing" not in options:
            removed = (torch.from_numpy(w)[torch.from_numpy(t)] == 0)
            assert (xg.grad.reshape(-1, 3)[removed] == 0).all()
            if reduction == "none":
                assert (out.detach().reshape(-1)[removed] == 0).all()
        elif reduction == "none":
            # The −inf target of weight 0 leaves only the smoothing terms on finite logits.
            assert math.isfinite(float(out.detach().reshape(-1)[0]))


@pytest.mark.parametrize("name", DTYPES)
def test_binary_and_multiclass_families_agree_on_zero_weights(name):
    # bce_with_logits(x, y) is cross entropy over the logits [0, x] with target y; a zero
    # weight (per element there, per class here) removes the element in both, at ±inf too.
    dt = _tdtype(name)
    x = torch.tensor([-INF, INF, -INF, INF, 2.0], dtype=torch.float64).to(dt)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    wb = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    binary = reference(LOSSES["bce_with_logits"], x, y.to(dt), {"weight": wb.to(dt)}, "none")
    rows = torch.stack([torch.zeros_like(x), x], 1)
    t = y.long()
    multi_loss, multi_grad = [], []
    for i in range(5):
        # the element's weight as the weight of its target class
        wc = torch.ones(2, dtype=dt)
        wc[t[i]] = wb[i]
        r = reference(LOSSES["cross_entropy"], rows[i:i + 1], t[i:i + 1], {"weight": wc}, "none")
        multi_loss.append(r.loss[0])
        multi_grad.append(r.grad[0, 1])  # d/dx of the second logit is the binary gradient
    assert binary.loss.tolist() == torch.stack(multi_loss).tolist()
    assert binary.grad.tolist() == torch.stack(multi_grad).tolist()
    assert binary.loss.tolist()[:2] == [0.0, 0.0] and binary.grad.tolist()[:2] == [0.0, 0.0]
