"""`losscheck probe`: the exact inputs of a failed training step, audited with bench's numbers.

Every number is checked against `losses.reference` (and `sweep.evaluate`) called directly on
the same tensors; the inputs are inline lists and files written in tmp_path (.pt, .npy, .npz).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from losscheck import probing as P
from losscheck import reference as R
from losscheck import sweep
from losscheck.cli import main
from losscheck.config import parse_config
from losscheck.losses import LOSSES, implementation, reference
from losscheck.probing.evaluate import probed_families
from losscheck.metrics import int_or_inf, ulp_distance
from losscheck.probe_command import probe_command
from losscheck.results import _encode
from tests.helpers import assert_one_error_line

main.add_command(probe_command)  # what cli.py does; idempotent

INF = math.inf


def probe_json(runner, *args) -> dict:
    result = runner.invoke(main, ["probe", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    # Strict JSON: a NaN or Infinity literal would make this raise.
    return json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def num(x):
    """A JSON number or one of the strings "inf", "-inf", "nan" -> float."""
    return float(x) if x is not None else None


def by_impl(data: dict) -> dict:
    return {r["impl"]: r for r in data["results"]}


def same_bits(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- the example of the issue: bce_with_logits at +inf ----------------------------------------------

def test_bce_with_logits_inf_logit_reference_is_the_limit(runner):
    data = probe_json(runner, "bce_with_logits", "--input", "[inf, 1.0]", "--target", "[1, 0]",
                      "--dtype", "float32")
    x = torch.tensor([INF, 1.0])
    y = torch.tensor([1.0, 0.0])
    ref = reference(LOSSES["bce_with_logits"], x, y, {}, "mean")
    assert data["loss"] == "bce_with_logits" and data["dtype"] == "float32" and data["reduction"] == "mean"
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    assert data["reference"]["value"] == ref.value
    assert data["reference"]["undefined"] is None
    # Element 0's reference is the limit, 0.
    assert data["reference"]["limits"]["count"] == 1
    assert data["reference"]["limits"]["examples"] == [{"index": [0], "reference": 0.0}]
    results = by_impl(data)
    # Every family available here (the `jax` and `torch_compile` ones too), in report order.
    assert list(results) == list(probed_families()) and list(results)[:3] == ["naive", "stable", "torch"]
    naive, stable, torch_ = results["naive"], results["stable"], results["torch"]
    # naive returns NaN where the limit is finite: its worst element is [0].
    # bits = min(log2(1 + ulp), p): a NaN leaves none of float32's 24 bits, never more.
    assert naive["forward"]["worst"] == {"index": [0], "value": "nan", "reference": 0.0, "ulp": "inf", "bits": 24.0}
    assert naive["forward"]["reduced_bits"] == 24.0
    assert naive["forward"]["nan"] == 1 and naive["forward"]["reduced_ulp"] == "inf"
    assert naive["forward"]["value"] == "nan"
    # stable returns the limit and the correctly rounded mean.
    assert stable["forward"]["reduced_ulp"] == 0 and stable["forward"]["max_ulp"] == 0
    assert num(stable["forward"]["value"]) == float(ref.reduced)
    assert stable["backward"]["max_ulp"] == 0 and stable["backward"]["nan"] == 0
    # torch (max(x,0) - x*y + log1p(exp(-|x|)) = inf - inf) returns NaN at element 0 too.
    assert torch_["forward"]["value"] == "nan"
    assert torch_["forward"]["worst"]["index"] == [0] and torch_["forward"]["worst"]["value"] == "nan"
    assert torch_["kind"] == "framework" and torch_["status"] == "ok"
    assert any("limit" in n and "naive returned nan" in n and "stable returned 0.0 (the limit)" in n
               for n in data["notes"]), data["notes"]


def test_table_output(runner):
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[inf, 1.0]", "--target", "[1, 0]",
                                  "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("impl", "loss", "reference", "ULP", "bits", "fwd nan/inf", "grad max bits", "grad nan/inf",
                   "worst element"):
        assert header in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and
             line.split()[0] in ("naive", "stable", "torch")}
    assert set(lines) == {"naive", "stable", "torch"}
    assert "[0]: nan vs 0.0" in lines["naive"]
    assert "all exact" in lines["stable"]
    assert "0.6566308" in lines["stable"]
    assert "limit" in out and "naive returned nan" in out


# ---- cross entropy: +inf logits, undefined means ------------------------------------------------------

def test_cross_entropy_plus_inf_logit(runner):
    # Row 0: the target's logit is +inf (limit 0); row 1: finite.
    data = probe_json(runner, "cross_entropy", "--input", "[[inf, 1, 2], [0.5, 1, 2]]", "--target", "[0, 1]")
    x = torch.tensor([[INF, 1, 2], [0.5, 1, 2]], dtype=torch.float32)
    t = torch.tensor([0, 1])
    ref = reference(LOSSES["cross_entropy"], x, t, {}, "mean")
    assert float(ref.loss[0]) == 0.0
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    r = by_impl(data)
    # naive: exp(inf)/sum = inf/inf = NaN where the limit is 0.
    assert r["naive"]["forward"]["worst"]["index"] == [0]
    assert r["naive"]["forward"]["worst"]["value"] == "nan"
    assert r["naive"]["forward"]["nan"] == 1
    assert r["stable"]["forward"]["max_ulp"] == 0 and r["stable"]["forward"]["reduced_ulp"] == 0
    # What torch does here (log_softmax: inf - logsumexp = inf - inf): NaN where the limit is 0.
    torch_none = torch.nn.functional.cross_entropy(x, t, reduction="none")
    assert math.isnan(float(torch_none[0]))
    assert r["torch"]["returned"]["nan"] == 1 and r["torch"]["forward"]["nan"] == 1
    assert r["torch"]["forward"]["value"] == "nan"
    assert any("torch returned nan" in n for n in data["notes"])


def test_cross_entropy_several_plus_inf_logits_have_no_limit(runner):
    data = probe_json(runner, "cross_entropy", "--input", "[[inf, inf, 2], [0, 1, 2]]", "--target", "[0, 1]")
    assert data["reference"]["nan"] == 1 and data["reference"]["no_limit"] == 1
    assert data["reference"]["forward"] == "nan"
    assert "without a limit" in data["reference"]["undefined"]
    assert any("no limit" in n for n in data["notes"])


def test_cross_entropy_every_target_ignored_is_undefined(runner):
    data = probe_json(runner, "cross_entropy", "--input", "[[1, 2, 3], [0, 1, 2]]", "--target", "[-100, -100]",
                      "--ignore-index", "-100")
    x = torch.tensor([[1.0, 2, 3], [0, 1, 2]])
    t = torch.tensor([-100, -100])
    ref = reference(LOSSES["cross_entropy"], x, t, {"ignore_index": -100}, "mean")
    assert isinstance(ref.undefined, str)
    assert data["reference"]["undefined"] == ref.undefined
    assert num(data["reference"]["forward"]) == 0.0
    r = by_impl(data)
    # What torch actually returns for a mean over no target: NaN (0/0), with a zero gradient.
    actual = float(torch.nn.functional.cross_entropy(x, t, ignore_index=-100))
    assert math.isnan(actual)
    assert r["torch"]["forward"]["value"] == "nan"
    assert r["torch"]["backward"]["nan"] == 0 and r["torch"]["backward"]["max_ulp"] == 0
    assert r["naive"]["forward"]["value"] == "nan"
    assert num(r["stable"]["forward"]["value"]) == 0.0 and r["stable"]["forward"]["reduced_ulp"] == 0
    note = next(n for n in data["notes"] if "0/0" in n)
    assert "torch returned nan with gradient 0" in note and "stable returned 0.0 with gradient 0" in note
    assert data["target"]["ignored"] == 2


def test_undefined_in_table(runner):
    result = runner.invoke(main, ["probe", "cross_entropy", "--input", "[[1, 2, 3], [0, 1, 2]]", "--target",
                                  "[-100, -100]", "--ignore-index", "-100"])
    assert result.exit_code == 0
    assert "undefined" in result.stdout and "0/0" in result.stdout
    assert "torch returned nan" in result.stdout


# ---- every loss, options, reductions -------------------------------------------------------------------

def test_sequence_cross_entropy_padding(runner):
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)) * 30
    t = torch.tensor([[1, 4, -100], [0, -100, -100]])
    data = probe_json(runner, "sequence_cross_entropy", "--input", json.dumps(x.tolist()), "--target",
                      json.dumps(t.tolist()), "--dtype", "float16")
    x16 = R.round_to(x.double().numpy(), torch.float16)
    ref = reference(LOSSES["sequence_cross_entropy"], x16, t, {"ignore_index": -100}, "mean")
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    assert data["options"]["ignore_index"] == -100
    assert data["target"]["ignored"] == 3 and data["target"]["kept"] == 3
    # The worst element is indexed (b, t).
    for r in data["results"]:
        assert len(r["forward"]["worst"]["index"]) == 2


def test_bce_npy_sum(runner, tmp_path):
    p = np.array([0.0, 1e-8, 0.3, 0.999, 1.0], dtype=np.float32)
    y = np.array([0, 1, 1, 0, 1], dtype=np.int64)
    np.save(tmp_path / "probs.npy", p)
    np.save(tmp_path / "y.npy", y)
    data = probe_json(runner, "bce", "--input", str(tmp_path / "probs.npy"), "--target", str(tmp_path / "y.npy"),
                      "--reduction", "sum")
    assert data["dtype"] == "float32"  # the file's dtype
    ref = reference(LOSSES["bce"], torch.from_numpy(p), torch.from_numpy(y.astype(np.float32)), {}, "sum")
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    assert data["reduction"] == "sum"
    assert data["input"]["changed"] == 0


def test_reduction_none(runner):
    data = probe_json(runner, "bce_with_logits", "--input", "[100, -3, 0.5]", "--target", "[0, 0, 1]",
                      "--reduction", "none")
    assert data["reference"]["forward"] is None
    for r in data["results"]:
        assert r["forward"]["reduced_ulp"] is None and r["forward"]["value"] is None
        assert r["forward"]["worst"] is not None


def test_options_weight_pos_weight_label_smoothing(runner, tmp_path):
    w = torch.tensor([0.5, 2.0, 1.0])
    torch.save(w, tmp_path / "w.pt")
    data = probe_json(runner, "cross_entropy", "--input", "[[1, 2, 30], [0, -40, 2], [3, 3, 3]]",
                      "--target", "[2, 1, 0]", "--weight", str(tmp_path / "w.pt"), "--label-smoothing", "0.1")
    x = torch.tensor([[1.0, 2, 30], [0, -40, 2], [3, 3, 3]])
    ref = reference(LOSSES["cross_entropy"], x, torch.tensor([2, 1, 0]), {"weight": w, "label_smoothing": 0.1})
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    assert data["options"]["weight"]["shape"] == [3] and data["options"]["label_smoothing"] == 0.1

    data = probe_json(runner, "bce_with_logits", "--input", "[20, -20, 0.5]", "--target", "[0, 1, 1]",
                      "--weight", "[1, 0.5, 3]", "--pos-weight", "2.5", "--dtype", "bfloat16")
    x = torch.tensor([20.0, -20, 0.5], dtype=torch.bfloat16)
    opts = {"weight": torch.tensor([1, 0.5, 3], dtype=torch.bfloat16),
            "pos_weight": torch.tensor([2.5], dtype=torch.bfloat16)}
    ref = reference(LOSSES["bce_with_logits"], x, torch.tensor([0.0, 1, 1], dtype=torch.bfloat16), opts)
    assert num(data["reference"]["forward"]) == float(ref.reduced)
    assert data["options"]["pos_weight"] == 2.5


def test_soft_targets(runner):
    q = [[0.9, 0.05, 0.05], [0.2, 0.3, 0.5]]
    data = probe_json(runner, "cross_entropy", "--input", "[[1, 2, 3], [50, 0, -50]]", "--target", json.dumps(q))
    assert data["target"]["kind"] == "soft" and data["options"]["targets"] == "soft"
    x = torch.tensor([[1.0, 2, 3], [50, 0, -50]])
    qt = R.round_to(np.array(q), torch.float32)
    ref = reference(LOSSES["cross_entropy"], x, qt, {}, "mean")
    assert num(data["reference"]["forward"]) == float(ref.reduced)


def test_binary_2d_input_is_flattened_with_indices_in_its_shape(runner):
    data = probe_json(runner, "bce_with_logits", "--input", "[[1, 2], [inf, 3]]", "--target", "[[0, 1], [1, 1]]")
    assert data["reference"]["limits"]["examples"][0]["index"] == [1, 0]
    assert by_impl(data)["naive"]["forward"]["worst"]["index"] == [1, 0]
    assert any("flattened" in n for n in data["notes"])


# ---- files ------------------------------------------------------------------------------------------------

def test_pt_tensor_dict_and_key(runner, tmp_path):
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]], dtype=torch.float16)
    t = torch.tensor([2, 0])
    torch.save(x, tmp_path / "x.pt")
    torch.save({"labels": t}, tmp_path / "one.pt")
    torch.save({"logits": x, "labels": t, "step": 3}, tmp_path / "both.pt")
    ref = reference(LOSSES["cross_entropy"], x, t, {}, "mean")
    for inp, tgt in ((tmp_path / "x.pt", tmp_path / "one.pt"),
                     (f"{tmp_path / 'both.pt'}:logits", f"{tmp_path / 'both.pt'}:labels")):
        data = probe_json(runner, "cross_entropy", "--input", str(inp), "--target", str(tgt))
        assert data["dtype"] == "float16"  # the file's dtype by default
        assert num(data["reference"]["forward"]) == float(ref.reduced)


def test_npz_only_array_and_key(runner, tmp_path):
    x = np.array([[0.5, -1.0], [3.0, 2.0]])
    np.savez(tmp_path / "one.npz", x)
    np.savez(tmp_path / "both.npz", logits=x, labels=np.array([1, 0]))
    a = probe_json(runner, "cross_entropy", "--input", str(tmp_path / "one.npz"),
                   "--target", f"{tmp_path / 'both.npz'}:labels")
    b = probe_json(runner, "cross_entropy", "--input", f"{tmp_path / 'both.npz'}:logits",
                   "--target", "[1, 0]", "--dtype", "float64")
    assert a["dtype"] == "float64" and b["dtype"] == "float64"
    ref = reference(LOSSES["cross_entropy"], torch.from_numpy(x), torch.tensor([1, 0]), {}, "mean")
    assert num(a["reference"]["forward"]) == num(b["reference"]["forward"]) == float(ref.reduced)


def test_conversion_to_bfloat16_is_reported(runner, tmp_path):
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)) * 10
    t = torch.tensor([0, 3, 6, 2])
    torch.save(x, tmp_path / "logits.pt")
    torch.save(t, tmp_path / "labels.pt")
    data = probe_json(runner, "cross_entropy", "--input", str(tmp_path / "logits.pt"),
                      "--target", str(tmp_path / "labels.pt"), "--dtype", "bfloat16")
    xb = x.to(torch.bfloat16)
    changed = int((xb.double() != x.double()).sum())
    assert changed > 0
    assert data["input"]["changed"] == changed and data["input"]["from_dtype"] == "float32"
    assert any("bfloat16 changed" in n for n in data["notes"])
    # The reference is computed from the converted values.
    ref = reference(LOSSES["cross_entropy"], xb, t, {}, "mean")
    assert num(data["reference"]["forward"]) == float(ref.reduced)


def test_default_dtype(runner, tmp_path):
    np.save(tmp_path / "ints.npy", np.array([3, -2, 0]))
    assert probe_json(runner, "bce_with_logits", "--input", str(tmp_path / "ints.npy"),
                      "--target", "[1, 0, 1]")["dtype"] == "float32"
    assert probe_json(runner, "bce_with_logits", "--input", "[1.5, 2]", "--target", "[1, 0]")["dtype"] == "float32"
    torch.save(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), tmp_path / "b.pt")
    assert probe_json(runner, "bce_with_logits", "--input", str(tmp_path / "b.pt"),
                      "--target", "[1, 0]")["dtype"] == "bfloat16"


def test_conversion_in_blocks_matches_one_rounding(monkeypatch, tmp_path):
    """Blocks of a few values (as for a huge file): the same values as one correct rounding."""
    monkeypatch.setattr(P, "BLOCK", 7)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 9)) * 1e3
    x[1, 2], x[3, 4] = 1e6, np.nan  # 1e6 overflows float16
    np.save(tmp_path / "x.npy", x)
    loaded = P.load_array(str(tmp_path / "x.npy"))
    assert isinstance(loaded.data, np.memmap)  # not read into memory
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out, conv = P.convert(loaded, dtype)
        want = R.round_to(x, dtype)
        assert torch.equal(out.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                           want.view(torch.int16 if dtype.itemsize == 2 else torch.int32))
        back = want.double().numpy()
        assert conv.changed == int((~((back == x) | (np.isnan(back) & np.isnan(x)))).sum())
    _, conv = P.convert(loaded, torch.float16)
    assert conv.overflowed == 1
    # A float32 tensor converted to bfloat16 in blocks equals tensor.to(bfloat16).
    t = torch.from_numpy(rng.normal(size=(3, 11)).astype(np.float32))
    out, _ = P.convert(P.Loaded("t", t, "tensor"), torch.bfloat16)
    assert torch.equal(out.view(torch.int16), t.to(torch.bfloat16).view(torch.int16))
    # The dtype under test already: the tensor itself, no copy.
    same, conv = P.convert(P.Loaded("t", t, "tensor"), torch.float32)
    assert same.data_ptr() == t.data_ptr() and conv.changed == 0


# ---- custom implementations -------------------------------------------------------------------------

MY_IMPL = '''
import numpy as np
import torch.nn.functional as F


def my_bce(x, y, reduction="mean", weight=None, pos_weight=None):
    return F.binary_cross_entropy_with_logits(x, y, reduction=reduction, weight=weight, pos_weight=pos_weight)


def np_bce(x, y, reduction="mean", **options):
    loss = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean(dtype=x.dtype)
'''


def test_custom_impls(runner, tmp_path):
    path = tmp_path / "my_losses.py"
    path.write_text(MY_IMPL)
    data = probe_json(runner, "bce_with_logits", "--input", "[3, -2, 0.25]", "--target", "[1, 0, 0]",
                      "--impl", f"{path}:my_bce", "--numpy-impl", f"{path}:np_bce")
    r = by_impl(data)
    assert list(r) == [*probed_families(), "my_bce", "np_bce"]
    assert r["my_bce"]["kind"] == "custom" and r["my_bce"]["status"] == "ok"
    # The same function as `torch`: the same numbers.
    assert r["my_bce"]["forward"]["value"] == r["torch"]["forward"]["value"]
    assert r["my_bce"]["backward"] == r["torch"]["backward"]
    # A numpy implementation without a gradient: the forward only.
    assert r["np_bce"]["backward"] is None and "forward only" in r["np_bce"]["message"]
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[3, -2]", "--target", "[1, 0]",
                                  "--impl", f"{path}:my_bce"])
    assert "my_bce (custom)" in result.stdout


# ---- bench's numbers, exactly ---------------------------------------------------------------------

BENCH = """\
name: same
losses: [{loss}]
scales: [30]
batch_sizes: [48]
classes: [6]
dtypes: [{dtype}]
distributions: [normal]
timing: false
{extra}
"""


@pytest.mark.parametrize("loss_name, dtype, extra, flags", [
    ("cross_entropy", "float16", "weights: [random]\nlabel_smoothing: [0.1]\nignored: [0.25]",
     ["--label-smoothing", "0.1", "--ignore-index", "-100"]),
    ("bce_with_logits", "bfloat16", "weights: [random]\npos_weights: [3.0]", ["--pos-weight", "3.0"]),
    ("bce", "float32", "reductions: [sum]", ["--reduction", "sum"]),
])
def test_numbers_equal_bench(tmp_path, loss_name, dtype, extra, flags):
    config = parse_config(BENCH.format(loss=loss_name, dtype=dtype, extra=extra), "same.yaml")
    (case,) = list(sweep.cases(config))
    loss = LOSSES[loss_name]
    data = sweep.point_data(loss, case, config.seed)
    ref = reference(loss, data.inp, data.target, data.options, case.reduction)
    bench = [sweep.evaluate(config, case, loss, loss.implementations[i], data, ref)
             for i in ("naive", "stable", "torch")]
    torch.save(data.inp, tmp_path / "x.pt")
    torch.save(data.target, tmp_path / "t.pt")
    kwargs = {}
    if "weight" in data.options:
        torch.save(data.options["weight"], tmp_path / "w.pt")
        kwargs["weight"] = str(tmp_path / "w.pt")
    it = iter(flags)
    for flag in it:
        kwargs[flag[2:].replace("-", "_")] = next(it)
    result = P.run_probe(loss_name, str(tmp_path / "x.pt"), str(tmp_path / "t.pt"), **kwargs)
    assert result.dtype == dtype and result.reduction == case.reduction
    assert result.input.changed == 0
    for mine, theirs in zip(result.records, bench):
        assert mine["impl"] == theirs["impl"]
        assert _encode(mine["forward"]) == _encode(theirs["forward"])
        assert _encode(mine["backward"]) == _encode(theirs["backward"])
    # And the JSON carries those numbers.
    out = json.loads(P.to_json(result))
    for r, theirs in zip(out["results"], bench):
        for k in ("reduced_ulp", "max_bits", "nan", "inf", "value"):
            assert r["forward"][k] == _encode(theirs["forward"][k])
        assert r["backward"]["max_bits"] == _encode(theirs["backward"]["max_bits"])


def test_worst_element_is_the_largest_ulp_distance():
    x = torch.tensor([[30.0, -30, 0], [1, 2, 3], [60, 0, -60], [5, 5, 5]], dtype=torch.float16)
    t = torch.tensor([1, 0, 2, 1])
    result = P.run_probe("cross_entropy", x, t)
    ref = reference(LOSSES["cross_entropy"], x, t, {}, "mean")
    for r in result.results:
        y = implementation(LOSSES["cross_entropy"], r["impl"]).fn(x, t, "none")
        d = ulp_distance(y, ref.loss)
        w = r["forward"]["worst"]
        assert w["index"] == [int(torch.argmax(d))]
        assert w["ulp"] == int_or_inf(float(d.max()))
        assert same_bits(w["value"], float(y[w["index"][0]]))
        assert w["reference"] == float(ref.loss[w["index"][0]])


# ---- bad inputs: one line, exit 2 -------------------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["nope", "--input", "[1]", "--target", "[1]"], ["unknown loss 'nope'", "bce_with_logits"]),
    (["bce_with_logits", "--input", "[1, 2", "--target", "[1, 0]"], ["--input", "cannot read"]),
    (["bce_with_logits", "--input", "[1, 'a']", "--target", "[1, 0]"], ["--input"]),
    (["bce_with_logits", "--input", "[[1, 2], [3]]", "--target", "[1, 0]"], ["ragged"]),
    (["bce_with_logits", "--input", "[1, 2, 3]", "--target", "[1, 0]"], ["--target", "does not match"]),
    # Soft binary targets are measured (tests/test_soft_binary.py), targets beyond [0, 1] refused;
    # probabilities beyond [0, 1] are measured as out of domain (tests/test_out_of_domain.py).
    (["bce_with_logits", "--input", "[1, 2]", "--target", "[1, 2]"], ["targets in [0, 1]", "[1]"]),
    (["bce_with_logits", "--input", "[1, 2]", "--target", "[1, nan]"], ["targets in [0, 1]", "[1]"]),
    (["cross_entropy", "--input", "[[1, 2], [3, 4]]", "--target", "[0, 2]"], ["out of range [0, 2)"]),
    (["cross_entropy", "--input", "[[1, 2], [3, 4]]", "--target", "[0, -100]"], ["--ignore-index -100"]),
    (["cross_entropy", "--input", "[[1, 2], [3, 4]]", "--target", "[0, 1.5]"], ["integers"]),
    (["cross_entropy", "--input", "[1, 2]", "--target", "[0]"], ["(N, C)"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[0]", "--pos-weight", "2"],
     ["cross_entropy does not support --pos-weight", "--weight", "--label-smoothing", "--ignore-index"]),
    (["bce", "--input", "[0.5]", "--target", "[1]", "--label-smoothing", "0.1"],
     ["bce does not support --label-smoothing", "--pos-weight"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--ignore-index", "-100"],
     ["does not support --ignore-index"]),
    (["sequence_cross_entropy", "--input", "[[[1, 2]]]", "--target", "[[0]]", "--pos-weight", "2"],
     ["does not support --pos-weight"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[0]", "--label-smoothing", "2"], ["[0, 1]"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--pos-weight", "inf"], ["finite"]),
    (["bce_with_logits", "--input", "[[1, 2]]", "--target", "[[1, 0]]", "--pos-weight", "[1, 2, 3]"],
     ["--pos-weight", "one per class", "(2,)"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--dtype", "float8"], ["--dtype", "bfloat16"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--reduction", "avg"], ["--reduction"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--device", "tpu"], ["--device"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[0]", "--weight", "[1, 2, 3]"], ["--weight", "(2,)"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--impl", "nomodule_xyz:fn"], ["nomodule_xyz"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--impl", "nocolon"], ["--impl"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[[0.5, 0.5]]", "--ignore-index", "-100"],
     ["--ignore-index", "soft targets"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[[0, 1]]"], ["soft targets", "int64"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[[0.5, -0.5]]"], ["soft targets", ">= 0"]),
    (["sequence_cross_entropy", "--input", "[[1, 2]]", "--target", "[0]"], ["(B, T, V)"]),
    (["sequence_cross_entropy", "--input", "[[[1, 2]]]", "--target", "[[[0.5, 0.5]]]"], ["cross_entropy"]),
    (["cross_entropy", "--input", "[[1, 2]]", "--target", "[0]", "--ignore-index", "x"], ["not an integer"]),
    (["bce_with_logits", "--input", "[1]", "--target", "[1]", "--weight", "[-1]"], ["--weight", ">= 0"]),
    (["bce_with_logits", "--input", "missing.pt", "--target", "[1]"], ["missing.pt", "not found"]),
    (["bce_with_logits", "--input", "x.npy:key", "--target", "[1]"], ["not found"]),
    (["bce_with_logits", "--input", "logits.txt", "--target", "[1]"], ["--input", ".npy"]),
])
def test_bad_inputs(runner, args, fragments):
    assert_one_error_line(runner.invoke(main, ["probe", *args]), *fragments)


def test_bad_files(runner, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    np.savez(tmp_path / "two.npz", a=np.ones(2), b=np.zeros(2))
    torch.save({"a": torch.ones(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    cases = [
        (str(tmp_path / "garbage.pt"), ["garbage.pt", "cannot read"]),
        (str(tmp_path / "garbage.npy"), ["garbage.npy", "cannot read"]),
        (str(tmp_path / "obj.npy"), ["obj.npy"]),
        (str(tmp_path / "two.npz"), ["holds 2 arrays", ":KEY"]),
        (f"{tmp_path / 'two.npz'}:c", ["no array named 'c'"]),
        (str(tmp_path / "two.pt"), ["holds 2 tensors", ":KEY"]),
        (f"{tmp_path / 'two.pt'}:c", ["no entry named 'c'"]),
        (str(tmp_path / "list.pt"), ["list"]),
    ]
    for spec, fragments in cases:
        result = runner.invoke(main, ["probe", "bce_with_logits", "--input", spec, "--target", "[1, 0]"])
        assert_one_error_line(result, *fragments)
    # The target: a dict key that is not there.
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[1, 2]",
                                  "--target", f"{tmp_path / 'two.pt'}:zz"])
    assert_one_error_line(result, "no entry named 'zz'")


def test_bad_custom_file(runner, tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[1]", "--target", "[1]",
                                  "--impl", f"{tmp_path / 'broken.py'}:fn"])
    assert_one_error_line(result, "boom")


def test_unavailable_device(runner):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[1]", "--target", "[1]",
                                  "--device", "cuda"])
    assert_one_error_line(result, "--device", "CUDA is not available")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the probe's CUDA run is untested")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probe_on_cuda_has_the_cpu_reference(runner, dtype):
    # The same tensor probed on each device: the reference is device-independent (the CUDA
    # references are the CPU's, bit for bit: float64's double-double on the GPU against the
    # CPU's long double); the built-ins run on the GPU.
    args = ["cross_entropy", "--input", json.dumps([[1.0, 2.0, 30.0], [0.5, -1.0, 100.0], [-3.0, 7.0, 0.25]]),
            "--target", "[0, 2, 1]", "--dtype", dtype]
    cpu, cuda = probe_json(runner, *args), probe_json(runner, *args, "--device", "cuda")
    assert cpu["device"] == "cpu" and cuda["device"] == "cuda"
    assert cuda["reference"] == cpu["reference"]
    assert {r["impl"] for r in cuda["results"]} == {r["impl"] for r in cpu["results"]}
    assert all(r["status"] == "ok" for r in cuda["results"] if r["impl"] in ("naive", "stable", "torch"))


def test_memory_refusal(runner, monkeypatch):
    monkeypatch.setenv("LOSSCHECK_MEMORY_LIMIT", "100")
    result = runner.invoke(main, ["probe", "cross_entropy", "--input", json.dumps([[0.5] * 10] * 4),
                                  "--target", "[0, 1, 2, 3]"])
    assert_one_error_line(result, "too large to probe here")


def test_scalar_and_nan_inputs(runner):
    data = probe_json(runner, "bce_with_logits", "--input", "3.0", "--target", "1")
    assert data["input"]["shape"] == [] and by_impl(data)["stable"]["forward"]["n"] == 1
    data = probe_json(runner, "bce_with_logits", "--input", "[nan, 1, 2]", "--target", "[1, 0, 1]")
    assert data["reference"]["forward"] == "nan" and "NaN input" in data["reference"]["undefined"]
    assert any("upstream of the loss" in n for n in data["notes"])


def test_npy_key_is_refused(runner, tmp_path):
    np.save(tmp_path / "x.npy", np.ones(2))
    result = runner.invoke(main, ["probe", "bce_with_logits", "--input", f"{tmp_path / 'x.npy'}:k",
                                  "--target", "[1, 0]"])
    assert_one_error_line(result, "holds one array")


def test_inline_parsing():
    assert P.parse_inline("[inf, -inf, nan, +inf, 1e3, -2]", "x").tolist()[:2] == [INF, -INF]
    a = P.parse_inline("[[1, 2], [3, 4]]", "x")
    assert a.dtype == np.int64 and a.shape == (2, 2)
    assert P.parse_inline("[Infinity, NaN]", "x").dtype == np.float64
    with pytest.raises(P.ProbeError):
        P.parse_inline("[]", "x")
    with pytest.raises(P.ProbeError):
        P.parse_inline("[true]", "x")


def test_help(runner):
    result = runner.invoke(main, ["probe", "--help"])
    assert result.exit_code == 0
    for flag in ("--input", "--target", "--dtype", "--device", "--weight", "--pos-weight", "--label-smoothing",
                 "--ignore-index", "--reduction", "--impl", "--numpy-impl", "--json"):
        assert flag in result.stdout


# ---- findings: bench's kinds for the probe's input -----------------------------------------------------

def kinds_of(data: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in data["findings"]:
        out.setdefault(f["impl"], set()).add(f["kind"])
    return out


def test_probe_names_a_reduction_that_alone_is_wrong(runner, tmp_path):
    # A float16 mean whose sum passes 65504: every element of torch within a few ULPs, the
    # gradient right, the mean inf. Before, probe said nothing about it.
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(30000, 10, generator=g), tmp_path / "x.pt")
    torch.save(torch.randint(0, 10, (30000,), generator=g), tmp_path / "t.pt")
    args = ["cross_entropy", "--input", str(tmp_path / "x.pt"), "--target", str(tmp_path / "t.pt"),
            "--dtype", "float16"]
    data = probe_json(runner, *args)
    t = by_impl(data)["torch"]
    assert t["forward"]["max_ulp"] <= 4 and t["forward"]["value"] == "inf"
    assert kinds_of(data).get("torch") == {"reduction"} and "stable" not in kinds_of(data)
    [f] = [f for f in data["findings"] if f["impl"] == "torch"]
    assert f["evidence"]["returned"] == ["inf"] and "every element within tolerance" in f["message"]
    assert "scale" not in f["message"]  # a probe has no sweep scale
    table = runner.invoke(main, ["probe", *args]).stdout
    assert f"- reduction: {f['message']}" in table


def test_probe_findings_limit_undefined_and_none(runner):
    data = probe_json(runner, "bce_with_logits", "--input", "[inf, 1.0]", "--target", "[1, 0]", "--dtype", "float32")
    # jax (optax) and torch_compile, where installed, return NaN at +inf too (measured).
    others = {f: {"limit"} for f in ("torch_compile", "jax") if f in probed_families()}
    assert kinds_of(data) == {"naive": {"limit"}, "torch": {"limit"}, **others}
    data = probe_json(runner, "cross_entropy", "--input", "[[1, 2, 3], [0, 1, 2]]", "--target", "[-100, -100]",
                      "--ignore-index", "-100")
    defaults = {"naive", "stable", "torch"}
    assert {k: v for k, v in kinds_of(data).items() if k in defaults} == {"naive": {"undefined"}, "torch": {"undefined"}}
    assert [f["evidence"]["returned"] for f in data["findings"] if f["impl"] in defaults] == [["nan"], ["nan"]]
    data = probe_json(runner, "bce_with_logits", "--input", "[0.5, -1.0]", "--target", "[1, 0]")
    assert data["findings"] == []
    out = runner.invoke(main, ["probe", "bce_with_logits", "--input", "[0.5, -1.0]", "--target", "[1, 0]"]).stdout
    assert "findings: none" in out


def test_probe_never_says_formula(runner):
    # The missing-bracket BCE is wrong on this input; one point cannot tell a formula error
    # from an instability, so probe reports what it sees (far-off finite values).
    root = Path(__file__).parent.parent
    data = probe_json(runner, "bce", "--input", "[0.3, 0.6, 0.9]", "--target", "[0, 1, 0]",
                      "--impl", f"{root / 'examples' / 'missing_bracket_bce.py'}:bce")
    assert kinds_of(data)["bce"] == {"saturation"}
    [f] = data["findings"]
    assert f["impl_kind"] == "custom" and "all bits lost" in f["message"]
    table = runner.invoke(main, ["probe", "bce", "--input", "[0.3, 0.6, 0.9]", "--target", "[0, 1, 0]",
                                 "--impl", f"{root / 'examples' / 'missing_bracket_bce.py'}:bce"]).stdout
    # The table's bits never exceed float32's 24 either (31 before).
    assert "all bits lost" in table and " 31.0 " not in table
    assert all(f["kind"] != "formula" for f in data["findings"])
