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
