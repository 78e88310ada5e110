"""The Python API (losscheck/api.py) as a notebook uses it: a sweep from a mapping, its report,
its gate — no YAML file or text anywhere — and each function's errors."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mpmath
import pytest

import losscheck
from losscheck.errors import ResultsError
from losscheck.results import record_key

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {
    "name": "notebook",
    "losses": ["bce_with_logits"],
    "implementations": ["naive", "stable", "torch"],
    "scales": [1, 100],
    "batch_sizes": [32],
    "dtypes": ["float32"],
    "distributions": ["normal", "extreme"],
    "timing": False,
}


@pytest.fixture(scope="module")
def run_once():
    return losscheck.run(losscheck.Config.from_mapping(SWEEP), threads=1)


def test_a_notebook_runs_renders_and_gates_a_sweep_without_yaml(run_once, tmp_path):
    res = run_once
    # 2 scales x 2 distributions x 3 implementations, all measured.
    assert len(res.records) == 12 and {r["status"] for r in res.records} == {"ok"}
    assert {r["impl"] for r in res.records} == {"naive", "stable", "torch"}
    # The naive form overflows at scale 100 (exp(-x) of a large negative logit): a finding says so.
    assert any(f["impl"] == "naive" for f in res.findings)
    assert not any(f["impl"] == "stable" for f in res.findings)
    markdown = losscheck.render(res)
    assert markdown.startswith("# losscheck report: notebook") and "bce_with_logits" in markdown
    assert res.render() == markdown

    verdict = losscheck.compare(res, res)
    assert verdict.passed and bool(verdict) and verdict.exit_code == 0 and verdict.regressions == []
    assert "PASS" in verdict.render()

    # A copy in which stable lost 5 more bits at one point: a regression, unless allowed.
    worse = copy.deepcopy(res.data)
    point = next(r for r in worse["records"] if r["impl"] == "stable")
    point["forward"]["max_bits"] += 5
    failed = losscheck.compare(res, worse)
    assert failed.failed and failed.exit_code == 1
    assert [(v.key[1], v.gate) for v in failed.regressions] == [("stable", "accuracy")]
    assert "FAIL" in failed.render() and "forward max bits up by 5" in failed.render()
    assert losscheck.compare(res, worse, bits=5).passed
    assert not losscheck.compare(res, worse, bits=4.5).passed

    # save / load: the same document, whichever way it travels.
    path = res.save(tmp_path / "notebook.json")
    back = losscheck.load(path)
    assert [record_key(r) for r in back.records] == [record_key(r) for r in res.records]
    assert [r["forward"]["max_bits"] for r in back.records] == [r["forward"]["max_bits"] for r in res.records]
    assert back.findings == res.findings
    assert back.config.as_dict() == losscheck.Config.from_mapping(SWEEP).as_dict() and back.complete
    assert losscheck.compare(path, back).passed
    assert back.environment["torch"] == res.environment["torch"]


def test_run_writes_to_out_and_accepts_a_mapping(tmp_path):
    small = {**SWEEP, "scales": [1], "distributions": ["normal"], "implementations": ["stable"]}
    res = losscheck.run(small, threads=1, out=tmp_path)
    assert (tmp_path / "notebook.json").is_file() and res.path == tmp_path / "notebook.json"
    assert losscheck.load(tmp_path / "notebook.json").records == losscheck.load(res.path).records
    # the measured value agrees with the exact mean loss of the same inputs (checked by the
    # sweep against mpmath): stable's reduced error is within an ULP
    assert all(r["forward"]["reduced_ulp"] <= 1 for r in res.records)


def test_run_shards_resume_and_on_record_share_the_bench_path(run_once, tmp_path):
    """run(shard=, resume=, on_record=) is bench's path: shard files named as bench names them,
    whose union is the whole sweep; a resume of a complete file redoes no point."""
    cfg = losscheck.Config.from_mapping(SWEEP)
    seen: list[dict] = []
    parts = [losscheck.run(cfg, threads=1, out=tmp_path, shard=(i, 2), on_record=seen.append) for i in (1, 2)]
    assert [p.path.name for p in parts] == ["notebook.shard-1-of-2.json", "notebook.shard-2-of-2.json"]
    assert [p.data["shard"] for p in parts] == [[1, 2], [2, 2]]
    keys = sorted(record_key(r) for p in parts for r in p.records)
    assert keys == sorted(record_key(r) for r in run_once.records) == sorted(record_key(r) for r in seen)
    again: list[dict] = []
    resumed = losscheck.run(cfg, threads=1, out=parts[0].path, shard=(1, 2), resume=True, on_record=again.append)
    assert again == [] and resumed.records == parts[0].records and resumed.complete
    with pytest.raises(TypeError, match="needs out="):
        losscheck.run(cfg, resume=True)


def softplus_mean(xs, ys) -> float:
    mpmath.mp.prec = 200
    terms = [mpmath.log1p(mpmath.exp(mpmath.mpf(x))) - mpmath.mpf(x) * y for x, y in zip(xs, ys)]
    return float(sum(terms) / len(terms))


def test_probe_audits_given_values_against_the_exact_loss():
    xs, ys = [100.0, -3.0, 0.5], [0, 1, 1]
    result = losscheck.probe("bce_with_logits", xs, ys, dtype="float32")
    exact = softplus_mean(xs, ys)
    assert result.reference["value"] == pytest.approx(exact, rel=1e-15)
    by_impl = {r["impl"]: r for r in result.results}
    assert by_impl["stable"]["forward"]["reduced_ulp"] <= 1
    # naive: σ(100) rounds to 1 in float32, so log(1 − σ) = log 0 and the loss is inf.
    assert math.isinf(by_impl["naive"]["forward"]["value"])
    assert "naive" in result.render() and json.loads(result.to_json())["loss"] == "bce_with_logits"


def test_a_bad_mapping_is_a_one_line_config_error():
    with pytest.raises(losscheck.ConfigError) as e:
        losscheck.Config.from_mapping({**SWEEP, "colour": "red"})
    message = str(e.value)
    assert "\n" not in message and "key 'colour'" in message and "unknown key" in message
    with pytest.raises(losscheck.ConfigError, match=r"key 'dtypes': unknown value 'float8'"):
        losscheck.Config.from_mapping({**SWEEP, "dtypes": ["float8"]})
    with pytest.raises(losscheck.ConfigError, match=r"key 'gate.bits': bad value -1"):
        losscheck.Config.from_mapping({**SWEEP, "gate": {"bits": -1}})
    with pytest.raises(losscheck.ConfigError, match="expected a mapping"):
        losscheck.Config.from_mapping(["not", "a", "mapping"])
    with pytest.raises(losscheck.ConfigError, match="expected a Config or a mapping"):
        losscheck.run("config.yaml")


def test_load_compare_and_probe_refuse_bad_input(tmp_path):
    with pytest.raises(ResultsError):
        losscheck.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(losscheck.LosscheckError):
        losscheck.load(tmp_path / "bad.json")
    small = json.loads((ROOT / "tests" / "data" / "small_results.json").read_text())
    with pytest.raises(TypeError, match="unknown threshold 'bitz'"):
        losscheck.compare(small, small, bitz=1)
    interrupted = {**small, "complete": False}
    with pytest.raises(losscheck.LosscheckError, match="interrupted"):
        losscheck.compare(small, interrupted)
    with pytest.raises(losscheck.ConfigError, match="unknown loss 'hinge'"):
        losscheck.probe("hinge", [1.0], [0])
    with pytest.raises(losscheck.ConfigError, match="does not match"):
        losscheck.probe("bce_with_logits", [1.0, 2.0], [0])


def test_import_losscheck_and_reading_stay_torch_free(tmp_path):
    code = ("import sys, losscheck\n"
            "assert 'torch' not in sys.modules\n"
            "r = losscheck.load(sys.argv[1])\n"
            "md = losscheck.render(r)\n"
            "v = losscheck.compare(r, r)\n"
            "losscheck.Config.from_mapping(r.config.as_dict())\n"
            "print('torch' in sys.modules, v.passed, md.startswith('#'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests" / "data" / "small_results.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True"]


def test_the_exports():
    assert set(losscheck.__all__) >= {"Config", "run", "load", "render", "compare", "probe", "Results", "Verdict",
                                      "ConfigError"}
    assert callable(losscheck.probe) and losscheck.Config.__module__ == "losscheck.config"
    with pytest.raises(AttributeError):
        losscheck.nothing_here  # noqa: B018
