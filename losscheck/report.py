"""Results -> Markdown (GitHub flavour). Renders from the results file alone.

The first screen answers "which implementation can I trust, at which logit size and
dtype": the breakdown table and the findings come first; details, configuration and
environment follow.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

from tabulate import tabulate

from . import analysis as A
from . import findings as FD
from .catalog import BUILTIN_IMPLS as IMPL_ORDER, LOSS_INFO, loss_registry
from .formats import FORMATS, precision
from .units import format_bytes

LOSS_ORDER = list(LOSS_INFO)
MAX_OPEN_ROWS = 24  # longer per-loss tables are collapsed
MAX_DETAIL_ROWS = 2000  # beyond this the per-point table would dominate the file (GitHub renders ~1 MB)


def fmt_scale(s: float | None) -> str:
    if s is None:
        return "—"
    if abs(s) < 1e4:
        return str(int(s)) if float(s).is_integer() else f"{s:g}"
    mantissa, exponent = f"{s:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e6:
        return f"{int(v)}"
    return f"{v:.{digits}g}"


def fmt_bits(b, dtype: str, digits: int = 3, unit: str = " bits") -> str:
    """Bits of error, never above the format's precision p (METRICS.md): "all bits lost" at p,
    and for a non-finite result (no correct bit is left either)."""
    if b is None:
        return "—"
    if isinstance(b, float) and math.isnan(b):  # not a measure (a hand-edited file): shown as is
        return "nan"
    p = precision(dtype)
    if (isinstance(b, float) and not math.isfinite(b)) or (p is not None and b >= p):
        return "all bits lost"
    return f"{fmt_num(b, digits)}{unit}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    for unit, f in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _impls(records) -> list[str]:
    seen = list(dict.fromkeys(r["impl"] for r in records))
    return sorted(seen, key=lambda i: (IMPL_ORDER.index(i) if i in IMPL_ORDER else len(IMPL_ORDER), i))


def _order(values, order):
    return sorted(set(values), key=lambda v: order.index(v) if v in order else len(order))


def _losses(records) -> list[str]:
    """The loss labels of the records (a loss with its variant, see `analysis.loss_label`), in order."""
    return sorted({r["loss"] for r in records}, key=lambda label: A.loss_rank(label, LOSS_ORDER))


def _row_order(loss: str, device: str, dtype: str) -> tuple:
    """Sort key of a table row: loss (with its variant), device, then dtype in FORMATS order."""
    return (A.loss_rank(loss, LOSS_ORDER), device, list(FORMATS).index(dtype) if dtype in FORMATS else len(FORMATS))


def _by_loss_device_dtype(recs: list[dict]) -> list[tuple[tuple, dict[str, list[dict]]]]:
    """The records grouped by (loss, device, dtype), then by implementation, in row order."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        groups[(r["loss"], r["device"], r["dtype"])][r["impl"]].append(r)
    return [(key, groups[key]) for key in sorted(groups, key=lambda k: _row_order(*k))]


def _bwd(r: dict) -> dict:
    """The gradient section, {} where it was not measured (a numpy implementation without gradient)."""
    return r["backward"] or {}


def render(results: dict, plots: list[tuple[str, str]] | str | None = None) -> str:
    """The Markdown report. `plots`: (title, relative file name) of figures written next to
    the report, or a note saying why there are none, or None for no plot section."""
    cfg = results.get("config", {})
    # Tables show what was run; points skipped as a whole device (or a platform without
    # a reference) are summarised in one line each under the header instead.
    # Every table groups by loss label: a loss with its variant (options, sequence length,
    # reduction) is a loss of its own in the report.
    all_records = A.labelled(results["records"])
    records = [r for r in all_records if r["status"] != "skipped"]
    found = results["findings"] if isinstance(results.get("findings"), list) else FD.findings(results["records"])
    parts = [_header(results), _skipped_summary(all_records), _breakdown(records, cfg), _findings(records, found),
             _plots(plots), _undefined(records), _nonfinite_inputs(records), _versus(records)]
    for loss in _losses(records):
        recs = [r for r in records if r["loss"] == loss]
        parts.append(_loss_section(loss, recs))
    parts += [_timing(records), _memory(records), _problems(records), _all_points(records), _footer(results)]
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


def _header(results: dict) -> str:
    cfg, env, recs = results.get("config", {}), results.get("environment", {}), results["records"]
    counts = defaultdict(int)
    for r in recs:
        counts[r["status"]] += 1
    status = ", ".join(f"{counts[s]} {s}" for s in ("ok", "error", "skipped") if counts[s])
    lines = [f"# losscheck report: {cfg.get('name', '?')}"]
    if cfg.get("description"):
        lines.append(cfg["description"].strip())
    lines.append(
        f"{len(recs)} points ({status}) · torch {env.get('torch', '?')} · {env.get('cpu', '?')} · "
        f"{env.get('threads', '?')} threads · seed {cfg.get('seed', '?')} · {results.get('created', '')}")
    if not results.get("complete", True):
        lines.append("> **Incomplete run**: the sweep was interrupted; only the finished points are shown.")
    return "\n\n".join(lines)


def _skipped_summary(records: list[dict]) -> str:
    skipped = defaultdict(int)
    for r in records:
        if r["status"] == "skipped":
            skipped[(r["device"], r["message"])] += 1
    return "\n".join(f"> Not run on **{device}**: {msg} ({n} point{'s' if n != 1 else ''} skipped)."
                     for (device, msg), n in sorted(skipped.items()))


def _breakdown(records: list[dict], cfg: dict) -> str:
    bd = A.breakdown_scales(records)
    impls = _impls(records)
    scales = sorted({r["scale"] for r in records})
    rows = []
    keys = sorted({(k[0], k[3], k[2]) for k in bd}, key=lambda k: _row_order(*k))
    for loss, device, dtype in keys:
        row = [loss, device, dtype]
        for impl in impls:
            b = bd.get((loss, impl, dtype, device))
            if b is None:
                row.append("")
            elif b.status != "measured":
                row.append(b.status)
            elif b.scale is None:
                row.append("none")
            else:
                row.append(f"**{fmt_scale(b.scale)}** ({b.reason})")
        rows.append(row)
    thresholds = ", ".join(
        f"{d} {cfg.get('thresholds', {}).get(d, FORMATS[d].default_threshold_bits):g}"
        for d in _order((r["dtype"] for r in records), list(FORMATS)))
    intro = (
        "## Breakdown scale\n\n"
        f"The smallest swept logit scale (of {', '.join(fmt_scale(s) for s in scales)}) at which an "
        "implementation produces a non-finite value where the reference is finite, or a mean loss "
        f"more bits off than the threshold (bits: {thresholds}). `none`: it never breaks within the sweep.")
    return intro + "\n\n" + tabulate(rows, headers=["loss", "device", "dtype", *impls], tablefmt="github")


# What each kind of finding means, as the report's findings list says it once per line.
KIND_TEXT = {
    "formula": "**formula error** (wrong elementwise on well-conditioned inputs from the smallest scale: "
               "not an instability)",
    "overflow": "**overflow** (NaN/±inf elements where the reference is finite)",
    "saturation": "**silent saturation** (finite elements more than the threshold off, clamping included)",
    "underflow": "**underflow** (non-zero values flushed to zero)",
    "reduction": "**reduction** (every element within tolerance, the reduced value wrong)",
    "limit": "**limit** (NaN/±inf at ±inf logits where the limit is finite)",
    "undefined": "**undefined mean** (nothing to average; NaN/inf where the convention is 0)",
}


def _where(f: dict) -> str:
    """One finding's place and evidence, short: "float16 from scale 30 (12 elements, 3 points)"."""
    ev, d = f["evidence"], label_dtype(f["dtype"], f["device"])
    points = f"{ev.get('points', 0)} point{'s' if ev.get('points') != 1 else ''}"
    bits = f", {FD.bits_text(ev['worst_bits'], f['dtype'])}" if isinstance(ev.get("worst_bits"), (int, float)) else ""
    first = f" from scale {fmt_scale(ev['first_scale'])}" if isinstance(ev.get("first_scale"), (int, float)) else ""
    elements = f"{ev.get('elements', 0)} elements, " if "elements" in ev else ""
    returned = f"returned {', '.join(map(str, ev.get('returned', [])))}"
    kind = f["kind"]
    if kind == "formula":
        every = ", at every swept scale" if ev.get("every_scale") else ""
        return f"{d} at scale {fmt_scale(ev.get('smallest_scale'))}{every} ({elements}{points}{bits})"
    if kind == "saturation" and ev.get("clamped"):
        elements += f"{ev['clamped']} clamped, "
    if kind == "reduction":
        batches = ", ".join(map(str, ev.get("batches", [])))
        return f"{d} at batch {batches}{first} ({returned}, {points}{bits})"
    if kind == "undefined":
        grad = ev.get("gradient_nonfinite_points")
        return f"{d} ({returned}{f', NaN/inf gradient at {grad} of them' if grad else ''}, {points})"
    if kind == "limit":
        return f"{d} ({elements}{points})"
    return f"{d}{first} ({elements}{points}{bits})"


def label_dtype(dtype: str, device: str) -> str:
    return dtype if device == "cpu" else f"{dtype}@{device}"


def _findings(records: list[dict], findings: list[dict]) -> str:
    """The findings list of the results file (findings.py decides; this only groups it): per
    loss and implementation one line per kind, with the dtypes where it happens; then the
    implementations without any finding, and the cost lines."""
    if not records:
        return ""
    lines = []
    by_group: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in findings:
        label = f"{f['loss']} [{f['variant']}]" if f["variant"] else f["loss"]
        impl = f"{f['impl']} (custom)" if f["impl_kind"] == "custom" else f["impl"]
        by_group[(label, impl)][f["kind"]].append(f)
    measured: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            d = label_dtype(r["dtype"], r["device"])
            if d not in measured[(r["loss"], r["impl"])]:
                measured[(r["loss"], r["impl"])].append(d)
    groups = set(by_group) | set(measured)
    impl_order = _impls([{"impl": i} for _, i in groups])
    for label, impl in sorted(groups, key=lambda g: (A.loss_rank(g[0], LOSS_ORDER), impl_order.index(g[1]))):
        kinds = by_group.get((label, impl))
        if not kinds:
            lines.append(f"- **{label} / {impl}**: no finding ({', '.join(measured[(label, impl)])}).")
            continue
        for kind in FD.KINDS:
            if kind in kinds:
                lines.append(f"- **{label} / {impl}** — {KIND_TEXT[kind]}: "
                             + "; ".join(_where(f) for f in kinds[kind]) + ".")
    lines += _cost_findings(records)
    return ("## Findings\n\n"
            "Each line: an implementation, the cause of what goes wrong, and where (the results file's "
            "`findings` list holds one quotable sentence per dtype and device, with its evidence).\n\n"
            + "\n".join(lines))


def cost_ratios(records: list[dict], impl: str = "stable", base: str = "torch") -> dict[str, list[float]]:
    """loss -> forward+backward time ratios impl/base over the points where both were timed."""
    key = A.point_key
    timed = {(key(r), r["impl"]): r["timing"]["backward_median_s"]
             for r in records if r["status"] == "ok" and r.get("timing")}
    out: dict[str, list[float]] = defaultdict(list)
    for (k, i), t in timed.items():
        if i == impl and (k, base) in timed and timed[(k, base)] > 0:
            out[k[0]].append(t / timed[(k, base)])
    return out


def _cost_findings(records: list[dict]) -> list[str]:
    lines = []
    for loss, ratios in cost_ratios(records).items():
        lines.append(f"- Stability costs, {loss}: `stable` forward+backward takes ×{min(ratios):.2f} to "
                     f"×{max(ratios):.2f} the time of `torch` (median ×{statistics.median(ratios):.2f} over "
                     f"{len(ratios)} timed points).")
    return lines


def _plots(plots) -> str:
    if plots is None:
        return ""
    if isinstance(plots, str):
        return f"_Plots: {plots}_"
    return "## Plots\n\n" + "\n\n".join(f"![{title}]({name})" for title, name in plots)


def _nonfinite_inputs(records: list[dict]) -> str:
    recs = [r for r in records if r["distribution"] in A.SCALE_FREE and r["status"] == "ok"]
    if not recs:
        return ""
    impls = _impls(recs)
    rows = []
    for key, group in _by_loss_device_dtype(recs):
        row = list(key)
        for impl in impls:
            rs = group.get(impl, [])
            n_f = sum(r["forward"]["n"] for r in rs)
            n_b = sum(_bwd(r).get("n", 0) for r in rs)
            bad_f = sum(A.nonfinite(r["forward"]) for r in rs)
            bad_b = sum(A.nonfinite(r["backward"]) for r in rs)
            worst = A.worst(r["forward"]["max_bits"] for r in rs)
            row.append("" if not rs else f"{_share(bad_f, n_f)} · {_share(bad_b, n_b)} · {fmt_bits(worst, key[2])}")
        rows.append(row)
    return ("## Infinite logits\n\n"
            "Inputs with ±inf logits (as masking with −inf produces), where the reference is the limit "
            "value (e.g. BCE-with-logits at x = −inf, y = 0 is 0; a −inf non-target logit has probability "
            "0). Per implementation: share of elements that are NaN/±inf although the limit is finite, "
            "forward · gradient, and the worst forward error in bits.\n\n"
            + tabulate(rows, headers=["loss", "device", "dtype", *impls], tablefmt="github"))


def _versus(records: list[dict], a: str = "stable", b: str = "torch") -> str:
    vs = A.versus(records, a, b)
    if not vs:
        return ""
    rows = []
    for (loss, dtype, device), v in sorted(vs.items(), key=lambda kv: _row_order(kv[0][0], kv[0][2], kv[0][1])):
        gain = f"{v.max_gain_bits:.1f} ({v.max_gain_where})" if v.max_gain_bits > 0 else "0"
        rows.append([loss, device, dtype, v.points, v.better, v.points - v.better - v.worse, v.worse,
                     v.a_finite_b_not, gain, fmt_bits(v.max_loss_bits, dtype) if v.worse else "—"])
    return (f"## `{a}` against `{b}`\n\n"
            f"Point by point, on forward max bits, mean-loss bits (log2(1 + ULP)) and gradient max bits: "
            f"`better` = more accurate on one measure and worse on none; `{b} non-finite` = points where "
            f"`{b}` returns NaN/inf and `{a}` does not; gain = the largest difference in bits where both "
            "are finite.\n\n"
            + tabulate(rows, headers=["loss", "device", "dtype", "points", "better", "same", "worse",
                                      f"{b} non-finite", "largest gain, bits (where)", "largest loss, bits"],
                       tablefmt="github"))


def _loss_section(loss: str, recs: list[dict]) -> str:
    impls = _impls(recs)
    head = [f"## {loss}"]
    spec = loss_registry().get(recs[0].get("base_loss", loss)) if recs else None
    if spec:
        head.append(f"{spec.summary}.\n\nnaive: ${spec.formulas.naive}$\n\nstable: ${spec.formulas.stable}$")
    acc_rows, ovf_rows = [], []
    groups = defaultdict(list)
    for r in recs:
        groups[(r["device"], r["dtype"], r["scale"])].append(r)
    for (device, dtype, scale) in sorted(groups, key=lambda k: (k[0], list(FORMATS).index(k[1]) if k[1] in FORMATS else 9, k[2])):
        g = groups[(device, dtype, scale)]
        acc, ovf = [device, dtype, fmt_scale(scale)], [device, dtype, fmt_scale(scale)]
        for impl in impls:
            ok = [r for r in g if r["impl"] == impl and r["status"] == "ok"]
            if not ok:
                st = {r["status"] for r in g if r["impl"] == impl}
                acc.append("/".join(sorted(st)) or "")
                ovf.append("/".join(sorted(st)) or "")
                continue
            fb = A.worst(r["forward"]["max_bits"] for r in ok)
            red = A.worst(r["forward"]["reduced_ulp"] for r in ok)
            bb = A.worst(_bwd(r).get("max_bits") for r in ok)
            acc.append(f"{fmt_bits(fb, dtype, 3, unit='')} / {fmt_num(red)} / {fmt_bits(bb, dtype, 3, unit='')}")
            n_f = sum(r["forward"]["n"] for r in ok)
            n_b = sum(_bwd(r).get("n", 0) for r in ok)
            nf = sum(A.nonfinite(r["forward"]) for r in ok)
            nb = sum(A.nonfinite(r["backward"]) for r in ok)
            sat = sum(r["forward"]["saturated"] + _bwd(r).get("saturated", 0) for r in ok)
            cell = f"{_share(nf, n_f)} / {_share(nb, n_b)}"
            if sat:
                cell += f" · {sat} saturated"
            ovf.append(cell)
        acc_rows.append(acc)
        ovf_rows.append(ovf)
    headers = ["device", "dtype", "scale", *impls]
    head.append(
        "**Accuracy** — worst over distributions, batch sizes and classes: forward max bits of error "
        "per element / mean-loss error in ULPs / gradient max bits (0 = correctly rounded; "
        "the dtype's significand width = no correct bit).\n\n"
        + _collapsible(tabulate(acc_rows, headers=headers, tablefmt="github"), len(acc_rows)))
    head.append(
        "**Overflow** — share of elements that are NaN or ±inf where the reference is finite, forward / "
        "gradient, and the number of finite values more than the threshold off (silent saturation).\n\n"
        + _collapsible(tabulate(ovf_rows, headers=headers, tablefmt="github"), len(ovf_rows)))
    if len({r["batch"] for r in recs}) > 1:
        head.append(_reduction_table(recs, impls))
    return "\n\n".join(head)


def _collapsible(table: str, rows: int) -> str:
    # Large sweeps: the breakdown and findings summarise; the full tables stay one click away.
    if rows <= MAX_OPEN_ROWS:
        return table
    return f"<details><summary>{rows} rows</summary>\n\n{table}\n\n</details>"


def _reduction_table(recs: list[dict], impls: list[str]) -> str:
    groups = defaultdict(list)
    for r in recs:
        if r["status"] == "ok":
            groups[(r["device"], r["dtype"], r["batch"])].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], list(FORMATS).index(k[1]) if k[1] in FORMATS else 9, k[2])):
        g = groups[key]
        row = list(key)
        for impl in impls:
            mine = [r for r in g if r["impl"] == impl]
            worst = A.worst(r["forward"]["reduced_ulp"] for r in mine)
            bad = sum(A.reduced_nonfinite(r) for r in mine)
            row.append("" if not mine else fmt_num(worst) + (f" ({bad} non-finite)" if bad else ""))
        rows.append(row)
    return ("**Mean loss by batch size** — worst mean-loss error in ULPs over scales and distributions, "
            "and how many points returned a non-finite mean (the reduction overflowing).\n\n"
            + tabulate(rows, headers=["device", "dtype", "batch", *impls], tablefmt="github"))


def _share(k: int, n: int) -> str:
    if k == 0:
        return "0"
    return f"{100 * k / n:.3g}%" if n else "—"


def _timing(records: list[dict]) -> str:
    timed = [r for r in records if r["status"] == "ok" and r.get("timing")]
    if not timed:
        return ""
    impls = _impls(timed)
    groups = defaultdict(lambda: defaultdict(list))
    for r in timed:
        key = (r["loss"], r["device"], r["dtype"], r["batch"], r["classes"])
        groups[key][r["impl"]].append(r["timing"])
    rows = []
    for key in sorted(groups, key=lambda k: (*_row_order(*k[:3]), k[3], k[4] or 0)):
        g = groups[key]
        med = {i: (statistics.median(t["forward_median_s"] for t in ts),
                   statistics.median(t["backward_median_s"] for t in ts),
                   statistics.median(t["forward_iqr_s"] for t in ts)) for i, ts in g.items()}
        base = med.get("torch")
        row = [key[0], key[1], key[2], key[3], key[4] if key[4] is not None else "—"]
        for impl in impls:
            if impl not in med:
                row.append("")
                continue
            f, b, iqr = med[impl]
            cell = f"{fmt_time(f)} ±{fmt_time(iqr)} / {fmt_time(b)}"
            if base and impl != "torch":
                cell += f" (×{f / base[0]:.2f} / ×{b / base[1]:.2f})"
            row.append(cell)
        rows.append(row)
    threads = sorted({r["timing"].get("threads") for r in timed})
    return ("## Timing\n\n"
            f"Median forward ±IQR / forward+backward time of the mean loss (torch.utils.benchmark, "
            f"{', '.join(map(str, threads))} thread(s)); in brackets, the ratio to `torch` measured in the "
            "same run.\n\n"
            + tabulate(rows, headers=["loss", "device", "dtype", "batch", "classes", *impls], tablefmt="github"))


def _undefined(records: list[dict]) -> str:
    """Points whose reduced reference is undefined (0/0: every target ignored): what each
    implementation returned against the sensible answer."""
    recs = [r for r in records if r.get("undefined") and r["status"] == "ok"]
    if not recs:
        return ""
    impls = _impls(recs)
    rows = []
    for key, group in _by_loss_device_dtype(recs):
        row = list(key)
        for impl in impls:
            rs = group.get(impl, [])
            values = sorted({fmt_num(r["forward"]["value"]) for r in rs})
            bad_grad = sum(1 for r in rs if A.nonfinite(r["backward"]))
            grads = f"gradient NaN/inf at {bad_grad} of {len(rs)} points" if bad_grad else "gradient finite"
            row.append("" if not rs else f"{' / '.join(values)}, {grads}")
        rows.append(row)
    return ("## Undefined means\n\n"
            f"{recs[0]['undefined'][0].upper()}{recs[0]['undefined'][1:]}. The reference of these points "
            "(reduced value and gradient) is that convention, 0; each cell: the means the implementation "
            "returned, and at how many points its gradient had NaN/inf (±inf logits in the `nonfinite` "
            "value set can cause those too).\n\n"
            + tabulate(rows, headers=["loss", "device", "dtype", *impls], tablefmt="github"))


def _memory(records: list[dict]) -> str:
    """The largest peak memory per loss, implementation and dtype (from each point's record)."""
    recs = [r for r in records if r.get("memory")]
    if not recs:
        return ""
    groups = defaultdict(dict)
    for r in recs:
        m = r["memory"]
        extra = m["peak_bytes"] - m.get("baseline_bytes", 0)
        key = (r["loss"], r["device"], r["dtype"], r["batch"] * (r.get("time") or 1), r["classes"] or "—")
        if extra > groups[key].get(r["impl"], (-1,))[0]:
            groups[key][r["impl"]] = (extra, m["peak_bytes"], r)
    impls = _impls(recs)
    rows = []
    for key in sorted(groups, key=lambda k: (*_row_order(*k[:3]), k[3], str(k[4]))):
        row = list(key)
        for impl in impls:
            v = groups[key].get(impl)
            row.append("" if v is None else f"+{format_bytes(v[0])} (peak {format_bytes(v[1])})")
        rows.append(row)
    measures = sorted({r["memory"]["measure"] for r in recs})
    return ("## Peak memory\n\n"
            f"Largest peak per loss, dtype, size and implementation over its points: growth above the process's "
            f"memory when the point started (+), and the peak itself. Measured as: {'; '.join(measures)}.\n\n"
            + _collapsible(tabulate(rows, headers=["loss", "device", "dtype", "rows", "classes", *impls],
                                    tablefmt="github"), len(rows)))


def _problems(records: list[dict]) -> str:
    msgs = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r["status"] == "error":
            msgs[(r["status"], r["message"])][(r["loss"], r["impl"], r["dtype"], r["device"])] += 1
    if not msgs:
        return ""
    rows = []
    for (status, msg), where in sorted(msgs.items()):
        places = ", ".join(f"{l}/{i}/{d}/{dev}" for (l, i, d, dev) in list(where)[:6])
        if len(where) > 6:
            places += f", … ({len(where)} groups)"
        rows.append([status, sum(where.values()), msg, places])
    return "## Errors\n\n" + tabulate(
        rows, headers=["status", "points", "message", "where (loss/impl/dtype/device)"], tablefmt="github")


def _all_points(records: list[dict]) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return ""
    if len(ok) > MAX_DETAIL_ROWS:
        return f"_The per-point table is omitted above {MAX_DETAIL_ROWS} points; see the JSON results._"
    rows = []
    for r in ok:
        f, b = r["forward"], _bwd(r)
        rows.append([r["loss"], r["impl"], r["dtype"], r["device"], r["batch"], r["classes"] or "—",
                     r["distribution"], fmt_scale(r["scale"]), fmt_num(f["max_ulp"]),
                     fmt_bits(f["mean_bits"], r["dtype"], unit=""),
                     fmt_num(f["reduced_ulp"]), A.nonfinite(f), fmt_num(b.get("max_ulp")), A.nonfinite(b)])
    table = tabulate(rows, headers=["loss", "impl", "dtype", "device", "batch", "classes", "distribution",
                                    "scale", "fwd max ulp", "fwd mean bits", "mean ulp", "fwd nan/inf",
                                    "bwd max ulp", "bwd nan/inf"], tablefmt="github")
    return f"<details><summary>All {len(ok)} measured points</summary>\n\n{table}\n\n</details>"


def _footer(results: dict) -> str:
    # Imported here: the rest of this module does not need the config's validator.
    from .config import as_input, to_yaml
    env = results.get("environment", {})
    # In the input format whichever schema wrote the file, so that the block can be run again.
    cfg = as_input(results.get("config", {}))
    env_rows = [[k, v if not isinstance(v, dict) else ", ".join(f"{a}: {b}" for a, b in v.items())]
                for k, v in env.items()]
    return "\n\n".join([
        "## Configuration (as run)",
        "```yaml\n" + to_yaml(cfg).rstrip() + "\n```",
        "## Environment",
        tabulate(env_rows, headers=["", ""], tablefmt="github"),
        f"Reproduce: `{results.get('command', 'losscheck bench')}`",
    ])
