"""Peak memory of the large-vocabulary points (issue: "512×128000 float32 cross entropy with
peak RSS under 2 GB"): runs them through the sweep exactly as `losscheck bench` does and
prints, per implementation, the process's peak RSS while it was evaluated, the peak while
the inputs and the reference were made, and the wall time.

    python benchmarks/large_vocab_memory.py [--limit-gib 2]

Exit 1 if any peak reaches the limit. The peaks are the process's VmHWM (Linux), reset
before each measurement, so they include the interpreter, torch and the point's input.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losscheck import sweep  # noqa: E402
from losscheck import Config  # noqa: E402
from losscheck.memory import format_bytes  # noqa: E402

CONFIGS = {
    "cross_entropy 512 × 128000": {"losses": ["cross_entropy"], "batch_sizes": [512]},
    "sequence_cross_entropy 4 × 128 tokens × 128000": {
        "losses": ["sequence_cross_entropy"], "batch_sizes": [4], "sequence_lengths": [128]},
}
COMMON = {"name": "large_vocab", "implementations": ["naive", "stable", "torch"], "scales": [10],
          "classes": [128000], "dtypes": ["float32"], "devices": ["cpu"], "distributions": ["normal"],
          "timing": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gib", type=float, default=2.0)
    args = parser.parse_args()
    limit = int(args.limit_gib * 2**30)
    worst = 0
    print(f"{'point':48} {'impl':7} {'status':7} {'peak RSS':>10} {'setup peak':>11} {'wall':>7}")
    for title, axes in CONFIGS.items():
        config = Config.from_mapping({**COMMON, **axes}, "<benchmark>")
        start = time.perf_counter()
        records = sweep.run(config, threads=2)
        wall = time.perf_counter() - start
        for r in records:
            m = r["memory"] or {}
            peak, setup = m.get("peak_bytes", 0), m.get("setup_peak_bytes", 0)
            worst = max(worst, peak, setup)
            print(f"{title:48} {r['impl']:7} {r['status']:7} {format_bytes(peak):>10} {format_bytes(setup):>11} "
                  f"{wall:6.1f}s" + (f"  {r['message']}" if r["status"] != "ok" else ""))
        print(f"  measure: {records[0]['memory']['measure'] if records[0]['memory'] else 'unavailable'}")
    print(f"largest peak: {format_bytes(worst)} (limit {format_bytes(limit)})")
    return 0 if worst < limit else 1


if __name__ == "__main__":
    sys.exit(main())
