"""The regression gate's checks, as objects: each has a name (the gate of its verdicts), the
thresholds it reads (gate_policy.SETTINGS names), a comparison and a description, from which
the comparison's "Thresholds" section is written (compare_report.py): a threshold is declared
once, in gate_policy.py, and said in words once, here.

A point's checks (`STATUS`, `VALUE_CHECKS`) compare one point with its counterpart: `compare(base,
cur, thresholds, key, versus)` -> a Verdict or None. Timing is not judged point by point: its
false-alarm rate holds over all the run's timing comparisons together (gate.py, `_judge_timing`);
`TIMING` declares what it reads and says how it judges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from . import analysis as A, stats
from .gate_policy import Thresholds


@dataclass(frozen=True)
class Verdict:
    key: tuple
    gate: str  # status | overflow | accuracy | timing
    outcome: str  # regression | improvement | not judged
    baseline: str
    current: str
    why: str
    # How bad, to pick the worst change of an implementation: bits or log2 of a time ratio
    # (inf for a new error or non-finite value).
    size: float = 0.0
    against: str = "baseline"  # "baseline", or the versus implementation of the same run


# ---- the checks of a point ---------------------------------------------------------------------
# Each check is an object: its name (the verdict's gate), the thresholds (gate_policy.SETTINGS)
# it reads, `compare(base, cur, t, key, versus)` -> a Verdict or None, and `describe(t)`, the
# words of the comparison's "Thresholds" section. Descriptions with the same `condition` in a
# row are said once ("forward or gradient max bits up by more than 1").


@dataclass(frozen=True)
class StatusCheck:
    """An implementation that errors where the other side ran (or the reverse, an improvement)."""

    name: str = "status"
    reads: tuple[str, ...] = ()

    def compare(self, b: dict, c: dict, t: Thresholds, k: tuple, versus: str | None = None) -> Verdict | None:
        if b["status"] == "ok" and c["status"] == "error":
            return Verdict(k, "status", "regression", "ok", "error", c["message"], math.inf)
        if b["status"] == "error" and c["status"] == "ok":
            return Verdict(k, "status", "improvement", "error", "ok", b["message"])
        return None

    def describe(self, t: Thresholds) -> tuple[str, str]:
        return "an implementation that now errors", ""


@dataclass(frozen=True)
class CountCheck:
    """More results of a kind than the other side (a count per point: any increase fails)."""

    name: str
    count: Callable[[dict], int | None]  # None: the file does not count them
    more: str  # the regression's why, after the number
    fewer: str | None  # the improvement's why, after the number (None: not reported)
    size: float  # how bad a regression is, to pick an implementation's worst change
    subject: str  # describe()
    reads: tuple[str, ...] = ()

    def compare(self, b: dict, c: dict, t: Thresholds, k: tuple, versus: str | None = None) -> Verdict | None:
        nb, nc = self.count(b), self.count(c)
        if nb is None or nc is None:
            return None
        if nc > nb:
            return Verdict(
                k,
                self.name,
                "regression",
                str(nb),
                str(nc),
                f"{nc - nb} {self.more.format(other=versus or 'baseline')}",
                self.size,
            )
        if nc < nb and self.fewer:
            return Verdict(k, self.name, "improvement", str(nb), str(nc), f"{nb - nc} {self.fewer}")
        return None

    def describe(self, t: Thresholds) -> tuple[str, str]:
        return self.subject, ""


@dataclass(frozen=True)
class ToleranceCheck:
    """A measure up by more than the threshold `reads[0]` (a regression), or down by more (an
    improvement)."""

    label: str  # "forward max bits": the verdict's words
    section: str  # forward | backward
    field: str  # max_bits | reduced_ulp
    unit: str  # bits | ULP
    subject: str  # describe(): "forward" (of "... max bits up by more than")
    measure: str  # describe(): "max bits"
    reads: tuple[str, ...]
    name: str = "accuracy"

    def compare(self, b: dict, c: dict, t: Thresholds, k: tuple, versus: str | None = None) -> Verdict | None:
        # A gradient not measured (a numpy implementation without one) has nothing to compare.
        # An optional section (backward_classifier: losses of two inputs) absent on a side likewise.
        vb, vc = (b.get(self.section) or {}).get(self.field), (c.get(self.section) or {}).get(self.field)
        tolerance = getattr(t, self.reads[0])
        if vb is None or vc is None or vb == vc or (math.isnan(vb) and math.isnan(vc)):
            return None
        delta = vc - vb  # inf − finite = inf; finite − inf = −inf
        size = delta if self.unit == "bits" else math.log2(1 + max(delta, 0))
        where = "" if versus is None else f" (vs {versus})"
        if delta > tolerance:
            return Verdict(
                k,
                self.name,
                "regression",
                _num(vb),
                _num(vc),
                f"{self.label} up by {_num(delta)} {self.unit} (tolerance {tolerance:g}){where}",
                size,
            )
        if delta < -tolerance:
            return Verdict(
                k, self.name, "improvement", _num(vb), _num(vc), f"{self.label} down by {_num(-delta)} {self.unit}"
            )
        return None

    def describe(self, t: Thresholds) -> tuple[str, str]:
        tolerance = getattr(t, self.reads[0])
        unit = "" if self.unit == "bits" else f" {self.unit}"
        return self.subject, f"{self.measure} up by more than {tolerance:g}{unit}"


# The sections a record's values are in: the loss, the gradient and, for a loss of two inputs
# (linear_cross_entropy, kl_div, js_div), the second input's gradient (dL/dclassifier, dL/dteacher).
SECTIONS = ("forward", "backward", "backward_classifier", "backward_teacher")


def _nonfinite(r: dict) -> int:
    return sum(A.nonfinite(r.get(s)) for s in SECTIONS) + int(A.reduced_nonfinite(r))


def _underflows(r: dict) -> int | None:
    """Results flushed to zero (forward and gradients); None where the file does not count them."""
    counts = [sec.get("underflow") for sec in (r.get(s) for s in SECTIONS) if sec]
    return None if any(c is None for c in counts) else sum(counts)


STATUS = StatusCheck()
# The checks of a point that ran on both sides, in the order of its verdicts.
VALUE_CHECKS = (
    # NaN anywhere the reference is not NaN, ±inf where it is finite (docs/METRICS.md "Overflow").
    CountCheck(
        "overflow",
        _nonfinite,
        "more NaN/±inf value(s) than the {other}",
        "fewer non-finite values",
        math.inf,
        "a new non-finite value",
    ),
    CountCheck("accuracy", _underflows, "more result(s) flushed to zero than the {other}", None, 1.0, "flush to zero"),
    ToleranceCheck("forward max bits", "forward", "max_bits", "bits", "forward", "max bits", ("bits",)),
    ToleranceCheck("gradient max bits", "backward", "max_bits", "bits", "gradient", "max bits", ("bits",)),
    # dL/dclassifier of linear_cross_entropy: a fused kernel can be right for the hidden states
    # and wrong for the weight (Liger-Kernel #1391, TransformerEngine #3193).
    ToleranceCheck(
        "classifier gradient max bits",
        "backward_classifier",
        "max_bits",
        "bits",
        "classifier gradient",
        "max bits",
        ("bits",),
    ),
    ToleranceCheck(
        "teacher gradient max bits",
        "backward_teacher",
        "max_bits",
        "bits",
        "teacher gradient",
        "max bits",
        ("bits",),
    ),
    ToleranceCheck("mean-loss ULPs", "forward", "reduced_ulp", "ULP", "mean-loss", "error", ("ulp",)),
)


def compare_point(b: dict, c: dict, t: Thresholds, k: tuple, versus: str | None = None) -> list[Verdict]:
    """Status, then (where both ran) the value checks of `c` against `b` (the baseline's point,
    or the versus implementation's point of the same run)."""
    if b["status"] != c["status"]:
        return [v for v in (STATUS.compare(b, c, t, k, versus),) if v]
    if c["status"] != "ok":
        return []
    return [v for v in (check.compare(b, c, t, k, versus) for check in VALUE_CHECKS) if v]


def describe_checks(t: Thresholds) -> str:
    """What a regression of a point is under `t`, from the checks' descriptions: "a new
    non-finite value or flush to zero; forward or gradient or classifier gradient max bits up by
    more than 1; ..."."""
    phrases: list[tuple[list[str], str]] = []
    for subject, condition in (check.describe(t) for check in (*VALUE_CHECKS, STATUS)):
        if phrases and phrases[-1][1] == condition:
            phrases[-1][0].append(subject)
        else:
            phrases.append(([subject], condition))
    return "; ".join(" ".join(x for x in (" or ".join(subjects), condition) if x) for subjects, condition in phrases)


def _num(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class TimingCheck:
    """The timing gate's thresholds and its description (the judging: gate._judge_timing)."""

    name: str = "timing"
    reads: tuple[str, ...] = ("timing", "time_factor", "false_alarm", "min_time", "versus")

    def describe(self, t: Thresholds) -> str:
        return (
            f"Timing ({t.timing}): slower by more than ×{t.time_factor:g} by an exact one-sided rank test at "
            f"{t.false_alarm:g} divided by the number of timing comparisons judged, confirmed by a re-measure "
            f"in the same run where one is possible; operations under {stats._t(t.min_time)} on both sides, "
            "unstable samples and other environments are not judged."
        )


TIMING = TimingCheck()
# Read by the rule for implementations without a baseline counterpart (gate.compare).
NEW_READS = ("new", "versus")


def describe_policy(t: Thresholds) -> str:
    """The "Thresholds" paragraph of a comparison under `t`."""
    return (
        f"A regression: {describe_checks(t)}. An implementation without a baseline ({t.new} ones, `gate.new`) "
        f"is held to the same tolerances against `{t.versus}` in the same run. {TIMING.describe(t)}"
    )
