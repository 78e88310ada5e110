"""findings.py: each kind on synthetic records (with the confusions issue 12 names), then on
real small sweeps: a float16 mean over 70000 rows, the all-ignored batch, the missing-bracket
BCE of examples/, and ±inf logits."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from losscheck import config as C, environment, findings, results, sweep
from losscheck.findings import KINDS, findings as find
from losscheck.metrics import ErrorStats

ROOT = Path(__file__).parent.parent


# ---- synthetic records -------------------------------------------------------------------

def section(n=64, **kw) -> dict:
    s = {"n": n, "max_ulp": 0, "max_bits": 0.0, "mean_bits": 0.0, "reduced_ulp": None, "value": None,
         "reference": None, "nan": 0, "inf": 0, "posinf": 0, "neginf": 0, "saturated": 0, "clamped": 0,
         "underflow": 0}
    s.update(kw)
    return s


def rec(impl="torch", kind="framework", dtype="float32", scale=1.0, dist="normal", batch=64, reduction="mean",
        fwd=None, bwd=None, loss="bce_with_logits", options=None, **extra) -> dict:
    threshold = {"float64": 26.5, "float32": 12.0, "float16": 5.5, "bfloat16": 4.0}[dtype]
    r = {"loss": loss, "impl": impl, "kind": kind, "dtype": dtype, "device": "cpu", "batch": batch, "classes": None,
         "scale": scale, "distribution": dist, "reduction": reduction, "options": options or {}, "time": None,
         "status": "ok", "message": "", "threshold_bits": threshold,
         "forward": section(reduced_ulp=None if reduction == "none" else 0, value=0.5, reference=0.5),
         "backward": section(), "timing": None}
    r["forward"].update(fwd or {})
    r["backward"].update(bwd or {})
    r.update(extra)
    return r


def kinds(records, **kw) -> set[tuple[str, str]]:
    return {(f["impl"], f["kind"]) for f in find(records, **kw)}


def only(records, kind):
    [f] = [f for f in find(records) if f["kind"] == kind]
    return f


def test_exact_records_have_no_finding():
    assert find([rec(scale=s, dist=d) for s in (1, 100) for d in ("normal", "extreme", "nonfinite")]) == []


def test_a_wrong_formula_is_named_and_pre_empts_what_it_causes():
    # Wrong elementwise at every well-conditioned point from scale 1 (the missing bracket), and
    # as a consequence non-finite at 1000: one `formula` finding, not also "overflow".
    off = {"max_ulp": 2 ** 23, "max_bits": 23.0, "saturated": 30}
    recs = [rec("mine", "custom", scale=s, dist=d, fwd=off) for s in (1, 100) for d in ("normal", "uniform")]
    recs.append(rec("mine", "custom", scale=1000, fwd={"inf": 3, "max_ulp": math.inf}))
    recs.append(rec("mine", "custom", dist="nonfinite", fwd={"nan": 2, "max_ulp": math.inf}))
    recs.append(rec("mine", "custom", options={"ignored": 1.0}, undefined="every target is ignored",
                    fwd={"value": math.nan, "reduced_ulp": math.inf}))
    fs = find(recs)
    assert [f["kind"] for f in fs] == ["formula", "limit", "undefined"]  # limit, undefined: other inputs
    f = fs[0]
    assert (f["impl"], f["impl_kind"], f["variant"]) == ("mine", "custom", "")
    ev = f["evidence"]
    assert ev["smallest_scale"] == 1.0 and ev["every_scale"] is True
    assert ev["scales"] == [1.0, 100.0, 1000.0] and ev["points"] == 5 and ev["elements"] == 123
    assert ev["distributions"] == ["normal", "uniform"]
    assert fs[2]["variant"] == "ignored=1"
    # every_scale says whether it is wrong at every swept well-conditioned scale.
    assert find(recs[:4] + [rec("mine", "custom", scale=1000)])[0]["evidence"]["every_scale"] is False
    assert ev["worst_bits"] == 24.0  # the inf at scale 1000: all of float32's bits, never more
    assert "a formula error" in f["message"] and "\n" not in f["message"]


def test_formula_needs_every_well_conditioned_point_at_small_scales():
    # An instability reaching the tail of a large sample at scale 1 (torch's float16
    # BCE-with-logits over 2^18 normal draws) while the smaller batch is right: not a formula.
    tail = {"max_ulp": 234, "max_bits": 7.9, "saturated": 3}
    recs = [rec(dtype="float16", batch=4096), rec(dtype="float16", batch=262144, fwd=tail)]
    assert kinds(recs) == {("torch", "saturation")}
    # The same error at every point: a formula error, also for a framework implementation.
    assert kinds([rec(dtype="float16", batch=b, fwd=tail) for b in (4096, 262144)]) == {("torch", "formula")}
    # Off only above scale 1: an instability. A sweep starting at 30: nothing says formula.
    assert kinds([rec(), rec(scale=30, fwd=tail)]) == {("torch", "saturation")}
    assert kinds([rec(scale=30, fwd=tail), rec(scale=100, fwd=tail)]) == {("torch", "saturation")}
    # Every scale <= 1 must be wrong, not only the smallest.
    assert kinds([rec(scale=0.5, fwd=tail), rec(scale=1.0), rec(scale=100, fwd=tail)]) == {("torch", "saturation")}
    # Other value sets do not count: wrong at scale 1 only on `extreme` is not a formula error.
    assert kinds([rec(), rec(dist="extreme", fwd=tail)]) == {("torch", "saturation")}


def test_a_temperature_makes_the_scale_effective_so_no_formula_at_scale_one():
    # Soup #719: js_div at temperature 0.05 breaks from the smallest swept scale 1, which is
    # scale 20 to softmax(x / T). An instability at effective scale 20, not a formula error.
    nan = {"nan": 4, "max_ulp": math.inf}
    t = {"temperature": 0.05}
    recs = [rec(loss="js_div", scale=s, options=t, bwd=nan) for s in (1.0, 20.0)]
    recs += [rec(loss="js_div", scale=s) for s in (1.0, 20.0)]  # temperature 1: exact
    [f] = find(recs)
    assert (f["kind"], f["variant"]) == ("overflow", "temperature=0.05")
    ev = f["evidence"]
    assert ev["scales"] == [20.0, 400.0] and ev["first_scale"] == 20.0 and ev["temperature"] == 0.05
    assert "from effective scale 20 (2 points, effective scales 20, 400: the logit scale over temperature 0.05)" in (
        f["message"])  # fmt: skip
    from losscheck.report_findings import where

    assert "from scale/T (T = 0.05) 20 (" in where(f)
    # The same breakdown with temperature 1 at scale 1 is still a formula error (nothing to explain it).
    assert kinds([rec(loss="js_div", scale=s, bwd=nan) for s in (1.0, 20.0)]) == {("torch", "formula")}
    # A temperature above 1 shrinks the scale: wrong at effective scale 0.5 is a formula error.
    hot = [rec(loss="js_div", scale=s, options={"temperature": 2.0}, bwd=nan) for s in (1.0, 20.0)]
    [g] = find(hot)
    assert g["kind"] == "formula" and g["evidence"]["smallest_scale"] == 0.5
    assert "already at effective scale 0.5" in g["message"]
    # A probe drops the sweep clause, effective or not.
    assert "effective" not in find(recs, sweep=False)[0]["message"]


def test_formula_must_hold_in_the_widest_dtype_too():
    # torch's half-precision gradient p − q with smoothed targets cancels where p ≈ q: wrong
    # at every scale-1 point in float16 and bfloat16, right in float32 and float64. Precision,
    # not a formula error.
    grad = {"max_ulp": 329, "max_bits": 8.4, "saturated": 38}
    recs = [rec(dtype=d, loss="cross_entropy", options={"label_smoothing": 0.1}, bwd=grad if d in half else {})
            for half in [("float16", "bfloat16")] for d in ("float64", "float32", "float16", "bfloat16")]
    assert {(f["dtype"], f["kind"]) for f in find(recs)} == {("float16", "saturation"), ("bfloat16", "saturation")}
    # A wrong constant of relative size 1e-3: off in float64, float32 and float16, within
    # bfloat16's threshold. A formula error where it shows, named with the widest dtype.
    off = {"max_ulp": 2 ** 20, "max_bits": 20.0, "saturated": 64}
    recs = [rec("mine", "custom", dtype=d, fwd=off if d != "bfloat16" else {})
            for d in ("float64", "float32", "float16", "bfloat16")]
    fs = find(recs)
    assert {(f["dtype"], f["kind"]) for f in fs} == {("float64", "formula"), ("float32", "formula"),
                                                     ("float16", "formula")}
    assert all(f["evidence"]["widest_dtype"] == "float64" for f in fs)
    assert "and in float64 too" in fs[1]["message"] and "too" not in fs[0]["message"]
    # Without a float64 group, the widest swept is the judge.
    assert {f["kind"] for f in find(recs[2:])} == {"formula"}


@pytest.mark.parametrize("what, fwd, bwd, reduction", [
    # A float16 mean over 70000 rows: every element within 1 ULP, the count overflows and the
    # mean is NaN, the gradient (1/count = 0) flushed to zero.
    ("mean NaN, gradient flushed", {"max_ulp": 1, "reduced_ulp": math.inf, "value": math.nan, "reference": 2.7},
     {"max_ulp": 240, "max_bits": 7.9, "saturated": 600, "underflow": 640}, "mean"),
    # A float16 sum overflowing at scale 1 although its reference is finite.
    ("sum inf", {"max_ulp": 1, "reduced_ulp": math.inf, "value": math.inf, "reference": 60000.0}, {}, "sum"),
    # Accumulated error: a finite mean far off.
    ("mean drift", {"max_ulp": 1, "reduced_ulp": 4000, "value": 2.9, "reference": 2.7}, {}, "mean"),
    # The mean underflowing to 0.
    ("mean 0", {"reduced_ulp": 15000, "value": 0.0, "reference": 1e-3}, {}, "mean"),
])
def test_a_wrong_reduction_with_right_elements_is_reduction_never_formula(what, fwd, bwd, reduction):
    recs = [rec(dtype="float16", batch=70000, reduction=reduction, fwd=fwd, bwd=bwd, dist=d) for d in
            ("normal", "uniform")]
    got = kinds(recs)
    assert ("torch", "reduction") in got and ("torch", "formula") not in got, what
    assert ("torch", "saturation") not in got and ("torch", "overflow") not in got, what
    f = only(recs, "reduction")
    assert f["evidence"]["batches"] == [70000] and f["evidence"]["reductions"] == [reduction]
    assert f["evidence"]["worst_bits"] <= 11  # capped at float16's precision
    assert "every element within tolerance" in f["message"]
    if bwd.get("underflow"):
        assert got == {("torch", "reduction"), ("torch", "underflow")}


def test_the_all_ignored_mean_is_undefined_not_formula_nor_overflow():
    # 0/0: reference 0 by convention; torch returns NaN and a NaN gradient, at scale 1 on
    # normal inputs (the issue: called a "formula error" before).
    u = dict(options={"ignored": 1.0}, undefined="every target is ignored: the mean is 0/0")
    recs = [rec(loss="cross_entropy", dist=d, scale=s, fwd={"value": math.nan, "reduced_ulp": math.inf},
                bwd={"nan": 640, "max_ulp": math.inf}, **u) for d in ("normal", "uniform") for s in (1, 100)]
    [f] = find(recs)
    assert (f["kind"], f["variant"]) == ("undefined", "ignored=1")
    assert f["evidence"]["returned"] == ["nan"] and f["evidence"]["gradient_nonfinite_points"] == 4
    assert "returns nan" in f["message"] and "convention is 0" in f["message"]
    # An implementation returning 0 with a zero gradient there is fine.
    assert find([rec(loss="cross_entropy", fwd={"value": 0.0, "reduced_ulp": 0}, **u)]) == []


def test_overflow_limit_saturation_and_underflow():
    recs = [rec("naive", "naive", scale=100, fwd={"inf": 2, "nan": 1, "max_ulp": math.inf}),
            rec("naive", "naive", dist="nonfinite", fwd={"nan": 5, "max_ulp": math.inf}),
            rec("naive", "naive", scale=30, bwd={"saturated": 4, "max_ulp": 1e6}),
            rec("naive", "naive", scale=1000, bwd={"underflow": 7, "max_ulp": 3})]
    fs = {f["kind"]: f for f in find(recs)}
    assert list(fs) == ["overflow", "saturation", "underflow", "limit"]
    ev = fs["overflow"]["evidence"]
    assert (ev["nan"], ev["inf"], ev["elements"], ev["first_scale"]) == (1, 2, 3, 100.0)
    assert fs["limit"]["evidence"]["distributions"] == ["nonfinite"] and fs["limit"]["evidence"]["elements"] == 5
    assert fs["saturation"]["evidence"]["elements"] == 4 and fs["saturation"]["evidence"]["first_scale"] == 30.0
    assert fs["underflow"]["evidence"]["elements"] == 7
    # Non-finite elements at ±inf logits are a limit, never an overflow.
    assert kinds([rec(dist="nonfinite", fwd={"inf": 1, "max_ulp": math.inf})]) == {("torch", "limit")}


def test_clamping_against_an_infinite_reference_is_saturation():
    # torch's BCE returning 100 where the reference is +inf (p = 0, y = 1): `clamped`.
    f = only([rec(loss="bce", scale=100, fwd={"clamped": 3, "max_ulp": math.inf, "max_bits": 24.0})], "saturation")
    assert f["evidence"]["clamped"] == 3 and f["evidence"]["elements"] == 3
    assert f["evidence"]["worst_bits"] == 24.0
    assert "3 clamped against an infinite reference" in f["message"] and "all bits lost" in f["message"]
    # ... not an overflow, although its max_ulp is infinite.
    assert kinds([rec(loss="bce", scale=100, fwd={"clamped": 3, "max_ulp": math.inf})]) == {("torch", "saturation")}


def test_flushes_to_zero_are_underflow_not_saturation():
    # A flush to zero is scored by its distance: it may be counted as saturated as well.
    assert kinds([rec(scale=30, bwd={"underflow": 5, "saturated": 5, "max_ulp": 900})]) == {("torch", "underflow")}
    assert kinds([rec(scale=30, bwd={"underflow": 5, "saturated": 8, "max_ulp": 900})]) == \
        {("torch", "underflow"), ("torch", "saturation")}
    assert only([rec(scale=30, bwd={"underflow": 5, "saturated": 8})], "saturation")["evidence"]["elements"] == 3


def test_files_without_the_new_counters_still_classify():
    # Schema 1/2 records: no clamped/underflow; a NaN against an infinite reference only shows
    # in max_ulp: still a non-finite result (a point, no element count).
    r = rec(scale=100, fwd={"max_ulp": math.inf})
    for s in (r["forward"], r["backward"]):
        del s["clamped"], s["underflow"]
    f = only([r], "overflow")
    assert f["evidence"]["elements"] == 0 and "at some elements" in f["message"]
    # A finite mean far off whose elements are off without a counter saying how: saturation.
    r2 = rec(scale=30, fwd={"max_ulp": 1e5, "reduced_ulp": 1e5, "value": 3.0, "reference": 2.0})
    assert kinds([r2]) == {("torch", "saturation")}


def test_findings_are_json_deterministic_and_one_per_group_and_kind():
    recs = [rec(impl, kind, dtype=d, scale=s, dist=dist, fwd=fwd)
            for impl, kind in (("torch", "framework"), ("naive", "naive"))
            for d in ("float32", "float16")
            for s in (1, 100)
            for dist in ("normal", "nonfinite")
            for fwd in ({"inf": 1, "max_ulp": math.inf} if s == 100 or dist == "nonfinite" else {},)]
    fs = find(recs)
    text = json.dumps(fs, allow_nan=False)  # finite numbers only: survives the results file as is
    assert json.loads(text) == fs
    assert find(list(reversed(recs))) == fs == find(copy.deepcopy(recs))
    keys = [(f["loss"], f["variant"], f["impl"], f["dtype"], f["device"], f["kind"]) for f in fs]
    assert len(keys) == len(set(keys))
    assert [k[2] for k in keys] == sorted((k[2] for k in keys), key=["naive", "stable", "torch"].index)
    assert all(set(f) == set(findings.FINDING_KEYS) and f["kind"] in KINDS for f in fs)
    assert {(f["impl"], f["dtype"], f["kind"]) for f in fs} == {
        (i, d, k) for i in ("naive", "torch") for d in ("float32", "float16") for k in ("overflow", "limit")}


def test_probe_mode_has_no_formula_and_no_sweep_words():
    tail = {"max_ulp": 234, "max_bits": 7.9, "saturated": 3}
    [f] = find([rec(fwd=tail)], sweep=False)
    assert f["kind"] == "saturation" and "scale" not in f["message"] and "scales" not in f["evidence"]


def test_capped_bits_follow_metrics():
    assert findings.capped_bits(2 ** 62, "float64") == 53.0  # "mean 62 bits off" in float64 before
    assert findings.capped_bits(math.inf, "bfloat16") == 8.0
    assert findings.capped_bits(3, "float32") == 2.0
    assert findings.bits_text(53.0, "float64") == "all bits lost"
    assert findings.bits_text(7.9, "float16") == "7.9 bits off"


# ---- real small sweeps --------------------------------------------------------------------

def sweep_findings(text: str, tmp_path) -> tuple[list[dict], list[dict]]:
    """Run the config, write and load the results file as bench does; its findings and records."""
    cfg = C.parse_config(text, "test.yaml")
    threads = torch.get_num_threads()
    records = sweep.run(cfg, threads)
    data = results.make_results(cfg.as_dict(), environment.capture(threads), records, "pytest")
    path = tmp_path / "r.json"
    results.save(data, path)
    loaded = results.load(path)
    assert loaded["findings"] == data["findings"] == find(loaded["records"])
    return loaded["findings"], loaded["records"]


def by(fs, **kw) -> list[dict]:
    return [f for f in fs if all(f[k] == v for k, v in kw.items())]


BIG_HALF_MEAN = """\
name: big-half-mean
losses: [cross_entropy]
implementations: [stable, torch]
scales: [1]
batch_sizes: [{rows}]
classes: [10]
dtypes: [float16]
devices: [cpu]
distributions: [normal]
timing: false
"""


def test_a_float16_mean_whose_sum_overflows_is_a_reduction_for_torch(tmp_path):
    # 30000 rows of ~2.7 nats: torch's float16 sum passes 65504 (the count does not), so its
    # mean is inf while every element and the gradient are right.
    fs, recs = sweep_findings(BIG_HALF_MEAN.format(rows=30000), tmp_path)
    torch_rec = by(recs, impl="torch")[0]
    assert torch_rec["forward"]["max_ulp"] <= 4 and torch_rec["forward"]["value"] == math.inf
    assert torch_rec["forward"]["reference"] == pytest.approx(2.73, abs=0.01)
    torch_kinds = {f["kind"] for f in by(fs, impl="torch")}
    assert "reduction" in torch_kinds and "formula" not in torch_kinds
    [f] = by(fs, impl="torch", kind="reduction")
    assert f["evidence"]["returned"] == ["inf"] and f["evidence"]["batches"] == [30000]
    assert by(fs, impl="stable") == []


@pytest.mark.skipif("underflow" not in ErrorStats(1.0).as_dict(),
                    reason="needs metrics' `underflow` counter (issue 12, item 5): the flushed gradient "
                           "of the overflowing count is otherwise scored as saturation")
def test_a_float16_mean_over_70000_rows_is_a_reduction_for_torch(tmp_path):
    # The issue's case: the count 70000 overflows float16, the mean is NaN, every element is
    # within 1 ULP and the gradient (1/count) is flushed to zero.
    fs, _ = sweep_findings(BIG_HALF_MEAN.format(rows=70000), tmp_path)
    assert {f["kind"] for f in by(fs, impl="torch")} == {"reduction", "underflow"}


def test_the_all_ignored_batch_is_undefined(tmp_path):
    fs, recs = sweep_findings("""\
name: all-ignored
losses: [cross_entropy]
implementations: [naive, stable, torch]
scales: [1]
batch_sizes: [64]
classes: [5]
dtypes: [float32]
devices: [cpu]
distributions: [normal, uniform]
ignored: [1]
timing: false
""", tmp_path)
    assert all(r.get("undefined") for r in recs)
    [f] = by(fs, impl="torch")
    assert (f["kind"], f["variant"], f["evidence"]["returned"]) == ("undefined", "ignored=1", ["nan"])
    assert not by(fs, kind="formula") and not by(fs, impl="stable")


def test_the_missing_bracket_bce_is_a_formula_error(tmp_path):
    text = (ROOT / "examples" / "custom.yaml").read_text()
    cfg_text = text.split("scales:")[0].replace("losses: [bce, bce_with_logits]", "losses: [bce]") + """\
scales: [1, 100]
batch_sizes: [64]
dtypes: [float32]
devices: [cpu]
distributions: [normal, uniform]
timing: false
"""
    # The example paths are relative to the repository root.
    import os
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        fs, _ = sweep_findings(cfg_text, tmp_path)
    finally:
        os.chdir(cwd)
    for impl in ("missing_bracket", "missing_bracket_np"):
        [f] = by(fs, impl=impl)
        assert (f["kind"], f["impl_kind"]) == ("formula", "custom")
        assert f["evidence"]["smallest_scale"] == 1.0 and f["evidence"]["every_scale"] is True
    assert not by(fs, kind="formula", impl="torch") and not by(fs, impl="stable")


def test_infinite_logits_are_limit_findings(tmp_path):
    fs, _ = sweep_findings("""\
name: limits
losses: [bce_with_logits, cross_entropy]
implementations: [naive, stable, torch]
scales: [1]
batch_sizes: [64]
classes: [5]
dtypes: [float32]
devices: [cpu]
distributions: [nonfinite]
timing: false
""", tmp_path)
    assert {(f["loss"], f["impl"], f["kind"]) for f in fs if f["kind"] == "limit"} >= {
        ("bce_with_logits", "naive", "limit"), ("bce_with_logits", "torch", "limit"),
        ("cross_entropy", "torch", "limit")}
    assert not by(fs, impl="stable") and not by(fs, kind="overflow") and not by(fs, kind="formula")
