"""Timing with torch.utils.benchmark: measurement only, no printing.

`_calibrate` warms up and picks a block size so that a round's block lasts about
min_run_time / rounds; `Timer.timeit` then measures blocks (synchronising CUDA), and the
per-run times (block time / block size) give the median and the interquartile range.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils import common

# Blocks per timed callable. They are taken in rounds across all the implementations of a
# point (naive, stable, torch, naive, stable, torch, ...), so that a burst of load on a
# shared machine slows every implementation alike instead of one of them: the ratios to
# torch, and the gate's relative timing, then stay put.
# Eleven rounds give the gate's exact rank test (stats.py) a smallest p-value of
# 1/C(22, 11) = 1.4e-6 between two runs: enough to keep the false-alarm rate of a whole
# run at 1% over hundreds of comparisons.
ROUNDS = 11
# Rounds of a re-measure (the gate's confirmation of a suspected slowdown): a sharper test.
REMEASURE_ROUNDS = 21


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    q1_s: float
    q3_s: float
    runs: int  # number of blocks measured

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        return cls(float(median), float(q3 - q1), float(q1), float(q3), len(times))


def time_case(
    impls: dict[str, Callable],
    x: torch.Tensor,
    target: torch.Tensor,
    min_run_time: float,
    threads: int,
    options: dict | None = None,
    reduction: str = "mean",
    rounds: int = ROUNDS,
) -> dict[str, dict | BaseException]:
    """Forward (no autograd graph) and forward+backward of the reduced loss of each
    implementation (called with the point's `options`), interleaved over `rounds` rounds;
    per implementation its timing dict (with the raw per-run time of every block, and the
    per-run time measured while calibrating), or the exception it raised while being timed (SystemExit included)."""
    options = options or {}
    timers: dict[tuple, tuple] = {}
    out: dict[str, dict | BaseException] = {}
    for name, impl in impls.items():
        try:
            # An implementation in a worker process (worker.RemoteFn) calibrates there and
            # returns timers whose blocks run there: the rounds stay interleaved.
            make = getattr(impl, "timers", None) or functools.partial(timers_for, impl)
            for part, made in make(x, target, reduction, options, threads, min_run_time, rounds).items():
                timers[(name, part)] = made
        except (Exception, SystemExit) as e:  # an implementation failing here fails its own point only
            out[name] = e
    times: dict[tuple, list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, (timer, number, _) in list(timers.items()):
            if key[0] in out:
                continue
            try:
                times[key].extend(timer.timeit(number=number).times)
            except (Exception, SystemExit) as e:
                out[key[0]] = e
    for name in impls:
        if name in out:
            continue
        f, b = Timing.of(times[(name, "forward")]), Timing.of(times[(name, "backward")])
        out[name] = {
            "forward_median_s": f.median_s,
            "forward_iqr_s": f.iqr_s,
            "forward_q1_s": f.q1_s,
            "forward_q3_s": f.q3_s,
            "forward_runs": f.runs,
            "forward_times_s": times[(name, "forward")],
            "forward_calibration_s": timers[(name, "forward")][2],
            "backward_median_s": b.median_s,
            "backward_iqr_s": b.iqr_s,
            "backward_q1_s": b.q1_s,
            "backward_q3_s": b.q3_s,
            "backward_runs": b.runs,
            "backward_times_s": times[(name, "backward")],
            "backward_calibration_s": timers[(name, "backward")][2],
            "threads": threads,
        }
    return out


class BlockTimer(benchmark.Timer):
    """torch.utils.benchmark's Timer, whose `timeit(number)` (one block) is preceded by one
    warm-up call instead of max(number // 100, 2). The rounds interleave implementations, so
    a block needs the implementation's caches and allocator back: one call does that. Two
    cost a point whose single call fills a block (number 1: the large points) three calls
    per block, two thirds of its timing; the default config's timing took 13.6 s with 9,746
    warm-up calls beside 63,612 measured ones. Same measurement otherwise (threads set
    around the block, accelerators synchronised by torch's timer)."""

    def timeit(self, number: int = 1000000) -> common.Measurement:
        with common.set_torch_threads(self._task_spec.num_threads):
            self._timeit(number=1)
            return common.Measurement(
                number_per_run=number, raw_times=[self._timeit(number=number)], task_spec=self._task_spec
            )


def timers_for(impl: Callable, x, target, reduction, options, threads, min_run_time, rounds) -> dict:
    """part ("forward", "backward") -> (timer, runs per block, calibrated seconds per run)."""
    out = {}
    for part, fn in (
        ("forward", _forward(impl, x, target, reduction, options)),
        ("backward", _backward(impl, x, target, reduction, options)),
    ):
        timer = BlockTimer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        out[part] = (timer, *_calibrate(timer, min_run_time / rounds))
    return out


# A calibration batch long enough to trust its per-run time: this fraction of a round's block.
_CALIBRATION_FRACTION = 0.25


def _calibrate(timer: benchmark.Timer, block_s: float) -> tuple[int, float]:
    """(runs per block, seconds per run) so that a round's block lasts about `block_s`.

    One warm-up call, then batches of 1, 2, 4, ... runs until one lasts a quarter of a
    block: under a block in all, about half a block typically. (torch's `blocked_autorange`
    grows its block tenfold until it passes the whole block time, and the rounds then kept
    that block: up to ten times the configured `min_run_time`, most of a sweep's timing
    time.) The timed region's own overhead, a microsecond or so per block, stays about a
    thousandth of the configs' blocks (0.9 ms and more); the per-run time is that of the
    last batch, warm (stats.stall compares the rounds with it).
    """
    timer.timeit(1)  # warm-up (and its own): first-call allocations and lazy initialisation
    number = 1
    while True:
        per_run = max(timer.timeit(number).median, 1e-9)
        if per_run * number >= _CALIBRATION_FRACTION * block_s or number >= 1 << 24:
            break
        number *= 2
    return max(1, round(block_s / per_run)), per_run


def _forward(impl, x, target, reduction, options):
    def forward():
        with torch.no_grad():
            impl(x, target, reduction, **options)

    return forward


def _backward(impl, x, target, reduction, options):
    xg = x.detach().requires_grad_(True)

    def forward_backward():
        xg.grad = None
        out = impl(xg, target, reduction, **options)
        out.backward(torch.ones_like(out) if reduction == "none" else None)

    return forward_backward
