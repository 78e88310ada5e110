"""Derived numbers shared by the report and later by the gate: breakdown scales, worst cases.

Pure functions of result records (plain dicts as stored in the results file).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from . import families
from .formats import FORMATS, bits_phrase, counted_in, ulp_threshold


def variant(record: dict) -> str:
    """What sets a point apart beyond (loss, shape, value set, scale): sequence length,
    options and a reduction other than the mean, e.g. "label_smoothing=0.1, reduction=sum"."""
    parts = [f"T={record['time']}"] if record.get("time") else []
    for k, v in sorted((record.get("options") or {}).items()):
        parts.append(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}")
    if record.get("reduction", "mean") != "mean":
        parts.append(f"reduction={record['reduction']}")
    return ", ".join(parts)


def loss_label(record: dict) -> str:
    """The loss with its variant, as reports group by it: "cross_entropy [ignored=1]"."""
    v = variant(record)
    return f"{record['loss']} [{v}]" if v else record["loss"]


def labelled(records: list[dict]) -> list[dict]:
    """Copies of the records whose `loss` is their `loss_label` (the loss itself in
    `base_loss`), and whose `impl` says "(custom)" for a user's implementation: every table
    grouped by loss then keeps variants apart, and shows which implementations are custom."""
    return [
        {
            **r,
            "loss": loss_label(r),
            "base_loss": r["loss"],
            "impl": f"{r['impl']} (custom)" if r.get("kind") == "custom" else r["impl"],
        }
        for r in records
    ]


def loss_rank(label: str, order: list[str]) -> tuple:
    """Sort key of a loss label: the loss's place in `order`, then the label."""
    base = label.split(" [", 1)[0]
    return (order.index(base) if base in order else len(order), label)


def nonfinite(section: dict | None) -> int:
    return 0 if not section else int(section.get("nan", 0)) + int(section.get("inf", 0))


def reduced_nonfinite(record: dict) -> bool:
    """The reduced loss is non-finite although its reference is finite."""
    f = record.get("forward") or {}
    value, ref = f.get("value"), f.get("reference")
    return value is not None and ref is not None and math.isfinite(ref) and not math.isfinite(value)


def breaks(record: dict) -> str | None:
    """Why an `ok` record counts as broken (METRICS.md, "Breakdown scale"), or None.

    Broken: any non-finite value where the reference is finite (forward elements, the
    reduced loss, or the gradient), or a reduced loss more than the threshold off.
    """
    if record.get("status") != "ok":
        return None
    f, b = record["forward"], record["backward"]
    if nonfinite(f):
        return "fwd non-finite"
    if reduced_nonfinite(record):
        return "mean non-finite"
    if nonfinite(b):
        return "bwd non-finite"
    r = f.get("reduced_ulp")
    dtype, threshold = counted_in(record)
    if r is not None and r > ulp_threshold(threshold):
        return f"mean {bits_phrase(math.log2(1 + r), dtype)}"
    return None


def capped(bits, dtype: str):
    """Finite bits capped at p (a non-finite value, the mark of a NaN/inf result, is kept)."""
    if bits is None or not isinstance(bits, (int, float)) or not math.isfinite(bits) or dtype not in FORMATS:
        return bits
    return min(bits, FORMATS[dtype].significand_bits)


@dataclass(frozen=True)
class Breakdown:
    scale: float | None  # None: never breaks within the sweep
    reason: str
    status: str  # "measured", "error" (no ok point), "skipped"


# Value sets whose points do not depend on the scale in a way a breakdown scale can
# describe: infinite logits break an implementation at every scale or at none. They are
# reported in a table of their own.
SCALE_FREE = ("nonfinite", "masked")  # value sets with ±inf logits (inputs.py)
# Value sets whose points are recorded, not scored: out-of-domain inputs have no true value, so
# they count in no breakdown and no finding (METRICS.md, "Out-of-domain inputs"); the report
# tabulates what each implementation did with them.
NOT_SCORED = ("out_of_domain",)


def breakdown_scales(records: list[dict]) -> dict[tuple, Breakdown]:
    """(loss, impl, dtype, device) -> the smallest swept scale at which any point breaks."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["distribution"] in SCALE_FREE + NOT_SCORED:
            continue
        groups[(r["loss"], r["impl"], r["dtype"], r["device"])].append(r)
    out = {}
    for key, recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            status = "skipped" if all(r["status"] == "skipped" for r in recs) else "error"
            out[key] = Breakdown(None, recs[0].get("message", ""), status)
            continue
        broken = sorted((r["scale"], why) for r in ok if (why := breaks(r)))
        if broken:
            out[key] = Breakdown(broken[0][0], broken[0][1], "measured")
        else:
            out[key] = Breakdown(None, "", "measured")
    return out


# Value sets on which a correct formula is accurate at small logits in every dtype: elements
# wrong there at scale <= 1 are a formula error, not an instability (findings.py).
WELL_CONDITIONED = ("normal", "uniform")


def worst(values) -> float | None:
    """The maximum of the values that exist (None when none does)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return max(vals, key=lambda v: (not math.isnan(v), v) if isinstance(v, float) else (True, v))


def point_key(record: dict) -> tuple:
    """The sweep point of a record, whatever the implementation: (loss, dtype, device, batch,
    classes, scale, distribution)."""
    return (
        record["loss"],
        record["dtype"],
        record["device"],
        record["batch"],
        record["classes"],
        record["scale"],
        record["distribution"],
    )


@dataclass
class Versus:
    """How implementation `a` compares with `b` over the points both measured."""

    points: int = 0
    better: int = 0  # a strictly more accurate on at least one measure, worse on none
    worse: int = 0  # a strictly less accurate on at least one measure
    a_finite_b_not: int = 0  # b non-finite (or NaN error) where a is finite
    max_gain_bits: float = 0.0  # largest (b − a) in max bits, forward or gradient, both finite
    max_gain_where: str = ""
    max_loss_bits: float = 0.0  # largest (a − b), when a is worse somewhere


MEASURES = (("forward", "max_bits"), ("forward", "reduced_bits"), ("backward", "max_bits"))


def _measure(record: dict, section: str, key: str) -> float:
    s = record[section]
    if s is None:  # a gradient not measured: neither better nor worse
        return math.nan
    # Bits capped at p (METRICS.md): two results with no correct bit left are equally wrong.
    if key == "reduced_bits":
        r = s.get("reduced_ulp")
        return capped(math.log2(1 + r), record["dtype"]) if r is not None else 0.0
    return capped(s[key], record["dtype"])


def versus(records: list[dict], a: str = "stable", b: str | None = None) -> dict[tuple, Versus]:
    """(loss, dtype, device) -> Versus of implementation a against b (default: the framework
    family, families.framework()), point by point."""
    b = b or families.framework()
    key = point_key
    ok = [r for r in records if r["status"] == "ok"]
    bs = {key(r): r for r in ok if r["impl"] == b}
    out: dict[tuple, Versus] = defaultdict(Versus)
    for ra in (r for r in ok if r["impl"] == a):
        rb = bs.get(key(ra))
        if rb is None:
            continue
        v = out[(ra["loss"], ra["dtype"], ra["device"])]
        v.points += 1
        diffs = []
        for section, k in MEASURES:
            x, y = _measure(ra, section, k), _measure(rb, section, k)
            if math.isnan(x) or math.isnan(y):
                continue
            diffs.append(
                y - x
                if math.isfinite(x) and math.isfinite(y)
                else (math.inf if math.isfinite(x) else (-math.inf if math.isfinite(y) else 0.0))
            )
        if any(d < 0 for d in diffs):
            v.worse += 1
            v.max_loss_bits = max(v.max_loss_bits, -min(diffs))
        elif any(d > 0 for d in diffs):
            v.better += 1
        if any(math.isinf(d) and d > 0 for d in diffs):
            v.a_finite_b_not += 1
        finite_gain = max((d for d in diffs if math.isfinite(d)), default=0.0)
        if finite_gain > v.max_gain_bits:
            v.max_gain_bits = finite_gain
            v.max_gain_where = f"{ra['distribution']}, scale {ra['scale']:g}"
    return dict(out)
