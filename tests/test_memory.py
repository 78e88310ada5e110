"""losscheck.memory: per-point peak memory, available memory and its override, OOM errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from losscheck import memory
from losscheck.memory import (
    ENV_LIMIT, PeakMemory, available_bytes, format_bytes, is_oom, parse_bytes, release,
)

MiB = 1 << 20
GiB = 1 << 30
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


@pytest.fixture(autouse=True)
def no_env_limit(monkeypatch):
    monkeypatch.delenv(ENV_LIMIT, raising=False)


# ---------------------------------------------------------------------------------------------
# PeakMemory on the CPU


@linux_only
def test_cpu_peak_sees_a_200_mib_array_and_resets_between_points():
    with PeakMemory("cpu") as pm:
        big = np.ones(200 * MiB, dtype=np.uint8)  # written, so resident
        assert big[-1] == 1
        del big
    r = pm.result()
    assert r is not None
    assert set(r) == {"peak_bytes", "baseline_bytes", "measure"}
    assert isinstance(r["peak_bytes"], int) and isinstance(r["baseline_bytes"], int)
    assert r["baseline_bytes"] > 0
    assert r["peak_bytes"] - r["baseline_bytes"] >= 190 * MiB

    with PeakMemory("cpu") as pm2:
        small = np.ones(1000)
        assert small.sum() == 1000
    r2 = pm2.result()
    assert r2 is not None
    if r2["measure"] == memory.MEASURE_CPU_NO_RESET:
        pytest.skip("peak RSS could not be reset here (/proc/self/clear_refs)")
    assert r2["measure"] == memory.MEASURE_CPU
    assert r2["peak_bytes"] - r2["baseline_bytes"] < 50 * MiB


@linux_only
def test_cpu_peak_falls_back_to_getrusage_without_reset(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    with PeakMemory("cpu") as pm:
        np.ones(10 * MiB, dtype=np.uint8)
    r = pm.result()
    assert r is not None
    assert r["measure"] == "process peak RSS since start (could not reset)"
    assert r["peak_bytes"] >= r["baseline_bytes"] > 0


def test_cpu_peak_is_none_when_nothing_can_be_read(monkeypatch, tmp_path):
    missing = str(tmp_path / "missing")
    monkeypatch.setattr(memory, "_CLEAR_REFS", missing)
    monkeypatch.setattr(memory, "_STATUS", missing)
    monkeypatch.setattr(memory, "_ru_maxrss_bytes", lambda: None)
    with PeakMemory("cpu") as pm:
        pass
    assert pm.result() is None


def test_peak_memory_lets_body_exceptions_through_and_unknown_devices_give_none():
    with pytest.raises(KeyError):
        with PeakMemory("cpu"):
            raise KeyError("body")
    with PeakMemory("xpu") as pm:
        pass
    assert pm.result() is None
    assert PeakMemory("cpu").result() is None  # never entered


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_peak_is_none_without_cuda():
    with PeakMemory("cuda") as pm:
        pass
    assert pm.result() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_and_available():
    dev = "cuda:0"
    with PeakMemory(dev) as pm:
        t = torch.ones(64 * MiB, device=dev)  # 256 MiB of float32
        del t
    r = pm.result()
    assert r is not None and r["measure"] == "cuda max_memory_allocated"
    assert r["peak_bytes"] - r["baseline_bytes"] >= 256 * MiB
    with PeakMemory(dev) as pm2:
        torch.ones(10, device=dev)
    r2 = pm2.result()
    assert r2["peak_bytes"] - r2["baseline_bytes"] < 16 * MiB
    free = available_bytes(dev)
    assert isinstance(free, int) and free > 0
    release(dev)


# ---------------------------------------------------------------------------------------------
# available_bytes and LOSSCHECK_MEMORY_LIMIT


@linux_only
def test_available_cpu_is_a_positive_int():
    free = available_bytes("cpu")
    assert isinstance(free, int) and free > 0


@linux_only
def test_env_limit_caps_available(monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "1G")
    assert available_bytes("cpu") == GiB  # this machine has more than 1 GiB available
    monkeypatch.setenv(ENV_LIMIT, "100")
    assert available_bytes("cpu") == 100


def test_env_limit_is_the_answer_when_nothing_is_known(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_MEMINFO", str(tmp_path / "missing"))
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(tmp_path / "missing"))
    assert available_bytes("cpu") is None
    monkeypatch.setenv(ENV_LIMIT, "1.5GiB")
    assert available_bytes("cpu") == int(1.5 * GiB)
    assert available_bytes("xpu") == int(1.5 * GiB)


@pytest.mark.parametrize("value", ["abc", "1GB", "-1G", "0", "1X", "1.2.3M", "G"])
def test_malformed_env_limit_raises(monkeypatch, value):
    monkeypatch.setenv(ENV_LIMIT, value)
    with pytest.raises(ValueError) as info:
        available_bytes("cpu")
    message = str(info.value)
    assert ENV_LIMIT in message and repr(value) in message and "GiB" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("1G", GiB), ("1.5G", int(1.5 * GiB)), ("512MiB", 512 * MiB), ("12k", 12 * 1024),
    ("2 GiB", 2 * GiB), ("1T", 1 << 40), ("1000", 1000), ("64B", 64), (" 3m ", 3 * MiB),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def _fake_cgroup(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(autouse=True)
def _root_cgroup(monkeypatch, tmp_path):
    """The process sits in the root cgroup unless a test says otherwise (the machine's own
    /proc/self/cgroup must not leak into the fake hierarchies)."""
    own = tmp_path / "proc-self-cgroup"
    own.write_text("0::/\n")
    monkeypatch.setattr(memory, "_PROC_CGROUP", str(own))
    return own


def test_cgroup_v2_limit(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemAvailable:   32768000 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(meminfo))
    root = tmp_path / "cg"
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(root))
    assert available_bytes("cpu") == 32768000 * 1024  # no cgroup files: MemAvailable
    _fake_cgroup(root, {"memory.max": f"{2 * GiB}\n", "memory.current": f"{768 * MiB}\n",
                        "memory.stat": f"anon 1\ninactive_file {256 * MiB}\nactive_file 5\n"})
    assert available_bytes("cpu") == 2 * GiB - 512 * MiB  # inactive page cache is reclaimable
    _fake_cgroup(root, {"memory.max": "max\n"})  # v2 without a limit
    assert available_bytes("cpu") == 32768000 * 1024


def test_cgroup_v1_limit_and_unlimited(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   32768000 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(meminfo))
    root = tmp_path / "cg"
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(root))
    _fake_cgroup(root, {"memory/memory.limit_in_bytes": f"{GiB}\n",
                        "memory/memory.usage_in_bytes": f"{256 * MiB}\n"})
    assert available_bytes("cpu") == 768 * MiB
    _fake_cgroup(root, {"memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert available_bytes("cpu") == 32768000 * 1024


def test_the_process_own_child_cgroup_limit_is_seen(monkeypatch, tmp_path, _root_cgroup):
    # Regression (issue 16): in a child cgroup limited to 1.5 GiB the root's files showed no
    # limit, the estimate said 22.6 GiB available, and a 2.5 GiB point was OOM-killed.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   23700000 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(meminfo))
    root = tmp_path / "cg"
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(root))
    _fake_cgroup(root, {"memory.max": "max\n", "memory.current": f"{4 * GiB}\n",
                        "ci/memory.max": f"{8 * GiB}\n", "ci/memory.current": f"{GiB}\n",
                        "ci/job/memory.max": f"{1536 * MiB}\n", "ci/job/memory.current": f"{512 * MiB}\n"})
    _root_cgroup.write_text("0::/ci/job\n")
    assert available_bytes("cpu") == GiB  # the job's own limit, not the root's absence of one
    # An ancestor with less room left than the child's own limit decides.
    _fake_cgroup(root, {"ci/memory.current": f"{7936 * MiB}\n"})
    assert available_bytes("cpu") == 256 * MiB
    # A path that is not visible here (another cgroup namespace) falls back to the mount's root.
    _root_cgroup.write_text("0::/elsewhere/job\n")
    assert available_bytes("cpu") == 23700000 * 1024


def test_the_process_own_v1_memory_cgroup_is_seen(monkeypatch, tmp_path, _root_cgroup):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   23700000 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(meminfo))
    root = tmp_path / "cg"
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(root))
    _fake_cgroup(root, {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                        "memory/memory.usage_in_bytes": f"{GiB}\n",
                        "memory/runner/memory.limit_in_bytes": f"{2 * GiB}\n",
                        "memory/runner/memory.usage_in_bytes": f"{768 * MiB}\n",
                        "memory/runner/memory.stat": f"total_inactive_file {256 * MiB}\n"})
    _root_cgroup.write_text("4:memory:/runner\n3:cpu,cpuacct:/other\n0::/\n")
    assert available_bytes("cpu") == 2 * GiB - 512 * MiB


# ---------------------------------------------------------------------------------------------
# is_oom, release, format_bytes


@pytest.mark.parametrize("exc", [
    MemoryError(),
    torch.OutOfMemoryError("x"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("MPS backend: not enough memory"),
])
def test_is_oom_true(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [
    ValueError("out of memory"), RuntimeError("other"), KeyboardInterrupt(), TypeError("x"),
])
def test_is_oom_false(exc):
    assert not is_oom(exc)


def test_cuda_oom_class_is_recognised():
    cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if cls is None:
        pytest.skip("no torch.cuda.OutOfMemoryError")
    assert is_oom(cls("y"))


def test_real_host_oom_is_recognised():
    with pytest.raises(MemoryError) as info:
        np.empty(1 << 50, dtype=np.uint8)  # 1 PiB
    assert is_oom(info.value)
    with pytest.raises((RuntimeError, MemoryError)) as info2:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_oom(info2.value)
    release("cpu")  # must not raise
    release("cuda")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (100, "100 B"), (1023, "1023 B"), (1024, "1 KiB"), (12 * 1024, "12 KiB"),
    (1536, "1.5 KiB"), (512 * MiB, "512 MiB"), (int(1.23 * GiB), "1.23 GiB"),
    (int(12.5 * GiB), "12.5 GiB"), (3 << 40, "3 TiB"), (-2 * MiB, "-2 MiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_trim_runs_and_the_sweep_trims_before_each_point(monkeypatch):
    """malloc_trim hands the previous points' freed heap back, so that a point's peak RSS is
    its own (measured: a sequence sweep's 512 × 128k point peaked at 1.94 GiB without it,
    1.64 GiB with it)."""
    from losscheck import sweep
    from losscheck.config import parse_config
    memory.trim()  # no error, on glibc or elsewhere
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1))
    cfg = parse_config("name: t\nlosses: [bce]\nimplementations: [naive, stable]\nscales: [1]\n"
                       "batch_sizes: [4, 1048577]\ndtypes: [float32]\ndistributions: [normal, extreme]\n"
                       "timing: false\n", "<t>")
    monkeypatch.setattr(sweep, "TRIM_ELEMENTS", 1 << 20)
    sweep.run(cfg, 1)
    # Only the large points (> TRIM_ELEMENTS values), per case and before each implementation:
    # trimming is not free, and small points would pay for it thousands of times.
    assert len(calls) == 2 * (1 + 2)
