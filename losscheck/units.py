"""Numbers written for people, with no dependency (the report imports this, not memory.py,
which imports torch)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``100 B``, ``12 KiB``, ``512 MiB``, ``1.23 GiB``: three significant digits at most."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1000 or unit == "PiB":
            break
    if value >= 100:
        text = f"{value:.0f}"
    else:
        text = f"{value:.{2 if value < 10 else 1}f}".rstrip("0").rstrip(".")
    return f"{text} {unit}"
