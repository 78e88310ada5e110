"""The framework families point by point (issue 14): where more than one family of kind
"framework" ran (torch, torch_compile, jax, ...), which of them breaks at a point where another
does not, and how their times compare where each was timed.

"Breaks" is the breakdown table's test (analysis.breaks: a non-finite value where the reference
is finite, or a reduced loss more than the threshold off), applied point by point: a family's
own breakdown scale can hide that two families break at different points of the same scale.
Pure functions of labelled records (analysis.labelled) returning Markdown.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from . import analysis as A, families
from .report_format import (
    LOSS_ORDER,
    collapsible,
    fmt_scale,
    fmt_time,
    label_dtype,
    md,
    order,
    plural,
    row_order,
    table,
)
from .results import STATUSES

_INTRO = (
    "Each point measured by two or more framework families ({names}), compared: a family breaks "
    "at a point (a non-finite value where the reference is finite, or a mean more than the "
    "threshold off) where another one holds. The same inputs, the same reference."
)


def frameworks(records: list[dict]) -> list[str]:
    """The framework families with a measured point, in report order (custom code excluded)."""
    names = {r["impl"] for r in records if r.get("kind") == "framework" and r["status"] == "ok"}
    return sorted(names, key=families.order_key)


def section(records: list[dict]) -> str:
    """The report's section, or "" when fewer than two framework families were measured."""
    fams = frameworks(records)
    if len(fams) < 2:
        return ""
    parts = [
        "## Framework families point by point",
        _INTRO.format(names=", ".join(f"`{md(f)}`" for f in fams)),
        breaks_where(records, fams),
        speed(records, fams),
        _compile_note(records),
    ]
    return "\n\n".join(p for p in parts if p)


def _points(records: list[dict], fams: list[str], scored: bool) -> dict[tuple, dict[str, dict]]:
    """point -> family -> its ok record (`scored`: out-of-domain value sets left out)."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r["impl"] in fams and r["status"] == "ok" and not (scored and r["distribution"] in A.NOT_SCORED):
            out[A.point_key(r)][r["impl"]] = r
    return out


def disagreements(records: list[dict], fams: list[str]) -> tuple[list[dict[str, dict]], list[tuple[dict, dict]]]:
    """(the points measured by two or more of `fams`, each as family -> its record; those where
    some break and others hold, each with family -> why it breaks)."""
    shared = [by for by in _points(records, fams, scored=True).values() if len(by) > 1]
    split = []
    for by in shared:
        why = {f: w for f, r in by.items() if (w := A.breaks(r))}
        if why and len(why) < len(by):
            split.append((by, why))
    return shared, split


def breaks_where(records: list[dict], fams: list[str]) -> str:
    shared, split = disagreements(records, fams)
    if not shared:
        return ""
    everyone = [by for by in shared if all(A.breaks(r) for r in by.values())]
    alike = (
        f"All the families measured there break at {plural(len(everyone), 'point')} "
        f"({', '.join(order({next(iter(by.values()))['loss'].split(' [', 1)[0] for by in everyone}, LOSS_ORDER))})."
        if everyone
        else ""
    )
    if not split:
        same = f"At all {plural(len(shared), 'point')} measured by two or more of them, they break at the same points."
        return f"{same} {alike}".rstrip()
    pairs: Counter = Counter()
    where: dict[tuple, set] = defaultdict(set)
    groups: dict[tuple, list] = defaultdict(list)
    for by, why in split:
        r = next(iter(by.values()))
        for a in why:
            for b in (f for f in by if f not in why):
                pairs[(a, b)] += 1
                where[(a, b)].add(r["loss"].split(" [", 1)[0])
        groups[_group(r)].append((by, why))
    # The shape is said where a row's value set was swept at more than one (frameworks.yaml's
    # exact points of optax's bugs beside its small grid).
    shapes: dict[tuple, set] = defaultdict(set)
    for r in records:
        if r["impl"] in fams:
            shapes[_group(r)].add((r["batch"], r["classes"]))
    lines = [
        f"- `{md(a)}` breaks where `{md(b)}` holds at {plural(n, 'point')} "
        f"({', '.join(order(where[(a, b)], LOSS_ORDER))})."
        for (a, b), n in sorted(pairs.items(), key=lambda kv: (fams.index(kv[0][0]), fams.index(kv[0][1])))
    ]
    rows = []
    for key in sorted(groups, key=lambda k: (*row_order(k[0], k[1], k[2]), k[3])):
        loss, device, dtype, dist = key
        found = groups[key]
        cells = [_cell(f, found, len(shapes[key]) > 1) for f in fams]
        rows.append([md(loss), label_dtype(dtype, device), dist, len(found), *cells])
    intro = (
        f"Of {plural(len(shared), 'point')} measured by two or more framework families, {len(split)} split them. "
        f"{alike} Per loss, dtype and value set, where each family breaks at the points that split them "
        "(scale; N and C where the value set was swept at more than one shape):"
    )
    grid = table(rows, ["loss", "dtype", "value set", "points", *(md(f) for f in fams)])
    return "\n".join(lines) + "\n\n" + intro + "\n\n" + collapsible(grid, len(rows), "rows: where each family breaks")


def _group(r: dict) -> tuple:
    return (r["loss"], r["device"], r["dtype"], r["distribution"])


def _cell(family: str, found: list[tuple[dict[str, dict], dict]], with_shape: bool) -> str:
    mine = sorted(
        ((by[family], why[family]) for by, why in found if family in why),
        key=lambda m: (m[0]["scale"], m[0]["batch"], m[0]["classes"] or 0),
    )
    measured = sum(family in by for by, _ in found)
    if not mine:
        return "holds" if measured else "—"
    at = []
    for r, _ in mine:
        shape = f" (N={r['batch']}" + (f", C={r['classes']})" if r["classes"] else ")") if with_shape else ""
        at.append(f"{fmt_scale(r['scale'])}{shape}")
    first = mine[0][1]
    return f"**breaks** at {', '.join(dict.fromkeys(at))}: {md(first)}" + (
        f" ({len(mine)} of {measured})" if measured > 1 else ""
    )


def speed(records: list[dict], fams: list[str]) -> str:
    """Forward+backward time per loss and dtype: the first framework family's median, the
    others' as the median of their per-point ratios to it."""
    timed = {
        key: {f: r["timing"]["backward_median_s"] for f, r in by.items() if r.get("timing")}
        for key, by in _points(records, fams, scored=False).items()
    }
    groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for key, times in timed.items():
        if len(times) > 1:
            groups[(key[0], key[2], key[1])].append(times)  # (loss, device, dtype)
    if not groups:
        return ""
    rows = []
    for key in sorted(groups, key=lambda k: row_order(*k)):
        points = groups[key]
        base = next(f for f in fams if any(f in t for t in points))
        cells, ratios = [], {}
        for f in fams:
            if f == base:
                cells.append(fmt_time(statistics.median(t[base] for t in points if base in t)))
                continue
            rs = [t[f] / t[base] for t in points if f in t and base in t and t[base] > 0]
            if rs:
                ratios[f] = statistics.median(rs)
            cells.append(f"×{ratios[f]:.3g}" if f in ratios else "—")
        fastest = min([(1.0, base), *((v, f) for f, v in ratios.items())])[1]
        rows.append([md(key[0]), label_dtype(key[2], key[1]), len(points), *cells, md(fastest)])
    head = (
        "Forward+backward time (median) at the timed points: the first family's, and each other's as "
        "the median of its per-point ratio to it (×0.5: twice as fast)."
    )
    grid = table(rows, ["loss", "dtype", "points", *(md(f) for f in fams), "fastest"])
    return head + "\n\n" + collapsible(grid, len(rows), "rows: time per family")


def _compile_note(records: list[dict]) -> str:
    compiled = [r for r in records if r["status"] in STATUSES and isinstance(r.get("compile"), dict)]
    if not compiled:
        return ""
    per: dict[str, list[float]] = defaultdict(list)
    for r in compiled:
        per[r["impl"]].append(float(r["compile"].get("seconds") or 0.0))
    return " ".join(
        f"`{md(f)}` compiled at {plural(sum(s > 0 for s in secs), 'point')}, {sum(secs):.3g} s in all, "
        "kept out of its times."
        for f, secs in sorted(per.items(), key=lambda kv: families.order_key(kv[0]))
    )
