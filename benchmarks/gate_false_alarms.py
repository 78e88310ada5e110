"""The timing gate's false alarms and power, measured (issue 12, "Done when").

1. A baseline of CONFIG (default configs/ci.yaml) from one run.
2. N reruns of the same commit gated against it (`bench --baseline`, relative timing, the
   config's thresholds) while a CPU-bound process spins on another core: every timing
   regression there is a false alarm.
3. M runs with a planted slowdown (a 3 ms sleep in one implementation, IMPL of LOSS) under
   the same load: the gate must catch each of them in relative mode.

Each run is a subprocess (a fresh interpreter, as CI runs it). Prints a table and, with
--json, writes the figures; exits 1 if a rerun had a false timing regression or a planted
slowdown went through.

Usage: python benchmarks/gate_false_alarms.py [--config configs/ci.yaml] [--reruns 9] [--planted 3]
       [--no-load] [--json FILE] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
SLEEP_S = 0.003


def child(args: list[str], plant: str | None) -> None:
    """Run the CLI in this process, with `plant` ("loss:impl") made 3 ms slower per call."""
    if plant:
        from losscheck.losses import LOSSES, Impl

        loss, impl = plant.split(":")
        old = LOSSES[loss].implementations[impl]

        def slow(*a, **k):
            time.sleep(SLEEP_S)
            return old.fn(*a, **k)
        LOSSES[loss].implementations[impl] = Impl(old.name, old.kind, slow, old.summary)
    from losscheck.cli import main

    sys.argv = ["losscheck", *args]
    main()


def spin(stop) -> None:
    while not stop.is_set():
        pass


def run(cli_args: list[str], plant: str | None = None) -> tuple[int, str, float]:
    cmd = [sys.executable, __file__, "--child", json.dumps({"args": cli_args, "plant": plant})]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - start


def timing_regressions(compare_md: Path) -> list[str]:
    text = compare_md.read_text()
    if "## Regressions" not in text:
        return []
    section = text.split("## Regressions", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and "| timing " in line]


def timing_line(compare_md: Path) -> str:
    return next((line for line in compare_md.read_text().splitlines() if line.startswith("Timing (")), "")


def machine_speed() -> float:
    """Median seconds of one F.cross_entropy 4096 x 1000 float32 forward on this machine, now
    (the brief's yardstick for every absolute time: machines here differ by 1.5x or more)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4096, 1000, generator=g), torch.randint(0, 1000, (4096,), generator=g)
    times = []
    for _ in range(31):
        start = time.perf_counter()
        F.cross_entropy(x, t)
        times.append(time.perf_counter() - start)
    return sorted(times)[15]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="configs/ci.yaml")
    ap.add_argument("--reruns", type=int, default=9)
    ap.add_argument("--planted", type=int, default=3)
    ap.add_argument("--plant", default="bce_with_logits:stable", help="LOSS:IMPL made 3 ms slower")
    ap.add_argument("--no-load", action="store_true", help="no CPU-bound process on the other core")
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(a.child)
        child(spec["args"], spec["plant"])
        return 0
    out = Path(a.out or tempfile.mkdtemp(prefix="gate-false-alarms-"))
    name = Path(a.config).stem
    figures: dict = {}
    base_dir = out / "base"
    code, log, secs = run(["bench", a.config, "--out", str(base_dir), "--no-progress", "--no-plots"])
    if code:
        print(log, file=sys.stderr)
        return 2
    baseline = out / "baseline.json"
    code, log, _ = run(["baseline", str(base_dir / f"{name}.json"), "-o", str(baseline)])
    print(f"baseline from one run ({secs:.1f} s): {log.strip().splitlines()[0]}")
    speed = machine_speed()
    figures["machine_speed_s"] = speed
    print(f"machine: F.cross_entropy 4096 x 1000 float32 forward {speed * 1e3:.2f} ms (median of 31, before the CPU-bound process starts)")
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    stop = multiprocessing.Event()
    hog = None if a.no_load else multiprocessing.Process(target=spin, args=(stop,), daemon=True)
    if hog:
        hog.start()
    rows = []
    figures.update({"config": a.config, "load": not a.no_load, "baseline_warnings": warnings, "runs": []})
    failures = 0
    try:
        for kind, n, plant in (("rerun", a.reruns, None), ("planted", a.planted, a.plant)):
            for i in range(n):
                d = out / f"{kind}-{i}"
                code, log, secs = run(["bench", a.config, "--out", str(d), "--no-progress", "--no-plots",
                                       "--baseline", str(baseline)], plant)
                md = d / f"{name}.compare.md"
                if not md.exists():
                    print(log, file=sys.stderr)
                    return 2
                found = timing_regressions(md)
                planted_hits = [r for r in found if r.split("|")[1].strip() == a.plant.split(":")[0]
                                and r.split("|")[2].strip() == a.plant.split(":")[1]]
                ok = (not found and code == 0) if kind == "rerun" else (bool(planted_hits) and code == 1)
                failures += not ok
                rows.append([kind, i + 1, code, len(found), len(planted_hits), f"{secs:.1f}", timing_line(md)[:150]])
                figures["runs"].append({"kind": kind, "exit": code, "timing_regressions": len(found),
                                        "planted_caught": len(planted_hits), "seconds": secs,
                                        "timing": timing_line(md)})
    finally:
        stop.set()
        if hog:
            hog.join(timeout=5)
    print(tabulate(rows, headers=["run", "#", "exit", "timing regressions", "of the planted impl", "s",
                                  "timing gate"], tablefmt="github"))
    print(f"{'under load (one CPU-bound process)' if not a.no_load else 'no extra load'}; "
          f"{len(warnings)} baseline warning line(s); {failures} run(s) with a wrong verdict")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
