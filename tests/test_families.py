"""The implementation-family registry (losscheck/families): what is derived from it, and that a
family added in a test alone runs through config validation, a sweep and the report."""
from __future__ import annotations

import json

import pytest
import torch

from losscheck import config as C, environment, families, report, results, summaries, sweep
from losscheck.cli import main
from losscheck.errors import ConfigError
from losscheck.families import Family, registered
from losscheck.losses import LOSSES, implementation


def test_the_builtin_families_in_order_and_their_facts():
    assert families.names()[:3] == ("naive", "stable", "torch")
    assert families.defaults() == ("naive", "stable", "torch")
    assert families.framework() == "torch"
    assert summaries.BUILTIN_KINDS["torch"] == "framework"
    assert C.DEFAULTS["implementations"] == families.defaults()
    # The built-in families hand the sweep each loss's own functions.
    for loss in LOSSES.values():
        for name in ("naive", "stable", "torch"):
            impl = implementation(loss, name)
            assert impl.fn is loss.implementations[name].fn and impl.kind == loss.implementations[name].kind


def test_order_key_puts_families_first_then_others_by_name():
    names = ["zeta", "torch", "alpha", "naive", "stable"]
    assert sorted(names, key=families.order_key) == ["naive", "stable", "torch", "alpha", "zeta"]


def _upcast(loss):
    """A toy family: the stable implementation evaluated in float64, rounded once to the dtype."""
    if loss.name == "bce":
        return None  # none for this loss: its points are skipped saying so
    stable = loss.implementations["stable"].fn

    def fn(x, target, reduction="mean", **options):
        wide = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in options.items()}
        t = target.double() if target.is_floating_point() else target
        return stable(x.double(), t, reduction, **wide).to(x.dtype)

    return fn


UPCAST = Family("upcast", "stable", "stable in float64, rounded once", _upcast, order=25, default=False,
                dtypes=("float32", "float16"))
MISSING = Family("missing", "framework", "needs a package that is not there", lambda loss: None, order=90,
                 default=False, requires=("losscheck_no_such_package",), install="pip install no-such-package")

SWEEP = {"name": "fam", "losses": ["bce", "bce_with_logits", "cross_entropy"], "scales": [1, 30],
         "batch_sizes": [32], "classes": [5], "dtypes": ["float32", "float16", "bfloat16"], "devices": ["cpu"],
         "distributions": ["normal"], "seed": 0, "timing": {"min_run_time": 0.001, "scales": [1]}}


def test_an_unregistered_family_is_a_config_error_naming_the_families():
    with pytest.raises(ConfigError) as e:
        C.Config.from_mapping({**SWEEP, "implementations": ["stable", "upcast"]}, "fam.yaml")
    assert "upcast" in str(e.value) and "torch" in e.value.allowed


def test_a_family_declared_in_a_test_runs_through_sweep_and_report():
    with registered(UPCAST), registered(MISSING):
        cfg = C.Config.from_mapping({**SWEEP, "implementations": ["naive", "stable", "upcast", "torch", "missing"]},
                                    "fam.yaml")
        records = sweep.run(cfg, 1)
        data = results.make_results(cfg.as_dict(), environment.capture(1), records, "test")
        md = report.render(data)
    by = {}
    for r in records:
        by.setdefault(r["impl"], []).append(r)
    up = by["upcast"]
    assert {r["kind"] for r in up} == {"stable"}
    # Float64 evaluation rounded once: within one ULP of the (certified) reference everywhere it ran.
    ran = [r for r in up if r["status"] == "ok"]
    assert {(r["loss"], r["dtype"]) for r in ran} == {(lo, d) for lo in ("bce_with_logits", "cross_entropy")
                                                      for d in ("float32", "float16")}
    assert all(r["forward"]["max_ulp"] <= 1 and r["backward"]["max_ulp"] <= 1 for r in ran)
    assert any(r.get("timing") for r in ran)  # timed like the built-ins
    skipped = {(r["loss"], r["dtype"]): r["message"] for r in up if r["status"] != "ok"}
    assert all(r["status"] == "skipped" for r in up if r["status"] != "ok")
    assert skipped[("bce", "float32")] == "upcast has no implementation of bce"
    assert skipped[("cross_entropy", "bfloat16")] == "upcast does not support bfloat16 (supports float32, float16)"
    # An unavailable family: every point skipped with the install command.
    assert {r["status"] for r in by["missing"]} == {"skipped"}
    assert all("pip install no-such-package" in r["message"] for r in by["missing"])
    # The report orders the toy family by its `order`, between stable and torch.
    header = next(line for line in md.splitlines() if line.startswith("| loss") and "upcast" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells.index("stable") < cells.index("upcast") < cells.index("torch")
    # Outside the block the family is gone again.
    assert "upcast" not in families.names()


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already named"):
        with registered(Family("torch", "framework", "again", lambda loss: None)):
            pass


def test_list_shows_families_with_availability_and_install_command(runner):
    with registered(MISSING):
        out = runner.invoke(main, ["list", "--json"])
        text = runner.invoke(main, ["list"])
    assert out.exit_code == 0 and text.exit_code == 0
    fams = {f["name"]: f for f in json.loads(out.stdout)["families"]}
    assert fams["torch"]["unavailable"] is None and fams["torch"]["kind"] == "framework"
    assert fams["torch_compile"]["kind"] == "framework" and fams["torch_compile"]["default"] is False
    assert "pip install no-such-package" in fams["missing"]["unavailable"]
    assert [f for f in fams][:3] == ["naive", "stable", "torch"]
    line = next(li for li in text.stdout.splitlines() if li.startswith("missing "))
    assert "pip install no-such-package" in line


def test_a_custom_implementation_may_not_take_a_family_name():
    with registered(UPCAST):
        with pytest.raises(ConfigError) as e:
            C.custom_spec("math:fabs", name="upcast")
    assert "built-in implementation" in str(e.value)
