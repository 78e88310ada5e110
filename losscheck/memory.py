"""Per-point peak memory, the memory available to a sweep, and out-of-memory handling.

Measurement only; no printing, no new dependencies (no psutil). Every measurement degrades to
None instead of raising, so that a sweep never fails because memory could not be measured.

* `PeakMemory(device)` measures the peak memory of one sweep point:

  - ``cpu``: the process peak resident set size. On Linux >= 4.0, writing ``5`` to
    ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current RSS, so the peak read
    from ``/proc/self/status`` afterwards is the peak *of the point*. Where the reset is
    impossible, the peak since the process started (``getrusage``) is reported instead and
    the ``measure`` string says so.
  - ``cuda`` / ``cuda:N``: ``torch.cuda.max_memory_allocated`` after resetting the peak
    statistics (memory held by tensors; the caching allocator's reserve is not counted).
  - ``mps``: there is no peak counter; the driver allocation after the point (with the cache
    emptied before it) approximates it.

  The process RSS is process-wide: memory used by other threads during the point counts too.

* `available_bytes(device)` is the memory a new allocation can use: on CPU the smaller of
  ``MemAvailable`` and the cgroup (container) limit minus its usage; on CUDA the free device
  memory. The environment variable ``LOSSCHECK_MEMORY_LIMIT`` (``"2G"``, ``"1.5GiB"``,
  ``"512M"``, ``"1000000"``; K/M/G/T are powers of 1024) caps it, to simulate a small machine.

* `is_oom(exc)` tells an out-of-memory error from the rest; `release(device)` frees what can
  be freed after one; `format_bytes(n)` writes a byte count for people.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from .units import format_bytes  # noqa: F401  (re-exported; in units.py so that reports need no torch)

ENV_LIMIT = "LOSSCHECK_MEMORY_LIMIT"

# Paths, as module attributes so that the tests can point them at fake files.
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_MEMINFO = "/proc/meminfo"
_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_CGROUP = "/proc/self/cgroup"

# A cgroup limit at or above this means "no limit" (cgroup v1 writes about 2**63 for that).
_NO_LIMIT = 1 << 60

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# A number, then optionally K/M/G/T (alone or with "iB"), or "B".
_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:ib)?|b)?\s*$", re.IGNORECASE)

MEASURE_CPU = "process peak RSS (VmHWM, reset before the point)"
MEASURE_CPU_NO_RESET = "process peak RSS since start (could not reset)"
MEASURE_CUDA = "cuda max_memory_allocated"
MEASURE_MPS = "mps driver_allocated_memory after the point (cache emptied before; approximates the peak)"


# ---------------------------------------------------------------------------------------------
# /proc and cgroup readers: each returns None when the value is not available.


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    return _kib_field(_read_text(_STATUS), field)


def _kib_field(text: str | None, field: str) -> int | None:
    """``field:  1234 kB`` in a /proc file, in bytes."""
    if text is None:
        return None
    m = re.search(rf"^{re.escape(field)}:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _reset_peak_rss() -> bool:
    """Reset the process peak RSS (VmHWM) to the current RSS; False where impossible."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except (OSError, ValueError):
        return False


def _ru_maxrss_bytes() -> int | None:
    """Peak RSS since the process started, from getrusage (KiB on Linux, bytes on macOS)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except Exception:
        return None
    if peak <= 0:
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:  # "max" (cgroup v2 for no limit) or garbage
        return None


def _stat_field(path: str, field: str) -> int:
    """A ``field value`` line of a cgroup memory.stat file; 0 if absent."""
    text = _read_text(path)
    if text is not None:
        m = re.search(rf"^{re.escape(field)}\s+(\d+)\s*$", text, re.MULTILINE)
        if m:
            return int(m.group(1))
    return 0


def _own_cgroups() -> dict[str, str]:
    """The process's own cgroup paths from /proc/self/cgroup: {"v2": "/a/b"} for the unified
    hierarchy ("0::/a/b"), {"v1": "/a/b"} for the v1 memory controller ("4:memory:/a/b")."""
    out: dict[str, str] = {}
    for line in (_read_text(_PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and "v2" not in out:
            out["v2"] = path.strip()
        elif "memory" in controllers.split(","):
            out["v1"] = path.strip()
    return out


def _ancestors(base: str, path: str) -> list[str]:
    """`base` joined with `path` and with each of its ancestors, deepest first, down to `base`
    itself — those that exist. A limit anywhere up the hierarchy applies to the process."""
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    dirs = [os.path.join(base, *parts[:i]) for i in range(len(parts), 0, -1)] + [base]
    return [d for d in dirs if os.path.isdir(d)]


def _cgroup_available() -> int | None:
    """The least room left under any memory limit of the process's cgroup or its ancestors
    (limit minus usage), or None where none is limited.

    The process's own cgroup comes from /proc/self/cgroup: a container or CI job is often a
    child cgroup whose limit the root's files do not show (a 1.5 GiB child cgroup read as
    22.6 GiB available, and its points were OOM-killed, issue 16). cgroup v2 (``memory.max``,
    ``memory.current``) is tried first, then v1 (``memory/…/memory.limit_in_bytes``,
    ``memory.usage_in_bytes``). As in container runtimes' "working set", reclaimable inactive
    page cache is not counted as used.
    """
    own = _own_cgroups()
    hierarchies = (
        (_ancestors(_CGROUP_ROOT, own.get("v2", "/")), "memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            _ancestors(os.path.join(_CGROUP_ROOT, "memory"), own.get("v1", "/")),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "memory.stat",
            "total_inactive_file",
        ),
    )
    for dirs, limit_name, usage_name, stat_name, inactive in hierarchies:
        room = None
        for d in dirs:
            limit = _read_int(os.path.join(d, limit_name))
            usage = _read_int(os.path.join(d, usage_name))
            if limit is None or usage is None or limit <= 0 or limit >= _NO_LIMIT:
                continue
            used = max(0, usage - _stat_field(os.path.join(d, stat_name), inactive))
            left = max(0, limit - used)
            room = left if room is None else min(room, left)
        if room is not None:
            return room
    return None


def _address_space_available() -> int | None:
    """Room left under RLIMIT_AS (`ulimit -v`: the address space, not the resident memory, so
    the process's current virtual size counts against it), or None without such a limit. A
    job runner may set it instead of a cgroup; past it, allocations fail with ENOMEM."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    size = _proc_status_bytes("VmSize")
    return None if size is None else max(0, soft - size)


# ---------------------------------------------------------------------------------------------
# Peak memory of one point.


def _cuda_device(device: str) -> torch.device | None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return dev


class PeakMemory:
    """Context manager measuring the peak memory of the block on `device`.

    ::

        with PeakMemory("cpu") as pm:
            run_point()
        pm.result()  # {"peak_bytes": ..., "baseline_bytes": ..., "measure": "..."} or None

    ``peak_bytes`` is the peak during the block and ``baseline_bytes`` the usage when it
    started (both in bytes, in the unit of ``measure``), so ``peak - baseline`` is what the
    block added at its peak. Measurement problems never raise: `result` returns None instead.
    Exceptions of the block propagate unchanged.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = str(device)
        self._result: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}

    def __enter__(self) -> PeakMemory:
        self._result = None
        try:
            self._state = self._start()
        except Exception:
            self._state = {}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # None: an exception in the block propagates
        try:
            self._result = self._stop(self._state) if self._state else None
        except Exception:
            self._result = None

    def result(self) -> dict[str, Any] | None:
        """The measurement after the block, or None if memory could not be measured."""
        return None if self._result is None else dict(self._result)

    # -- per device -----------------------------------------------------------------------

    def _start(self) -> dict[str, Any]:
        kind = self.device.split(":", 1)[0]
        if kind == "cpu":
            return self._start_cpu()
        if kind == "cuda":
            dev = _cuda_device(self.device)
            if dev is None:
                return {}
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            return {"kind": "cuda", "dev": dev, "baseline": int(torch.cuda.memory_allocated(dev))}
        if kind == "mps":
            mps = getattr(torch, "mps", None)
            if (
                mps is None
                or not torch.backends.mps.is_available()
                or not hasattr(mps, "current_allocated_memory")
                or not hasattr(mps, "driver_allocated_memory")
            ):
                return {}
            mps.synchronize()
            mps.empty_cache()
            return {"kind": "mps", "baseline": int(mps.current_allocated_memory())}
        return {}

    def _start_cpu(self) -> dict[str, Any]:
        if _reset_peak_rss():
            baseline = _proc_status_bytes("VmRSS")
            if baseline is not None:
                return {"kind": "cpu", "baseline": baseline}
        # No reset: the peak since the process started. The baseline is the current RSS where
        # it can be read, else the peak so far (then peak - baseline is what the block added
        # above the earlier peak).
        baseline = _proc_status_bytes("VmRSS")
        if baseline is None:
            baseline = _ru_maxrss_bytes()
        if baseline is None:
            return {}
        return {"kind": "cpu-noreset", "baseline": baseline}

    def _stop(self, state: dict[str, Any]) -> dict[str, Any] | None:
        kind = state["kind"]
        if kind == "cpu":
            peak, measure = _proc_status_bytes("VmHWM"), MEASURE_CPU
        elif kind == "cpu-noreset":
            peak, measure = _ru_maxrss_bytes(), MEASURE_CPU_NO_RESET
        elif kind == "cuda":
            torch.cuda.synchronize(state["dev"])
            peak, measure = int(torch.cuda.max_memory_allocated(state["dev"])), MEASURE_CUDA
        elif kind == "mps":
            torch.mps.synchronize()
            peak, measure = int(torch.mps.driver_allocated_memory()), MEASURE_MPS
        else:
            return None
        if peak is None:
            return None
        baseline = int(state["baseline"])
        return {"peak_bytes": max(int(peak), baseline), "baseline_bytes": baseline, "measure": measure}


# ---------------------------------------------------------------------------------------------
# Available memory and the LOSSCHECK_MEMORY_LIMIT override.


def parse_bytes(text: str) -> int:
    """``"1.5G"`` -> 1610612736. Units K/M/G/T (alone or as KiB...TiB) are powers of 1024;
    a bare number or a number with ``B`` is bytes.

    Raises ValueError for anything else, zero or negative sizes included.
    """
    m = _LIMIT_RE.match(text)
    if not m:
        raise ValueError(f"not a byte size: {text!r}")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"not a positive byte size: {text!r}")
    return int(value)


def memory_limit_override() -> int | None:
    """The cap set by ``LOSSCHECK_MEMORY_LIMIT`` in bytes, or None when unset or empty.

    A malformed value raises ValueError with a one-line message.
    """
    raw = os.environ.get(ENV_LIMIT)
    if raw is None or not raw.strip():
        return None
    try:
        return parse_bytes(raw)
    except ValueError:
        raise ValueError(
            f"{ENV_LIMIT}={raw!r} is not a memory size: use a positive number of bytes, "
            f"optionally with a suffix K, M, G, T, KiB, MiB, GiB or TiB (powers of 1024), "
            f"e.g. 1.5G or 512MiB"
        ) from None


def _measured_available(device: str) -> int | None:
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        found = [
            v
            for v in (_kib_field(_read_text(_MEMINFO), "MemAvailable"), _cgroup_available(), _address_space_available())
            if v is not None
        ]
        return min(found) if found else None
    if kind == "cuda":
        dev = _cuda_device(device)
        return None if dev is None else int(torch.cuda.mem_get_info(dev)[0])
    if kind == "mps":
        mps = getattr(torch, "mps", None)
        if (
            mps is not None
            and torch.backends.mps.is_available()
            and hasattr(mps, "recommended_max_memory")
            and hasattr(mps, "driver_allocated_memory")
        ):
            return max(0, int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()))
    return None


def available_bytes(device: str | torch.device) -> int | None:
    """Bytes a new allocation on `device` can use now, or None if unknown.

    CPU: min(MemAvailable, cgroup limit - cgroup usage, RLIMIT_AS - virtual size). CUDA: free device memory
    (``torch.cuda.mem_get_info``). ``LOSSCHECK_MEMORY_LIMIT`` caps the result (and is the
    result when nothing else is known); a malformed value raises ValueError.
    """
    limit = memory_limit_override()
    try:
        measured = _measured_available(str(device))
    except Exception:
        measured = None
    if limit is None:
        return measured
    return limit if measured is None else min(limit, measured)


# ---------------------------------------------------------------------------------------------
# Out-of-memory errors.

_OOM_MESSAGES = ("out of memory", "defaultcpuallocator: can't allocate memory", "not enough memory")


def _oom_classes() -> tuple[type, ...]:
    classes: list[type] = [MemoryError]
    for owner in (torch, getattr(torch, "cuda", None)):
        cls = getattr(owner, "OutOfMemoryError", None)
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    return tuple(classes)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: MemoryError, torch's OutOfMemoryError, and the
    RuntimeErrors that allocators raise ("out of memory", "DefaultCPUAllocator: can't
    allocate memory", "not enough memory")."""
    if isinstance(exc, _oom_classes()):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False


def trim() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere a
    no-op). Freed blocks below glibc's (growing) mmap threshold stay in the process, so a
    long sweep's RSS would creep up by the working sets of earlier points; trimming before
    each point keeps its peak its own."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


# None: not looked up yet; False: this C library has no malloc_trim.
_MALLOC_TRIM: Callable[[int], int] | Literal[False] | None = None


def release(device: str | torch.device) -> None:
    """Free what can be freed after an out-of-memory error: garbage, the C heap's free
    memory, and the CUDA/MPS cache."""
    gc.collect()
    trim()
    kind = str(device).split(":", 1)[0]
    try:
        if kind == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif kind == "mps" and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    except Exception:
        pass
