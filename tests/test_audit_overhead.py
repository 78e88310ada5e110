"""benchmarks/audit_overhead.py's arguments: a bad --device is one line and exit 2, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "audit_overhead.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_unknown_device(device):
    proc = run("--device", device)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.splitlines()[-1].endswith(f"--device {device}: unknown device; allowed: cpu, cuda, cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_absent():
    proc = run("--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.splitlines()[-1].endswith("--device cuda: CUDA is not available here")


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_float64_is_measured_on_each_reference_path(monkeypatch):
    """Where the CPU's float64 path is long double, the double-double one is measured too (its
    row says which path it took, and the default path is back afterwards); else only dd."""
    from losscheck import reference as R

    ao = _module()
    if R.path(torch.float64, "cpu") == "extended":
        assert ao.float64_paths("cpu") == ["extended", "dd"]
        row = ao.measure("bce_with_logits", 64, None, None, "float64", 1, 1, "cpu", "dd")
        assert row["reference_path"] == "dd" and R.FLOAT64_PATH == "extended"
        monkeypatch.setattr(ao, "_measure", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ao.measure("bce_with_logits", 64, None, None, "float64", 1, 1, "cpu", "dd")
        assert R.FLOAT64_PATH == "extended"
    monkeypatch.setattr(R, "_LONGDOUBLE_OK", False)
    assert ao.float64_paths("cpu") == ["dd"]
