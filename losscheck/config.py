"""YAML config -> a frozen, validated `Config`. Everything is checked here, once.

Every problem raises `ConfigError` naming the file, the key, the bad value and what is
allowed; after this module the core trusts its inputs.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from .dtypes import FORMATS
from .errors import ConfigError
from .gate import TIMING_MODES, GatePolicy, Thresholds
from .inputs import DISTRIBUTIONS
from .losses import LOSSES, OPTION_DEFAULTS
from .losses.base import REDUCTIONS

BUILTIN_IMPLS = ("naive", "stable", "torch")
CUSTOM_APIS = ("torch", "numpy")
# Option of a loss (`Loss.options`) -> the config key sweeping it.
OPTION_AXES = {"weight": "weights", "pos_weight": "pos_weights", "label_smoothing": "label_smoothing",
               "ignored": "ignored", "targets": "targets"}
WEIGHT_KINDS = ("none", "random")
TARGET_KINDS = ("hard", "soft")
DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class TimingConfig:
    enabled: bool = True
    # Seconds of measurement per timed callable (forward, and forward+backward).
    min_run_time: float = 0.02
    # Timing hardly depends on the values, so by default only these points are timed;
    # an empty tuple means "all".
    distributions: tuple[str, ...] = ("normal",)
    scales: tuple[float, ...] = ()

    def applies(self, distribution: str, scale: float) -> bool:
        return (
            self.enabled
            and (not self.distributions or distribution in self.distributions)
            and (not self.scales or scale in self.scales)
        )


@dataclass(frozen=True)
class CustomSpec:
    """A user's implementation, named by a config (`custom:`) or `--impl`; imported only when run."""

    name: str
    function: str  # "package.module:function" or "path/to/file.py:function"
    losses: tuple[str, ...] = ()  # empty: every loss of the config
    api: str = "torch"  # "torch" or "numpy"

    def applies(self, loss: str) -> bool:
        return not self.losses or loss in self.losses


@dataclass(frozen=True)
class Config:
    name: str
    losses: tuple[str, ...]
    implementations: tuple[str, ...]
    scales: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    classes: tuple[int, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    distributions: tuple[str, ...]
    seed: int = 0
    description: str = ""
    timing: TimingConfig = field(default_factory=TimingConfig)
    # Breakdown threshold per dtype, in bits lost (METRICS.md: default half the significand).
    thresholds: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    gate: GatePolicy = field(default_factory=GatePolicy)
    # Option axes (each loss sweeps those it supports, see `option_sets`).
    reductions: tuple[str, ...] = ("mean",)
    weights: tuple[str, ...] = ("none",)
    pos_weights: tuple[float, ...] = (1.0,)
    label_smoothing: tuple[float, ...] = (0.0,)
    ignored: tuple[float, ...] = (0.0,)
    targets: tuple[str, ...] = ("hard",)
    sequence_lengths: tuple[int, ...] = (64,)
    custom: tuple[CustomSpec, ...] = ()
    # Seconds one implementation may take to be evaluated at one point (not its timing); None: no limit.
    timeout: float | None = 300.0
    source: str = "<config>"

    def threshold_bits(self, dtype: str) -> float:
        return self.thresholds.get(dtype, FORMATS[dtype].default_threshold_bits)

    def impls_for(self, loss: str) -> tuple[str, ...]:
        """The implementations run for `loss`: the built-in ones, then the custom ones for it."""
        return self.implementations + tuple(c.name for c in self.custom if c.applies(loss))

    def option_sets(self, loss: str) -> list[dict]:
        """The option combinations swept for `loss`: the product of the axes of the options
        it supports, each as a dict of the values that differ from the default (soft
        targets with ignored ones are left out: torch ignores only class indices)."""
        names = [o for o in LOSSES[loss].options if o in OPTION_AXES]
        out = []
        for values in itertools.product(*(getattr(self, OPTION_AXES[o]) for o in names)):
            opts = {o: v for o, v in zip(names, values) if v != OPTION_DEFAULTS[o]}
            if opts.get("targets") == "soft" and opts.get("ignored"):
                continue
            out.append(opts)
        return out

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


KEYS = {
    "name": "a name for the run (used for the output file names)",
    "description": "free text shown in the report",
    "losses": "list of losses",
    "implementations": "list of implementations",
    "scales": "list of positive logit magnitudes",
    "batch_sizes": "list of positive integers",
    "classes": "list of integers >= 2 (multi-class losses only)",
    "dtypes": "list of dtypes",
    "devices": "list of devices",
    "distributions": "list of input distributions",
    "seed": "non-negative integer",
    "timing": "mapping with enabled, min_run_time, distributions, scales",
    "thresholds": "mapping dtype -> bits lost at which a point counts as broken",
    "threads": "positive integer: CPU threads for the implementations and timing",
    "gate": "mapping with bits, ulp, time_factor, timing, losses (per-loss overrides)",
    "reductions": "list of none, mean, sum",
    "weights": "list of none, random (per-element weights for binary losses, per-class for cross entropy)",
    "pos_weights": "list of positive numbers (binary losses; 1 means unset)",
    "label_smoothing": "list of numbers in [0, 1] (cross entropy)",
    "ignored": "list of fractions in [0, 1]: share of targets set to ignore_index (cross_entropy)",
    "targets": "list of hard, soft (cross_entropy: class indices or class probabilities)",
    "sequence_lengths": "list of positive integers (sequence_cross_entropy: tokens per sequence)",
    "custom": "list of mappings {name, function: 'module:function' or 'file.py:function', losses, api: torch|numpy}",
    "timeout": "seconds one implementation may take at one point, or null for no limit",
}
CUSTOM_KEYS = ("name", "function", "losses", "api")
GATE_KEYS = ("bits", "ulp", "time_factor", "timing")
TIMING_KEYS = ("enabled", "min_run_time", "distributions", "scales")
DEFAULTS = {"classes": (10,), "devices": ("cpu",), "seed": 0, "implementations": BUILTIN_IMPLS}


def default_config_text() -> str:
    return resources.files("losscheck").joinpath("configs/default.yaml").read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a YAML config; `None` means the embedded default."""
    if path is None:
        return parse_config(default_config_text(), "<embedded default.yaml>")
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    # Any OSError, not just these: e.g. NotADirectoryError ("file.yaml/x") escaped as a traceback.
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "", f"cannot read: {e.__class__.__name__}") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(source, "", f"invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of keys at top level, got {_typename(data)}",
                          ", ".join(KEYS))
    return _build(data, source)


def _build(data: dict, source: str) -> Config:
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(source, str(unknown[0]), "unknown key", ", ".join(KEYS))
    for required in ("name", "losses", "scales", "batch_sizes", "dtypes", "distributions"):
        if required not in data:
            raise ConfigError(source, required, "missing", KEYS[required])
    v = _Validator(source)
    name = v.string(data, "name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(source, "name", f"{name!r} is not usable as a file name",
                          "letters, digits, '_', '.', '-'")
    cfg = Config(
        name=name,
        description=v.string(data, "description", ""),
        losses=v.choices(data, "losses", tuple(LOSSES)),
        implementations=v.choices(data, "implementations", BUILTIN_IMPLS, DEFAULTS["implementations"]),
        scales=v.numbers(data, "scales", positive=True),
        batch_sizes=v.ints(data, "batch_sizes", minimum=1),
        classes=v.ints(data, "classes", minimum=2, default=DEFAULTS["classes"]),
        dtypes=v.choices(data, "dtypes", tuple(FORMATS)),
        devices=v.devices(data),
        distributions=v.choices(data, "distributions", DISTRIBUTIONS),
        # minimum 0: numpy's seeding rejects negative seeds, which used to crash the sweep
        # with a traceback in inputs.rng_for instead of failing here (found by tests/test_config.py).
        seed=v.integer(data, "seed", DEFAULTS["seed"], minimum=0),
        timing=v.timing(data),
        thresholds=v.thresholds(data),
        threads=v.integer(data, "threads", None, minimum=1),
        gate=v.gate(data),
        reductions=v.choices(data, "reductions", REDUCTIONS, ("mean",)),
        weights=v.choices(data, "weights", WEIGHT_KINDS, ("none",)),
        pos_weights=v.numbers(data, "pos_weights", positive=True, default=(1.0,)),
        label_smoothing=v.numbers(data, "label_smoothing", default=(0.0,), maximum=1.0),
        ignored=v.numbers(data, "ignored", default=(0.0,), maximum=1.0),
        targets=v.choices(data, "targets", TARGET_KINDS, ("hard",)),
        sequence_lengths=v.ints(data, "sequence_lengths", minimum=1, default=(64,)),
        custom=v.custom(data),
        timeout=v.timeout(data),
        source=source,
    )
    return cfg


def _typename(x) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(x), type(x).__name__)


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key, problem, allowed=None):
        # Fall back to the key's description so that every message says what is allowed
        # (the module's contract); `string`/`integer` failures used to omit it.
        raise ConfigError(self.source, key, problem, allowed or KEYS.get(key))

    def _list(self, data, key, default=None):
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, list) or not value:
            self.fail(key, f"expected a non-empty list, got {_typename(value)} {value!r}", KEYS[key])
        return value

    def string(self, data, key, default=None):
        value = data.get(key, default)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_typename(value)} {value!r}")
        return value

    def integer(self, data, key, default, minimum=None):
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_typename(value)} {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"{value} is below the minimum {minimum}")
        return value

    def choices(self, data, key, allowed, default=None):
        values = self._list(data, key, default)
        for value in values:
            if value not in allowed:
                self.fail(key, f"unknown value {value!r}", ", ".join(allowed))
        if len(set(values)) != len(values):
            self.fail(key, f"duplicate values in {values!r}", "each value at most once")
        return tuple(values)

    def numbers(self, data, key, positive=False, default=None, maximum=None):
        if key not in data and default is not None:
            return default
        out = []
        if positive:
            allowed = "positive finite numbers (e.g. 10, 1e4)"
        else:
            allowed = f"numbers in [0, {maximum:g}]" if maximum is not None else "finite numbers >= 0"
        for value in self._list(data, key):
            number = _as_number(value)
            if (number is None or not math.isfinite(number) or (positive and number <= 0)
                    or number < 0 or (maximum is not None and number > maximum)):
                self.fail(key, f"bad value {value!r}", allowed)
            out.append(number)
        if len(set(out)) != len(out):
            self.fail(key, f"duplicate values in {data[key]!r}", "each value at most once")
        return tuple(sorted(out))

    def ints(self, data, key, minimum, default=None):
        values = self._list(data, key, default)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                self.fail(key, f"bad value {value!r}", f"integers >= {minimum}")
        if len(set(values)) != len(values):
            self.fail(key, f"duplicate values in {values!r}", "each value at most once")
        return tuple(values)

    def devices(self, data):
        values = self._list(data, "devices", DEFAULTS["devices"])
        for value in values:
            if not isinstance(value, str) or not DEVICE_RE.match(value):
                self.fail("devices", f"unknown device {value!r}", "cpu, cuda, cuda:N, mps")
        # Duplicates were accepted here (unlike every other list) and ran each point twice.
        if len(set(values)) != len(values):
            self.fail("devices", f"duplicate values in {values!r}", "each value at most once")
        return tuple(values)

    def custom(self, data):
        entries = data.get("custom", [])
        if entries is None:
            return ()
        if not isinstance(entries, list):
            self.fail("custom", f"expected a list of mappings, got {_typename(entries)}")
        out = []
        for i, e in enumerate(entries):
            where = f"custom[{i}]"
            if isinstance(e, str):
                e = {"function": e}
            if not isinstance(e, dict):
                self.fail(where, f"expected a mapping or a 'module:function' string, got {_typename(e)}",
                          ", ".join(CUSTOM_KEYS))
            for k in e:
                if k not in CUSTOM_KEYS:
                    self.fail(f"{where}.{k}", "unknown key", ", ".join(CUSTOM_KEYS))
            out.append(custom_spec(e.get("function"), e.get("name"), e.get("losses", []), e.get("api", "torch"),
                                   self.source, where))
        names = [c.name for c in out]
        for n in names:
            if names.count(n) > 1:
                self.fail("custom", f"two custom implementations are named {n!r}", "distinct names")
        return tuple(out)

    def timeout(self, data):
        value = data.get("timeout", 300.0)
        if value is None:
            return None
        n = _as_number(value)
        if n is None or not math.isfinite(n) or n <= 0:
            self.fail("timeout", f"bad value {value!r}", "a positive number of seconds, or null for no limit")
        return n

    def timing(self, data):
        t = data.get("timing", {})
        if isinstance(t, bool):
            return TimingConfig(enabled=t)
        if not isinstance(t, dict):
            self.fail("timing", f"expected a mapping or true/false, got {_typename(t)}", ", ".join(TIMING_KEYS))
        for k in t:
            if k not in TIMING_KEYS:
                self.fail(f"timing.{k}", "unknown key", ", ".join(TIMING_KEYS))
        base = TimingConfig()
        enabled = t.get("enabled", base.enabled)
        if not isinstance(enabled, bool):
            self.fail("timing.enabled", f"expected true or false, got {enabled!r}", "true, false")
        mrt = _as_number(t.get("min_run_time", base.min_run_time))
        if mrt is None or not (0 < mrt <= 60):
            self.fail("timing.min_run_time", f"bad value {t.get('min_run_time')!r}", "seconds in (0, 60]")
        # A non-list here (e.g. `distributions: 5`) used to escape as a TypeError.
        dists = tuple(self._sublist(t, "distributions", base.distributions, ", ".join(DISTRIBUTIONS)))
        for d in dists:
            if d not in DISTRIBUTIONS:
                self.fail("timing.distributions", f"unknown value {d!r}", ", ".join(DISTRIBUTIONS))
        scales = []
        for s in self._sublist(t, "scales", base.scales, "positive numbers from `scales`"):
            n = _as_number(s)
            # not finite: `nan`/`inf` were accepted and then never matched a swept scale.
            if n is None or not math.isfinite(n) or n <= 0:
                self.fail("timing.scales", f"bad value {s!r}", "positive numbers from `scales`")
            scales.append(n)
        return TimingConfig(enabled=enabled, min_run_time=mrt, distributions=dists, scales=tuple(scales))

    def _sublist(self, t, key, default, allowed):
        value = t.get(key, default)
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            self.fail(f"timing.{key}", f"expected a list, got {_typename(value)} {value!r}", allowed)
        return value

    def gate(self, data):
        g = data.get("gate", {})
        if not isinstance(g, dict):
            self.fail("gate", f"expected a mapping, got {_typename(g)}", ", ".join(GATE_KEYS + ("losses",)))
        default = self._thresholds_of(g, "gate", Thresholds(), extra=("losses",))
        per_loss = {}
        losses = g.get("losses", {})
        if not isinstance(losses, dict):
            self.fail("gate.losses", f"expected a mapping loss -> thresholds, got {_typename(losses)}")
        for loss, overrides in losses.items():
            if loss not in LOSSES:
                self.fail(f"gate.losses.{loss}", "unknown loss", ", ".join(LOSSES))
            if not isinstance(overrides, dict):
                self.fail(f"gate.losses.{loss}", f"expected a mapping, got {_typename(overrides)}",
                          ", ".join(GATE_KEYS))
            per_loss[loss] = self._thresholds_of(overrides, f"gate.losses.{loss}", default)
        return GatePolicy(default, per_loss)

    def _thresholds_of(self, g: dict, where: str, base: Thresholds, extra=()) -> Thresholds:
        for k in g:
            if k not in GATE_KEYS + extra:
                self.fail(f"{where}.{k}", "unknown key", ", ".join(GATE_KEYS + extra))
        values = {}
        for k, lo in (("bits", 0.0), ("ulp", 0.0), ("time_factor", 1.0)):
            if k in g:
                n = _as_number(g[k])
                if n is None or not math.isfinite(n) or n < lo:
                    self.fail(f"{where}.{k}", f"bad value {g[k]!r}", f"a finite number >= {lo:g}")
                values[k] = n
        if "timing" in g:
            if g["timing"] not in TIMING_MODES:
                self.fail(f"{where}.timing", f"unknown value {g['timing']!r}", ", ".join(TIMING_MODES))
            values["timing"] = g["timing"]
        return replace(base, **values)

    def thresholds(self, data):
        t = data.get("thresholds", {})
        if not isinstance(t, dict):
            self.fail("thresholds", f"expected a mapping dtype -> bits, got {_typename(t)} {t!r}")
        out = {}
        for k, value in t.items():
            if k not in FORMATS:
                self.fail(f"thresholds.{k}", "unknown dtype", ", ".join(FORMATS))
            n = _as_number(value)
            if n is None or not (0 < n <= FORMATS[k].significand_bits):
                self.fail(f"thresholds.{k}", f"bad value {value!r}",
                          f"bits in (0, {FORMATS[k].significand_bits}]")
            out[k] = n
        return out


def custom_spec(function, name=None, losses=(), api="torch", source="<command line>",
                where="--impl") -> CustomSpec:
    """Validate one custom implementation's description (config entry or --impl)."""
    def fail(key, problem, allowed):
        raise ConfigError(source, f"{where}.{key}" if where.startswith("custom") else where, problem, allowed)
    spec_help = "'package.module:function' or 'path/to/file.py:function'"
    if not isinstance(function, str) or function.count(":") < 1 or not all(function.rsplit(":", 1)):
        fail("function", f"bad value {function!r}", spec_help)
    attr = function.rsplit(":", 1)[1]
    name = attr.rsplit(".", 1)[-1] if name is None else name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        fail("name", f"bad value {name!r}", "a name of letters, digits, '_', '.', '-'")
    if name in BUILTIN_IMPLS:
        fail("name", f"{name!r} is a built-in implementation's name", "another name (e.g. my_" + name + ")")
    if isinstance(losses, str):
        losses = [losses]
    if not isinstance(losses, (list, tuple)) or any(x not in LOSSES for x in losses):
        fail("losses", f"bad value {losses!r}", "a list of " + ", ".join(LOSSES))
    if api not in CUSTOM_APIS:
        fail("api", f"unknown value {api!r}", ", ".join(CUSTOM_APIS))
    return CustomSpec(name=name, function=function, losses=tuple(losses), api=api)


def _as_number(value) -> float | None:
    # PyYAML reads `1e4` (no dot) as a string; accept numeric strings for convenience.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range (e.g. 400 digits) is not a usable number
            return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
