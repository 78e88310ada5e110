"""Checks of the probe's inputs, each refusing bad data with a `ProbeError` that names the value
and what is allowed: the shapes against the loss, the targets and the weights; and the input's
NaN/inf statistics. Scanned in blocks of `BLOCK` elements so a huge input needs no huge temporary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..dtypes import fmt
from ..losses import Loss
from ..losses.base import class_dim, rows_of
from .convert import convert
from .load import BLOCK, Loaded, ProbeError
from .text import _index, _num, _shape, _unravel


def _layout(loss: Loss, x: Loaded, t: Loaded | None, dim: int = -1) -> dict:
    """Validate the shapes; batch, classes, time as a sweep Case has them, and soft targets.
    An elementwise function (log_softmax) takes an input of any shape and no target: its rows
    are the slices along `dim` (already checked against the input's dimensions)."""
    if loss.elementwise:
        xs = x.shape
        classes = xs[dim] if xs else 1
        rows = math.prod(xs) // max(1, classes)
        return {"batch": max(1, rows), "classes": classes, "time": None, "soft": False, "shape": xs, "rows": rows}
    assert t is not None, "run_probe refuses a missing target for every loss but an elementwise function"
    xs, ts = x.shape, t.shape
    if not loss.multiclass:
        if ts != xs:
            raise ProbeError(
                "--target",
                f"shape {_shape(ts)} does not match the input's {_shape(xs)}",
                f"a target of the input's shape {_shape(xs)}",
            )
        n = max(1, x.numel)
        return {"batch": n, "classes": None, "time": None, "soft": False, "shape": xs, "rows": n}
    if loss.sequence:
        if len(xs) != 3:
            raise ProbeError(
                "--input",
                f"{loss.name} takes (B, T, V) logits, got shape {_shape(xs)}",
                "a 3-D input (batch, time, vocab)",
            )
        if ts != xs[:2]:
            hint = " (soft targets are supported by cross_entropy)" if ts == xs else ""
            raise ProbeError(
                "--target",
                f"shape {_shape(ts)} does not match the input's {_shape(xs)}{hint}",
                f"class indices of shape {_shape(xs[:2])}",
            )
        return {"batch": xs[0], "classes": xs[2], "time": xs[1], "soft": False, "shape": xs, "rows": xs[0] * xs[1]}
    spatial = "spatial" in loss.options
    if len(xs) != 2 and not (spatial and len(xs) > 2):
        hint = "; for (B, T, V) logits use sequence_cross_entropy" if len(xs) == 3 else ""
        raise ProbeError(
            "--input",
            f"{loss.name} takes (N, C) logits, got shape {_shape(xs)}{hint}",
            "a 2-D input (rows, classes)" + (", or (N, C, d1, d2, …)" if spatial else ""),
        )
    # (N, C, d1, d2, …) as torch takes it: classes in dimension 1, targets (N, d1, d2, …).
    hard = xs[:1] + xs[2:]
    rows = xs[0] * math.prod(xs[2:])
    if ts == hard:
        soft = False
    elif ts == xs:
        if not t.floating:
            raise ProbeError(
                "--target",
                f"a target of the input's shape {_shape(xs)} holds class probabilities "
                f"(soft targets), but its dtype is {t.dtype_name}",
                "floating probabilities, or class indices of shape " + _shape(hard),
            )
        soft = True
    else:
        raise ProbeError(
            "--target",
            f"shape {_shape(ts)} does not match the input's {_shape(xs)}",
            f"class indices {_shape(hard)} or class probabilities {_shape(xs)}",
        )
    return {"batch": xs[0], "classes": xs[1], "time": None, "soft": soft, "shape": xs, "rows": rows}


def _dim_of(dim: int, shape: tuple) -> int:
    """`--dim` as a dimension of the input, in [0, ndim) (negative ones count from the last)."""
    n = len(shape)
    if not -n <= dim < n:
        raise ProbeError("--dim", f"{dim} is not a dimension of the input of shape {_shape(shape)}", f"-{n}..{n - 1}")
    return dim % n


def _input_stats(loss: Loss, inp: torch.Tensor, options: dict | None = None) -> dict:
    """NaN/±inf counts of the converted input, rows holding ±inf, and (bce) values outside [0, 1].
    For an elementwise function (log_softmax) the row flags are spread over the row's elements,
    in the input's layout, as its reference (a tensor shaped like the input) is read."""
    rows = rows_of(loss, inp, inp, options)[0] if loss.multiclass else inp.reshape(-1, 1)
    stats = _row_stats(rows, loss.input_kind == "probabilities")
    if loss.elementwise:
        dim = class_dim(loss, inp, options)
        last = inp.movedim(dim, -1).shape
        for key in ("inf_rows", "nan_rows"):
            flags = torch.from_numpy(stats[key]).reshape(*last[:-1], 1).expand(last)
            stats[key] = flags.movedim(-1, dim).reshape(-1).numpy().copy()
    return stats


def _row_stats(rows: torch.Tensor, probabilities: bool) -> dict:
    n = rows.shape[0]
    step = max(1, BLOCK // max(1, rows.shape[1]))
    stats: dict[str, Any] = {
        "nan": 0,
        "posinf": 0,
        "neginf": 0,
        "outside": 0,
        "outside_example": None,
        "inf_rows": np.zeros(n, dtype=bool),
        "nan_rows": np.zeros(n, dtype=bool),
    }
    for start in range(0, n, step):
        block = rows[start : start + step]
        nan, pinf, ninf = block.isnan(), block == math.inf, block == -math.inf
        stats["nan"] += int(nan.sum())
        stats["posinf"] += int(pinf.sum())
        stats["neginf"] += int(ninf.sum())
        stats["inf_rows"][start : start + step] = (pinf | ninf).any(1).numpy()
        stats["nan_rows"][start : start + step] = nan.any(1).numpy()
        if probabilities:
            outside = (block < 0) | (block > 1)
            k = int(outside.sum())
            if k and stats["outside_example"] is None:
                i = int(outside.reshape(-1).nonzero()[0, 0])
                stats["outside_example"] = (start + i, float(block.reshape(-1)[i]))
            stats["outside"] += k
    return stats


def _target(
    loss: Loss, t: Loaded, dtype: torch.dtype, soft: bool, shape: dict, ignore_index: int | None, conversions: list
) -> tuple[torch.Tensor, dict]:
    info: dict[str, Any] = {"source": t.source, "shape": list(t.shape), "from_dtype": t.dtype_name, "kind": "hard"}
    if soft:
        tgt = _nonnegative(
            t,
            dtype,
            "soft target",
            conversions,
            "soft targets must be finite probabilities >= 0",
            "class probabilities (rows of values in [0, 1])",
        )
        info.update(kind="soft", dtype=fmt(dtype).name)
        return tgt, info
    if not loss.multiclass:
        labels = t.data.reshape(-1)
        bad = _first_where(labels, lambda b: ~((b >= 0) & (b <= 1)))
        if bad is not None:
            i, v = bad
            raise ProbeError(
                t.source,
                f"{loss.name} takes targets in [0, 1]; found {_num(v)} at {_index(_unravel(i, t.shape))}",
                "hard 0/1 labels or soft labels in [0, 1]",
            )
        tgt, conv = convert(t, dtype, "target")
        conversions.append(conv)  # soft labels round to the dtype: the reference sees the rounded ones
        flat = tgt.reshape(-1)
        n_soft = _count(flat, lambda b: (b != 0) & (b != 1))
        info.update(dtype=fmt(dtype).name, positives=int(_count(flat, lambda b: b == 1)))
        if n_soft:
            info.update(kind="soft", soft=n_soft)
        return flat, info
    # Class indices, int64.
    data = t.data
    if t.floating:
        values = (
            data.to(torch.float64)
            if isinstance(data, torch.Tensor)
            else torch.from_numpy(np.asarray(data, dtype=np.float64))
        )
        bad = _first_where(values, lambda b: ~b.isfinite() | (b != b.round()) | (b.abs() > 2.0**62))
        if bad is not None:
            i, v = bad
            raise ProbeError(
                t.source,
                f"class indices must be integers; found {v!r} at {_index(_unravel(i, t.shape))}",
                f"integers in [0, {shape['classes']})",
            )
        tgt = values.to(torch.int64)
    elif isinstance(data, torch.Tensor):
        tgt = data.to(torch.int64)
    else:
        tgt = torch.from_numpy(np.asarray(data, dtype=np.int64))
    c = shape["classes"]
    ignored = tgt == ignore_index if ignore_index is not None else torch.zeros_like(tgt, dtype=torch.bool)
    out = ((tgt < 0) | (tgt >= c)) & ~ignored
    if out.any():
        i = int(out.reshape(-1).nonzero()[0, 0])
        v = int(tgt.reshape(-1)[i])
        hint = (
            f"; pass --ignore-index {v} if it marks ignored positions"
            if v < 0 and ignore_index is None and "ignored" in loss.options
            else ""
        )
        allowed = f"class indices in [0, {c})" + (
            f" or the ignore index {ignore_index}" if ignore_index is not None else ""
        )
        raise ProbeError(
            t.source, f"target {v} at {_index(_unravel(i, t.shape))} is out of range [0, {c}){hint}", allowed
        )
    info.update(dtype="int64", ignored=int(ignored.sum()), kept=int((~ignored).sum()))
    if ignore_index is not None:
        info["ignore_index"] = ignore_index
    return tgt, info


def _weight(loss: Loss, w: Loaded, dtype: torch.dtype, input_shape: tuple, shape: dict, conversions: list):
    if loss.multiclass:
        want = (shape["classes"],)
        if w.shape != want:
            raise ProbeError(
                "--weight",
                f"shape {_shape(w.shape)}: {loss.name} takes one weight per class",
                f"a weight of shape {_shape(want)}",
            )
    elif w.shape != input_shape and w.shape != (shape["rows"],):
        raise ProbeError(
            "--weight",
            f"shape {_shape(w.shape)}: {loss.name} takes one weight per element",
            f"a weight of the input's shape {_shape(input_shape)}",
        )
    tensor = _nonnegative(
        w,
        dtype,
        "weight",
        conversions,
        f"weights must be finite and >= 0 in {fmt(dtype).name}",
        "finite non-negative weights",
    )
    return tensor.reshape(-1) if not loss.multiclass else tensor


def _nonnegative(x: Loaded, dtype: torch.dtype, what: str, conversions: list, rule: str, allowed: str) -> torch.Tensor:
    """`x` converted to `dtype` (the conversion noted), refused unless every value is finite and >= 0."""
    tensor, conv = convert(x, dtype, what)
    conversions.append(conv)
    bad = _first_where(tensor, lambda b: ~b.isfinite() | (b < 0))
    if bad is not None:
        i, v = bad
        raise ProbeError(x.source, f"{rule}; found {v!r} at {_index(_unravel(i, x.shape))}", allowed)
    return tensor


def _first_where(t, predicate) -> tuple[int, float] | None:
    """The first flat index (and value) where `predicate(block)` holds, scanning in blocks."""
    flat = t.reshape(-1)
    for start in range(0, flat.shape[0], BLOCK):
        block = flat[start : start + BLOCK]
        block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block, dtype=np.float64))
        hit = predicate(block)
        if bool(hit.any()):
            i = int(hit.nonzero()[0, 0])
            return start + i, float(block[i])
    return None


def _count(t: torch.Tensor, predicate) -> int:
    return sum(int(predicate(t[s : s + BLOCK]).sum()) for s in range(0, t.shape[0], BLOCK))
