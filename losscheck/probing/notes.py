"""The probe's explanations: where the true value is a limit or undefined, and what each
implementation did there."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..losses import Loss, Reference
from ..losses.base import class_dim, rows_of
from ..metrics import int_or_inf, ulp_distance
from .text import _fmt, _index, _num, _plural, _shape, _signed, _unravel

# What an implementation did with out-of-domain inputs (a record's `out_of_domain.outcome`).
_OUTCOME_TEXT = {"raised": "raised an error", "nan": "returned NaN there", "number": "returned a number there (silent)"}


def _notes(
    loss: Loss,
    shape: dict,
    stats: dict,
    conversions: list,
    ref: Reference,
    records: list[dict],
    outputs: dict,
    dtype: str,
    reduction: str,
    target_info: dict,
    tgt: torch.Tensor,
    inp: torch.Tensor,
    options: dict,
) -> list[str]:
    notes: list[str] = []
    if not loss.multiclass and len(shape["shape"]) != 1:
        notes.append(
            f"the input of shape {_shape(shape['shape'])} is flattened to ({shape['rows']},): "
            f"{loss.name} is elementwise, so the mean and sum are unchanged; indices are in the input's shape"
        )
    for conv in conversions:
        s = conv.sentence()
        if s:
            notes.append(s)
    if target_info.get("ignored"):
        notes.append(
            f"ignore_index {target_info['ignore_index']}: {target_info['ignored']} of "
            f"{target_info['ignored'] + target_info['kept']} targets ignored"
            + (f"; the mean is over the other {target_info['kept']}" if target_info["kept"] else "")
        )
    rows_shape = tuple(ref.loss.shape) if loss.multiclass else shape["shape"]
    ref_flat = ref.loss.reshape(-1)
    ref_nan = ref_flat.isnan().numpy()

    if stats["outside"]:
        i, v = stats["outside_example"]
        notes.append(
            f"{_plural(stats['outside'], 'probability')} outside [0, 1] (e.g. {_index(_unravel(i, rows_shape))}: "
            f"{_fmt(v, dtype)}): outside the loss's domain, no true value; not scored"
        )
    if ref.out_of_domain:
        did = "; ".join(
            f"{r['impl']} {_OUTCOME_TEXT[r['out_of_domain']['outcome']]}" for r in records if r.get("out_of_domain")
        )
        notes.append(f"out-of-domain inputs: {did}")
    # A NaN input: upstream of the loss.
    if stats["nan"]:
        k = int(stats["nan_rows"].sum())
        first = int(np.argmax(stats["nan_rows"]))
        where = "rows" if loss.multiclass else "elements"
        notes.append(
            f"the input holds {_plural(stats['nan'], 'NaN value')} (in {_plural(k, where[:-1])}, e.g. "
            f"{_index(_unravel(first, rows_shape))}): "
            "the loss is undefined there (NaN in, NaN out) — the NaN comes from upstream of the loss"
        )

    # ±inf inputs: the reference is the limit.
    limit_rows = stats["inf_rows"] & ~stats["nan_rows"]
    if limit_rows.any():
        idx = np.flatnonzero(limit_rows)
        has_limit = idx[~ref_nan[idx]]
        first = int(idx[0])
        example = _describe_row(loss, inp, tgt, first, rows_shape, dtype, options)
        lim = ref_flat[first]
        what = (
            "the limit does not exist (NaN)" if math.isnan(float(lim)) else f"limit {_signed(_fmt(float(lim), dtype))}"
        )
        noun = ("row" if loss.multiclass and not loss.elementwise else "element") + ("s" if len(idx) > 1 else "")
        s = f"{len(idx)} {noun} with ±inf logits: the true loss there is a limit, not a number (e.g. {example}: {what})"
        if len(has_limit):
            there = (
                "There"
                if len(idx) == 1
                else (f"At the {len(has_limit)} with a limit" if len(has_limit) < len(idx) else f"At these {len(idx)}")
            )
            s += f". {there}: " + _what_each_did(records, outputs, ref_flat, has_limit, rows_shape, dtype)
        notes.append(s)

    # Undefined elements (NaN reference without a NaN input): several +inf logits, or all −inf.
    undefined_rows = ref_nan & ~stats["nan_rows"]
    if undefined_rows.any():
        idx = np.flatnonzero(undefined_rows)
        first = int(idx[0])
        example = _describe_row(loss, inp, tgt, first, rows_shape, dtype, options)
        notes.append(
            f"{len(idx)} {'rows have' if len(idx) > 1 else 'row has'} no limit (reference NaN: several "
            f"+inf logits with the target among them, or every logit -inf; e.g. {example})"
            + ("" if reduction == "none" else f", so the {reduction} is undefined (NaN) too")
        )

    # 0/0: every target ignored.
    if ref.undefined:
        notes.append(f"{ref.undefined[0].upper()}{ref.undefined[1:]}. " + _reduced_did(records, dtype))

    # An infinite reference (a probability of exactly 0 or 1 against its target, a −inf target
    # logit, or a loss beyond the dtype's range).
    # (Rows with ±inf logits are explained above.)
    inf_mask = ref_flat.isinf().numpy() & ~stats["inf_rows"]
    inf_ref = int(inf_mask.sum())
    if inf_ref:
        idx = np.flatnonzero(inf_mask)
        first = int(idx[0])
        notes.append(
            f"the reference is +inf at {inf_ref} element{'s' if inf_ref > 1 else ''} "
            f"(e.g. {_describe_row(loss, inp, tgt, first, rows_shape, dtype, options)}): the true loss there is "
            f"infinite or beyond {dtype}'s range, so +inf is exact and a finite value is silent "
            "saturation. " + _what_each_did(records, outputs, ref_flat, idx, rows_shape, dtype, "the reference")
        )
    if (
        ref.value is not None
        and math.isfinite(ref.value)
        and ref.reduced is not None
        and not math.isfinite(float(ref.reduced))
    ):
        notes.append(
            f"the {reduction} {ref.value:.6g} is beyond {dtype}'s range: correctly rounded it is "
            f"{_fmt(float(ref.reduced), dtype)}"
        )
    for rec in records:
        if rec["status"] == "error":
            notes.append(f"{rec['impl']} failed: {rec['message']}")
        elif rec["message"]:
            notes.append(f"{rec['impl']}: {rec['message']}")
    return notes


def _describe_row(
    loss: Loss, inp: torch.Tensor, tgt: torch.Tensor, i: int, rows_shape, dtype: str, options: dict | None = None
) -> str:
    where = _index(_unravel(i, rows_shape))
    if loss.elementwise:  # log_softmax: `i` is an element (in the input's layout) of a row along `dim`
        dim = class_dim(loss, inp, options)
        idx = _unravel(i, tuple(inp.shape))
        row = inp.movedim(dim, -1)[tuple(idx[:dim]) + tuple(idx[dim + 1 :])]  # the row along `dim`
        return f"element {where} (dim {dim}: {_row_infinities(row) or 'finite logits'})"
    if not loss.multiclass:
        kind = "p" if loss.input_kind == "probabilities" else "input"
        return (
            f"{where}: {kind} {_signed(_fmt(float(inp.reshape(-1)[i]), dtype))}, "
            f"target {_num(float(tgt.reshape(-1)[i]))}"
        )
    row = rows_of(loss, inp, inp)[0][i]  # (N, C, d…) inputs: classes in dimension 1
    described = _row_infinities(row)
    if tgt.is_floating_point():
        return f"row {where}: {described or 'finite logits'}, soft target"
    t = int(tgt.reshape(-1)[i])
    return (
        f"row {where}: {described or 'finite logits'}, target {t} "
        f"(logit {_signed(_fmt(float(row[t]), dtype)) if 0 <= t < row.shape[0] else 'ignored'})"
    )


def _row_infinities(row: torch.Tensor) -> str:
    """How many logits of a row are +inf and -inf ("" if none)."""
    pos, neg = int((row == math.inf).sum()), int((row == -math.inf).sum())
    parts = [f"{k} logit{'s' if k > 1 else ''} {sign}inf" for k, sign in ((pos, "+"), (neg, "-")) if k]
    return ", ".join(parts)


def _what_each_did(records, outputs, ref_flat, idx, rows_shape, dtype, word: str = "the limit") -> str:
    """What each implementation returned at the elements `idx` (where the reference is a finite limit)."""
    parts = []
    refs = ref_flat[torch.from_numpy(idx)]
    total = len(idx)
    for rec in records:
        name = rec["impl"]
        y = outputs.get(name)
        if y is None:
            parts.append(f"{name} {'failed' if rec['status'] == 'error' else rec['status']}")
            continue
        vals = y.reshape(-1)[torch.from_numpy(idx)]
        d = ulp_distance(vals, refs)
        exact = d == 0
        if total == 1:
            parts.append(f"{name} returned {_fmt(float(vals[0]), dtype)}" + (f" ({word})" if bool(exact[0]) else ""))
            continue
        if bool(exact.all()):
            parts.append(f"{name} returned {word} at all {total}")
            continue
        nan, inf = vals.isnan(), vals.isinf() & ~exact
        finite_off = ~exact & ~nan & ~inf
        bits = []
        if nan.any():
            j = int(torch.nonzero(nan)[0, 0])
            bits.append(
                f"nan at {int(nan.sum())} (e.g. {_index(_unravel(int(idx[j]), rows_shape))}, "
                f"{word.split()[-1]} {_signed(_fmt(float(refs[j]), dtype))})"
            )
        if inf.any():
            bits.append(f"a wrong infinity at {int(inf.sum())}")
        if finite_off.any():
            bits.append(
                f"a finite value off by up to {int_or_inf(float(d[finite_off].max()))} ULP at {int(finite_off.sum())}"
            )
        if exact.any():
            bits.append(f"{word} at {int(exact.sum())}")
        parts.append(f"{name} returned " + ", ".join(bits))
    return "; ".join(parts)


def _reduced_did(records, dtype) -> str:
    parts = []
    for rec in records:
        f, b = rec["forward"], rec["backward"]
        if f is None:
            parts.append(f"{rec['impl']} failed")
            continue
        s = f"{rec['impl']} returned {_fmt(f['value'], dtype)}"
        if b is not None:
            if b["nan"] or b["inf"]:
                s += f" with a non-finite gradient ({b['nan']} nan, {b['inf']} inf)"
            elif b["max_ulp"] == 0:
                s += " with gradient 0"
            else:
                s += f" with a gradient {b['max_bits']:g} bits off"
        parts.append(s)
    return ", ".join(parts)
