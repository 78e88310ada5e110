"""The gate's checks as objects (losscheck/gate_checks.py): each threshold of gate_policy.SETTINGS
is read by a check, said in the comparison's "Thresholds" text and, where it has a flag, offered
on the command line — declared once, in SETTINGS."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from losscheck import gate_checks as G
from losscheck.cli import main
from losscheck.commands import compare_cmd
from losscheck.gate_policy import BY_NAME, GATE_KEYS, SETTINGS, Thresholds

KEY = ("bce", "naive", "float32", "cpu", 8, None, 1.0, "normal", "mean", (), None)


def _point(max_bits=1.0, grad_bits=1.0, reduced_ulp=0.0, nan=0, underflow=0, status="ok", cls_bits=None,
           teacher_bits=None) -> dict:
    side = {"max_bits": max_bits, "reduced_ulp": reduced_ulp, "nan": nan, "posinf": 0, "neginf": 0, "inf": 0,
            "underflow": underflow, "value": 0.5, "reference_value": 0.5}
    grad = {**side, "max_bits": grad_bits, "reduced_ulp": None, "nan": 0, "underflow": 0}
    point = {"status": status, "message": "boom" if status == "error" else None, "forward": side, "backward": grad}
    if cls_bits is not None:  # linear_cross_entropy: dL/dclassifier
        point["backward_classifier"] = {**grad, "max_bits": cls_bits}
    if teacher_bits is not None:  # kl_div, js_div: d/dteacher
        point["backward_teacher"] = {**grad, "max_bits": teacher_bits}
    return point


def test_every_setting_is_read_by_a_check_or_the_new_implementation_rule():
    read = {name for check in (G.STATUS, *G.VALUE_CHECKS, G.TIMING) for name in check.reads} | set(G.NEW_READS)
    assert read == set(GATE_KEYS)


@pytest.mark.parametrize("name", GATE_KEYS)
def test_the_thresholds_text_says_every_setting(name):
    """Changing one threshold changes the paragraph: each is said, none is a constant of the text."""
    other = {"bits": 3.5, "ulp": 7.0, "time_factor": 2.5, "timing": "absolute", "versus": "stable", "new": "all",
             "min_time": 0.25, "false_alarm": 0.125}
    assert G.describe_policy(dataclasses.replace(Thresholds(), **{name: other[name]})) != \
        G.describe_policy(Thresholds())


def test_the_thresholds_text_joins_checks_of_one_condition():
    text = G.describe_policy(Thresholds(bits=64, ulp=1e12))
    assert text.startswith("A regression: a new non-finite value or flush to zero; forward or gradient or "
                           "classifier gradient or teacher gradient max bits up by more than 64; mean-loss error up by more than 1e+12 ULP; an implementation that "
                           "now errors. ")


@pytest.mark.parametrize("check", [c for c in G.VALUE_CHECKS if isinstance(c, G.ToleranceCheck)],
                         ids=lambda c: c.label)
def test_a_tolerance_check_allows_exactly_its_threshold(check):
    field = {"forward max bits": "max_bits", "gradient max bits": "grad_bits", "mean-loss ULPs": "reduced_ulp",
             "classifier gradient max bits": "cls_bits", "teacher gradient max bits": "teacher_bits"}
    t = Thresholds(bits=0.5, ulp=2.0)
    tolerance = getattr(t, check.reads[0])
    base = _point(**{field[check.label]: 1.0})
    # 1.0 + tolerance is exact in binary (0.5, 2.0): the boundary is not a rounding question.
    assert check.compare(base, _point(**{field[check.label]: 1.0 + tolerance}), t, KEY) is None
    worse = check.compare(base, _point(**{field[check.label]: 1.0 + tolerance + 0.25}), t, KEY)
    assert worse.outcome == "regression" and worse.gate == "accuracy"
    assert f"up by {tolerance + 0.25:g} {check.unit} (tolerance {tolerance:g})" in worse.why
    better = check.compare(base, _point(**{field[check.label]: 1.0 - tolerance - 0.25}), t, KEY)
    assert better.outcome == "improvement"


def test_count_checks_and_status():
    t = Thresholds()
    overflow, flush = G.VALUE_CHECKS[:2]
    v = overflow.compare(_point(), _point(nan=2), t, KEY, versus="torch")
    assert (v.gate, v.outcome, v.why) == ("overflow", "regression", "2 more NaN/±inf value(s) than the torch")
    assert overflow.compare(_point(nan=2), _point(), t, KEY).outcome == "improvement"
    assert flush.compare(_point(), _point(underflow=1), t, KEY).why == \
        "1 more result(s) flushed to zero than the baseline"
    assert flush.compare(_point(underflow=1), _point(), t, KEY) is None  # fewer flushes are not reported
    assert G.STATUS.compare(_point(), _point(status="error"), t, KEY).outcome == "regression"
    assert G.compare_point(_point(), _point(status="error", nan=5), t, KEY)[0].gate == "status"


def test_the_flags_are_the_flagged_settings_with_their_bounds():
    flags = {p.opts[0]: p for p in compare_cmd.params}
    for s in SETTINGS:
        if s.flag:
            assert s.flag in flags and s.flag_help in flags[s.flag].help and f"gate.{s.name}" in flags[s.flag].help
    assert [s.name for s in SETTINGS if s.flag] == ["bits", "ulp", "time_factor", "timing"]
    low = BY_NAME["time_factor"].low
    result = CliRunner().invoke(main, ["compare", "a.json", "b.json", "--time-factor", str(low - 0.5)])
    assert result.exit_code == 2 and "--time-factor" in result.output


def test_the_classifier_gradient_is_judged_only_where_both_sides_measured_it():
    """Cut Cross-Entropy's relative criterion on dL/dclassifier: a kernel right for the hidden
    states and 3 bits (8x) worse than torch for the weight fails at bits 2; a loss without the
    section (every other loss) is not judged on it."""
    (check,) = [c for c in G.VALUE_CHECKS if getattr(c, "label", "") == "classifier gradient max bits"]
    t = Thresholds(bits=2.0)
    torch_point, kernel = _point(cls_bits=1.0), _point(cls_bits=4.0)
    verdicts = G.compare_point(torch_point, kernel, t, KEY, versus="torch")
    assert [v.why for v in verdicts] == ["classifier gradient max bits up by 3 bits (tolerance 2) (vs torch)"]
    assert check.compare(_point(), _point(cls_bits=24.0), t, KEY) is None
    nan = _point(cls_bits=1.0)
    nan["backward_classifier"]["nan"] = 5
    assert [v.gate for v in G.compare_point(torch_point, nan, t, KEY)] == ["overflow"]
