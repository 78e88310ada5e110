"""How the probe writes values, shapes, indices and errors for people (shared by its modules)."""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import FORMATS
from ..formats import capped_bits


def _fmt(v, dtype: str) -> str:
    """A value of `dtype` for people: half-precision values exactly (they are short: 21.875,
    0.0999755859375), float32 and float64 with the fewest digits that read back to the same value."""
    if v is None:
        return "—"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if dtype == "float32":
        return repr(float(str(np.float32(v))))  # '0.6566308', not '0.65663081407547'
    return repr(v)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _signed(s: str) -> str:
    return "+inf" if s == "inf" else s


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _bits(ulp: float, dtype: str) -> float | None:
    """bits = min(log2(1 + ulp), p) (METRICS.md): a NaN or an infinity against a finite
    reference leaves no correct bit, p, never more."""
    return capped_bits(ulp, dtype)


def _unravel(i: int, shape) -> tuple[int, ...]:
    shape = tuple(shape) or (1,)
    return tuple(int(j) for j in np.unravel_index(i, shape))


def _index(idx) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]"


def _shape(s) -> str:
    return "(" + ", ".join(str(i) for i in s) + ("," if len(s) == 1 else "") + ")"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:199] + "…"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _nf(n) -> str:
    return "—" if n is None else str(n)


def _ulp_cell(u) -> str:
    if u is None:
        return "—"
    return "inf" if isinstance(u, float) and math.isinf(u) else str(u)


def _bits_cell(b, dtype: str) -> str:
    if b is None:
        return "—"
    p = FORMATS[dtype].significand_bits
    return "all bits lost" if (math.isinf(b) or b >= p) else f"{b:.1f}"


def _where_from(source: str) -> str:
    return "inline" if source.startswith("--") else source
