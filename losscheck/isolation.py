"""Keeping audited code from harming the run: the in-process per-point timeout
(``with deadline(seconds, what): run_point()``), torch's and the process's global state kept
as it was (`GlobalState`), and the one-line description of a failure (`failure_message`).
Implementations in a worker process (crashes, hangs in C code): see worker.py.

`deadline` arms a real-time interval timer (``signal.setitimer(ITIMER_REAL, ...)``) whose
SIGALRM handler raises `PointTimeout` in the main thread. On leaving the block, normally or by
an exception, the timer is cancelled and the previous SIGALRM handler and timer are restored.

The kernel sends the timer's SIGALRM to the process, and may hand it to any thread that does
not block it: with other threads present (JAX's and XLA's pools, a BLAS pool), it sometimes
lands on one of them, and the main thread, asleep or in a blocking call, is not woken, so the
timeout fired only when the block's call returned on its own (measured: 1 in 15 nested
deadlines late by the full 5 s sleep once jax was imported). A backstop thread therefore sends
SIGALRM to the main thread itself (``signal.pthread_kill``) shortly after the deadline, and
again every `_NUDGE_EVERY_S` while the deadline is still armed; a deadline that fired, or whose
block ended, ignores them.

Limitations:

* The alarm interrupts Python code: loops, ``time.sleep``, Python-level waits. A single C or
  CUDA call that runs long (one huge matmul, a blocking kernel launch or synchronize) is only
  interrupted when it returns to Python, and one that never returns (a hung kernel) is never
  interrupted; that needs the point to run in a process that can be killed (worker.py).
* Signals are delivered to the main thread only, so `deadline` is a no-op in other threads,
  and where SIGALRM/setitimer does not exist (Windows). `enforceable()` says whether a
  timeout can be enforced here.
* The body can swallow the timeout by catching ``Exception`` broadly.

Nesting: there is one ITIMER_REAL per process. If a timer is already running when a deadline
is entered (an outer deadline, or anyone else's alarm), the earlier-expiring one is kept: if the
outer timer expires first, the inner deadline arms nothing and the outer one fires as usual;
otherwise the inner deadline takes the timer over and, on exit, restores the outer handler and
re-arms the outer timer with the time it has left (at once, if that time has run out meanwhile).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Re-arm delay for an outer timer whose time ran out while an inner deadline held the timer.
_EXPIRED_DELAY_S = 1e-4
# The backstop's first signal, after the deadline, and its repeats while still armed.
_NUDGE_AFTER_S = 0.02
_NUDGE_EVERY_S = 0.05
# The backstop thread's wait when no deadline is armed.
_IDLE_WAKE_S = 1.0


class _Backstop:
    """One daemon thread that signals the main thread for every armed deadline that is due, and
    again every `_NUDGE_EVERY_S` until that deadline is disarmed: the kernel's own SIGALRM may have
    gone to another thread (see the module's docstring). One long-lived thread rather than one
    per deadline: a thread object's collection runs weakref callbacks in the main thread, and a
    PointTimeout raised inside one of them is printed and dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, list[bool]]] = {}
        self._thread: threading.Thread | None = None
        # When the thread's wait ends (monotonic), -inf while it is not waiting: it then reads
        # the due times before its next wait, and a deadline due later needs no notify.
        self._wake = -math.inf

    def add(self, seconds: float, armed: list[bool]) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="losscheck-deadline", daemon=True)
                self._wake = -math.inf
                self._thread.start()
            key = id(armed)
            due = time.monotonic() + seconds + _NUDGE_AFTER_S
            self._due[key] = (due, armed)
            # Only a deadline due before the thread wakes anyway wakes it: a notify per point
            # woke the thread, which took the GIL from the sweep each time (0.5 ms per call on
            # a loaded 2-core machine, 7 of options.yaml's 85 s).
            if due < self._wake:
                self._cond.notify()
            return key

    def disarm(self, key: int, armed: list[bool]) -> None:
        """Clear `armed` where no signal can be sent for it any more."""
        with self._cond:
            armed[0] = False
            self._due.pop(key, None)

    def _run(self) -> None:
        main = threading.main_thread().ident
        with self._cond:
            while True:
                now = time.monotonic()
                for key, (due, armed) in list(self._due.items()):
                    if not armed[0]:
                        del self._due[key]
                    elif due <= now and main is not None:
                        signal.pthread_kill(main, signal.SIGALRM)
                        self._due[key] = (now + _NUDGE_EVERY_S, armed)
                wake = min((due for due, _ in self._due.values()), default=None)
                # Idle, it still wakes every _IDLE_WAKE_S: a deadline added then (the next
                # point's, at the sweep's timeout) is read without a notify.
                wait = _IDLE_WAKE_S if wake is None else max(wake - time.monotonic(), 0.0)
                self._wake = time.monotonic() + wait
                self._cond.wait(wait)
                self._wake = -math.inf


_BACKSTOP = _Backstop()


class PointTimeout(Exception):
    """A sweep point ran longer than its timeout."""


def enforceable() -> bool:
    """Whether `deadline` can enforce a timeout here: SIGALRM and setitimer exist, and this is
    the main thread of the main interpreter."""
    return (
        hasattr(signal, "SIGALRM")
        and hasattr(signal, "setitimer")
        and hasattr(signal, "ITIMER_REAL")
        and threading.current_thread() is threading.main_thread()
    )


@contextmanager
def deadline(seconds: float | None, what: str = "") -> Iterator[None]:
    """Raise `PointTimeout` in the block if it runs longer than `seconds`.

    A no-op when `seconds` is None, 0 or infinite, and where a timeout cannot be enforced (see
    `enforceable`). Negative or NaN `seconds` raise ValueError. The message is
    ``f"{what} took longer than the {seconds:g} s timeout"``.
    """
    if seconds is not None and (math.isnan(seconds) or seconds < 0):
        raise ValueError(f"timeout must be None or >= 0 seconds, not {seconds!r}")
    if not seconds or math.isinf(seconds) or not enforceable():
        yield
        return

    prev_remaining, prev_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < prev_remaining <= seconds:
        # An earlier-expiring timer is already running: keep it, arm nothing.
        yield
        return

    message = f"{what} took longer than the {seconds:g} s timeout".strip()
    armed = [True]  # cleared on exit, so that a late alarm cannot raise outside the block

    def on_alarm(signum, frame):
        if armed[0]:
            armed[0] = False
            raise PointTimeout(message)

    try:
        prev_handler = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # not the main interpreter after all
        yield
        return
    start = time.monotonic()
    key = None
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        key = _BACKSTOP.add(seconds, armed)
        yield
    finally:
        if key is None:
            armed[0] = False
        else:
            _BACKSTOP.disarm(key, armed)
        signal.setitimer(signal.ITIMER_REAL, 0)
        # None: the previous handler was not installed from Python; the default is the best
        # that can be restored.
        signal.signal(signal.SIGALRM, signal.SIG_DFL if prev_handler is None else prev_handler)
        if prev_remaining > 0:
            left = prev_remaining - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, _EXPIRED_DELAY_S), prev_interval)


deadline.enforceable = enforceable  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GlobalState:
    """What an implementation could change for everyone after it: the working directory (a
    relative --out would move), and torch's default dtype, thread count and grad mode (the
    implementations after it would be measured under them)."""

    cwd: str
    default_dtype: object
    threads: int
    grad_enabled: bool

    @classmethod
    def capture(cls) -> GlobalState:
        import torch

        return cls(os.getcwd(), torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())

    def restore(self) -> list[str]:
        """Put everything back as captured; what had changed, as 'what: before -> now'."""
        import torch

        now = GlobalState.capture() if os.path.isdir(self.cwd) else None
        changed = []
        if now is None or now.cwd != self.cwd:
            changed.append(f"working directory: {self.cwd} -> {now.cwd if now else '?'}")
            os.chdir(self.cwd)
            now = GlobalState.capture()
        checks: list[tuple[str, Any, Any, Callable[[Any], Any]]] = [
            ("torch default dtype", self.default_dtype, now.default_dtype, torch.set_default_dtype),
            ("torch threads", self.threads, now.threads, torch.set_num_threads),
            ("torch grad mode", self.grad_enabled, now.grad_enabled, torch.set_grad_enabled),
        ]
        for what, before, after, put in checks:
            if before != after:
                changed.append(f"{what}: {before} -> {after}")
                put(before)
        return changed


class WorkerFailure(Exception):
    """An implementation's worker process died, was killed or failed at a request; the
    message is the cause (worker.py)."""


def one_line(e: BaseException) -> str:
    """'Type: first line of the message (at file:line)'; a WorkerFailure's message as is."""
    if isinstance(e, WorkerFailure):
        return str(e)
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {first}{loc}"


def failure_message(e: BaseException) -> str:
    """A point's error message for an exception of the code it ran."""
    from . import memory  # torch: only once a point runs

    if isinstance(e, PointTimeout):
        return f"timeout: {e}"
    if memory.is_oom(e) and not isinstance(e, WorkerFailure):
        return f"out of memory: {one_line(e)}"
    return one_line(e)
