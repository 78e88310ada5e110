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

from losscheck.config import (BUILTIN_IMPLS, KEYS, TIMING_KEYS, Config, default_config_text, load_config,
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
    assert cfg.implementations == BUILTIN_IMPLS
    assert cfg.devices == ("cpu",)
    assert cfg.classes == (10,)
    assert cfg.seed == 0
    assert cfg.threshold_bits("float16") == FORMATS["float16"].default_threshold_bits
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # records are immutable once validated


# (overrides, key named in the message, the bad value as it appears, what is allowed)
BAD = {
    "unknown top-level key": ({"colour": "red"}, "colour", "unknown key", "losses"),
    "unknown loss": ({"losses": ["bce", "hinge"]}, "losses", "'hinge'", "bce, bce_with_logits, cross_entropy"),
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
    with pytest.raises(ConfigError, match="cannot read: IsADirectoryError"):
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


def test_embedded_default_loads():
    cfg = load_config(None)
    assert cfg.name == "default"
    assert cfg.source == "<embedded default.yaml>"
    assert set(cfg.losses) == set(FLAT_LOSSES)  # sequence losses: configs/sequence.yaml
    assert set(cfg.dtypes) == set(FORMATS)
    assert cfg.implementations == BUILTIN_IMPLS


def test_embedded_default_is_configs_default_yaml():
    assert default_config_text() == (ROOT / "configs" / "default.yaml").read_text()
    assert load_config(ROOT / "configs" / "default.yaml").as_dict() == load_config(None).as_dict()


def test_quick_config_loads():
    cfg = load_config(ROOT / "configs" / "quick.yaml")
    assert cfg.name == "quick"
    assert set(cfg.losses) == set(FLAT_LOSSES) and set(cfg.dtypes) == set(FORMATS)
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
