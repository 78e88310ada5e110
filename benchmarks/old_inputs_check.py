"""Show that the evaluation did not move: run a config on the OLD (numpy) inputs with the
current code and compare every accuracy number with a results file the old code wrote.

The inputs generator changed in issue 13 (torch.Generator on the point's device, results'
`environment.inputs` "torch-1"); reference, metrics and sweep were changed too. Run on the
very inputs of the old file (tests/legacy_inputs.py), every record's status, threshold,
forward and backward numbers must be identical — bit for bit, not within the gate's
tolerance — so that the new inputs are the only reason a regenerated report differs.

Usage: python benchmarks/old_inputs_check.py OLD_RESULTS.json [--loss NAME ...] [--threads N]
  e.g. git show 51e542e^:reports/baseline.json > old.json   (the CI baseline of the numpy inputs)
       python benchmarks/old_inputs_check.py old.json          (configs/ci.yaml's points)
Exit 0 when every point is unchanged, 1 otherwise (the changed points are listed).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

COMPARED = ("status", "threshold_bits", "forward", "backward", "undefined")


def _same(a, b) -> bool:
    """Equality of JSON values with NaN equal to NaN (a NaN loss is a result like any other)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def changed_points(old: dict, losses: tuple[str, ...] = (), threads: int = 1) -> tuple[int, list[str]]:
    """(points compared, descriptions of those whose numbers differ): the old file's config
    run now on the old inputs, timing off."""
    import torch

    from legacy_inputs import use_legacy_inputs
    from losscheck import sweep
    from losscheck.config import as_input, config_from_dict
    from losscheck.results import record_key

    stored = as_input(old["config"])
    if losses:
        stored["losses"] = [name for name in stored["losses"] if name in losses]
    stored["timing"] = False
    config = config_from_dict(stored, "old results' config")
    saved = []
    use_legacy_inputs(lambda obj, name, value: (saved.append((obj, name, getattr(obj, name))),
                                                setattr(obj, name, value)))
    try:
        torch.set_num_threads(threads)
        new = {record_key(r): r for r in sweep.run(config, threads)}
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
    changed = []
    olds = [r for r in old["records"] if not losses or r["loss"] in losses]
    for r in olds:
        n = new.get(record_key(r))
        if n is None:
            changed.append(f"{record_key(r)}: not run now")
            continue
        diff = [f for f in COMPARED if not _same(r.get(f), n.get(f))]
        if diff:
            changed.append(f"{record_key(r)}: {', '.join(diff)} differ")
    return len(olds), changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_results")
    ap.add_argument("--loss", action="append", default=[])
    ap.add_argument("--threads", type=int, default=None, help="default: the old file's")
    a = ap.parse_args()
    from losscheck import results

    old = results.load(a.old_results)
    threads = a.threads or old["environment"].get("threads") or 1
    n, changed = changed_points(old, tuple(a.loss), threads)
    print(f"{n - len(changed)} of {n} points unchanged on the old inputs ({a.old_results}, {threads} thread(s))")
    for line in changed[:50]:
        print("  " + line)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
