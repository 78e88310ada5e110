"""Whether a point's inputs are the same bits in every process on a loaded machine.

Each run is a fresh process drawing one sweep point's inputs (cross entropy 64 × 300,
`normal`, scale 10, seed 0) on 2 threads while another process keeps a core busy, and
prints a hash of them; the figures are how many distinct hashes N runs gave. With
`--raw-erfinv` the draw calls torch's erfinv on the run's threads, as inputs.py did before
it ran erfinv on one thread (torch 2.13, 2-core machine: 6 of 50 runs differed, the second
thread's half of the draw ~1e-9 off). A report, not a test: exit 0 whatever the figures.

Usage: python benchmarks/input_reproducibility.py [--runs 30] [--raw-erfinv]
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys

DRAW = """
import hashlib, sys, torch
import losscheck.cli
from losscheck import inputs
torch.set_num_threads(2)
if {raw}:
    inputs._one_thread = lambda t: __import__("contextlib").nullcontext()
x, _ = inputs.generate("cross_entropy", True, 64, 300, 10.0, "normal", 0)
print(hashlib.md5(x.numpy().tobytes()).hexdigest())
"""
BUSY = "while True: pass"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--raw-erfinv", action="store_true", help="torch's erfinv on the run's threads (as before)")
    a = ap.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        code = DRAW.format(raw=a.raw_erfinv)
        hashes = collections.Counter(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(a.runs)
        )
    finally:
        busy.kill()
    print(f"{a.runs} runs, {'raw erfinv' if a.raw_erfinv else 'erfinv on one thread'}, another core busy: "
          f"{len(hashes)} distinct input(s): " + ", ".join(f"{h[:8]} x{n}" for h, n in hashes.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
