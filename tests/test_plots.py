"""Plots: valid images from a stored results file, --no-plots, a note without matplotlib,
and the cost finding backed by the timing data."""
from __future__ import annotations

import re
import statistics

import pytest

from losscheck import plots, report, results
from losscheck.cli import main

PIL = pytest.importorskip("PIL.Image")


def test_report_writes_valid_png_plots_linked_from_the_markdown(runner, tiny_results, tmp_path):
    path = tmp_path / "tiny.json"
    results.save(tiny_results, path)
    result = runner.invoke(main, ["report", str(path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "tiny.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md)
    losses = {r["loss"] for r in tiny_results["records"] if r["status"] == "ok"}
    assert {f"tiny-{loss}-accuracy.png" for loss in losses} <= set(links)
    # The tiny sweep times one size: a timing plot would be single dots, so there is none.
    for loss in losses:
        assert len({(r["batch"], r["classes"]) for r in tiny_results["records"]
                    if r.get("timing") and r["loss"] == loss}) == 1
    assert not any(link.endswith("-timing.png") for link in links)
    for link in links:
        with PIL.open(tmp_path / link) as image:
            image.verify()  # raises on a truncated or corrupt file
        with PIL.open(tmp_path / link) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_no_plots_writes_no_images(runner, tiny_results, tmp_path):
    path = tmp_path / "tiny.json"
    results.save(tiny_results, path)
    assert runner.invoke(main, ["report", str(path), "--no-plots"]).exit_code == 0
    assert not list(tmp_path.glob("*.png"))
    assert "## Plots" not in (tmp_path / "tiny.md").read_text()


def test_without_matplotlib_the_report_says_so(runner, tiny_results, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    path = tmp_path / "tiny.json"
    results.save(tiny_results, path)
    assert runner.invoke(main, ["report", str(path)]).exit_code == 0
    md = (tmp_path / "tiny.md").read_text()
    assert "matplotlib is not installed" in md and plots.INSTALL_HINT in md
    assert not list(tmp_path.glob("*.png"))


def test_cost_finding_matches_the_timing_data(tiny_results):
    md = report.render(tiny_results)
    sentences = re.findall(r"- Stability costs, (\w+): `stable` forward\+backward takes ×([\d.]+) to ×([\d.]+) "
                           r"the time of `torch` \(median ×([\d.]+) over (\d+) timed points\)", md)
    assert sentences
    ratios = report.cost_ratios(tiny_results["records"])
    for loss, lo, hi, med, n in sentences:
        expected = ratios[loss]
        # recomputed by hand from the records, not through the report's helper
        by_hand = []
        recs = [r for r in tiny_results["records"] if r["loss"] == loss and r["status"] == "ok" and r["timing"]]
        for s in (r for r in recs if r["impl"] == "stable"):
            t = next(r for r in recs if r["impl"] == "torch" and all(
                r[k] == s[k] for k in ("dtype", "device", "batch", "classes", "scale", "distribution")))
            by_hand.append(s["timing"]["backward_median_s"] / t["timing"]["backward_median_s"])
        assert sorted(by_hand) == sorted(expected) and int(n) == len(by_hand)
        assert f"{min(by_hand):.2f}" == lo and f"{max(by_hand):.2f}" == hi
        assert f"{statistics.median(by_hand):.2f}" == med


def test_timing_plot_only_with_two_sizes_and_bars_from_the_raw_times(tiny_results, tmp_path):
    import copy

    res = copy.deepcopy(tiny_results)
    timed = [r for r in res["records"] if r.get("timing") and r["loss"] == "bce"]
    assert timed and not plots._timing_figure(None, "x", timed, tmp_path / "none.png")  # one size: none
    bigger = [{**copy.deepcopy(r), "batch": 2 * r["batch"]} for r in timed]
    res["records"] += bigger
    written = {name: title for title, name in plots.write_plots(res, tmp_path, "two")}
    assert {n for n in written if n.endswith("-timing.png")} == {"two-bce-timing.png"}
    # The bars are the quartiles of the raw per-run times when the file has them.
    t = timed[0]["timing"]
    q1, med, q3 = plots._quartiles(t, "forward")
    runs = sorted(t["forward_times_s"])
    assert q1 <= med <= q3 and runs[0] <= q1 and q3 <= runs[-1]
    assert med == statistics.median(runs)
