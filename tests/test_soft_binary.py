"""Soft binary targets y ∈ [0, 1] and pos_weight (one value, per class, zero, negative) for bce,
bce_with_logits and sigmoid_bce: the references certified against mpmath at 60 digits in every
precision path (float64 tensors, x86 long double, double-double), the limits at ±inf logits
and p ∈ {0, 1} worked out case by case (pytorch#135359), the stable implementations against
them, and bench and probe accepting them (issue 15, items 1 and 3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from test_reference import DTYPES, MP, Checker, needs_longdouble, round_exact

import losscheck
from losscheck import config as C, reference as R, sweep
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, reference
from losscheck.probing import ProbeError

# ---- the exact losses --------------------------------------------------------------------------

def exact_logits(x: float, y: float, pw: float = 1.0):
    """ℓ = pw·y·log(1 + e^−x) + (1 − y)·log(1 + e^x), ∂ℓ/∂x = (1 − y)·σ(x) − pw·y·σ(−x);
    at ±inf the limits, a zero coefficient removing its term."""
    a, b = MP.mpf(pw) * MP.mpf(y), 1 - MP.mpf(y)
    if math.isinf(x):
        # x → −inf: softplus(−x) → +inf, σ(−x) → 1; x → +inf: the mirror image.
        big, small = (a, b) if x < 0 else (b, a)
        loss = 0 if big == 0 else big * MP.inf
        grad = -a if x < 0 else b
        return loss, grad
    X = MP.mpf(x)
    sp = lambda z: z + MP.log1p(MP.exp(-z)) if z > 0 else MP.log1p(MP.exp(z))  # noqa: E731
    sig = lambda z: 1 / (1 + MP.exp(-z))  # noqa: E731
    return a * sp(-X) + b * sp(X), b * sig(X) - a * sig(-X)


def exact_probabilities(p: float, y: float, pw: float = 1.0):
    """ℓ = −[pw·y·log p + (1 − y)·log(1 − p)], ∂ℓ/∂p = (1 − y)/(1 − p) − pw·y/p; at p = 0 and 1
    the limits, a zero coefficient removing its term."""
    a, b = MP.mpf(pw) * MP.mpf(y), 1 - MP.mpf(y)
    P = MP.mpf(p)
    pos = 0 if a == 0 else (a * MP.inf if p == 0 else -a * MP.log(P))
    neg = 0 if b == 0 else (b * MP.inf if p == 1 else -b * MP.log1p(-P))
    gpos = 0 if a == 0 else (-a * MP.inf if p == 0 else -a / P)
    gneg = 0 if b == 0 else (b * MP.inf if p == 1 else b / (1 - P))
    return pos + neg, gpos + gneg


EXACT = {"bce": exact_probabilities, "bce_with_logits": exact_logits, "sigmoid_bce": exact_logits}


def certify(loss_name: str, inp: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None,
            weight: torch.Tensor | None = None) -> Checker:
    """The raw reference (working precision) within 1/64 ULP of the target dtype, the rounded
    one (elements, gradient of the mean, mean) correctly rounded: as test_reference.certify."""
    loss = LOSSES[loss_name]
    name = {f.torch_dtype: n for n, f in FORMATS.items()}[inp.dtype]
    chk = Checker(name)
    opts = {k: v for k, v in (("pos_weight", pos_weight), ("weight", weight)) if v is not None}
    ref = reference(loss, inp, target, opts)
    n = inp.shape[0]
    xs, ys = inp.double().tolist(), target.double().tolist()
    pws = [1.0] * n if pos_weight is None else (
        pos_weight.double().tolist() * n if pos_weight.numel() == 1 else pos_weight.double().tolist())
    ws = [1.0] * n if weight is None else weight.double().tolist()
    total = 0
    for i in range(n):
        lv, gv = EXACT[loss_name](xs[i], ys[i], pws[i])
        w = MP.mpf(ws[i])
        lv, gv = (0, 0) if w == 0 else (w * lv, w * gv)
        total += lv
        chk.rounded_(float(ref.loss[i]), lv, f"loss[{i}] x={xs[i]} y={ys[i]} pw={pws[i]}")
        chk.rounded_(float(ref.grad[i]), gv / n, f"grad/N[{i}] x={xs[i]} y={ys[i]} pw={pws[i]}")
    chk.rounded_(float(ref.mean), total / n, "mean")
    work = R.work_dtype(inp.dtype)
    if work is np.float64:  # the raw float64 values of the tensors path, against 1/64 ULP
        lw, gw = loss.reference_chunk(inp.double(), target.double(),
                                      **{k: v.double() for k, v in opts.items() if k != "pos_weight"},
                                      **({"pos_weight": R.round_to(torch.tensor(pws), torch.float64)}
                                         if pos_weight is not None else {}))
        for i in range(n):
            lv, gv = EXACT[loss_name](xs[i], ys[i], pws[i])
            w = MP.mpf(ws[i])
            if w != 0:
                chk.raw(float(lw[i]), w * lv, f"raw loss[{i}]")
                chk.raw(float(gw[i]), w * gv, f"raw grad[{i}]")
    chk.done()
    return chk


N = 48


def _soft(loss_name: str, name: str, scale: float, seed: int = 0):
    rng = np.random.default_rng([seed, int(scale), len(name), len(loss_name)])
    dt = FORMATS[name].torch_dtype
    y = torch.from_numpy(rng.uniform(0, 1, N)).to(dt)
    y[:4] = torch.tensor([0.0, 1.0, 0.5, 0.9]).to(dt)
    x = rng.standard_normal(N) * scale
    if LOSSES[loss_name].input_kind == "probabilities":
        inp = LOSSES[loss_name].make_input(x, dt)
    else:
        # σ(x) near y: the gradient (1 − y)σ(x) − yσ(−x) cancels there.
        x[4:12] = np.log(y[4:12].double().numpy() / (1 - y[4:12].double().numpy())) + rng.normal(0, 1e-3, 8)
        inp = torch.from_numpy(x).to(dt)
    return inp, y


BINARY = ["bce", "bce_with_logits", "sigmoid_bce"]


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("loss_name", BINARY)
@pytest.mark.parametrize("pw", [None, 0.0, -2.0, 3.5])
def test_soft_reference_matches_mpmath(loss_name, scale, name, pw):
    inp, y = _soft(loss_name, name, scale)
    dt = inp.dtype
    pos_weight = None if pw is None else R.round_to(torch.tensor([pw]), dt)
    chk = certify(loss_name, inp, y, pos_weight)
    assert chk.rounded > 2 * N
    assert chk.ties <= max(3, chk.rounded // 8)


@needs_longdouble
@pytest.mark.parametrize("loss_name", ["bce", "bce_with_logits"])
def test_soft_reference_double_double_path_matches_mpmath(loss_name, monkeypatch):
    # float64 on the dd path (the one of accelerators and non-x86 hosts), forced on this CPU.
    monkeypatch.setattr(R, "FLOAT64_PATH", "dd")
    assert R.path(torch.float64, "cpu") == "dd"
    inp, y = _soft(loss_name, "float64", 30.0)
    certify(loss_name, inp, y, R.round_to(torch.tensor([3.5]), torch.float64), torch.rand(N, dtype=torch.float64))


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("loss_name", BINARY)
def test_per_element_pos_weight_and_weight(loss_name, name):
    inp, y = _soft(loss_name, name, 5.0, seed=3)
    dt = inp.dtype
    pw = R.round_to(torch.linspace(-3, 3, N, dtype=torch.float64), dt)  # a zero one among them
    w = R.round_to(torch.linspace(0, 2, N, dtype=torch.float64), dt)  # a zero weight
    certify(loss_name, inp, y, pw, w)


# ---- the limits, case by case (pytorch#135359) -------------------------------------------------

# (x, y) → (loss, dL/dx) from logits: at x = −inf the positive term y·softplus(−x) is +inf unless
# y = 0, and the gradient is −y; at +inf the negative term (1 − y)·softplus(x), gradient 1 − y.
LOGIT_LIMITS = [
    (-math.inf, 0.0, 0.0, -0.0), (-math.inf, 0.1, math.inf, -0.1), (-math.inf, 0.5, math.inf, -0.5),
    (-math.inf, 0.9, math.inf, -0.9), (-math.inf, 1.0, math.inf, -1.0),
    (math.inf, 0.0, math.inf, 1.0), (math.inf, 0.1, math.inf, 0.9), (math.inf, 0.5, math.inf, 0.5),
    (math.inf, 0.9, math.inf, 0.1), (math.inf, 1.0, 0.0, 0.0),
]
# (p, y) → (loss, dL/dp): p = 0 makes −y·log p +inf unless y = 0 (gradient −y/p = −inf); p = 1
# makes −(1 − y)·log(1 − p) +inf unless y = 1 (gradient +inf).
PROBABILITY_LIMITS = [
    (0.0, 0.0, 0.0, 1.0), (0.0, 0.5, math.inf, -math.inf), (0.0, 0.9, math.inf, -math.inf),
    (0.0, 1.0, math.inf, -math.inf), (1.0, 0.0, math.inf, math.inf), (1.0, 0.5, math.inf, math.inf),
    (1.0, 1.0, 0.0, -1.0),
]


def _close(got: float, want: float, name: str) -> bool:
    if math.isinf(want) or want == 0:
        return got == want
    return got == round_exact(MP.mpf(want), name).nearest


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("loss_name,table", [("bce_with_logits", LOGIT_LIMITS), ("sigmoid_bce", LOGIT_LIMITS),
                                             ("bce", PROBABILITY_LIMITS)])
def test_limits_at_the_ends(loss_name, table, name):
    dt = FORMATS[name].torch_dtype
    loss = LOSSES[loss_name]
    x = torch.tensor([r[0] for r in table], dtype=torch.float64).to(dt)
    y = torch.tensor([r[1] for r in table], dtype=torch.float64).to(dt)
    ref = reference(loss, x, y, reduction="sum")
    for i, (xi, yi, want_loss, want_grad) in enumerate(table):
        # y as rounded to the dtype (0.1, 0.9): the limits are those of the rounded target.
        yr = float(y[i])
        wg = want_grad if want_grad in (0.0, 1.0, -1.0) or math.isinf(want_grad) else (
            -yr if xi < 0 else 1 - yr)
        assert float(ref.loss[i]) == want_loss, (xi, yi, float(ref.loss[i]))
        assert _close(float(ref.grad[i]), wg, name), (xi, yi, float(ref.grad[i]), wg)
    # stable gives every limit, loss and gradient (torch's NaN at x = −inf, y = 0.9: below).
    xx = x.clone().requires_grad_(True)
    out = loss.implementations["stable"].fn(xx, y, "none")
    out.sum().backward()
    assert torch.equal(out.detach(), ref.loss), (out, ref.loss)
    assert torch.equal(xx.grad, ref.grad), (xx.grad, ref.grad)


def test_torch_nan_at_minus_inf_soft_target_is_recorded():
    # pytorch#135359: x = −inf, y = 0.9 gives NaN where the true loss is +inf.
    r = losscheck.probe("bce_with_logits", [-math.inf, 1.0], [0.9, 0.0], dtype="float32")
    assert math.isinf(r.ref.loss[0]) and r.ref.loss[0] > 0
    by = {rec["impl"]: rec for rec in r.records}
    assert by["torch"]["forward"]["nan"] == 1
    assert by["stable"]["forward"]["nan"] == 0 and by["stable"]["forward"]["max_ulp"] == 0
    assert r.target["kind"] == "soft"


def test_bce_at_zero_with_soft_target_is_infinite_and_torch_clamps():
    # BCE p = 0, y = 0.5: true +inf; torch clamps log at −100 and returns 50.
    r = losscheck.probe("bce", [0.0, 0.5], [0.5, 0.5], dtype="float32", reduction="none")
    assert float(r.ref.loss[0]) == math.inf
    torch_rec = next(rec for rec in r.records if rec["impl"] == "torch")
    assert torch_rec["forward"]["clamped"] == 1
    assert float(F.binary_cross_entropy(torch.tensor([0.0]), torch.tensor([0.5]))) == 50.0


# ---- stable against the reference --------------------------------------------------------------

@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("loss_name", BINARY)
@pytest.mark.parametrize("pw", [None, 0.0, -2.0, 3.5])
def test_stable_soft_is_within_a_few_ulp(loss_name, name, pw):
    inp, y = _soft(loss_name, name, 10.0, seed=7)
    opts = {} if pw is None else {"pos_weight": R.round_to(torch.tensor([pw]), inp.dtype)}
    case = sweep.Case(0, loss_name, "cpu", name, N, None, "normal", 10.0)
    cfg = C.Config.from_mapping({"name": "t", "losses": [loss_name], "scales": [1], "batch_sizes": [N],
                                 "dtypes": [name], "distributions": ["normal"], "timing": False}, "<t>")
    data = sweep.PointData(inp, y, opts)
    ref = reference(LOSSES[loss_name], inp, y, opts)
    rec = sweep.evaluate(cfg, case, LOSSES[loss_name], LOSSES[loss_name].implementations["stable"], data, ref)
    assert rec["status"] == "ok", rec["message"]
    assert rec["forward"]["max_ulp"] <= 2 and rec["forward"]["reduced_ulp"] <= 2
    assert rec["backward"]["max_ulp"] <= 4, rec["backward"]


@pytest.mark.parametrize("name,width", [pytest.param("float64", 64, marks=needs_longdouble), ("float32", 32)])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_soft_logits_reference_random(name, width, data):
    n = data.draw(st.integers(1, 6), label="n")
    fl = st.floats(width=width, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    x = data.draw(st.lists(st.one_of(fl, st.sampled_from([math.inf, -math.inf])), min_size=n, max_size=n))
    # Subnormal targets and pos_weights included: pos_weight·y is formed from their significands
    # (found here: y = 2.2e-309 times pos_weight 0.289 lost the product's error term as a plain dd).
    y = data.draw(st.lists(st.floats(0, 1, width=width), min_size=n, max_size=n))
    pw = data.draw(st.floats(-8, 8, width=width), label="pos_weight")
    dt = FORMATS[name].torch_dtype
    certify("bce_with_logits", torch.tensor(x, dtype=torch.float64).to(dt), torch.tensor(y, dtype=torch.float64).to(dt),
            torch.tensor([pw], dtype=torch.float64).to(dt))


@pytest.mark.parametrize("name,width", [pytest.param("float64", 64, marks=needs_longdouble), ("float32", 32)])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_soft_probabilities_reference_random(name, width, data):
    n = data.draw(st.integers(1, 6), label="n")
    p = data.draw(st.lists(st.floats(0, 1, width=width), min_size=n, max_size=n))
    y = data.draw(st.lists(st.floats(0, 1, width=width), min_size=n, max_size=n))
    dt = FORMATS[name].torch_dtype
    certify("bce", torch.tensor(p, dtype=torch.float64).to(dt), torch.tensor(y, dtype=torch.float64).to(dt))


# ---- bench and probe ---------------------------------------------------------------------------

def test_bench_soft_targets_and_signed_pos_weights():
    cfg = C.Config.from_mapping({
        "name": "soft", "losses": ["bce", "bce_with_logits", "sigmoid_bce"], "scales": [1, 30],
        "batch_sizes": [16], "dtypes": ["float32"], "distributions": ["normal", "nonfinite"],
        "targets": ["hard", "soft"], "pos_weights": [1, 0, -2], "timing": False}, "<t>")
    records = sweep.run(cfg, threads=1)
    soft = [r for r in records if r["options"].get("targets") == "soft"]
    assert soft and all(r["status"] == "ok" for r in soft if r["impl"] == "stable")
    # Soft targets are drawn as 0.9·y + 0.1·U(0, 1): in [0, 1], mostly neither 0 nor 1.
    data = sweep.point_data(LOSSES["bce"], sweep.Case(0, "bce", "cpu", "float32", 16, None, "normal", 1.0,
                                                      options=(("targets", "soft"),)), 0)
    assert bool(((data.target > 0) & (data.target < 1)).all())
    for r in soft:
        if r["impl"] == "stable":
            assert r["forward"]["max_ulp"] <= 2 and r["backward"]["max_ulp"] <= 4, r
    # torch's bce-with-logits NaN at x = −inf with a soft target is counted against the limit.
    nan_limit = [r for r in soft if r["impl"] == "torch" and r["loss"] == "bce_with_logits"
                 and r["distribution"] == "nonfinite" and r["forward"]["nan"]]
    assert nan_limit


def test_config_takes_zero_and_negative_pos_weights_but_not_nan():
    cfg = C.Config.from_mapping({"name": "t", "losses": ["bce"], "scales": [1], "batch_sizes": [4],
                                 "dtypes": ["float32"], "distributions": ["normal"],
                                 "pos_weights": [-1, 0, 2]}, "<t>")
    assert cfg.pos_weights == (-1.0, 0.0, 2.0)
    with pytest.raises(losscheck.ConfigError, match="pos_weights"):
        C.Config.from_mapping({"name": "t", "losses": ["bce"], "scales": [1], "batch_sizes": [4],
                               "dtypes": ["float32"], "distributions": ["normal"], "pos_weights": [".nan"]}, "<t>")


def test_probe_multilabel_per_class_pos_weight_matches_torch_broadcasting():
    # (N, C) multi-label logits with one pos_weight per class, as torch broadcasts it.
    x = [[0.5, -2.0, 3.0], [-1.0, 4.0, 0.25]]
    y = [[1.0, 0.0, 0.3], [0.0, 1.0, 0.7]]
    pw = [2.0, 0.0, -1.5]
    r = losscheck.probe("bce_with_logits", x, y, dtype="float64", pos_weight=str(pw), reduction="none")
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    want = F.binary_cross_entropy_with_logits(t64(x), t64(y), pos_weight=t64(pw), reduction="none")
    exact = [exact_logits(x[i][j], y[i][j], pw[j])[0] for i in range(2) for j in range(3)]
    for k, v in enumerate(exact):
        assert float(r.ref.loss[k]) == round_exact(v, "float64").nearest
        assert abs(float(r.ref.loss[k]) - float(want.reshape(-1)[k])) <= 1e-12 * max(1.0, abs(float(v)))
    assert r.options["pos_weight"] == [2.0, 0.0, -1.5] or r.options["pos_weight"] == (2.0, 0.0, -1.5)


def test_probe_refuses_targets_outside_zero_one_and_bad_pos_weight_shape():
    with pytest.raises(ProbeError, match=r"targets in \[0, 1\]"):
        losscheck.probe("bce_with_logits", [1.0, 2.0], [1.0, 1.5])
    with pytest.raises(ProbeError, match="one per class"):
        losscheck.probe("bce_with_logits", [[1.0, 2.0]], [[1.0, 0.5]], pos_weight="[1, 2, 3]")
