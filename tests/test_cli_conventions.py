"""CLI conventions (issue 17, item 5): --json summaries, -q/-v, output-option aliases, help text."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from losscheck import summaries
from losscheck.cli import main
from losscheck.config import BUILTIN_IMPLS

SMALL = Path(__file__).parent / "data" / "small_results.json"

# Two losses' worth of points in a second: bce at a scale where naive overflows, untimed.
CONFIG = """\
name: conv
losses: [bce]
implementations: [naive, stable, torch]
scales: [1, 100]
batch_sizes: [8]
dtypes: [float32]
devices: [cpu, cuda]
distributions: [normal]
timing: false
"""


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "conv.yaml"
    path.write_text(CONFIG)
    return path


def _regressed(tmp_path) -> tuple[Path, Path, dict]:
    """The small results as baseline, and a copy in which one point lost 5 more bits."""
    baseline = tmp_path / "baseline.json"
    shutil.copy(SMALL, baseline)
    data = json.loads(SMALL.read_text())
    worse = copy.deepcopy(data)
    record = next(r for r in worse["records"] if r["status"] == "ok")
    record["forward"]["max_bits"] += 5
    current = tmp_path / "current.json"
    current.write_text(json.dumps(worse))
    return baseline, current, record


def test_bench_json_counts_points_by_status_with_paths(runner, tmp_path, config):
    result = runner.invoke(main, ["bench", str(config), "--output-dir", str(tmp_path / "o"), "--no-plots", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is the JSON and nothing else
    written = json.loads((tmp_path / "o" / "conv.json").read_text())["records"]
    assert data["points"] == len(written) == 12  # 2 scales x 3 implementations x 2 devices
    assert data["status"] == {s: sum(r["status"] == s for r in written) for s in ("ok", "error", "skipped")}
    assert sum(data["status"].values()) == data["points"]
    assert data["results"] == str(tmp_path / "o" / "conv.json") and Path(data["report"]).exists()
    assert data["complete"] is True and data["gate"] is None

    # Gated against itself: the verdict is in the same object, and no Markdown reaches stdout.
    gated = runner.invoke(main, ["bench", str(config), "-o", str(tmp_path / "g"), "--no-plots", "--json",
                                 "--baseline", data["results"]])
    assert gated.exit_code == 0, gated.stderr
    gate = json.loads(gated.stdout)["gate"]
    assert gate["verdict"] == "pass" and gate["regressions"] == 0 and gate["compared"] == data["points"]


def test_compare_json_names_the_regression_and_exits_1(runner, tmp_path):
    baseline, current, record = _regressed(tmp_path)
    result = runner.invoke(main, ["compare", str(baseline), str(current), "--json"])
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["verdict"] == "regression" and data["failed"] is True and data["regressions"] >= 1
    point = data["regression_points"][0]
    assert point["gate"] == "accuracy" and isinstance(point["options"], dict)
    assert {k: point[k] for k in ("loss", "impl", "dtype", "scale")} == {k: record[k] for k in ("loss", "impl", "dtype", "scale")}
    assert data["comparison"] == str(current.with_suffix(".compare.md")) and Path(data["comparison"]).exists()

    same = runner.invoke(main, ["compare", str(baseline), str(baseline), "--json", "-o", str(tmp_path / "c.md")])
    assert same.exit_code == 0
    assert json.loads(same.stdout)["verdict"] == "pass" and (tmp_path / "c.md").exists()


@pytest.mark.parametrize("flags", [["-q", "compare"], ["compare", "-q"]])
def test_quiet_compare_prints_the_verdict_line_only(runner, tmp_path, flags):
    baseline, current, _ = _regressed(tmp_path)
    args = [*flags, str(baseline), str(current)]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [result.stdout.strip()] and result.stdout.startswith("gate: regression:")
    assert result.stderr == ""
    assert runner.invoke(main, ["-q", "compare", "-q", str(baseline), str(current)]).stdout == ""
    plain = runner.invoke(main, ["compare", str(baseline), str(current)])  # the Markdown, and only it
    assert plain.stdout == current.with_suffix(".compare.md").read_text() and "gate: " not in plain.stdout


def test_verbosity_of_bench(runner, tmp_path, config):
    out = str(tmp_path / "o")
    loud = runner.invoke(main, ["bench", str(config), "--out", out, "--no-plots", "-v"])
    assert loud.exit_code == 0, loud.stderr
    point_lines = [line for line in loud.stderr.splitlines() if line.startswith("bce ")]
    assert len(point_lines) == 12
    assert all(re.search(r" (cpu|cuda) batch 8 scale (1|100) normal: (ok|error|skipped)", line) for line in point_lines)
    quiet = runner.invoke(main, ["bench", str(config), "--out", out, "--no-plots", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout.startswith("12 points (") and quiet.stdout.count("\n") == 1
    silent = runner.invoke(main, ["-q", "bench", str(config), "--out", out, "--no-plots", "-q"])
    assert silent.exit_code == 0 and silent.stdout == ""


def test_output_aliases_write_where_asked(runner, tmp_path):
    small = tmp_path / "small.json"
    shutil.copy(SMALL, small)
    for flag in ("-o", "--output", "--out"):
        target = tmp_path / f"r{flag.strip('-')}.md"
        result = runner.invoke(main, ["report", str(small), flag, str(target), "--no-plots"])
        assert result.exit_code == 0 and target.read_text().startswith("#"), flag
    result = runner.invoke(main, ["-q", "baseline", str(small), "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 0 and json.loads((tmp_path / "b.json").read_text())["records"]


def test_help_gives_examples_and_exit_codes(runner):
    bench = runner.invoke(main, ["bench", "--help"]).stdout
    assert "Examples:" in bench and "Exit codes:" in bench and "130" in bench
    compare = runner.invoke(main, ["compare", "--help"]).stdout
    assert "Exit codes:" in compare and "--json" in compare
    explain = runner.invoke(main, ["explain", "--help"]).stdout
    assert "CPU threads for the live breakdown sweep" in explain


def test_builtin_kinds_are_the_registrys():
    from losscheck.losses import LOSSES, implementation

    for loss in LOSSES.values():
        assert {i: implementation(loss, i).kind for i in BUILTIN_IMPLS} == summaries.BUILTIN_KINDS, loss.name
    listed = {loss["name"] for loss in summaries.inventory()["losses"]}
    assert listed == set(LOSSES)
