"""The report's detail sections, per loss: accuracy, overflow and mean-loss tables per loss
label, every measured point, infinite logits, undefined means, `stable` against `torch`,
timing, memory and errors. report.py puts them after the summary of a small report, or on a
page per loss (NAME-LOSS.md) when one page would be too big to read."""

from __future__ import annotations

import statistics
from collections import defaultdict

from . import analysis as A, families
from .catalog import loss_registry
from .report_format import (
    bwd,
    by_loss_device_dtype,
    collapsible,
    dtype_rank,
    fmt_bits,
    fmt_num,
    fmt_scale,
    fmt_time,
    impls_of,
    losses_of,
    md,
    row_order,
    share,
    table,
)
from .units import format_bytes


def _heads(impls: list[str]) -> list[str]:
    return [md(i) for i in impls]


def sections(records: list[dict], level: int = 2) -> list[str]:
    """Every detail section of `records` (all of one loss, or all of the run), in reading order."""
    parts = [
        _undefined(records),
        _nonfinite_inputs(records),
        _out_of_domain(records),
        _versus(records),
        _input_gradients(records),
        _input_gradients(
            records, "backward_teacher", "a student's and a teacher's logits", "∂L/∂student · ∂L/∂teacher"
        ),
        _nats(records),
    ]
    parts += [loss_section(loss, [r for r in records if r["loss"] == loss], level) for loss in losses_of(records)]
    parts += [_timing(records), _memory(records), problems(records)]
    return [p for p in parts if p]


def _nonfinite_inputs(records: list[dict]) -> str:
    recs = [r for r in records if r["distribution"] in A.SCALE_FREE and r["status"] == "ok"]
    if not recs:
        return ""

    def cell(rs: list[dict], dtype: str) -> str:
        n_f = sum(r["forward"]["n"] for r in rs)
        n_b = sum(bwd(r).get("n", 0) for r in rs)
        bad_f = sum(A.nonfinite(r["forward"]) for r in rs)
        bad_b = sum(A.nonfinite(r["backward"]) for r in rs)
        worst = A.worst(r["forward"]["max_bits"] for r in rs)
        return f"{share(bad_f, n_f)} · {share(bad_b, n_b)} · {fmt_bits(worst, dtype)}"

    return (
        "## Infinite logits\n\n"
        "Inputs with ±inf logits (as masking with −inf produces), where the reference is the limit "
        "value (e.g. BCE-with-logits at x = −inf, y = 0 is 0; a −inf non-target logit has probability "
        "0). Per implementation: share of elements that are NaN/±inf although the limit is finite, "
        "forward · gradient, and the worst forward error in bits.\n\n" + _per_impl_table(recs, cell)
    )


def _out_of_domain(records: list[dict]) -> str:
    """What each implementation did with inputs outside the loss's domain (the `out_of_domain`
    value set): recorded, not scored (METRICS.md, "Out-of-domain inputs")."""
    recs = [r for r in records if r.get("out_of_domain")]
    if not recs:
        return ""

    def cell(rs: list[dict], dtype: str) -> str:
        outcomes = [r["out_of_domain"].get("outcome", "?") for r in rs]
        parts = [f"{word} {outcomes.count(key)}" for key, word in _OUTCOMES if outcomes.count(key)]
        silent = sum(1 for r in rs if r["out_of_domain"].get("reduced_nan") is False)
        return " · ".join(parts) + (f" (a number as the mean/sum at {silent})" if silent else "")

    return (
        "## Out-of-domain inputs\n\n"
        "Inputs with no true loss (NaN; probabilities just above 1 or below 0, as pytorch#51866): "
        "the reference is marked out of domain, and these elements count in no accuracy figure, "
        "breakdown or finding. Per implementation, the points where it raised, returned NaN at every "
        "such element (loss and gradient), or returned a number at some — a number is silent.\n\n"
        + _per_impl_table(recs, cell)
    )


_OUTCOMES = (("raised", "raised"), ("nan", "NaN"), ("number", "number"))


def _input_gradients(
    records: list[dict],
    second: str = "backward_classifier",
    inputs: str = "hidden states h and a classifier W",
    parts: str = "∂L/∂h · ∂L/∂W",
) -> str:
    """Losses of two differentiated inputs (linear_cross_entropy; kl_div, js_div: `second` is
    backward_teacher): the gradient errors for each input apart — a kernel can be right for the
    hidden states and wrong for the weight."""
    recs = [r for r in records if r["status"] == "ok" and r.get(second) and r.get("backward")]
    if not recs:
        return ""

    def cell(rs, dtype):
        worst = [max(r[part]["max_bits"] for r in rs) for part in ("backward", second)]
        broken = [sum(r[p]["max_bits"] >= r["threshold_bits"] for r in rs) for p in ("backward", second)]
        return f"{worst[0]:.1f} · {worst[1]:.1f} ({broken[0]} · {broken[1]} of {len(rs)} broken)"

    title = "## Gradient errors per input" + ("" if second == "backward_classifier" else " (student, teacher)")
    return (
        f"{title}\n\n"
        f"For losses of {inputs}: the worst bits lost over the points in "
        f"{parts}, and the points broken in each.\n\n" + _per_impl_table(recs, cell)
    )


def _nats(records: list[dict]) -> str:
    """Losses valued in nats (token_logprobs, entropy, kl_div, js_div): the worst absolute error
    in nats beside the bits (docs/METRICS.md "Absolute error in nats")."""
    recs = [r for r in records if r["status"] == "ok" and (r.get("forward") or {}).get("abs_nats")]
    if not recs:
        return ""

    def worst(rs, key):
        values = [r["forward"]["abs_nats"].get(key) for r in rs]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def cell(rs, dtype):
        per_element, reduced = worst(rs, "max"), worst(rs, "reduced")
        bits = max(r["forward"]["max_bits"] for r in rs)
        text = f"{fmt_num(per_element)} · {fmt_num(reduced) if reduced is not None else '—'} nats"
        return f"{text} ({bits:.1f} bits)"

    return (
        "## Absolute error in nats\n\n"
        "For losses valued in nats (log-probabilities, entropies, divergences): the worst |value − exact| "
        "over the points, per element · of the mean or sum, and the worst forward bits lost. A correctly "
        "rounded result is half an ULP of the value off: 0.125 nats for a bfloat16 log-probability near −40 "
        "(docs/METRICS.md).\n\n" + _per_impl_table(recs, cell)
    )


def _per_impl_table(recs: list[dict], cell) -> str:
    """A collapsible table: a row per (loss, device, dtype), a column per implementation whose
    cell is `cell(its records, dtype)` (empty where it has none)."""
    impls = impls_of(recs)
    rows = [
        [*key, *(cell(group[impl], key[2]) if group.get(impl) else "" for impl in impls)]
        for key, group in by_loss_device_dtype(recs)
    ]
    return collapsible(table(rows, ["loss", "device", "dtype", *_heads(impls)]), len(rows))


def _versus(records: list[dict], a: str = "stable", b: str | None = None) -> str:
    b = b or families.framework()
    vs = A.versus(records, a, b)
    if not vs:
        return ""
    rows = []
    for (loss, dtype, device), v in sorted(vs.items(), key=lambda kv: row_order(kv[0][0], kv[0][2], kv[0][1])):
        gain = f"{v.max_gain_bits:.1f} ({v.max_gain_where})" if v.max_gain_bits > 0 else "0"
        rows.append(
            [
                loss,
                device,
                dtype,
                v.points,
                v.better,
                v.points - v.better - v.worse,
                v.worse,
                v.a_finite_b_not,
                gain,
                fmt_bits(v.max_loss_bits, dtype) if v.worse else "—",
            ]
        )
    text = table(
        rows,
        [
            "loss",
            "device",
            "dtype",
            "points",
            "better",
            "same",
            "worse",
            f"{b} non-finite",
            "largest gain, bits (where)",
            "largest loss, bits",
        ],
    )
    return (
        f"## `{a}` against `{b}`\n\n"
        f"Point by point, on forward max bits, mean-loss bits (log2(1 + ULP)) and gradient max bits: "
        f"`better` = more accurate on one measure and worse on none; `{b} non-finite` = points where "
        f"`{b}` returns NaN/inf and `{a}` does not; gain = the largest difference in bits where both "
        "are finite.\n\n" + collapsible(text, len(rows))
    )


def loss_section(loss: str, recs: list[dict], level: int = 2) -> str:
    impls = impls_of(recs)
    head = [f"{'#' * level} {loss}"]
    spec = loss_registry().get(recs[0].get("base_loss", loss)) if recs else None
    if spec and level == 2:  # on a per-loss page the formulas head the page once
        head.append(formulas(spec))
    acc_rows, ovf_rows = [], []
    groups = defaultdict(list)
    for r in recs:
        groups[(r["device"], r["dtype"], r["scale"])].append(r)
    for device, dtype, scale in sorted(groups, key=lambda k: (k[0], dtype_rank(k[1]), k[2])):
        g = groups[(device, dtype, scale)]
        acc, ovf = [device, dtype, fmt_scale(scale)], [device, dtype, fmt_scale(scale)]
        for impl in impls:
            ok = [r for r in g if r["impl"] == impl and r["status"] == "ok"]
            if not ok:
                st = "/".join(sorted({r["status"] for r in g if r["impl"] == impl}))
                acc.append(st)
                ovf.append(st)
                continue
            fb = A.worst(r["forward"]["max_bits"] for r in ok)
            red = A.worst(r["forward"]["reduced_ulp"] for r in ok)
            bb = A.worst(bwd(r).get("max_bits") for r in ok)
            acc.append(f"{fmt_bits(fb, dtype, 3, unit='')} / {fmt_num(red)} / {fmt_bits(bb, dtype, 3, unit='')}")
            n_f = sum(r["forward"]["n"] for r in ok)
            n_b = sum(bwd(r).get("n", 0) for r in ok)
            nf = sum(A.nonfinite(r["forward"]) for r in ok)
            nb = sum(A.nonfinite(r["backward"]) for r in ok)
            sat = sum(r["forward"]["saturated"] + bwd(r).get("saturated", 0) for r in ok)
            ovf.append(f"{share(nf, n_f)} / {share(nb, n_b)}" + (f" · {sat} saturated" if sat else ""))
        acc_rows.append(acc)
        ovf_rows.append(ovf)
    headers = ["device", "dtype", "scale", *_heads(impls)]
    head.append(
        "**Accuracy** — worst over distributions, batch sizes and classes: forward max bits of error "
        "per element / mean-loss error in ULPs / gradient max bits (0 = correctly rounded; "
        "the dtype's significand width = no correct bit).\n\n" + collapsible(table(acc_rows, headers), len(acc_rows))
    )
    head.append(
        "**Overflow** — share of elements that are NaN or ±inf where the reference is finite, forward / "
        "gradient, and the number of finite values more than the threshold off (silent saturation).\n\n"
        + collapsible(table(ovf_rows, headers), len(ovf_rows))
    )
    if len({r["batch"] for r in recs}) > 1:
        head.append(_reductiontable(recs, impls))
    head.append(all_points(recs))
    return "\n\n".join(h for h in head if h)


def formulas(spec) -> str:
    return f"{spec.summary}.\n\nnaive: ${spec.formulas.naive}$\n\nstable: ${spec.formulas.stable}$"


def _reductiontable(recs: list[dict], impls: list[str]) -> str:
    groups = defaultdict(list)
    for r in recs:
        if r["status"] == "ok":
            groups[(r["device"], r["dtype"], r["batch"])].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], dtype_rank(k[1]), k[2])):
        g = groups[key]
        row = list(key)
        for impl in impls:
            mine = [r for r in g if r["impl"] == impl]
            worst = A.worst(r["forward"]["reduced_ulp"] for r in mine)
            bad = sum(A.reduced_nonfinite(r) for r in mine)
            row.append("" if not mine else fmt_num(worst) + (f" ({bad} non-finite)" if bad else ""))
        rows.append(row)
    return (
        "**Mean loss by batch size** — worst mean-loss error in ULPs over scales and distributions, "
        "and how many points returned a non-finite mean (the reduction overflowing).\n\n"
        + collapsible(table(rows, ["device", "dtype", "batch", *_heads(impls)]), len(rows))
    )


def all_points(recs: list[dict]) -> str:
    """Every measured point of one loss label, one row per point, one cell per implementation:
    the numbers of the results file, so that nothing is out of the report's reach."""
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        return ""
    impls = impls_of(ok)
    points: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        points[(r["device"], r["dtype"], r["batch"], r["classes"] or "—", r["distribution"], r["scale"])][r["impl"]] = r
    rows = []
    for key in sorted(points, key=lambda k: (k[0], dtype_rank(k[1]), k[2], str(k[3]), k[4], k[5])):
        cells = [_point_cell(points[key].get(impl)) for impl in impls]
        rows.append([*key[:5], fmt_scale(key[5]), *cells])
    text = table(rows, ["device", "dtype", "batch", "classes", "distribution", "scale", *_heads(impls)])
    return (
        f"<details><summary>All {len(ok)} measured points</summary>\n\n"
        "Each cell: forward max ULP / forward mean bits / mean-loss ULP / gradient max ULP, the NaN/±inf "
        "element counts forward and gradient where there are any, and the median forward+backward time.\n\n"
        f"{text}\n\n</details>"
    )


def _point_cell(r: dict | None) -> str:
    if r is None:
        return ""
    f, b, t = r["forward"], bwd(r), r.get("timing") or {}
    cell = (
        f"{fmt_num(f['max_ulp'])} / {fmt_bits(f['mean_bits'], r['dtype'], unit='')} / "
        f"{fmt_num(f['reduced_ulp'])} / {fmt_num(b.get('max_ulp'))}"
    )
    bad_f, bad_b = A.nonfinite(f), A.nonfinite(b)
    if bad_f or bad_b:
        cell += f" · {bad_f}+{bad_b} nan/inf"
    return cell + (f" · {fmt_time(t['backward_median_s'])}" if t.get("backward_median_s") is not None else "")


def _timing(records: list[dict]) -> str:
    timed = [r for r in records if r["status"] == "ok" and r.get("timing")]
    if not timed:
        return ""
    impls = impls_of(timed)
    framework = families.framework()
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in timed:
        groups[(r["loss"], r["device"], r["dtype"], r["batch"], r["classes"])][r["impl"]].append(r["timing"])
    rows = []
    for key in sorted(groups, key=lambda k: (*row_order(*k[:3]), k[3], k[4] or 0)):
        g = groups[key]
        med = {
            i: (
                statistics.median(t["forward_median_s"] for t in ts),
                statistics.median(t["backward_median_s"] for t in ts),
                statistics.median(t["forward_iqr_s"] for t in ts),
            )
            for i, ts in g.items()
        }
        base = med.get(framework)
        row = [key[0], key[1], key[2], key[3], key[4] if key[4] is not None else "—"]
        for impl in impls:
            if impl not in med:
                row.append("")
                continue
            f, b, iqr = med[impl]
            cell = f"{fmt_time(f)} ±{fmt_time(iqr)} / {fmt_time(b)}"
            if base and impl != framework:
                cell += f" (×{f / base[0]:.2f} / ×{b / base[1]:.2f})"
            row.append(cell)
        rows.append(row)
    threads = sorted({r["timing"].get("threads") for r in timed}, key=str)
    return (
        "## Timing\n\n"
        f"Median forward ±IQR / forward+backward time of the mean loss (torch.utils.benchmark, "
        f"{', '.join(map(str, threads))} thread(s)); in brackets, the ratio to `{framework}` measured in the "
        "same run.\n\n"
        + collapsible(table(rows, ["loss", "device", "dtype", "batch", "classes", *_heads(impls)]), len(rows))
    )


def _undefined(records: list[dict]) -> str:
    """Points whose reduced reference is undefined (0/0: every target ignored): what each
    implementation returned against the sensible answer."""
    recs = [r for r in records if r.get("undefined") and r["status"] == "ok"]
    if not recs:
        return ""

    def cell(rs: list[dict], dtype: str) -> str:
        values = sorted({fmt_num(r["forward"]["value"]) for r in rs})
        bad_grad = sum(1 for r in rs if A.nonfinite(r["backward"]))
        grads = f"gradient NaN/inf at {bad_grad} of {len(rs)} points" if bad_grad else "gradient finite"
        return f"{' / '.join(values)}, {grads}"

    return (
        "## Undefined means\n\n"
        f"{recs[0]['undefined'][0].upper()}{recs[0]['undefined'][1:]}. The reference of these points "
        "(reduced value and gradient) is that convention, 0; each cell: the means the implementation "
        "returned, and at how many points its gradient had NaN/inf (±inf logits in the `nonfinite` "
        "value set can cause those too).\n\n" + _per_impl_table(recs, cell)
    )


def _memory(records: list[dict]) -> str:
    """The largest peak memory per loss, implementation and dtype (from each point's record)."""
    recs = [r for r in records if r.get("memory")]
    if not recs:
        return ""
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in recs:
        m = r["memory"]
        extra = m["peak_bytes"] - m.get("baseline_bytes", 0)
        key = (r["loss"], r["device"], r["dtype"], r["batch"] * (r.get("time") or 1), r["classes"] or "—")
        if extra > groups[key].get(r["impl"], (-1,))[0]:
            groups[key][r["impl"]] = (extra, m["peak_bytes"], r)
    impls = impls_of(recs)
    # Fused losses record the bytes the N × V logits would take (memory.logits_bytes).
    logits = {k: max(v[2]["memory"].get("logits_bytes", 0) for v in g.values()) for k, g in groups.items()}
    rows = []
    for key in sorted(groups, key=lambda k: (*row_order(*k[:3]), k[3], str(k[4]))):
        row = list(key) + ([format_bytes(logits[key]) if logits[key] else "—"] if any(logits.values()) else [])
        for impl in impls:
            v = groups[key].get(impl)
            row.append("" if v is None else f"+{format_bytes(v[0])} (peak {format_bytes(v[1])})")
        rows.append(row)
    measures = sorted({r["memory"]["measure"] for r in recs})
    return (
        "## Peak memory\n\n"
        f"Largest peak per loss, dtype, size and implementation over its points: growth above the process's "
        f"memory when the point started (+), and the peak itself. Measured as: {'; '.join(measures)}.\n\n"
        + collapsible(
            table(
                rows,
                [
                    "loss",
                    "device",
                    "dtype",
                    "rows",
                    "classes",
                    *(["logits"] if any(logits.values()) else []),
                    *_heads(impls),
                ],
            ),
            len(rows),
        )
    )


def problems(records: list[dict]) -> str:
    msgs: dict[tuple, dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        # Raising on out-of-domain inputs is an outcome (tabulated apart), not an error of the audit.
        if r["status"] == "error" and (r.get("out_of_domain") or {}).get("outcome") != "raised":
            msgs[(r["status"], r["message"])][(r["loss"], r["impl"], r["dtype"], r["device"])] += 1
    if not msgs:
        return ""
    rows = []
    for (status, msg), where in sorted(msgs.items()):
        places = ", ".join(f"{lo}/{md(i)}/{d}/{dev}" for (lo, i, d, dev) in list(where)[:6])
        if len(where) > 6:
            places += f", … ({len(where)} groups)"
        rows.append([status, sum(where.values()), md(msg), places])
    return "## Errors\n\n" + collapsible(
        table(rows, ["status", "points", "message", "where (loss/impl/dtype/device)"]), len(rows)
    )
