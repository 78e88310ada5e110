"""What running implementations in worker processes costs (issue 16, item 1).

For each case, the same accuracy sweep (timing off: timing runs in the worker as long as in
process, what differs is the traffic around it) of the three built-ins, run with
``isolation: none`` and with ``isolation: process``, workers warm (started and used once
before); the median of a few repeats, per point, and the difference. Also the start of the
workers (spawn + import of torch), paid once per implementation and run, and again after a
crash. A report, not a test: it prints and (with --json) writes the figures, exits 0.

Usage: python benchmarks/isolation_overhead.py [--threads 2] [--repeat 5] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

# (loss, batch, classes): a small point (what most sweeps are made of) up to a large vocabulary.
CASES = [("bce_with_logits", 256, None), ("bce_with_logits", 1 << 20, None),
         ("cross_entropy", 4096, 1000), ("cross_entropy", 512, 32000)]
QUICK_CASES = CASES[:1] + CASES[2:3]


def config(loss: str, batch: int, classes: int | None, isolation: str, threads: int):
    from losscheck.config import config_from_dict
    return config_from_dict({"name": "isolation", "losses": [loss], "implementations": ["naive", "stable", "torch"],
                             "scales": [1, 10, 100], "batch_sizes": [batch], "classes": [classes or 10],
                             "dtypes": ["float32"], "distributions": ["normal"], "timing": False,
                             "threads": threads, "isolation": isolation}, "isolation_overhead")


def per_point(cfg, threads: int, repeat: int) -> tuple[float, dict]:
    from losscheck import sweep
    impls = sweep.resolve(cfg)
    sweep.run(cfg, threads, impls=impls)  # warm: workers started, first-call costs paid
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        records = sweep.run(cfg, threads, impls=impls)
        times.append((time.perf_counter() - start) / len(records))
    # As JSON: NaN fields compare equal there (not in dicts).
    return statistics.median(times), json.dumps([(r["forward"], r["backward"]) for r in records], sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    from losscheck import sweep

    start = time.perf_counter()
    sweep.resolve(config("bce_with_logits", 256, None, "process", args.threads))
    startup = time.perf_counter() - start
    print(f"starting 3 workers (spawn, import torch), in parallel: {startup:.2f} s")
    rows = []
    for loss, batch, classes in (QUICK_CASES if args.quick else CASES):
        none, numbers_none = per_point(config(loss, batch, classes, "none", args.threads), args.threads, args.repeat)
        proc, numbers_proc = per_point(config(loss, batch, classes, "process", args.threads), args.threads,
                                       args.repeat)
        row = {"loss": loss, "batch": batch, "classes": classes, "none_s": none, "process_s": proc,
               "overhead_s": proc - none, "ratio": proc / none, "same_numbers": numbers_none == numbers_proc}
        rows.append(row)
        size = f"{batch}x{classes}" if classes else f"{batch}"
        print(f"{loss:16} {size:>12}: {none * 1e3:8.2f} ms/point in process, {proc * 1e3:8.2f} ms in a worker "
              f"(+{(proc - none) * 1e3:.2f} ms, x{proc / none:.2f}); same numbers: {row['same_numbers']}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"startup_s": startup, "threads": args.threads, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
