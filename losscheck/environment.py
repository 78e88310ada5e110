"""What a results file records about the machine it was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .inputs import INPUTS_GENERATOR


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str | None:
    """Vendor, family, model and stepping from /proc/cpuinfo: the model name alone ("AMD EPYC",
    "Intel(R) Xeon(R) Processor") does not tell CPU generations apart."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        return None
    if not fields:
        return None
    return " ".join(f"{k.replace('cpu ', '')} {v}" if k != "vendor_id" else v for k, v in fields.items())


def cpu_capability() -> str | None:
    """The instruction set torch's CPU kernels were dispatched for (DEFAULT, AVX2, AVX512, ...):
    it decides which kernel runs, and so each kernel's speed and last-bit rounding."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_problem(device: str) -> str | None:
    """None if `device` can run here, else why not (the points are then `skipped`)."""
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "CUDA is not available here"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"{device}: only {torch.cuda.device_count()} CUDA device(s) here"
        return None
    if device == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available here"
    return f"unknown device {device}"


def capture(threads: int) -> dict:
    devices = {"cpu": cpu_name()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    if torch.backends.mps.is_available():
        devices["mps"] = "Apple MPS"
    return {
        "losscheck": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_id": cpu_id(),
        "cpu_capability": cpu_capability(),
        "torch_git": getattr(torch.version, "git_version", None),
        "cpu_count": _cpu_count(),
        "threads": threads,
        # OpenMP's waiting as this process set it (cli.py), null where unset: it moves timings.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "devices": devices,
        "cuda": torch.version.cuda,
        "git_revision": git_revision(),
        "inputs": INPUTS_GENERATOR,  # which generator drew the points' inputs (results.py)
    }


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()
