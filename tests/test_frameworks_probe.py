"""`losscheck probe` runs every available family on the user's tensors (issue 14, "Done when"):
optax's #1020 (bfloat16 logits, vocabulary 128256, all 0 but 20 at the target) and #896 (soft
targets [0, 1] at logits [−inf, 0]) by every family here, with references from mpmath."""
from __future__ import annotations

import json
import math

import mpmath
import pytest
import torch
from click.testing import CliRunner

from losscheck import families
from losscheck.cli import main

pytest.importorskip("optax")


def _probe(*args) -> tuple[dict, dict]:
    result = CliRunner().invoke(main, ["probe", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    data = json.loads(result.stdout)
    return {r["impl"]: r for r in data["results"]}, data


def _available() -> set[str]:
    return {f.name for f in families.all_families() if f.unavailable() is None}


def test_probe_runs_every_available_family_at_optax_1020(tmp_path):
    x = torch.zeros((1, 128256), dtype=torch.bfloat16)
    x[0, 7] = 20
    torch.save(x, tmp_path / "logits.pt")
    by, data = _probe("cross_entropy", "--input", str(tmp_path / "logits.pt"), "--target", "[7]")
    assert {"naive", "stable", "torch", "jax"} <= _available()
    assert set(by) == _available() and all(r["status"] == "ok" for r in by.values())
    with mpmath.workprec(200):
        exact = float(mpmath.log1p(128255 * mpmath.exp(-20)))
    assert float(data["reference"]["value"]) == pytest.approx(exact, rel=1e-15)
    for flushed in ("jax", "torch"):  # optax's and eager torch's bfloat16 log-sum-exp both lose it
        assert float(by[flushed]["forward"]["value"]) == 0.0 and by[flushed]["forward"]["underflow"] == 1
    assert float(by["stable"]["forward"]["value"]) == pytest.approx(exact, rel=2**-8)


def test_probe_runs_every_available_family_at_optax_896():
    by, data = _probe("cross_entropy", "--input", "[[-inf, 0.0]]", "--target", "[[0.0, 1.0]]", "--dtype", "bfloat16")
    assert set(by) == _available() and all(r["status"] == "ok" for r in by.values())
    assert float(data["reference"]["value"]) == 0.0  # the limit: −(0·log 0 + 1·log 1)
    assert math.isnan(float(by["jax"]["forward"]["value"])) and by["jax"]["forward"]["nan"] == 1
    assert float(by["stable"]["forward"]["value"]) == 0.0
