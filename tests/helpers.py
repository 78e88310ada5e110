"""Assertions shared by the CLI tests."""
from __future__ import annotations

from click.testing import CliRunner

from losscheck import results
from losscheck.cli import main
from losscheck.losses import LOSSES

# Losses of one value per (N,) or (N, C) row; sequence losses (B, T, V) are tested in test_options.py,
# tensor outputs (log_softmax, one value per element) in test_nll_log_softmax.py, losses of several
# inputs (linear_cross_entropy: hidden states and classifier) in their own test file.
FLAT_LOSSES = {
    name: loss for name, loss in LOSSES.items() if not loss.sequence and not loss.elementwise and len(loss.inputs) == 1
}


def assert_one_error_line(result, *fragments):
    """Exit 2, exactly one line on stderr starting with `error:`, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def bench_results(tmp_path, config: str, *args) -> dict:
    """`losscheck bench` of the config text (written to tmp_path/c.yaml) with *args: the results
    file, after checking the exit code is 0 or 1 (gate verdicts), never an error."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots", *args])
    assert result.exit_code in (0, 1), result.output + result.stderr
    return results.load(out / f"{cfg.stem}.json")

