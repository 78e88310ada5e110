"""Regression guard: `stable` is never less accurate than `torch`, point by point.

Over a grid of scales, value sets and every dtype, through the same sweep the CLI runs:
the forward max bits, the gradient max bits and the mean-loss ULPs of `stable` never exceed
torch's — except within 1 ULP (faithful rounding). Where both compute natively in the
dtype (float32, float64) each elementwise log/exp/division rounds, so neither is correctly
rounded everywhere and which one lands on the right value at a given element is chance: at
that level the comparison is a coin toss, not a property. Above 1 ULP it is a property.
"""
from __future__ import annotations

import pytest

from losscheck import sweep
from losscheck.config import parse_config

GRID = """
name: stable_vs_torch
losses: [bce, bce_with_logits, cross_entropy]
implementations: [stable, torch]
scales: [1, 10, 100, 10000]
batch_sizes: [300, 2048]
classes: [7, 100]
dtypes: [{dtype}]
devices: [cpu]
distributions: [normal, uniform, extreme, confident_correct, confident_wrong, ties, dominant, target_min, nonfinite]
seed: 3
timing: false
"""


FAITHFUL_BITS = 1.0  # log2(1 + 1 ULP)


def _key(r):
    return (r["loss"], r["batch"], r["classes"], r["scale"], r["distribution"])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_stable_is_never_less_accurate_than_torch(dtype):
    records = sweep.run(parse_config(GRID.format(dtype=dtype)), threads=2)
    assert all(r["status"] == "ok" for r in records), [r["message"] for r in records if r["status"] != "ok"]
    torch_by_key = {_key(r): r for r in records if r["impl"] == "torch"}
    stable = [r for r in records if r["impl"] == "stable"]
    assert len(stable) == len(torch_by_key) > 100
    problems = []
    for s in stable:
        t = torch_by_key[_key(s)]
        for section in ("forward", "backward"):
            sb, tb = s[section]["max_bits"], t[section]["max_bits"]
            if sb > max(tb, FAITHFUL_BITS):
                problems.append((_key(s), section, sb, tb))
        sr, tr = s["forward"]["reduced_ulp"], t["forward"]["reduced_ulp"]
        if sr > max(tr, 1):
            problems.append((_key(s), "mean ulp", sr, tr))
    assert not problems, problems


def test_stable_is_strictly_better_where_torch_loses_bits():
    # The two cases the issue names: BCE-with-logits for x << 0 with y = 0 in float32
    # (torch rounds the tiny loss to 0), and confident-correct cross entropy.
    records = sweep.run(parse_config(GRID.format(dtype="float32").replace(
        "distributions: [normal, uniform, extreme, confident_correct, confident_wrong, ties, dominant, "
        "target_min, nonfinite]", "distributions: [confident_correct]")), threads=2)
    by = {(r["loss"], r["impl"], r["batch"], r["classes"], r["scale"]): r for r in records}
    for loss, classes in (("bce_with_logits", None), ("cross_entropy", 7)):
        s, t = by[(loss, "stable", 300, classes, 100.0)], by[(loss, "torch", 300, classes, 100.0)]
        # torch loses at least a third of float32's 24 bits; stable is within 1 ULP.
        assert s["forward"]["max_bits"] <= 1.0 and t["forward"]["max_bits"] >= 8, (loss, s["forward"], t["forward"])
