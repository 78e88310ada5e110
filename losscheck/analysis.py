"""Derived numbers shared by the report and later by the gate: breakdown scales, worst cases.

Pure functions of result records (plain dicts as stored in the results file).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .metrics import ulp_threshold


def nonfinite(section: dict | None) -> int:
    return 0 if not section else int(section.get("nan", 0)) + int(section.get("inf", 0))


def reduced_nonfinite(record: dict) -> bool:
    """The reduced loss is non-finite although its reference is finite."""
    f = record.get("forward") or {}
    value, ref = f.get("value"), f.get("reference")
    return (value is not None and ref is not None and math.isfinite(ref)
            and not math.isfinite(value))


def breaks(record: dict) -> str | None:
    """Why an `ok` record counts as broken (METRICS.md, "Breakdown scale"), or None.

    Broken: any non-finite value where the reference is finite (forward elements, the
    reduced loss, or the gradient), or a reduced loss more than the threshold off.
    """
    if record.get("status") != "ok":
        return None
    f, b = record["forward"], record["backward"]
    if nonfinite(f) or reduced_nonfinite(record):
        return "fwd non-finite"
    if nonfinite(b):
        return "bwd non-finite"
    r = f.get("reduced_ulp")
    if r is not None and r > ulp_threshold(record["threshold_bits"]):
        return f"mean {math.log2(1 + r):.0f} bits off"
    return None


def silently_saturated(record: dict) -> bool:
    """Finite results far off: per-element saturation, or a finite reduced loss above the threshold."""
    if record.get("status") != "ok":
        return False
    f = record["forward"]
    if f.get("saturated", 0) or (record["backward"] or {}).get("saturated", 0):
        return True
    value, r = f.get("value"), f.get("reduced_ulp")
    return (value is not None and math.isfinite(value) and r is not None
            and r > ulp_threshold(record["threshold_bits"]))


@dataclass(frozen=True)
class Breakdown:
    scale: float | None  # None: never breaks within the sweep
    reason: str
    status: str  # "measured", "error" (no ok point), "skipped"


def breakdown_scales(records: list[dict]) -> dict[tuple, Breakdown]:
    """(loss, impl, dtype, device) -> the smallest swept scale at which any point breaks."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["loss"], r["impl"], r["dtype"], r["device"])].append(r)
    out = {}
    for key, recs in groups.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            status = "skipped" if all(r["status"] == "skipped" for r in recs) else "error"
            out[key] = Breakdown(None, recs[0].get("message", ""), status)
            continue
        broken = sorted((r["scale"], breaks(r)) for r in ok if breaks(r))
        if broken:
            out[key] = Breakdown(broken[0][0], broken[0][1], "measured")
        else:
            out[key] = Breakdown(None, "", "measured")
    return out


def worst(values) -> float | None:
    """The maximum of the values that exist (None when none does)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return max(vals, key=lambda v: (not math.isnan(v), v) if isinstance(v, float) else (True, v))
