"""Progress lines off a terminal: a line per tenth of the points or per minute, with an ETA."""
from __future__ import annotations

import io

from losscheck.progress import LogLines, duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_per_tenth_of_the_points():
    out, clock = io.StringIO(), Clock()
    with LogLines(20, "quick", out, clock=clock) as bar:
        for i in range(20):
            clock.t += 1.0
            bar.update(1, {"status": "error" if i == 3 else "ok"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "quick: 20 points to run"
    assert len(lines) == 1 + 10  # 2, 4, ..., 20
    assert lines[1] == "quick: 2/20 points (10%), 2 s elapsed, about 18 s left"
    assert lines[2] == "quick: 4/20 points (20%), 1 error(s), 4 s elapsed, about 16 s left"
    assert lines[-1] == "quick: 20/20 points (100%), 1 error(s), 20 s elapsed"


def test_a_line_per_minute_when_points_are_slow():
    out, clock = io.StringIO(), Clock()
    with LogLines(1000, "options", out, clock=clock) as bar:
        for _ in range(5):
            clock.t += 30.0
            bar.update(1)
    lines = out.getvalue().splitlines()[1:]
    # Points 2 and 4 come 60 s after the previous line; 100 points (a tenth) never come.
    assert lines == ["options: 2/1000 points (0%), 1 min 00 s elapsed, about 8 h 19 min left",
                     "options: 4/1000 points (0%), 2 min 00 s elapsed, about 8 h 18 min left"]


def test_duration():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3725)] == ["0 s", "59 s", "1 min 01 s", "59 min 59 s",
                                                                 "1 h 02 min"]


def test_bench_off_a_terminal_prints_progress_lines(tmp_path):
    from click.testing import CliRunner

    from losscheck.cli import main

    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: p\nlosses: [bce]\nimplementations: [torch]\nscales: [1, 10]\nbatch_sizes: [8]\n"
                   "dtypes: [float32]\ndistributions: [normal]\ntiming: {enabled: false}\n")
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path), "--no-plots"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "p: 2 points to run"
    assert lines[1].startswith("p: 1/2 points (50%), ") and lines[2].startswith("p: 2/2 points (100%), ")
