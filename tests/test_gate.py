"""The regression gate: `bench --baseline`, `compare`, `baseline`, and `gate.compare` itself.

Planted regressions (a less accurate, a NaN-producing and a slow implementation, swapped
into the registry with monkeypatch) must fail the gate with exit 1 and the right verdict;
a file compared with itself, or differences within the thresholds, must pass; bad inputs
are one `error:` line and exit 2.
"""
from __future__ import annotations

import copy
import json
import math
import re
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_error_line

from losscheck import gate as G
from losscheck import results, sweep
from losscheck.cli import main
from losscheck.config import parse_config
from losscheck.losses import LOSSES, Impl

# The tiny sweep of conftest without timing: accuracy and overflow gates only (deterministic).
TINY_TIMING = "timing:\n  min_run_time: 0.001\n  scales: [1]\n"

# Two timed points (stable and torch at one input): the timing gates, kept fast.
TIMED_CONFIG = """\
name: timed
losses: [bce_with_logits]
implementations: [stable, torch]
scales: [1]
batch_sizes: [64]
dtypes: [float32]
devices: [cpu]
distributions: [normal]
# One thread: with two, a busy second core stalls torch's thread pool for milliseconds per
# call (seen at 64 elements: 13 µs or 16 ms), and the samples are rightly not judged.
threads: 1
timing:
  min_run_time: 0.002
  scales: [1]
  distributions: [normal]
"""

SLEEP_S = 0.003


def untimed(tiny_config_text: str, extra: str = "") -> str:
    assert TINY_TIMING in tiny_config_text  # the fixture's shape, so that the replace below bites
    return tiny_config_text.replace(TINY_TIMING, "timing: false\n") + extra


def _replace_impl(monkeypatch, loss, name, fn):
    old = LOSSES[loss].implementations[name]
    monkeypatch.setitem(LOSSES[loss].implementations, name, Impl(old.name, old.kind, fn, old.summary))
    return old.fn


def _reduce(elements, reduction):
    if reduction == "none":
        return elements
    return elements.mean() if reduction == "mean" else elements.sum()


def plant_inaccurate(monkeypatch, loss="bce_with_logits", impl="stable"):
    real = LOSSES[loss].implementations[impl].fn

    def worse(x, y, reduction="mean"):
        # A relative error of 2**-8: many bits lost in float32, a few ULPs in float16.
        return _reduce(real(x, y, "none") * (1 + 2 ** -8), reduction)

    _replace_impl(monkeypatch, loss, impl, worse)


def plant_nan(monkeypatch, loss="bce_with_logits", impl="stable"):
    real = LOSSES[loss].implementations[impl].fn

    def nan_at_first(x, y, reduction="mean"):
        elements = real(x, y, "none")
        mask = torch.zeros(elements.shape, dtype=torch.bool, device=elements.device)
        mask[0] = True
        return _reduce(torch.where(mask, torch.full_like(elements, math.nan), elements), reduction)

    _replace_impl(monkeypatch, loss, impl, nan_at_first)


def plant_sleep(monkeypatch, loss="bce_with_logits", impl="stable"):
    real = LOSSES[loss].implementations[impl].fn

    def slow(x, y, reduction="mean"):
        time.sleep(SLEEP_S)
        return real(x, y, reduction)

    _replace_impl(monkeypatch, loss, impl, slow)


def bench(runner, cfg_path, out, *args):
    return runner.invoke(main, ["bench", str(cfg_path), "--out", str(out), "--no-progress", *args])


def regression_rows(markdown: str) -> list[dict[str, str]]:
    """Rows of the '## Regressions' table as {column: cell}; a column the report states once
    above the table ("Every row: loss bce, ...") is filled in from there."""
    assert "## Regressions" in markdown, markdown
    section = markdown.split("## Regressions", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    same = {}
    if m := re.search(r"^Every row: (.+)\.$", section, re.MULTILINE):
        for name in ("loss", "implementation", "dtype", "device"):
            if v := re.search(rf"(?:^|, ){name} ([^ ,]+)", m[1]):
                same[name] = v[1]
    return [{**same, **dict(zip(header, (c.strip() for c in row.strip().strip("|").split("|"))))}
            for row in lines[2:]]  # past header + rule


def gates_of(markdown: str, loss: str, impl: str) -> set[str]:
    return {r["gate"] for r in regression_rows(markdown) if r["loss"] == loss and r["implementation"] == impl}


# ---- shared runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory, tiny_config_text):
    """The untimed tiny sweep through `bench`, accepted with `losscheck baseline`."""
    tmp = tmp_path_factory.mktemp("gate")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text))
    runner = CliRunner()
    ran = bench(runner, cfg, tmp / "run")
    assert ran.exit_code == 0, (ran.output, ran.stderr)
    accepted = runner.invoke(main, ["baseline", str(tmp / "run" / "tiny.json"), "-o", str(tmp / "base.json")])
    assert accepted.exit_code == 0, (accepted.output, accepted.stderr)
    assert accepted.stdout.startswith("baseline: 144 points")
    return {"dir": tmp, "config": cfg, "run": tmp / "run" / "tiny.json", "base": tmp / "base.json"}


@pytest.fixture(scope="module")
def regressed_run(tiny_baseline, tmp_path_factory):
    """The tiny sweep with bce_with_logits/stable made less accurate, gated by `bench --baseline`."""
    mp = pytest.MonkeyPatch()
    try:
        plant_inaccurate(mp)
        out = tmp_path_factory.mktemp("regressed")
        result = bench(CliRunner(), tiny_baseline["config"], out, "--baseline", str(tiny_baseline["base"]))
    finally:
        mp.undo()
    return result, out / "tiny.json"


@pytest.fixture(scope="module")
def timed_runs(tmp_path_factory):
    """A timed baseline of TIMED_CONFIG and a current run whose stable implementation sleeps."""
    tmp = tmp_path_factory.mktemp("timed")
    cfg = tmp / "timed.yaml"
    cfg.write_text(TIMED_CONFIG)
    runner = CliRunner()
    ran = bench(runner, cfg, tmp / "base")
    assert ran.exit_code == 0, (ran.output, ran.stderr)
    mp = pytest.MonkeyPatch()
    try:
        plant_sleep(mp)
        slow = bench(runner, cfg, tmp / "slow")
    finally:
        mp.undo()
    assert slow.exit_code == 0, (slow.output, slow.stderr)
    base, cur = tmp / "base" / "timed.json", tmp / "slow" / "timed.json"
    timed = [r for r in results.load(cur)["records"] if r["timing"]]
    assert len(timed) == 2
    return {"dir": tmp, "config": cfg, "base": base, "slow": cur}


# ---- 1. determinism -----------------------------------------------------------------------------

def _without_timing(records) -> str:
    return json.dumps([{k: v for k, v in r.items() if k not in ("timing", "memory")} for r in records], sort_keys=True)


def test_same_config_and_seed_give_bit_identical_records(tiny_config_text, tiny_results):
    """A second in-process run of the tiny sweep against the session's first one (`tiny_results`,
    the same `sweep.run` on the same config, read back through the file format)."""
    cfg = parse_config(tiny_config_text, "tiny.yaml")
    records = sweep.run(cfg, torch.get_num_threads())
    assert any(r["timing"] for r in records)  # the config times some points: they are dropped below
    assert any(r["timing"] for r in tiny_results["records"])
    again = _without_timing(records)
    assert again == _without_timing(tiny_results["records"])
    assert '"status": "ok"' in again and "Infinity" in again  # non-finite values compared as well


# ---- 2. a file against itself ----------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["--timing", "absolute"]])
def test_a_results_file_compared_with_itself_passes(runner, tiny_results, tmp_path, args):
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    result = runner.invoke(main, ["compare", str(path), str(path), *args])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert result.stdout.startswith("# losscheck compare")
    assert "**PASS**" in result.stdout and "**FAIL**" not in result.stdout
    n = len(tiny_results["records"])
    ran = sum(r["status"] == "ok" for r in tiny_results["records"])
    assert 0 < ran < n  # the CUDA points are skipped here: not run, so not counted as unchanged
    assert (f"0 regression(s) at 0 point(s), 0 improvement(s), {ran} of {n} matched points unchanged; 0 point(s) "
            f"missing from the current run, 0 only in the current run (0 judged against the same run, 0 not gated), "
            f"{n - ran} not run (skipped or errored: not passed).") in result.stdout
    assert "## Regressions" not in result.stdout and "Environments differ" not in result.stdout
    assert result.stderr.strip() == f"comparison written to {tmp_path / 'a.compare.md'}"
    assert (tmp_path / "a.compare.md").read_text() == result.stdout


# ---- 3. planted accuracy and overflow regressions -----------------------------------------------

def test_planted_accuracy_regression_fails_bench_with_baseline(regressed_run):
    result, current = regressed_run
    assert result.exit_code == 1, (result.output, result.stderr)
    first, markdown = result.stdout.split("\n", 1)
    assert first.startswith("144 points")  # the bench summary line, then the comparison
    assert markdown.startswith("# losscheck compare")
    assert "**FAIL**" in markdown and "**PASS**" not in markdown
    assert "accuracy" in gates_of(markdown, "bce_with_logits", "stable")
    # Only the planted implementation regressed.
    assert {(r["loss"], r["implementation"]) for r in regression_rows(markdown)} == {("bce_with_logits", "stable")}
    assert "forward max bits up by" in markdown
    compare_md = current.with_suffix(".compare.md")
    assert compare_md.is_file() and compare_md.read_text() == markdown
    assert f"comparison written to {compare_md}" in result.stderr


def test_planted_nan_fails_the_overflow_gate(runner, tiny_baseline, tmp_path, monkeypatch):
    plant_nan(monkeypatch)
    result = bench(runner, tiny_baseline["config"], tmp_path, "--baseline", str(tiny_baseline["base"]))
    assert result.exit_code == 1, (result.output, result.stderr)
    assert "**FAIL**" in result.stdout
    assert "overflow" in gates_of(result.stdout, "bce_with_logits", "stable")
    assert "more NaN/±inf value(s) than the baseline" in result.stdout


def test_compare_of_the_regressed_run_gives_the_same_verdicts(runner, tiny_baseline, regressed_run):
    result, current = regressed_run
    again = runner.invoke(main, ["compare", str(tiny_baseline["base"]), str(current)])
    assert again.exit_code == 1
    assert regression_rows(again.stdout) == regression_rows(result.stdout)


# ---- 4. planted slowdown ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_planted_slowdown_fails_the_timing_gate(runner, timed_runs, tmp_path, monkeypatch, mode):
    plant_sleep(monkeypatch)
    result = bench(runner, timed_runs["config"], tmp_path, "--baseline", str(timed_runs["base"]), "--timing", mode)
    if result.exit_code == 0 and "unstable" in result.stdout:
        # The gate declining to judge a sample a loaded machine made unstable is its contract
        # (a false alarm is worse); the planted slowdown is then not measurable here.
        pytest.skip("this machine is too loaded to time the planted slowdown: "
                    + result.stdout.split("Not judged:")[-1][:200])
    assert result.exit_code == 1, (result.output, result.stderr)
    assert "**FAIL**" in result.stdout
    assert gates_of(result.stdout, "bce_with_logits", "stable") == {"timing"}
    assert f"forward {mode} time" in result.stdout


def test_timing_off_ignores_the_slowdown(runner, timed_runs, tmp_path, monkeypatch):
    plant_sleep(monkeypatch)
    result = bench(runner, timed_runs["config"], tmp_path, "--baseline", str(timed_runs["base"]),
                   "--timing", "off")
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "**PASS**" in result.stdout and "## Regressions" not in result.stdout


def test_compare_timing_modes_on_the_slowed_run(runner, timed_runs):
    base, slow = str(timed_runs["base"]), str(timed_runs["slow"])
    for mode, code in (("absolute", 1), ("relative", 1), ("off", 0)):
        result = runner.invoke(main, ["compare", base, slow, "--timing", mode])
        assert result.exit_code == code, (mode, result.output, result.stderr)
    # A huge factor tolerates the slowdown.
    result = runner.invoke(main, ["compare", base, slow, "--timing", "absolute", "--time-factor", "1e9"])
    assert result.exit_code == 0, result.output


# ---- 5. JUnit ---------------------------------------------------------------------------------

ALLOWED_CASE_CHILDREN = {"failure", "error", "skipped", "system-out", "system-err"}


def check_junit(path) -> tuple[ET.Element, list[ET.Element]]:
    """The usual JUnit schema rules, by hand; returns the suite and its test cases."""
    text = path.read_text()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text.encode())
    assert root.tag == "testsuites"
    suites = list(root)
    assert len(suites) == 1 and suites[0].tag == "testsuite"
    suite = suites[0]
    assert suite.get("name")
    cases = list(suite)
    assert all(c.tag == "testcase" for c in cases)
    for c in cases:
        assert c.get("classname") and c.get("name"), c.attrib
        children = [ch.tag for ch in c]
        assert set(children) <= ALLOWED_CASE_CHILDREN, children
        assert len([t for t in children if t in ("failure", "error", "skipped")]) <= 1, children
        for ch in c:
            if ch.tag == "failure":
                assert ch.get("message"), ch.attrib
    counts = {
        "tests": len(cases),
        "failures": sum(c.find("failure") is not None for c in cases),
        "errors": sum(c.find("error") is not None for c in cases),
        "skipped": sum(c.find("skipped") is not None for c in cases),
    }
    for attr, n in counts.items():
        assert suite.get(attr) is not None and int(suite.get(attr)) == n, (attr, suite.attrib, counts)
        if root.get(attr) is not None:
            assert int(root.get(attr)) == n, (attr, root.attrib, counts)
    # Test cases are unique points.
    ids = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(set(ids)) == len(ids)
    return suite, cases


def test_junit_one_case_per_matched_point_failures_for_regressions(runner, tiny_baseline, regressed_run, tmp_path):
    _, current = regressed_run
    junit = tmp_path / "junit.xml"
    result = runner.invoke(main, ["compare", str(tiny_baseline["base"]), str(current), "--junit", str(junit)])
    assert result.exit_code == 1
    suite, cases = check_junit(junit)
    base = results.load(tiny_baseline["base"])["records"]
    cur = results.load(current)["records"]
    matched = {results.record_key(r) for r in base} & {results.record_key(r) for r in cur}
    assert len(cases) == len(matched) == 144
    failed = [c for c in cases if c.find("failure") is not None]
    assert failed and all(c.get("classname") == "losscheck.bce_with_logits.stable" for c in failed)
    assert int(suite.get("failures")) == len(failed)
    assert len(failed) == len({v.key for v in G.compare(results.load(tiny_baseline["base"]), results.load(current),
                                                        G.GatePolicy()).regressions})
    assert any("accuracy" in c.find("failure").get("message") for c in failed)


def test_junit_a_point_missing_from_the_current_run_fails_unless_allowed(runner, tiny_results, tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    results.save(tiny_results, base)
    fewer = copy.deepcopy(tiny_results)
    dropped = fewer["records"].pop(0)
    results.save(fewer, cur)
    junit = tmp_path / "out" / "junit.xml"  # a directory that does not exist yet
    result = runner.invoke(main, ["compare", str(base), str(cur), "--junit", str(junit)])
    assert result.exit_code == 1, (result.output, result.stderr)
    assert "**FAIL**" in result.stdout and "1 point(s) missing from the current run (a failure)" in result.stdout
    suite, cases = check_junit(junit)
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == 1 and failed[0].get("classname") == f"losscheck.{dropped['loss']}.{dropped['impl']}"
    assert failed[0].find("failure").get("message") == "missing from the current run"

    allowed = runner.invoke(main, ["compare", str(base), str(cur), "--junit", str(junit), "--allow-missing"])
    assert allowed.exit_code == 0, (allowed.output, allowed.stderr)
    assert "1 point(s) missing from the current run (allowed)" in allowed.stdout
    suite, cases = check_junit(junit)
    assert int(suite.get("failures")) == 0
    skipped = {c.find("skipped").get("message") for c in cases if c.find("skipped") is not None}
    assert "missing from the current run (allowed)" in skipped


def test_junit_points_not_run_are_skipped_not_passed(runner, tiny_results, tmp_path):
    # Regression guard: JUnit had tests="1152" skipped="0" where 576 CUDA points were skipped.
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    junit = tmp_path / "junit.xml"
    assert runner.invoke(main, ["compare", str(path), str(path), "--junit", str(junit)]).exit_code == 0
    suite, cases = check_junit(junit)
    not_ok = sum(r["status"] != "ok" for r in tiny_results["records"])
    assert not_ok and int(suite.get("skipped")) == not_ok and len(cases) == len(tiny_results["records"])
    messages = [c.find("skipped").get("message") for c in cases if c.find("skipped") is not None]
    assert all(m.startswith("not run: skipped: ") for m in messages), messages[:3]


# ---- 6. GITHUB_STEP_SUMMARY -------------------------------------------------------------------

def test_markdown_is_appended_to_the_github_step_summary(runner, tiny_results, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n\nkept\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    result = runner.invoke(main, ["compare", str(path), str(path)])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert summary.read_text() == "# earlier step\n\nkept\n" + result.stdout
    runner.invoke(main, ["compare", str(path), str(path)])
    assert summary.read_text() == "# earlier step\n\nkept\n" + 2 * result.stdout


def test_no_step_summary_when_the_variable_is_unset(runner, tiny_results, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    result = runner.invoke(main, ["compare", str(path), str(path)])
    assert result.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.compare.md", "a.json"]


# ---- 7. points on one side only ---------------------------------------------------------------

def test_points_on_one_side_only_are_listed_and_missing_ones_fail(runner, tiny_results, tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    fewer = copy.deepcopy(tiny_results)
    dropped = fewer["records"].pop(3)
    results.save(fewer, base)
    extra = copy.deepcopy(tiny_results)
    added = copy.deepcopy(extra["records"][5])
    added["scale"] = 12345.0
    extra["records"].append(added)
    results.save(extra, cur)
    result = runner.invoke(main, ["compare", str(base), str(cur)])
    # Only in the current run, and built-in (gate.new: custom): listed, not gated.
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "**PASS**" in result.stdout
    assert "0 point(s) missing from the current run, 2 only in the current run (0 judged against the same run, " \
           "2 not gated)" in result.stdout
    only_cur = result.stdout.split("## New and not gated (`gate.new`) (2)", 1)[1].split("\n## ", 1)[0]
    assert "12345" in only_cur and dropped["loss"] in only_cur

    # The other way round: the points missing from the current run fail the gate.
    back = runner.invoke(main, ["compare", str(cur), str(base)])
    assert back.exit_code == 1
    assert "2 point(s) missing from the current run (a failure)" in back.stdout
    assert "## Missing from the current run (fails the gate; --allow-missing accepts it) (2)" in back.stdout
    assert "12345" in back.stdout
    assert runner.invoke(main, ["compare", str(cur), str(base), "--allow-missing"]).exit_code == 0


def test_an_extra_scale_in_the_current_config_is_only_in_the_current_run(runner, tiny_baseline, tmp_path,
                                                                          tiny_config_text):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text).replace("scales: [1, 100]", "scales: [1, 100, 3]")
                   .replace("losses: [bce, bce_with_logits, cross_entropy]", "losses: [bce]"))
    result = bench(runner, cfg, tmp_path / "out", "--baseline", str(tiny_baseline["base"]), "--allow-missing")
    assert result.exit_code == 0, (result.output, result.stderr)
    # bce: 3 impls x 2 dtypes x 2 devices x 2 distributions at the new scale, built-in: not gated.
    assert "## New and not gated (`gate.new`) (24)" in result.stdout
    # bce_with_logits and cross_entropy are only in the baseline: allowed here.
    assert "## Missing from the current run (allowed by --allow-missing) (96)" in result.stdout
    assert "24 of 48 matched points unchanged" in result.stdout  # bce at scales 1 and 100; cuda not run
    strict = bench(runner, cfg, tmp_path / "out2", "--baseline", str(tiny_baseline["base"]))
    assert strict.exit_code == 1 and "96 point(s) missing from the current run (a failure)" in strict.stdout


# ---- 8. environments differ -------------------------------------------------------------------

def test_different_environments_refuse_absolute_timing(runner, timed_runs, tmp_path):
    base = results.load(timed_runs["base"])
    base["environment"]["platform"] = "Linux-0.0.1-elsewhere"
    path = tmp_path / "base.json"
    results.save(base, path)
    result = runner.invoke(main, ["compare", str(path), str(timed_runs["slow"]), "--timing", "absolute"])
    # The slowdown is real, but absolute timings from another environment are not compared.
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "**Environments differ**" in result.stdout
    assert "0.0.1-elsewhere" in result.stdout
    assert "timings are not judged where the environments differ" in result.stdout
    assert "2 environments differ" in result.stdout  # both parts, counted as not judged
    assert "## Regressions" not in result.stdout
    # Relative timing still gates across environments that choose the same kernels.
    rel = runner.invoke(main, ["compare", str(path), str(timed_runs["slow"]), "--timing", "relative"])
    if "unstable" in rel.stdout and rel.exit_code == 0:
        pytest.skip("this machine is too loaded to time the planted slowdown: " + rel.stdout.split("Not judged:")[1][:200])
    assert rel.exit_code == 1, rel.stdout
    assert "timings are not judged" not in rel.stdout
    assert gates_of(rel.stdout, "bce_with_logits", "stable") == {"timing"}


@pytest.mark.parametrize("field, value", [("cpu_capability", "AVX2"), ("cpu_id", "AuthenticAMD family 25 model 1"),
                                          ("torch", "2.99.0"), ("threads", 64)])
def test_timing_across_kernel_choices_is_not_judged_even_relative(runner, timed_runs, tmp_path, field, value):
    # Regression guard: a ratio to torch of a microsecond-scale operation depends on the
    # instruction set (AVX2 vs AVX512), not on the code; .ci/run failed on other CPUs.
    base = results.load(timed_runs["base"])
    base["environment"][field] = value
    path = tmp_path / "base.json"
    results.save(base, path)
    result = runner.invoke(main, ["compare", str(path), str(timed_runs["slow"]), "--timing", "relative"])
    assert result.exit_code == 0, result.stdout
    assert f"{field}: " in result.stdout and "timings are not judged where the environments differ" in result.stdout
    assert "0 comparison(s) judged" in result.stdout


# ---- 9. input errors --------------------------------------------------------------------------

def test_missing_baseline_is_an_input_error_before_the_sweep(runner, tmp_path, tiny_config_text):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text))
    result = bench(runner, cfg, tmp_path / "out", "--baseline", str(tmp_path / "nope.json"))
    assert_one_error_line(result, "nope.json", "file not found")
    assert not (tmp_path / "out").exists()  # failed before running the sweep


def test_compare_input_errors(runner, tiny_results, tmp_path):
    good = tmp_path / "good.json"
    results.save(tiny_results, good)
    assert_one_error_line(runner.invoke(main, ["compare", str(tmp_path / "nope.json"), str(good)]),
                          "nope.json", "file not found")
    future = copy.deepcopy(tiny_results)
    future["schema_version"] = 99
    v99 = tmp_path / "v99.json"
    results.save(future, v99)
    assert_one_error_line(runner.invoke(main, ["compare", str(v99), str(good)]), "schema_version 99")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert_one_error_line(runner.invoke(main, ["compare", str(good), str(garbage)]), "garbage.json", "not valid JSON")
    assert not (tmp_path / "garbage.compare.md").exists()


def test_baseline_command_refuses_an_incomplete_run(runner, tiny_results, tmp_path):
    partial = copy.deepcopy(tiny_results)
    partial["complete"] = False
    path = tmp_path / "partial.json"
    results.save(partial, path)
    result = runner.invoke(main, ["baseline", str(path), "-o", str(tmp_path / "base.json")])
    assert_one_error_line(result, "partial.json", "complete: false")
    assert not (tmp_path / "base.json").exists()


def test_baseline_command_copies_a_complete_run(runner, tiny_results, tmp_path):
    path = tmp_path / "run.json"
    results.save(tiny_results, path)
    result = runner.invoke(main, ["baseline", str(path), "-o", str(tmp_path / "ci" / "base.json")])
    assert result.exit_code == 0, (result.output, result.stderr)
    assert results.load(tmp_path / "ci" / "base.json") == results.load(path)


@pytest.mark.parametrize("gate_yaml, fragments", [
    ("gate:\n  bitz: 1\n", ("gate.bitz", "unknown key")),
    ("gate:\n  bits: -1\n", ("gate.bits", "bad value -1")),
    ("gate:\n  ulp: .nan\n", ("gate.ulp", "bad value")),
    ("gate:\n  time_factor: 0.5\n", ("gate.time_factor", "bad value 0.5")),
    ("gate:\n  timing: sometimes\n", ("gate.timing", "unknown value 'sometimes'")),
    ("gate:\n  losses:\n    hinge: {bits: 1}\n", ("gate.losses.hinge", "unknown loss")),
    ("gate:\n  losses:\n    bce: {losses: {}}\n", ("gate.losses.bce.losses", "unknown key")),
    ("gate:\n  losses:\n    bce: {bits: -2}\n", ("gate.losses.bce.bits", "bad value -2")),
    ("gate: [1]\n", ("gate", "expected a mapping")),
])
def test_bad_gate_config_is_an_input_error(runner, tmp_path, tiny_config_text, gate_yaml, fragments):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text, gate_yaml))
    result = bench(runner, cfg, tmp_path / "out")
    assert_one_error_line(result, "tiny.yaml", *fragments)
    assert not (tmp_path / "out").exists()


# ---- 10. thresholds -----------------------------------------------------------------------------

def test_per_loss_thresholds_in_the_config_let_the_planted_regression_pass(
        runner, tiny_baseline, tmp_path, monkeypatch, tiny_config_text):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text,
                           "gate:\n  losses:\n    bce_with_logits: {bits: 64, ulp: 1e12}\n"))
    plant_inaccurate(monkeypatch)
    result = bench(runner, cfg, tmp_path / "out", "--baseline", str(tiny_baseline["base"]))
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "**PASS**" in result.stdout and "## Regressions" not in result.stdout
    assert "Per loss: bce_with_logits: bits 64, ulp 1e+12" in result.stdout
    # The command line replaces the configured thresholds, per-loss ones included.
    strict = runner.invoke(main, ["compare", str(tiny_baseline["base"]), str(tmp_path / "out" / "tiny.json"),
                                  "--bits", "0", "--ulp", "0"])
    assert strict.exit_code == 1, strict.output
    assert "accuracy" in gates_of(strict.stdout, "bce_with_logits", "stable")


def test_per_loss_threshold_of_another_loss_does_not_help(runner, tiny_baseline, tmp_path, monkeypatch,
                                                          tiny_config_text):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(untimed(tiny_config_text, "gate:\n  losses:\n    bce: {bits: 64, ulp: 1e12}\n"))
    plant_inaccurate(monkeypatch)
    result = bench(runner, cfg, tmp_path / "out", "--baseline", str(tiny_baseline["base"]))
    assert result.exit_code == 1, (result.output, result.stderr)
    assert "accuracy" in gates_of(result.stdout, "bce_with_logits", "stable")


def test_command_line_thresholds_override_the_config(runner, tiny_baseline, regressed_run):
    _, current = regressed_run
    base = str(tiny_baseline["base"])
    loose = runner.invoke(main, ["compare", base, str(current), "--bits", "64", "--ulp", "1e12"])
    assert loose.exit_code == 0, loose.output
    assert "**PASS**" in loose.stdout
    assert "gradient max bits up by more than 64; mean-loss error up by more than 1e+12 ULP" in loose.stdout
    # Loose bits alone: the mean-loss ULP gate still catches it.
    bits_only = runner.invoke(main, ["compare", base, str(current), "--bits", "64"])
    assert bits_only.exit_code == 1
    whys = [row["why"] for row in regression_rows(bits_only.stdout)]
    assert whys and all(w.startswith("mean-loss ULPs up by") for w in whys), whys


# ---- gate.compare on hand-built records -------------------------------------------------------

def _metrics(max_bits=1.0, reduced_ulp=0, nan=0, inf=0, value=1.0, reference=1.0):
    return {"n": 4, "max_ulp": 1, "max_bits": max_bits, "mean_bits": 0.5, "reduced_ulp": reduced_ulp,
            "value": value, "reference": reference, "nan": nan, "inf": inf, "saturated": 0}


def record(status="ok", message="", impl="stable", scale=1.0, timing=None, **metrics):
    rec = {"loss": "bce", "impl": impl, "kind": "stable", "dtype": "float32", "device": "cpu", "batch": 8,
           "classes": None, "scale": scale, "distribution": "normal", "status": status, "message": message,
           "threshold_bits": 12.0, "forward": None, "backward": None, "timing": timing}
    if status == "ok":
        rec["forward"], rec["backward"] = _metrics(**metrics), _metrics(max_bits=metrics.get("max_bits", 1.0))
    return rec


def run_file(*records, env=None):
    return {"schema_version": 1, "environment": env or {"torch": "2"}, "config": {"seed": 0},
            "records": list(records)}


def compare(b, c, **thresholds):
    return G.compare(run_file(b), run_file(c), G.GatePolicy(G.Thresholds(**thresholds)))


def test_status_ok_to_error_is_a_regression_and_back_an_improvement():
    c = compare(record(), record("error", "RuntimeError: boom"))
    assert [(v.gate, v.outcome, v.baseline, v.current, v.why) for v in c.verdicts] == [
        ("status", "regression", "ok", "error", "RuntimeError: boom")]
    assert c.failed and c.compared == 1 and c.unchanged == 0
    c = compare(record("error", "RuntimeError: boom"), record())
    assert [(v.gate, v.outcome) for v in c.verdicts] == [("status", "improvement")]
    assert not c.failed and c.improvements


def test_skipped_points_are_not_compared():
    for b, c in [(record("skipped", "no cuda"), record("skipped", "no cuda")),
                 (record(), record("skipped", "no cuda")),
                 (record("skipped", "no cuda"), record(max_bits=math.inf, nan=3))]:
        cmp = compare(b, c)
        assert cmp.verdicts == [] and not cmp.failed


def test_error_on_both_sides_is_no_verdict():
    assert compare(record("error", "a"), record("error", "b")).verdicts == []


def test_inf_to_inf_is_unchanged_and_finite_to_inf_is_a_regression():
    c = compare(record(max_bits=math.inf, reduced_ulp=math.inf), record(max_bits=math.inf, reduced_ulp=math.inf))
    assert c.verdicts == [] and c.unchanged == 1
    c = compare(record(max_bits=3.0), record(max_bits=math.inf))
    assert {(v.gate, v.outcome, v.current) for v in c.verdicts} == {("accuracy", "regression", "inf")}
    c = compare(record(max_bits=math.inf), record(max_bits=3.0), bits=100)
    assert {(v.gate, v.outcome) for v in c.verdicts} == {("accuracy", "improvement")}


@pytest.mark.parametrize("delta, outcome", [(0.5, None), (0.75, "regression"), (-0.5, None), (-0.75, "improvement")])
def test_bits_tolerance_edges(delta, outcome):
    c = compare(record(max_bits=2.0), record(max_bits=2.0 + delta), bits=0.5)
    assert {v.outcome for v in c.verdicts} == ({outcome} if outcome else set())
    assert c.failed == (outcome == "regression")


@pytest.mark.parametrize("delta, outcome", [(3, None), (4, "regression"), (-3, None), (-4, "improvement")])
def test_ulp_tolerance_edges(delta, outcome):
    c = compare(record(reduced_ulp=5), record(reduced_ulp=5 + delta), ulp=3)
    assert [(v.gate, v.outcome) for v in c.verdicts] == ([("accuracy", outcome)] if outcome else [])


def test_zero_tolerance_any_increase_is_a_regression():
    c = compare(record(max_bits=2.0), record(max_bits=2.0001))
    assert [v.outcome for v in c.verdicts] == ["regression", "regression"]  # forward and gradient


def test_new_nonfinite_values_are_an_overflow_regression():
    c = compare(record(), record(nan=2, inf=1))
    assert [(v.gate, v.outcome, v.baseline, v.current) for v in c.verdicts] == [("overflow", "regression", "0", "3")]
    # A reduced loss gone non-finite where the reference is finite counts as well.
    c = compare(record(), record(value=math.inf))
    assert [(v.gate, v.outcome) for v in c.verdicts] == [("overflow", "regression")]


def _timing(times, calibration=None, backward=None):
    """A record's timing section from raw per-run block times (forward; backward the same
    unless given)."""
    out = {}
    for part, ts in (("forward", times), ("backward", backward or times)):
        q1, m, q3 = G.stats.quartiles(ts)
        out.update({f"{part}_median_s": m, f"{part}_iqr_s": q3 - q1, f"{part}_q1_s": q1, f"{part}_q3_s": q3,
                    f"{part}_times_s": list(ts), f"{part}_runs": len(ts),
                    f"{part}_calibration_s": calibration if calibration else m})
    out["threads"] = 1
    return out


def _noisy(median, n=11, spread=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return list(median * np.exp(rng.normal(0, spread, n)))


def _timed(impl_times, torch_times=None, **kw):
    recs = [record(timing=_timing(impl_times, **kw))]
    if torch_times is not None:
        recs.append(record(impl="torch", timing=_timing(torch_times)))
    return run_file(*recs)


ABSOLUTE = G.GatePolicy(G.Thresholds(timing="absolute"))
RELATIVE = G.GatePolicy(G.Thresholds(timing="relative"))


def timing_verdicts(c):
    return [(v.key[1], v.outcome) for v in c.verdicts if v.gate == "timing"]


def test_the_same_noisy_timing_is_no_verdict():
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(_noisy(1e-3, seed=2)), ABSOLUTE)
    assert timing_verdicts(c) == [] and c.timing.judged == 2


def test_a_clear_slowdown_beyond_the_factor_is_a_regression_without_re_measure():
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(_noisy(2e-3, seed=2)), ABSOLUTE)
    assert timing_verdicts(c) == [("stable", "regression")] * 2
    assert "not re-measured (comparing two files)" in c.regressions[0].why
    assert c.timing.per_test == pytest.approx(0.01 / 2)


def test_a_clear_slowdown_below_the_factor_is_no_regression():
    # 1.2x slower, tightly measured: statistically clear, but under the minimum effect (1.25).
    c = G.compare(_timed(_noisy(1e-3, spread=0.01, seed=1)), _timed(_noisy(1.2e-3, spread=0.01, seed=2)), ABSOLUTE)
    assert timing_verdicts(c) == []
    c = G.compare(_timed(_noisy(1e-3, spread=0.01, seed=1)), _timed(_noisy(1.2e-3, spread=0.01, seed=2)),
                  G.GatePolicy(G.Thresholds(timing="absolute", time_factor=1.1)))
    assert timing_verdicts(c) == [("stable", "regression")] * 2


def test_a_suspect_that_re_measures_clean_is_not_called():
    calls = []

    def remeasure(key, names):
        calls.append((key[1], tuple(names)))
        return {"stable": _timing(_noisy(1e-3, n=21, seed=9))}
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(_noisy(2e-3, seed=2)), ABSOLUTE, remeasure=remeasure)
    assert timing_verdicts(c) == [] and calls == [("stable", ("stable",))] * 2
    assert (c.timing.suspected, c.timing.remeasured, c.timing.confirmed) == (2, 2, 0)

    def still_slow(key, names):
        return {"stable": _timing(_noisy(2e-3, n=21, seed=9))}
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(_noisy(2e-3, seed=2)), ABSOLUTE, remeasure=still_slow)
    assert timing_verdicts(c) == [("stable", "regression")] * 2
    assert "re-measured (21 blocks" in c.regressions[0].why


def test_a_failing_re_measure_is_reported_not_raised():
    def broken(key, names):
        raise RuntimeError("device gone")
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(_noisy(2e-3, seed=2)), ABSOLUTE, remeasure=broken)
    assert timing_verdicts(c) == [("stable", "regression")] * 2  # the first measurement decides
    assert "re-measure failed: RuntimeError: device gone" in c.regressions[0].why


def test_unstable_too_short_and_stalled_timings_are_not_judged():
    wild = [1e-3, 1e-3, 1e-3, 5e-3, 9e-3, 1e-3, 8e-3, 1e-3, 7e-3, 1e-3, 9e-3]  # IQR > median
    c = G.compare(_timed(wild), _timed(_noisy(3e-2, seed=2)), ABSOLUTE)
    assert timing_verdicts(c) == [("stable", "not judged")] * 2
    assert c.timing.not_judged == {"the baseline's timing is unstable": 2} and not c.failed
    short = G.compare(_timed(_noisy(1e-5, seed=1)), _timed(_noisy(4e-5, seed=2)), ABSOLUTE)
    assert short.timing.not_judged == {"too short to time reliably": 2} and not short.failed
    asked = G.compare(_timed(_noisy(1e-5, seed=1)), _timed(_noisy(4e-5, seed=2)),
                      G.GatePolicy(G.Thresholds(timing="absolute", min_time=0)))
    assert timing_verdicts(asked) == [("stable", "regression")] * 2
    # A uniform stall: steady blocks, but 8x what the calibration measured.
    stalled = G.compare(_timed(_noisy(8e-3, seed=1), calibration=1e-3), _timed(_noisy(3e-2, seed=2)), ABSOLUTE)
    assert stalled.timing.not_judged == {"the baseline's timing is unstable": 2}
    assert "a stall" in stalled.not_judged[0].why


def test_relative_timing_is_against_torch_in_the_same_run():
    fast, slow = _noisy(1e-3, seed=1), _noisy(3e-3, seed=2)
    torch_fast, torch_slow = _noisy(1e-3, seed=3), _noisy(3e-3, seed=4)
    # Everything 3x slower (another machine of the same kind): the ratio to torch is unchanged.
    c = G.compare(_timed(fast, torch_fast), _timed([3 * t for t in fast], [3 * t for t in torch_fast]), RELATIVE)
    assert timing_verdicts(c) == [] and c.compared == 2
    # Only the implementation 3x slower: a regression of the implementation, torch never gated.
    c = G.compare(_timed(fast, torch_fast), _timed(slow, torch_fast), RELATIVE)
    assert timing_verdicts(c) == [("stable", "regression")] * 2
    # A burst of load that slows whole rounds cancels in the paired ratios.
    burst = [t * (5 if i % 3 == 0 else 1) for i, t in enumerate(fast)]
    torch_burst = [t * (5 if i % 3 == 0 else 1) for i, t in enumerate(torch_fast)]
    c = G.compare(_timed(fast, torch_fast), _timed(burst, torch_burst), RELATIVE)
    assert timing_verdicts(c) == []


def test_old_results_without_raw_times_are_not_judged():
    base = _timed(_noisy(1e-3, seed=1))
    for k in ("forward_times_s", "backward_times_s"):
        del base["records"][0]["timing"][k]
    c = G.compare(base, _timed(_noisy(5e-3, seed=2)), ABSOLUTE)
    assert timing_verdicts(c) == [("stable", "not judged")] * 2 and not c.failed
    assert "re-accept the baseline" in c.not_judged[0].why


def test_the_false_alarm_rate_of_a_run_is_bounded():
    """Simulated self-comparisons: 300 runs of 48 timing comparisons each (the CI config's
    count), baseline and current drawn from the same heavy-tailed noise (lognormal, 30%
    spread, and one block in five hit by a 2-4x burst). The guarantee is at most 1% of runs
    with any false regression; the binomial tail for 300 runs makes more than 9 a failure of
    the guarantee (P < 1e-3 at a true 1%)."""
    rng = np.random.default_rng(12345)

    def sample():
        s = 1e-3 * np.exp(rng.normal(0, 0.3, 11))
        hit = rng.random(11) < 0.2
        return list(np.where(hit, s * rng.uniform(2, 4, 11), s))
    runs_with_alarm = 0
    policy = G.GatePolicy(G.Thresholds(timing="absolute", time_factor=1.25))
    for _ in range(300):
        base = run_file(*[record(scale=float(i), timing=_timing(sample(), backward=sample())) for i in range(24)])
        cur = run_file(*[record(scale=float(i), timing=_timing(sample(), backward=sample())) for i in range(24)])
        c = G.compare(base, cur, policy)
        runs_with_alarm += bool(c.regressions)
    assert runs_with_alarm <= 9


def test_cli_options_replace_per_loss_thresholds():
    policy = G.GatePolicy(G.Thresholds(bits=1), {"bce": G.Thresholds(bits=50, timing="off")})
    assert policy.with_overrides(bits=None, ulp=None, time_factor=None, timing=None) is policy
    new = policy.with_overrides(bits=2.0, ulp=None, time_factor=None, timing=None)
    assert new.for_loss("bce") == G.Thresholds(bits=2.0, timing="off")
    assert new.for_loss("cross_entropy") == G.Thresholds(bits=2.0)


# ---- output files that cannot be written ------------------------------------------------------

# Regression guard: an unwritable GITHUB_STEP_SUMMARY/--junit path escaped as an OSError
# with exit 1, the regression exit code, instead of exit 2.
@pytest.mark.parametrize("where", ["summary", "junit"])
def test_an_unwritable_output_is_an_input_error_not_a_regression(runner, tiny_results, tmp_path, monkeypatch, where):
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    args = ["compare", str(path), str(path)]
    if where == "summary":
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "missing-dir" / "summary.md"))
    else:
        args += ["--junit", str(a_file / "junit.xml")]
    assert_one_error_line(runner.invoke(main, args))


def test_a_point_skipped_on_one_side_is_listed_not_passed(runner, tiny_results, tmp_path):
    # Regression guard: an ok point that became `skipped` (e.g. a CUDA baseline gated on a
    # CPU-only runner) used to count as unchanged and pass silently.
    import copy
    import xml.etree.ElementTree as ET

    base = tmp_path / "base.json"
    results.save(tiny_results, base)
    cur_data = copy.deepcopy(tiny_results)
    rec = next(r for r in cur_data["records"] if r["status"] == "ok")
    rec.update(status="skipped", message="device gone", forward=None, backward=None, timing=None)
    cur = tmp_path / "cur.json"
    results.save(cur_data, cur)
    junit = tmp_path / "j.xml"
    result = runner.invoke(main, ["compare", str(base), str(cur), "--junit", str(junit)])
    assert result.exit_code == 0, result.output
    assert "## Skipped on one side (1)" in result.stdout
    skipped = [c for c in ET.parse(junit).getroot().iter("testcase") if c.find("skipped") is not None
               and c.find("skipped").get("message") == "skipped on one side"]
    assert len(skipped) == 1


@pytest.mark.parametrize("side", ["baseline", "current"])
def test_an_interrupted_run_is_refused_by_the_gate(runner, tiny_results, tmp_path, side):
    import copy

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    results.save(tiny_results, good)
    partial = copy.deepcopy(tiny_results)
    partial["complete"] = False
    partial["records"] = partial["records"][:10]
    results.save(partial, bad)
    args = ["compare", str(bad), str(good)] if side == "baseline" else ["compare", str(good), str(bad)]
    result = runner.invoke(main, args)
    assert_one_error_line(result)
    assert "interrupted" in result.stderr


def test_step_summary_starts_on_its_own_line(runner, tiny_results, tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    results.save(tiny_results, path)
    summary = tmp_path / "summary.md"
    summary.write_text("previous step without a final newline")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert runner.invoke(main, ["compare", str(path), str(path)]).exit_code == 0
    assert "previous step without a final newline\n# losscheck compare\n" in summary.read_text()


def test_an_unstable_current_sample_is_re_measured_rather_than_left_unjudged():
    wild = [1e-3, 1e-3, 1e-3, 5e-3, 9e-3, 1e-3, 8e-3, 1e-3, 7e-3, 1e-3, 9e-3]  # IQR > median
    left = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(wild), ABSOLUTE)
    assert left.timing.not_judged == {"the current run's timing is unstable": 2}

    def clean(key, names):
        return {"stable": _timing(_noisy(1e-3, n=21, seed=9))}
    c = G.compare(_timed(_noisy(1e-3, seed=1)), _timed(wild), ABSOLUTE, remeasure=clean)
    assert timing_verdicts(c) == [] and c.timing.not_judged == {} and c.timing.remeasured == 2


def test_different_thread_counts_are_named_with_what_they_do_to_accuracy(runner, timed_runs, tmp_path):
    base = results.load(timed_runs["base"])
    base["environment"]["threads"] = base["environment"]["threads"] + 1
    path = tmp_path / "base.json"
    results.save(base, path)
    result = runner.invoke(main, ["compare", str(path), str(timed_runs["base"]), "--timing", "off"])
    assert "**Environments differ**" in result.stdout and "The thread counts differ" in result.stdout
    same = runner.invoke(main, ["compare", str(timed_runs["base"]), str(timed_runs["base"]), "--timing", "off"])
    assert "thread counts differ" not in same.stdout
