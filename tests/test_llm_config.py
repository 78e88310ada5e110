"""The run's losses as the union of its grids' (issue 18: configs/llm.yaml sweeps cross entropy,
divergences and focal losses, each in its own `extra:` grid), `bench --loss` across grids, the
round trip of such a config through the results file, shards of it, and configs/llm.yaml itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import assert_one_error_line, bench_results

from losscheck import config as C, results, sweep
from losscheck.cli import main
from losscheck.commands import _with_flags
from losscheck.errors import LosscheckError

LLM = Path(__file__).resolve().parents[1] / "configs" / "llm.yaml"

# The main grid has bce only; the extra grids add losses of their own, with axes of their own.
UNION = {
    "name": "u", "losses": ["bce"], "implementations": ["stable", "torch"], "scales": [1], "batch_sizes": [2],
    "classes": [5], "dtypes": ["float32"], "distributions": ["normal"],
    "extra": [
        {"losses": ["kl_div", "bce"], "temperatures": [1, 0.5], "scales": [2]},
        {"losses": ["cross_entropy"], "z_loss": [0, 0.001], "dtypes": ["bfloat16"]},
    ],
}  # fmt: skip


def _cases(cfg):
    return [(c.loss, c.scale, c.dtype, dict(c.options)) for c in sweep.cases(cfg)]


def test_the_run_losses_are_every_grids_in_order_of_first_appearance():
    cfg = C.Config.from_mapping(UNION)
    assert cfg.losses == ("bce",)  # the main grid's, as written
    assert cfg.run_losses == ("bce", "kl_div", "cross_entropy")
    assert _cases(cfg) == [
        ("bce", 1.0, "float32", {}),
        ("kl_div", 2.0, "float32", {"temperature": 0.5}), ("kl_div", 2.0, "float32", {}),  # values sorted
        ("bce", 2.0, "float32", {}),
        ("cross_entropy", 1.0, "bfloat16", {}), ("cross_entropy", 1.0, "bfloat16", {"z_loss": 0.001}),
    ]  # fmt: skip
    # Every loss of the run has its implementations resolved, not only the main grid's.
    assert set(sweep.resolve(cfg)) == {"bce", "kl_div", "cross_entropy"}


def test_loss_flag_keeps_that_loss_in_every_grid_and_drops_empty_grids():
    cfg = C.Config.from_mapping(UNION)
    only = _with_flags(cfg, (), (), ("bce",))
    assert only.run_losses == ("bce",) and len(only.extra) == 1
    assert _cases(only) == [("bce", 1.0, "float32", {}), ("bce", 2.0, "float32", {})]
    # A loss only an extra grid has: that grid becomes the main one, and what it changed (the
    # scale) does not leak into the later grids, whose unset keys were the old main grid's.
    kl = _with_flags(cfg, (), (), ("kl_div",))
    assert kl.losses == ("kl_div",) and kl.extra == ()
    assert _cases(kl) == [("kl_div", 2.0, "float32", {"temperature": 0.5}), ("kl_div", 2.0, "float32", {})]
    both = _with_flags(cfg, (), (), ("kl_div", "cross_entropy"))
    assert _cases(both) == [c for c in _cases(cfg) if c[0] != "bce"]
    # The restricted config is valid input again (what the results file stores, and --resume compares).
    assert C.config_from_dict(both.as_dict(), both.source) == both
    with pytest.raises(LosscheckError, match=r"--loss focal_loss: not among the config's losses "
                                             r"\(bce, kl_div, cross_entropy\)"):  # fmt: skip
        _with_flags(cfg, (), (), ("focal_loss",))


def test_loss_flag_naming_no_grids_loss_is_a_one_line_error(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump(UNION))
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(tmp_path), "--loss", "entropy"])
    assert_one_error_line(result, "--loss entropy", "bce, kl_div, cross_entropy")


@pytest.mark.parametrize("i", [0, 1])
def test_a_bad_loss_in_an_extra_grid_names_that_grid(tmp_path, i):
    data = yaml.safe_load(yaml.safe_dump(UNION))
    data["extra"][i]["losses"] = ["kl_div", "kl_divv"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(tmp_path)])
    assert_one_error_line(result, str(path), f"key 'extra[{i}].losses'", "'kl_divv'", "did you mean 'kl_div'")


def test_an_extra_grid_may_set_the_option_axes_of_its_losses():
    with pytest.raises(C.ConfigError, match=r"key 'extra\[0\]\.temperatures': bad value -1"):
        C.Config.from_mapping({**UNION, "extra": [{"losses": ["kl_div"], "temperatures": [-1]}]})
    with pytest.raises(C.ConfigError, match=r"key 'extra\[0\]\.seed': not a grid key"):
        C.Config.from_mapping({**UNION, "extra": [{"losses": ["kl_div"], "seed": 1}]})


def test_the_union_round_trips_through_the_results_file(tmp_path):
    cfg = C.Config.from_mapping(UNION)
    stored = cfg.as_dict()
    assert stored["losses"] == ["bce"] and [e["losses"] for e in stored["extra"]] == [
        ["kl_div", "bce"], ["cross_entropy"]]  # fmt: skip
    assert C.config_from_dict(stored, cfg.source) == cfg
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump(UNION))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(out), "--no-progress", "--no-plots"])
    assert result.exit_code in (0, 1), result.output
    data = results.load(out / "u.json")
    assert C.config_from_dict(C.as_input(data["config"]), "<r>") == C.config_from_dict(UNION, "<r>")
    assert {r["loss"] for r in data["records"]} == {"bce", "kl_div", "cross_entropy"}
    assert len(data["records"]) == 2 * len(_cases(cfg))  # two implementations a point


def test_shards_of_a_union_merge_into_the_whole_run(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump(UNION))
    out = tmp_path / "out"
    run = ["bench", str(path), "--out", str(out), "--no-progress", "--no-plots", "--loss", "kl_div", "--loss",
           "cross_entropy"]  # fmt: skip
    for shard in ("1/3", "2/3", "3/3"):
        assert CliRunner().invoke(main, [*run, "--shard", shard]).exit_code in (0, 1)
    parts = sorted(out.glob("u.shard-*-of-3.json"))
    merged = results.merge([(str(p), results.load(p)) for p in parts])
    assert CliRunner().invoke(main, run).exit_code in (0, 1)
    whole = results.load(out / "u.json")

    def key(r):
        return (r["index"], r["impl"], r["loss"], r["dtype"])

    assert sorted(map(key, merged["records"])) == sorted(map(key, whole["records"]))
    assert {r["loss"] for r in whole["records"]} == {"kl_div", "cross_entropy"}


# ---- the `accumulate:` section ------------------------------------------------------------------

ACC = {"batch": 4, "time": 6, "vocab": 11, "micro_batches": 2, "masked": 1}


@pytest.mark.parametrize("section,key,fragment", [
    ({"vocab": 1}, "accumulate.vocab", "bad value 1; allowed: integers >= 2"),
    ({"micro_batches": 5, "batch": 4}, "accumulate.micro_batches", "at most the batch (4)"),
    ({"masked": 2, "micro_batches": 2}, "accumulate.masked", "0 to 1"),
    ({"scale": 0}, "accumulate.scale", "positive finite"),
    ({"dtypes": ["float8"]}, "accumulate.dtypes", "bad value 'float8'"),
    ({"vocabs": 3}, "accumulate.vocabs", "unknown key"),
    ([1], "accumulate", "expected a mapping"),
])  # fmt: skip
def test_a_bad_accumulate_section_is_a_one_line_error(tmp_path, section, key, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**UNION, "accumulate": section}))
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(tmp_path)])
    assert_one_error_line(result, str(path), f"key '{key}'", fragment)


def test_the_accumulate_section_runs_after_the_sweep_into_results_and_report(tmp_path):
    from losscheck import accumulate

    data = {**UNION, "losses": ["bce"], "extra": [], "dtypes": ["float32", "bfloat16"], "accumulate": ACC}
    cfg = C.Config.from_mapping(data)
    assert cfg.accumulate == {**ACC, "scale": 1.0, "dtypes": ["float32", "bfloat16"]}  # the config's dtypes
    assert C.config_from_dict(cfg.as_dict(), cfg.source) == cfg
    assert C.Config.from_mapping(UNION).as_dict()["accumulate"] is None
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(out), "--no-progress", "--no-plots"])
    assert result.exit_code in (0, 1), result.output
    stored = results.load(out / "u.json")["accumulate"]
    # The same numbers as the command computes for these flags (same seed, same tokens).
    direct = [accumulate.run(accumulate.Spec(4, 6, 11, 2, 1, d, 1.0, 0)) for d in ("float32", "bfloat16")]
    assert json.dumps(stored, sort_keys=True) == json.dumps(direct, sort_keys=True)  # NaN included
    by = {o["convention"]: o for o in stored[0]["outcomes"]}
    assert by["global_tokens"]["loss_bias"] == 0 and by["microbatch_mean"]["loss_bias"] is None  # 0/0
    assert math.isnan(by["microbatch_mean"]["loss"])  # a float again after loading
    report = (out / "u.md").read_text()
    assert "## Gradient accumulation" in report and "Unbiased and finite here: `global_tokens`;" in report
    assert report.count("| microbatch_mean_guarded |") == 2
    # Shards: the first runs it, merge keeps it.
    for shard in ("1/2", "2/2"):
        CliRunner().invoke(main, ["bench", str(path), "--out", str(out), "--no-progress", "--no-plots",
                                  "--shard", shard])  # fmt: skip
    parts = [out / "u.shard-1-of-2.json", out / "u.shard-2-of-2.json"]
    assert "accumulate" not in results.load(parts[1])
    assert results.merge([(str(p), results.load(p)) for p in parts])["accumulate"] == stored


def test_llm_yaml_covers_every_loss_of_issue_18_at_real_vocabularies():
    cfg = C.load_config(LLM)
    assert set(cfg.run_losses) == {"cross_entropy", "sharded_cross_entropy", "token_logprobs", "entropy", "kl_div",
                                   "js_div", "focal_loss", "softmax_focal_loss"}  # fmt: skip
    cases = list(sweep.cases(cfg))
    vocab = {c.loss: set() for c in cases}
    for c in cases:
        vocab[c.loss].add(c.classes)
        # float64 only where it tells a formula error from a cancelling element (findings.py).
        assert c.dtype in ("float32", "bfloat16") or (c.dtype == "float64" and c.classes == 32000 and c.scale == 1)
    assert {c.loss for c in cases if c.dtype == "float64"} == {"token_logprobs", "entropy", "kl_div", "js_div"}
    for loss in ("cross_entropy", "sharded_cross_entropy", "token_logprobs", "entropy", "kl_div", "js_div"):
        assert vocab[loss] == {32000, 128256, 152064}, loss
    options = {k for c in cases for k, _ in c.options}
    assert {"z_loss", "softcap", "masked_vocab", "smoothing_convention", "shards", "shard_mistake", "direction",
            "log_target", "temperature", "gamma", "alpha"} <= options  # fmt: skip
    assert max(sweep.estimate_bytes(c) for c in cases) < 64 << 20  # a few MiB a point
    assert cfg.accumulate is not None and cfg.accumulate["masked"] >= 1 and cfg.accumulate["vocab"] == 32000


_JS_ENTROPY = """
name: c
losses: [js_div, entropy]
implementations: [torch]
scales: [1]
batch_sizes: [2]
classes: [32000]
dtypes: [float32]
distributions: [normal]
timing: false
seed: 0
"""


def test_float64_grid_keeps_cancelling_gradients_of_js_and_entropy_from_being_called_formula_errors(tmp_path):
    """torch's JS and entropy gradients cancel at scale 1 (c_j ≈ Σ P c, log p_j ≈ -H): float32 loses
    over 12 bits at some elements. With float32 the widest dtype swept, the findings can only call
    that a formula error; llm.yaml's float64 grid shows the formula right, so it is a saturation."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    alone = bench_results(tmp_path / "a", _JS_ENTROPY)
    kinds = {(f["loss"], f["kind"]) for f in alone["findings"] if f["dtype"] == "float32"}
    assert {("js_div", "formula"), ("entropy", "formula")} <= kinds
    wide = bench_results(tmp_path / "b", _JS_ENTROPY + "extra:\n  - dtypes: [float64]\n")
    kinds = {(f["loss"], f["kind"]) for f in wide["findings"] if f["dtype"] == "float32"}
    assert ("js_div", "formula") not in kinds and ("entropy", "formula") not in kinds
    assert {("js_div", "saturation"), ("entropy", "saturation")} <= kinds
