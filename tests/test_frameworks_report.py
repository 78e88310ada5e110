"""The report's comparison of the framework families point by point (losscheck/report_families.py,
issue 14 "Done when": who breaks where, who is faster), shown only when two or more ran."""
from __future__ import annotations

import math
import textwrap
from collections import Counter

import pytest
from click.testing import CliRunner
from test_findings import rec

from losscheck import analysis as A, report, report_families as RFam, results
from losscheck.cli import main

BROKEN = {"value": 0.0, "reference": 2.64e-4, "reduced_ulp": 2.0**40, "underflow": 2}  # optax #1020 at bfloat16
TIMED = 0.002


def _ce(impl, dtype="bfloat16", scale=20.0, dist="dominant_target", fwd=None, seconds=None, kind=None, **kw):
    kw = {"classes": 128256, "batch": 2, **kw}
    kind = kind or ("framework" if impl not in ("naive", "stable") else impl)
    r = rec(impl, kind, dtype=dtype, scale=scale, dist=dist,
            fwd=fwd, loss="cross_entropy", **kw)
    if seconds is not None:
        r["timing"] = {"forward_median_s": seconds / 3, "backward_median_s": seconds, "threads": 1}
    return r


def _render(records) -> str:
    return report.render({"config": {"name": "t"}, "records": records, "findings": []})


def test_no_section_with_a_single_framework_family():
    records = [_ce("torch"), _ce("stable", fwd=BROKEN)]
    assert RFam.section(A.labelled(records)) == ""
    assert "Framework families point by point" not in _render(records)


def test_who_breaks_where_the_others_hold():
    records = [
        _ce("torch"), _ce("torch_compile"), _ce("jax", fwd=BROKEN),  # #1020: jax alone breaks
        _ce("torch", scale=1.0), _ce("torch_compile", scale=1.0), _ce("jax", scale=1.0),  # all hold
        # All three break here: not a difference between them, not listed.
        *(_ce(f, dist="extreme", scale=1000.0, fwd={"nan": 1}) for f in ("torch", "torch_compile", "jax")),
        # torch and torch_compile break where jax holds (float32, another value set); jax's point
        # at a second shape holds too.
        _ce("torch", "float32", fwd={"inf": 1}, dist="masked", scale=1.0),
        _ce("torch_compile", "float32", fwd={"inf": 1}, dist="masked", scale=1.0),
        _ce("jax", "float32", dist="masked", scale=1.0),
        _ce("jax", "float32", dist="masked", scale=1.0, batch=8, classes=2),  # measured by jax alone
        _ce("stable", fwd=BROKEN),  # not a framework family: never in this section
        _ce("mine", kind="custom", fwd=BROKEN),
    ]
    labelled = A.labelled(records)
    assert RFam.frameworks(labelled) == ["torch", "torch_compile", "jax"]
    shared, split = RFam.disagreements(labelled, RFam.frameworks(labelled))
    assert len(shared) == 4 and len(split) == 2
    text = RFam.section(labelled)
    assert "- `jax` breaks where `torch` holds at 1 point (cross_entropy)." in text
    assert "- `jax` breaks where `torch_compile` holds at 1 point (cross_entropy)." in text
    assert "- `torch` breaks where `jax` holds at 1 point (cross_entropy)." in text
    assert "`torch` breaks where `torch_compile`" not in text and "`stable`" not in text and "mine" not in text
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| cross_entropy")}
    assert set(rows) == {"dominant_target", "masked"}  # the extreme points, where all break, are not rows
    assert "All the families measured there break at 1 point (cross_entropy)." in text
    dom = rows["dominant_target"]
    assert dom[:4] == ["cross_entropy", "bfloat16", "dominant_target", "1"]
    assert dom[4:6] == ["holds", "holds"] and dom[6].startswith("**breaks** at 20: mean ")
    masked = rows["masked"]
    # masked was swept at two shapes (jax's second one alone): the cells say which.
    assert masked[4] == masked[5] == "**breaks** at 1 (N=2, C=128256): fwd non-finite" and masked[6] == "holds"


def test_families_that_break_at_the_same_points_are_said_to():
    records = [_ce(f, fwd=BROKEN) for f in ("torch", "jax")] + [_ce(f, scale=1.0) for f in ("torch", "jax")]
    text = RFam.section(A.labelled(records))
    assert "At all 2 points measured by two or more of them, they break at the same points. " \
           "All the families measured there break at 1 point (cross_entropy)." in text


def test_who_is_faster_per_loss_and_dtype():
    records = [
        _ce("torch", scale=1.0, dist="normal", seconds=TIMED),
        _ce("torch_compile", scale=1.0, dist="normal", seconds=TIMED / 2),
        _ce("jax", scale=1.0, dist="normal", seconds=TIMED * 3),
        _ce("torch", "float32", scale=1.0, dist="normal", seconds=TIMED),
        _ce("jax", "float32", scale=1.0, dist="normal", seconds=TIMED / 4),
        _ce("torch_compile", "float32", scale=1.0, dist="normal"),  # not timed there
    ]
    text = RFam.speed(A.labelled(records), ["torch", "torch_compile", "jax"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| cross")]
    assert rows == [
        ["cross_entropy", "float32", "1", "2 ms", "—", "×0.25", "jax"],
        ["cross_entropy", "bfloat16", "1", "2 ms", "×0.5", "×3", "torch_compile"],
    ]


def test_compile_time_is_summed_and_said_to_be_out_of_the_times():
    records = [_ce("torch"), _ce("torch_compile", compile={"seconds": 1.5, "graphs": 3}),
               _ce("torch_compile", scale=1.0, compile={"seconds": 0.0, "graphs": 0}), _ce("torch", scale=1.0)]
    text = RFam.section(A.labelled(records))
    assert "`torch_compile` compiled at 1 point, 1.5 s in all, kept out of its times." in text


def test_the_bench_report_compares_the_families_it_ran(tmp_path):
    """Through `losscheck bench`: the section's lines are what the records say, point by point.
    float64 at a dominant target logit of 20 among 9 zeros: optax's log-sum-exp loses
    log1p(9·e^−20) entirely (0 for 1.9e-8), torch's does not."""
    pytest.importorskip("optax")
    cfg = tmp_path / "f.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: f
        losses: [cross_entropy]
        implementations: [stable, torch, jax]
        scales: [1, 20]
        batch_sizes: [2]
        classes: [10]
        dtypes: [float64, bfloat16]
        devices: [cpu]
        distributions: [normal, dominant_target]
        timing: {min_run_time: 0.01}
        """))
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path), "--no-progress", "--no-plots",
                                       "--threads", "1"])
    assert result.exit_code == 0, (result.output, result.stderr)
    text = (tmp_path / "f.md").read_text()
    records = results.load(tmp_path / "f.json")["records"]
    at = {(r["impl"], r["dtype"], r["distribution"], r["scale"]): r for r in records}
    pairs = Counter()
    for (impl, *point), r in at.items():
        other = "torch" if impl == "jax" else "jax"
        if impl in ("torch", "jax") and A.breaks(r) and not A.breaks(at[(other, *point)]):
            pairs[(impl, other)] += 1
    assert pairs[("jax", "torch")] >= 1  # float64, dominant_target, scale 20
    for (a, b), n in pairs.items():
        assert f"- `{a}` breaks where `{b}` holds at {n} point" in text
    assert text.count("breaks where") == len(pairs)
    mine = text.split("## Framework families point by point", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in mine.splitlines() if line.startswith("| cross")]
    [row] = [r for r in rows if r[1:3] == ["float64", "dominant_target"]]
    assert row[4] == "holds" and row[5].startswith("**breaks** at 20: mean ")
    timed = [r for r in rows if r[2].isdigit()]  # the time table (the other names a value set there)
    assert [r[1] for r in timed] == ["float64", "bfloat16"]  # each timed on normal inputs at scales 1 and 20
    for r in timed:
        assert r[2] == "2" and r[4].startswith("×") and r[5] in ("torch", "jax")
        assert math.isfinite(float(r[4].lstrip("×")))
