"""Throughput and memory of the accuracy reference (issue: "Accuracy you can trust").

Targets on the 2-core development machine: >= 20 M elements/s for float32/float16/bfloat16
targets (float64 working precision) and >= 3 M elements/s for float64 targets (x86 long
double). "Elements" are input values: N for the binary losses, N·C logits for cross entropy.
The reference works in chunks of reference.chunk_elements(device) values, so its peak extra
memory stays bounded whatever the input size; the peak is reported for the input and for a
quarter of it (equal peaks: bounded), next to the size of one full working-precision copy of
the input. The peak is what the reference adds: traced by tracemalloc (numpy registers its
buffers there) plus, for the torch path (float32/float16/bfloat16 targets, float64 tensors),
the device's own measure (memory.PeakMemory: CUDA's allocator, or the process on the CPU).

Usage:  python benchmarks/reference_throughput.py [--elements 8388608] [--repeat 3] [--threads N] [--device cpu]
        [--loss NAME ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
import torch
from tabulate import tabulate

from losscheck import inputs, memory
from losscheck.losses import LOSSES, reference

TARGETS = {"float64": 3e6, "float32": 20e6, "float16": 20e6, "bfloat16": 20e6}
# The losses of one (N,) or (N, C) input this benchmark builds (`measure`); the later ones
# (sequence, hidden states, pairs of logits) have benchmarks of their own.
DEFAULT_LOSSES = ("bce", "bce_with_logits", "sigmoid_bce", "cross_entropy", "nll_loss")


def measure(loss_name: str, dtype_name: str, elements: int, repeat: int, device: str = "cpu") -> dict:
    loss = LOSSES[loss_name]
    dtype = getattr(torch, dtype_name)
    classes = 1000 if loss.multiclass else None
    batch = elements // (classes or 1)
    logits, labels = inputs.generate(loss_name, loss.multiclass, batch, classes, 10.0, "normal", 0)
    inp, target = loss.make_input(logits, dtype).to(device), loss.make_target(labels, dtype).to(device)
    del logits, labels
    n = inp.numel()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        reference(loss, inp, target)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = _peak(loss, inp, target)
    # Bounded chunks: the peak must not grow with the input. Measure it on a quarter too.
    quarter = n // 4 // (classes or 1)
    peak_quarter = _peak(loss, inp[:quarter], target[:quarter])
    work_bytes = np.dtype(np.longdouble if dtype == torch.float64 else np.float64).itemsize
    rate = n / best
    return {"loss": loss_name, "dtype": dtype_name, "elements": n, "seconds": best,
            "elements_per_s": rate, "target_per_s": TARGETS[dtype_name],
            "meets_target": rate >= TARGETS[dtype_name], "peak_traced_bytes": peak,
            "peak_traced_bytes_quarter_input": peak_quarter,
            "full_copy_bytes": n * work_bytes}


def _peak(loss, inp, target) -> int:
    """What the reference adds at its peak: numpy's buffers (tracemalloc) and the device's."""
    tracemalloc.start()
    with memory.PeakMemory(inp.device) as pm:
        reference(loss, inp, target)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    m = pm.result()
    return traced + (max(0, m["peak_bytes"] - m["baseline_bytes"]) if m else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 23)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--loss", action="append", choices=DEFAULT_LOSSES, help="repeatable; default: all of them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(l, d, args.elements, args.repeat, args.device) for l in args.loss or DEFAULT_LOSSES for d in TARGETS]
    print(tabulate([[r["loss"], r["dtype"], r["elements"], f"{r['seconds']:.3f}",
                     f"{r['elements_per_s'] / 1e6:.1f}", f"{r['target_per_s'] / 1e6:.0f}",
                     "yes" if r["meets_target"] else "NO",
                     f"{r['peak_traced_bytes'] / 2**20:.0f}",
                     f"{r['peak_traced_bytes_quarter_input'] / 2**20:.0f}",
                     f"{r['full_copy_bytes'] / 2**20:.0f}"]
                    for r in rows],
                   headers=["loss", "target dtype", "elements", "best s", "M elem/s", "target M/s",
                            "meets", "peak MiB", "peak MiB, ¼ input", "one full copy MiB"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not all(r["meets_target"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
