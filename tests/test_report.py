"""The Markdown report, rendered from stored results (the tiny sweep, and a handcrafted file)."""
from __future__ import annotations

import copy
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from losscheck import analysis, findings, report, results
from losscheck.cli import main
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES

DATA = Path(__file__).parent / "data"
SMALL = DATA / "small_results.json"


@pytest.fixture(scope="module")
def tiny_md(tiny_results) -> str:
    return report.render(tiny_results)


def tables(md: str) -> list[tuple[int, list[str], list[list[str]]]]:
    """Every GitHub table in `md`: (line index, header cells, rows of cells)."""
    lines = md.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            assert set("".join(block[1])) <= set("-:"), block[1]  # the separator line
            out.append((start, block[0], block[2:]))
        else:
            i += 1
    return out


def section(md: str, title: str) -> str:
    head = f"## {title}\n"
    assert head in md, title
    return md.split(head, 1)[1].split("\n## ", 1)[0].split("\n<details>", 1)[0]


def details(md: str) -> str:
    return md.split("<details>", 1)[1].split("</details>", 1)[0]


def evidence_of(md: str) -> str:
    """The findings evidence of a one-page report: the collapsed list under the summary."""
    return md.split("<summary>Evidence:", 1)[1].split("</details>", 1)[0]


def point_rows(md: str) -> list[dict]:
    """The per-point tables (one per loss label, collapsed) read back: one dict per point and
    implementation, with the four numbers of its cell."""
    out = []
    for block in md.split("<details><summary>All ")[1:]:
        [(_, header, rows)] = tables(block.split("</details>", 1)[0])
        for row in rows:
            for impl, cell in zip(header[6:], row[6:]):
                if cell:
                    numbers = cell.split(" · ")[0].split(" / ")
                    out.append({**dict(zip(header[:6], row[:6])), "impl": impl,
                                **dict(zip(["fwd max ulp", "fwd mean bits", "mean ulp", "bwd max ulp"], numbers))})
    return out


def run_records(res: dict) -> list[dict]:
    return [r for r in res["records"] if r["status"] != "skipped"]


def label(dtype: str, device: str) -> str:
    return dtype if device == "cpu" else f"{dtype}@{device}"


# ---- the breakdown table --------------------------------------------------------------------

def test_breakdown_table_is_the_first_table_and_precedes_the_accuracy_tables(tiny_md):
    first_line, header, _ = tables(tiny_md)[0]
    lines = tiny_md.splitlines()
    assert lines.index("## Breakdown scale") < first_line
    assert header == ["loss", "device", "dtype", "naive", "stable", "torch"]
    assert tiny_md.index("## Breakdown scale") < tiny_md.index("## Findings") < tiny_md.index("**Accuracy**")
    assert "## Breakdown scale" not in tiny_md.split("**Accuracy**", 1)[1]


def test_breakdown_lists_every_loss_device_dtype_that_was_run(tiny_results, tiny_md):
    _, header, rows = tables(tiny_md)[0]
    ran = {(r["loss"], r["device"], r["dtype"]) for r in run_records(tiny_results)}
    assert [tuple(row[:3]) for row in rows] == sorted(
        ran, key=lambda k: (list(LOSSES).index(k[0]), k[1], list(FORMATS).index(k[2])))
    assert len(rows) == len(ran) == 6 * (2 if torch.cuda.is_available() else 1)
    assert all(len(row) == len(header) for row in rows)


def test_breakdown_cells_match_analysis(tiny_results, tiny_md):
    _, header, rows = tables(tiny_md)[0]
    bd = analysis.breakdown_scales(run_records(tiny_results))
    for row in rows:
        loss, device, dtype = row[:3]
        for impl, cell in zip(header[3:], row[3:]):
            b = bd[(loss, impl, dtype, device)]
            assert b.status == "measured"
            expected = "none" if b.scale is None else f"**{report.fmt_scale(b.scale)}** ({b.reason})"
            assert cell == expected, (loss, impl, dtype, device)


def test_naive_bce_with_logits_breaks_at_100_where_stable_holds(tiny_md):
    _, header, rows = tables(tiny_md)[0]
    by_key = {(r[0], r[1], r[2]): dict(zip(header[3:], r[3:])) for r in rows}
    for dtype in ("float32", "float16"):
        cells = by_key[("bce_with_logits", "cpu", dtype)]
        assert re.fullmatch(r"\*\*100\*\* \(fwd non-finite\)", cells["naive"]), cells
        assert cells["stable"] == "none"
    findings = evidence_of(tiny_md)
    assert ("- **bce_with_logits / naive** — **overflow** (NaN/±inf elements where the reference is finite): "
            "float32 from scale 100 (") in findings
    assert "- **bce_with_logits / stable**: no finding (float32, float16" in findings


def test_skipped_cuda_points_are_one_line_not_rows(tiny_results, tiny_md):
    before_config = tiny_md.split("## Configuration", 1)[0]
    device_cells = [row[header.index("device")] for _, header, rows in tables(before_config)
                    if "device" in header for row in rows]
    assert "cpu" in device_cells
    notes = [line for line in tiny_md.splitlines() if line.startswith("> Not run on")]
    if torch.cuda.is_available():
        assert notes == [] and "cuda" in device_cells
    else:
        n = sum(r["device"] == "cuda" for r in tiny_results["records"])
        assert notes == [f"> Not run on **cuda**: CUDA is not available here ({n} points skipped)."]
        assert "cuda" not in device_cells
        assert "@cuda" not in section(tiny_md, "Findings")


# ---- findings: the rendered lines are the results file's `findings` list, and only it -----------

FINDING_LINE = re.compile(r"- \*\*(.+) / (.+?)\*\* — (.+?): (.+)\.")
NO_FINDING = re.compile(r"- \*\*(.+) / (.+?)\*\*: no finding \((.+)\)\.")
KIND_OF_TEXT = {text: kind for kind, text in report.KIND_TEXT.items()}


def parse_findings(md: str) -> tuple[set, dict]:
    """The findings section read back: {(loss label, impl, kind, dtype label)} and
    {(loss label, impl): [dtype labels]} of the "no finding" lines."""
    found, clean = set(), {}
    for line in evidence_of(md).splitlines():
        if not line.startswith("- "):  # the summary line and the intro
            continue
        if m := NO_FINDING.fullmatch(line):
            clean[(m[1], m[2])] = m[3].split(", ")
        elif m := FINDING_LINE.fullmatch(line):
            kind = KIND_OF_TEXT[m[3]]
            for part in m[4].split("; "):
                found.add((m[1], m[2], kind, part.split(" ", 1)[0]))
        else:
            assert line.startswith("- Stability costs"), f"unparsed finding line: {line}"
    return found, clean


def expected_lines(res: dict) -> tuple[set, dict]:
    """The same, from the stored list and the records, without the renderer."""
    found = set()
    for f in res["findings"]:
        loss = f"{f['loss']} [{f['variant']}]" if f["variant"] else f["loss"]
        impl = f"{f['impl']} (custom)" if f["impl_kind"] == "custom" else f["impl"]
        found.add((loss, impl, f["kind"], label(f["dtype"], f["device"])))
    clean = defaultdict(list)
    for r in analysis.labelled(run_records(res)):
        key = (r["loss"], r["impl"])
        if r["status"] == "ok" and not any(x[:2] == key for x in found) and \
                label(r["dtype"], r["device"]) not in clean[key]:
            clean[key].append(label(r["dtype"], r["device"]))
    return found, dict(clean)


def test_findings_section_is_the_stored_list(tiny_results, tiny_md):
    found, clean = parse_findings(tiny_md)
    assert (found, clean) == expected_lines(tiny_results)
    assert len(found) == len(tiny_results["findings"])  # one rendered entry per finding
    # The tiny sweep: naive forms overflow at scale 100, stable has no finding at all.
    assert ("bce_with_logits", "naive", "overflow", "float32") in found
    assert set(clean) >= {("bce", "stable"), ("bce_with_logits", "stable"), ("cross_entropy", "stable")}


def test_findings_section_renders_what_the_file_says_not_its_own_reasoning(tiny_results):
    # A results file whose list holds one (made-up) finding: that one is rendered, nothing
    # recomputed from the records.
    res = copy.deepcopy(tiny_results)
    f = next(x for x in res["findings"] if x["impl"] == "naive")
    res["findings"] = [{**f, "kind": "underflow", "dtype": "float16", "device": "cuda",
                        "evidence": {"points": 2, "first_scale": 30.0, "elements": 7}}]
    found, _ = parse_findings(report.render(res))
    assert found == {(f["loss"], "naive", "underflow", "float16@cuda")}
    assert "float16@cuda from scale 30 (7 elements, 2 points)" in report.render(res)


def test_findings_are_derived_for_files_without_them_and_render_the_same():
    res = results.load(SMALL)  # schema 1: no findings key, derived on load
    assert [(f["impl"], f["kind"], f["dtype"]) for f in res["findings"]] == [("naive", "overflow", "float32")]
    md = report.render(res)
    assert parse_findings(md) == expected_lines(res)
    assert ("- **bce_with_logits / naive** — **overflow** (NaN/±inf elements where the reference is finite): "
            "float32 from scale 1000 (4 elements, 1 point).") in md
    assert "- **bce_with_logits / stable**: no finding (float32)." in md
    # The same file rendered from a dict without the key (a caller's own dict) agrees.
    del res["findings"]
    assert report.render(res) == md


def test_findings_device_labels_and_custom_marks():
    res = results.load(SMALL)
    extra = []
    for r in res["records"]:
        if r["status"] == "ok":
            g = copy.deepcopy(r)
            g["device"] = "cuda"
            extra.append(g)
            h = copy.deepcopy(r)
            h["impl"], h["kind"] = "mine", "custom"
            extra.append(h)
    res["records"] += extra
    res["findings"] = findings.findings(res["records"])
    md = report.render(res)
    assert parse_findings(md) == expected_lines(res)
    assert ("float32 from scale 1000 (4 elements, 1 point); float32@cuda from scale 1000 (4 elements, 1 point)."
            in md)
    assert "- **bce_with_logits / mine (custom)** — **overflow**" in md


def test_rendered_bits_never_exceed_the_precision(tiny_results):
    # float64 mean 2^62 ULP off (issue 12: "mean 62 bits off"), a non-finite worst element.
    res = copy.deepcopy(tiny_results)
    ok = [r for r in res["records"] if r["status"] == "ok" and r["distribution"] != "nonfinite"]
    for r in ok[:4]:
        r["dtype"] = "float64"
        r["threshold_bits"] = 26.5
        r["forward"].update(reduced_ulp=2 ** 62, value=1.0, max_bits=62.0, max_ulp=2 ** 62)
    res["findings"] = findings.findings(res["records"])
    md = report.render(res)
    cap = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
    assert "mean all bits lost" in md and "mean 62 bits off" not in md
    for m in re.finditer(r"(\d+(?:\.\d+)?) bits (?:off|lost)", md):
        assert float(m[1]) <= max(cap.values()), m[0]
    # Every bits figure of an accuracy cell (bits / ULP / bits) stays below the dtype's precision.
    cells = [(row[1], cell) for _, header, rows in tables(md) if header[:3] == ["device", "dtype", "scale"]
             for row in rows for cell in row[3:] if cell.count(" / ") == 2]
    assert cells and any(cell.startswith("all bits lost / ") for d, cell in cells if d == "float64")
    for dtype, cell in cells:
        fb, _, bb = cell.split(" / ")
        for b in (fb, bb):
            assert b in ("all bits lost", "—") or float(b) < cap[dtype], (dtype, cell)


# ---- timing, non-finite values, determinism -----------------------------------------------

def test_timing_table_has_ratios_to_torch(tiny_results, tiny_md):
    timing = section(tiny_md, "Timing")
    [(_, header, rows)] = tables(timing)
    assert header == ["loss", "device", "dtype", "batch", "classes", "naive", "stable", "torch"]
    timed = [r for r in tiny_results["records"] if r["status"] == "ok" and r["timing"]]
    assert len(rows) == len({(r["loss"], r["device"], r["dtype"]) for r in timed})
    for row in rows:
        loss, device, dtype = row[:3]
        med = {impl: [r["timing"] for r in timed if (r["loss"], r["device"], r["dtype"], r["impl"]) ==
                      (loss, device, dtype, impl)] for impl in ("naive", "stable", "torch")}
        base_f = statistics.median(t["forward_median_s"] for t in med["torch"])
        base_b = statistics.median(t["backward_median_s"] for t in med["torch"])
        for impl, cell in zip(header[5:], row[5:]):
            if impl == "torch":
                assert "×" not in cell and cell
                continue
            f = statistics.median(t["forward_median_s"] for t in med[impl])
            b = statistics.median(t["backward_median_s"] for t in med[impl])
            assert cell.endswith(f"(×{f / base_f:.2f} / ×{b / base_b:.2f})"), cell


def test_nonfinite_values_render_as_inf_and_nan(tiny_results):
    res = copy.deepcopy(tiny_results)
    ok = [r for r in res["records"] if r["status"] == "ok"]
    ok[0]["forward"].update(max_ulp=math.nan, mean_bits=math.nan, reduced_ulp=math.inf, max_bits=math.inf)
    ok[0]["backward"].update(max_ulp=-math.inf, max_bits=math.nan)
    md = report.render(res)
    [row] = [p for p in point_rows(md) if p["fwd max ulp"] == "nan"]
    assert (row["dtype"], row["distribution"], row["impl"]) == (ok[0]["dtype"], ok[0]["distribution"], ok[0]["impl"])
    assert (row["fwd max ulp"], row["fwd mean bits"], row["mean ulp"], row["bwd max ulp"]) == \
        ("nan", "nan", "inf", "-inf")
    # The naive overflow of the sweep itself shows as inf in the accuracy table.
    acc = section(report.render(tiny_results), "bce_with_logits").split("**Overflow**")[0]
    assert "all bits lost / inf" in acc


@pytest.mark.parametrize("value, text", [(math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan"), (None, "—"),
                                         (3.0, "3"), (7, "7"), (0.123456, "0.123"), (1e7, "1e+07")])
def test_fmt_num(value, text):
    assert report.fmt_num(value) == text


@pytest.mark.parametrize("value, text", [(1.0, "1"), (100.0, "100"), (2.5, "2.5"), (1e4, "1e4"), (3e5, "3e5"),
                                         (12345.0, "1.2345e4"), (None, "—")])
def test_fmt_scale(value, text):
    assert report.fmt_scale(value) == text


def test_rendering_is_deterministic_and_leaves_the_results_alone(tiny_results):
    before = results.dumps(tiny_results)
    first = report.render(tiny_results)
    assert report.render(tiny_results) == first
    assert report.render(copy.deepcopy(tiny_results)) == first
    assert results.dumps(tiny_results) == before
    assert first.endswith("\n") and not first.endswith("\n\n")


def test_incomplete_results_are_marked(tiny_results):
    res = {**tiny_results, "complete": False}
    assert "**Incomplete run**" in report.render(res)
    assert "**Incomplete run**" not in report.render(tiny_results)


def test_only_skipped_points_still_render(tiny_results):
    res = {**tiny_results, "records": [{**r, "status": "skipped", "message": "not here", "forward": None,
                                        "backward": None, "timing": None} for r in tiny_results["records"][:6]]}
    md = report.render(res)
    assert md.startswith("# losscheck report: tiny")
    assert "(6 points skipped)" in md and "## Findings" not in md and "## Timing" not in md


# ---- the handcrafted results file ------------------------------------------------------------

def test_handcrafted_file_is_strict_json():
    def no_constant(name):
        raise ValueError(name)
    data = json.loads(SMALL.read_text(), parse_constant=no_constant)
    assert data["schema_version"] == 1
    assert {r["status"] for r in data["records"]} == {"ok", "error", "skipped"}


def test_cli_report_renders_the_handcrafted_file(runner, tmp_path):
    result = runner.invoke(main, ["report", str(SMALL), "--stdout"])
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    md = result.stdout
    assert md == report.render(results.load(SMALL))
    assert md.startswith("# losscheck report: small\n")
    assert "7 points (4 ok, 2 error, 1 skipped)" in md
    assert "> Not run on **cuda**: CUDA is not available here (1 point skipped)." in md
    _, header, rows = tables(md)[0]
    assert rows == [["bce_with_logits", "cpu", "float32", "**1000** (fwd non-finite)", "none", "error"]]
    errors = section(md, "Errors")
    [(_, eh, erows)] = tables(errors)
    assert erows == [["error", "2", "RuntimeError: handcrafted failure (at fake.py:7)",
                      "bce_with_logits/torch/float32/cpu"]]
    # max_ulp stored as the string "inf" comes back as inf in the accuracy and per-point tables.
    acc = section(md, "bce_with_logits").split("**Overflow**")[0]
    assert "| all bits lost / inf / all bits lost" in acc
    assert "50% / 50%" in section(md, "bce_with_logits")
    broken = [p for p in point_rows(md) if p["scale"] == "1000" and p["impl"] == "naive"]
    assert broken[0]["fwd max ulp"] == "inf" and broken[0]["mean ulp"] == "inf"
    # Timing: no torch measurement, so no ratio.
    assert "×" not in section(md, "Timing")
    # Writing the file instead of printing it gives the same text.
    out = tmp_path / "small.md"
    assert runner.invoke(main, ["report", str(SMALL), "-o", str(out), "--no-plots"]).exit_code == 0
    assert out.read_text() == md


# ---- what the findings are checked against: analysis.breaks / breakdown_scales ---------------

def _ok_record(scale=1.0, **forward):
    rec = copy.deepcopy(next(r for r in results.load(SMALL)["records"]
                             if r["impl"] == "stable" and r["scale"] == 1.0))
    rec["scale"] = scale
    rec["forward"].update(forward)
    return rec


def test_breaks_follows_the_metrics_definition():
    threshold_ulp = 2.0 ** 12 - 1  # float32: half of 24 bits
    assert analysis.breaks(_ok_record()) is None
    # Any non-finite element counts, even when the mean happens to be finite.
    assert analysis.breaks(_ok_record(inf=1)) == "fwd non-finite"
    assert analysis.breaks(_ok_record(nan=1)) == "fwd non-finite"
    assert analysis.breaks(_ok_record(value=math.inf)) == "mean non-finite"
    # ... but an infinite mean where the reference is infinite too is exact.
    assert analysis.breaks(_ok_record(value=math.inf, reference=math.inf)) is None
    bwd = _ok_record()
    bwd["backward"]["nan"] = 3
    assert analysis.breaks(bwd) == "bwd non-finite"
    assert analysis.breaks(_ok_record(reduced_ulp=threshold_ulp)) is None
    assert analysis.breaks(_ok_record(reduced_ulp=threshold_ulp + 1)) == "mean 12 bits off"
    assert analysis.breaks({**_ok_record(inf=1), "status": "error"}) is None


def test_breakdown_scale_is_the_smallest_breaking_scale():
    recs = [_ok_record(1.0), _ok_record(1000.0, inf=1), _ok_record(30.0, reduced_ulp=1e6), _ok_record(10.0)]
    [(key, b)] = analysis.breakdown_scales(recs).items()
    assert key == ("bce_with_logits", "stable", "float32", "cpu")
    assert (b.scale, b.reason, b.status) == (30.0, "mean 20 bits off", "measured")
    assert analysis.breakdown_scales(recs[:1] + recs[3:])[key].scale is None
    err = {**recs[0], "status": "error", "message": "boom"}
    assert analysis.breakdown_scales([err])[key] == analysis.Breakdown(None, "boom", "error")


def test_committed_quick_report_findings_render_from_the_derived_list():
    # An earlier gallery's quick.json (gzip: read transparently), with infinite logits: findings
    # derived on load where absent, rendered as listed.
    data = results.load(Path(__file__).parent / "data" / "quick_gallery_v3.json.gz")
    assert any(r["distribution"] in analysis.SCALE_FREE for r in data["records"])
    found, _ = parse_findings(report.render(data))
    assert (found, _) == expected_lines(data)
    kinds = {k for _, _, k, _ in found}
    assert {"overflow", "saturation", "limit"} <= kinds
    assert not any(i == "stable" for _, i, _, _ in found)
    assert not any(i == "torch" and k == "formula" for _, i, k, _ in found)
