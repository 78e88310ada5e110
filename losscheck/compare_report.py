"""A Comparison -> Markdown (regressions first) and JUnit XML. Renderers return strings."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from tabulate import tabulate

from . import analysis as A
from .gate import Comparison, GatePolicy
from .gate_checks import describe_policy
from .gate_policy import SETTINGS
from .report_format import md
from .results import KEY_FIELDS

MAX_ROWS = 200
FLAGGED = tuple(s for s in SETTINGS if s.flag)  # the thresholds a command line may override
# Column names that say what a key field is (the results file's names are terse).
KEY_HEADERS = {"impl": "implementation", "time": "sequence length", "distribution": "value set"}


def _value(field: str, v) -> str:
    if field == "options":  # the sorted (option, value) pairs of the key
        return ", ".join(f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}" for k, x in v) if v else "—"
    if v is None:
        return "—"
    return md(f"{v:g}" if isinstance(v, float) else v)


def _point(key: tuple) -> list:
    return [_value(f, v) for f, v in zip(KEY_FIELDS, key, strict=True)]


def _point_table(rows: list[list], extra: list[str]) -> str:
    """A table of points (key fields, then `extra` columns). A key column with one value in every
    row is said once above the table instead of repeated: a baseline of one device, reduction
    and no options would otherwise make every row ~400 characters wide."""
    n = len(KEY_FIELDS)
    same = [i for i in range(n) if len(rows) > 1 and len({row[i] for row in rows}) == 1]
    keep = [i for i in range(len(rows[0])) if i not in same]
    headers = [KEY_HEADERS.get(f, f) for f in KEY_FIELDS] + list(extra)
    note = ("Every row: " + ", ".join(f"{headers[i]} {rows[0][i]}" for i in same) + ".\n\n") if same else ""
    return note + tabulate(
        [[row[i] for i in keep] for row in rows], headers=[headers[i] for i in keep], tablefmt="github"
    )


def render_markdown(c: Comparison, policy: GatePolicy, baseline_path: str, current_path: str) -> str:
    regressions, improvements = c.regressions, c.improvements
    verdict = "**FAIL**" if c.failed else "**PASS**"
    not_run = len(c.not_run) + len(c.not_compared)
    lines = [
        "# losscheck compare",
        f"{verdict} — {len(regressions)} regression(s) at {len({v.key for v in regressions})} point(s), "
        f"{len(improvements)} improvement(s), {c.unchanged} of {c.compared} matched points unchanged; "
        f"{len(c.only_baseline)} point(s) missing from the current run"
        + (" (allowed)" if c.only_baseline and c.allow_missing else " (a failure)" if c.only_baseline else "")
        + f", {len(c.only_current)} only in the current run ({len(c.versus_of)} judged against the same run, "
        f"{len(c.not_gated)} not gated), {not_run} not run (skipped or errored: not passed)."
        + (
            f" Baseline restricted to the losses run (--loss {', '.join(c.selected_losses)})."
            if c.selected_losses
            else ""
        ),
        _summary_table(c),
        f"Baseline `{baseline_path}` ({c.baseline_meta.get('created')}, git {c.baseline_meta.get('git_revision')}) "
        f"· current `{current_path}` ({c.current_meta.get('created')}, git {c.current_meta.get('git_revision')})",
    ]
    if c.env_differences:
        rows = [[k, _short(a), _short(b)] for k, (a, b) in c.env_differences.items()]
        lines.append(
            "**Environments differ**\n\n" + tabulate(rows, headers=["", "baseline", "current"], tablefmt="github")
        )
        if "threads" in c.env_differences:
            # Measured (issue 16): 1 ULP at 10 of 144 points between 1 and 2 threads.
            lines.append(
                "> The thread counts differ: torch splits reductions by thread, so a mean or sum may "
                "round differently (by an ULP or so) with no change of code. Compare runs made with "
                "the same `--threads` before reading a 1-ULP regression as real."
            )
    if "inputs" in c.env_differences:
        a, b = c.env_differences["inputs"]
        lines.append(
            f"> **Not the same inputs**: the baseline's were drawn by the {a} generator, this run's by "
            f"{b}, so no matched point is judged (listed under Not run). Make a new baseline with "
            "this version (`losscheck baseline`)."
        )
    lines.append(_timing_line(c))
    if c.timing_note:
        lines.append(f"> {c.timing_note}")
    for title, items in (("Regressions", regressions), ("Improvements", improvements)):
        if not items:
            continue
        rows = [
            [
                *_point(v.key),
                v.gate,
                v.baseline if v.against == "baseline" else f"{v.against}: {v.baseline}",
                v.current,
                md(v.why),
            ]
            for v in items[:MAX_ROWS]
        ]
        more = f"\n\n… and {len(items) - MAX_ROWS} more." if len(items) > MAX_ROWS else ""
        lines.append(
            f"## {title} ({len(items)})\n\n" + _point_table(rows, ["gate", "baseline", "current", "why"]) + more
        )
    lines.append(
        _key_section(
            "Timing not judged",
            [(v.key, [v.why]) for v in c.not_judged],
            ["why"],
            "Too noisy, too short, or measured under another environment: neither passed nor failed.",
        )
    )
    missing = "Missing from the current run" + (
        " (allowed by --allow-missing)" if c.allow_missing else " (fails the gate; --allow-missing accepts it)"
    )
    lines += [
        _key_section(missing, [(k, []) for k in c.only_baseline]),
        _key_section(
            "Not run (skipped or errored on both sides, or new and not runnable)",
            [(k, [why]) for k, why in c.not_run.items()],
            ["why"],
        ),
        _key_section("Skipped on one side", [(k, []) for k in c.not_compared]),
        _key_section("New and not gated (`gate.new`)", [(k, []) for k in c.not_gated]),
    ]
    # Per-loss overrides, by the names of the flags' settings (gate_policy.SETTINGS).
    overrides = "; ".join(
        f"{loss}: " + ", ".join(f"{s.name} {_setting_text(getattr(v, s.name))}" for s in FLAGGED)
        for loss, v in policy.per_loss.items()
    )
    lines.append(
        "## Thresholds\n\n" + describe_policy(policy.default) + (f" Per loss: {overrides}." if overrides else "")
    )
    return "\n\n".join(line for line in lines if line) + "\n"


def _setting_text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _key_section(title: str, items: list[tuple[tuple, list]], extra: Sequence[str] = (), intro: str = "") -> str:
    if not items:
        return ""
    rows = [_point(k) + [md(c) for c in cells] for k, cells in items[:MAX_ROWS]]
    more = f"\n\n… and {len(items) - MAX_ROWS} more." if len(items) > MAX_ROWS else ""
    return f"## {title} ({len(items)})\n\n" + (f"{intro}\n\n" if intro else "") + _point_table(rows, list(extra)) + more


def _summary_table(c: Comparison) -> str:
    rows = []
    for r in c.by_implementation():
        name = md(r["impl"]) + (" (custom)" if r["kind"] == "custom" else "")
        worst = r["worst"]
        worst_text = "—" if worst is None else _where(worst.key) + ": " + worst.why.split(" (")[0]
        if worst is None and r["missing"]:
            worst_text = f"{r['missing']} point(s) missing from the current run"
        rows.append(
            [
                name,
                r["against"],
                r["judged"],
                r["not_judged"] + r["missing"],
                r["regressions"],
                md(_short(worst_text, 120)),
                f"**{r['verdict']}**" if r["verdict"] == "FAIL" else r["verdict"],
            ]
        )
    return tabulate(
        rows,
        headers=[
            "implementation",
            "judged against",
            "points judged",
            "not judged",
            "regressions",
            "worst change",
            "verdict",
        ],
        tablefmt="github",
    )


def _where(key: tuple) -> str:
    """A point in a few words: "bce_with_logits float32 cpu normal scale 1 (batch 256)"."""
    loss, _, dtype, device, batch, classes, scale, dist, reduction, options, time = key
    variant = A.variant({"options": dict(options), "time": time, "reduction": reduction})
    size = f"batch {batch}" + (f" × {classes}" if classes else "")
    return f"{loss} {dtype} {device} {dist} scale {scale:g} ({size}{', ' + variant if variant else ''})"


def _timing_line(c: Comparison) -> str:
    s = c.timing
    if not s.judged and not s.not_judged:
        return f"Timing ({s.mode}): nothing to compare."
    lines = [
        f"Timing ({s.mode}): {s.judged} comparison(s) judged"
        + (
            f", each called at p <= {s.per_test:.2g} ({s.false_alarm:g} / {s.judged}: at most a "
            f"{s.false_alarm:.0%} chance of any false timing regression in this run)"
            if s.per_test
            else ""
        )
        + f"; {s.suspected} suspected, {s.remeasured} re-measured, {s.confirmed} confirmed."
    ]
    if s.not_judged:
        lines.append("Not judged: " + "; ".join(f"{n} {why}" for why, n in sorted(s.not_judged.items())) + ".")
    return " ".join(lines)


def _short(v, n: int = 80) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def render_junit(c: Comparison) -> str:
    """One test case per point of either run: a regression (or a point missing from the current
    run, unless allowed) is a failure; a point not run, skipped on one side or not gated is a
    skipped case — never a pass."""
    by_point = c.points()
    suite = ET.Element("testsuite", name="losscheck", tests="0", failures="0", errors="0", skipped="0")
    counts = {"tests": 0, "failures": 0, "skipped": 0}

    def failed(case, regressions):
        counts["failures"] += 1
        failure = ET.SubElement(
            case, "failure", message="; ".join(f"{v.gate}: {v.why}" for v in regressions), type="regression"
        )
        failure.text = "\n".join(f"{v.gate}: {v.baseline} -> {v.current}: {v.why}" for v in regressions)

    for key in [*c.matched_keys, *c.versus_of]:
        case = _case(suite, key)
        counts["tests"] += 1
        regressions = [v for v in by_point.get(key, []) if v.outcome == "regression"]
        if regressions:
            failed(case, regressions)
        elif key in c.not_run:
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message=f"not run: {c.not_run[key]}")
    for key in c.only_baseline:
        case = _case(suite, key)
        counts["tests"] += 1
        if c.allow_missing:
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message="missing from the current run (allowed)")
        else:
            counts["failures"] += 1
            ET.SubElement(case, "failure", message="missing from the current run", type="missing")
    one_sided = [(k, "not gated: new, no baseline") for k in c.not_gated] + [
        (k, "skipped on one side") for k in c.not_compared
    ]
    for key, why in one_sided:
        case = _case(suite, key)
        counts["tests"] += 1
        counts["skipped"] += 1
        ET.SubElement(case, "skipped", message=why)
    for k, v in counts.items():
        suite.set(k, str(v))
    root = ET.Element(
        "testsuites", tests=str(counts["tests"]), failures=str(counts["failures"]), skipped=str(counts["skipped"])
    )
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _case(suite, key: tuple):
    loss, impl, dtype, device, batch, classes, scale, dist, reduction, options, time = key
    variant = A.variant({"options": dict(options), "time": time, "reduction": reduction})
    name = f"{dtype}/{device}/batch={batch}/classes={classes}/scale={scale:g}/{dist}" + (
        f"/{variant.replace(', ', '/')}" if variant else ""
    )
    return ET.SubElement(suite, "testcase", classname=f"losscheck.{loss}.{impl}", name=name)
