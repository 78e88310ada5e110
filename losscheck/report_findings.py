"""The findings as the report shows them: a summary of one line per implementation and kind
(counts, where, the worst example), and the evidence, one line per loss label,
implementation and kind, for a collapsed section or a per-loss page.

findings.py decides what the findings are (the results file's `findings` list); this module
only groups and words them.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from . import analysis as A, families, findings as FD
from .catalog import PRECISIONS
from .report_format import (
    LOSS_ORDER,
    dtype_rank,
    fmt_scale,
    impl_name,
    impls_of,
    label_dtype,
    md,
    order,
    plural,
)

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


def _label(f: dict) -> str:
    return f"{f['loss']} [{f['variant']}]" if f["variant"] else f["loss"]


def _impl(f: dict) -> str:
    return impl_name(f["impl"], f["impl_kind"])


def where(f: dict) -> str:
    """One finding's place and evidence, short: "float16 from scale 30 (12 elements, 3 points)"."""
    ev, d = f["evidence"], label_dtype(f["dtype"], f["device"])
    points = plural(ev.get("points", 0), "point")
    bits = f", {FD.bits_text(ev['worst_bits'], f['dtype'])}" if isinstance(ev.get("worst_bits"), (int, float)) else ""
    # With a temperature, the scales are the logits' over it (findings.effective_scale).
    word = "scale" if "temperature" not in ev else f"scale/T (T = {fmt_scale(ev['temperature'])})"
    first = f" from {word} {fmt_scale(ev['first_scale'])}" if isinstance(ev.get("first_scale"), (int, float)) else ""
    elements = f"{ev.get('elements', 0)} elements, " if "elements" in ev else ""
    returned = f"returned {', '.join(map(str, ev.get('returned', [])))}"
    kind = f["kind"]
    if kind == "formula":
        every = ", at every swept scale" if ev.get("every_scale") else ""
        return f"{d} at {word} {fmt_scale(ev.get('smallest_scale'))}{every} ({elements}{points}{bits})"
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


def _num(v, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else default


def _severity(f: dict) -> tuple:
    """Sort key, worst first: breaks at the smallest scale, then loses the most bits, then at the
    most elements and points."""
    ev = f["evidence"]
    scale = _num(ev.get("first_scale", ev.get("smallest_scale")), math.inf)
    return (
        scale,
        -_num(ev.get("worst_bits"), 0.0),
        -_num(ev.get("elements"), 0.0),
        -_num(ev.get("points"), 0.0),
        dtype_rank(f["dtype"]),
        _label(f),
    )


def summary(records: list[dict], findings: list[dict]) -> list[str]:
    """One line per implementation and kind: how many findings, in which losses and dtypes,
    and the worst of them; then one line per implementation on the loss labels it passes."""
    if not records:
        return []
    by_impl: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in findings:
        by_impl[_impl(f)][f["kind"]].append(f)
    labels: dict[str, set] = defaultdict(set)  # implementation -> loss labels measured
    for r in records:
        if r["status"] == "ok":
            labels[md(r["impl"])].add(r["loss"])
    lines = []
    for impl in impls_of([{"impl": i} for i in {*by_impl, *labels}]):
        kinds = by_impl.get(impl, {})
        for kind in FD.KINDS:
            if kind not in kinds:
                continue
            fs = kinds[kind]
            worst = min(fs, key=_severity)
            losses = order((f["loss"] for f in fs), LOSS_ORDER)
            variants = {_label(f) for f in fs}
            dtypes = sorted(
                {label_dtype(f["dtype"], f["device"]) for f in fs}, key=lambda d: dtype_rank(d.split("@")[0])
            )
            spread = (
                f"{plural(len(variants), 'loss variant')} of {', '.join(losses)}"
                if len(variants) > len(losses)
                else ", ".join(losses)
            )
            lines.append(
                f"- **{impl}** — {KIND_TEXT[kind]}: {plural(len(fs), 'finding')} in {spread}; "
                f"{', '.join(dtypes)}. Worst: {_label(worst)}, {where(worst)}."
            )
        flagged = {_label(f) for fs in kinds.values() for f in fs}
        clean = labels.get(impl, set()) - flagged
        if clean:
            n = len(labels[impl])
            lines.append(
                f"- **{impl}**: no finding in "
                + (
                    f"any of its {plural(n, 'loss variant')}"
                    if not flagged
                    else f"{len(clean)} of its {n} loss variants"
                )
                + "."
            )
    return lines + chain_findings(records, findings) + cost_findings(records, by_base=True)


# The sigmoid→BCE chain and the form the advice says to use instead (issue 15): `torch` of each.
CHAIN, WITH_LOGITS = "sigmoid_bce", "bce_with_logits"


def chain_findings(records: list[dict], findings: list[dict]) -> list[str]:
    """One line per dtype and device where both were run without options: the breakdown scale
    and finding kinds of torch's binary_cross_entropy(x.sigmoid(), y) against torch's
    binary_cross_entropy_with_logits, so that "use the with-logits form" is measured."""
    bd = A.breakdown_scales(records)
    kinds: dict[tuple, list[str]] = defaultdict(list)
    for f in findings:
        if f["impl"] == "torch" and not f["variant"] and f["loss"] in (CHAIN, WITH_LOGITS):
            kinds[(f["loss"], f["dtype"], f["device"])].append(f["kind"])

    def said(loss: str, dtype: str, device: str) -> str:
        b = bd[(loss, "torch", dtype, device)]
        if b.status != "measured":
            return b.status
        text = f"breaks from scale {fmt_scale(b.scale)} ({b.reason})" if b.scale is not None else "never breaks"
        found = [k for k in FD.KINDS if k in kinds[(loss, dtype, device)]]
        return text + (f", findings: {', '.join(found)}" if found else ", no finding")

    lines = []
    pairs = sorted({(k[2], k[3]) for k in bd if k[0] == CHAIN and k[1] == "torch" and (WITH_LOGITS, *k[1:]) in bd})
    for dtype, device in sorted(pairs, key=lambda p: dtype_rank(p[0])):
        lines.append(
            f"- **sigmoid→BCE against with-logits**, {label_dtype(dtype, device)}: `torch` "
            f"binary_cross_entropy(x.sigmoid(), y) {said(CHAIN, dtype, device)}; "
            f"binary_cross_entropy_with_logits {said(WITH_LOGITS, dtype, device)}."
        )
    return lines


def evidence(records: list[dict], findings: list[dict]) -> list[str]:
    """Per loss label and implementation one line per kind, with the dtypes where it happens;
    and the implementations without any finding (with the dtypes where they were measured)."""
    by_group: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for f in findings:
        by_group[(_label(f), _impl(f))][f["kind"]].append(f)
    measured: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            d = label_dtype(r["dtype"], r["device"])
            if d not in measured[(r["loss"], md(r["impl"]))]:
                measured[(r["loss"], md(r["impl"]))].append(d)
    groups = set(by_group) | set(measured)
    impl_order = impls_of([{"impl": i} for _, i in groups])
    lines = []
    for label, impl in sorted(groups, key=lambda g: (A.loss_rank(g[0], LOSS_ORDER), impl_order.index(g[1]))):
        kinds = by_group.get((label, impl))
        if not kinds:
            lines.append(f"- **{label} / {impl}**: no finding ({', '.join(measured[(label, impl)])}).")
            continue
        for kind in FD.KINDS:
            if kind in kinds:
                lines.append(
                    f"- **{label} / {impl}** — {KIND_TEXT[kind]}: " + "; ".join(where(f) for f in kinds[kind]) + "."
                )
    return lines


def cost_ratios(records: list[dict], impl: str = "stable", base: str | None = None) -> dict[str, list[float]]:
    """loss -> forward+backward time ratios impl/base (default: the framework family) over the
    points where both were timed."""
    base = base or families.framework()
    key = A.point_key
    timed = {
        (key(r), r["impl"]): r["timing"]["backward_median_s"]
        for r in records
        if r["status"] == "ok" and r.get("timing")
    }
    out: dict[str, list[float]] = defaultdict(list)
    for (k, i), t in timed.items():
        if i == impl and (k, base) in timed and timed[(k, base)] > 0:
            out[k[0]].append(t / timed[(k, base)])
    return out


def cost_findings(records: list[dict], by_base: bool = False) -> list[str]:
    """One line per loss label, or per loss with its variants pooled (`by_base`: the summary)."""
    lines = []
    per_label = cost_ratios(records)
    if by_base:
        pooled: dict[str, list[float]] = defaultdict(list)
        for label, ratios in per_label.items():
            pooled[label.split(" [", 1)[0]] += ratios
        per_label = pooled
    for loss, ratios in per_label.items():
        lines.append(
            f"- Stability costs, {loss}: `stable` forward+backward takes ×{min(ratios):.2f} to "
            f"×{max(ratios):.2f} the time of `torch` (median ×{statistics.median(ratios):.2f} over "
            f"{len(ratios)} timed points)."
        )
    return lines


POLICIES = tuple(p for p in PRECISIONS if p != "native")


def _without(variant: str, part: str) -> str:
    return ", ".join(p for p in variant.split(", ") if p and p != part)


def policy_survival(records: list[dict], findings: list[dict]) -> str:
    """A section saying, for each framework finding in float16/bfloat16 on the dtype as given,
    whether it is still there when the same loss runs under autocast and on a float32 upcast
    (issue 15: what a mixed-precision training loop sees). Empty without such points."""
    swept = {
        (r.get("base_loss", r["loss"]), _without(A.variant(r), f"precision={p}"), r["dtype"], r["device"], p)
        for r in records
        for p in POLICIES
        if (r.get("options") or {}).get("precision") == p
    }
    if not swept:
        return ""
    # Each policy's findings under the variant they would have as given (its `precision=` part
    # taken out, as for `swept`): the variant's own order (T first, reduction last) is kept.
    under = {
        (f["loss"], _without(f["variant"], f"precision={p}"), f["impl"], f["dtype"], f["device"], f["kind"], p)
        for f in findings
        for p in POLICIES
        if f"precision={p}" in f["variant"].split(", ")
    }
    rows = []
    for f in findings:
        native = f["impl_kind"] == "framework" and "precision=" not in f["variant"]
        if not native or f["dtype"] not in ("float16", "bfloat16"):
            continue
        cells = []
        for p in POLICIES:
            if (f["loss"], f["variant"], f["dtype"], f["device"], p) not in swept:
                cells.append("not swept")
            elif (f["loss"], f["variant"], f["impl"], f["dtype"], f["device"], f["kind"], p) in under:
                cells.append("survives")
            else:
                cells.append("gone")
        label = f"{f['loss']} [{f['variant']}]" if f["variant"] else f["loss"]
        rows.append([md(label), impl_name(f["impl"]), label_dtype(f["dtype"], f["device"]), f["kind"], *cells])
    if not rows:
        return ""
    head = "| loss | implementation | dtype | finding | under autocast | on a float32 upcast |\n" + "|---" * 6 + "|\n"
    return (
        "## Precision policies\n\nEach framework finding in a half-precision dtype, run as given, and whether "
        "the same finding is there when the loss runs under `torch.autocast` or on an explicit float32 upcast "
        "(a wider output is audited in its own dtype, its threshold the input's: METRICS.md).\n\n"
        + head
        + "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)
    )
