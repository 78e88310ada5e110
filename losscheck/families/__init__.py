"""Implementation families: where the implementations a sweep measures come from.

A family is one way of computing every loss: `naive` (the textbook formula), `stable`
(the careful one), `torch` (torch.nn.functional), `torch_compile` (the same under
torch.compile)... Config validation (`implementations:`), the order of every table and
plot, the gate's comparison implementation, `losscheck list` and the sweep all read the
families from here. This package is torch-free: a family imports its heavy dependencies
inside `provide`, so that `losscheck --help` and `list` stay fast.

How to declare a family: write one module in this package, e.g. `losscheck/families/mine.py`,
that defines `FAMILY = Family(...)` (it is found by listing the package: nothing else to
edit), plus its test. The fields:

* `name`: what configs write in `implementations:` and records carry as `impl`;
* `kind`: "naive", "stable" or "framework" (how reports and findings treat it);
* `order`: its place in every table and plot (lowest first; the built-ins use 10, 20, ...);
* `provide(loss)`: the family's implementation of a `losses.Loss`, a callable following the
  contract of losses/base.py (``fn(input, target, reduction, **options)``), or None when the
  family has none for that loss (its points are then `skipped` saying so). Called once per
  loss and run; import heavy modules here, not at the module's top;
* `summary` (and optionally `describe(loss)`, the per-loss text of reports);
* `requires`, `install`: the importable top-level modules it needs and the command that
  installs them; while one is missing the family is listed as unavailable and its points
  are `skipped` with that command (checked with `importlib.util.find_spec`: nothing imported);
* `check()`: any further cheap availability test (a reason, or None);
* `dtypes`, `devices` (device types: "cpu", "cuda", "mps"), `options` (sweep options, keys of
  catalog.OPTION_DEFAULTS): what it supports, None for everything; other points are `skipped`;
* `default`: whether a config without `implementations:` runs it.

A provided callable may raise `Unsupported(reason)` at a point it cannot run (its record is
`skipped` with that reason), and may have two optional methods the sweep calls:
`prepare(x, target, reduction, options)` once before the point is timed, untimed (to compile),
and `take_record()` after the point, returning fields merged into its record (None: nothing),
with "skip": reason to mark the point `skipped` (e.g. torch.compile fell back to eager).

A test may add a family for its own duration with `registered(family)`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

KINDS = ("naive", "stable", "framework")


class Unsupported(Exception):
    """Raised by a family's implementation at a point it cannot run: the point is skipped."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    summary: str
    provide: Callable[[Any], Callable | None]
    order: int = 100
    describe: Callable[[Any], str] | None = None
    requires: tuple[str, ...] = ()
    install: str = ""
    check: Callable[[], str | None] | None = None
    dtypes: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None
    options: tuple[str, ...] | None = None
    default: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")

    def unavailable(self) -> str | None:
        """Why the family cannot run here (missing dependency, with its install command), or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{self.name} needs {', '.join(missing)}, not installed (install: {self.install})"
        return self.check() if self.check else None

    def unsupported(self, dtype: str, device: str, options: dict | None = None) -> str | None:
        """Why the family does not run a point of this dtype, device and sweep options, or None."""
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"{self.name} does not support {dtype} (supports {', '.join(self.dtypes)})"
        if self.devices is not None and device.split(":")[0] not in self.devices:
            return f"{self.name} does not run on {device} (runs on {', '.join(self.devices)})"
        if self.options is not None:
            extra = sorted(k for k in (options or {}) if k not in self.options)
            if extra:
                return f"{self.name} does not support the option(s) {', '.join(extra)}"
        return None

    def text(self, loss) -> str:
        return self.describe(loss) if self.describe else self.summary


_FAMILIES: dict[str, Family] = {}


def _discover() -> None:
    # Every module of this package that defines FAMILY is a family: adding one is one file.
    for info in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            _FAMILIES[family.name] = family


def all_families() -> list[Family]:
    """The registered families in report order."""
    if not _FAMILIES:
        _discover()
    return sorted(_FAMILIES.values(), key=lambda f: (f.order, f.name))


def get(name: str) -> Family | None:
    return next((f for f in all_families() if f.name == name), None)


def names() -> tuple[str, ...]:
    """Every family's name in report order: the built-in implementation names a config may use."""
    return tuple(f.name for f in all_families())


def defaults() -> tuple[str, ...]:
    """The families a config without `implementations:` runs."""
    return tuple(f.name for f in all_families() if f.default)


def framework() -> str:
    """The comparison implementation by default (gate `versus`, speed ratios): the first
    default family of kind framework."""
    return next(f.name for f in all_families() if f.kind == "framework" and f.default)


def order_key(impl: str) -> tuple:
    """Sort key putting families in report order, other (custom) names after them by name."""
    order = names()
    return (order.index(impl) if impl in order else len(order), impl)


@contextlib.contextmanager
def registered(family: Family) -> Iterator[Family]:
    """Add `family` for the duration of the block (tests)."""
    all_families()
    if family.name in _FAMILIES:
        raise ValueError(f"a family is already named {family.name!r}")
    _FAMILIES[family.name] = family
    try:
        yield family
    finally:
        _FAMILIES.pop(family.name, None)
