"""Config validation (`parse_config` / `load_config`): every problem is one ConfigError that
names the file, the key, the bad value and what is allowed; nothing else ever escapes."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from losscheck.config import (BUILTIN_IMPLS, DEFAULT_IMPLS, KEYS, TIMING_KEYS, Config, default_config_text, load_config,
                              parse_config)
from losscheck.dtypes import FORMATS
from losscheck.errors import ConfigError, LosscheckError
from losscheck.inputs import DISTRIBUTIONS
from losscheck.losses import LOSSES
from helpers import FLAT_LOSSES

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "my-sweep.yaml"

BASE = {
    "name": "t",
    "losses": ["bce", "cross_entropy"],
    "scales": [1, 100],
    "batch_sizes": [8],
    "dtypes": ["float32", "float16"],
    "distributions": ["normal"],
}


def text_of(overrides: dict | None = None, drop: tuple[str, ...] = ()) -> str:
    data = {k: v for k, v in {**BASE, **(overrides or {})}.items() if k not in drop}
    return yaml.safe_dump(data, sort_keys=False)


def config_error(text: str, source: str = SOURCE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return info.value


def test_base_config_is_valid_and_gets_the_defaults():
    cfg = parse_config(text_of(), SOURCE)
    assert isinstance(cfg, Config)
    assert cfg.source == SOURCE
    assert cfg.losses == ("bce", "cross_entropy")
    assert cfg.scales == (1.0, 100.0)
    assert cfg.implementations == DEFAULT_IMPLS
    assert cfg.devices == ("cpu",)
    assert cfg.classes == (10,)
    assert cfg.seed == 0
    assert cfg.threshold_bits("float16") == FORMATS["float16"].default_threshold_bits
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # records are immutable once validated


# (overrides, key named in the message, the bad value as it appears, what is allowed)
BAD = {
    "unknown top-level key": ({"colour": "red"}, "colour", "unknown key", "losses"),
    "unknown loss": ({"losses": ["bce", "hinge"]}, "losses", "'hinge'", "bce, bce_with_logits, sigmoid_bce, cross_entropy"),
    "unknown implementation": ({"implementations": ["naive", "fast"]}, "implementations", "'fast'",
                               "naive, stable, torch"),
    "unknown dtype": ({"dtypes": ["float32", "float8"]}, "dtypes", "'float8'", "float64, float32, float16, bfloat16"),
    "unknown device": ({"devices": ["cpu", "tpu"]}, "devices", "'tpu'", "cpu, cuda, cuda:N, mps"),
    "unknown distribution": ({"distributions": ["gaussian"]}, "distributions", "'gaussian'", "normal, uniform"),
    "scales not a list": ({"scales": "big"}, "scales", "'big'", KEYS["scales"]),
    "scale not a number": ({"scales": [1, "big"]}, "scales", "'big'", "positive finite numbers"),
    "scale not positive": ({"scales": [0]}, "scales", "bad value 0", "positive finite numbers"),
    "scale infinite": ({"scales": [1, ".inf"]}, "scales", "'.inf'", "positive finite numbers"),
    "batch size zero": ({"batch_sizes": [0]}, "batch_sizes", "bad value 0", "integers >= 1"),
    "batch size not a list": ({"batch_sizes": 12}, "batch_sizes", "int 12", KEYS["batch_sizes"]),
    "batch size a float": ({"batch_sizes": [1.5]}, "batch_sizes", "bad value 1.5", "integers >= 1"),
    "batch size a bool": ({"batch_sizes": [True]}, "batch_sizes", "bad value True", "integers >= 1"),
    "empty list": ({"dtypes": []}, "dtypes", "[]", KEYS["dtypes"]),
    "seed a string": ({"seed": "x"}, "seed", "'x'", "integer"),
    "classes below 2": ({"classes": [1]}, "classes", "bad value 1", "integers >= 2"),
    "name not a string": ({"name": 12}, "name", "12", KEYS["name"]),
    "bad name": ({"name": "a/b"}, "name", "'a/b'", "letters, digits, '_', '.', '-'"),
    "threads zero": ({"threads": 0}, "threads", "0 is below the minimum 1", KEYS["threads"]),
    "duplicate dtypes": ({"dtypes": ["float32", "float32"]}, "dtypes", "['float32', 'float32']", "at most once"),
    "duplicate scales 1 and 1.0": ({"scales": [1, 1.0]}, "scales", "[1, 1.0]", "at most once"),
    "duplicate batch sizes": ({"batch_sizes": [64, 64]}, "batch_sizes", "[64, 64]", "at most once"),
    # Regression: devices skipped the duplicate check every other list has, so each point ran twice.
    "duplicate devices": ({"devices": ["cpu", "cpu"]}, "devices", "['cpu', 'cpu']", "at most once"),
    # Regression: a negative seed passed validation and crashed the sweep in numpy's seeding.
    "negative seed": ({"seed": -1}, "seed", "-1", "non-negative integer"),
    # Regression: a 400-digit integer escaped as OverflowError from float().
    "integer beyond float range": ({"scales": [10**400]}, "scales", "bad value 1000", "positive finite"),
    "timing not a mapping": ({"timing": "fast"}, "timing", "a string", "enabled, min_run_time"),
    "unknown timing key": ({"timing": {"warmup": 1}}, "timing.warmup", "unknown key", ", ".join(TIMING_KEYS)),
    "timing.enabled not a bool": ({"timing": {"enabled": "yes please"}}, "timing.enabled", "'yes please'",
                                  "true, false"),
    "min_run_time zero": ({"timing": {"min_run_time": 0}}, "timing.min_run_time", "bad value 0", "(0, 60]"),
    "min_run_time too long": ({"timing": {"min_run_time": 61}}, "timing.min_run_time", "bad value 61", "(0, 60]"),
    "timing distribution unknown": ({"timing": {"distributions": ["gaussian"]}}, "timing.distributions",
                                    "'gaussian'", "normal"),
    # Regression: non-list timing.distributions / timing.scales escaped as TypeError.
    "timing distributions not a list": ({"timing": {"distributions": 5}}, "timing.distributions", "int 5", "normal"),
    "timing scales not a list": ({"timing": {"scales": 5}}, "timing.scales", "int 5", "positive numbers"),
    "timing scale nan": ({"timing": {"scales": ["nan"]}}, "timing.scales", "'nan'", "positive numbers"),
    "thresholds not a mapping": ({"thresholds": [1]}, "thresholds", "[1]", KEYS["thresholds"]),
    "threshold for an unknown dtype": ({"thresholds": {"float8": 3}}, "thresholds.float8", "unknown dtype",
                                       "float64, float32, float16, bfloat16"),
    "threshold above the significand": ({"thresholds": {"float16": 12}}, "thresholds.float16", "bad value 12",
                                        "bits in (0, 11]"),
    "threshold zero": ({"thresholds": {"float32": 0}}, "thresholds.float32", "bad value 0", "bits in (0, 24]"),
}


@pytest.mark.parametrize("overrides, key, bad, allowed", list(BAD.values()), ids=list(BAD))
def test_bad_value_names_file_key_value_and_allowed(overrides, key, bad, allowed):
    e = config_error(text_of(overrides))
    msg = str(e)
    assert msg.startswith(f"{SOURCE}: key '{key}': "), msg
    assert e.source == SOURCE and e.key == key
    assert bad in msg, msg
    assert "; allowed: " in msg and allowed in msg.split("; allowed: ", 1)[1], msg
    assert "\n" not in msg
    assert isinstance(e, LosscheckError) and e.exit_code == 2


@pytest.mark.parametrize("key", ["name", "losses", "scales", "batch_sizes", "dtypes", "distributions"])
def test_missing_required_key(key):
    msg = str(config_error(text_of(drop=(key,))))
    assert msg == f"{SOURCE}: key '{key}': missing; allowed: {KEYS[key]}"


@pytest.mark.parametrize("key", ["implementations", "classes", "devices", "seed", "description", "timing",
                                 "thresholds", "threads"])
def test_optional_keys_may_be_left_out(key):
    assert isinstance(parse_config(text_of(drop=(key,)), SOURCE), Config)


def test_invalid_yaml_names_the_line():
    text = "name: x\nlosses: [bce]\nscales: : 1\n"
    msg = str(config_error(text))
    assert msg.startswith(f"{SOURCE}: invalid YAML at line 3, column ")
    assert "mapping values are not allowed" in msg


def test_invalid_yaml_unclosed_list_names_the_line():
    msg = str(config_error("name: x\nlosses: [bce\nscales: [1]\n"))
    assert "invalid YAML at line 3" in msg and msg.startswith(SOURCE)


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("just words\n", "a string"), ("", "nothing"),
                                       ("42\n", "int")])
def test_top_level_must_be_a_mapping(text, got):
    msg = str(config_error(text))
    assert msg.startswith(f"{SOURCE}: expected a mapping of keys at top level, got {got}")
    assert "; allowed: " + ", ".join(KEYS) in msg


def test_load_config_names_the_file_it_read(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(text_of({"dtypes": ["float8"]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: key 'dtypes': unknown value 'float8'")


def test_load_config_valid_file_keeps_its_path_as_source(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(text_of())
    assert load_config(path).source == str(path)
    assert load_config(str(path)).name == "t"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a regular file"):
        load_config(tmp_path)


def test_path_below_a_file_is_a_config_error(tmp_path):
    # Regression: NotADirectoryError ("file.yaml/x") escaped load_config as a traceback.
    afile = tmp_path / "file.yaml"
    afile.write_text(text_of())
    with pytest.raises(ConfigError) as info:
        load_config(afile / "x.yaml")
    assert str(info.value).startswith(f"{afile / 'x.yaml'}: cannot read")


def test_exponent_without_dot_is_a_number():
    # PyYAML (YAML 1.1) reads `1e4` as a string: the config must accept it as 1e4 anyway.
    assert yaml.safe_load("x: 1e4")["x"] == "1e4"
    text = text_of(drop=("scales",)) + "scales: [1, 1e4, 3e2]\nthresholds: {float32: 1e1}\n" \
        "timing: {min_run_time: 5e-3, scales: [1e4]}\n"
    cfg = parse_config(text, SOURCE)
    assert cfg.scales == (1.0, 300.0, 10000.0)
    assert all(isinstance(s, float) for s in cfg.scales)
    assert cfg.thresholds == {"float32": 10.0}
    assert cfg.timing.min_run_time == 0.005
    assert cfg.timing.scales == (10000.0,)
    assert cfg.timing.applies("normal", 10000.0) and not cfg.timing.applies("normal", 1.0)


def test_timing_may_be_a_bool():
    assert parse_config(text_of({"timing": False}), SOURCE).timing.enabled is False
    assert parse_config(text_of({"timing": True}), SOURCE).timing.enabled is True


def test_devices_accept_cuda_index_and_mps():
    cfg = parse_config(text_of({"devices": ["cpu", "cuda:1", "mps"]}), SOURCE)
    assert cfg.devices == ("cpu", "cuda:1", "mps")


# The losses of LM training (issue 18): configs/llm.yaml, not the default and quick configs.
LLM_LOSSES = {"token_logprobs", "entropy", "sharded_cross_entropy", "focal_loss", "softmax_focal_loss"}


def test_embedded_default_loads():
    cfg = load_config(None)
    assert cfg.name == "default"
    assert cfg.source == "<embedded default.yaml>"
    assert set(cfg.losses) == set(FLAT_LOSSES) - LLM_LOSSES  # sequence losses: configs/sequence.yaml
    assert set(cfg.dtypes) == set(FORMATS)
    assert cfg.implementations == DEFAULT_IMPLS


def test_embedded_default_is_configs_default_yaml():
    assert default_config_text() == (ROOT / "configs" / "default.yaml").read_text()
    assert load_config(ROOT / "configs" / "default.yaml").as_dict() == load_config(None).as_dict()


def test_quick_config_loads():
    cfg = load_config(ROOT / "configs" / "quick.yaml")
    assert cfg.name == "quick"
    assert set(cfg.losses) == set(FLAT_LOSSES) - LLM_LOSSES and set(cfg.dtypes) == set(FORMATS)
    assert cfg.devices == ("cpu", "cuda")


def test_as_dict_drops_source_and_is_yaml_safe():
    d = parse_config(text_of(), SOURCE).as_dict()
    assert "source" not in d
    assert yaml.safe_load(yaml.safe_dump(d))["scales"] == [1.0, 100.0]


# ---- property tests: whatever the text, a Config or a ConfigError ----------------------------

_chars = st.characters(blacklist_categories=("Cs",))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(_chars, max_size=12),
    st.sampled_from([*LOSSES, *FORMATS, *DISTRIBUTIONS, *BUILTIN_IMPLS, "cpu", "cuda", "cuda:0", "mps", "tpu",
                     "1e4", "nan", "inf", "-1", "0", "a/b", "float8"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.one_of(st.sampled_from(TIMING_KEYS + tuple(FORMATS)), st.text(_chars, max_size=6)),
                      inner, max_size=4),
    max_leaves=8,
)
_keys = st.one_of(st.sampled_from(list(KEYS)), st.text(_chars, max_size=8), st.integers())


def _check_outcome(text: str) -> None:
    try:
        cfg = parse_config(text, SOURCE)
    except ConfigError as e:
        assert str(e).startswith(SOURCE + ": ")
        return
    # Anything accepted satisfies what the core trusts.
    assert isinstance(cfg, Config)
    assert cfg.losses and set(cfg.losses) <= set(LOSSES)
    assert set(cfg.implementations) <= set(BUILTIN_IMPLS)
    assert set(cfg.dtypes) <= set(FORMATS) and set(cfg.distributions) <= set(DISTRIBUTIONS)
    assert all(math.isfinite(s) and s > 0 for s in cfg.scales) and list(cfg.scales) == sorted(set(cfg.scales))
    assert all(isinstance(b, int) and b >= 1 for b in cfg.batch_sizes)
    assert all(isinstance(c, int) and c >= 2 for c in cfg.classes)
    assert len(set(cfg.devices)) == len(cfg.devices)
    assert isinstance(cfg.seed, int) and cfg.seed >= 0
    assert 0 < cfg.timing.min_run_time <= 60
    assert all(math.isfinite(s) and s > 0 for s in cfg.timing.scales)
    assert all(0 < b <= FORMATS[d].significand_bits for d, b in cfg.thresholds.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8))
def test_random_mappings_give_config_or_config_error(data):
    _check_outcome(yaml.safe_dump(data))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(KEYS)), _values, min_size=1, max_size=3))
@example({"timing": {"distributions": 5}})
@example({"timing": {"scales": 5}})
@example({"scales": [10**400]})
@example({"seed": -1})
@example({"devices": ["cpu", "cpu"]})
def test_valid_config_with_random_overrides_gives_config_or_config_error(overrides):
    # Starting from a valid config reaches the checks behind the required keys.
    _check_outcome(text_of(overrides))


@settings(max_examples=150, deadline=None)
@given(st.text(_chars, max_size=80))
def test_random_text_gives_config_or_config_error(text):
    _check_outcome(text)


# ---- duplicate keys: an error naming both lines (PyYAML would keep the last silently) ------------

TEXT = """\
name: t
losses: [bce, cross_entropy]
scales: [1, 100]
dtypes: [float32]
batch_sizes: [8]
distributions: [normal]
"""


@pytest.mark.parametrize("extra, key, lines", [
    ("dtypes: [float16]\n", "dtypes", "lines 4 and 7"),
    ("gate:\n  bits: 1\n  ulp: 2\n  bits: 3\n", "gate.bits", "lines 8 and 10"),
    ("timing:\n  enabled: true\n  min_run_time: 0.1\n  enabled: false\n", "timing.enabled", "lines 8 and 10"),
    ("custom:\n  - name: a\n    function: a.py:f\n  - name: b\n    function: b.py:f\n    name: c\n",
     "custom[1].name", "lines 10 and 12"),
    ("gate:\n  losses:\n    bce: {bits: 1}\n    bce: {ulp: 1}\n", "gate.losses.bce", "lines 9 and 10"),
    ("gate: {losses: {bce: {bits: 1, bits: 2}}}\n", "gate.losses.bce.bits", "twice on line 7"),
    # Two spellings of one key are one key.
    ("thresholds:\n  float32: 4\n  'float32': 5\n", "thresholds.float32", "lines 8 and 9"),
])
def test_duplicate_key_names_both_lines(extra, key, lines):
    msg = str(config_error(TEXT + extra))
    assert msg == f"{SOURCE}: key '{key}': duplicate key ({lines}); allowed: each key once"


def test_duplicate_top_level_key_is_reported_before_nested_ones():
    msg = str(config_error(TEXT + "gate: {bits: 1, bits: 2}\nname: u\n"))
    assert msg.startswith(f"{SOURCE}: key 'name': duplicate key (lines 1 and 8)")


def test_merge_keys_still_work_and_an_explicit_key_overrides_a_merged_one():
    cfg = parse_config(TEXT + "gate:\n  losses:\n    bce: &strict {bits: 1, ulp: 2}\n"
                              "    cross_entropy:\n      <<: *strict\n      bits: 5\n", SOURCE)
    assert (cfg.gate.for_loss("bce").bits, cfg.gate.for_loss("bce").ulp) == (1.0, 2.0)
    assert (cfg.gate.for_loss("cross_entropy").bits, cfg.gate.for_loss("cross_entropy").ulp) == (5.0, 2.0)
    # Inside the merged mapping itself a key twice is still a duplicate.
    assert "key 'gate.bits': duplicate key" in str(config_error(TEXT + "gate:\n  <<: {bits: 1, bits: 2}\n"))


def test_an_alias_cycle_is_not_walked_forever():
    assert "refers to itself through an alias" in str(config_error(TEXT + "loop: &a [*a]\n"))


def test_duplicate_key_from_the_command_line_is_one_line_exit_2(runner, tmp_path):
    from helpers import assert_one_error_line
    from losscheck.cli import main
    path = tmp_path / "x.yaml"
    path.write_text(TEXT + "dtypes: [float16]\n")
    result = runner.invoke(main, ["bench", str(path), "--out", str(tmp_path / "out")])
    assert_one_error_line(result, f"{path}: key 'dtypes': duplicate key (lines 4 and 7); allowed: each key once")
    assert not (tmp_path / "out").exists()


# ---- unknown keys and values: the closest valid one is suggested (difflib, as Click) -------------

SUGGESTIONS = {
    "top-level key": ({"dtype": ["float32"]}, "dtype", "unknown key (did you mean 'dtypes'?)"),
    "loss": ({"losses": ["bec"]}, "losses", "unknown value 'bec' (did you mean 'bce'?)"),
    "implementation": ({"implementations": ["stabel"]}, "implementations", "(did you mean 'stable'?)"),
    # float61 is one edit from float64 and from float16 alike: both are named.
    "dtype": ({"dtypes": ["float61"]}, "dtypes", "(did you mean 'float64' or 'float16'?)"),
    "dtype case": ({"dtypes": ["Float32"]}, "dtypes", "(did you mean 'float32'?)"),
    "distribution": ({"distributions": ["extrem"]}, "distributions", "(did you mean 'extreme'?)"),
    "reduction": ({"reductions": ["meen"]}, "reductions", "(did you mean 'mean'?)"),
    "weight": ({"weights": ["randon"]}, "weights", "(did you mean 'random'?)"),
    "target": ({"targets": ["sof"]}, "targets", "(did you mean 'soft'?)"),
    "timing key": ({"timing": {"min_runtime": 1}}, "timing.min_runtime", "(did you mean 'min_run_time'?)"),
    "timing distribution": ({"timing": {"distributions": ["normol"]}}, "timing.distributions",
                            "unknown value 'normol' (did you mean 'normal'?)"),
    "threshold dtype": ({"thresholds": {"bfloat": 3}}, "thresholds.bfloat", "unknown dtype (did you mean 'bfloat16'?)"),
    "gate key": ({"gate": {"bitz": 1}}, "gate.bitz", "unknown key (did you mean 'bits'?)"),
    "gate timing": ({"gate": {"timing": "relativ"}}, "gate.timing", "(did you mean 'relative'?)"),
    "gate new": ({"gate": {"new": "customs"}}, "gate.new", "unknown value 'customs' (did you mean 'custom'?)"),
    "gate versus": ({"gate": {"versus": "torc"}}, "gate.versus", "(did you mean 'torch'?)"),
    "gate loss": ({"gate": {"losses": {"cross_entropi": {}}}}, "gate.losses.cross_entropi",
                  "unknown loss (did you mean 'cross_entropy'?)"),
    "gate per-loss key": ({"gate": {"losses": {"bce": {"false_alarms": 0.1}}}}, "gate.losses.bce.false_alarms",
                          "(did you mean 'false_alarm'?)"),
    "custom key": ({"custom": [{"function": "a.py:f", "apis": "numpy"}]}, "custom[0].apis", "(did you mean 'api'?)"),
    "custom api": ({"custom": [{"function": "a.py:f", "api": "nump"}]}, "custom[0].api", "(did you mean 'numpy'?)"),
    "custom loss": ({"custom": [{"function": "a.py:f", "losses": ["bce_logits"]}]}, "custom[0].losses",
                    "(did you mean 'bce_with_logits'?)"),
}


@pytest.mark.parametrize("overrides, key, fragment", list(SUGGESTIONS.values()), ids=list(SUGGESTIONS))
def test_unknown_key_or_value_suggests_the_closest(overrides, key, fragment):
    msg = str(config_error(text_of(overrides)))
    assert msg.startswith(f"{SOURCE}: key '{key}': "), msg
    assert fragment in msg.split("; allowed: ")[0], msg
    assert "; allowed: " in msg and "\n" not in msg


@pytest.mark.parametrize("overrides", [{"colour": "red"}, {"dtypes": ["int8"]}, {"distributions": ["gaussian"]},
                                       {"gate": {"new": "everything"}}, {"timing": {"warmup": 1}},
                                       {"dtypes": [16]}])
def test_no_suggestion_when_nothing_is_close(overrides):
    msg = str(config_error(text_of(overrides)))
    assert "did you mean" not in msg and "; allowed: " in msg, msg


# ---- the gate keys of issue 12: versus, new, min_time, false_alarm --------------------------------

def test_gate_keys_are_described_in_keys():
    from losscheck.config import GATE_KEYS
    assert {"versus", "new", "min_time", "false_alarm"} <= set(GATE_KEYS)
    assert all(k in KEYS["gate"] for k in GATE_KEYS + ("losses",))


def test_new_gate_keys_default_and_parse():
    from losscheck.gate import Thresholds
    assert parse_config(text_of(), SOURCE).gate.default == Thresholds()
    assert (Thresholds().versus, Thresholds().new, Thresholds().min_time, Thresholds().false_alarm) == (
        "torch", "custom", 5e-5, 0.01)
    cfg = parse_config(text_of({"gate": {"versus": "stable", "new": "all", "min_time": "1e-4", "false_alarm": 0.5,
                                         "losses": {"bce": {"new": "none", "versus": "naive", "min_time": 0,
                                                            "false_alarm": 1e-3}}}}), SOURCE)
    assert cfg.gate.default == Thresholds(versus="stable", new="all", min_time=1e-4, false_alarm=0.5)
    assert cfg.gate.for_loss("bce") == Thresholds(versus="naive", new="none", min_time=0.0, false_alarm=1e-3)
    assert cfg.gate.for_loss("cross_entropy") == cfg.gate.default


@pytest.mark.parametrize("gate, key, fragment, allowed", [
    ({"new": "some"}, "gate.new", "unknown value 'some'", "custom, all, none"),
    ({"min_time": -1e-6}, "gate.min_time", "bad value -1e-06", "seconds >= 0"),
    ({"min_time": ".inf"}, "gate.min_time", "bad value '.inf'", "seconds >= 0"),
    ({"false_alarm": 0}, "gate.false_alarm", "bad value 0", "a probability in (0, 0.5]"),
    ({"false_alarm": 0.51}, "gate.false_alarm", "bad value 0.51", "(0, 0.5]"),
    ({"false_alarm": "often"}, "gate.false_alarm", "bad value 'often'", "(0, 0.5]"),
    ({"losses": {"bce": {"false_alarm": 1}}}, "gate.losses.bce.false_alarm", "bad value 1", "(0, 0.5]"),
    ({"losses": {"bce": {"new": True}}}, "gate.losses.bce.new", "unknown value True", "custom, all, none"),
    ({"versus": "jax"}, "gate.versus", "'jax' is not an implementation of the run", "naive, stable, torch"),
    ({"versus": 3}, "gate.versus", "3 is not an implementation of the run", "naive, stable, torch"),
])
def test_bad_new_gate_values(gate, key, fragment, allowed):
    msg = str(config_error(text_of({"gate": gate})))
    assert msg.startswith(f"{SOURCE}: key '{key}': "), msg
    assert fragment in msg and msg.endswith(allowed), msg


def test_versus_must_be_one_of_the_run_implementations():
    # Built-in ones not in `implementations` are not run.
    e = config_error(text_of({"implementations": ["naive", "stable"], "gate": {"versus": "torch"}}))
    assert str(e) == (f"{SOURCE}: key 'gate.versus': 'torch' is not an implementation of the run; "
                      "allowed: naive, stable")
    # Left out, the default (torch) is accepted whatever is run.
    assert parse_config(text_of({"implementations": ["naive"]}), SOURCE).gate.default.versus == "torch"
    # A custom implementation of the config may be named.
    custom = [{"name": "mine", "function": "a.py:f", "losses": ["bce"]}]
    cfg = parse_config(text_of({"custom": custom, "gate": {"versus": "mine"}}), SOURCE)
    assert cfg.gate.default.versus == "mine"
    # Per loss: the implementation must run for that loss (mine is bce only).
    ok = parse_config(text_of({"custom": custom, "gate": {"losses": {"bce": {"versus": "mine"}}}}), SOURCE)
    assert ok.gate.for_loss("bce").versus == "mine"
    msg = str(config_error(text_of({"custom": custom, "gate": {"losses": {"cross_entropy": {"versus": "mine"}}}})))
    assert msg == (f"{SOURCE}: key 'gate.losses.cross_entropy.versus': 'mine' is not an implementation of the run; "
                   "allowed: naive, stable, torch")
    # Only the config's own implementations are known when it is parsed (--impl comes later).
    assert "'gate.versus': 'bce' is not" in str(config_error(text_of({"gate": {"versus": "bce"}})))
