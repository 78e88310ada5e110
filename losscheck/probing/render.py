"""The probe's outputs: the terminal table with its notes, and strict JSON."""

from __future__ import annotations

import json
import math

from tabulate import tabulate

from ..results import encode
from .evaluate import ProbeResult
from .text import _bits_cell, _fmt, _index, _plural, _shape, _ulp_cell, _where_from


def table_rows(result: ProbeResult) -> list[list[str]]:
    rows = []
    ref_cell = _fmt(result.reference["forward"], result.dtype) if result.reduction != "none" else "—"
    if result.reference["undefined"]:
        ref_cell += " (undefined)"
    for r in result.results:
        name = r["impl"] if r["kind"] != "custom" else f"{r['impl']} (custom)"
        if r["forward"] is None:
            rows.append([name, r["status"], ref_cell] + ["—"] * 7)
            continue
        f, b = r["forward"], r["backward"]
        w = f.get("worst")
        if w is None:
            worst = "—"
        elif w["ulp"] == 0:
            worst = "all exact"
        else:
            worst = (
                f"{_index(w['index'])}: {_fmt(w['value'], result.dtype)} vs {_fmt(w['reference'], result.dtype)}"
                f" ({_ulp_cell(w['ulp'])} ULP)"
            )
        rows.append(
            [
                name,
                _fmt(f["value"], result.dtype) if result.reduction != "none" else "—",
                ref_cell,
                _ulp_cell(f["reduced_ulp"]),
                _bits_cell(f["reduced_bits"], result.dtype),
                _bits_cell(f["max_bits"], result.dtype),
                f"{f['nan']}/{f['inf']}",
                "—" if b is None else _bits_cell(b["max_bits"], result.dtype),
                "—" if b is None else f"{b['nan']}/{b['inf']}",
                worst,
            ]
        )
    return rows


HEADERS = [
    "impl",
    "loss",
    "reference",
    "ULP",
    "bits",
    "fwd max bits",
    "fwd nan/inf",
    "grad max bits",
    "grad nan/inf",
    "worst element (value vs reference)",
]


def render_table(result: ProbeResult) -> str:
    """The terminal output: what was probed, one table, then the notes."""
    inp = result.input
    conv = "unchanged" if not inp.changed else f"{_plural(inp.changed, 'value')} changed"
    head = [
        f"{result.loss}, {result.dtype} on {result.device}, reduction {result.reduction}",
        f"input:  {_where_from(inp.source)} {_shape(inp.shape)} {inp.from_dtype} -> {result.dtype} ({conv})",
        (
            f"target: none ({result.loss} takes none)"
            if result.target["kind"] == "none"
            else f"target: {_where_from(result.target['source'])} {_shape(result.target['shape'])} "
            f"{result.target['from_dtype']}" + (" (soft targets)" if result.target["kind"] == "soft" else "")
        ),
    ]
    opts = {k: v for k, v in result.options.items() if k != "targets"}
    if opts:
        head.append(
            "options: " + ", ".join(f"{k} {v if k != 'weight' else _shape(v['shape'])}" for k, v in opts.items())
        )
    ref = result.reference
    if result.case.policy != "native":  # precision.py: what the implementations ran under
        head.append(f"precision: {result.case.policy} (a wider output is audited in its own dtype)")
    upstream = dict(result.case.options).get("grad_output")
    if upstream:  # the audited gradient is that of Σ g·loss (METRICS.md "Upstream gradients")
        head.append(f"upstream gradient: {upstream} (the gradient audited is that of Σ g·loss)")
    if result.reduction == "none":
        head.append("reference: per element (reduction none)")
    else:
        value = (
            (
                "nan: undefined (see below)"
                if ref["forward"] is not None and math.isnan(ref["forward"])
                else f"undefined, 0/0 (the sensible answer: {_fmt(ref['forward'], result.dtype)}; see below)"
            )
            if ref["undefined"]
            else (
                f"{_fmt(ref['forward'], result.dtype)} (before rounding: {ref['value']!r})"
                if ref["value"] is not None and math.isfinite(ref["value"])
                else _fmt(ref["forward"], result.dtype)
            )
        )
        head.append(f"reference {result.reduction}: {value}")
    table = tabulate(table_rows(result), headers=HEADERS, tablefmt="simple", disable_numparse=True)
    out = "\n".join(head) + "\n\n" + table + "\n"
    out += (
        "\nfindings:"
        + (
            "".join(f"\n- {f['kind']}: {f['message']}" for f in result.findings)
            if result.findings
            else " none (every implementation within tolerance here)"
        )
        + "\n"
    )
    if result.notes:
        out += "\n" + "\n".join(f"- {n}" for n in result.notes) + "\n"
    out += (
        "\nULP/bits: the reduced loss against the correctly rounded reference; fwd/grad max bits: the worst "
        "element of the 'none' loss / of the gradient of the reduced loss; nan/inf counted where the "
        "reference is finite (METRICS.md).\n"
    )
    return out


def to_dict(result: ProbeResult) -> dict:
    return {
        "loss": result.loss,
        "dtype": result.dtype,
        "device": result.device,
        "reduction": result.reduction,
        "input": result.input.as_dict(),
        "target": result.target,
        "options": result.options,
        "reference": result.reference,
        "results": result.results,
        "notes": result.notes,
        "findings": result.findings,
    }


def to_json(result: ProbeResult) -> str:
    """Strict JSON: non-finite numbers as the strings "inf", "-inf", "nan" (as in results files)."""
    return json.dumps(encode(to_dict(result)), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
