"""A Comparison -> Markdown (regressions first) and JUnit XML. Renderers return strings."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from tabulate import tabulate

from . import analysis as A
from .gate import Comparison, GatePolicy
from .results import KEY_FIELDS

MAX_ROWS = 200


def _point(key: tuple) -> list:
    return ["—" if v is None else (f"{v:g}" if isinstance(v, float) else v) for v in key]


def render_markdown(c: Comparison, policy: GatePolicy, baseline_path: str, current_path: str) -> str:
    regressions, improvements = c.regressions, c.improvements
    verdict = "**FAIL**" if c.failed else "**PASS**"
    lines = [
        "# losscheck compare",
        f"{verdict} — {len(regressions)} regression(s) at {len({v.key for v in regressions})} point(s), "
        f"{len(improvements)} improvement(s), {c.unchanged} of {c.compared} matched points unchanged; "
        f"{len(c.only_baseline)} point(s) only in the baseline, {len(c.only_current)} only in the current run, "
        f"{len(c.not_compared)} skipped on one side.",
        f"Baseline `{baseline_path}` ({c.baseline_meta.get('created')}, git {c.baseline_meta.get('git_revision')}) "
        f"· current `{current_path}` ({c.current_meta.get('created')}, git {c.current_meta.get('git_revision')})",
    ]
    if c.env_differences:
        rows = [[k, _short(a), _short(b)] for k, (a, b) in c.env_differences.items()]
        lines.append("**Environments differ**\n\n" + tabulate(rows, headers=["", "baseline", "current"],
                                                                tablefmt="github"))
    if c.timing_note:
        lines.append(f"> {c.timing_note}")
    headers = [*KEY_FIELDS, "gate", "baseline", "current", "why"]
    for title, items in (("Regressions", regressions), ("Improvements", improvements)):
        if not items:
            continue
        rows = [[*_point(v.key), v.gate, v.baseline, v.current, v.why] for v in items[:MAX_ROWS]]
        more = f"\n\n… and {len(items) - MAX_ROWS} more." if len(items) > MAX_ROWS else ""
        lines.append(f"## {title} ({len(items)})\n\n" + tabulate(rows, headers=headers, tablefmt="github") + more)
    for title, keys in (("Only in the baseline", c.only_baseline), ("Only in the current run", c.only_current),
                        ("Skipped on one side", c.not_compared)):
        if keys:
            rows = [_point(k) for k in keys[:MAX_ROWS]]
            more = f"\n\n… and {len(keys) - MAX_ROWS} more." if len(keys) > MAX_ROWS else ""
            lines.append(f"## {title} ({len(keys)})\n\nNot compared.\n\n"
                         + tabulate(rows, headers=list(KEY_FIELDS), tablefmt="github") + more)
    t = policy.default
    overrides = "; ".join(f"{loss}: bits {v.bits:g}, ulp {v.ulp:g}, time ×{v.time_factor:g}, {v.timing}"
                          for loss, v in policy.per_loss.items())
    lines.append("## Thresholds\n\n"
                 f"A regression: a new non-finite value; forward or gradient max bits up by more than "
                 f"{t.bits:g}; mean-loss error up by more than {t.ulp:g} ULP; an implementation that now "
                 f"errors; timing ({t.timing}) slower by more than ×{t.time_factor:g} beyond the noise "
                 f"(the current interquartile range entirely above ×{t.time_factor:g} the baseline's)." + (f" Per loss: {overrides}." if overrides else ""))
    return "\n\n".join(lines) + "\n"


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def render_junit(c: Comparison) -> str:
    """One test case per matched point; a regression is a failure, a point on one side only
    is a skipped case."""
    by_point = c.points()
    suite = ET.Element("testsuite", name="losscheck", tests="0", failures="0", errors="0", skipped="0")
    counts = {"tests": 0, "failures": 0, "skipped": 0}
    for key in c.matched_keys:
        case = _case(suite, key)
        counts["tests"] += 1
        regressions = [v for v in by_point.get(key, []) if v.outcome == "regression"]
        if regressions:
            counts["failures"] += 1
            failure = ET.SubElement(case, "failure", message="; ".join(f"{v.gate}: {v.why}" for v in regressions),
                                    type="regression")
            failure.text = "\n".join(f"{v.gate}: {v.baseline} -> {v.current}: {v.why}" for v in regressions)
    one_sided = ([(k, "only in the baseline") for k in c.only_baseline]
                 + [(k, "only in the current run") for k in c.only_current]
                 + [(k, "skipped on one side") for k in c.not_compared])
    for key, why in one_sided:
        case = _case(suite, key)
        counts["tests"] += 1
        counts["skipped"] += 1
        ET.SubElement(case, "skipped", message=why)
    for k, v in counts.items():
        suite.set(k, str(v))
    root = ET.Element("testsuites", tests=str(counts["tests"]), failures=str(counts["failures"]))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _case(suite, key: tuple):
    loss, impl, dtype, device, batch, classes, scale, dist, reduction, options, time = key
    variant = A.variant({"options": dict(options), "time": time, "reduction": reduction})
    name = f"{dtype}/{device}/batch={batch}/classes={classes}/scale={scale:g}/{dist}" + \
        (f"/{variant.replace(', ', '/')}" if variant else "")
    return ET.SubElement(suite, "testcase", classname=f"losscheck.{loss}.{impl}", name=name)
