"""What the metrics of one point cost, against the torch loss they audit (issue 13).

Prints, in one run, the median time of `ErrorStats.add` on the forward elements and on the
gradient of two points, with the numpy implementation the metrics had before issue 13
(`tests/numpy_metrics.py`, kept as the tests' oracle) and with the torch one, next to one
`F.cross_entropy` forward (the machine's speed) and the torch forward+backward of each
point's own input (what the metrics of a point should not exceed, issue 13):

* cross entropy, 4096 x 1000 float32: 4096 elements, a 4096 x 1000 gradient;
* BCE-with-logits, 2^20 float32 elements: 2^20 elements, a 2^20 gradient.

The references are the float64 results rounded to float32: distances of a few ULP, as in a
sweep (what the metrics cost does not depend on which reference it is, only on the values'
classes: finite, zero, sign).

    python benchmarks/metrics_speed.py [--threads N] [--device cpu|cuda] [--repeat R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the numpy oracle
import numpy_metrics  # noqa: E402

from losscheck.metrics import ErrorStats  # noqa: E402


def median_ms(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def points(device: str):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 1000, generator=g) * 4).to(device)
    t = torch.randint(0, 1000, (4096,), generator=g).to(device)
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(xg, t).backward()
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, t, reduction="none")
    ref.mean().backward()
    ce = {"forward": (F.cross_entropy(x, t, reduction="none"), ref.detach().float()),
          "gradient": (xg.grad, x64.grad.float())}

    z = (torch.randn(1 << 20, generator=g) * 4).to(device)
    y = torch.randint(0, 2, (1 << 20,), generator=g).to(device).float()
    zg = z.clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(zg, y).backward()
    z64 = z.double().requires_grad_(True)
    zref = F.binary_cross_entropy_with_logits(z64, y.double(), reduction="none")
    zref.mean().backward()
    bce = {"forward": (F.binary_cross_entropy_with_logits(z, y, reduction="none"), zref.detach().float()),
           "gradient": (zg.grad, z64.grad.float())}
    def ce_fwd_bwd():
        xg.grad = None
        F.cross_entropy(xg, t).backward()

    def bce_fwd_bwd():
        zg.grad = None
        F.binary_cross_entropy_with_logits(zg, y).backward()

    # Each point with the torch forward+backward of its own input (what its metrics are held to).
    return x, t, {"cross_entropy 4096x1000 float32": (ce, ce_fwd_bwd),
                  "bce_with_logits 2^20 float32": (bce, bce_fwd_bwd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    x, t, cases = points(dev)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, median of {args.repeat}")

    def fwd():
        F.cross_entropy(x, t)

    base_f = median_ms(fwd, dev, args.repeat)
    print(f"F.cross_entropy 4096x1000 float32 forward: {base_f:.2f} ms (the machine's speed)")
    print(f"{'point':34} {'part':9} {'elements':>9} {'numpy (old)':>12} {'torch (new)':>12} {'speed-up':>9}"
          f" {'new / fwd+bwd':>14}")
    for name, (parts, fwd_bwd) in cases.items():
        base_fb = median_ms(fwd_bwd, dev, args.repeat)
        print(f"{name:34} {'torch fwd+bwd':>20} {base_fb:32.2f}ms")
        total_old = total_new = 0.0
        for part, (value, ref) in parts.items():
            def new():
                ErrorStats(12).add(value, ref)

            def old():
                numpy_metrics.NumpyErrorStats(12).add(value, ref)

            t_old = median_ms(old, dev, args.repeat) if dev == "cpu" else float("nan")
            t_new = median_ms(new, dev, args.repeat)
            total_old += t_old
            total_new += t_new
            print(f"{name:34} {part:9} {value.numel():9d} {t_old:10.2f}ms {t_new:10.2f}ms"
                  f" {t_old / t_new:8.1f}x {t_new / base_fb:13.2f}x")
        print(f"{name:34} {'point':9} {'':9} {total_old:10.2f}ms {total_new:10.2f}ms"
              f" {total_old / total_new:8.1f}x {total_new / base_fb:13.2f}x")


if __name__ == "__main__":
    main()
