"""The config's sections with a structure of their own: `custom` (and `--impl`), `timing`,
`gate`, `thresholds`, `isolation`/`timeout`, checked by `SectionChecks`, which config.py's
validator extends (it supplies `fail` and `source`). Split from config.py by size; the names
are re-exported there (`config.TimingConfig`, `config.custom_spec`, ...).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

from . import families
from .catalog import loss_registry
from .errors import ConfigError
from .formats import FORMATS
from .gate_policy import BY_NAME, CHECK_ORDER, GATE_KEYS, GatePolicy, Thresholds
from .inputs import DISTRIBUTIONS

if TYPE_CHECKING:
    from .config import Config

CUSTOM_APIS = ("torch", "numpy")
ISOLATION_MODES = ("auto", "process", "none")
CUSTOM_KEYS = ("name", "function", "losses", "api")
TIMING_KEYS = ("enabled", "min_run_time", "distributions", "scales")


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


class SectionChecks:
    """The section checks of config.py's validator; `fail` raises its one-line ConfigError."""

    source: str

    def fail(self, key, problem, allowed=None) -> NoReturn:
        raise NotImplementedError  # config._Validator's

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
    if name in families.names():
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
