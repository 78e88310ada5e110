"""sigmoid_bce: binary_cross_entropy(x.sigmoid(), y) audited on the logits (issue 15, item 1), with the
threads' numbers reproduced by losscheck — probe and bench alike — against values from mpmath
(pytorch#103316, keras#9664, Flux.jl#914, OneFlow#7476), and the report's line that sets the chain
beside the with-logits form per dtype."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

import losscheck
from losscheck import config as C
from losscheck import report_findings as RF
from losscheck import sweep
from losscheck.analysis import labelled
from losscheck.findings import findings
from losscheck.losses import LOSSES
from test_reference import round_exact

MP = mpmath.MPContext()
MP.dps = 60


def exact(x: float, y: float):
    """softplus(x) − x·y and σ(x) − y, at 60 digits."""
    X = MP.mpf(x)
    sp = X + MP.log1p(MP.exp(-X)) if X > 0 else MP.log1p(MP.exp(X))
    return sp - X * y, 1 / (1 + MP.exp(-X)) - y


def _grad(impl: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    LOSSES["sigmoid_bce"].implementations[impl].fn(xx, y).backward()
    return xx.grad


def test_registered_next_to_bce_with_logits_with_its_reference():
    names = list(LOSSES)
    assert names.index("sigmoid_bce") == names.index("bce_with_logits") + 1
    loss = LOSSES["sigmoid_bce"]
    assert loss.input_kind == "logits" and not loss.multiclass
    assert loss.reference_chunk is LOSSES["bce_with_logits"].reference_chunk  # the same exact loss


def test_pytorch_103316_gradient_at_minus_50_probe():
    # F.binary_cross_entropy(x.sigmoid(), 1), mean over 8: dL/dx[0] = −2.41e-11, true −0.125.
    xs = [-50.0, -10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0]
    r = losscheck.probe("sigmoid_bce", xs, [1] * 8, dtype="float32")
    want = round_exact(exact(-50.0, 1.0)[1] / 8, "float32").nearest
    assert float(r.ref.grad[0]) == want and abs(want + 0.125) < 1e-20
    x = r.data.inp
    g = _grad("torch", x, r.data.target)
    assert float(g[0]) == pytest.approx(-2.41e-11, rel=1e-3)
    assert float(_grad("stable", x, r.data.target)[0]) == want
    by = {rec["impl"]: rec for rec in r.records}
    assert by["torch"]["backward"]["max_bits"] == 24  # all bits lost at x = −50
    assert by["stable"]["backward"]["max_ulp"] == 0


@pytest.mark.parametrize("dtype,x", [("float32", 17.0), ("float16", 9.0)])
def test_saturated_sigmoid_probe(dtype, x):
    # float32 x = 17, y = 0: loss 100 and gradient 0 (true 17.00000004, 0.99999996); float16
    # x = 9, y = 0: a NaN gradient. σ(x) rounds to 1 in the dtype, torch clamps log(0) at −100.
    r = losscheck.probe("sigmoid_bce", [x], [0], dtype=dtype)
    loss, grad = exact(x, 0.0)
    assert float(r.ref.loss[0]) == round_exact(loss, dtype).nearest
    assert float(r.ref.grad[0]) == round_exact(grad, dtype).nearest
    by = {rec["impl"]: rec for rec in r.records}
    t = by["torch"]
    if dtype == "float32":
        assert math.isclose(float(MP.nstr(loss, 12)), 17.00000004, rel_tol=1e-9)
        assert math.isclose(float(grad), 0.99999996, rel_tol=1e-8)
        assert t["forward"]["value"] == 100.0 and t["forward"]["saturated"] == 1
        assert t["backward"]["underflow"] == 1  # gradient exactly 0
    else:
        assert t["backward"]["nan"] == 1
    assert by["stable"]["forward"]["max_ulp"] == 0 and by["stable"]["backward"]["max_ulp"] == 0


def _bench(scales, dtypes, losses=("bce_with_logits", "sigmoid_bce")):
    cfg = C.Config.from_mapping({
        "name": "chain", "losses": list(losses), "scales": list(scales), "batch_sizes": [16],
        "dtypes": list(dtypes), "distributions": ["extreme"], "timing": False}, "<t>")
    return sweep.run(cfg, threads=1)


def test_the_threads_in_bench():
    # The `extreme` value set has every (±scale, y) combination: x = 17, y = 0 in float32; x = 9,
    # y = 0 in float16; x = −50, y = 1 in float32.
    points = _bench([9, 17, 50], ["float32", "float16"])
    recs = {(r["loss"], r["impl"], r["dtype"], r["scale"]): r for r in points}
    t32 = recs[("sigmoid_bce", "torch", "float32", 17.0)]
    assert t32["forward"]["saturated"] >= 1 and t32["backward"]["underflow"] >= 1
    assert recs[("sigmoid_bce", "torch", "float16", 9.0)]["backward"]["nan"] >= 1
    assert recs[("sigmoid_bce", "torch", "float32", 50.0)]["backward"]["max_bits"] == 24
    for key, r in recs.items():
        if key[1] == "stable":  # the with-logits form, under both names
            assert r["forward"]["max_ulp"] <= 1 and r["backward"]["max_ulp"] <= 1, key
        if key[0] == "bce_with_logits" and key[1] == "torch":  # (it loses bits at ±9, no NaN)
            assert r["backward"]["nan"] == 0 and r["forward"]["nan"] == 0, key


def test_report_sets_the_chain_beside_the_with_logits_form():
    recs = _bench([1, 17], ["float32"])
    lines = RF.chain_findings(labelled(recs), findings(recs))
    assert len(lines) == 1
    line = lines[0]
    assert "float32" in line
    chain, with_logits = line.split("binary_cross_entropy_with_logits")
    assert "breaks from scale 17" in chain and "underflow" in chain
    assert "never breaks" in with_logits


def test_report_line_absent_without_both():
    recs = _bench([1], ["float32"], losses=("sigmoid_bce",))
    assert RF.chain_findings(labelled(recs), findings(recs)) == []
