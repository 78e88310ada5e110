"""Out-of-domain inputs as a value set (issue 15, item 5): probabilities just above 1 or below 0 and
NaN inputs are measured, not refused; the reference is marked `out_of_domain` (not `undefined`),
each implementation's record says whether it raised, returned NaN or returned a number, and those
elements count in no accuracy figure, breakdown or finding (METRICS.md, "Out-of-domain inputs").
pytorch#51866 (p = 1.0000001 gave NaN on CUDA) by its CPU-expressible part."""
from __future__ import annotations

import math

import pytest
import torch

import losscheck
from losscheck import analysis, inputs, report, results, sweep
from losscheck import config as C
from losscheck.findings import findings
from losscheck.losses import LOSSES, reference
from test_reference import MP, round_exact


def _run(losses, dtypes=("float32",), scales=(1,), reduction="mean"):
    cfg = C.Config.from_mapping({
        "name": "ood", "losses": list(losses), "scales": list(scales), "batch_sizes": [8], "classes": [3],
        "dtypes": list(dtypes), "distributions": ["normal", "out_of_domain"], "reductions": [reduction],
        "timing": False}, "<t>")
    return sweep.run(cfg, threads=1)


def test_value_set_inputs():
    x = torch.full((8,), 0.5, dtype=torch.float32)
    p = inputs.out_of_domain(x, "probabilities", False)
    assert p[0].item() == 1 + 2.0**-23  # p = 1.0000001 (pytorch#51866)
    assert p[1].item() == -(2.0**-24) and math.isnan(p[2].item()) and p[3].item() == 0.5
    assert p[4].item() == p[0].item()
    assert torch.equal(x, torch.full((8,), 0.5))  # a copy: the shared input is untouched
    logits = inputs.out_of_domain(torch.zeros(8, 3, dtype=torch.float16), "logits", True)
    assert logits.isnan().sum() == 2 and math.isnan(logits[2, 0].item()) and math.isnan(logits[6, 0].item())
    assert inputs.outside_domain(p, "probabilities").tolist() == [True, True, True, False] * 2


def test_reference_is_marked_out_of_domain_not_undefined():
    loss = LOSSES["bce"]
    p = torch.tensor([1 + 2.0**-23, -(2.0**-24), math.nan, 0.25])
    ref = reference(loss, p, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert ref.undefined is None and "outside the domain" in ref.out_of_domain
    assert ref.outside.tolist() == [True, True, True, False]
    assert ref.loss[:3].isnan().all()
    # The in-domain element is still exact: −log(0.25).
    assert float(ref.loss[3]) == round_exact(-MP.log(MP.mpf(0.25)), "float32").nearest
    assert reference(loss, torch.tensor([0.5]), torch.tensor([1.0])).out_of_domain is None


def test_outcomes_per_implementation_bench():
    recs = _run(["bce", "bce_with_logits", "sigmoid_bce", "cross_entropy"])
    ood = {(r["loss"], r["impl"]): r for r in recs if r["distribution"] == "out_of_domain"}
    assert all("out_of_domain" in r for r in ood.values())
    assert not any("out_of_domain" in r for r in recs if r["distribution"] == "normal")
    # torch's binary_cross_entropy refuses probabilities outside [0, 1] on the CPU (on CUDA,
    # pytorch#51866: NaN): raised, and the sweep goes on.
    for name in ("bce", "sigmoid_bce"):
        t = ood[(name, "torch")]
        if name == "bce":
            assert t["status"] == "error" and t["out_of_domain"]["outcome"] == "raised"
    # sigmoid_bce's torch only sees σ(NaN) = NaN, which torch's BCE refuses too.
    assert ood[("sigmoid_bce", "torch")]["out_of_domain"]["outcome"] == "raised"
    # naive BCE: log(1 − p) of p = 1 + ulp is NaN but log(p) at y = 1 is a number, and its
    # gradient −1/p a number: silent.
    assert ood[("bce", "naive")]["out_of_domain"]["outcome"] == "number"
    for name in ("bce_with_logits", "cross_entropy"):
        for impl in ("naive", "stable", "torch"):
            r = ood[(name, impl)]
            assert r["status"] == "ok" and r["out_of_domain"]["outcome"] == "nan", (name, impl, r["out_of_domain"])
            assert r["out_of_domain"]["reduced_nan"] is True
    for r in ood.values():
        assert r["out_of_domain"]["elements"] == 2 if r["loss"] != "bce" else r["out_of_domain"]["elements"] == 6
        if r["status"] == "ok":
            # Scored: the in-domain elements only, exact for stable; no reduced value.
            assert r["forward"]["n"] == 8 - r["out_of_domain"]["elements"]
            assert r["forward"]["reduced_ulp"] is None
            assert r["forward"]["nan"] == 0 or r["impl"] != "stable"


def test_not_counted_as_breakdowns_or_findings():
    recs = _run(["bce", "bce_with_logits"], scales=(1,))
    ood = [r for r in recs if r["distribution"] == "out_of_domain"]
    assert ood
    # Without the value set excluded, the error records and NaN would break every implementation.
    bd = analysis.breakdown_scales(recs)
    normal_only = analysis.breakdown_scales([r for r in recs if r["distribution"] == "normal"])
    assert bd == normal_only
    assert findings(recs) == findings([r for r in recs if r["distribution"] == "normal"])


def test_results_file_round_trip_and_report(tmp_path):
    cfg = C.Config.from_mapping({"name": "ood", "losses": ["bce", "cross_entropy"], "scales": [1], "batch_sizes": [8],
                                 "classes": [3], "dtypes": ["float32"], "distributions": ["normal", "out_of_domain"],
                                 "timing": False}, "<t>")
    recs = sweep.run(cfg, threads=1)
    path = tmp_path / "ood.json"
    results.save(results.make_results(cfg.as_dict(), {}, recs, "test"), path)
    loaded = results.load(path)  # validates every record (the field and the null reduced_ulp)
    assert [r.get("out_of_domain") for r in loaded["records"]] == [r.get("out_of_domain") for r in recs]
    md = report.render(loaded)
    assert "## Out-of-domain inputs" in md and "raised 1" in md
    # Raising there is an outcome, not an error of the audit.
    assert "should be between 0 and 1" not in md


def test_results_validation_of_the_field():
    rec = next(r for r in _run(["bce"]) if r["distribution"] == "out_of_domain" and r["status"] == "ok")
    assert results._record_problem(rec) is None
    bad = {**rec, "out_of_domain": {"outcome": "vanished"}}
    assert "out_of_domain" in (results._record_problem(bad) or "")
    # A null reduced_ulp is allowed there only.
    plain = {k: v for k, v in rec.items() if k != "out_of_domain"}
    assert "reduced_ulp" in (results._record_problem(plain) or "")


def test_probe_accepts_probabilities_outside_zero_one_pytorch_51866():
    # p = 1.0000001 in float32 (the next value above 1), y = 1: measured, not refused.
    r = losscheck.probe("bce", [1.0000001, 0.5], [1, 1], dtype="float32")
    assert r.ref.out_of_domain and r.ref.outside.tolist() == [True, False]
    by = {rec["impl"]: rec for rec in r.records}
    assert by["torch"]["out_of_domain"]["outcome"] == "raised"
    # stable: −xlogy(1, p) = −log(1.0000001) ≈ −1.19e-7, a number (silent); naive likewise.
    assert by["stable"]["out_of_domain"]["outcome"] == "number"
    assert by["stable"]["forward"]["n"] == 1 and by["stable"]["forward"]["max_ulp"] == 0
    text = r.render()
    assert "outside [0, 1]" in text and "torch raised an error" in text


def test_probe_nan_logits_are_out_of_domain():
    r = losscheck.probe("cross_entropy", [[math.nan, 0.0], [1.0, 2.0]], [0, 1], dtype="float32")
    assert r.ref.outside.tolist() == [True, False]
    for rec in r.records:
        assert rec["out_of_domain"]["outcome"] == "nan"
        assert rec["forward"]["n"] == 1
