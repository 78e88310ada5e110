"""Long double reference chunks computed in row blocks on threads (issue 13).

The extended path (numpy x86 long double: float64 targets on a CPU) has no SIMD: a few
million values a second on a core, the dearest part of a float64 audit (a 2048 × 1000
float64 cross entropy spent 19 ms a chunk in it). numpy releases the GIL in its loops, and
the losses' extended formulations are row-wise — each row's loss and gradient come from
that row alone — so the rows of a chunk are split into blocks computed at once on the
run's threads: the same operations on the same rows, so the same bits, whatever the number
of threads (tests/test_extended_rows.py compares them).

Only formulations that run numpy alone come here (`rounded`, which also converts the
float64 rows to long double and rounds the results): `chunk_function(..., rowwise=...)` says
for which rows that holds (the binary losses' soft targets go through torch's
double-double). torch called from a pool thread starts an OpenMP team of its own, whose
threads then slowed the main thread's torch work by half (metrics of a 2048 × 1000
gradient: 4.6 ms, 7.0 ms after one such reference); numpy-only work on the pool left it
as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import reference as R

# Chunks of fewer values are computed on the calling thread: a block handed to another
# thread costs ~50 µs, the work of a few thousand long double values.
PARALLEL_ELEMENTS = 1 << 15

_pool: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its number of threads
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of at least `workers` threads (made on first use, grown when asked for more)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[1] < workers:
            if _pool is not None:
                _pool[0].shutdown(wait=False)
            _pool = (ThreadPoolExecutor(workers, thread_name_prefix="losscheck-extended"), workers)
        return _pool[0]


def applies(fn: Callable, x: np.ndarray, t, threads: int) -> bool:
    """Whether `rounded` computes `fn` (a loss's `reference_chunk`) on the chunk `x` (its
    rows, float64 or long double) and targets `t` in row blocks: several threads, a chunk
    large enough to pay for them, and `fn` row-wise numpy on these arrays."""
    rowwise = getattr(fn, "rowwise", None)
    return (
        threads > 1 and rowwise is not None and x.shape[0] > 1 and x.size >= PARALLEL_ELEMENTS and bool(rowwise(x, t))
    )


def _blocks(rows: int, threads: int) -> list[slice]:
    bounds = np.linspace(0, rows, min(threads, rows) + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _each_block(blocks: list[slice], work: Callable[[slice], Any]) -> list:
    """work(rows) for each block, the first on this thread and the others at once on the
    pool's; their results in row order."""
    errors = dict(np.geterr())  # the caller's errstate: numpy keeps it per thread
    pending = [_executor(len(blocks) - 1).submit(_block, work, errors, b) for b in blocks[1:]]
    parts = [work(blocks[0])]
    for rows, future in zip(blocks[1:], pending, strict=True):
        got = future.result()
        parts.append(work(rows) if got is _NOT_EXTENDED else got)
    return parts


_NOT_EXTENDED = object()


def _block(work: Callable[[slice], Any], errors: dict, rows: slice):
    # The x87 precision control is per thread, and a native library may have set this one's:
    # where it rounds to 53 bits, the block is computed on the calling thread instead.
    if not R._extended_now():
        return _NOT_EXTENDED
    with np.errstate(**errors):
        return work(rows)


def rounded(
    fn: Callable,
    x64: np.ndarray,
    t,
    options: dict,
    per_row: Collection[str],
    extra: dict,
    threads: int,
    finish: Callable,
    loss_out: np.ndarray,
    grad_out: np.ndarray,
) -> np.ndarray | None:
    """A float64 target's chunk from its float64 logits `x64`, in row blocks where they pay
    (`applies`): each block converts its rows to long double, runs fn, and stores its loss
    and `finish(gradient, rows)` (the caller's upstream weights and division by the mean's
    count, in long double) rounded to float64 into `loss_out` and `grad_out` (float64
    arrays of the chunk's rows). `per_row`: the options holding one value per row (sliced
    with the rows); `extra` holds only such values (an elementwise function's upstream
    gradient). So the conversions on either side of the formulation run on the threads too:
    a fifth of a 4096 × 1000 chunk's time, serial before. The same operations per element
    as on one thread, so the same bits. Returns the chunk's long double losses (for the
    caller's sum), or None (nothing done) where blocks do not pay: the caller computes the
    chunk on its own thread then."""
    if not applies(fn, x64, t, threads):
        return None
    blocks = _blocks(x64.shape[0], threads)

    def work(rows: slice):
        opts = {k: (v[rows] if k in per_row else v) for k, v in options.items()}
        block_t = None if t is None else t[rows]
        lw, gw = fn(x64[rows].astype(np.longdouble), block_t, **opts, **{k: v[rows] for k, v in extra.items()})
        # numpy's long double -> float64 cast: round_to's rounding of a long double array.
        np.copyto(loss_out[rows], lw, casting="unsafe")
        np.copyto(grad_out[rows], finish(gw, rows), casting="unsafe")
        return lw

    return np.concatenate(_each_block(blocks, work))
