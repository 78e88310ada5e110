"""Timing with torch.utils.benchmark: measurement only, no printing.

`Timer.blocked_autorange` runs warm-up, picks a block size so that timer overhead is
negligible, synchronises CUDA, and returns per-run times (block time / block size) from
which we take the median and the interquartile range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils import benchmark


# A median and an IQR need several blocks; blocked_autorange stops after one block when a
# single block already exceeds min_run_time (slow points), so we add blocks up to this.
MIN_BLOCKS = 5


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    runs: int  # number of blocks measured


def measure(fn: Callable[[], object], min_run_time: float, threads: int) -> Timing:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < MIN_BLOCKS:
        times.extend(timer.timeit(number=m.number_per_run).times)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Timing(median_s=float(median), iqr_s=float(q3 - q1), runs=len(times))


def time_point(impl, x: torch.Tensor, target: torch.Tensor, min_run_time: float, threads: int) -> dict:
    """Forward (no autograd graph) and forward+backward of the mean loss."""

    def forward():
        with torch.no_grad():
            impl(x, target, "mean")

    xg = x.detach().clone().requires_grad_(True)

    def forward_backward():
        xg.grad = None
        impl(xg, target, "mean").backward()

    f = measure(forward, min_run_time, threads)
    b = measure(forward_backward, min_run_time, threads)
    return {
        "forward_median_s": f.median_s,
        "forward_iqr_s": f.iqr_s,
        "forward_runs": f.runs,
        "backward_median_s": b.median_s,
        "backward_iqr_s": b.iqr_s,
        "backward_runs": b.runs,
        "threads": threads,
    }
