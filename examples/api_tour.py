"""The Python API in one go (README, "Python API"): a sweep from a dict — no YAML — its report,
and the gate against a stored run. Usage: python examples/api_tour.py [OUT_DIR]

Exits as `losscheck compare` would: 0 when the run passes the gate, 1 on a regression.
"""
import sys
from pathlib import Path

import losscheck

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
config = losscheck.Config.from_mapping({
    "name": "api-tour",
    "losses": ["bce_with_logits"],
    "implementations": ["naive", "stable", "torch"],
    "scales": [1, 100],
    "batch_sizes": [64],
    "dtypes": ["float32"],
    "distributions": ["normal", "extreme"],
    "timing": False,  # accuracy only: a second or two
})
current = losscheck.run(config, threads=1, out=out)  # also writes out/api-tour.json
print(f"{len(current.records)} points, {len(current.findings)} finding(s) -> {current.path}")
for finding in current.findings:
    print(f"  {finding['impl']}: {finding['kind']}")
(out / "api-tour.md").write_text(losscheck.render(current))  # the Markdown report, no plots

# The gate: the stored run as the baseline (a file from `losscheck baseline` in CI), the
# thresholds as keyword arguments (those of `gate:` and of the compare flags).
verdict = losscheck.compare(losscheck.load(current.path), current, bits=1, ulp=2)
print("gate:", "PASS" if verdict.passed else "FAIL", f"({len(verdict.regressions)} regression(s))")
sys.exit(verdict.exit_code)
