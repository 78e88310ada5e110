"""Reports that scale with the sweep (issue 17 item 4): the main page stays small however
many variants a sweep has, every point stays reachable on some page, findings are grouped,
names are escaped (issue 16 item 8), and results files may be gzip-compressed."""
from __future__ import annotations

import copy
import gzip
import re
from pathlib import Path

import pytest

from losscheck import findings, report, results
from losscheck.cli import main

DATA = Path(__file__).parent / "data"
SMALL = DATA / "small_results.json"
GALLERY_OPTIONS = Path(__file__).parent.parent / "reports" / "options.json"


def _variants(res: dict, n: int) -> dict:
    """`res` swept over n made-up option variants per loss (the numbers of each point kept):
    a sweep the size of the options gallery or bigger, without running one."""
    big = copy.deepcopy(res)
    big["records"] = [{**copy.deepcopy(r), "options": {"label_smoothing": i / 1000}}
                      for i in range(n) for r in res["records"]]
    big["findings"] = findings.findings(big["records"])
    return big


def _cells(md: str) -> int:
    """Filled implementation cells of the per-point tables (one per measured point)."""
    count = 0
    for block in md.split("<details><summary>All ")[1:]:
        for line in block.split("</details>", 1)[0].splitlines()[6:]:  # after the header
            if line.startswith("| "):
                count += sum(1 for c in _split_row(line)[6:] if c.strip())
    return count


def _split_row(line: str) -> list[str]:
    # Cells of a Markdown table row: split at `|` not escaped with a backslash.
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


@pytest.fixture(scope="module")
def big(tiny_results) -> dict:
    return _variants(tiny_results, 80)


def test_big_sweep_main_page_is_small_and_every_point_is_on_a_page(big, tiny_results):
    ok = sum(r["status"] == "ok" for r in big["records"])
    one_page = report.render(big)
    assert len(one_page.encode()) > report.PAGE_BUDGET  # big enough to be split: the test means something
    pages = report.pages(big, "big")
    main_page = pages.pop("big.md")
    assert len(main_page.encode()) <= 100_000, len(main_page.encode())
    losses = {r["loss"] for r in tiny_results["records"] if r["status"] == "ok"}
    assert set(pages) == {f"big-{loss}.md" for loss in losses}
    for name in pages:
        assert f"]({name})" in main_page  # linked from the main page
    # Nothing lost: every measured point has its cell on one of the loss pages, and none twice.
    assert sum(_cells(text) for text in pages.values()) == ok == _cells(one_page)
    assert _cells(main_page) == 0


def test_main_page_grows_with_losses_not_with_variants(tiny_results, big):
    small_main = report.pages(_variants(tiny_results, 20), "x")["x.md"]
    big_main = report.pages(big, "x")["x.md"]
    # 4x the variants: the summary's size hardly moves (counts in it get longer by a digit).
    assert len(big_main) < 1.1 * len(small_main)


def test_first_screen_is_breakdown_then_findings_summary(big):
    main_page = report.pages(big, "big")["big.md"]
    heads = re.findall(r"^## (.+)$", main_page, re.MULTILINE)
    assert heads[:2] == ["Breakdown scale", "Findings"]
    summary = main_page.split("## Findings", 1)[1].split("\n## ", 1)[0]
    # One line per implementation and kind (plus one "no finding" line per implementation
    # and the cost lines), not one per variant.
    kinds = {(f["impl"], f["kind"]) for f in big["findings"]}
    lines = [line for line in summary.splitlines() if line.startswith("- **")]
    finding_lines = [line for line in lines if " — " in line]
    assert len(finding_lines) == len(kinds)
    for impl, kind in kinds:
        [line] = [x for x in finding_lines if x.startswith(f"- **{impl}** — {report.KIND_TEXT[kind]}: ")]
        n = sum(f["impl"] == impl and f["kind"] == kind for f in big["findings"])
        assert f": {n} finding{'s' if n != 1 else ''} in " in line
        assert "Worst: " in line


def test_grouped_summary_picks_the_smallest_breaking_scale_as_worst(tiny_results):
    res = copy.deepcopy(tiny_results)
    f = next(x for x in res["findings"] if x["impl"] == "naive")
    early = {**f, "kind": "overflow", "dtype": "float16", "evidence": {"points": 1, "first_scale": 3.0, "elements": 1}}
    late = {**f, "kind": "overflow", "dtype": "float32", "evidence": {"points": 9, "first_scale": 300.0, "elements": 99}}
    res["findings"] = [late, early]
    md = report.render(res)
    [line] = [x for x in md.splitlines() if x.startswith("- **naive** — **overflow**")]
    assert ": 2 findings in " in line and line.endswith("float16 from scale 3 (1 elements, 1 point).")


def _hostile(res: dict) -> dict:
    bad = copy.deepcopy(res)
    for r in bad["records"]:
        if r["impl"] == "stable":
            r["impl"], r["kind"] = "evil|name\n## Injected <b>x</b> `y`", "custom"
        if r["status"] == "error":
            r["message"] = "boom | \n# Heading"
    bad["findings"] = findings.findings(bad["records"])
    return bad


@pytest.mark.parametrize("source", ["small", "tiny"])
def test_names_and_messages_cannot_inject_markdown(source, tiny_results):
    res = _hostile(results.load(SMALL) if source == "small" else tiny_results)
    md = report.render(res)
    assert "Injected" in md
    for line in md.splitlines():
        assert not line.startswith(("## Injected", "# Heading")), line
        assert "<b>" not in line
    # Every table row has as many cells as its header: no `|` got through unescaped.
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|") and \
                set(lines[i + 1]) <= set("|-: "):
            width = len(_split_row(line))
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                assert len(_split_row(lines[j])) == width, lines[j]
                j += 1
    assert r"evil\|name \#\# Injected \<b\>x\</b\> \`y\`" in md


def test_md_escapes_what_would_be_markup():
    assert report.md("a|b\nc") == r"a\|b c"
    assert report.md("[x](http://e) <i> *a* `c`") == r"\[x\](http://e) \<i\> \*a\* \`c\`"
    assert report.md("naive") == "naive" and report.md("bce_with_logits") == "bce_with_logits"


# ---- .json.gz -----------------------------------------------------------------------------

def test_gz_round_trip_and_transparent_reading(tmp_path):
    data = results.load(SMALL)
    plain, packed = tmp_path / "small.json", tmp_path / "small.json.gz"
    results.save(data, plain)
    results.save(data, packed)
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and plain.read_bytes()[:1] == b"{"
    assert gzip.decompress(packed.read_bytes()).decode() == plain.read_text()
    assert len(packed.read_bytes()) < len(plain.read_bytes())
    assert results.load(packed) == results.load(plain)
    # Same results, same bytes (no timestamp in the gzip header): the file diffs as data.
    again = tmp_path / "again.json.gz"
    results.save(data, again)
    assert again.read_bytes() == packed.read_bytes()
    # By content, not name: a compressed file under a .json name is read all the same.
    renamed = tmp_path / "renamed.json"
    renamed.write_bytes(packed.read_bytes())
    assert results.load(renamed) == results.load(plain)


def test_commands_read_gz_and_name_the_report_without_json(runner, tmp_path):
    packed = tmp_path / "small.json.gz"
    results.save(results.load(SMALL), packed)
    out = runner.invoke(main, ["report", str(packed), "--no-plots"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "small.md").read_text() == report.render(results.load(SMALL))
    assert not (tmp_path / "small.json.md").exists()
    cmp = runner.invoke(main, ["compare", str(packed), str(packed)])
    assert cmp.exit_code in (0, 1), cmp.output
    assert (tmp_path / "small.compare.md").exists()
    base = tmp_path / "base.json.gz"
    assert runner.invoke(main, ["baseline", str(packed), "-o", str(base)]).exit_code == 0
    assert base.read_bytes()[:2] == b"\x1f\x8b"


def test_truncated_gz_is_a_one_line_error(runner, tmp_path):
    packed = tmp_path / "small.json.gz"
    results.save(results.load(SMALL), packed)
    packed.write_bytes(packed.read_bytes()[:40])
    out = runner.invoke(main, ["report", str(packed), "--stdout"])
    assert out.exit_code == 2
    assert out.stderr.startswith(f"error: {packed}: cannot read") and out.stderr.count("\n") == 1


@pytest.mark.skipif(not GALLERY_OPTIONS.exists(), reason="the committed options gallery is not here")
def test_options_gallery_main_page_is_at_most_100_kb():
    pages = report.pages(results.load(GALLERY_OPTIONS), "options")
    assert len(pages["options.md"].encode()) <= 100_000
    assert len(pages) > 1
