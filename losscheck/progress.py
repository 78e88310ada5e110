"""Progress of a sweep where no progress bar can be drawn (issue 16 item 9).

Off a terminal (a CI log, `2> file`) a bar's carriage returns are noise, and no output at
all looks like a hang: a 25-minute sweep printed nothing. `LogLines` writes one plain line
each time another tenth of the points is done or a minute has passed since the last line,
whichever comes first: points done, errors so far, elapsed time and an estimate of what is
left (from the mean time per point so far).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LogLines:
    """A stand-in for click's progress bar (`with LogLines(...) as bar: bar.update(1)`)."""

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.label, self.every_s, self.clock = total, label, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.errors = 0
        self._step = max(1, -(-total // 10))  # a tenth of the points, rounded up
        self._next = self._step

    def __enter__(self) -> LogLines:
        self.start = self._last = self.clock()
        self._line(f"{self.total} points to run")
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1, record: dict | None = None) -> None:
        self.done += n
        if record is not None and record.get("status") == "error":
            self.errors += 1
        now = self.clock()
        if self.done >= self._next or now - self._last >= self.every_s:
            while self._next <= self.done:
                self._next += self._step
            self._last = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            errors = f", {self.errors} error(s)" if self.errors else ""
            eta = f", about {duration(left)} left" if self.done < self.total else ""
            self._line(
                f"{self.done}/{self.total} points ({100 * self.done // max(1, self.total)}%){errors}, "
                f"{duration(elapsed)} elapsed{eta}"
            )

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)
