"""configs/frameworks.yaml reaches optax's bugs at their exact points (issue 14, "Done when"):
a plain bench of its `extra` grids reports jax's 0.0 at #1020 (bfloat16, vocabulary 128256) and
its NaN at #896 (two classes, soft targets [0, 1] at logits [−inf, x]), with references that
agree with mpmath; and the `extra:` key itself (validation, round trip, no duplicated point,
`--loss`)."""
from __future__ import annotations

import math
from pathlib import Path

import mpmath
import pytest
import yaml
from click.testing import CliRunner
from helpers import assert_one_error_line

from losscheck import config as C, results, sweep
from losscheck.cli import main
from losscheck.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ROOT / "configs" / "frameworks.yaml"


def _mp_cross_entropy(row, target) -> mpmath.mpf:
    """−Σ q_j·log softmax(x)_j of one row in mpmath (300 bits); q: a class index or probabilities.
    A −inf logit has probability 0, and a class of probability 0 adds nothing (its limit)."""
    with mpmath.workprec(300):
        finite = [mpmath.mpf(v) for v in row if v != -math.inf]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in finite))
        q = [1.0 if j == target else 0.0 for j in range(len(row))] if isinstance(target, int) else target
        return -mpmath.fsum(mpmath.mpf(qj) * (mpmath.mpf(x) - lse) for x, qj in zip(row, q, strict=True) if qj)


def _mp_mean(case: sweep.Case) -> float:
    """The point's mean loss from its own (seeded) inputs, in mpmath."""
    data = sweep.point_data(LOSSES[case.loss], case, seed=0)
    x = data.inp.double().tolist()
    t = data.target.tolist() if data.target.is_floating_point() else [int(k) for k in data.target.tolist()]
    return float(mpmath.fsum(_mp_cross_entropy(r, q) for r, q in zip(x, t, strict=True)) / len(x))


@pytest.fixture(scope="module")
def extra_records(tmp_path_factory) -> list[dict]:
    """`losscheck bench` of configs/frameworks.yaml with its main grid cut to one small point
    and its `extra` grids as shipped (the families that show the bugs, on the CPU, untimed)."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    data = yaml.safe_load(FRAMEWORKS.read_text())
    data.update(implementations=["stable", "torch", "jax"], devices=["cpu"], dtypes=["bfloat16", "float32"],
                scales=[1], batch_sizes=[2], classes=[3], distributions=["normal"], targets=["hard"],
                losses=["cross_entropy"], timing=False)
    tmp = tmp_path_factory.mktemp("fw")
    cfg = tmp / "frameworks.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp / "out"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots",
                                       "--threads", "1"])
    assert result.exit_code == 0, (result.output, result.stderr)
    return results.load(out / "frameworks.json")["records"]


def _at(records, impl, dtype, classes, dist, scale) -> dict:
    [r] = [r for r in records if (r["impl"], r["dtype"], r["classes"], r["distribution"], r["scale"])
           == (impl, dtype, classes, dist, scale)]
    return r


def test_frameworks_yaml_reaches_optax_1020_exactly(extra_records):
    jax = _at(extra_records, "jax", "bfloat16", 128256, "dominant_target", 20.0)
    case = sweep.Case(0, "cross_entropy", "cpu", "bfloat16", 2, 128256, "dominant_target", 20.0)
    with mpmath.workprec(300):  # every row: log1p(128255·e^−20)
        exact = float(mpmath.log1p(128255 * mpmath.exp(-20)))
    assert _mp_mean(case) == pytest.approx(exact, rel=1e-15)  # the point is the input
    assert jax["status"] == "ok" and jax["batch"] == 2
    assert jax["forward"]["value"] == 0.0 and jax["forward"]["underflow"] == 2
    assert jax["forward"]["reference_value"] == pytest.approx(exact, rel=1e-15)
    # The reference rounded to bfloat16 (8 significant bits), and the careful form gets it.
    assert jax["forward"]["reference"] == pytest.approx(exact, rel=2**-8)
    stable = _at(extra_records, "stable", "bfloat16", 128256, "dominant_target", 20.0)
    assert stable["forward"]["value"] == jax["forward"]["reference"]
    # Normal logits at this vocabulary are measured too (the grid's other value set).
    normal = _at(extra_records, "jax", "float32", 128256, "normal", 1.0)
    case = sweep.Case(0, "cross_entropy", "cpu", "float32", 2, 128256, "normal", 1.0)
    assert normal["forward"]["reference_value"] == pytest.approx(_mp_mean(case), rel=1e-14)


def test_frameworks_yaml_reaches_optax_896_exactly(extra_records):
    for dtype in ("bfloat16", "float32"):
        jax = _at(extra_records, "jax", dtype, 2, "masked", 1.0)
        case = sweep.Case(0, "cross_entropy", "cpu", dtype, 8, 2, "masked", 1.0, "mean", (("targets", "soft"),))
        data = sweep.point_data(LOSSES["cross_entropy"], case, seed=0)
        # The input in every row: one logit −inf with probability exactly 0, the other 1.
        for row, q in zip(data.inp.double().tolist(), data.target.double().tolist(), strict=True):
            assert sorted(q) == [0.0, 1.0] and row[q.index(0.0)] == -math.inf
        assert abs(_mp_mean(case)) < 1e-80  # 0 to mpmath's 300 bits
        assert jax["status"] == "ok" and jax["options"] == {"targets": "soft"}
        assert math.isnan(jax["forward"]["value"]) and jax["forward"]["nan"] == 8
        assert jax["forward"]["reference_value"] == 0.0
        assert _at(extra_records, "stable", dtype, 2, "masked", 1.0)["forward"]["value"] == 0.0


def test_the_extra_grids_of_frameworks_yaml_are_small():
    """The exact points cost a small batch at the large vocabulary, not the main grid's 64."""
    cfg = C.load_config(FRAMEWORKS)
    extra = [c for c in sweep.cases(cfg) if c.classes in (2, 128256)]
    assert {(c.batch, c.classes) for c in extra} == {(2, 128256), (8, 2)}
    assert max(sweep.estimate_bytes(c) for c in extra) < 64 << 20
    assert {c.loss for c in extra} == {"cross_entropy"}
    assert set(cfg.implementations) == {"naive", "stable", "torch", "torch_compile", "jax"}


# ---- the `extra:` key -----------------------------------------------------------------------------

BASE = {"name": "x", "losses": ["bce", "cross_entropy"], "scales": [1], "batch_sizes": [4], "classes": [3],
        "dtypes": ["float32"], "distributions": ["normal"]}


def test_extra_grids_follow_the_main_grid_without_repeating_a_point():
    cfg = C.Config.from_mapping({**BASE, "extra": [{"losses": ["cross_entropy"], "classes": [3, 50]},
                                                   {"scales": [1, 7], "dtypes": ["bfloat16"]}]})
    got = [(c.loss, c.classes, c.scale, c.dtype) for c in sweep.cases(cfg)]
    assert got == [("bce", None, 1.0, "float32"), ("cross_entropy", 3, 1.0, "float32"),
                   ("cross_entropy", 50, 1.0, "float32"),  # (3, 1.0, float32) was swept already
                   ("bce", None, 1.0, "bfloat16"), ("bce", None, 7.0, "bfloat16"),
                   ("cross_entropy", 3, 1.0, "bfloat16"), ("cross_entropy", 3, 7.0, "bfloat16")]
    assert [c.index for c in sweep.cases(cfg)] == list(range(len(got)))  # shards and merge rely on it
    # `bench --loss bce` (Config.only, every grid): the extra grids keep to it.
    only = cfg.only(("bce",))
    assert {c.loss for c in sweep.cases(only)} == {"bce"} and len(list(sweep.cases(only))) == 3


def test_extra_round_trips_through_the_input_format():
    cfg = C.Config.from_mapping({**BASE, "extra": [{"classes": [128256], "batch_sizes": [2], "spatial": [[2, 2]]}]})
    stored = cfg.as_dict()
    assert stored["extra"] == [{"classes": [128256], "batch_sizes": [2], "spatial": [[2, 2]]}]
    assert C.config_from_dict(stored, cfg.source) == cfg
    assert C.Config.from_mapping(BASE).as_dict()["extra"] == []
    assert C.config_from_dict({**BASE, "extra": []}, "<mapping>") == C.Config.from_mapping(BASE)  # as written out


@pytest.mark.parametrize("extra,key,fragment", [
    ({"seed": 3}, "extra[0].seed", "not a grid key"),
    ({"clases": [4]}, "extra[0].clases", "did you mean 'classes'"),
    ({"classes": [1]}, "extra[0].classes", "bad value 1; allowed: integers >= 2"),
    ({"losses": ["focal"]}, "extra[0].losses", "unknown value 'focal'"),
    ({"losses": ["bce", "cross_entropi"]}, "extra[0].losses", "did you mean 'cross_entropy'"),
    ({}, "extra[0]", "non-empty mapping"),
])
def test_a_bad_extra_grid_is_a_one_line_error_naming_it(tmp_path, extra, key, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "extra": [extra]}))
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path)])
    assert_one_error_line(result, str(cfg), f"key '{key}'", fragment, "allowed: ")


def test_extra_must_be_a_list(tmp_path):
    with pytest.raises(C.ConfigError, match=r"key 'extra': expected a list of mappings, got"):
        C.Config.from_mapping({**BASE, "extra": {"classes": [4]}})
