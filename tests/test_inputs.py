"""The torch input generator (losscheck/inputs.py): reproducible bit for bit, the documented
distributions, shared by every dtype of a point, named in results files; and the proof that
the evaluation did not move with it (the old inputs through the current code give the old
records, benchmarks/old_inputs_check.py)."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from pathlib import Path

import mpmath
import pytest
import torch

from losscheck import gate as G
from losscheck import inputs, results, sweep
from losscheck.compare_report import render_markdown
from losscheck.config import load_config
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES
from losscheck import reference as R

ROOT = Path(__file__).resolve().parent.parent
OLD_RECORDS = ROOT / "tests" / "data" / "ci_numpy_inputs.json"
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available here: the CUDA generator is untested")

OPTIONS = (("ignored", 0.25), ("label_smoothing", 0.1), ("pos_weight", 3.0), ("targets", "soft"),
           ("weight", "random"))


def _case(loss, dist, dtype="float32", batch=64, classes=7, options=(), device="cpu", time=None):
    return sweep.Case(0, loss, device, dtype, batch, classes if LOSSES[loss].multiclass else None,
                      dist, 10.0, "mean", options, time)


def _cases(device="cpu"):
    for name, loss in LOSSES.items():
        for dist in inputs.distributions_for(loss.multiclass, loss.input_kind):
            opts = tuple(o for o in OPTIONS if o[0] in loss.options) if dist == "normal" else ()
            yield _case(name, dist, options=opts, device=device, batch=4 if loss.sequence else 64,
                        classes=50 if loss.sequence else 7, time=6 if loss.sequence else None)


def _points(device="cpu"):
    out = []
    for case in _cases(device):
        d = sweep.point_data(LOSSES[case.loss], case, 11)
        out.append((d.inp, d.target, {k: v for k, v in d.options.items()}))
    return out


def _identical(a, b) -> bool:
    """Bit for bit (through the bytes: ±0 and NaN payloads count), tensors on any device."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.detach().cpu().contiguous().view(-1).view(torch.uint8), b.detach().cpu().contiguous().view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


def test_same_seed_same_config_bit_identical_points_whatever_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _points()
        torch.set_num_threads(2)
        two = _points()
        again = _points()
    finally:
        torch.set_num_threads(before)
    assert len(one) > 20
    assert _identical(one, two) and _identical(two, again)


def test_large_inputs_bit_identical_whatever_the_thread_count():
    # Beyond torch's 32768-element grain: several threads take part in elementwise kernels.
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            x, t = inputs.generate("cross_entropy", True, 300, 1000, 10.0, "normal", 3)
            w = inputs.option_values("cross_entropy", True, {"weight": "random", "targets": "soft"}, 300, 1000,
                                     t, 3)
            p = LOSSES["bce"].make_input(inputs.generate("bce", False, 1 << 17, None, 10.0, "normal", 3)[0],
                                         torch.float32)
            got.append((x, t, w["weight"], w["soft"], p))
    finally:
        torch.set_num_threads(before)
    assert _identical(got[0], got[1]) and _identical(got[0], got[2])


def test_erfinv_runs_on_one_thread(monkeypatch):
    """torch's CPU erfinv is not reproducible across threads on a loaded machine: the second
    thread's half of a 64 × 300 float64 draw came out ~1e-9 off in 6 runs of 50, never with
    one thread (benchmarks/input_reproducibility.py). Normal draws take it on one thread and
    give the run its thread count back."""
    seen = []
    real = torch.Tensor.erfinv_
    monkeypatch.setattr(torch.Tensor, "erfinv_", lambda self: seen.append(torch.get_num_threads()) or real(self))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x, _ = inputs.generate("cross_entropy", True, 64, 300, 10.0, "normal", 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    torch.set_num_threads(1)
    try:
        assert torch.equal(x, inputs.generate("cross_entropy", True, 64, 300, 10.0, "normal", 0)[0])
    finally:
        torch.set_num_threads(before)


def test_other_seed_or_key_other_values():
    x, _ = inputs.generate("cross_entropy", True, 64, 7, 10.0, "normal", 0)
    assert not torch.equal(x, inputs.generate("cross_entropy", True, 64, 7, 10.0, "normal", 1)[0])
    assert not torch.equal(x, inputs.generate("cross_entropy", True, 64, 7, 10.0, "uniform", 0)[0])
    assert not torch.equal(x[:32], inputs.generate("cross_entropy", True, 32, 7, 10.0, "normal", 0)[0])


def test_normal_draws_are_the_inverse_cdf_of_their_uniforms():
    """√2·erfinv(v) against mpmath's inverse normal CDF of the same v (1 ULP: erfinv's own
    error plus the product), and v uniform on the odd multiples of 2**-53 in (−1, 1)."""
    g = inputs.generator_for(0, "probe")
    v = g.symmetric((4096,))
    assert ((v > -1) & (v < 1)).all()
    k = v * 2.0 ** 53  # exact (a power of 2): odd integers
    assert torch.equal(k, k.round()) and (k.remainder(2) == 1).all()
    z = inputs.generator_for(0, "probe").normal((4096,))
    mpmath.mp.prec = 120
    for vi, zi in list(zip(v.tolist(), z.tolist()))[:400] + [(v.min().item(), z.min().item())]:
        exact = float(mpmath.sqrt(2) * mpmath.erfinv(mpmath.mpf(vi)))
        assert abs(zi - exact) <= 2 * math.ulp(exact), (vi, zi, exact)


def test_distributions_keep_their_moments():
    n = 1 << 18
    x, _ = inputs.generate("bce_with_logits", False, n, None, 3.0, "normal", 7)
    assert abs(float(x.mean())) < 5 * 3.0 / math.sqrt(n)
    assert abs(float(x.std()) / 3.0 - 1) < 5 / math.sqrt(2 * n)
    u, _ = inputs.generate("bce_with_logits", False, n, None, 3.0, "uniform", 7)
    assert float(u.abs().max()) < 3.0 and abs(float(u.mean())) < 5 * 3.0 / math.sqrt(3 * n)
    assert abs(float((u / 3.0).pow(2).mean()) - 1 / 3) < 0.005
    w = inputs.option_values("bce", False, {"weight": "random"}, n, None, None, 7)["weight"]
    lo, hi = inputs.WEIGHT_RANGE
    assert float(w.min()) >= lo and float(w.max()) <= hi
    # log-uniform: the log's mean is the middle of the log range
    assert abs(float(w.log().mean()) - (math.log(lo) + math.log(hi)) / 2) < 0.01
    soft = inputs.option_values("cross_entropy", True, {"targets": "soft"}, 512, 9,
                                torch.arange(512) % 9, 7)["soft"]
    assert torch.allclose(soft.sum(dim=1), torch.ones(512, dtype=torch.float64), rtol=0, atol=1e-15)
    assert (soft[torch.arange(512), torch.arange(512) % 9] >= inputs.SOFT_MIX).all()


@pytest.mark.parametrize("loss_name", [n for n, l in LOSSES.items() if not l.sequence])
def test_every_dtype_sees_the_float64_values_rounded_once(loss_name):
    loss = LOSSES[loss_name]
    for dist in inputs.distributions_for(loss.multiclass, loss.input_kind):
        if dist == "common_offset":  # the one value set whose inputs depend on the dtype: below
            continue
        if dist == inputs.OUT_OF_DOMAIN:
            continue  # made in the dtype, NaN included (tests/test_out_of_domain.py)
        f64 = sweep.point_data(loss, _case(loss_name, dist, "float64"), 4)
        for name in ("float32", "float16", "bfloat16"):
            dtype = FORMATS[name].torch_dtype
            got = sweep.point_data(loss, _case(loss_name, dist, name), 4)
            want = R.round_to(f64.inp, dtype)
            limit = torch.finfo(dtype).max
            if loss.input_kind == "logits":  # finite logits beyond the range saturate
                want = torch.where(torch.isinf(want) & torch.isfinite(f64.inp), math.copysign(limit, 1.0)
                                   * torch.sign(f64.inp).to(dtype), want)
            else:  # probabilities are σ(logit) in float64, then rounded: the same rounding
                want = R.round_to(f64.inp, dtype)
            assert torch.equal(got.inp, want), (dist, name)
            assert torch.equal(got.target.double() if not loss.multiclass else got.target,
                               f64.target if loss.multiclass else f64.target.double())


def test_large_multiclass_points_come_in_blocks_identical_to_one_generation(monkeypatch):
    monkeypatch.setattr(inputs, "GENERATE_CHUNK", 64 * 7)
    case = _case("cross_entropy", "nonfinite", "float32", batch=200)
    blocks = sweep.point_data(LOSSES["cross_entropy"], case, 5)
    ((_, x0, t0), *rest) = inputs.generate_blocks("cross_entropy", 200, 7, 10.0, "nonfinite", 5)
    assert len(rest) >= 2 and torch.equal(blocks.inp[:x0.shape[0]], R.round_to(x0, torch.float32))
    assert torch.equal(blocks.target[:t0.shape[0]], t0)
    kinds = torch.isinf(blocks.inp).any(dim=1)
    assert kinds.any()


@needs_cuda
def test_cuda_points_are_made_on_cuda_and_reproducible():
    for case in _cases("cuda"):
        a = sweep.point_data(LOSSES[case.loss], case, 11)
        assert a.inp.device.type == "cuda" and a.target.device.type == "cuda"
        assert all(v.device.type == "cuda" for v in a.options.values() if isinstance(v, torch.Tensor))
        b = sweep.point_data(LOSSES[case.loss], case, 11)
        assert _identical((a.inp, a.target, a.options), (b.inp, b.target, b.options))


# ---- the generator in results files, compare and the gate ---------------------------------

def test_results_name_the_generator_and_gate_does_not_judge_other_inputs(tiny_results):
    assert tiny_results["environment"]["inputs"] == inputs.INPUTS_GENERATOR
    assert results.inputs_generator(tiny_results) == "torch-1"
    old = copy.deepcopy(tiny_results)
    del old["environment"]["inputs"]  # a file of the numpy generator
    assert results.inputs_generator(old) == "numpy"
    for r in old["records"]:  # numbers that would be regressions on the same inputs
        if r["status"] == "ok":
            r["forward"]["max_bits"] = -10.0
    policy = G.policy_from_config(tiny_results["config"])
    c = G.compare(old, tiny_results, policy)
    assert not c.regressions and not c.improvements and not c.failed
    assert c.env_differences["inputs"] == ("numpy", "torch-1")
    assert set(c.not_run) == set(c.matched_keys) and c.matched_keys
    assert all("inputs differ" in why for why in c.not_run.values())
    md = render_markdown(c, policy, "old.json", "new.json")
    assert "Not the same inputs" in md and "numpy generator" in md
    # The same file against itself: judged as ever.
    same = G.compare(tiny_results, tiny_results, policy)
    assert "inputs" not in same.env_differences and same.unchanged
    assert not any("inputs differ" in why for why in same.not_run.values())
    with pytest.raises(results.ResultsError, match="inputs"):
        results.merge([("a.json", old), ("b.json", tiny_results)])


# ---- the evaluation did not move (issue 13, item 1) ----------------------------------------

def _old_inputs_check():
    spec = importlib.util.spec_from_file_location("old_inputs_check", ROOT / "benchmarks" / "old_inputs_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_inputs_give_the_old_records_exactly():
    """configs/ci.yaml's records as the code before the torch inputs wrote them (its
    reports/baseline.json, timing and memory left out): run now on the old numpy inputs, every
    number comes again, bit for bit."""
    check = _old_inputs_check()
    old = results.load(OLD_RECORDS)
    assert results.inputs_generator(old) == "numpy"
    n, changed = check.changed_points(old, ("bce", "cross_entropy"), threads=old["environment"]["threads"])
    assert n > 100 and not changed, changed[:10]


def test_old_inputs_check_sees_a_change(monkeypatch):
    """The check has teeth: a metric nudged by one ULP is reported (max_ulp + 1 where finite)."""
    check = _old_inputs_check()
    old = results.load(OLD_RECORDS)
    from losscheck import metrics
    real = metrics.ErrorStats.as_dict
    monkeypatch.setattr(metrics.ErrorStats, "as_dict",
                        lambda self: {**real(self), "max_ulp": real(self)["max_ulp"] + 1})
    finite = lambda r: any(math.isfinite(r[p]["max_ulp"]) for p in ("forward", "backward") if r[p])
    n, changed = check.changed_points(old, ("bce_with_logits",), threads=1)
    ok = sum(1 for r in old["records"] if r["loss"] == "bce_with_logits" and r["status"] == "ok" and finite(r))
    assert ok > 50 and len(changed) == ok


# ---- built-in implementations get the point's tensors uncopied --------------------------------

@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_built_in_implementations_never_write_into_their_inputs(loss_name):
    """What lets `sweep._measure` hand them the point's own tensors (custom ones get copies)."""
    loss = LOSSES[loss_name]
    for case in _cases():
        if case.loss != loss_name:
            continue
        for dtype in ("float32", "bfloat16"):
            case = dataclasses.replace(case, dtype=dtype)
            data = sweep.point_data(loss, case, 3)
            before = copy.deepcopy((data.inp, data.target, data.options))
            ref = sweep.reference(loss, data.inp, data.target, data.options, "mean")
            for impl in loss.implementations.values():
                assert impl.kind in sweep.BUILT_IN_KINDS
                rec = sweep.evaluate(_CONFIG, case, loss, impl, data, ref)
                # (torch's BCE raises on out-of-domain probabilities: a recorded outcome)
                raised = rec.get("out_of_domain", {}).get("outcome") == "raised"
                assert rec["status"] == "ok" or raised, rec["message"]
                assert _identical(before, (data.inp, data.target, data.options)), (impl.name, case)


_CONFIG = load_config(ROOT / "configs" / "quick.yaml")


@pytest.mark.parametrize("loss_name", ["cross_entropy", "sequence_cross_entropy"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_common_offset_adds_the_dtypes_offsets_to_the_shared_draws(loss_name, dtype):
    """Even rows get the dtype's first offset, odd rows its second, on top of the N(0, 1)·scale
    draws every dtype shares; then the sum is rounded once, like every input."""
    loss = LOSSES[loss_name]
    case = _case(loss_name, "common_offset", dtype, batch=6, classes=5, time=3 if loss.sequence else None)
    got = sweep.point_data(loss, case, 4).inp.reshape(-1, 5)
    ((_, draws, _),) = inputs.generate_blocks(loss_name, case.batch, 5, case.scale, "common_offset", 4, case.time)
    even, odd = inputs.COMMON_OFFSETS[dtype]
    offsets = torch.tensor([even, odd], dtype=torch.float64)[torch.arange(got.shape[0]) % 2].reshape(-1, 1)
    assert torch.equal(got, R.round_to(draws + offsets, FORMATS[dtype].torch_dtype))
    # The offset dominates: every logit of a row is within the draws' spread of it.
    assert bool(((got.double() - offsets).abs() <= draws.abs().amax() + offsets * 2**-7).all())


def test_common_offset_is_a_multiclass_value_set_only():
    assert inputs.applies("common_offset", True, "logits")
    assert not inputs.applies("common_offset", False, "logits")
    assert inputs.row_offsets("normal", "float32", 4) is None
