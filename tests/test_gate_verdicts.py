"""Issue 12's verdicts: new implementations gated against the same run, the exact rank test
behind the timing gate, not-run-is-not-passed for merges, baseline warnings, and what the
environment records for kernel choice."""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
from helpers import assert_one_error_line

from losscheck import environment, results, stats
from losscheck import gate as G
from losscheck.cli import main

DATA = Path(__file__).parent / "data"
QUICK_BCE = """\
name: q
losses: [bce_with_logits]
implementations: [naive, stable, torch]
scales: [1, 30]
batch_sizes: [64]
dtypes: [float32, float16]
devices: [cpu]
distributions: [normal, extreme]
timing: false
"""


# ---- the exact rank test --------------------------------------------------------------------

def _brute_p(current, baseline, factor):
    """P(U >= u) by enumerating every split of the pooled ranks (no ties)."""
    scaled = [factor * b for b in baseline]
    u = sum(c > b for c in current for b in scaled)
    pooled = sorted(current + scaled)
    n = len(current)
    total = at_least = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        first = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        at_least += sum(c > b for c in first for b in rest) >= u
    return at_least / total


@pytest.mark.parametrize("seed", range(6))
def test_slower_p_is_the_exact_mann_whitney_tail(seed):
    import random
    rng = random.Random(seed)
    n, m = rng.randint(2, 6), rng.randint(2, 6)
    current = [rng.uniform(0, 2) for _ in range(n)]
    baseline = [rng.uniform(0, 2) for _ in range(m)]
    factor = rng.choice([1.0, 1.25, 1.5])
    assert stats.slower_p(current, baseline, factor) == pytest.approx(_brute_p(current, baseline, factor))


def test_smallest_p_of_eleven_blocks_allows_hundreds_of_comparisons():
    assert stats.slower_p([2.0] * 11, [1.0] * 11, 1.0) == pytest.approx(stats.smallest_p(11, 11))
    assert stats.smallest_p(11, 11) < 0.01 / 500  # the CI gate judges ~50 comparisons a run
    # All tied: U = n*m/2 = 60.5, and the p-value is taken at its floor, P(U >= 60): about a half.
    assert 0.5 < stats.slower_p([1.0] * 11, [1.0] * 11, 1.0) < 0.53


def test_stability_rules():
    assert stats.stability([1.0] * 4).why.endswith("5 needed")
    assert stats.stability([1, 1, 1, 1, 1.0]).ok
    assert stats.stability([1, 1, 3, 3, 3, 1, 3.0]).ok  # IQR 2, median 3: noisy but judged
    assert "interquartile range is 160%" in stats.stability([1, 1, 1, 5, 9, 9, 9.0]).why
    assert stats.stall([8e-3] * 11, 1e-3).ok is False and stats.stall([1e-3] * 11, 8e-3).ok


# ---- new implementations are gated against the same run ----------------------------------------

@pytest.fixture(scope="module")
def quick_baseline(tmp_path_factory):
    from click.testing import CliRunner
    tmp = tmp_path_factory.mktemp("versus")
    cfg = tmp / "q.yaml"
    cfg.write_text(QUICK_BCE)
    ran = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp / "run"), "--no-progress", "--no-plots"])
    assert ran.exit_code == 0, ran.output
    return cfg, tmp / "run" / "q.json"


def test_a_worse_new_custom_implementation_fails_and_is_named_first(runner, quick_baseline, tmp_path):
    cfg, base = quick_baseline
    junit = tmp_path / "j.xml"
    result = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path), "--no-progress", "--no-plots",
                                  "--impl", f"bce_with_logits={DATA / 'half_bce.py'}:bce_with_logits",
                                  "--baseline", str(base), "--timing", "off", "--junit", str(junit)])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    compare = result.stdout.split("# losscheck compare", 1)[1]
    head = compare.split("\n## ", 1)[0]
    assert "**FAIL**" in head
    row = next(line for line in head.splitlines() if line.startswith("| bce_with_logits (custom)"))
    assert "torch (same run)" in row and "**FAIL**" in row
    assert "(vs torch)" in compare.split("## Regressions", 1)[1]
    # The built-in implementations pass against the baseline.
    for impl in ("naive", "stable", "torch"):
        line = next(line for line in head.splitlines() if line.startswith(f"| {impl} "))
        assert line.rstrip(" |").endswith("pass"), line
    cases = [c for c in __import__("xml.etree.ElementTree").etree.ElementTree.parse(junit).getroot().iter("testcase")
             if c.get("classname") == "losscheck.bce_with_logits.bce_with_logits"]
    assert cases and any(c.find("failure") is not None for c in cases)


def test_gate_new_none_leaves_it_ungated_and_a_correct_one_passes(runner, quick_baseline, tmp_path):
    cfg, base = quick_baseline
    text = Path(cfg).read_text() + "gate:\n  new: none\n"
    cfg2 = tmp_path / "q.yaml"
    cfg2.write_text(text)
    half = f"bce_with_logits={DATA / 'half_bce.py'}:bce_with_logits"
    result = runner.invoke(main, ["bench", str(cfg2), "--out", str(tmp_path / "a"), "--no-progress", "--no-plots",
                                  "--impl", half, "--baseline", str(base), "--timing", "off"])
    assert result.exit_code == 0, result.stdout
    assert "not gated (no baseline)" in result.stdout
    good = Path(__file__).parent.parent / "examples" / "custom_bce_with_logits.py"
    ok = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                              "--impl", f"bce_with_logits={good}:bce_with_logits", "--baseline", str(base),
                              "--timing", "off", "--bits", "1", "--ulp", "2"])
    assert ok.exit_code == 0, ok.stdout
    row = next(line for line in ok.stdout.splitlines() if "(custom)" in line and line.startswith("|"))
    assert "torch (same run)" in row and row.rstrip(" |").endswith("pass")


def _rec(impl, kind, status="ok", max_bits=1.0, nan=0):
    sec = {"n": 4, "max_ulp": 1, "max_bits": max_bits, "mean_bits": 0.5, "reduced_ulp": 0, "value": 1.0,
           "reference": 1.0, "nan": nan, "inf": 0, "saturated": 0}
    return {"loss": "bce", "impl": impl, "kind": kind, "dtype": "float32", "device": "cpu", "batch": 8,
            "classes": None, "scale": 1.0, "distribution": "normal", "reduction": "mean", "options": {},
            "time": None, "status": status, "message": "boom",
            "threshold_bits": 12.0, "forward": sec if status == "ok" else None,
            "backward": dict(sec) if status == "ok" else None, "timing": None}


def _file(*recs):
    return {"schema_version": 3, "environment": {}, "config": {}, "records": list(recs)}


@pytest.mark.parametrize("mine, outcome", [
    (dict(max_bits=1.0), []),
    (dict(max_bits=9.0), ["accuracy"]),
    (dict(nan=2), ["overflow"]),
    (dict(status="error"), ["status"]),
])
def test_versus_rules(mine, outcome):
    base = _file(_rec("torch", "framework"))
    cur = _file(_rec("torch", "framework"), _rec("mine", "custom", **mine))
    c = G.compare(base, cur, G.GatePolicy(G.Thresholds(bits=1)))
    assert sorted({v.gate for v in c.regressions}) == outcome
    assert c.failed == bool(outcome)
    assert list(c.versus_of.values()) == ["torch"]


def test_versus_missing_is_not_run_and_new_all_gates_built_ins():
    c = G.compare(_file(), _file(_rec("mine", "custom")), G.GatePolicy())
    assert list(c.not_run.values()) == ["no torch point in this run to judge it against"] and not c.failed
    built_in = _file(_rec("torch", "framework"), _rec("stable", "stable", max_bits=9.0))
    assert not G.compare(_file(), built_in, G.GatePolicy()).failed  # new: custom
    assert G.compare(_file(), built_in, G.GatePolicy(G.Thresholds(new="all"))).failed
    assert not G.compare(_file(), built_in, G.GatePolicy(G.Thresholds(new="all", versus="stable"))).failed


# ---- merge: not run is not passed -------------------------------------------------------------

def test_merge_names_the_missing_shards(runner, tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text(QUICK_BCE)
    for i in (1, 3):
        r = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path), "--no-progress", "--no-plots",
                                 "--shard", f"{i}/4"])
        assert r.exit_code == 0, r.output
    out = tmp_path / "m.json"
    result = runner.invoke(main, ["merge", str(tmp_path / "q.shard-1-of-4.json"), str(tmp_path / "q.shard-3-of-4.json"),
                                  "-o", str(out), "--no-plots"])
    assert result.exit_code == 0
    assert "incomplete: shard(s) 2, 4 missing" in result.stdout
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["missing_shards"] == [2, 4]
    # The gate refuses it: its missing points would otherwise pass.
    gated = runner.invoke(main, ["compare", str(out), str(out)])
    assert_one_error_line(gated, "complete: false")
    whole = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "whole"), "--no-progress", "--no-plots"])
    assert whole.exit_code == 0
    mixed = runner.invoke(main, ["merge", str(tmp_path / "q.shard-1-of-4.json"), str(tmp_path / "whole" / "q.json"), "-o",
                                 str(tmp_path / "x.json"), "--no-plots"])
    assert_one_error_line(mixed, "only shards of one split")


# ---- baseline warnings and the environment ----------------------------------------------------

def test_accepting_an_unstable_baseline_warns_and_accepts(runner, tmp_path):
    rec = _rec("stable", "stable")
    stalled = [8e-3] * 11
    rec["timing"] = {"forward_median_s": 8e-3, "forward_iqr_s": 0.0, "backward_median_s": 8e-3,
                     "backward_iqr_s": 0.0, "forward_times_s": stalled, "backward_times_s": stalled,
                     "forward_calibration_s": 1e-3, "backward_calibration_s": 8e-3, "threads": 1}
    data = results.make_results({}, {}, [rec], "test")
    path = tmp_path / "r.json"
    results.save(data, path)
    result = runner.invoke(main, ["baseline", str(path), "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 0 and (tmp_path / "b.json").exists()
    assert "warning: 1 timing(s)" in result.stderr and "forward: " in result.stderr and "a stall" in result.stderr


def test_environment_records_what_decides_kernel_choice():
    env = environment.capture(3)
    assert env["threads"] == 3
    assert env["cpu_capability"] in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "AVX512", "SVE256", "NEON", None)
    assert env["torch_git"] is None or len(env["torch_git"]) >= 7
    assert set(G.TIMING_ENV) <= set(env)


def test_bench_loss_restricts_the_baseline_to_the_losses_run(runner, tmp_path):
    cfg = tmp_path / "two.yaml"
    cfg.write_text(QUICK_BCE.replace("losses: [bce_with_logits]", "losses: [bce, bce_with_logits]"))
    ran = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "a"), "--no-progress", "--no-plots"])
    assert ran.exit_code == 0
    base = tmp_path / "a" / "q.json"
    one = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                               "--loss", "bce", "--baseline", str(base)])
    assert one.exit_code == 0, one.stdout
    assert "0 point(s) missing" in one.stdout and "Baseline restricted to the losses run (--loss bce)" in one.stdout
    # compare of the same files has no --loss: the other loss's points are missing, a failure.
    assert runner.invoke(main, ["compare", str(base), str(tmp_path / "b" / "q.json")]).exit_code == 1
