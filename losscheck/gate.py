"""Baseline comparison -> verdicts: the regression gate of CI pipelines.

Records are matched by their sweep key. Accuracy and overflow gates are deterministic
(the same seed and environment give bit-identical numbers); timing gates are
noise-aware: a slowdown fails only when the current interquartile range lies entirely
above the baseline's, scaled by `time_factor` (so beyond both the factor and the
measured noise). Timing is compared either in absolute seconds
(same machine: refused when the environments differ) or relative to the framework
implementation measured in the same run (portable across machines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from . import analysis as A
from .results import record_key

TIMING_MODES = ("relative", "absolute", "off")
NEW_MODES = ("custom", "all", "none")
# Environment fields whose difference makes absolute timings incomparable.
ENV_FIELDS = ("torch", "python", "numpy", "platform", "cpu", "threads", "devices")
FRAMEWORK_IMPL = "torch"


@dataclass(frozen=True)
class Thresholds:
    """How much worse a point may get before it counts as a regression."""

    bits: float = 0.0  # allowed increase of forward/backward max_bits
    ulp: float = 0.0  # allowed increase of the mean loss's reduced_ulp
    time_factor: float = 1.25  # the smallest slowdown that counts (minimum effect size)
    timing: str = "relative"  # relative | absolute | off
    # An implementation without a baseline counterpart is judged against this one of the same run.
    versus: str = "torch"
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

    def with_overrides(self, **overrides) -> "GatePolicy":
        """Command-line values replace the configured ones, per-loss ones included."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return GatePolicy(replace(self.default, **given),
                          {loss: replace(t, **given) for loss, t in self.per_loss.items()})


@dataclass(frozen=True)
class Verdict:
    key: tuple
    gate: str  # status | overflow | accuracy | timing
    outcome: str  # regression | improvement
    baseline: str
    current: str
    why: str


@dataclass
class Comparison:
    verdicts: list[Verdict]
    compared: int  # matched points
    unchanged: int  # matched points with no verdict
    only_baseline: list[tuple]
    only_current: list[tuple]
    env_differences: dict[str, tuple]
    timing_note: str
    baseline_meta: dict
    current_meta: dict
    matched_keys: list[tuple]
    not_compared: list[tuple] = field(default_factory=list)  # skipped on one side only

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "regression"]

    @property
    def improvements(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "improvement"]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def points(self) -> dict[tuple, list[Verdict]]:
        out: dict[tuple, list[Verdict]] = {}
        for v in self.verdicts:
            out.setdefault(v.key, []).append(v)
        return out


def env_differences(a: dict, b: dict) -> dict[str, tuple]:
    return {f: (a.get(f), b.get(f)) for f in ENV_FIELDS if a.get(f) != b.get(f)}


def compare(baseline: dict, current: dict, policy: GatePolicy) -> Comparison:
    base = {record_key(r): r for r in baseline["records"]}
    cur = {record_key(r): r for r in current["records"]}
    diffs = env_differences(baseline.get("environment", {}), current.get("environment", {}))
    modes = {policy.for_loss(k[0]).timing for k in cur}
    timing_note = ""
    absolute_refused = bool(diffs) and "absolute" in modes
    if absolute_refused:
        timing_note = ("absolute timings are not compared: the environments differ ("
                       + ", ".join(diffs) + "); use relative timing to gate across machines")
    base_fw = _framework_times(baseline["records"])
    cur_fw = _framework_times(current["records"])
    verdicts: list[Verdict] = []
    unchanged = compared = 0
    matched, not_compared = [], []
    for k in sorted(set(base) & set(cur), key=_sort_key):
        # Skipped on one side only (an absent device, say): listed, neither passed nor failed.
        if (base[k]["status"] == "skipped") != (cur[k]["status"] == "skipped"):
            not_compared.append(k)
        else:
            matched.append(k)
    for k in matched:
        compared += 1
        t = policy.for_loss(k[0])
        found = _compare_point(base[k], cur[k], t)
        if t.timing == "absolute" and not absolute_refused:
            found += _compare_timing(k, _times(base[k]), _times(cur[k]), t, "absolute")
        elif t.timing == "relative" and k[1] != FRAMEWORK_IMPL:
            fk = k[:1] + (FRAMEWORK_IMPL,) + k[2:]
            found += _compare_timing(k, _relative(_times(base[k]), base_fw.get(fk)),
                                     _relative(_times(cur[k]), cur_fw.get(fk)), t, "relative")
        verdicts += found
        unchanged += not found
    meta = lambda d: {"created": d.get("created"), "command": d.get("command"),
                      "git_revision": d.get("environment", {}).get("git_revision")}
    return Comparison(verdicts, compared, unchanged,
                      sorted(set(base) - set(cur), key=_sort_key), sorted(set(cur) - set(base), key=_sort_key),
                      diffs, timing_note, meta(baseline), meta(current), matched, not_compared)


def _sort_key(k: tuple) -> tuple:
    return tuple("" if v is None else (f"{v:020.6f}" if isinstance(v, (int, float)) else str(v)) for v in k)


def _compare_point(b: dict, c: dict, t: Thresholds) -> list[Verdict]:
    k = record_key(c)
    if b["status"] != c["status"]:
        if b["status"] == "ok" and c["status"] == "error":
            return [Verdict(k, "status", "regression", "ok", "error", c["message"])]
        if b["status"] == "error" and c["status"] == "ok":
            return [Verdict(k, "status", "improvement", "error", "ok", b["message"])]
        return []
    if c["status"] != "ok":
        return []
    out = []
    nb, nc = _nonfinite(b), _nonfinite(c)
    if nc > nb:
        out.append(Verdict(k, "overflow", "regression", str(nb), str(nc),
                           f"{nc - nb} new non-finite value(s) where the reference is finite"))
    elif nc < nb:
        out.append(Verdict(k, "overflow", "improvement", str(nb), str(nc), f"{nb - nc} fewer non-finite values"))
    for section, label in (("forward", "forward max bits"), ("backward", "gradient max bits")):
        # A gradient not measured (a numpy implementation without one) has nothing to compare.
        out += _worse(k, label, (b[section] or {}).get("max_bits"), (c[section] or {}).get("max_bits"),
                      t.bits, "bits")
    out += _worse(k, "mean-loss ULPs", b["forward"]["reduced_ulp"], c["forward"]["reduced_ulp"], t.ulp, "ULP")
    return out


def _nonfinite(r: dict) -> int:
    return A.nonfinite(r["forward"]) + A.nonfinite(r["backward"]) + int(A.reduced_nonfinite(r))


def _worse(k, label, b, c, tolerance, unit) -> list[Verdict]:
    if b is None or c is None or b == c or (math.isnan(b) and math.isnan(c)):
        return []
    delta = c - b  # inf − finite = inf; finite − inf = −inf
    if delta > tolerance:
        return [Verdict(k, "accuracy", "regression", _num(b), _num(c),
                        f"{label} up by {_num(delta)} {unit} (tolerance {tolerance:g})")]
    if delta < -tolerance:
        return [Verdict(k, "accuracy", "improvement", _num(b), _num(c), f"{label} down by {_num(-delta)} {unit}")]
    return []


def _num(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _times(r: dict) -> tuple | None:
    """(forward q1, median, q3, forward+backward q1, median, q3) in seconds."""
    tm = r.get("timing") if r.get("status") == "ok" else None
    if not tm:
        return None
    out = []
    for part in ("forward", "backward"):
        m, iqr = tm[f"{part}_median_s"], tm[f"{part}_iqr_s"]
        # Quartiles as measured; files without them: centred on the median.
        out += [tm.get(f"{part}_q1_s", m - iqr / 2), m, tm.get(f"{part}_q3_s", m + iqr / 2)]
    return tuple(out)


def _framework_times(records: list[dict]) -> dict[tuple, tuple]:
    return {record_key(r): _times(r) for r in records if r["impl"] == FRAMEWORK_IMPL and _times(r)}


def _relative(times: tuple | None, framework: tuple | None) -> tuple | None:
    """Each time as a ratio to the framework's, as an interval: fast end q1/q3_fw, slow end q3/q1_fw."""
    if not times or not framework or min(framework) <= 0:
        return None
    out = []
    for i in (0, 3):
        q1, m, q3 = times[i:i + 3]
        f1, fm, f3 = framework[i:i + 3]
        out += [q1 / f3, m / fm, q3 / f1]
    return tuple(out)


def _compare_timing(k, b, c, t: Thresholds, mode: str) -> list[Verdict]:
    """A slowdown counts when the whole interquartile range moved by more than the factor:
    the current run's fast quartile is slower than the baseline's slow quartile × factor.
    Noise within a run widens both ranges and so never makes a verdict by itself."""
    if not b or not c:
        return []
    out = []
    unit = "s" if mode == "absolute" else "× torch"
    for i, label in ((0, "forward"), (3, "forward+backward")):
        b1, bm, b3 = b[i:i + 3]
        c1, cm, c3 = c[i:i + 3]
        if c1 > b3 * t.time_factor:
            out.append(Verdict(k, "timing", "regression", f"{bm:.4g} {unit}", f"{cm:.4g} {unit}",
                               f"{label} {mode} time ×{cm / bm:.2f}: its quartiles [{c1:.3g}, {c3:.3g}] lie above "
                               f"×{t.time_factor:g} the baseline's [{b1:.3g}, {b3:.3g}]"))
        elif b1 > c3 * t.time_factor:
            out.append(Verdict(k, "timing", "improvement", f"{bm:.4g} {unit}", f"{cm:.4g} {unit}",
                               f"{label} {mode} time ×{cm / bm:.2f}"))
    return out


def policy_from_config(config: dict) -> GatePolicy:
    """The gate policy stored in a results file's `config` (defaults where absent): in the
    input format (schema 3) or the former `{default, per_loss}` one (schema 1 and 2), read
    through `config.as_input` and validated as a config's `gate:` is. A stored gate that does
    not validate (a hand-edited file) falls back to the defaults, as before."""
    # Imported here: config imports this module (Thresholds, GatePolicy) at its top.
    from .config import as_input, gate_policy
    from .errors import ConfigError
    try:
        return gate_policy(as_input(config))
    except ConfigError:
        return GatePolicy()
