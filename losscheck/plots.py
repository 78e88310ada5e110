"""Results -> PNG plots next to the report (optional: needs matplotlib, the `plots` extra).

Two figures per loss: the worst forward error in bits against the logit scale, one panel
per dtype, a line per implementation; and the forward+backward time against the batch
size (× classes), one panel per dtype. Everything comes from the results file alone.
"""
from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from pathlib import Path

from . import analysis as A
from .catalog import BUILTIN_IMPLS
from .formats import FORMATS

INSTALL_HINT = "pip install 'losscheck[plots]'"


def available() -> bool:
    # Looked up, not imported: matplotlib is imported lazily, only when plots are drawn.
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(results: dict, out_dir: Path, stem: str) -> list[tuple[str, str]]:
    """Write the PNGs; returns (title, file name relative to out_dir) per figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if r["status"] == "ok"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for loss in dict.fromkeys(r["loss"] for r in records):
        recs = [r for r in records if r["loss"] == loss]
        name = f"{stem}-{loss}-accuracy.png"
        if _accuracy_figure(plt, loss, recs, out_dir / name):
            written.append((f"{loss}: forward error against logit scale", name))
        name = f"{stem}-{loss}-timing.png"
        if _timing_figure(plt, loss, recs, out_dir / name):
            written.append((f"{loss}: forward+backward time against batch size", name))
    return written


def _dtypes(recs):
    return sorted({r["dtype"] for r in recs}, key=lambda d: list(FORMATS).index(d) if d in FORMATS else 9)


def _impls(recs):
    order = BUILTIN_IMPLS
    return sorted({r["impl"] for r in recs}, key=lambda i: (order.index(i) if i in order else 9, i))


def _figure(plt, dtypes, draw, title, path) -> None:
    """One panel per dtype, drawn by `draw(ax, dtype)`, legend on the first, saved as PNG."""
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        draw(ax, dtype)
        ax.set_xscale("log")
        ax.set_title(dtype)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _accuracy_figure(plt, loss, recs, path) -> bool:
    recs = [r for r in recs if r["distribution"] not in A.SCALE_FREE]
    if not recs:
        return False

    def draw(ax, dtype):
        # Bits never exceed the precision p (METRICS.md): no correct bit left is p.
        width = FORMATS[dtype].significand_bits if dtype in FORMATS else 53
        for impl in _impls(recs):
            worst = defaultdict(float)
            for r in recs:
                if r["dtype"] == dtype and r["impl"] == impl:
                    bits = max(r["forward"]["max_bits"], (r["backward"] or {}).get("max_bits") or 0.0)
                    # Non-finite results (inf bits) are drawn at the dtype's full width.
                    worst[r["scale"]] = max(worst[r["scale"]], width if math.isinf(bits) else min(bits, width))
            if worst:
                xs = sorted(worst)
                ax.plot(xs, [worst[x] for x in xs], marker="o", label=impl)
        if dtype in FORMATS:
            ax.axhline(FORMATS[dtype].significand_bits, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("logit scale")
        ax.set_ylabel("max bits of error (fwd, grad)")

    _figure(plt, _dtypes(recs), draw, f"{loss}: worst error per scale (dashed: no correct bit left)", path)
    return True


def _timing_figure(plt, loss, recs, path) -> bool:
    timed = [r for r in recs if r.get("timing")]
    if not timed:
        return False

    def draw(ax, dtype):
        for impl in _impls(timed):
            points = defaultdict(list)
            for r in timed:
                if r["dtype"] == dtype and r["impl"] == impl:
                    points[r["batch"] * (r["classes"] or 1)].append(r["timing"]["backward_median_s"])
            if points:
                xs = sorted(points)
                ax.plot(xs, [1e6 * sorted(points[x])[len(points[x]) // 2] for x in xs], marker="o", label=impl)
        ax.set_yscale("log")
        ax.set_xlabel("elements (batch × classes)")
        ax.set_ylabel("forward+backward, µs")

    _figure(plt, _dtypes(timed), draw, f"{loss}: median time of the mean loss, forward+backward", path)
    return True
