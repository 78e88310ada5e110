"""report_lm: the choices of language-model training set side by side from the run's records,
on a real small sweep (Soup #719's reverse KL at temperature 0.05, token log-probabilities by
gather − logsumexp in bfloat16) and on synthetic records for the verdict's rules."""

from __future__ import annotations

import math

from helpers import bench_results

from losscheck import analysis as A, report_lm

CONFIG = """name: c
losses: [kl_div, token_logprobs]
implementations: [stable, torch]
scales: [1, 20]
batch_sizes: [4]
classes: [1000]
dtypes: [float32, bfloat16]
distributions: [normal, confident_correct]
directions: [reverse]
log_target: [false, true]
temperatures: [0.05]
timing: false
custom:
  - name: gather_logsumexp
    function: losscheck.losses.token_logprobs:gather_logsumexp
    losses: [token_logprobs]
"""


def test_the_section_names_the_formulation_the_records_favour(tmp_path):
    data = bench_results(tmp_path, CONFIG)
    text = report_lm.section(data["records"])
    # The report passes its labelled records ("gather_logsumexp (custom)", "kl_div [direction=…]").
    assert report_lm.section(A.labelled(data["records"])) == text
    lines = text.splitlines()
    kl = [line for line in lines if line.startswith("- Reverse KL")]
    # Soup #719: the student's probabilities as kl_div's target give NaN gradients at T = 0.05;
    # log_target does not. In both dtypes, measured.
    assert len(kl) == 2 and all("NaN/inf elements" in line.split("log_target=True:")[0] for line in kl)
    assert all("→ **prefer log_target=True** (probabilities as target worse at 4 of 4 points" in line for line in kl)
    tok = {line.split(" — **")[1].split("**")[0]: line for line in lines if line.startswith("- Token log-prob")}
    # float32: x_t − logsumexp(x) loses more at a confident point; bfloat16: both lose every bit of a
    # confident token's log-probability (−2e−6 returned as 0), and the dtype line says why: use float32.
    assert "→ **prefer log_softmax + gather** (x_t − logsumexp(x) worse at" in tok["float32"]
    assert tok["bfloat16"].endswith("→ **the same here**.")
    dtype_line = next(line for line in lines if line.startswith("- Dtype, `torch` token_logprobs"))
    assert "float32 up to" in dtype_line and "bfloat16 up to" in dtype_line


def _rec(impl, options, dtype="float32", nan=0, bits=0.0, nats=None, scale=1.0):
    fwd = {"nan": 0, "inf": 0, "max_bits": bits}
    if nats is not None:
        fwd["abs_nats"] = {"max": nats}
    return {"status": "ok", "loss": "cross_entropy", "impl": impl, "dtype": dtype, "device": "cpu", "batch": 2,
            "classes": 5, "scale": scale, "distribution": "normal", "reduction": "mean", "options": options,
            "forward": fwd, "backward": {"nan": nan, "inf": 0, "max_bits": 0.0}}  # fmt: skip


def test_the_verdict_needs_a_difference_the_records_show():
    cap = {"softcap": 30.0}
    same = [_rec("torch", cap, bits=3.0), _rec("stable", cap, bits=2.5)]
    [line] = report_lm.lines(same)
    assert line.startswith("- Softcap") and line.endswith("→ **the same here**.")  # under a bit apart
    worse = [_rec("torch", cap, bits=9.0), _rec("stable", cap, bits=0.5)]
    assert "→ **prefer stable** (the expression worse at 1 of 1 points" in report_lm.lines(worse)[0]
    nan = [_rec("torch", cap, nan=3), _rec("stable", cap, bits=20.0)]  # NaN outranks bits
    assert "→ **prefer stable**" in report_lm.lines(nan)[0] and "3 NaN/inf elements" in report_lm.lines(nan)[0]
    # Worse at one point each: neither.
    mixed = worse + [_rec("torch", cap, bits=0.0, scale=2.0), _rec("stable", cap, bits=5.0, scale=2.0)]
    assert "→ **neither** (the expression worse at 1, stable at 1 of 2 points)" in report_lm.lines(mixed)[0]
    # Only one side measured, or other options than the pair's: no line.
    assert report_lm.lines([_rec("torch", cap)]) == []
    assert report_lm.lines([_rec("torch", {"softcap": 10.0}), _rec("stable", {"softcap": 10.0})]) == []
    assert report_lm.section([]) == ""


def test_the_dtype_line_gives_the_finite_error_in_nats_and_counts_the_broken_points():
    """A NaN/inf value has an infinite error in nats: 'up to inf nats' would hide the error of
    every finite point, so the line gives the finite maximum and how many points had none."""
    recs = [
        {**_rec("torch", {}, nats=2e-8), "loss": "js_div"},
        {**_rec("torch", {}, nats=math.inf, scale=20.0), "loss": "js_div"},
        {**_rec("torch", {}, dtype="bfloat16", nats=1.7e-3), "loss": "js_div"},
    ]
    [line] = [x for x in report_lm.lines(recs) if x.startswith("- Dtype")]
    assert "float32 up to 2e-08 nats, NaN/inf at 1 of 2 points" in line and "bfloat16 up to 0.0017 nats" in line
    assert "inf nats" not in line
