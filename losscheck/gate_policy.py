"""The regression gate's settings, declared once: their names, defaults, what each allows and
which command-line flag overrides it; `Thresholds` (one loss's values) and `GatePolicy` (the
default and per-loss overrides).

Config validation (config.py: the `gate:` keys, their one-line errors and the key's help),
the command-line flags and the gate (gate.py) read them from here. This module imports
nothing of the package but the (torch-free) families registry, so that config.py need not
import the gate (it sits below it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import families

TIMING_MODES = ("relative", "absolute", "off")
NEW_MODES = ("custom", "all", "none")


@dataclass(frozen=True)
class Thresholds:
    """How much worse a point may get before it counts as a regression."""

    bits: float = 0.0  # allowed increase of forward/backward max_bits
    ulp: float = 0.0  # allowed increase of the mean loss's reduced_ulp
    time_factor: float = 1.25  # the smallest slowdown that counts (minimum effect size)
    timing: str = "relative"  # relative | absolute | off
    # An implementation without a baseline counterpart is judged against this one of the same
    # run; relative timing is measured against it too.
    versus: str = families.framework()  # "torch"
    new: str = "custom"  # which such implementations are gated: custom | all | none
    # Operations whose baseline and current medians are both shorter than this (seconds) are
    # not timing-gated: too short to time reliably.
    min_time: float = 5e-5
    # The false-alarm rate of the timing gate over a whole run (all its comparisons together).
    false_alarm: float = 0.01

    def __post_init__(self) -> None:
        if self.timing not in TIMING_MODES:
            raise ValueError(f"timing must be one of {TIMING_MODES}")
        if self.new not in NEW_MODES:
            raise ValueError(f"new must be one of {NEW_MODES}")


@dataclass(frozen=True)
class GatePolicy:
    default: Thresholds = field(default_factory=Thresholds)
    per_loss: dict[str, Thresholds] = field(default_factory=dict)

    def for_loss(self, loss: str) -> Thresholds:
        return self.per_loss.get(loss, self.default)

    def with_overrides(self, **overrides) -> GatePolicy:
        """Command-line values replace the configured ones, per-loss ones included."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return GatePolicy(
            replace(self.default, **given), {loss: replace(t, **given) for loss, t in self.per_loss.items()}
        )


@dataclass(frozen=True)
class Setting:
    """One threshold of the gate: a `Thresholds` field, the config key `gate.<name>` (and
    `gate.losses.<loss>.<name>`), and the flag that overrides it, if any.

    kind: "number" (finite, >= `low`), "probability" (in (`low`, `high`]), "choice" (one of
    `choices`) or "implementation" (an implementation of the run)."""

    name: str
    kind: str
    summary: str  # how the config key's help names it
    allowed: str  # what a bad value's error says is allowed
    low: float = 0.0
    high: float | None = None
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the flag of `bench --baseline` and `compare` overriding it
    flag_help: str = ""  # the flag's help, before "(default: ...)"

    @property
    def default(self):
        return getattr(Thresholds(), self.name)

    @property
    def default_text(self) -> str:
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def accepts(self, number: float | None) -> bool:
        """Whether `number` (a value already read as a number; None: not one) is allowed."""
        if number is None or number != number or number in (float("inf"), float("-inf")):
            return False
        if self.kind == "probability":
            assert self.high is not None, "a probability setting has a high end"
            return self.low < number <= self.high
        return number >= self.low


# In the order of the `gate:` key's help and of the "allowed" list of an unknown key.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bits",
        "number",
        "bits",
        "a finite number >= 0",
        flag="--bits",
        flag_help="Allowed increase of forward/gradient max bits",
    ),
    Setting(
        "ulp",
        "number",
        "ulp (allowed increases)",
        "a finite number >= 0",
        flag="--ulp",
        flag_help="Allowed increase of the mean loss's ULP error",
    ),
    Setting(
        "time_factor",
        "number",
        "time_factor (>= 1)",
        "a finite number >= 1",
        low=1.0,
        flag="--time-factor",
        flag_help="Allowed slowdown factor, beyond the noise",
    ),
    Setting(
        "timing",
        "choice",
        "timing (relative, absolute, off)",
        ", ".join(TIMING_MODES),
        choices=TIMING_MODES,
        flag="--timing",
        flag_help="Timing gate: relative to torch in the same run, absolute, or off",
    ),
    Setting(
        "versus",
        "implementation",
        "versus (an implementation of the run; default torch)",
        "an implementation of the run",
    ),
    Setting("new", "choice", "new (custom, all, none)", ", ".join(NEW_MODES), choices=NEW_MODES),
    Setting("min_time", "number", "min_time (seconds)", "seconds >= 0"),
    Setting("false_alarm", "probability", "false_alarm (in (0, 0.5])", "a probability in (0, 0.5]", low=0.0, high=0.5),
)
BY_NAME = {s.name: s for s in SETTINGS}
GATE_KEYS = tuple(s.name for s in SETTINGS)
# The order in which a `gate:` mapping's values are checked (its first error is the one
# reported): numbers, then the probability, the choices, and `versus` last.
CHECK_ORDER = tuple(
    s.name for kind in ("number", "probability", "choice", "implementation") for s in SETTINGS if s.kind == kind
)
# Above 0.5 a "regression" would be likelier a false alarm than not: hence false_alarm's (0, 0.5].


def key_help() -> str:
    """The help of the config key `gate:` (config.KEYS), from the settings."""
    names = ", ".join(s.summary for s in SETTINGS)
    return f"mapping with {names}, losses (per-loss overrides of these)"
