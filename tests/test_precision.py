"""Precision policies (issue 15 item 6): the loss run on the dtype as given (`native`), under
`torch.autocast`, and on an explicit float32 upcast; a wider output audited in its own dtype
with the input's threshold moved to it; the report's "survives autocast" table."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import assert_one_error_line

from losscheck import precision, results, sweep
from losscheck.cli import main
from losscheck.config import config_from_dict
from losscheck.formats import counted_in, widened_threshold

CONFIG = dict(
    name="prec",
    losses=["bce", "cross_entropy"],
    implementations=["naive", "stable", "torch"],
    scales=[1, 100],
    batch_sizes=[64],
    classes=[50],
    dtypes=["float32", "bfloat16", "float16"],
    distributions=["normal", "confident_correct"],
    precision=["native", "autocast", "upcast"],
    timing=False,
)


@pytest.fixture(scope="module")
def records():
    config = config_from_dict(CONFIG, "test")
    return sweep.run(config, threads=1)


def _one(records, **key):
    (r,) = [r for r in records if all((r["options"].get("precision", "native") if k == "precision" else r[k]) == v
                                      for k, v in key.items())]
    return r


def test_policies_apply_to_half_dtypes_only(records):
    for r in records:
        policy = r["options"].get("precision", "native")
        assert policy == "native" or r["dtype"] in ("float16", "bfloat16"), r
    # 2 losses × 2 distributions × 2 scales × 3 implementations: float32 once, each half dtype thrice.
    assert len(records) == 2 * 2 * 2 * 3 * (1 + 3 + 3)
    assert all(r["status"] == "ok" for r in records), [r["message"] for r in records if r["status"] != "ok"]


def test_autocast_output_is_audited_in_float32_with_the_inputs_threshold(records):
    r = _one(records, loss="cross_entropy", impl="torch", dtype="bfloat16", precision="autocast",
             distribution="normal", scale=1)
    # On the CPU autocast runs cross_entropy in float32 and returns float32 (torch's policy).
    assert (r["output_dtype"], r["compute_dtype"]) == ("float32", "float32")
    assert r["forward"]["dtype"] == "float32"
    assert r["forward"]["threshold_bits"] == 4 + 24 - 8
    assert counted_in(r) == ("float32", 20.0)
    # torch's float32 cross entropy of the (exactly widened) bfloat16 logits: within a few float32 ULPs.
    assert r["forward"]["max_ulp"] <= 4 and r["forward"]["reduced_ulp"] <= 4
    # The gradient reaches the bfloat16 input and is audited in bfloat16 as always.
    assert "dtype" not in r["backward"] and r["backward"]["max_ulp"] <= 1
    native = _one(records, loss="cross_entropy", impl="torch", dtype="bfloat16", precision="native",
                  distribution="normal", scale=1)
    assert "output_dtype" not in native and "dtype" not in native["forward"]


def test_upcast_gives_float32_compute_and_autocast_on_bce_notes_the_cuda_refusal(records):
    up = _one(records, loss="bce", impl="torch", dtype="float16", precision="upcast", distribution="normal", scale=1)
    assert (up["output_dtype"], up["compute_dtype"]) == ("float32", "float32")
    auto = _one(records, loss="bce", impl="torch", dtype="float16", precision="autocast", distribution="normal",
                scale=1)
    assert "on CUDA, torch.autocast refuses F.binary_cross_entropy" in auto["message"]
    assert auto["output_dtype"] == "float32"


def test_the_widened_forward_is_compared_with_the_reference_rounded_to_float32():
    """A loss computed in bfloat16 and returned as float32 under the upcast policy keeps its
    bfloat16 error, now counted in float32 ULPs (about 2**16 of them per bfloat16 ULP)."""
    def coarse(x, t, reduction="mean"):
        return F.cross_entropy(x.to(torch.bfloat16), t, reduction=reduction).to(torch.float32)

    config = config_from_dict({**CONFIG, "losses": ["cross_entropy"], "dtypes": ["bfloat16"], "scales": [1],
                               "distributions": ["normal"], "precision": ["upcast"],
                               "implementations": ["torch"]}, "test")
    (case,) = list(sweep.cases(config))
    impl = sweep.Impl("coarse", "custom", coarse, "bfloat16 inside")
    (good,) = sweep.run_case(config, case, 1)
    (bad,) = sweep.run_case(config, case, 1, impls={"coarse": impl})
    assert good["forward"]["max_ulp"] <= 4
    assert 2**12 < bad["forward"]["max_ulp"] < 2**20  # bfloat16 precision in float32 ULPs: under 20 bits
    assert bad["forward"]["saturated"] == 0  # the input's threshold (4 of 8 bits) is not crossed


def test_native_still_requires_the_inputs_dtype():
    def wide(x, t, reduction="mean"):
        return F.cross_entropy(x.float(), t, reduction=reduction)

    config = config_from_dict({**CONFIG, "losses": ["cross_entropy"], "dtypes": ["bfloat16"], "scales": [1],
                               "distributions": ["normal"], "precision": ["native", "upcast"],
                               "implementations": ["torch"]}, "test")
    impl = {"wide": sweep.Impl("wide", "custom", wide, "float32 inside")}
    native, upcast = (sweep.run_case(config, c, 1, impls=impl)[0] for c in sweep.cases(config))
    assert native["status"] == "error" and "returned torch.float32, expected torch.bfloat16" in native["message"]
    assert upcast["status"] == "ok"


def test_wrap_upcasts_floating_arguments_and_the_gradient_comes_back_in_the_inputs_dtype():
    seen = {}

    def fn(x, t, reduction="mean", weight=None):
        seen.update(x=x.dtype, t=t.dtype, weight=weight.dtype)
        return F.binary_cross_entropy_with_logits(x, t, weight=weight, reduction=reduction)

    x = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    t = torch.ones(8, dtype=torch.bfloat16)
    out = precision.wrap(fn, "upcast", "cpu")(x, t, "mean", weight=torch.ones(8, dtype=torch.bfloat16))
    out.backward()
    assert seen == {"x": torch.float32, "t": torch.float32, "weight": torch.float32}
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert precision.wrap(fn, "native", "cpu") is fn
    assert widened_threshold(5.5, "float32", "float16") == 5.5 + 13


def test_an_isolated_custom_implementation_runs_under_the_policy_in_its_worker(tmp_path):
    (tmp_path / "wants32.py").write_text(textwrap.dedent("""\
        import torch
        import torch.nn.functional as F

        def ce(x, t, reduction="mean"):
            if x.dtype != torch.float32:
                raise TypeError(f"wants float32, got {x.dtype}")
            return F.cross_entropy(x, t, reduction=reduction)
        """))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: c
        losses: [cross_entropy]
        implementations: [torch]
        scales: [1]
        batch_sizes: [16]
        classes: [5]
        dtypes: [bfloat16]
        distributions: [normal]
        precision: [native, upcast]
        timing: {enabled: true, min_run_time: 0.01}
        """))
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "out"), "--no-progress",
                                       "--no-plots", "--impl", f"cross_entropy={tmp_path / 'wants32.py'}:ce"])
    assert result.exit_code == 0, result.output
    recs = [r for r in results.load(tmp_path / "out" / "c.json")["records"] if r["impl"] == "ce"]
    by = {r["options"].get("precision", "native"): r for r in recs}
    assert by["native"]["status"] == "error" and "wants float32, got torch.bfloat16" in by["native"]["message"]
    assert by["upcast"]["status"] == "ok", by["upcast"]["message"]
    assert by["upcast"]["output_dtype"] == "float32" and by["upcast"]["timing"]


def test_a_bad_policy_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nlosses: [cross_entropy]\nscales: [1]\nbatch_sizes: [8]\ndtypes: [bfloat16]\n"
                   "distributions: [normal]\nprecision: [native, fp8]\n")
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert_one_error_line(result, "precision", "fp8", "autocast")


def test_the_report_says_which_half_precision_findings_survive_autocast(records):
    from losscheck import findings as FD, report_findings as RF

    found = FD.findings(records)
    text = RF.policy_survival(records, found)
    assert text.startswith("## Precision policies")
    # torch's bce on bfloat16 probabilities clamps log at -100 whatever it computes in: the
    # saturation is in the probabilities the point gives it, so it survives.
    assert "| bce | torch | bfloat16 | saturation | survives | survives |" in text
    assert RF.policy_survival([r for r in records if not r["options"]], FD.findings(
        [r for r in records if not r["options"]])) == ""


def test_survival_matches_variants_whose_options_sort_after_precision():
    """`precision=` sits among the sorted options, before `spatial`/`targets` and not after the
    reduction: a finding of cross_entropy [spatial=4x8, targets=soft, reduction=none] under
    autocast is the same finding (it once read "gone" from a re-sorted variant)."""
    from losscheck import report_findings as RF

    def finding(variant):
        return {"loss": "cross_entropy", "variant": variant, "impl": "torch", "impl_kind": "framework",
                "dtype": "bfloat16", "device": "cpu", "kind": "saturation"}

    def record(options):
        return {"loss": "cross_entropy", "options": options, "reduction": "none", "time": None,
                "dtype": "bfloat16", "device": "cpu"}

    native = {"spatial": "4x8", "targets": "soft"}
    records = [record(native), record({**native, "precision": "autocast"})]
    found = [finding("spatial=4x8, targets=soft, reduction=none"),
             finding("precision=autocast, spatial=4x8, targets=soft, reduction=none")]
    text = RF.policy_survival(records, found)
    assert "| saturation | survives | not swept |" in text
    assert "| saturation | gone |" in RF.policy_survival(records, found[:1])
