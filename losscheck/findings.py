"""Findings: what went wrong, per implementation, named by its cause (METRICS.md, "Findings").

`findings(records)` turns result records into a list of plain dicts, one per (loss, variant,
impl, dtype, device, kind), in a deterministic order. The results file stores the list
(top-level `findings`), the Markdown report renders it, and `probe` prints it for its input.
It is a pure function of the records: a finding says nothing the records do not.

Each finding: `loss` (the base loss), `variant` (`analysis.variant`: options, sequence
length, a reduction other than the mean; "" for none), `impl`, `impl_kind` (naive, stable,
framework or custom: the record's `kind`), `dtype`, `device`, `kind`, `evidence` (JSON
numbers, strings, booleans and lists only, all finite: the scales, value sets, batch sizes,
counts of points and elements, worst bits, first scale) and `message` (one sentence a
reviewer can quote).

Only `ok` records count. Per record, with T the record's threshold in ULPs
(`metrics.ulp_threshold(threshold_bits)`) and, per section (forward elements, gradient):

* non-finite results: the `nan` + `inf` counters, or an infinite `max_ulp` not explained by
  `clamped` (a NaN or an infinity of the wrong sign against an infinite reference);
* far-off finite elements: `clamped` plus the `saturated` elements beyond those flushed to
  zero (`saturated` − `underflow`, at least 0: a flush to zero is scored by its distance, so
  it may be counted as saturated as well, and then it is an underflow, not a saturation);
* elements *off*: either of the above, or `max_ulp` > T where nothing was flushed to zero;
* the reduced value is *wrong*: `forward.reduced_ulp` > T (or NaN), reduction not `none`.

The kinds, from those facts:

Scales here are effective ones (`effective_scale`): the swept scale over the point's
`temperature` option where it has one (softmax(x / T) sees logits T times larger), in the
evidence (`scales`, `first_scale`, `smallest_scale`, with `temperature`) and the messages.

* `formula` — wrong on well-conditioned inputs (value sets `normal`, `uniform`): the
  smallest swept scale of those value sets is <= 1, and at every swept scale <= 1 *every*
  point of those value sets (each batch size, reduction, value set) has forward or gradient
  elements *off*. Every point, not some: a large sample of N(0, 1) reaches |x| ≈ 5, where an
  instability may already show in half precision while the smaller batches are exact. And
  the same holds in the widest dtype swept for that (loss, variant, impl, device) (float64
  in most sweeps): a wrong formula is wrong in every precision, most visibly in the widest,
  while a precision problem is mildest there (torch's float16 gradient p − q with soft or
  smoothed targets cancels where p ≈ q and loses 8 bits at scale 1, but is right in float64).
  Elementwise only: a wrong reduced value with every element right is a `reduction`, never a
  formula error, so a framework implementation is called a formula error only when its
  elements are wrong on well-conditioned inputs. An
  instability is exact at small logits and breaks as they grow; a wrong formula (a missing
  bracket, a wrong sign) is wrong from the start.
* `overflow` — non-finite forward or gradient elements on finite inputs (every value set
  but `nonfinite`).
* `saturation` — far-off finite elements (the `saturated` counter, `clamped` against an
  infinite reference included), or a finite reduced value beyond T at a point whose elements
  are off without a counter saying how (files from before the counters).
* `underflow` — a non-zero reference flushed to zero (the `underflow` counter).
* `reduction` — every forward and gradient element within T and finite, the reduced value
  wrong: a sum or mean overflowing, a count or total weight overflowing, accumulated error.
* `limit` — non-finite elements at ±inf logits (the `nonfinite` value set,
  `analysis.SCALE_FREE`), where the limit (the reference) is finite (NaN: or infinite).
* `undefined` — the mean over no elements (record `undefined` set: every target ignored or
  a total weight of 0; reference 0 by convention) where the implementation returned NaN or
  ±inf, or a non-finite gradient. At those points the gradient and the reduced value are
  judged by this kind only (a NaN gradient of 0/0 is not an overflow); their forward
  elements are judged as anywhere else.

How kinds coexist in one group (loss, variant, impl, dtype, device): `overflow`,
`saturation`, `underflow`, `reduction`, `limit` and `undefined` are independent facts and may
all be present (e.g. an implementation that saturates in float32 at scale 30 and overflows at
1000). `formula` pre-empts `overflow`, `saturation`, `underflow` and `reduction`: with a wrong
formula, what else goes wrong as the logits grow is its consequence, not another cause (the
missing-bracket BCE returning -inf at large scales is not an "overflow" to fix). It does not
pre-empt `limit` and `undefined`: those are about special inputs (±inf logits, nothing to
average), whose fix (a guard, a convention) is separate from the formula's.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from . import families
from .analysis import NOT_SCORED, SCALE_FREE, WELL_CONDITIONED, variant
from .catalog import loss_registry
from .formats import FORMATS, bits_phrase, capped_bits as formats_capped_bits, counted_in, precision, ulp_threshold

KINDS = ("formula", "overflow", "saturation", "underflow", "reduction", "limit", "undefined")
# What every finding holds (results.load checks it).
FINDING_KEYS = ("loss", "variant", "impl", "impl_kind", "dtype", "device", "kind", "evidence", "message")
# Kinds a wrong formula makes meaningless in its group (see the module docstring).
PRE_EMPTED_BY_FORMULA = ("overflow", "saturation", "underflow", "reduction")
FORMULA_MAX_SCALE = 1.0


def effective_scale(r: dict) -> float:
    """The logits' scale as the loss sees it. A temperature T divides them (kl_div, js_div:
    softmax(x / T)), so the swept scale 1 at T = 0.05 is scale 20 to the loss: a breakdown there
    is an instability at scale 20, not a formula error at scale 1 (issue 18, Soup #719)."""
    t = (r.get("options") or {}).get("temperature", 1.0)
    return float(r["scale"]) / t if isinstance(t, (int, float)) and t > 0 else float(r["scale"])


# ---- bits ------------------------------------------------------------------------------------


def capped_bits(ulp, dtype: str) -> float | None:
    """`formats.capped_bits`, rounded to 2 decimals as findings and probe show it."""
    b = formats_capped_bits(ulp, dtype)
    return None if b is None else round(b, 2)


def bits_text(bits: float | None, dtype: str) -> str:
    """ "all bits lost" where bits reach p, else "12.3 bits off"."""
    return "—" if bits is None else bits_phrase(bits, dtype, digits=1)


# ---- per record facts ------------------------------------------------------------------------


def _n(section: dict | None, key: str) -> int:
    if not section:
        return 0
    v = section.get(key, 0)
    return v if type(v) is int and v > 0 else 0  # results.load checks the counts; 0 if absent


def _ulp(section: dict | None) -> float | None:
    v = (section or {}).get("max_ulp")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _nonfinite_elements(s: dict | None) -> int:
    return _n(s, "nan") + _n(s, "inf")


def _nonfinite_result(s: dict | None) -> bool:
    u = _ulp(s)
    return _nonfinite_elements(s) > 0 or (u is not None and u == math.inf and _n(s, "clamped") == 0)


def _far(s: dict | None) -> int:
    return _n(s, "clamped") + max(_n(s, "saturated") - _n(s, "underflow"), 0)


def _off(s: dict | None, t: float) -> bool:
    if not s:
        return False
    u = _ulp(s)
    beyond = u is not None and not u <= t  # NaN counts as beyond
    return _nonfinite_result(s) or _far(s) > 0 or (_n(s, "underflow") == 0 and beyond)


def _reduced_wrong(rec: dict, t: float) -> bool:
    if rec.get("reduction", "mean") == "none":
        return False
    r = rec["forward"].get("reduced_ulp")
    return isinstance(r, (int, float)) and not r <= t


def _value_str(v) -> str:
    """A returned value as text (JSON-safe: NaN and inf as words)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "none"
    try:
        v = float(v)
    except OverflowError:  # an integer beyond float range, from a hand-edited file
        return "inf" if v > 0 else "-inf"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


class _Acc:
    """Evidence of one kind in one group, accumulated point by point."""

    def __init__(self):
        self.recs: list[dict] = []
        self.elements = 0
        self.total = 0
        self.nan = 0
        self.inf = 0
        self.clamped = 0
        self.bits: list[float] = []
        self.returned: set[str] = set()
        self.grad_nonfinite = 0
        self.every_scale = False  # formula only
        self.smallest = 0.0  # formula only
        self.widest = ""  # formula only: the widest dtype, where it is wrong too

    def add(self, rec: dict, elements: int = 0, total: int = 0, bits: float | None = None) -> None:
        self.recs.append(rec)
        self.elements += elements
        self.total += total
        if bits is not None:
            self.bits.append(bits)


def _total(*sections) -> int:
    return sum(_n(s, "n") for s in sections if s)


def _worst_element_bits(rec: dict, *sections) -> float | None:
    # Each section in its own dtype (a widened forward: formats.counted_in); None where no distance.
    capped = [capped_bits(_ulp(s), s.get("dtype", rec["dtype"])) for s in sections if s]
    bits = [b for b in capped if b is not None]
    return max(bits) if bits else None


def _classify(rec: dict, acc: dict[str, _Acc]) -> None:
    f = rec["forward"]
    undefined = bool(rec.get("undefined"))
    # At an undefined mean the gradient is that of 0/0: judged by `undefined` only.
    b = None if undefined else rec.get("backward")
    t = ulp_threshold(float(rec["threshold_bits"]))
    f_dtype, f_threshold = counted_in(rec)
    tf = ulp_threshold(f_threshold)  # t but for a forward a precision policy widened
    total = _total(f, b)
    if _nonfinite_result(f) or _nonfinite_result(b):
        a = acc["limit" if rec["distribution"] in SCALE_FREE else "overflow"]
        a.add(rec, _nonfinite_elements(f) + _nonfinite_elements(b), total)
        a.nan += _n(f, "nan") + _n(b, "nan")
        a.inf += _n(f, "inf") + _n(b, "inf")
    far = _far(f) + _far(b)
    elements_off = _off(f, tf) or _off(b, t)
    reduced_wrong = not undefined and _reduced_wrong(rec, tf)
    value = f.get("value")
    if far or (
        reduced_wrong
        and elements_off
        and not (_nonfinite_result(f) or _nonfinite_result(b))
        and isinstance(value, (int, float))
        and math.isfinite(value)
    ):
        a = acc["saturation"]
        a.add(rec, far, total, _worst_element_bits(rec, f, b))
        a.clamped += _n(f, "clamped") + _n(b, "clamped")
    under = _n(f, "underflow") + _n(b, "underflow")
    if under:
        acc["underflow"].add(rec, under, total)
    if reduced_wrong and not elements_off:
        a = acc["reduction"]
        a.add(rec, 0, total, capped_bits(f.get("reduced_ulp"), f_dtype))
        a.returned.add(_value_str(value))
    if undefined:
        grad = rec.get("backward")
        bad_value = isinstance(value, (int, float)) and not math.isfinite(value)
        bad_grad = _nonfinite_result(grad)
        if bad_value or bad_grad:
            a = acc["undefined"]
            a.add(rec, _nonfinite_elements(grad), _total(grad))
            a.returned.add(_value_str(value))
            a.grad_nonfinite += int(bad_grad)


def _formula_tested(recs: list[dict]) -> bool:
    """Whether the group has well-conditioned points at a scale <= 1 (formula can be judged)."""
    return any(r["distribution"] in WELL_CONDITIONED and effective_scale(r) <= FORMULA_MAX_SCALE for r in recs)


def _formula(recs: list[dict]) -> _Acc | None:
    """The group's formula error (see the module docstring), or None."""
    wc = [r for r in recs if r["distribution"] in WELL_CONDITIONED]
    if not wc:
        return None
    small = sorted({effective_scale(r) for r in wc if effective_scale(r) <= FORMULA_MAX_SCALE})
    if not small:  # the sweep starts above scale 1: nothing says the formula is wrong
        return None

    def off(r):
        t = ulp_threshold(float(r["threshold_bits"]))
        return _off(r["forward"], ulp_threshold(counted_in(r)[1])) or (
            not r.get("undefined") and _off(r.get("backward"), t)
        )

    # Every well-conditioned point at those scales, not some: an instability can reach the
    # tail of a large sample already at scale 1 (|x| ≈ 5 among 2^18 normal draws, where
    # torch's float16 BCE-with-logits loses 8 bits) while the smaller samples stay exact;
    # a wrong formula is wrong at every point (every batch holds both targets).
    if not all(off(r) for r in wc if effective_scale(r) <= FORMULA_MAX_SCALE):
        return None
    wrong = [r for r in wc if off(r)]
    wrong_scales = {effective_scale(r) for r in wrong}
    acc = _Acc()
    for r in wrong:
        b = None if r.get("undefined") else r.get("backward")
        f = r["forward"]
        acc.add(
            r,
            _nonfinite_elements(f) + _nonfinite_elements(b) + _far(f) + _far(b),
            _total(f, b),
            _worst_element_bits(r, f, b),
        )
    acc.every_scale = wrong_scales == {effective_scale(r) for r in wc}
    acc.smallest = small[0]
    return acc


# ---- evidence and messages -------------------------------------------------------------------


def _fmt_scale(s: float) -> str:
    return str(int(s)) if float(s).is_integer() and abs(s) < 1e15 else f"{s:g}"


def _scale_list(scales) -> str:
    return ", ".join(_fmt_scale(s) for s in scales)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _evidence(kind: str, a: _Acc) -> dict:
    recs = a.recs
    scales = sorted({effective_scale(r) for r in recs})  # the swept scale over the temperature, if any
    temperatures = {(r.get("options") or {}).get("temperature", 1.0) for r in recs}
    ev = {
        "points": len(recs),
        "scales": scales,
        "first_scale": scales[0],
        "distributions": sorted({r["distribution"] for r in recs}),
        "batches": sorted({r["batch"] for r in recs}),
        "reductions": sorted({r.get("reduction", "mean") for r in recs}),
        "threshold_bits": max(float(r["threshold_bits"]) for r in recs),
    }
    if temperatures != {1.0}:  # one per group (it is part of the variant)
        ev["temperature"] = float(min(temperatures))
    if kind != "reduction":
        ev["elements"] = a.elements
        ev["of_elements"] = a.total
    if a.bits:
        ev["worst_bits"] = max(a.bits)
    if kind in ("overflow", "limit"):
        ev["nan"], ev["inf"] = a.nan, a.inf
    if kind == "saturation":
        ev["clamped"] = a.clamped
    if kind in ("reduction", "undefined"):
        ev["returned"] = sorted(a.returned)
    if kind == "undefined":
        ev["gradient_nonfinite_points"] = a.grad_nonfinite
    if kind == "formula":
        ev["smallest_scale"] = float(a.smallest)
        ev["every_scale"] = bool(a.every_scale)
        ev["widest_dtype"] = a.widest
    return ev


def _message(kind: str, subject: str, ev: dict, dtype: str) -> str:
    # "nan" as values print (and never "NaN" or "Infinity": the literals strict JSON forbids).
    # With a temperature the scales are effective ones (`effective_scale`), and say so.
    word, over_t = ("scale", "")
    if "temperature" in ev:
        word, over_t = ("effective scale", f": the logit scale over temperature {ev['temperature']:g}")
    first = f"{word} {_fmt_scale(ev['first_scale'])}"
    plural = "s" if len(ev["scales"]) > 1 else ""
    at = f"{_plural(ev['points'], 'point')}, {word}{plural} {_scale_list(ev['scales'])}{over_t}"
    worst = f", up to {bits_text(ev['worst_bits'], dtype)}" if "worst_bits" in ev else ""
    red = "/".join(ev["reductions"])
    if kind == "formula":
        return (
            f"{subject} is wrong elementwise on well-conditioned inputs ({', '.join(ev['distributions'])}) "
            f"already at {word} {_fmt_scale(ev['smallest_scale'])}"
            f"{' and at every swept scale' if ev['every_scale'] else ''} "
            f"({_plural(ev['elements'], 'element')} off{worst}"
            f"{'' if ev['widest_dtype'] == dtype else ', and in ' + ev['widest_dtype'] + ' too'}): "
            "a formula error, not an instability."
        )
    # Elements are counted by the nan/inf counters; a NaN against an infinite reference in a
    # file from before the counters took it in is seen only in max_ulp: a point, no count.
    counted = (
        f"at {_plural(ev.get('elements', 0), 'element')} ({ev['nan']} nan, {ev['inf']} ±inf)"
        if kind in ("overflow", "limit") and ev.get("elements")
        else ""
    )
    if kind == "overflow":
        return (
            f"{subject} returns nan or ±inf {counted or 'at some elements'} where the reference is "
            f"finite (or, for nan, infinite), from {first} ({at})."
        )
    if kind == "saturation":
        clamped = f", {ev['clamped']} clamped against an infinite reference" if ev["clamped"] else ""
        return (
            f"{subject} returns finite values more than {ev['threshold_bits']:g} bits off at "
            f"{_plural(ev['elements'], 'element')}{clamped}{worst}, from {first} ({at}): "
            "silent saturation."
        )
    if kind == "underflow":
        return f"{subject} flushes {_plural(ev['elements'], 'non-zero reference value')} to zero, from {first} ({at})."
    if kind == "reduction":
        return (
            f"{subject} has every element within tolerance but a wrong {red} "
            f"(returned {', '.join(ev['returned'])}{worst}) at batch {', '.join(map(str, ev['batches']))}, "
            f"from {first} ({at}): the reduction overflows or accumulates error, not the formula."
        )
    if kind == "limit":
        return (
            f"{subject} returns nan or ±inf at ±inf logits where the limit is finite (or, for nan, "
            f"infinite), {counted + ', ' if counted else ''}at {_plural(ev['points'], 'point')}."
        )
    grad = (
        f", with a nan/inf gradient at {_plural(ev['gradient_nonfinite_points'], 'point')}"
        if ev["gradient_nonfinite_points"]
        else ""
    )
    return (
        f"{subject} returns {', '.join(ev['returned'])} for the {red} over no elements (every target "
        f"ignored, or a total weight of 0) where the convention is 0{grad} ({_plural(ev['points'], 'point')})."
    )


# Where in a sweep (", from scale 30 (3 points, scales 30, 100)"), dropped for a probe.
_SWEEP_CLAUSE = re.compile(r",? from (?:effective )?scale [^ ]+ \(\d+ points?, (?:effective )?scales? [^)]*\)")


def _rank(key: tuple) -> tuple:
    loss, var, impl, dtype, device = key
    order = list(loss_registry())  # the registry's order
    return (
        order.index(loss) if loss in order else len(order),
        loss,
        var,
        *families.order_key(impl),
        list(FORMATS).index(dtype) if dtype in FORMATS else len(FORMATS),
        dtype,
        device,
    )


def findings(records: list[dict], sweep: bool = True) -> list[dict]:
    """The findings of `records` (see the module docstring), sorted by loss, variant,
    implementation, dtype, device and kind.

    `sweep=False` is for one point of the user's own input (`probe`): no `formula` (that
    needs well-conditioned inputs at several scales), and no scales or value sets in the
    evidence and messages (the probe's scale and value set are nominal)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok" and isinstance(r.get("forward"), dict) and r["distribution"] not in NOT_SCORED:
            groups[(r["loss"], variant(r), r["impl"], r["dtype"], r["device"])].append(r)
    formulas = {key: _formula(recs) for key, recs in groups.items()} if sweep else {}
    # The widest dtype tested for formula errors, per (loss, variant, impl, device).
    widest: dict[tuple, str] = {}
    for key in groups:
        if sweep and _formula_tested(groups[key]):
            k = (key[0], key[1], key[2], key[4])
            if k not in widest or (precision(key[3]) or 0) > (precision(widest[k]) or 0):
                widest[k] = key[3]
    out = []
    for key in sorted(groups, key=_rank):
        recs = groups[key]
        acc: dict[str, _Acc] = defaultdict(_Acc)
        for r in recs:
            _classify(r, acc)
        formula = formulas.get(key)
        wide = widest.get((key[0], key[1], key[2], key[4]))
        # Wrong in the widest dtype too, or it is a matter of precision, not of the formula.
        if formula is not None and wide is not None and formulas.get((*key[:3], wide, key[4])) is not None:
            formula.widest = wide
            for pre_empted in PRE_EMPTED_BY_FORMULA:
                acc.pop(pre_empted, None)
            acc["formula"] = formula
        loss, var, impl, dtype, device = key
        kinds = {recs[0].get("kind", "")} if recs else set()
        impl_kind = kinds.pop()
        subject = (
            f"{impl}{' (custom)' if impl_kind == 'custom' else ''} {loss}"
            f"{f' [{var}]' if var else ''} in {dtype} on {device}"
        )
        for kind in KINDS:
            if kind not in acc or not acc[kind].recs:
                continue
            ev = _evidence(kind, acc[kind])
            message = _message(kind, subject, ev, dtype)
            if not sweep:
                for field in ("scales", "first_scale", "distributions"):
                    del ev[field]
                message = _SWEEP_CLAUSE.sub("", message)
            out.append(
                {
                    "loss": loss,
                    "variant": var,
                    "impl": impl,
                    "impl_kind": impl_kind,
                    "dtype": dtype,
                    "device": device,
                    "kind": kind,
                    "evidence": ev,
                    "message": message,
                }
            )
    return out


# The evidence's keys and their types, checked on load where present (the report renders them).
EVIDENCE_TYPES = {
    "points": "count",
    "elements": "count",
    "of_elements": "count",
    "nan": "count",
    "inf": "count",
    "clamped": "count",
    "gradient_nonfinite_points": "count",
    "first_scale": "number",
    "smallest_scale": "number",
    "worst_bits": "number",
    "threshold_bits": "number",
    "every_scale": "boolean",
    "scales": "list",
    "distributions": "list",
    "batches": "list",
    "reductions": "list",
    "returned": "list",
    "widest_dtype": "string",
}
_TYPE_TEXT = {
    "string": "a string",
    "count": "a count",
    "number": "a finite number",
    "boolean": "true or false",
    "list": "a list of strings and numbers",
}


def _type_ok(v, kind: str) -> bool:
    if kind == "string":
        return isinstance(v, str)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "list":
        return isinstance(v, list) and all(isinstance(x, str) or _finite(x) for x in v)
    if kind == "count":
        return type(v) is int and v >= 0
    return _finite(v)


def _finite(v) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def problem(finding) -> str | None:
    """What is wrong with a stored finding (results.load), or None."""
    if not isinstance(finding, dict):
        return "is not an object"
    for key in FINDING_KEYS:
        if key not in finding:
            return f"lacks key '{key}'"
    for key in FINDING_KEYS:
        if key != "evidence" and not isinstance(finding[key], str):
            return f"'{key}' must be a string"
    if finding["kind"] not in KINDS:
        return f"kind {finding['kind']!r} is not one of {', '.join(KINDS)}"
    if not isinstance(finding["evidence"], dict):
        return "'evidence' must be an object"
    for key, kind in EVIDENCE_TYPES.items():
        if key in finding["evidence"] and not _type_ok(finding["evidence"][key], kind):
            return f"'evidence.{key}' must be {_TYPE_TEXT[kind]}, not {finding['evidence'][key]!r}"[:200]
    return None
