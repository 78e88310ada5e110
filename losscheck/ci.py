"""The regression gate around files: load the baseline, compare, write the outputs.

Outputs: the Markdown comparison (returned, and written to a file), appended to
$GITHUB_STEP_SUMMARY when that is set, and JUnit XML when asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import results
from .compare_report import render_junit, render_markdown
from .errors import LosscheckError
from .gate import Comparison, GatePolicy, Remeasure, compare, policy_from_config, unstable_timings


def check(
    baseline_path: str | Path,
    current: dict,
    current_path: str | Path,
    overrides: dict,
    markdown_path: str | Path | None = None,
    junit_path: str | Path | None = None,
    remeasure: Remeasure | None = None,
    allow_missing: bool = False,
    losses: tuple[str, ...] = (),
) -> tuple[Comparison, str]:
    """Compare, render, write. `remeasure`: re-times suspected slowdowns in this process
    (`bench --baseline`); without it (`compare` of two files) the first measurement decides.
    `losses`: the run was restricted to these (`bench --loss`): the baseline's other losses
    were not asked for, so they are not missing."""
    baseline = results.load(baseline_path)
    if losses:
        baseline["records"] = [r for r in baseline["records"] if r["loss"] in losses]
    comparison, policy = judge(
        baseline, current, overrides, remeasure, allow_missing, (str(baseline_path), str(current_path))
    )
    comparison.selected_losses = tuple(losses)
    markdown = render_markdown(comparison, policy, str(baseline_path), str(current_path))
    # An output that cannot be written is an input error (exit 2), never a "regression".
    if markdown_path:
        _write(markdown_path, lambda p: results.write_atomic(p, markdown))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        _write(summary, lambda p: _append(p, markdown))
    if junit_path:
        _write(junit_path, lambda p: results.write_atomic(p, render_junit(comparison)))
    return comparison, markdown


def judge(
    baseline: dict,
    current: dict,
    overrides: dict,
    remeasure: Remeasure | None = None,
    allow_missing: bool = False,
    names: tuple[str, str] = ("baseline", "current"),
) -> tuple[Comparison, GatePolicy]:
    """The comparison of two results documents under `current`'s stored gate policy with
    `overrides` (None: the configured value), and that policy; `names` name them in errors.
    Shared by `check` (the commands) and `losscheck.compare` (the API)."""
    for name, data in zip(names, (baseline, current), strict=True):
        if data.get("complete") is False:
            raise LosscheckError(
                f"{name}: the run was interrupted (complete: false); the gate compares complete runs only"
            )
    policy = policy_from_config(current.get("config", {})).with_overrides(**overrides)
    comparison = compare(baseline, current, policy, remeasure, allow_missing)
    if baseline.get("config", {}).get("seed") != current.get("config", {}).get("seed"):
        comparison.env_differences["seed"] = (baseline["config"].get("seed"), current["config"].get("seed"))
    return comparison, policy


def _write(path, write) -> None:
    try:
        write(Path(path))
    except OSError as e:
        raise LosscheckError(f"{path}: cannot write: {e.__class__.__name__}: {e.strerror or e}") from None


def _append(path: Path, text: str) -> None:
    # Start on a line of its own, so that the heading stays a heading.
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_text(encoding="utf-8").endswith("\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if needs_newline else "") + text)


def accept(results_path: str | Path, baseline_path: str | Path) -> tuple[dict, list[str]]:
    """Copy a (validated, complete) results file to be the new baseline; with it, warnings
    for the timings the gate will not be able to judge (unstable ones: accepted all the same)."""
    data = results.load(results_path)
    if not data.get("complete", True):
        raise results.ResultsError(
            f"{results_path}: the run was interrupted (complete: false); a baseline must be a complete run"
        )
    versus = policy_from_config(data.get("config", {})).default.versus
    warnings = unstable_timings(data, versus)
    results.save(data, Path(baseline_path))
    return data, warnings
