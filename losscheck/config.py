"""YAML config -> a frozen, validated `Config`. Everything is checked here, once.

Every problem raises `ConfigError` naming the file, the key, the bad value and what is
allowed (with the closest allowed spelling when one is close); after this module the core
trusts its inputs. `Config.as_dict()` writes the input format back, so the configuration a
report shows "as run" can be run again.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import NoReturn

from . import safeio
from .catalog import BUILTIN_IMPLS, OPTION_DEFAULTS, REDUCTIONS, loss_registry
from .config_yaml import read_yaml, to_yaml  # noqa: F401  (to_yaml: config.to_yaml for its users)
from .errors import ConfigError
from .formats import FORMATS
from .gate_policy import BY_NAME, CHECK_ORDER, GATE_KEYS, GatePolicy, Thresholds, key_help
from .inputs import DISTRIBUTIONS

CUSTOM_APIS = ("torch", "numpy")
# Option of a loss (`Loss.options`) -> the config key sweeping it.
OPTION_AXES = {
    "weight": "weights",
    "pos_weight": "pos_weights",
    "label_smoothing": "label_smoothing",
    "ignored": "ignored",
    "targets": "targets",
}
WEIGHT_KINDS = ("none", "random")
TARGET_KINDS = ("hard", "soft")
ISOLATION_MODES = ("auto", "process", "none")
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
    # Where implementations run: "auto" (custom ones in a worker process, built-ins in this
    # one), "process" (all in workers) or "none" (all here); see worker.py.
    isolation: str = "auto"
    source: str = "<config>"

    @classmethod
    def from_mapping(cls, data, source: str = "<mapping>") -> Config:
        """A validated config from a Python mapping of the YAML keys (lists may be tuples), with
        the checks and one-line `ConfigError`s of a YAML file: what code builds, no YAML text."""
        return config_from_dict(data, source)

    def threshold_bits(self, dtype: str) -> float:
        return self.thresholds.get(dtype, FORMATS[dtype].default_threshold_bits)

    def impls_for(self, loss: str) -> tuple[str, ...]:
        """The implementations run for `loss`: the built-in ones, then the custom ones for it."""
        return self.implementations + tuple(c.name for c in self.custom if c.applies(loss))

    def option_sets(self, loss: str) -> list[dict]:
        """The option combinations swept for `loss`: the product of the axes of the options
        it supports, each as a dict of the values that differ from the default (soft
        targets with ignored ones are left out: torch ignores only class indices)."""
        names = [o for o in loss_registry()[loss].options if o in OPTION_AXES]
        out = []
        for values in itertools.product(*(getattr(self, OPTION_AXES[o]) for o in names)):
            opts = {o: v for o, v in zip(names, values, strict=True) if v != OPTION_DEFAULTS[o]}
            if opts.get("targets") == "soft" and opts.get("ignored"):
                continue
            out.append(opts)
        return out

    def all_impls(self) -> tuple[str, ...]:
        """Every implementation of the run: the built-in ones, then every custom one."""
        return self.implementations + tuple(c.name for c in self.custom)

    def as_dict(self) -> dict:
        """The config in the input format (plain lists and mappings, no `source`): what the
        results file stores and the report prints "as run", and what `config_from_dict` or
        `parse_config` of its YAML turn back into an equal config."""
        t = self.timing
        return {
            "name": self.name,
            "description": self.description,
            "losses": list(self.losses),
            "implementations": list(self.implementations),
            "scales": list(self.scales),
            "batch_sizes": list(self.batch_sizes),
            "classes": list(self.classes),
            "dtypes": list(self.dtypes),
            "devices": list(self.devices),
            "distributions": list(self.distributions),
            "seed": self.seed,
            "timing": {
                "enabled": t.enabled,
                "min_run_time": t.min_run_time,
                "distributions": list(t.distributions),
                "scales": list(t.scales),
            },
            "thresholds": dict(self.thresholds),
            "threads": self.threads,
            "gate": _gate_as_input(self.gate, self.all_impls()),
            "reductions": list(self.reductions),
            "weights": list(self.weights),
            "pos_weights": list(self.pos_weights),
            "label_smoothing": list(self.label_smoothing),
            "ignored": list(self.ignored),
            "targets": list(self.targets),
            "sequence_lengths": list(self.sequence_lengths),
            "custom": [
                {"name": c.name, "function": c.function, "losses": list(c.losses), "api": c.api} for c in self.custom
            ],
            "timeout": self.timeout,
            "isolation": self.isolation,
        }


def _gate_as_input(policy: GatePolicy, impls: tuple[str, ...]) -> dict:
    """`gate:` as written in a config: every threshold at top level, and under `losses` only
    what each loss overrides (an override equal to the default is kept as an empty mapping)."""
    gate = asdict(policy.default)
    # The default `versus` (torch) is not checked against the run, an explicit one is: when
    # torch is not run, writing the default out would make the as-run config invalid input.
    if gate["versus"] not in impls:
        del gate["versus"]
    defaults = asdict(policy.default)
    gate["losses"] = {
        loss: {k: v for k, v in asdict(t).items() if v != defaults[k]} for loss, t in policy.per_loss.items()
    }
    return gate


def as_input(stored: dict) -> dict:
    """A results file's `config`, whichever schema wrote it, in the input format.

    Schema 1 and 2 files hold the former `as_dict` (every dataclass field, the gate as
    `{default: {...}, per_loss: {loss: {...}}}`, per-loss thresholds in full); schema 3 files
    hold the input format already. Anything else is returned as it is, for the validator (or
    the report, which prints it) to deal with.
    """
    out = {k: v for k, v in stored.items() if k != "source"}
    gate = out.get("gate")
    if isinstance(gate, dict) and ("default" in gate or "per_loss" in gate):
        stored_default, stored_per_loss = gate.get("default"), gate.get("per_loss")
        default: dict = stored_default if isinstance(stored_default, dict) else {}
        per_loss: dict = stored_per_loss if isinstance(stored_per_loss, dict) else {}
        out["gate"] = {
            **default,
            "losses": {
                loss: {k: v for k, v in t.items() if k not in default or default[k] != v} if isinstance(t, dict) else t
                for loss, t in per_loss.items()
            },
        }
    return out


def gate_policy(data: dict, source: str = "<results>") -> GatePolicy:
    """The gate policy of an input-format mapping (see `as_input`), validated as a config's
    `gate:` is. `versus` is not checked against the implementations here: a stored config
    was checked when it was run."""
    return _Validator(source).gate(data, None)


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
    "gate": key_help(),
    "reductions": "list of none, mean, sum",
    "weights": "list of none, random (per-element weights for binary losses, per-class for cross entropy)",
    "pos_weights": "list of positive numbers (binary losses; 1 means unset)",
    "label_smoothing": "list of numbers in [0, 1] (cross entropy)",
    "ignored": "list of fractions in [0, 1]: share of targets set to ignore_index (cross_entropy)",
    "targets": "list of hard, soft (cross_entropy: class indices or class probabilities)",
    "sequence_lengths": "list of positive integers (sequence_cross_entropy: tokens per sequence)",
    "custom": "list of mappings {name, function: 'module:function' or 'file.py:function', losses, api: torch|numpy}",
    "timeout": "seconds one implementation may take at one point, or null for no limit",
    "isolation": "auto (custom implementations in a worker process), process (all), none (all in this process)",
}
CUSTOM_KEYS = ("name", "function", "losses", "api")
TIMING_KEYS = ("enabled", "min_run_time", "distributions", "scales")
DEFAULTS = {"classes": (10,), "devices": ("cpu",), "seed": 0, "implementations": BUILTIN_IMPLS}


def default_config_text() -> str:
    return resources.files("losscheck").joinpath("configs/default.yaml").read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a YAML config; `None` means the embedded default."""
    if path is None:
        return parse_config(default_config_text(), "<embedded default.yaml>")
    try:
        text = safeio.read_bounded(path, safeio.CONFIG_LIMIT, "config").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except safeio.UnsafeInput as e:  # /dev/zero, a FIFO, a directory, 2 GB of YAML
        raise ConfigError(str(path), "", str(e)) from None
    # Any OSError, not just these: e.g. NotADirectoryError ("file.yaml/x") escaped as a traceback.
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "", f"cannot read: {e.__class__.__name__}") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate a config given as YAML text; `source` names it in error messages."""
    return config_from_dict(read_yaml(text, source), source)


def config_from_dict(data, source: str = "<config>") -> Config:
    """Validate a config given as an already-parsed mapping (what `parse_config` makes of the
    YAML, or `Config.as_dict()`): code holding a dict need not write YAML. Lists may be tuples."""
    if not isinstance(data, dict):
        raise ConfigError(
            source, "", f"expected a mapping of keys at top level, got {_typename(data)}", ", ".join(KEYS)
        )
    return _build(data, source)


def _build(data: dict, source: str) -> Config:
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(source, str(unknown[0]), "unknown key" + _suggest(unknown[0], KEYS), ", ".join(KEYS))
    for required in ("name", "losses", "scales", "batch_sizes", "dtypes", "distributions"):
        if required not in data:
            raise ConfigError(source, required, "missing", KEYS[required])
    v = _Validator(source)
    name = v.string(data, "name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(source, "name", f"{name!r} is not usable as a file name", "letters, digits, '_', '.', '-'")
    cfg = Config(
        name=name,
        description=v.string(data, "description", ""),
        losses=v.choices(data, "losses", tuple(loss_registry())),
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
        reductions=v.choices(data, "reductions", REDUCTIONS, ("mean",)),
        weights=v.choices(data, "weights", WEIGHT_KINDS, ("none",)),
        pos_weights=v.numbers(data, "pos_weights", positive=True, default=(1.0,)),
        label_smoothing=v.numbers(data, "label_smoothing", default=(0.0,), maximum=1.0),
        ignored=v.numbers(data, "ignored", default=(0.0,), maximum=1.0),
        targets=v.choices(data, "targets", TARGET_KINDS, ("hard",)),
        sequence_lengths=v.ints(data, "sequence_lengths", minimum=1, default=(64,)),
        custom=v.custom(data),
        timeout=v.timeout(data),
        isolation=v.isolation(data),
        source=source,
    )
    # The gate last: `versus` must name one of the run's implementations, custom ones included.
    return replace(cfg, gate=v.gate(data, cfg))


def _suggest(value, allowed) -> str:
    """' (did you mean 'x'?)' naming the allowed value closest to `value`, as Click does for
    options (difflib, its default cutoff); equally close ones are all named ('float61' is as
    close to float64 as to float16); '' when none is close."""
    if not isinstance(value, str):
        return ""
    names = [str(a) for a in allowed]
    scores = {n: difflib.SequenceMatcher(None, value, n).ratio() for n in difflib.get_close_matches(value, names)}
    if not scores:
        return ""
    best = [n for n in names if scores.get(n) == max(scores.values())]
    return " (did you mean " + " or ".join(repr(n) for n in best) + "?)"


def _typename(x) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(x), type(x).__name__)


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key, problem, allowed=None) -> NoReturn:
        # Fall back to the key's description so that every message says what is allowed
        # (the module's contract); `string`/`integer` failures used to omit it.
        raise ConfigError(self.source, key, problem, allowed or KEYS.get(key))

    def _list(self, data, key, default=None):
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, (list, tuple)) or not value:
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
                self.fail(key, f"unknown value {value!r}{_suggest(value, allowed)}", ", ".join(allowed))
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
            if (
                number is None
                or not math.isfinite(number)
                or (positive and number <= 0)
                or number < 0
                or (maximum is not None and number > maximum)
            ):
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
        if not isinstance(entries, (list, tuple)):
            self.fail("custom", f"expected a list of mappings, got {_typename(entries)}")
        out = []
        for i, e in enumerate(entries):
            where = f"custom[{i}]"
            if isinstance(e, str):
                e = {"function": e}
            if not isinstance(e, dict):
                self.fail(
                    where,
                    f"expected a mapping or a 'module:function' string, got {_typename(e)}",
                    ", ".join(CUSTOM_KEYS),
                )
            for k in e:
                if k not in CUSTOM_KEYS:
                    self.fail(f"{where}.{k}", "unknown key" + _suggest(k, CUSTOM_KEYS), ", ".join(CUSTOM_KEYS))
            out.append(
                custom_spec(
                    e.get("function"), e.get("name"), e.get("losses", []), e.get("api", "torch"), self.source, where
                )
            )
        names = [c.name for c in out]
        for n in names:
            if names.count(n) > 1:
                self.fail("custom", f"two custom implementations are named {n!r}", "distinct names")
        return tuple(out)

    def isolation(self, data):
        value = data.get("isolation", "auto")
        if value not in ISOLATION_MODES:
            self.fail(
                "isolation",
                f"unknown value {value!r}{_suggest(str(value), ISOLATION_MODES)}",
                ", ".join(ISOLATION_MODES),
            )
        return value

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
                self.fail(f"timing.{k}", "unknown key" + _suggest(k, TIMING_KEYS), ", ".join(TIMING_KEYS))
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
                self.fail(
                    "timing.distributions", f"unknown value {d!r}{_suggest(d, DISTRIBUTIONS)}", ", ".join(DISTRIBUTIONS)
                )
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

    def gate(self, data, cfg: Config | None):
        """`gate:` -> GatePolicy. `versus` is checked against `cfg`'s implementations (None:
        not checked). Only the config's own implementations (built-in and `custom`) are known
        here: `--impl` adds custom ones after parsing (cli `_with_flags`), so a `versus` naming
        one of those is refused here, and `versus` has to be checked again once the flags are
        applied (the default, torch, is never checked: a run without torch keeps it)."""
        g = data.get("gate", {})
        if not isinstance(g, dict):
            self.fail("gate", f"expected a mapping, got {_typename(g)}", ", ".join(GATE_KEYS + ("losses",)))
        default = self._thresholds_of(g, "gate", Thresholds(), cfg.all_impls() if cfg else None, extra=("losses",))
        per_loss = {}
        losses = g.get("losses", {})
        if not isinstance(losses, dict):
            self.fail("gate.losses", f"expected a mapping loss -> thresholds, got {_typename(losses)}")
        known = loss_registry()
        for loss, overrides in losses.items():
            if loss not in known:
                self.fail(f"gate.losses.{loss}", "unknown loss" + _suggest(loss, known), ", ".join(known))
            if not isinstance(overrides, dict):
                self.fail(
                    f"gate.losses.{loss}", f"expected a mapping, got {_typename(overrides)}", ", ".join(GATE_KEYS)
                )
            # A loss's own `versus` must be run for that loss (a custom one may apply to others only).
            per_loss[loss] = self._thresholds_of(
                overrides, f"gate.losses.{loss}", default, cfg.impls_for(loss) if cfg else None
            )
        return GatePolicy(default, per_loss)

    def _thresholds_of(self, g: dict, where: str, base: Thresholds, impls, extra=()) -> Thresholds:
        for k in g:
            if k not in GATE_KEYS + extra:
                self.fail(f"{where}.{k}", "unknown key" + _suggest(k, GATE_KEYS + extra), ", ".join(GATE_KEYS + extra))
        values = {}
        for k in CHECK_ORDER:
            setting = BY_NAME[k]
            if k not in g or setting.kind == "implementation":
                continue
            if setting.kind == "choice":
                if g[k] not in setting.choices:
                    self.fail(
                        f"{where}.{k}", f"unknown value {g[k]!r}{_suggest(g[k], setting.choices)}", setting.allowed
                    )
                values[k] = g[k]
                continue
            n = _as_number(g[k])
            if not setting.accepts(n):
                self.fail(f"{where}.{k}", f"bad value {g[k]!r}", setting.allowed)
            values[k] = n
        if "versus" in g:
            versus = g["versus"]
            if not isinstance(versus, str) or (impls is not None and versus not in impls):
                allowed = ", ".join(impls) if impls is not None else BY_NAME["versus"].allowed
                self.fail(
                    f"{where}.versus",
                    f"{versus!r} is not an implementation of the run"
                    + (_suggest(versus, impls) if impls is not None else ""),
                    allowed,
                )
            values["versus"] = versus
        return replace(base, **values)

    def thresholds(self, data):
        t = data.get("thresholds", {})
        if not isinstance(t, dict):
            self.fail("thresholds", f"expected a mapping dtype -> bits, got {_typename(t)} {t!r}")
        out = {}
        for k, value in t.items():
            if k not in FORMATS:
                self.fail(f"thresholds.{k}", "unknown dtype" + _suggest(k, FORMATS), ", ".join(FORMATS))
            n = _as_number(value)
            if n is None or not (0 < n <= FORMATS[k].significand_bits):
                self.fail(f"thresholds.{k}", f"bad value {value!r}", f"bits in (0, {FORMATS[k].significand_bits}]")
            out[k] = n
        return out


def custom_spec(function, name=None, losses=(), api="torch", source="<command line>", where="--impl") -> CustomSpec:
    """Validate one custom implementation's description (config entry or --impl)."""

    def fail(key, problem, allowed) -> NoReturn:
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
    known = loss_registry()
    if not isinstance(losses, (list, tuple)) or any(not isinstance(x, str) for x in losses):
        fail("losses", f"bad value {losses!r}", "a list of " + ", ".join(known))
    for x in losses:
        if x not in known:
            fail("losses", f"unknown value {x!r}{_suggest(x, known)}", "a list of " + ", ".join(known))
    if api not in CUSTOM_APIS:
        fail("api", f"unknown value {api!r}{_suggest(api, CUSTOM_APIS)}", ", ".join(CUSTOM_APIS))
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
