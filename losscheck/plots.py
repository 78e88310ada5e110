"""Results -> PNG plots next to the report (optional: needs matplotlib, the `plots` extra).

Per loss: the worst error in bits against the logit scale, forward and gradient on separate
rows of panels, one column per dtype, a line per implementation, non-finite results in a
band of their own above the "no correct bit" line; where the loss has variants (options,
reductions, sequence lengths), one small panel per variant as well; and, where at least two
sizes were timed, the median time against the size with interquartile bars, forward and
forward+backward on separate rows. Everything comes from the results file alone.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from . import analysis as A
from .formats import FORMATS
from .report_format import base_losses, dtype_rank, impls_of

INSTALL_HINT = "pip install 'losscheck[plots]'"
VARIANT_COLUMNS = 6
NONFINITE_BAND = 0.15  # height of the non-finite band, as a share of the precision


def available() -> bool:
    # Looked up, not imported: matplotlib is imported lazily, only when plots are drawn.
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(results: dict, out_dir: Path, stem: str) -> list[tuple[str, str]]:
    """Write the PNGs; returns (title, file name relative to out_dir) per figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = [r for r in A.labelled(results["records"]) if r["status"] == "ok"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for loss in base_losses(records):
        recs = [r for r in records if r["base_loss"] == loss]
        figures = [
            ("accuracy", f"{loss}: forward and gradient error against logit scale", _accuracy_figure),
            ("variants", f"{loss}: forward error per variant", _variants_figure),
            ("timing", f"{loss}: time against size (median, interquartile bars)", _timing_figure),
        ]
        for kind, title, draw in figures:
            name = f"{stem}-{loss}-{kind}.png"
            if draw(plt, loss, recs, out_dir / name):
                written.append((title, name))
    return written


def _dtypes(recs):
    return sorted({r["dtype"] for r in recs}, key=dtype_rank)


def _precision(dtype: str) -> int:
    return FORMATS[dtype].significand_bits if dtype in FORMATS else 53


def _log_axis(ax, which: str) -> None:
    """A log scale with major ticks only: the minor ticks of log axes (eight per decade, each
    a tick object to lay out and draw) were two thirds of the plots' time (0.87 s for a
    figure of 8 log panels, 0.37 s without them), which the default config's run paid ten times."""
    from matplotlib.ticker import NullLocator

    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"{which}axis").set_minor_locator(NullLocator())


def _save(plt, fig, title, path, bottom: float = 0.0) -> None:
    """`bottom`: the share of the figure's height kept free for the legend below the panels."""
    fig.suptitle(title)
    # The panels below the title's line (0.4 in): tight_layout does not move them for it, and the
    # variant figure's two-line panel titles ran into it.
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _worst_bits(recs, section: str) -> dict[float, float]:
    """scale -> worst bits of `section` over the records; inf for a non-finite result."""
    worst: dict[float, float] = defaultdict(float)
    for r in recs:
        s = r[section] or {}
        bits = s.get("max_bits")
        if bits is None:
            continue
        if A.nonfinite(s) or (isinstance(bits, float) and not math.isfinite(bits)):
            bits = math.inf
        worst[r["scale"]] = max(worst[r["scale"]], bits)
    return worst


def _draw_bits(ax, recs, impls, section: str, p: int, colors) -> None:
    """Lines of the worst bits per scale, per implementation; non-finite results as crosses in
    the band above p (they have no bits to count), shaded and named in the legend."""
    for impl in impls:
        worst = _worst_bits([r for r in recs if r["impl"] == impl], section)
        if not worst:
            continue
        xs = sorted(worst)
        band = p * (1 + NONFINITE_BAND / 2)
        ys = [band if math.isinf(worst[x]) else min(worst[x], p) for x in xs]
        ax.plot(xs, ys, marker="o", ms=3, color=colors[impl], label=impl)
        bad = [x for x in xs if math.isinf(worst[x])]
        if bad:
            ax.plot(bad, [band] * len(bad), "x", color=colors[impl], ms=8, mew=2)
    ax.axhspan(p, p * (1 + NONFINITE_BAND), color="#f4cccc", lw=0)
    ax.axhline(p, color="grey", lw=0.8, ls="--")
    ax.set_ylim(-0.03 * p, p * (1 + NONFINITE_BAND))
    _log_axis(ax, "x")


def _legend(fig, ax) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", lw=0.8, ls="--"),
        Patch(color="#f4cccc"),
        Line2D([], [], marker="x", ls="", color="black", ms=8, mew=2),
    ]
    labels += ["no correct bit left", "non-finite band", "NaN/±inf result"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)


def _colors(impls):
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {impl: cycle[i % len(cycle)] for i, impl in enumerate(impls)}


def _accuracy_figure(plt, loss, recs, path) -> bool:
    recs = [r for r in recs if r["distribution"] not in A.SCALE_FREE]
    if not recs:
        return False
    dtypes, impls = _dtypes(recs), impls_of(recs)
    colors = _colors(impls)
    has_grad = any(r["backward"] for r in recs)
    rows = [("forward", "forward max bits")] + ([("backward", "gradient max bits")] if has_grad else [])
    fig, axes = plt.subplots(len(rows), len(dtypes), figsize=(3.6 * len(dtypes), 2.8 * len(rows) + 0.6), squeeze=False)
    for i, (section, ylabel) in enumerate(rows):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            _draw_bits(ax, [r for r in recs if r["dtype"] == dtype], impls, section, _precision(dtype), colors)
            ax.set_title(f"{dtype}, {'forward' if section == 'forward' else 'gradient'}", fontsize="medium")
            ax.set_xlabel("logit scale")
            if j == 0:
                ax.set_ylabel(ylabel)
    _legend(fig, axes[0][0])
    _save(plt, fig, f"{loss}: worst error per scale, over every variant", path, 0.5 / fig.get_figheight())
    return True


def _variants_figure(plt, loss, recs, path) -> bool:
    """One panel per variant: the forward error as a share of the dtype's bits (so that the
    dtypes share an axis), worst over dtypes; drawn only for a loss with several variants."""
    recs = [r for r in recs if r["distribution"] not in A.SCALE_FREE]
    labels = sorted({r["loss"] for r in recs})
    if len(labels) < 2:
        return False
    impls = impls_of(recs)
    colors = _colors(impls)
    ncols = min(VARIANT_COLUMNS, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    # Not sharex/sharey: with shared axes every line drawn re-scales all of them (48 panels: 3 s
    # of the figure's 5); the panels get the same limits below instead.
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.2 * nrows + 0.6), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):  # the grid's last row may have spare axes
        mine = [r for r in recs if r["loss"] == label]
        # Bits as a share of each record's precision: 1 = no correct bit left.
        shared = [
            {**r, "forward": {**r["forward"], "max_bits": r["forward"]["max_bits"] / _precision(r["dtype"])}}
            for r in mine
        ]
        _draw_bits(ax, shared, impls, "forward", 1, colors)
        name = label.split(" [", 1)[1].rstrip("]") if " [" in label else "(as defined)"
        ax.set_title(textwrap.fill(name, 34), fontsize=7)
    used = list(axes.flat)[: len(labels)]
    lo = min(ax.get_xlim()[0] for ax in used)
    hi = max(ax.get_xlim()[1] for ax in used)
    for ax in used:
        ax.set_xlim(lo, hi)  # (the y limits are the same already: `_draw_bits`, p = 1)
        ax.label_outer()  # tick labels on the outer panels only, as shared axes had them
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("share of bits lost")
    _legend(fig, axes[0][0])
    _save(plt, fig, f"{loss}: forward error per variant (worst over dtypes)", path, 0.5 / fig.get_figheight())
    return True


def _size(r: dict) -> int:
    return r["batch"] * (r["classes"] or 1) * (r.get("time") or 1)


def _quartiles(t: dict, phase: str) -> tuple[float, float, float]:
    """Median and interquartile range of one timing: from the raw per-run times where the file
    has them (schema 3), else its stored quartiles, else the median ± half the IQR."""
    times = t.get(f"{phase}_times_s")
    if isinstance(times, list) and len(times) >= 2:
        q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return q1, med, q3
    med = t[f"{phase}_median_s"]
    if t.get(f"{phase}_q1_s") is not None and t.get(f"{phase}_q3_s") is not None:
        return t[f"{phase}_q1_s"], med, t[f"{phase}_q3_s"]
    half = (t.get(f"{phase}_iqr_s") or 0.0) / 2
    return med - half, med, med + half


def _timing_figure(plt, loss, recs, path) -> bool:
    timed = [r for r in recs if r.get("timing")]
    if len({_size(r) for r in timed}) < 2:  # one size is a dot, not a curve
        return False
    dtypes, impls = _dtypes(timed), impls_of(timed)
    colors = _colors(impls)
    phases = [("forward", "forward"), ("backward", "forward+backward")]
    fig, axes = plt.subplots(2, len(dtypes), figsize=(3.6 * len(dtypes), 6.2), squeeze=False)
    for i, (phase, what) in enumerate(phases):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for impl in impls:
                by_size = defaultdict(list)
                for r in timed:
                    if r["dtype"] == dtype and r["impl"] == impl:
                        by_size[_size(r)].append(_quartiles(r["timing"], phase))
                if not by_size:
                    continue
                xs = sorted(by_size)
                # The point of median time at each size (several variants or value sets per size).
                q = [sorted(by_size[x], key=lambda v: v[1])[len(by_size[x]) // 2] for x in xs]
                ys = [1e6 * m for _, m, _ in q]
                err = [[1e6 * (m - lo) for lo, m, _ in q], [1e6 * (hi - m) for _, m, hi in q]]
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=3, color=colors[impl], label=impl)
            _log_axis(ax, "x")
            _log_axis(ax, "y")
            ax.set_title(f"{dtype}, {what}", fontsize="medium")
            ax.set_xlabel("elements (batch × classes × length)")
            if j == 0:
                ax.set_ylabel(f"{what}, µs")
    axes[0][0].legend(fontsize="small")
    _save(plt, fig, f"{loss}: median time of the mean loss (bars: interquartile range)", path)
    return True
