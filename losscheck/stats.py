"""The statistics of the timing gate: an exact rank test and a stability check. Pure functions.

A timing sample is the per-run times of the blocks measured for one callable (see
`timing.py`: ROUNDS blocks, interleaved across the implementations of a point). In
relative mode each block's time is divided by the block of the framework implementation
measured in the same round, so a burst of load that slows a whole round cancels out.

The test: is the current sample slower than the baseline's by more than a factor f?
H0 is "current <= f x baseline" (stochastically); the statistic is Mann-Whitney's U of the
current values against the baseline's values scaled by f, and the p-value is exact (the
distribution of U under exchangeability, counted, not approximated). Both samples' noise
is in it: a wide baseline or a wide current sample makes U less extreme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

# A sample whose interquartile range exceeds its median cannot be judged. (The rank test
# accounts for ordinary noise; this only keeps garbage out, so it is loose: shared machines
# give spreads of 20-60% on sub-millisecond blocks.)
UNSTABLE_SPREAD = 1.0
# Blocks timed in rounds whose median is this many times the per-run time measured while
# `timing._calibrate` calibrated the same callable: a stall hit the rounds (a uniform stall
# looks like low noise to the spread test, see issue 12). Rounds faster than the
# calibration are normal: a calibration batch can still be warming up.
UNSTABLE_DRIFT = 3.0
MIN_SAMPLES = 5


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Q1, median, Q3 by linear interpolation (numpy's default percentile)."""
    s = sorted(values)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), q(0.5), q(0.75)


@lru_cache(maxsize=256)
def _u_distribution(n: int, m: int) -> tuple[int, ...]:
    """Counts of each U = 0..n*m over the C(n+m, n) arrangements of two samples of sizes
    n and m without ties (the classic recurrence f(n, m, u) = f(n-1, m, u-m) + f(n, m-1, u))."""
    # table[j][u] for the current n' = i, m' = j, built up in i.
    prev = [[1] + [0] * (n * m) for _ in range(m + 1)]  # i = 0: U is 0 in one way
    for i in range(1, n + 1):
        cur = [[0] * (n * m + 1) for _ in range(m + 1)]
        cur[0][0] = 1  # m' = 0: one arrangement, U = 0
        for j in range(1, m + 1):
            for u in range(i * j + 1):
                # The largest value belongs to sample 1 (it beats all j of sample 2) or to sample 2.
                a = prev[j][u - j] if u >= j else 0
                b = cur[j - 1][u]
                cur[j][u] = a + b
        prev = cur
    return tuple(prev[m])


def slower_p(current: list[float], baseline: list[float], factor: float = 1.0) -> float:
    """One-sided exact p-value of "current is slower than factor x baseline" (Mann-Whitney):
    the probability, were the two samples exchangeable, of a U at least this large. Ties
    count one half (U is then a half-integer, and the p-value that of its floor: slightly
    conservative)."""
    scaled = [factor * b for b in baseline]
    u = 0.0
    for c in current:
        for b in scaled:
            u += 1.0 if c > b else (0.5 if c == b else 0.0)
    counts = _u_distribution(len(current), len(baseline))
    total = sum(counts)
    return sum(counts[math.floor(u) :]) / total


def smallest_p(n: int, m: int) -> float:
    """The smallest p-value the test can give with samples of sizes n and m: 1 / C(n+m, n)."""
    return 1.0 / math.comb(n + m, n)


@dataclass(frozen=True)
class Stability:
    ok: bool
    why: str = ""


def stability(sample: list[float], what: str = "") -> Stability:
    """Whether a sample can be judged: enough blocks and a spread (IQR) within UNSTABLE_SPREAD
    of the median (pyperf's "the benchmark seems unstable" is the model)."""
    label = f"{what} " if what else ""
    if len(sample) < MIN_SAMPLES:
        return Stability(False, f"{label}has {len(sample)} block(s), {MIN_SAMPLES} needed")
    q1, m, q3 = quartiles(sample)
    if m <= 0:
        return Stability(False, f"{label}median is not positive")
    spread = (q3 - q1) / m
    if spread > UNSTABLE_SPREAD:
        return Stability(
            False,
            f"{label}is unstable: its interquartile range is {spread:.0%} of its median (limit {UNSTABLE_SPREAD:.0%})",
        )
    return Stability(True)


def stall(times: list[float], calibration: float | None, what: str = "") -> Stability:
    """Whether the rounds' median is more than UNSTABLE_DRIFT times the calibration's per-run
    time: a stall that hit every round looks like low noise to `stability`."""
    if not times or not calibration or calibration <= 0:
        return Stability(True)
    m = median(times)
    if m / calibration > UNSTABLE_DRIFT:
        return Stability(
            False,
            f"{what + ' ' if what else ''}is unstable: its median {_t(m)} is "
            f"×{m / calibration:.3g} the {_t(calibration)} measured while calibrating (a stall)",
        )
    return Stability(True)


def _t(s: float) -> str:
    for unit, f in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"
