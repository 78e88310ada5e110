"""Results -> Markdown (GitHub flavour). Renders from the results file alone.

The first screen answers "which implementation can I trust, at which logit size and
dtype": the breakdown table and the findings summary come first (a big sweep's breakdown
summarised per loss, its full table collapsed); plots, errors, the detail tables per loss,
configuration and environment follow.

A report that would be too big to read on one page (more than PAGE_BUDGET bytes) is
written as several: the main page NAME.md with the summaries, and one page per loss,
NAME-LOSS.md, holding that loss's full breakdown, findings evidence, tables and every
measured point, linked from the main page (`write`). `render` always returns one page.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from . import (
    analysis as A,
    findings as FD,
    report_detail as D,
    report_families as RFam,
    report_findings as RF,
    report_lm,
)
from .accumulate_section import section as accumulate_section
from .catalog import loss_registry
from .formats import FORMATS
from .report_format import (
    MAX_OPEN_ROWS,
    base_losses,
    collapsible,
    fmt_bits,
    fmt_num,
    fmt_scale,
    fmt_time,
    impls_of,
    label_dtype,
    md,
    order,
    plural,
    row_order,
    table,
)
from .results import STATUSES

# Re-exported: what callers of the report module have used.
KIND_TEXT, cost_ratios = RF.KIND_TEXT, RF.cost_ratios
__all__ = [
    "KIND_TEXT",
    "PAGE_BUDGET",
    "cost_ratios",
    "fmt_bits",
    "fmt_num",
    "fmt_scale",
    "fmt_time",
    "label_dtype",
    "md",
    "pages",
    "render",
    "write",
]

# Above this a report is split into a main page and a page per loss. GitHub shows Markdown
# files of up to about 1 MB, but a page the reader must scroll for minutes is not read.
PAGE_BUDGET = 90_000


def _prepare(results: dict):
    # Tables show what was run; points skipped as a whole device (or a platform without
    # a reference) are summarised in one line each under the header instead.
    # Every table groups by loss label: a loss with its variant (options, sequence length,
    # reduction) is a loss of its own in the report.
    all_records = A.labelled(results["records"])
    records = [r for r in all_records if r["status"] != "skipped"]
    found = results["findings"] if isinstance(results.get("findings"), list) else FD.findings(results["records"])
    return all_records, records, found


def render(results: dict, plots: list[tuple[str, str]] | str | None = None) -> str:
    """The whole report as one Markdown page (details in collapsed sections). `plots`: (title,
    relative file name) of figures written next to the report, or a note saying why there
    are none, or None for no plot section."""
    all_records, records, found = _prepare(results)
    return _main(results, all_records, records, found, plots, None)


def pages(results: dict, stem: str, plots: list[tuple[str, str]] | str | None = None) -> dict[str, str]:
    """File name -> Markdown: `{stem}.md` alone when it fits PAGE_BUDGET, else the main page and
    `{stem}-{loss}.md` per loss (the main page first)."""
    all_records, records, found = _prepare(results)
    one = _main(results, all_records, records, found, plots, None)
    losses = base_losses(records)
    if len(one.encode()) <= PAGE_BUDGET or not losses:
        return {f"{stem}.md": one}
    links = {loss: f"{stem}-{loss}.md" for loss in losses}
    out = {f"{stem}.md": _main(results, all_records, records, found, plots, links)}
    for loss in losses:
        out[links[loss]] = _loss_page(
            results,
            loss,
            [r for r in records if r["base_loss"] == loss],
            [f for f in found if f["loss"] == loss],
            f"{stem}.md",
        )
    return out


def write(results: dict, md_path: Path, plots: list[tuple[str, str]] | str | None = None) -> list[Path]:
    """Write the report's pages: `md_path` and, for a big report, `<md_path stem>-<loss>.md`
    beside it; returns the paths written (the main page first)."""
    from .results import (
        write_atomic,  # the report renders without the results module otherwise
    )

    md_path = Path(md_path)
    stem = md_path.name.removesuffix(".md")
    written = []
    for i, (name, text) in enumerate(pages(results, stem, plots).items()):
        path = md_path if i == 0 else md_path.with_name(name)
        write_atomic(path, text)
        written.append(path)
    return written


def _main(results, all_records, records, found, plots, links: dict[str, str] | None) -> str:
    """The main page; `links` (loss -> page) when the details are on per-loss pages."""
    cfg = results.get("config", {})
    parts = [
        _header(results),
        _skipped_summary(all_records),
        _breakdown(records, cfg, links is not None),
        _findings(records, found, links),
        RF.policy_survival(records, found),
        RFam.section(records),
        report_lm.section(records),
        accumulate_section(results.get("accumulate") or []),
        _plots(plots),
        D.problems(records),
    ]
    if links:
        parts.append(_page_index(records, found, links))
    else:
        parts += [s for s in D.sections(records) if not s.startswith("## Errors")]
    parts.append(_footer(results))
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


def _page_index(records, found, links) -> str:
    rows = []
    for loss, name in links.items():
        recs = [r for r in records if r["base_loss"] == loss]
        rows.append(
            [
                f"[{loss}]({name})",
                len({r["loss"] for r in recs}),
                sum(r["status"] == "ok" for r in recs),
                sum(f["loss"] == loss for f in found),
            ]
        )
    return (
        "## Details per loss\n\n"
        "Each loss's full breakdown table, findings evidence, accuracy, overflow, timing and memory tables "
        "and every measured point are on its own page.\n\n"
        + tabulate(rows, headers=["loss", "variants", "measured points", "findings"], tablefmt="github")
    )


def _loss_page(results, loss, records, found, main_name) -> str:
    cfg = results.get("config", {})
    head = [
        f"# losscheck report: {md(cfg.get('name', '?'))} — {loss}",
        f"Part of [{main_name}]({main_name}) (summary, plots, configuration and environment).",
    ]
    spec = loss_registry().get(loss)
    if spec:
        head.append(D.formulas(spec))
    head.append(_breakdown(records, cfg, False))
    evidence = RF.evidence(records, found)
    if evidence:
        head.append("## Findings\n\n" + _EVIDENCE_INTRO + "\n\n" + "\n".join(evidence + RF.cost_findings(records)))
    body = D.sections(records, level=2)
    return "\n\n".join(head + body).rstrip() + "\n"


def _header(results: dict) -> str:
    cfg, env, recs = results.get("config", {}), results.get("environment", {}), results["records"]
    counts: dict[str, int] = defaultdict(int)
    for r in recs:
        counts[r["status"]] += 1
    status = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    lines = [f"# losscheck report: {cfg.get('name', '?')}"]
    if cfg.get("description"):
        lines.append(cfg["description"].strip())
    lines.append(
        f"{len(recs)} points ({status}) · torch {env.get('torch', '?')} · {env.get('cpu', '?')} · "
        f"{env.get('threads', '?')} threads · seed {cfg.get('seed', '?')} · {results.get('created', '')}"
    )
    if not results.get("complete", True):
        lines.append("> **Incomplete run**: the sweep was interrupted; only the finished points are shown.")
    return "\n\n".join(lines)


def _skipped_summary(records: list[dict]) -> str:
    skipped: dict[tuple, int] = defaultdict(int)
    for r in records:
        if r["status"] == "skipped":
            skipped[(r["device"], r["message"])] += 1
    return "\n".join(
        f"> Not run on **{device}**: {md(msg)} ({n} point{'s' if n != 1 else ''} skipped)."
        for (device, msg), n in sorted(skipped.items())
    )


def _breakdown(records: list[dict], cfg: dict, summary_only: bool = False) -> str:
    """The breakdown table; for more than MAX_OPEN_ROWS rows a summary per loss first (the
    worst variant), the full table collapsed, or left to the per-loss pages (`summary_only`)."""
    bd = A.breakdown_scales(records)
    impls = impls_of(records)
    scales = sorted({r["scale"] for r in records})
    rows = []
    keys = sorted({(k[0], k[3], k[2]) for k in bd}, key=lambda k: row_order(*k))
    for loss, device, dtype in keys:
        rows.append([loss, device, dtype, *(_cell(bd.get((loss, impl, dtype, device))) for impl in impls)])
    thresholds = ", ".join(
        f"{d} {cfg.get('thresholds', {}).get(d, FORMATS[d].default_threshold_bits):g}"
        for d in order((r["dtype"] for r in records), list(FORMATS))
    )
    intro = (
        "## Breakdown scale\n\n"
        f"The smallest swept logit scale (of {', '.join(fmt_scale(s) for s in scales)}) at which an "
        "implementation produces a non-finite value where the reference is finite, or a mean loss "
        f"more bits off than the threshold (bits: {thresholds}). `none`: it never breaks within the sweep."
    )
    headers = ["loss", "device", "dtype", *(md(i) for i in impls)]
    full_table = table(rows, headers)
    if len(rows) <= MAX_OPEN_ROWS:
        return intro + "\n\n" + full_table
    summary = _breakdown_summary(bd, impls, keys)
    full = (
        "The full table, one row per loss variant, is on each loss's page."
        if summary_only
        else collapsible(full_table, len(rows), "rows: every loss variant")
    )
    return (
        intro + "\n\nPer loss, the worst of its variants (the smallest breakdown scale, and in how many "
        "variants it breaks):\n\n" + tabulate(summary, headers=headers, tablefmt="github") + "\n\n" + full
    )


def _cell(b) -> str:
    if b is None:
        return ""
    if b.status != "measured":
        return b.status
    return "none" if b.scale is None else f"**{fmt_scale(b.scale)}** ({b.reason})"


def _breakdown_summary(bd: dict, impls: list[str], keys: list[tuple]) -> list[list]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for loss, device, dtype in keys:
        groups[(loss.split(" [", 1)[0], device, dtype)].append(loss)
    rows = []
    for (base, device, dtype), labels in groups.items():
        row = [base, device, dtype]
        for impl in impls:
            cells = [bd.get((label, impl, dtype, device)) for label in labels]
            measured = [b for b in cells if b is not None and b.status == "measured"]
            broken = [b for b in measured if b.scale is not None]
            other = sorted({b.status for b in cells if b is not None and b.status != "measured"})
            if not measured:
                row.append("/".join(other))
                continue
            text = "none" if not broken else f"**{fmt_scale(min(b.scale for b in broken))}**"
            text += f" ({len(broken)} of {plural(len(measured), 'variant')} break)" if len(labels) > 1 else ""
            row.append(text + (f", {'/'.join(other)} in {len(cells) - len(measured)}" if other else ""))
        rows.append(row)
    return rows


_EVIDENCE_INTRO = (
    "One line per loss variant, implementation and kind, with the dtypes where it happens "
    "(the results file's `findings` list holds one quotable sentence per dtype and device, with "
    "its evidence)."
)


def _findings(records: list[dict], findings: list[dict], links: dict[str, str] | None) -> str:
    """The findings of the results file (findings.py decides; this only groups them): one line
    per implementation and kind, the evidence collapsed or on the per-loss pages."""
    if not records:
        return ""
    text = (
        "## Findings\n\n"
        "Each line: an implementation, the cause of what goes wrong, how often, and its worst case.\n\n"
        + "\n".join(RF.summary(records, findings))
    )
    if links:
        return (
            text
            + "\n\nThe evidence, per loss variant: "
            + ", ".join(f"[{loss}]({name}#findings)" for loss, name in links.items())
            + "."
        )
    evidence = RF.evidence(records, findings)
    return (
        text + f"\n\n<details><summary>Evidence: {plural(len(evidence), 'line')}, per loss variant and "
        f"implementation</summary>\n\n{_EVIDENCE_INTRO}\n\n" + "\n".join(evidence) + "\n\n</details>"
    )


def _plots(plots) -> str:
    if plots is None:
        return ""
    if isinstance(plots, str):
        return f"_Plots: {plots}_"
    return "## Plots\n\n" + "\n\n".join(f"![{md(title)}]({name})" for title, name in plots)


def _footer(results: dict) -> str:
    # Imported here: the rest of this module does not need the config's validator.
    from .config import as_input, to_yaml

    env = results.get("environment", {})
    # In the input format whichever schema wrote the file, so that the block can be run again.
    cfg = as_input(results.get("config", {}))
    env_rows = [
        [k, v if not isinstance(v, dict) else ", ".join(f"{a}: {b}" for a, b in v.items())] for k, v in env.items()
    ]
    return "\n\n".join(
        [
            "## Configuration (as run)",
            "```yaml\n" + to_yaml(cfg).rstrip() + "\n```",
            "## Environment",
            tabulate(env_rows, headers=["", ""], tablefmt="github"),
            f"Reproduce: `{results.get('command', 'losscheck bench')}`",
        ]
    )
