"""How the reports say numbers, names and groups: shared by the report's pages (report.py,
report_findings.py, report_detail.py) so that a value reads the same wherever it appears."""

from __future__ import annotations

import math
import re
from collections import defaultdict

from tabulate import tabulate

from . import analysis as A
from . import families
from .catalog import LOSS_INFO
from .formats import FORMATS, precision

LOSS_ORDER = list(LOSS_INFO)
MAX_OPEN_ROWS = 24  # longer tables are collapsed (or summarised first)


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


def label_dtype(dtype: str, device: str) -> str:
    return dtype if device == "cpu" else f"{dtype}@{device}"


# Characters that would end a table cell or start Markdown/HTML: an implementation name, an
# error message or an option value comes from the user (issue 16: a newline or `|` in a name
# injected Markdown into the report).
_SPECIAL = re.compile(r"([\\`*\[\]<>|#!~])")


def md(text) -> str:
    """Any text from a results file, as literal Markdown on one line, safe in a table cell."""
    s = " ".join(str(text).split())  # newlines, tabs and runs of spaces: one space
    return _SPECIAL.sub(r"\\\1", s)


def impl_name(impl: str, kind: str | None = None) -> str:
    return md(impl) + (" (custom)" if kind == "custom" else "")


def impls_of(records) -> list[str]:
    seen = list(dict.fromkeys(r["impl"] for r in records))
    return sorted(seen, key=families.order_key)


def order(values, ordering):
    return sorted(set(values), key=lambda v: ordering.index(v) if v in ordering else len(ordering))


def losses_of(records) -> list[str]:
    """The loss labels of the records (a loss with its variant, see `analysis.loss_label`), in order."""
    return sorted({r["loss"] for r in records}, key=lambda label: A.loss_rank(label, LOSS_ORDER))


def base_losses(records) -> list[str]:
    """The losses without their variants, in the registry's order."""
    return order((r.get("base_loss", r["loss"]) for r in records), LOSS_ORDER)


def row_order(loss: str, device: str, dtype: str) -> tuple:
    """Sort key of a table row: loss (with its variant), device, then dtype in FORMATS order."""
    return (A.loss_rank(loss, LOSS_ORDER), device, dtype_rank(dtype))


def dtype_rank(dtype: str) -> int:
    return list(FORMATS).index(dtype) if dtype in FORMATS else len(FORMATS)


def by_loss_device_dtype(recs: list[dict]) -> list[tuple[tuple, dict[str, list[dict]]]]:
    """The records grouped by (loss, device, dtype), then by implementation, in row order."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        groups[(r["loss"], r["device"], r["dtype"])][r["impl"]].append(r)
    return [(key, groups[key]) for key in sorted(groups, key=lambda k: row_order(*k))]


def bwd(r: dict) -> dict:
    """The gradient section, {} where it was not measured (a numpy implementation without gradient)."""
    return r["backward"] or {}


def share(k: int, n: int) -> str:
    if k == 0:
        return "0"
    return f"{100 * k / n:.3g}%" if n else "—"


def table(rows: list[list], headers: list[str]) -> str:
    """A GitHub table: aligned by tabulate when short; unpadded when long, because padding every
    cell to its column's width makes a big table several times its size for no reader."""
    if len(rows) <= MAX_OPEN_ROWS:
        return tabulate(rows, headers=headers, tablefmt="github")
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def collapsible(table: str, rows: int, what: str = "rows") -> str:
    # Large sweeps: the breakdown and findings summarise; the full tables stay one click away.
    if rows <= MAX_OPEN_ROWS:
        return table
    return f"<details><summary>{rows} {what}</summary>\n\n{table}\n\n</details>"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
