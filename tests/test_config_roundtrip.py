"""The configuration "as run" is valid input (issue 12, item 6).

`Config.as_dict()` writes the input format: `parse_config` of its YAML (what a report prints
under "Configuration (as run)") gives back an equal config, and `losscheck bench` on that YAML
runs the same points. Results files of schema 1 and 2 hold the former format; `as_input`
turns either into the input format, for the report's block and the gate's policy alike.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from losscheck import results
from losscheck.cli import main
from losscheck.config import (BUILTIN_IMPLS, CUSTOM_APIS, DEFAULT_IMPLS, GATE_KEYS, KEYS, TARGET_KINDS, TIMING_KEYS, WEIGHT_KINDS,
                              Config, as_input, config_from_dict, default_config_text, load_config, parse_config,
                              to_yaml)
from losscheck.dtypes import FORMATS
from losscheck.gate import NEW_MODES, TIMING_MODES, GatePolicy, Thresholds, policy_from_config
from losscheck.inputs import DISTRIBUTIONS
from losscheck.losses import LOSSES
from losscheck.losses.base import REDUCTIONS

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "examples").glob("*.yaml")])
# Results files of schemas 1 and 2 (the former config format), kept as test data: the gallery
# under reports/ is regenerated in the current schema.
OLD_RESULTS = [ROOT / "tests" / "data" / "baseline_v2.json", ROOT / "tests" / "data" / "small_results.json"]
COMMITTED_RESULTS = sorted([*(ROOT / "reports").glob("*.json"), *OLD_RESULTS])


def as_run_text(cfg: Config) -> str:
    """The YAML exactly as the report's footer writes it."""
    return to_yaml(cfg.as_dict())


def assert_round_trips(cfg: Config) -> None:
    back = parse_config(as_run_text(cfg), "as-run.yaml")
    assert back.source == "as-run.yaml"
    assert dataclasses.replace(back, source=cfg.source) == cfg
    assert config_from_dict(cfg.as_dict(), cfg.source) == cfg
    # Through a results file: JSON, then read back as the report and the gate read it.
    stored = json.loads(results.dumps({"config": cfg.as_dict()}))["config"]
    assert config_from_dict(as_input(stored), cfg.source) == cfg
    assert policy_from_config(stored) == cfg.gate


def test_shipped_configs_are_found():
    assert {p.name for p in SHIPPED} >= {"ci.yaml", "default.yaml", "quick.yaml", "custom.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_round_trips(path):
    assert_round_trips(load_config(path))


def test_the_embedded_default_round_trips():
    assert_round_trips(parse_config(default_config_text(), "<embedded default.yaml>"))


def test_as_dict_is_the_input_format():
    cfg = parse_config("""\
name: t
losses: [bce, cross_entropy]
scales: [100, 1]
batch_sizes: [8]
dtypes: [float32]
distributions: [normal]
timeout: null
custom:
  - examples/missing_bracket_bce.py:bce
gate:
  bits: 1
  false_alarm: 0.05
  losses:
    bce: {bits: 3, new: all}
    cross_entropy: {bits: 1}
""", "t.yaml")
    d = cfg.as_dict()
    assert list(d) == list(KEYS)  # every key, in the order KEYS documents them; no `source`
    assert d["gate"] == {"bits": 1.0, "ulp": 0.0, "time_factor": 1.25, "timing": "relative", "versus": "torch",
                         "new": "custom", "min_time": 5e-5, "false_alarm": 0.05,
                         # only what each loss overrides; an override equal to the default stays listed
                         "losses": {"bce": {"bits": 3.0, "new": "all"}, "cross_entropy": {}}}
    assert set(d["gate"]) == set(GATE_KEYS) | {"losses"}
    assert d["timing"] == {"enabled": True, "min_run_time": 0.02, "distributions": ["normal"], "scales": []}
    assert set(d["timing"]) == set(TIMING_KEYS)
    assert d["custom"] == [{"name": "bce", "function": "examples/missing_bracket_bce.py:bce", "losses": [],
                            "api": "torch"}]
    assert d["timeout"] is None and d["threads"] is None
    assert d["scales"] == [1.0, 100.0]
    assert "timeout: null" in as_run_text(cfg)
    assert_round_trips(cfg)


def test_the_default_versus_is_left_out_when_torch_is_not_run():
    # An explicit `versus` must name an implementation of the run; the default is not checked,
    # so writing it out for a run without torch would make the as-run config invalid input.
    cfg = parse_config("name: t\nlosses: [bce]\nimplementations: [naive, stable]\nscales: [1]\nbatch_sizes: [8]\n"
                       "dtypes: [float32]\ndistributions: [normal]\n", "t.yaml")
    assert cfg.gate.default.versus == "torch"
    assert "versus" not in cfg.as_dict()["gate"]
    assert_round_trips(cfg)


# ---- results files of schema 1 and 2: the former format ----------------------------------------

OLD_GATE = {"default": {"bits": 1.0, "ulp": 2.0, "time_factor": 3.0, "timing": "relative"},
            "per_loss": {"bce": {"bits": 5.0, "ulp": 2.0, "time_factor": 3.0, "timing": "off"},
                         "cross_entropy": {"bits": 1.0, "ulp": 2.0, "time_factor": 3.0, "timing": "relative"}}}


def test_as_input_turns_the_former_gate_into_the_input_format():
    stored = {"name": "t", "source": "x.yaml", "gate": OLD_GATE}
    assert as_input(stored) == {"name": "t", "gate": {
        "bits": 1.0, "ulp": 2.0, "time_factor": 3.0, "timing": "relative",
        "losses": {"bce": {"bits": 5.0, "timing": "off"}, "cross_entropy": {}}}}
    assert stored["gate"] is OLD_GATE  # the results are not changed in place
    # The input format (schema 3) is left as it is.
    new = {"name": "t", "gate": as_input(stored)["gate"]}
    assert as_input(new) == new


def test_the_gate_reads_both_formats_alike():
    old = policy_from_config({"gate": OLD_GATE})
    assert old == GatePolicy(Thresholds(bits=1, ulp=2, time_factor=3),
                             {"bce": Thresholds(bits=5, ulp=2, time_factor=3, timing="off"),
                              "cross_entropy": Thresholds(bits=1, ulp=2, time_factor=3)})
    assert policy_from_config({"gate": as_input({"gate": OLD_GATE})["gate"]}) == old
    assert policy_from_config({}) == GatePolicy()
    # The new keys, at top level and per loss.
    new = policy_from_config({"gate": {"versus": "stable", "new": "all", "min_time": 0, "false_alarm": 0.05,
                                       "losses": {"bce": {"new": "none", "min_time": 1e-3}}}})
    assert new.default == Thresholds(versus="stable", new="all", min_time=0.0, false_alarm=0.05)
    assert new.for_loss("bce") == Thresholds(versus="stable", new="none", min_time=1e-3, false_alarm=0.05)


@pytest.mark.parametrize("gate", [{"default": {"bits": -1}}, {"default": {"timing": "sometimes"}},
                                  {"per_loss": {"bce": "x"}}, {"bits": "many"}, {"losses": {"hinge": {}}}])
def test_a_stored_gate_that_does_not_validate_gives_the_defaults(gate):
    # As before: a hand-edited file is gated with the default thresholds, never a traceback.
    assert policy_from_config({"gate": gate}) == GatePolicy()


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.name)
def test_every_committed_results_file_holds_valid_input(path):
    data = results.load(path)
    raw = json.loads(path.read_text())["config"]
    cfg = config_from_dict(as_input(data["config"]), str(path))
    # Nothing of the stored config is lost on the way (the gate aside, whose shape changed).
    for key, value in raw.items():
        if key != "gate":
            assert cfg.as_dict()[key] == value, key
    gate = raw.get("gate") or {"default": {}, "per_loss": {}}
    if "default" in gate:  # schema 1-2
        assert cfg.gate.default == Thresholds(**gate["default"])
    else:  # schema 3: the input format already
        assert cfg.as_dict()["gate"] == gate
    assert policy_from_config(data["config"]) == cfg.gate


def report_yaml(markdown: str) -> str:
    """The YAML block under "## Configuration (as run)"."""
    section = markdown.split("## Configuration (as run)\n\n", 1)[1]
    assert section.startswith("```yaml\n"), section[:80]
    return section[len("```yaml\n"):].split("\n```", 1)[0] + "\n"


@pytest.mark.parametrize("path", OLD_RESULTS, ids=lambda p: p.name)
def test_a_re_rendered_old_report_shows_valid_input(runner, path):
    result = runner.invoke(main, ["report", str(path), "--stdout"])
    assert result.exit_code == 0, (result.output, result.stderr)
    text = report_yaml(result.stdout)
    assert "default:" not in text and "per_loss" not in text
    cfg = parse_config(text, "as-run.yaml")
    assert cfg == config_from_dict(as_input(results.load(path)["config"]), "as-run.yaml")


def test_baseline_thresholds_survive_the_report(runner):
    # The schema-2 CI baseline gated with bits 1, ulp 2, time_factor 3.
    old = ROOT / "tests" / "data" / "baseline_v2.json"
    cfg = parse_config(report_yaml(runner.invoke(main, ["report", str(old), "--stdout"]).stdout), "x")
    assert cfg.gate.default == Thresholds(bits=1, ulp=2, time_factor=3, timing="relative")
    # The committed baseline was made from configs/ci.yaml as it is: its thresholds are the config's.
    path = ROOT / "reports" / "baseline.json"
    cfg = parse_config(report_yaml(runner.invoke(main, ["report", str(path), "--stdout"]).stdout), "x")
    assert cfg.gate == load_config(ROOT / "configs" / "ci.yaml").gate


# ---- bench, then bench the report's as-run block: the same points -------------------------------

AS_RUN_CONFIG = """\
name: asrun
description: "Round trip of the as-run block — every kind of key."
losses: [bce, cross_entropy]
implementations: [naive, torch]
scales: [1, 100]
batch_sizes: [16]
classes: [5]
dtypes: [float32, float16]
devices: [cpu]
distributions: [normal, extreme]
seed: 3
timing: false
thresholds: {{float16: 4}}
reductions: [mean, sum]
weights: [none, random]
custom:
  - name: missing_bracket
    function: {example}:bce
    losses: [bce]
gate:
  bits: 1
  losses:
    bce: {{versus: missing_bracket, new: all}}
timeout: null
"""


def test_bench_on_the_as_run_block_runs_the_same_points(runner, tmp_path):
    cfg_path = tmp_path / "asrun.yaml"
    cfg_path.write_text(AS_RUN_CONFIG.format(example=ROOT / "examples" / "missing_bracket_bce.py"))
    first = runner.invoke(main, ["bench", str(cfg_path), "--out", str(tmp_path / "a"), "--no-progress", "--no-plots"])
    assert first.exit_code == 0, (first.output, first.stderr)
    as_run = tmp_path / "as-run.yaml"
    as_run.write_text(report_yaml((tmp_path / "a" / "asrun.md").read_text()))
    second = runner.invoke(main, ["bench", str(as_run), "--out", str(tmp_path / "b"), "--no-progress", "--no-plots"])
    assert second.exit_code == 0, (second.output, second.stderr)
    a, b = results.load(tmp_path / "a" / "asrun.json"), results.load(tmp_path / "b" / "asrun.json")
    keys_a = [results.record_key(r) for r in a["records"]]
    assert len(keys_a) > 100 and {k[1] for k in keys_a} == {"naive", "torch", "missing_bracket"}
    assert keys_a == [results.record_key(r) for r in b["records"]]
    assert a["config"] == b["config"] == load_config(cfg_path).as_dict()
    # The block is a fixed point: the second report prints the same configuration.
    assert report_yaml((tmp_path / "b" / "asrun.md").read_text()) == as_run.read_text()


# ---- property: every valid config round-trips ----------------------------------------------------

def _subset(values, min_size=1):
    return st.lists(st.sampled_from(values), min_size=min_size, max_size=len(values), unique=True)


def _unique_numbers(elements, min_size=1, max_size=4):
    return st.lists(elements, min_size=min_size, max_size=max_size, unique_by=float)


_positive = st.one_of(st.integers(1, 10**6), st.floats(1e-300, 1e300))
_fraction = st.floats(0.0, 1.0)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def _thresholds(impls: list[str], with_versus: bool):
    fields = {
        "bits": st.floats(0, 64), "ulp": st.one_of(st.integers(0, 10**6), st.floats(0, 1e12)),
        "time_factor": st.floats(1, 100), "timing": st.sampled_from(TIMING_MODES),
        "new": st.sampled_from(NEW_MODES), "min_time": st.floats(0, 1), "false_alarm": st.floats(1e-9, 0.5),
    }
    if with_versus:
        fields["versus"] = st.sampled_from(impls)
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def valid_configs(draw) -> dict:
    data = {
        "name": draw(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)),
        "losses": draw(_subset(list(LOSSES))),
        "scales": draw(_unique_numbers(_positive)),
        "batch_sizes": draw(st.lists(st.integers(1, 4096), min_size=1, max_size=3, unique=True)),
        "dtypes": draw(_subset(list(FORMATS))),
        "distributions": draw(_subset(list(DISTRIBUTIONS))),
    }
    optional = {
        "description": _text,
        "implementations": _subset(list(BUILTIN_IMPLS)),
        "classes": st.lists(st.integers(2, 50000), min_size=1, max_size=3, unique=True),
        "devices": _subset(["cpu", "cuda", "cuda:1", "mps"]),
        "seed": st.integers(0, 2**63),
        "timing": st.one_of(st.booleans(), st.fixed_dictionaries({}, optional={
            "enabled": st.booleans(), "min_run_time": st.floats(1e-6, 60),
            "distributions": _subset(list(DISTRIBUTIONS), min_size=0),
            "scales": _unique_numbers(_positive, min_size=0)})),
        "thresholds": st.fixed_dictionaries({}, optional={
            d: st.floats(0.01, f.significand_bits) for d, f in FORMATS.items()}),
        "threads": st.one_of(st.none(), st.integers(1, 256)),
        "reductions": _subset(list(REDUCTIONS)),
        "weights": _subset(list(WEIGHT_KINDS)),
        "pos_weights": _unique_numbers(_positive),
        "label_smoothing": _unique_numbers(_fraction),
        "ignored": _unique_numbers(_fraction),
        "targets": _subset(list(TARGET_KINDS)),
        "sequence_lengths": st.lists(st.integers(1, 4096), min_size=1, max_size=3, unique=True),
        "timeout": st.one_of(st.none(), st.floats(1e-3, 1e6)),
    }
    for key, values in optional.items():  # each key left out or given, half and half
        if draw(st.booleans()):
            data[key] = draw(values)
    custom = []
    for name in draw(_subset(["mine", "other.v2", "_x"], min_size=0)):
        entry = draw(st.fixed_dictionaries({"function": st.sampled_from(["pkg.mod:fn", "dir/file.py:Cls.fn"])},
                                           optional={"losses": _subset(list(LOSSES), min_size=0),
                                                     "api": st.sampled_from(CUSTOM_APIS)}))
        custom.append({"name": name, **entry})
    if custom or draw(st.booleans()):
        data["custom"] = custom
    impls = list(data.get("implementations", DEFAULT_IMPLS)) + [c["name"] for c in custom]
    if draw(st.booleans()):
        gate = draw(_thresholds(impls, with_versus=True))
        per_loss = {}
        for loss in draw(_subset(list(LOSSES), min_size=0)):
            # A loss's own `versus` must be run for that loss.
            own = [i for i in impls if i not in {c["name"] for c in custom if c.get("losses")
                                                  and loss not in c["losses"]}]
            per_loss[loss] = draw(_thresholds(own, with_versus=True))
        if per_loss or draw(st.booleans()):
            gate["losses"] = per_loss
        data["gate"] = gate
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_configs())
def test_every_valid_config_round_trips(data):
    cfg = config_from_dict(data, "generated")
    # The mapping and its YAML are the same input.
    assert parse_config(to_yaml(data), "generated") == cfg
    assert_round_trips(cfg)
    # as_dict is a fixed point of the round trip.
    assert config_from_dict(cfg.as_dict(), "again").as_dict() == cfg.as_dict()
