"""What an audit costs next to the loss it audits (issue 13, "A benchmark that keeps this honest").

For each case, in one run: one torch forward+backward of the loss (the yardstick), the audit's
own parts — inputs (generated and rounded), reference, metrics (forward elements and gradient)
— and one whole `bench` point of the torch implementation alone (`sweep.run_case`, timing
off), each the median of a few repeats (the loss's own short runs: of at least STEADY_RUNS,
after warm-up); then the ratios. Also the point with the three
built-ins (naive, stable, torch: inputs and reference shared) and, per implementation, what
it costs beyond the implementations' own runs, over one torch forward+backward (issue 13's
"amortised overhead per implementation"). float64 is measured on each reference path the
device has: where the default is x86 long double (the CPU here), also in double-double, the
portable path (aarch64 CPUs, GPUs), whose cost the issue asks for. Also the wall time of
`losscheck --help` against `python -c "import click"`. A report, not a test: it prints and
(with --json) writes the figures, and exits 0 whatever they are (.ci/run shows it).

On a GPU (--device cuda) every part runs on the device, timed to its end (synchronized), and the
machine line also gives the GPU's F.cross_entropy 4096 × 1000 float32 forward.

Usage: python benchmarks/audit_overhead.py [--threads 2] [--repeat 3] [--quick] [--device cpu|cuda] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import losscheck.cli  # noqa: F401  (before torch: the OpenMP wait policy the command line runs with)

ROOT = Path(__file__).resolve().parent.parent
# (loss, batch, classes, sequence length) at the sizes of the issue.
CASES = [("cross_entropy", 4096, 1000, None), ("cross_entropy", 512, 32000, None),
         ("bce_with_logits", 1 << 20, None, None), ("sequence_cross_entropy", 4, 32000, 128)]
QUICK_CASES = [("cross_entropy", 1024, 1000, None), ("bce_with_logits", 1 << 18, None, None)]
DTYPES = ("float32", "bfloat16", "float64")
PATH_NAMES = {"extended": "long double", "dd": "double-double"}
# The loss's own runs (the yardstick, and each built-in's run subtracted from the three-built-ins
# point) are short, and their first runs after other work pay for the threads' wake-up: 3 runs
# measured CE 4096 x 1000 float32 forward+backward at 9-13.5 ms where 21 gave 6.7-9.3 ms (same
# process, 0.2 s idle before each). So they get 3 warm-up runs and the median of at least this many.
STEADY_RUNS = 21
# What a timed run waits for at its end: the device's queued work (torch.cuda.synchronize on a GPU).
_finish = lambda: None  # noqa: E731


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def steady_time(fn, repeat: int) -> float:
    """The median of a short run in steady state: 3 warm-up runs, then max(STEADY_RUNS, repeat)."""
    for _ in range(3):
        fn()
    return median_time(fn, max(STEADY_RUNS, repeat))


def wall(cmd: list[str], repeat: int = 5) -> float:
    return median_time(lambda: subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT), repeat)


def float64_paths(device: str) -> list[str]:
    """The float64 reference paths to measure on `device`: its default, and double-double too
    where the default is long double."""
    import torch

    from losscheck import reference

    default = reference.path(torch.float64, device)
    return [default] if default == "dd" else [default, "dd"]


def measure(loss_name: str, batch: int, classes: int | None, time_len: int | None, dtype: str,
            threads: int, repeat: int, device: str = "cpu", float64_path: str | None = None) -> dict:
    """One case's figures; `float64_path` ("extended" or "dd") forces the float64 reference's path."""
    from losscheck import reference as reference_module

    default_path = reference_module.FLOAT64_PATH
    if float64_path is not None:
        reference_module.FLOAT64_PATH = float64_path
    try:
        return _measure(loss_name, batch, classes, time_len, dtype, threads, repeat, device)
    finally:
        reference_module.FLOAT64_PATH = default_path


def _measure(loss_name: str, batch: int, classes: int | None, time_len: int | None, dtype: str,
             threads: int, repeat: int, device: str) -> dict:
    import torch

    from losscheck import sweep
    from losscheck.config import config_from_dict
    from losscheck.losses import LOSSES, reference
    from losscheck.metrics import ErrorStats
    from losscheck.reference import path

    loss = LOSSES[loss_name]
    stored = {"name": "overhead", "losses": [loss_name], "implementations": ["torch"],
              "scales": [10], "batch_sizes": [batch], "classes": [classes or 10],
              "dtypes": [dtype], "distributions": ["normal"], "timing": False,
              "sequence_lengths": [time_len or 64], "threads": threads, "devices": [device]}
    config = config_from_dict(stored, "audit_overhead")
    case = next(sweep.cases(config))
    torch_fn = loss.implementations["torch"].fn
    data = sweep.point_data(loss, case, config.seed)
    x, t, opts = data.on(case.device)

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        torch_fn(xg, t, "mean", **opts).backward()
    yardstick = steady_time(forward_backward, repeat)
    inputs_s = median_time(lambda: sweep.point_data(loss, case, config.seed), repeat)
    ref = reference(loss, data.inp, data.target, data.options, case.reduction)
    reference_s = median_time(lambda: reference(loss, data.inp, data.target, data.options, case.reduction), repeat)
    with torch.no_grad():
        elements = torch_fn(x, t, "none", **opts)
    xg = x.detach().requires_grad_(True)
    torch_fn(xg, t, "mean", **opts).backward()

    def metrics():
        fwd, bwd = ErrorStats(8.0), ErrorStats(8.0)
        fwd.add(elements, ref.loss)
        bwd.add(xg.grad, ref.grad)
    metrics_s = median_time(metrics, repeat)
    impls = sweep.resolve(config)[loss_name]
    point_s = median_time(lambda: sweep.run_case(config, case, threads, None, impls), repeat)
    # The three built-ins on one point (inputs and reference shared): what the audit adds per
    # implementation beyond each one's own run (a forward of every element, then the reduced
    # forward and its backward, as sweep._measure calls it).
    three = config_from_dict({**stored, "implementations": list(loss.implementations)}, "audit_overhead")
    three_impls = sweep.resolve(three)[loss_name]
    three_case = next(sweep.cases(three))
    three_s = median_time(lambda: sweep.run_case(three, three_case, threads, None, three_impls), repeat)

    def own_run(fn):
        def run():
            with torch.no_grad():
                fn(x, t, "none", **opts)
            xg = x.detach().requires_grad_(True)
            fn(xg, t, "mean", **opts).backward()
        return steady_time(run, repeat)
    own_s = sum(own_run(i.fn) for i in three_impls.values())
    per_impl = (three_s - own_s) / len(three_impls)
    audit = inputs_s + reference_s + metrics_s
    size = f"{batch}" + (f" × {time_len}" if time_len else "") + (f" × {classes}" if classes else "")
    return {"loss": loss_name, "size": size, "dtype": dtype, "reference_path": path(getattr(torch, dtype), device),
            "torch_fwd_bwd_s": yardstick, "inputs_s": inputs_s,
            "reference_s": reference_s, "metrics_s": metrics_s, "audit_s": audit,
            "audit_ratio": audit / yardstick, "point_s": point_s, "point_ratio": point_s / yardstick,
            "three_builtins_s": three_s, "three_own_runs_s": own_s, "overhead_per_impl_ratio": per_impl / yardstick}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI)")
    ap.add_argument("--device", default="cpu", help="where the points run: cpu (default), cuda, cuda:N")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", a.device):
        ap.error(f"--device {a.device}: unknown device; allowed: cpu, cuda, cuda:N")
    import torch
    import torch.nn.functional as F
    from tabulate import tabulate

    if a.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: CUDA is not available here")
    if a.device != "cpu" and (torch.device(a.device).index or 0) >= torch.cuda.device_count():
        ap.error(f"--device {a.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    global _finish
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4096, 1000, generator=g), torch.randint(0, 1000, (4096,), generator=g)
    speed = median_time(lambda: F.cross_entropy(x, t), 31)
    rows, out = [], {"threads": a.threads, "device": a.device, "machine_speed_s": speed, "points": []}
    device_line = ""
    if a.device.startswith("cuda"):
        _finish = lambda: torch.cuda.synchronize(a.device)  # noqa: E731
        xd, td = x.to(a.device), t.to(a.device)
        gpu_speed = steady_time(lambda: F.cross_entropy(xd, td), 31)
        out.update({"device_name": torch.cuda.get_device_name(a.device), "device_speed_s": gpu_speed})
        device_line = f"; on {a.device} ({out['device_name']}) {gpu_speed * 1e3:.3f} ms"
    runs = [(d, p) for d in DTYPES for p in (float64_paths(a.device) if d == "float64" else [None])]
    for loss_name, batch, classes, time_len in (QUICK_CASES if a.quick else CASES):
        for dtype, f64_path in runs:
            r = measure(loss_name, batch, classes, time_len, dtype, a.threads, a.repeat, a.device, f64_path)
            out["points"].append(r)
            label = dtype if f64_path is None else f"{dtype} ({PATH_NAMES[r['reference_path']]})"
            rows.append([r["loss"], r["size"], label, f"{r['torch_fwd_bwd_s'] * 1e3:.1f}",
                         f"{r['inputs_s'] * 1e3:.1f}", f"{r['reference_s'] * 1e3:.1f}", f"{r['metrics_s'] * 1e3:.1f}",
                         f"{r['audit_ratio']:.1f}×", f"{r['point_s'] * 1e3:.1f}", f"{r['point_ratio']:.1f}×",
                         f"{r['three_builtins_s'] * 1e3:.1f}", f"{r['overhead_per_impl_ratio']:.1f}×"])
    exe = Path(sys.executable).with_name("losscheck")
    # Where losscheck is not installed (a bare checkout on another machine): python -m losscheck.
    help_s = wall([str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "losscheck", "--help"])
    click_s = wall([sys.executable, "-c", "import click"])
    out.update({"help_s": help_s, "import_click_s": click_s})
    print(f"machine: F.cross_entropy 4096 × 1000 float32 forward {speed * 1e3:.2f} ms ({a.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')})"
          f"{device_line}")
    print(tabulate(rows, headers=["loss", "size", "dtype", "torch fwd+bwd ms", "inputs ms", "reference ms",
                                  "metrics ms", "audit / fwd+bwd", "bench point ms", "point / fwd+bwd",
                                  "3 built-ins ms", "overhead per impl / fwd+bwd"],
                   tablefmt="github"))
    print(f"losscheck --help {help_s:.3f} s; python -c 'import click' {click_s:.3f} s "
          f"(×{help_s / click_s:.1f}); medians of 5")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
