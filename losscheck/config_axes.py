"""The checks of a config's list keys (the sweep's axes: numbers, integers, names, booleans,
devices, dimensions, pos_weight vectors), and the option values they produce.

`ListChecks` is a mixin of config._Validator: it needs `fail(key, problem, allowed)` and a
`keys` mapping (key -> what is allowed) from it. Every list must be non-empty and hold each
value at most once (a repeated value would run its points twice).
"""

from __future__ import annotations

import math
import re

from .config_sections import SectionChecks, _as_number, _suggest, _typename

DIMS = (-1, 0)  # log_softmax's dimension: see losses/log_softmax.py
DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def pos_weight_vector(value: str) -> list[float]:
    """A per-label pos_weight's option value "(0.5, 2, -1)" as the list of its numbers."""
    return [float(v) for v in value.strip("()").split(",")]


def vector_value(values) -> str:
    """The option value of a per-label pos_weight: a string, as records need hashable values that
    survive JSON (a list would not), each number written so that it reads back exactly."""
    return "(" + ", ".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in values) + ")"


def spatial_dims(value: str) -> list[int]:
    """An option value of `spatial` ("none", "4x4") as the list of dimensions it names."""
    return [] if value == "none" else [int(d) for d in value.split("x")]


class ListChecks(SectionChecks):
    keys: dict[str, str] = {}

    def _list(self, data, key, default=None):
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, (list, tuple)) or not value:
            self.fail(key, f"expected a non-empty list, got {_typename(value)} {value!r}", self.keys[key])
        return value

    def _unique(self, key, values, shown=None) -> tuple:
        if len(set(values)) != len(values):
            self.fail(key, f"duplicate values in {values if shown is None else shown!r}", "each value at most once")
        return tuple(values)

    def booleans(self, data, key, default):
        values = self._list(data, key, default)
        for value in values:
            if not isinstance(value, bool):  # 1 == True: an int is no answer to a yes/no key
                self.fail(key, f"bad value {value!r}", "false, true")
        return self._unique(key, values)

    def choices(self, data, key, allowed, default=None):
        values = self._list(data, key, default)
        for value in values:
            if value not in allowed:
                self.fail(key, f"unknown value {value!r}{_suggest(value, allowed)}", ", ".join(allowed))
        return self._unique(key, values)

    def numbers(self, data, key, positive=False, default=None, maximum=None, signed=False):
        if key not in data and default is not None:
            return default
        out = []
        if positive:
            allowed = "positive finite numbers (e.g. 10, 1e4)"
        elif signed:
            allowed = "finite numbers (zero and negative ones too)"
        else:
            allowed = f"numbers in [0, {maximum:g}]" if maximum is not None else "finite numbers >= 0"
        for value in self._list(data, key):
            number = _as_number(value)
            if (
                number is None
                or not math.isfinite(number)
                or (positive and number <= 0)
                or (number < 0 and not signed)
                or (maximum is not None and number > maximum)
            ):
                self.fail(key, f"bad value {value!r}", allowed)
            out.append(number)
        return tuple(sorted(self._unique(key, out, data[key])))

    def pos_weights(self, data):
        """Numbers (as `numbers`), and per-label vectors of at least two finite numbers."""
        if not any(isinstance(p, (list, tuple)) for p in self._list(data, "pos_weights", ())):
            return self.numbers(data, "pos_weights", signed=True, default=(1.0,))
        vectors, numbers = [], []
        for value in data["pos_weights"]:
            if not isinstance(value, (list, tuple)):
                numbers.append(value)
                continue
            parsed = [_as_number(x) for x in value]
            if len(parsed) < 2 or any(x is None or not math.isfinite(x) for x in parsed):
                self.fail("pos_weights", f"bad vector {value!r}", "a list of two or more finite numbers")
            vectors.append(vector_value(parsed))
        self._unique("pos_weights", vectors, data["pos_weights"])
        scalars = self.numbers({"pos_weights": numbers}, "pos_weights", signed=True) if numbers else ()
        return (*scalars, *vectors)

    def ints(self, data, key, minimum, default=None):
        values = self._list(data, key, default)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                self.fail(key, f"bad value {value!r}", f"integers >= {minimum}")
        return self._unique(key, values)

    def dims(self, data):
        values = self._list(data, "dims", (-1,))
        for value in values:
            if type(value) is not int or value not in DIMS:
                self.fail("dims", f"bad value {value!r}", ", ".join(map(str, DIMS)))
        return self._unique("dims", values)

    def devices(self, data, default):
        values = self._list(data, "devices", default)
        for value in values:
            if not isinstance(value, str) or not DEVICE_RE.match(value):
                self.fail("devices", f"unknown device {value!r}", "cpu, cuda, cuda:N, mps")
        # Duplicates were accepted here (unlike every other list) and ran each point twice.
        return self._unique("devices", values)
