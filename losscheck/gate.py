"""Baseline comparison -> verdicts: the regression gate of CI pipelines.

Records are matched by their sweep key. Accuracy and overflow gates are deterministic (the
same seed and environment give bit-identical numbers). Timing gates are statistical, with a
false-alarm rate that can be stated (docs/METRICS.md, "The regression gate"):

* a timing comparison is made only between runs whose kernel choice is the same (CPU model,
  torch's CPU capability, torch build, thread count, GPU names: `TIMING_ENV`), and only for
  operations that take at least `min_time` per call on one side; otherwise it is "not judged";
* each side's sample (the per-run time of each block; in relative mode, each block's ratio to
  the `versus` implementation's block of the same round) must be stable (`stats.stability`),
  else "not judged";
* a slowdown is suspected when the current median is more than `time_factor` times the
  baseline's and the exact one-sided rank test of "current > time_factor x baseline" gives
  p <= SCREEN; a suspect — or an unstable current sample — is re-measured in the same run
  when a re-measure is available (`bench --baseline`: the implementation and its versus
  interleaved again, REMEASURE_ROUNDS rounds), and called a regression only if the
  re-measured sample passes the same test at
  p <= false_alarm / m, m being the number of timing comparisons judged in the run
  (Bonferroni): the chance of any false timing regression in a run is at most
  `false_alarm` (1% by default), whatever m.

Implementations with no baseline counterpart are judged against the `versus`
implementation of the same run (`new`: custom | all | none) with the accuracy tolerances of
the baseline comparison. Points of the baseline missing from the current run fail the gate
unless allowed; points not run (skipped, or an error on both sides) are counted, never
passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import stats
from .config import as_input, gate_policy
from .errors import ConfigError

# The checks of a point and the Verdict are in gate_checks.py; Verdict is re-exported, where
# the gate's users have found it.
from .gate_checks import Verdict, compare_point

# The settings, Thresholds and GatePolicy are declared in gate_policy.py (config validates them
# without importing this module); re-exported here, where the gate's users have found them.
from .gate_policy import NEW_MODES, TIMING_MODES, GatePolicy, Thresholds  # noqa: F401

DEFAULT_VERSUS = Thresholds().versus
from .results import inputs_generator, record_key

# Environment fields that decide which kernels run, and so their speed: timings measured
# under different values are not compared (relative mode included: a ratio to torch of a
# microsecond-scale operation depends on the instruction set, see issue 12).
TIMING_ENV = ("cpu", "cpu_id", "cpu_capability", "torch", "torch_git", "threads", "devices")
# Absolute timings need the same machine and software as well.
ENV_FIELDS = TIMING_ENV + ("python", "numpy", "platform")
# Screening level of the first look at a timing comparison (the call is made at false_alarm / m).
SCREEN = 0.05
PARTS = (("forward", "forward"), ("backward", "forward+backward"))

# The re-measure of a suspected slowdown: (record key, [implementation names]) ->
# {name: timing dict or exception}, the names timed interleaved in the same run.
Remeasure = Callable[[tuple, list], dict]


@dataclass
class TimingSummary:
    """What the timing gate did in a run: its comparisons and its guarantee."""

    mode: str = "relative"
    judged: int = 0  # comparisons that could be judged (m)
    per_test: float | None = None  # the level each test is called at: false_alarm / m
    false_alarm: float = 0.01
    not_judged: dict[str, int] = field(default_factory=dict)  # reason -> comparisons
    suspected: int = 0
    remeasured: int = 0
    confirmed: int = 0


@dataclass
class Comparison:
    verdicts: list[Verdict]
    compared: int  # matched points
    unchanged: int  # matched points with no regression or improvement
    only_baseline: list[tuple]  # missing from the current run
    only_current: list[tuple]
    env_differences: dict[str, tuple]
    timing_note: str
    baseline_meta: dict
    current_meta: dict
    matched_keys: list[tuple]
    not_compared: list[tuple] = field(default_factory=list)  # skipped on one side only
    not_run: dict[tuple, str] = field(default_factory=dict)  # point -> why (skipped/error, not judged)
    versus_of: dict[tuple, str] = field(default_factory=dict)  # new point -> the implementation it was judged against
    not_gated: list[tuple] = field(default_factory=list)  # new points that `new` leaves ungated
    kinds: dict[str, str] = field(default_factory=dict)  # implementation -> kind
    allow_missing: bool = False
    timing: TimingSummary = field(default_factory=TimingSummary)
    selected_losses: tuple[str, ...] = ()  # the baseline was restricted to these (bench --loss)

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "regression"]

    @property
    def improvements(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "improvement"]

    @property
    def not_judged(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "not judged"]

    @property
    def missing_fails(self) -> bool:
        return bool(self.only_baseline) and not self.allow_missing

    @property
    def failed(self) -> bool:
        return bool(self.regressions) or self.missing_fails

    def points(self) -> dict[tuple, list[Verdict]]:
        out: dict[tuple, list[Verdict]] = {}
        for v in self.verdicts:
            out.setdefault(v.key, []).append(v)
        return out

    def by_implementation(self) -> list[dict]:
        """One summary row per implementation: what was judged, against what, and the verdict."""
        rows: dict[str, dict] = {}

        def row(impl: str) -> dict:
            return rows.setdefault(
                impl,
                {
                    "impl": impl,
                    "kind": self.kinds.get(impl, ""),
                    "against": set(),
                    "judged": 0,
                    "not_judged": 0,
                    "missing": 0,
                    "regressions": set(),
                    "worst": None,
                },
            )

        # Matched points are judged against the baseline, new ones against their versus (added below).
        for k in [*self.matched_keys, *self.versus_of]:
            r = row(k[1])
            if k in self.not_run:
                r["not_judged"] += 1
            else:
                r["judged"] += 1
                if k not in self.versus_of:
                    r["against"].add("baseline")
        for k in [*self.not_compared, *self.not_gated]:
            row(k[1])["not_judged"] += 1
        for k in self.only_baseline:
            row(k[1])["missing"] += 1
        for v in self.verdicts:
            r = row(v.key[1])
            if v.outcome == "regression":
                r["regressions"].add(v.key)
                if r["worst"] is None or v.size > r["worst"].size:
                    r["worst"] = v
        for k, versus in self.versus_of.items():
            rows[k[1]]["against"].add(f"{versus} (same run)")
        out = []
        for impl, r in rows.items():
            if r["regressions"] or (r["missing"] and not self.allow_missing):
                verdict = "FAIL"
            elif r["judged"]:
                verdict = "pass"
            elif any(k[1] == impl for k in self.not_gated):
                verdict = "not gated (no baseline)"
            else:
                verdict = "not judged"
            out.append(
                {
                    **r,
                    "against": ", ".join(sorted(r["against"])) or "—",
                    "regressions": len(r["regressions"]),
                    "verdict": verdict,
                }
            )
        return sorted(out, key=lambda r: (r["verdict"] != "FAIL", r["impl"]))


def env_differences(a: dict, b: dict, fields=ENV_FIELDS) -> dict[str, tuple]:
    return {f: (a.get(f), b.get(f)) for f in fields if a.get(f) != b.get(f)}


def compare(
    baseline: dict, current: dict, policy: GatePolicy, remeasure: Remeasure | None = None, allow_missing: bool = False
) -> Comparison:
    """Judge `current` against `baseline` (results files as loaded). `remeasure`, when given,
    re-times suspected slowdowns in the same run (see the module docstring)."""
    base = {record_key(r): r for r in baseline["records"]}
    cur = {record_key(r): r for r in current["records"]}
    benv, cenv = baseline.get("environment", {}), current.get("environment", {})
    diffs = env_differences(benv, cenv)
    generators = (inputs_generator(baseline), inputs_generator(current))
    if generators[0] != generators[1]:
        # Other generator, other input values at the same point: a change there is no
        # regression of the implementation. Named, not judged (accuracy and timing alike).
        diffs["inputs"] = generators
    verdicts: list[Verdict] = []
    matched, not_compared, not_run = [], [], {}
    for k in sorted(set(base) & set(cur), key=_sort_key):
        # Skipped on one side only (an absent device, say): listed, neither passed nor failed.
        if (base[k]["status"] == "skipped") != (cur[k]["status"] == "skipped"):
            not_compared.append(k)
        else:
            matched.append(k)
    timing_cases: list[_TimingCase] = []
    by_point: dict[tuple, list[Verdict]] = {}
    for k in matched:
        t = policy.for_loss(k[0])
        b, c = base[k], cur[k]
        if "inputs" in diffs:
            not_run[k] = (
                f"inputs differ: the baseline's were drawn by the {generators[0]} generator, "
                f"this run's by {generators[1]} (not the same inputs)"
            )
            continue
        if c["status"] != "ok" and b["status"] != "ok":
            not_run[k] = _not_run_why(c)
        found = compare_point(b, c, t, k)
        by_point[k] = found
        verdicts += found
        if b["status"] == c["status"] == "ok" and t.timing != "off" and k[1] != t.versus:
            timing_cases += _timing_cases(k, b, c, base, cur, t)
    # New implementations: judged against `versus` in the same run.
    versus_of, not_gated = {}, []
    for k in sorted(set(cur) - set(base), key=_sort_key):
        t = policy.for_loss(k[0])
        c = cur[k]
        if t.new == "none" or (t.new == "custom" and c.get("kind") != "custom") or k[1] == t.versus:
            not_gated.append(k)
            continue
        versus_of[k] = t.versus
        vk = k[:1] + (t.versus,) + k[2:]
        v = cur.get(vk)
        if v is None:
            not_run[k] = f"no {t.versus} point in this run to judge it against"
            continue
        if c["status"] != "ok" and (v["status"] != "ok" or c["status"] == "skipped"):
            not_run[k] = _not_run_why(c)
            continue
        if v["status"] != "ok":
            not_run[k] = f"{t.versus} did not run here ({_not_run_why(v)})"
            continue
        found = [
            replace(x, against=t.versus)
            for x in compare_point(v, c, t, k, versus=t.versus)
            if x.outcome == "regression"
        ]
        verdicts += found
    timing = _judge_timing(timing_cases, policy, benv, cenv, remeasure)
    verdicts += timing.verdicts
    for v in timing.verdicts:
        by_point.setdefault(v.key, []).append(v)
    unchanged = sum(
        1
        for k in matched
        if k not in not_run and not any(v.outcome in ("regression", "improvement") for v in by_point.get(k, []))
    )
    timing_note = timing.note

    def meta(d: dict) -> dict:
        return {
            "created": d.get("created"),
            "command": d.get("command"),
            "git_revision": d.get("environment", {}).get("git_revision"),
        }

    kinds = {r["impl"]: r.get("kind", "") for r in (*baseline["records"], *current["records"])}
    return Comparison(
        sorted(verdicts, key=lambda v: _sort_key(v.key)),
        len(matched),
        unchanged,
        sorted(set(base) - set(cur), key=_sort_key),
        sorted(set(cur) - set(base), key=_sort_key),
        diffs,
        timing_note,
        meta(baseline),
        meta(current),
        matched,
        not_compared,
        not_run,
        versus_of,
        not_gated,
        kinds,
        allow_missing,
        timing.summary,
    )


def _not_run_why(r: dict) -> str:
    return f"{r['status']}: {r.get('message') or ''}".rstrip(": ")


def _sort_key(k: tuple) -> tuple:
    return tuple("" if v is None else (f"{v:020.6f}" if isinstance(v, (int, float)) else str(v)) for v in k)


# ---- timing ---------------------------------------------------------------------------------------


@dataclass
class _TimingCase:
    key: tuple
    part: str  # forward | backward
    label: str
    versus: str
    t: Thresholds
    base: dict  # the baseline's timing of the point (and its versus)
    base_versus: dict | None
    cur: dict
    cur_versus: dict | None


def _timing_cases(k, b, c, base, cur, t: Thresholds) -> list[_TimingCase]:
    if not b.get("timing") or not c.get("timing"):
        return []
    vk = k[:1] + (t.versus,) + k[2:]
    bv, cv = (base.get(vk) or {}).get("timing"), (cur.get(vk) or {}).get("timing")
    return [_TimingCase(k, part, label, t.versus, t, b["timing"], bv, c["timing"], cv) for part, label in PARTS]


def _samples(timing: dict, versus: dict | None, part: str, mode: str) -> tuple[list[float] | None, str]:
    """The sample a timing comparison tests: block times, or in relative mode each block's
    ratio to the versus implementation's block of the same round. (None, why) if there is none."""
    own = timing.get(f"{part}_times_s")
    if not own:
        return None, "no raw block times (results before schema 3: re-accept the baseline)"
    if mode == "absolute":
        return list(own), ""
    theirs = (versus or {}).get(f"{part}_times_s")
    if not theirs:
        return None, "no timing of the versus implementation at this point"
    if len(theirs) != len(own) or min(theirs) <= 0:
        return None, "the versus implementation's blocks do not pair with these"
    return [a / v for a, v in zip(own, theirs, strict=True)], ""


def _stable(sample: list[float], timing: dict, versus: dict | None, part: str, side: str) -> stats.Stability:
    """Whether one side's sample can be judged: its own spread, and no stall in the raw times
    behind it (the implementation's and, for a ratio, the versus implementation's)."""
    s = stats.stability(sample, f"the {side}'s sample")
    if not s.ok:
        return s
    for tm, who in ((timing, ""), (versus, " (versus)")):
        if tm:
            s = stats.stall(
                tm.get(f"{part}_times_s") or [], tm.get(f"{part}_calibration_s"), f"the {side}'s timing{who}"
            )
            if not s.ok:
                return s
    return s


@dataclass
class _TimingOutcome:
    verdicts: list[Verdict]
    summary: TimingSummary
    note: str


def _judge_timing(
    cases: list[_TimingCase], policy: GatePolicy, benv: dict, cenv: dict, remeasure: Remeasure | None
) -> _TimingOutcome:
    summary = TimingSummary(mode=policy.default.timing, false_alarm=policy.default.false_alarm)
    verdicts: list[Verdict] = []
    if not cases:
        return _TimingOutcome(verdicts, summary, "")
    note = ""

    def skip(case: _TimingCase, why: str, counted_as: str | None = None) -> None:
        summary.not_judged[counted_as or why] = summary.not_judged.get(counted_as or why, 0) + 1
        verdicts.append(Verdict(case.key, "timing", "not judged", "", "", f"{case.label}: {why}"))

    modes = {c.t.timing for c in cases}
    env_diff = {m: env_differences(benv, cenv, TIMING_ENV if m == "relative" else ENV_FIELDS) for m in modes}
    if any(env_diff.values()):
        parts = sorted({f for d in env_diff.values() for f in d})
        note = (
            "timings are not judged where the environments differ in what decides kernel choice or speed ("
            + ", ".join(f"{f}: {benv.get(f)!r} -> {cenv.get(f)!r}" for f in parts)
            + ")"
        )
    ready: list[tuple[_TimingCase, list[float], list[float]]] = []
    for case in cases:
        mode = case.t.timing
        if env_diff[mode]:
            skip(case, "environments differ (" + ", ".join(env_diff[mode]) + ")", "environments differ")
            continue
        bmed, cmed = case.base.get(f"{case.part}_median_s"), case.cur.get(f"{case.part}_median_s")
        if bmed is not None and cmed is not None and max(bmed, cmed) < case.t.min_time:
            skip(
                case,
                f"too short to time reliably (medians {stats._t(bmed)} and {stats._t(cmed)}, "
                f"both under {stats._t(case.t.min_time)})",
                "too short to time reliably",
            )
            continue
        bs, why = _samples(case.base, case.base_versus, case.part, mode)
        if bs is None:
            skip(case, f"baseline: {why}", f"baseline: {why}")
            continue
        st = _stable(bs, case.base, case.base_versus if mode == "relative" else None, case.part, "baseline")
        if not st.ok:
            skip(case, st.why, "the baseline's timing is unstable")
            continue
        cs, why = _samples(case.cur, case.cur_versus, case.part, mode)
        if cs is None:
            skip(case, f"current run: {why}", f"current run: {why}")
            continue
        ready.append((case, bs, cs))
    summary.judged = len(ready)
    if not ready:
        return _TimingOutcome(verdicts, summary, note)
    summary.per_test = summary.false_alarm / len(ready)
    for case, bs, cs in ready:
        f = case.t.time_factor
        unit = "s" if case.t.timing == "absolute" else f"× {case.versus}"
        bmed, cmed = stats.median(bs), stats.median(cs)
        cur_stable = _stable(
            cs, case.cur, case.cur_versus if case.t.timing == "relative" else None, case.part, "current run"
        )
        suspected = cmed > f * bmed and stats.slower_p(cs, bs, f) <= SCREEN
        summary.suspected += suspected
        sample, stable, how = cs, cur_stable, "not re-measured (comparing two files)"
        # A suspect is confirmed by a re-measure; an unstable sample (a burst of load) is
        # measured again rather than left unjudged, where a re-measure is available.
        if (suspected or not cur_stable.ok) and remeasure is not None:
            again = _remeasured(remeasure, case)
            if isinstance(again, str):
                how = f"re-measure failed: {again}"
            else:
                summary.remeasured += 1
                sample, (tm, tv) = again
                how = f"re-measured ({len(sample)} blocks, interleaved with {case.versus})"
                stable = _stable(sample, tm, tv, case.part, "re-measure")
        if not stable.ok:
            skip(case, stable.why + ("" if sample is cs else f"; {how}"), "the current run's timing is unstable")
            continue
        smed = stats.median(sample)
        p = stats.slower_p(sample, bs, f)
        if smed > f * bmed and p <= summary.per_test:
            summary.confirmed += 1
            verdicts.append(
                Verdict(
                    case.key,
                    "timing",
                    "regression",
                    f"{bmed:.4g} {unit}",
                    f"{smed:.4g} {unit}",
                    f"{case.label} {case.t.timing} time ×{smed / bmed:.2f} the baseline's (> ×{f:g}; exact rank "
                    f"test p = {p:.2g} <= {summary.per_test:.2g} = {summary.false_alarm:g}/{summary.judged}; {how})",
                    math.log2(smed / bmed),
                )
            )
        elif smed * f < bmed and stats.slower_p(bs, sample, f) <= summary.per_test:
            verdicts.append(
                Verdict(
                    case.key,
                    "timing",
                    "improvement",
                    f"{bmed:.4g} {unit}",
                    f"{smed:.4g} {unit}",
                    f"{case.label} {case.t.timing} time ×{smed / bmed:.2f} the baseline's",
                )
            )
    return _TimingOutcome(verdicts, summary, note)


def _remeasured(remeasure: Remeasure, case: _TimingCase):
    """The re-measured sample of `case` and the timings behind it, or why there is none."""
    names = [case.key[1]] + ([case.versus] if case.t.timing == "relative" else [])
    try:
        timed = remeasure(case.key, names)
    except Exception as e:  # a re-measure must never crash the gate: the verdict says why
        return f"{type(e).__name__}: {e}"
    tm, tv = timed.get(names[0]), timed.get(case.versus) if len(names) > 1 else None
    if not isinstance(tm, dict):
        return f"{tm!r}"
    if len(names) > 1 and not isinstance(tv, dict):
        return f"{tv!r}"
    sample, why = _samples(tm, tv, case.part, case.t.timing)
    return why if sample is None else (sample, (tm, tv))


def unstable_timings(data: dict, versus: str = DEFAULT_VERSUS) -> list[str]:
    """Warnings for the timings of a results file that the gate could not judge as a baseline
    (`losscheck baseline` prints them; accepting is not refused)."""
    out = []
    by_key = {record_key(r): r for r in data["records"]}
    for k, r in by_key.items():
        if r.get("status") != "ok" or not r.get("timing"):
            continue
        vr = by_key.get(k[:1] + (versus,) + k[2:]) if k[1] != versus else None
        vt = (vr or {}).get("timing")
        for part, label in PARTS:
            sample, why = _samples(r["timing"], vt, part, "relative" if vt else "absolute")
            s = _stable(sample, r["timing"], vt, part, "baseline") if sample else stats.Stability(False, why)
            if not s.ok:
                out.append(f"{k[0]} {k[1]} {k[2]} {k[3]} batch {k[4]}: {label}: {s.why}")
    return out


def policy_from_config(config: dict) -> GatePolicy:
    """The gate policy stored in a results file's `config` (defaults where absent): in the
    input format (schema 3) or the former `{default, per_loss}` one (schema 1 and 2), read
    through `config.as_input` and validated as a config's `gate:` is. A stored gate that does
    not validate (a hand-edited file) falls back to the defaults, as before."""
    try:
        return gate_policy(as_input(config))
    except ConfigError:
        return GatePolicy()
