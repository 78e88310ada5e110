"""The command line through CliRunner: exit codes, stdout/stderr, and the files it writes."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_error_line

from losscheck import results, sweep
from losscheck.cli import main
from losscheck.config import parse_config
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, Impl


FWD_BWD_KEYS = ("max_ulp", "max_bits", "mean_bits", "reduced_ulp", "nan", "inf")
TIMING_KEYS = ("forward_median_s", "forward_iqr_s", "backward_median_s", "backward_iqr_s")

# Small enough to run several times: one loss, two dtypes, the overflowing scale included.
SMALL_CONFIG = """\
name: small
losses: [bce]
implementations: [naive, stable, torch]
scales: [1, 100]
batch_sizes: [8]
dtypes: [float32, float16]
devices: [cpu]
distributions: [normal]
timing: false
"""


def _no_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str):
    return json.loads(text, parse_constant=_no_constant)


# ---- one bench run of the tiny sweep, shared by the tests that read what it wrote -------------

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_config_text):
    tmp = tmp_path_factory.mktemp("bench")
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(tiny_config_text)
    out = tmp / "out"
    # --no-plots: these tests are about the results and the Markdown; tests/test_plots.py covers plots.
    result = CliRunner().invoke(main, ["bench", str(cfg_path), "--out", str(out), "--no-progress", "--no-plots"])
    return result, out, parse_config(tiny_config_text, str(cfg_path))


def test_bench_exits_0_and_writes_json_and_md(bench_run):
    result, out, _ = bench_run
    assert result.exit_code == 0, (result.output, result.stderr)
    assert (out / "tiny.json").is_file() and (out / "tiny.md").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.md"]  # no temporary files left
    assert result.stderr == ""  # --no-progress: nothing on stderr


def test_bench_stdout_summarises_the_counts(bench_run):
    result, out, cfg = bench_run
    records = results.load(out / "tiny.json")["records"]
    total = sweep.count_points(cfg)
    assert len(records) == total == 144
    n = {s: sum(r["status"] == s for r in records) for s in ("ok", "error", "skipped")}
    assert n["error"] == 0
    assert result.stdout == (f"{total} points ({n['ok']} ok, {n['error']} error, {n['skipped']} skipped) -> "
                             f"{out / 'tiny.json'}, {out / 'tiny.md'}\n")


def test_records_have_every_key_of_the_contract(bench_run):
    _, out, cfg = bench_run
    data = strict_json((out / "tiny.json").read_text())
    assert data["schema_version"] == results.SCHEMA_VERSION == 3
    assert data["complete"] is True
    assert data["config"]["name"] == "tiny" and data["config"]["scales"] == [1.0, 100.0]
    for key in ("python", "torch", "numpy", "platform", "cpu", "threads", "devices", "losscheck"):
        assert key in data["environment"]
    timed = 0
    for r in data["records"]:
        for key in results.RECORD_KEYS:
            assert key in r, (key, r)
        assert r["loss"] in LOSSES and r["impl"] in ("naive", "stable", "torch")
        assert r["dtype"] in cfg.dtypes and r["device"] in cfg.devices
        assert (r["classes"] is None) == (not LOSSES[r["loss"]].multiclass)
        assert r["status"] in ("ok", "error", "skipped")
        if r["status"] != "ok":
            assert r["forward"] is None and r["backward"] is None and r["timing"] is None and r["message"]
            continue
        assert r["message"] == ""
        for section in ("forward", "backward"):
            for key in FWD_BWD_KEYS:
                assert key in r[section], (section, key)
            assert r[section]["n"] > 0
        if cfg.timing.applies(r["distribution"], r["scale"]):
            timed += 1
            for key in TIMING_KEYS:
                assert r["timing"][key] >= 0, key
        else:
            assert r["timing"] is None
    assert timed > 0


def test_cuda_points_skipped_without_cuda_and_run_with_it(bench_run):
    _, out, _ = bench_run
    records = results.load(out / "tiny.json")["records"]
    cuda = [r for r in records if r["device"] == "cuda"]
    cpu = [r for r in records if r["device"] == "cpu"]
    assert len(cuda) == len(cpu) == 72
    assert all(r["status"] == "ok" for r in cpu)
    if torch.cuda.is_available():
        assert all(r["status"] != "skipped" for r in cuda)
    else:
        assert {r["status"] for r in cuda} == {"skipped"}
        assert {r["message"] for r in cuda} == {"CUDA is not available here"}


def test_results_json_is_strict_json_with_nonfinite_as_strings(bench_run):
    _, out, _ = bench_run
    text = (out / "tiny.json").read_text()
    data = strict_json(text)  # raises on NaN / Infinity literals
    assert "Infinity" not in text and "NaN" not in text
    # Written so that it diffs cleanly: sorted keys, indented.
    assert text == json.dumps(data, indent=1, sort_keys=True) + "\n"
    # Naive bce_with_logits overflows at scale 100: its infinite ULP distance is the string "inf".
    naive = [r for r in data["records"] if r["loss"] == "bce_with_logits" and r["impl"] == "naive"
             and r["device"] == "cpu" and r["scale"] == 100 and r["distribution"] == "extreme"]
    assert naive and all(r["forward"]["max_ulp"] == "inf" for r in naive)
    # ... and loading turns it back into a float.
    loaded = results.load(out / "tiny.json")
    back = [r for r in loaded["records"] if r["loss"] == "bce_with_logits" and r["impl"] == "naive"
            and r["device"] == "cpu" and r["scale"] == 100 and r["distribution"] == "extreme"]
    assert all(r["forward"]["max_ulp"] == math.inf for r in back)


def test_report_rerenders_the_same_markdown(bench_run, runner, tmp_path):
    _, out, _ = bench_run
    shutil.copy(out / "tiny.json", tmp_path / "tiny.json")
    result = runner.invoke(main, ["report", str(tmp_path / "tiny.json"), "--no-plots"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path / 'tiny.md'}\n"
    assert (tmp_path / "tiny.md").read_text() == (out / "tiny.md").read_text()
    other = tmp_path / "sub" / "other.md"
    result = runner.invoke(main, ["report", str(tmp_path / "tiny.json"), "-o", str(other), "--no-plots"])
    assert result.exit_code == 0 and other.read_text() == (out / "tiny.md").read_text()


def test_report_stdout(bench_run, runner, tmp_path):
    _, out, _ = bench_run
    shutil.copy(out / "tiny.json", tmp_path / "tiny.json")
    result = runner.invoke(main, ["report", str(tmp_path / "tiny.json"), "--stdout"])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == (out / "tiny.md").read_text()
    assert result.stdout.startswith("# losscheck report: tiny\n")
    assert not (tmp_path / "tiny.md").exists()


def test_list(runner):
    result = runner.invoke(main, ["list", "--devices"])
    assert result.exit_code == 0 and result.stderr == ""
    for name in [*LOSSES, *FORMATS, "cpu", "cuda", "mps", "naive", "stable", "torch", "normal", "extreme"]:
        assert name in result.stdout, name
    cuda_line = next(line for line in result.stdout.splitlines() if line.startswith("cuda "))
    assert ("available" in cuda_line) and (("not available" in cuda_line) != torch.cuda.is_available())


def test_version(runner):
    from losscheck import __version__
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


# ---- bad input: exit 2, one line on stderr, no traceback -------------------------------------

def _tiny_with(tiny_config_text, old, new):
    assert old in tiny_config_text
    return tiny_config_text.replace(old, new)


BAD_CONFIGS = {
    "unknown key": (("seed: 0", "seed: 0\ncolour: red"), "key 'colour'", "unknown key"),
    "unknown loss": (("cross_entropy]", "hinge]"), "key 'losses'", "'hinge'"),
    "unknown dtype": (("float16]", "float8]"), "key 'dtypes'", "'float8'"),
    "unknown device": (("[cpu, cuda]", "[cpu, tpu]"), "key 'devices'", "'tpu'"),
    "wrong type": (("batch_sizes: [64]", "batch_sizes: 12"), "key 'batch_sizes'", "12"),
    "scale not a number": (("scales: [1, 100]", "scales: [1, big]"), "key 'scales'", "'big'"),
    # Regression: a negative seed used to pass validation and crash the sweep with a traceback.
    "negative seed": (("seed: 0", "seed: -1"), "key 'seed'", "-1"),
    "invalid YAML": (("classes: [5]", "classes: [5\n  oops: ]"), "invalid YAML at line", "line"),
}


@pytest.mark.parametrize("edit, key, bad", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line(runner, tmp_path, tiny_config_text, edit, key, bad):
    path = tmp_path / "bad.yaml"
    path.write_text(_tiny_with(tiny_config_text, *edit))
    out = tmp_path / "out"
    result = runner.invoke(main, ["bench", str(path), "--out", str(out), "--no-progress"])
    assert_one_error_line(result, f"error: {path}: ", key, bad)
    assert result.stdout == ""
    assert not out.exists()  # nothing written, nothing run


def test_missing_config_file_exits_2(runner, tmp_path):
    path = tmp_path / "nope.yaml"
    result = runner.invoke(main, ["bench", str(path), "--out", str(tmp_path / "out")])
    assert_one_error_line(result, f"error: {path}: file not found")


def test_report_missing_file(runner, tmp_path):
    path = tmp_path / "nope.json"
    result = runner.invoke(main, ["report", str(path)])
    assert_one_error_line(result, f"error: {path}: file not found")


def test_report_not_json(runner, tmp_path):
    path = tmp_path / "r.json"
    path.write_text("name: not json\n")
    result = runner.invoke(main, ["report", str(path)])
    assert_one_error_line(result, f"error: {path}: not valid JSON (line 1")
    assert not path.with_suffix(".md").exists()


def test_report_json_without_schema_version(runner, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"records": []}')
    assert_one_error_line(runner.invoke(main, ["report", str(path)]), str(path), "no schema_version")


def test_report_future_schema_version(runner, tmp_path, bench_run):
    data = strict_json((bench_run[1] / "tiny.json").read_text())
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**data, "schema_version": 99}))
    result = runner.invoke(main, ["report", str(path)])
    assert_one_error_line(result, f"error: {path}: schema_version 99 is not supported",
                          "reads versions 1, 2")
    assert not path.with_suffix(".md").exists()


def test_report_record_lacking_a_key(runner, tmp_path, bench_run):
    data = strict_json((bench_run[1] / "tiny.json").read_text())
    del data["records"][3]["status"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert_one_error_line(runner.invoke(main, ["report", str(path)]), str(path), "records[3] lacks key 'status'")


# ---- failures of an implementation are results, not crashes ----------------------------------

def _bench_small(runner, tmp_path, *extra):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_CONFIG)
    out = tmp_path / "out"
    result = runner.invoke(main, ["bench", str(path), "--out", str(out), "--no-progress", *extra])
    return result, out, parse_config(SMALL_CONFIG, str(path))


def _replace_impl(monkeypatch, loss, name, fn):
    old = LOSSES[loss].implementations[name]
    monkeypatch.setitem(LOSSES[loss].implementations, name, Impl(old.name, old.kind, fn, old.summary))
    return old


def test_implementation_raising_is_an_error_record_and_the_sweep_goes_on(runner, tmp_path, monkeypatch):
    real = LOSSES["bce"].implementations["naive"].fn

    def flaky(x, t, reduction="mean"):
        if x.dtype == torch.float16:
            raise RuntimeError("half precision is not supported\nsecond line")
        return real(x, t, reduction)

    _replace_impl(monkeypatch, "bce", "naive", flaky)
    result, out, cfg = _bench_small(runner, tmp_path, "--threads", "1")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    data = results.load(out / "small.json")
    records = data["records"]
    assert len(records) == sweep.count_points(cfg) == 12
    assert data["environment"]["threads"] == 1
    errors = [r for r in records if r["status"] == "error"]
    assert {(r["impl"], r["dtype"]) for r in errors} == {("naive", "float16")}
    assert len(errors) == 2  # both scales
    for r in errors:
        assert r["message"].startswith("RuntimeError: half precision is not supported (at test_cli.py:")
        assert "\n" not in r["message"] and r["forward"] is None
    assert all(r["status"] == "ok" for r in records if r not in errors)
    assert "12 points (10 ok, 2 error, 0 skipped)" in result.stdout
    md = (out / "small.md").read_text()
    errors_section = md.split("## Errors", 1)[1].split("\n## ", 1)[0]
    assert "RuntimeError: half precision is not supported" in errors_section
    assert "bce/naive/float16/cpu" in errors_section


@pytest.mark.parametrize("bad_shape", [(), (8, 1)], ids=["scalar", "column"])
def test_implementation_returning_the_wrong_shape_is_an_error_naming_the_shape(
        runner, tmp_path, monkeypatch, bad_shape):
    real = LOSSES["bce"].implementations["stable"].fn

    def wrong(x, t, reduction="mean"):
        out = real(x, t, reduction)
        if reduction != "none":
            return out
        return out.sum() if bad_shape == () else out.reshape(bad_shape)

    _replace_impl(monkeypatch, "bce", "stable", wrong)
    result, out, _ = _bench_small(runner, tmp_path)
    assert result.exit_code == 0, result.stderr
    records = results.load(out / "small.json")["records"]
    stable = [r for r in records if r["impl"] == "stable"]
    assert len(stable) == 4 and all(r["status"] == "error" for r in stable)
    for r in stable:
        assert r["message"].startswith(
            f"ImplementationError: reduction='none' returned shape {bad_shape}, expected (8,)"), r["message"]
    assert all(r["status"] == "ok" for r in records if r["impl"] != "stable")
    assert f"returned shape {bad_shape}" in (out / "small.md").read_text()


def test_interrupted_sweep_writes_the_finished_points(runner, tmp_path, monkeypatch):
    real = sweep.run_case
    calls = []

    def interrupting(*args, **kwargs):
        if len(calls) == 2:  # after two cases (2 x 3 implementations)
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_case", interrupting)
    result, out, _ = _bench_small(runner, tmp_path)
    assert result.exit_code == 130, (result.stdout, result.stderr)
    assert "interrupted: writing the 6 finished points" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith("6 points (6 ok, 0 error, 0 skipped) -> ")
    text = (out / "small.json").read_text()
    data = strict_json(text)
    assert data["complete"] is False
    assert len(data["records"]) == 6 and all(r["status"] == "ok" for r in data["records"])
    assert results.load(out / "small.json")["complete"] is False
    assert "**Incomplete run**" in (out / "small.md").read_text()


def test_a_failing_reference_is_an_error_at_its_points_and_the_sweep_goes_on(runner, tmp_path, monkeypatch, tiny_config_text):
    # Regression guard: an exception in our own reference (a bug) must be recorded at the
    # points it concerns, not abort the sweep and lose what was measured.
    import dataclasses

    from losscheck import losses
    from losscheck.losses import bce

    def broken(x, t):
        raise FloatingPointError("boom in reference")

    monkeypatch.setitem(losses.LOSSES, "bce", dataclasses.replace(bce.LOSS, reference_chunk=broken))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config_text)
    result = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    cpu = [r for r in data["records"] if r["device"] == "cpu"]
    bad = [r for r in cpu if r["loss"] == "bce"]
    assert bad and all(r["status"] == "error" and "boom in reference" in r["message"] for r in bad)
    assert all(r["status"] == "ok" for r in cpu if r["loss"] != "bce")


# ---- explain and list (issue: options, explain) ------------------------------------------------

def test_explain_prints_the_live_breakdown(runner):
    result = runner.invoke(main, ["explain", "bce_with_logits", "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    for section in ("## 1. The loss", "## 3. Why it breaks", "## 4.", "## 5. The gradient"):
        assert section in result.stdout
    assert "measured now by a losscheck sweep" in result.stdout


@pytest.mark.parametrize("args,fragment", [
    (["explain", "hinge"], "unknown loss 'hinge'"),
    (["explain", "bce", "--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_explain_bad_input_is_one_line(runner, args, fragment):
    assert_one_error_line(runner.invoke(main, args), fragment)


def test_bench_loss_filter_refuses_a_loss_outside_the_config(runner, tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL_CONFIG)
    result = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path), "--loss", "cross_entropy"])
    assert_one_error_line(result, "--loss cross_entropy: not among the config's losses (bce)")


def test_list_shows_every_option_axis(runner):
    result = runner.invoke(main, ["list"])
    assert result.exit_code == 0
    for key in ("weights", "pos_weights", "label_smoothing", "ignored", "targets", "reductions",
                "sequence_lengths", "sequence_cross_entropy", "--impl"):
        assert key in result.stdout, key
