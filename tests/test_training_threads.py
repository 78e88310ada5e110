"""Issue 15's threads, each reproduced with losscheck through bench AND probe, the expected
values from mpmath (or exact arithmetic), never from torch.

`THREADS` is the table the issue is closed against: each thread -> the tests (here or in the
module named) that reproduce it through bench and through probe. Where a thread's bug is
fixed in the torch installed here, the test shows that losscheck's record says what torch
does on that input (the record is compared with torch's own output) and that an
implementation with the reported behaviour is caught there.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import assert_one_error_line
from test_nll_log_softmax import exact_log_softmax
from test_reference import MP, round_exact

from losscheck import api, sweep
from losscheck.cli import main
from losscheck.config import Config, parse_config
from losscheck.errors import ConfigError
from losscheck.losses import LOSSES, reference
from losscheck.probe_command import probe_command

main.add_command(probe_command)  # what cli.py does; idempotent
INF = math.inf

# thread -> {"bench": "module::test", "probe": "module::test"} ("" module: this one).
THREADS = {
    "pytorch#103316 (sigmoid→BCE gradient at x = −50)": {
        "bench": "test_sigmoid_bce::test_the_threads_in_bench",
        "probe": "test_sigmoid_bce::test_pytorch_103316_gradient_at_minus_50_probe",
    },
    "keras#9664 / Flux.jl#914 / OneFlow#7476 (σ(x) saturates: loss 100 gradient 0; float16 NaN)": {
        "bench": "test_sigmoid_bce::test_the_threads_in_bench",
        "probe": "test_sigmoid_bce::test_saturated_sigmoid_probe",
    },
    "Liger-Kernel#968 (row 0's upstream gradient applied to every row)": {
        "bench": "test_grad_outputs::test_liger_kernel_968_passes_with_ones_and_is_caught_with_random",
        "probe": "::test_liger_kernel_968_probe",
    },
    "pytorch#135359 (x = −inf, y = 0.9: NaN, true +inf; BCE p = 0, y = 0.5)": {
        "bench": "::test_pytorch_135359_bench",
        "probe": "test_soft_binary::test_torch_nan_at_minus_inf_soft_target_is_recorded",
    },
    "pytorch#85791 (float16 (N, C, d) cross entropy overflows to inf)": {
        "bench": "test_nll_log_softmax::test_pytorch_85791_bench",
        "probe": "test_nll_log_softmax::test_pytorch_85791_probe",
    },
    "pytorch#158310 (float16 LogSoftmax over dim 2 on the CPU: -inf for ~0 / log(1/2))": {
        "bench": "::test_pytorch_158310_bench",
        "probe": "::test_pytorch_158310_probe",
    },
    "pytorch#51866 (p = 1.0000001: NaN on CUDA; CPU part)": {
        "bench": "test_out_of_domain::test_outcomes_per_implementation_bench",
        "probe": "test_out_of_domain::test_probe_accepts_probabilities_outside_zero_one_pytorch_51866",
    },
    "pytorch#61098 (binary_cross_entropy unsafe to autocast)": {
        "bench": "test_precision::test_upcast_gives_float32_compute_and_autocast_on_bce_notes_the_cuda_refusal",
        "probe": "::test_pytorch_61098_probe",
    },
    "Modalities#464 (bfloat16 cross entropy without autocast: the 0.25 grid at a loss of 36)": {
        "bench": "::test_modalities_464_bench",
        "probe": "::test_modalities_464_probe",
    },
    "optax#1020 (bfloat16 softmax cross entropy quantized)": {
        "bench": "test_jax_family::test_bench_finds_optax_1020_in_bfloat16",
        "probe": "test_jax_family::test_probe_runs_jax_on_the_users_tensors_optax_1020",
    },
    "pytorch#171282 (eager bfloat16, compiled float32 BCE-with-logits output)": {
        "bench": "::test_pytorch_171282_bench",
        "probe": "::test_pytorch_171282_probe",
    },
    "MLX#4188 (logits at 1e8: loss 0)": {
        "bench": "::test_mlx_4188_bench",
        "probe": "::test_mlx_4188_probe",
    },
    "multi-label (N, C) with a per-class pos_weight vector": {
        "bench": "::test_multilabel_pos_weight_vector_bench",
        "probe": "test_soft_binary::test_probe_multilabel_per_class_pos_weight_matches_torch_broadcasting",
    },
}
# pytorch#29429 is named by issue 15 beside #158310 but could not be found (searched the issue
# corpus by number and by subject); log_softmax over a non-last dimension is #158310's tests.


@pytest.mark.parametrize("thread", list(THREADS))
def test_every_thread_has_a_bench_and_a_probe_test(thread):
    for how, where in THREADS[thread].items():
        module, name = where.split("::")
        mod = sys.modules[__name__] if not module else importlib.import_module(module)
        assert callable(getattr(mod, name, None)), (thread, how, where)


@pytest.fixture(autouse=True)
def _probe_builtins_only(monkeypatch):
    """Probe only naive, stable and torch here: compiling every probe's input with
    torch.compile (and jitting it with jax) costs a minute per test and is not what these
    threads are about (tests/test_torch_compile.py and test_jax_family.py audit those)."""
    from losscheck.probing import evaluate

    monkeypatch.setattr(evaluate, "probed_families", lambda: ("naive", "stable", "torch"))


def _write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def _by_impl(records) -> dict:
    return {r["impl"]: r for r in records}


# ---- pytorch#158310: float16 log_softmax over a non-last dimension -------------------------------

def _check_log_softmax_reference(x: torch.Tensor, dim: int, ref_out: torch.Tensor) -> None:
    """Every element of the reference against mpmath (60 digits), rows along `dim`."""
    rows = x.movedim(dim, -1).reshape(-1, x.shape[dim]).double().tolist()
    got = ref_out.movedim(dim, -1).reshape(-1, x.shape[dim]).double().tolist()
    MP.dps = 60
    for row, out in zip(rows, got, strict=True):
        exact, _ = exact_log_softmax(row, [1.0] * len(row))
        for e, g in zip(exact, out, strict=True):
            r = round_exact(e, "float16")
            assert g in ((r.below, r.above) if r.tie else (r.nearest,)), (row, g, MP.nstr(e, 20))


def _input_158310() -> torch.Tensor:
    rng = np.random.default_rng(432)  # the reproduction, as written there
    return torch.tensor(rng.uniform(-20260.0, -19740.0, size=(18, 1, 2, 2, 21, 2)), dtype=torch.float16)


def test_pytorch_158310_probe(tmp_path):
    x = _input_158310()
    r = api.probe("log_softmax", x, None, dim=2, reduction="none")
    assert r.options["dim"] == 2 and dict(r.case.options)["dim"] == 2
    _check_log_softmax_reference(x, 2, r.ref.loss)
    # The element: CPU gave -inf; the true value −log1p(e^−112) ≈ −2e-49 is −0 in
    # float16, and its partner log_softmax = −112 exactly.
    assert x[0, 0, :, 0, 5, 0].tolist() == [-19776.0, -19888.0]
    assert r.ref.loss[0, 0, :, 0, 5, 0].tolist() == [0.0, -112.0]
    by = _by_impl(r.records)
    # A kernel without the max shift (the code path the report points at) is all wrong here:
    # exp(−19776) is 0 in float16.
    assert by["naive"]["forward"]["inf"] + by["naive"]["forward"]["nan"] == x.numel()
    assert by["stable"]["forward"]["max_ulp"] == 0 and by["stable"]["backward"]["max_ulp"] == 0
    # torch's record is what torch does here (fixed in some versions, not in 2.7.1).
    mine = F.log_softmax(x, 2)
    assert by["torch"]["forward"]["inf"] == int(mine.isinf().sum())
    assert by["torch"]["forward"]["max_ulp"] == 0 or bool((mine != r.ref.loss).any())
    # The same through the command line, from a file.
    torch.save(x, tmp_path / "x.pt")
    out = CliRunner().invoke(
        main, ["probe", "log_softmax", "--input", str(tmp_path / "x.pt"), "--dim", "2", "--reduction", "none", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["options"]["dim"] == 2


def test_probe_dim_errors():
    runner = CliRunner()
    args = ["probe", "log_softmax", "--input", "[[1, 2], [3, 4]]"]
    assert_one_error_line(runner.invoke(main, [*args, "--dim", "2"]), "--dim", "-2..1")
    assert_one_error_line(runner.invoke(main, [*args, "--dim", "x"]), "--dim", "integer")
    ce = ["probe", "cross_entropy", "--input", "[[1, 2]]", "--target", "[0]", "--dim", "0"]
    assert_one_error_line(runner.invoke(main, ce), "--dim", "cross_entropy does not support --dim")
    assert_one_error_line(runner.invoke(main, ["probe", "cross_entropy", "--input", "[[1, 2]]"]), "--target", "missing")


def test_probe_log_softmax_dim_and_rows_agree():
    """dim 0 of (C, N) is dim -1 of (N, C): the same rows, the same reference values."""
    x = [[1.0, 2.0, 3.0], [3.0, 1.0, INF]]
    cols = api.probe("log_softmax", x, None, dim=0, reduction="none", dtype="float32")
    rows = api.probe("log_softmax", np.array(x).T.tolist(), None, reduction="none", dtype="float32")
    assert torch.equal(cols.ref.loss, rows.ref.loss.T)
    assert cols.reference["limits"]["count"] == 2  # column [3, +inf]: its two elements
    assert any("element [0, 2] (dim 0: 1 logit +inf): limit -inf" in n for n in cols.notes), cols.notes
    assert rows.reference["limits"]["count"] == 2


def test_pytorch_158310_bench():
    """bench: log_softmax over dimension 0 of float16 (C, N) inputs (a non-last dimension, as
    in the issue) at a large common offset (4096 and 32768: the exp overflows without the max
    shift) and at ties of two (true log(1/2))."""
    cfg = parse_config(
        "name: t158310\nlosses: [log_softmax]\nimplementations: [naive, stable, torch]\nscales: [1]\n"
        "batch_sizes: [64]\nclasses: [2]\ndtypes: [float16]\ndistributions: [common_offset, ties]\n"
        "reductions: [none]\ndims: [0]\ntiming: false\n",
        "<test>",
    )
    loss = LOSSES["log_softmax"]
    records = sweep.run(cfg, 1)
    for case in sweep.cases(cfg):
        data = sweep.point_data(loss, case, cfg.seed)
        assert tuple(data.inp.shape) == (2, 64) and data.options == {"dim": 0}
        ref = reference(loss, data.inp, data.target, data.options, "none")
        _check_log_softmax_reference(data.inp, 0, ref.loss)
        by = _by_impl(r for r in records if r["distribution"] == case.distribution)
        assert by["stable"]["forward"]["max_ulp"] == 0 and by["stable"]["backward"]["max_ulp"] <= 1
        x = data.inp.clone().requires_grad_(True)
        mine = F.log_softmax(x, 0)
        mine.backward(torch.ones_like(mine))
        assert by["torch"]["forward"]["inf"] == int(mine.isinf().sum())
        if case.distribution == "common_offset":
            assert float(data.inp.abs().max()) >= 32768 - 64
            assert by["naive"]["forward"]["nan"] + by["naive"]["forward"]["inf"] > 0
        else:
            # Ties of two: log(1/2) = −0.693147…, −0.6934 in float16; the gradient is 0, which
            # torch's backward (g − exp(out)·Σg from the float16 output) misses by 2^−12:
            # losscheck's record says so exactly when torch does.
            half = round_exact(-MP.log(2), "float16").nearest
            assert set(ref.loss.reshape(-1).tolist()) == {half}
            assert float(ref.grad.abs().max()) == 0.0
            missed = bool((x.grad != 0).any())
            assert (by["torch"]["backward"]["max_bits"] == 11) == missed


# ---- pytorch#135359: soft targets at ±inf logits, bench ------------------------------------------

def test_pytorch_135359_bench():
    cfg = Config.from_mapping(
        {"name": "t135359", "losses": ["bce_with_logits"], "implementations": ["stable", "torch"], "scales": [1],
         "batch_sizes": [16], "dtypes": ["float32"], "distributions": ["nonfinite"], "targets": ["soft"],
         "reductions": ["none"], "timing": False}, "<test>")
    (case,) = sweep.cases(cfg)
    data = sweep.point_data(LOSSES["bce_with_logits"], case, cfg.seed)
    x, y = data.inp.tolist(), data.target.tolist()
    at_minus_inf = [i for i, v in enumerate(x) if v == -INF and 0 < y[i] < 1]
    assert at_minus_inf  # x = −inf with a soft target in (0, 1): the true loss is +inf
    ref = reference(LOSSES["bce_with_logits"], data.inp, data.target, {}, "none")
    assert all(float(ref.loss[i]) == INF for i in at_minus_inf)
    assert all(float(ref.grad[i]) == round_exact(-MP.mpf(y[i]), "float32").nearest for i in at_minus_inf)
    by = _by_impl(sweep.run(cfg, 1))
    torch_nan = int(F.binary_cross_entropy_with_logits(data.inp, data.target, reduction="none").isnan().sum())
    assert torch_nan > 0 and by["torch"]["forward"]["nan"] == torch_nan
    assert by["stable"]["forward"]["nan"] == 0 and by["stable"]["forward"]["max_ulp"] == 0


# ---- Liger-Kernel#968 through probe ------------------------------------------------------------

def test_liger_kernel_968_probe(tmp_path):
    from test_grad_outputs import LIGER

    path = _write(tmp_path, "liger", LIGER)
    x, t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -2.0]], [0, 2, 1]
    ones = api.probe("cross_entropy", x, t, reduction="none", grad_output="ones", impls=[f"{path}:liger_ce"])
    assert _by_impl(ones.records)["liger_ce"]["backward"]["max_ulp"] <= 4  # invisible with ones
    given = "[2.0, -0.5, 0.25]"
    r = api.probe("cross_entropy", x, t, reduction="none", grad_output=given, impls=[f"{path}:liger_ce"])
    # The exact gradient of Σ g_i·ℓ_i, row by row (mpmath): g_i·(softmax(x_i) − onehot(t_i)).
    MP.dps = 50
    for i, (row, ti, gi) in enumerate(zip(x, t, [2.0, -0.5, 0.25], strict=True)):
        z = MP.fsum(MP.exp(v) for v in row)
        for j, v in enumerate(row):
            exact = MP.mpf(gi) * (MP.exp(v) / z - (1 if j == ti else 0))
            assert float(r.ref.grad[i, j]) == round_exact(exact, "float32").nearest
    liger = _by_impl(r.records)["liger_ce"]
    assert liger["forward"]["max_ulp"] <= 1 and liger["backward"]["max_bits"] > liger["threshold_bits"]


# ---- pytorch#61098: autocast, probe ------------------------------------------------------------

def test_pytorch_61098_probe():
    """binary_cross_entropy under autocast: on CUDA torch refuses it; on the CPU it computes in
    float32. The probe runs the policy, records the refusal and audits the float32 output."""
    p, y = [0.5, 0.25, 0.9], [1, 0, 1]
    r = api.probe("bce", p, y, dtype="float16", precision="autocast")
    assert dict(r.case.options)["precision"] == "autocast"
    t = _by_impl(r.records)["torch"]
    assert t["output_dtype"] == "float32" and "unsafe to autocast" in t["message"]
    pr = [MP.mpf(float(torch.tensor(v, dtype=torch.float16))) for v in p]  # the rounded inputs
    MP.dps = 50
    exact = -MP.fsum(MP.log(v) if yi else MP.log1p(-v) for v, yi in zip(pr, y, strict=True)) / 3
    assert t["forward"]["reference"] == round_exact(exact, "float32").nearest  # the float32 reference
    assert abs(t["forward"]["value"] - float(exact)) <= 2 * 2.0**-24 * float(exact)
    assert "precision: autocast" in r.render()
    with pytest.raises(ConfigError, match="--precision"):
        api.probe("bce", p, y, dtype="float32", precision="autocast")


# ---- Modalities#464: bfloat16 cross entropy without autocast (FSDP2) ---------------------------

def _rows_near_36():
    """bfloat16 logits whose mean cross entropy is about 36 (the PR's loss magnitude): the
    target's logit 36-ish below the others'."""
    g = torch.Generator().manual_seed(464)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 8, (32,), generator=g)
    x[torch.arange(32), t] -= 36.0 + torch.rand(32, generator=g, dtype=torch.float64)
    return x.to(torch.bfloat16), t


def _exact_mean_ce(x: torch.Tensor, t: torch.Tensor):
    MP.dps = 50
    total = MP.mpf(0)
    for row, ti in zip(x.double().tolist(), t.tolist(), strict=True):
        total += MP.log(MP.fsum(MP.exp(v) for v in row)) - row[ti]
    return total / len(t)


def test_modalities_464_probe():
    x, t = _rows_near_36()
    exact = _exact_mean_ce(x, t)
    assert 32 < exact < 64  # bfloat16's grid there is 0.25 wide, as at the PR's ~36
    native = api.probe("cross_entropy", x, t)
    up = api.probe("cross_entropy", x, t, precision="upcast")
    assert native.reference["forward"] == round_exact(exact, "bfloat16").nearest
    n, u = _by_impl(native.records)["torch"], _by_impl(up.records)["torch"]
    assert n["forward"]["value"] % 0.25 == 0 and abs(n["forward"]["value"] - float(exact)) <= 0.25
    assert u["output_dtype"] == "float32" and u["forward"]["reference"] == round_exact(exact, "float32").nearest
    assert abs(u["forward"]["value"] - float(exact)) <= 8 * 2.0**-24 * 36  # the float32 grid, not 0.25


def test_modalities_464_bench():
    cfg = Config.from_mapping(
        {"name": "m464", "losses": ["cross_entropy"], "implementations": ["torch"], "scales": [18],
         "batch_sizes": [64], "classes": [8], "dtypes": ["bfloat16"], "distributions": ["confident_wrong"],
         "precision": ["native", "upcast"], "timing": False}, "<test>")
    recs = {dict(r["options"]).get("precision", "native"): r for r in sweep.run(cfg, 1)}
    native, up = recs["native"]["forward"], recs["upcast"]["forward"]
    exact = native["reference_value"]
    assert exact == up["reference_value"] and 32 < exact < 64  # about 36, as in the PR
    quantum = 2.0 ** (math.floor(math.log2(exact)) - 7)  # bfloat16's spacing at the loss
    assert native["value"] % quantum == 0 and abs(native["value"] - exact) <= quantum
    assert recs["upcast"]["output_dtype"] == "float32"
    assert abs(up["value"] - exact) <= 8 * 2.0**-24 * exact


# ---- pytorch#171282: eager bfloat16, compiled float32 ------------------------------------------

PROMOTED = """
import torch.nn.functional as F


def promoted(x, t, reduction="mean", weight=None, pos_weight=None):
    # what inductor's decomposition returned (pytorch#171282): float32 for bfloat16 logits
    return F.binary_cross_entropy_with_logits(x.float(), t.float(), reduction=reduction)
"""


def _exact_bce_with_logits_mean(x, y):
    MP.dps = 50
    terms = [(MP.log1p(MP.exp(-abs(MP.mpf(v)))) + max(v, 0) - v * yi) for v, yi in zip(x, y, strict=True)]
    return MP.fsum(terms) / len(terms)


def test_pytorch_171282_probe(tmp_path):
    path = _write(tmp_path, "promoted", PROMOTED)
    x, y = [1.5, -3.0, 20.0], [1, 0, 0]
    native = _by_impl(api.probe("bce_with_logits", x, y, dtype="bfloat16", impls=[f"{path}:promoted"]).records)
    # As given (native), a float32 result for bfloat16 inputs is a disagreement named, not compared.
    assert native["promoted"]["status"] == "error" and "float32" in native["promoted"]["message"]
    assert native["torch"]["status"] == "ok" and native["torch"].get("output_dtype") is None
    exact = _exact_bce_with_logits_mean(x, y)
    for policy in ("autocast", "upcast"):
        by = _by_impl(api.probe("bce_with_logits", x, y, dtype="bfloat16", precision=policy,
                                impls=[f"{path}:promoted"]).records)
        p = by["promoted"]
        assert p["status"] == "ok" and p["output_dtype"] == "float32"
        assert p["forward"]["reference"] == round_exact(exact, "float32").nearest
        assert p["forward"]["reduced_ulp"] <= 2


def test_pytorch_171282_bench(tmp_path):
    path = _write(tmp_path, "promoted", PROMOTED)
    cfg = Config.from_mapping(
        {"name": "t171282", "losses": ["bce_with_logits"], "implementations": ["torch"], "scales": [1],
         "batch_sizes": [8], "dtypes": ["bfloat16"], "distributions": ["normal"],
         "precision": ["native", "autocast"], "timing": False,
         "custom": [{"name": "promoted", "function": f"{path}:promoted", "losses": ["bce_with_logits"]}]}, "<test>")
    recs = {(r["impl"], dict(r["options"]).get("precision", "native")): r for r in sweep.run(cfg, 1)}
    assert recs[("promoted", "native")]["status"] == "error"
    assert "float32" in recs[("promoted", "native")]["message"]
    for impl in ("promoted", "torch"):  # autocast: both float32 on the CPU, both audited there
        r = recs[(impl, "autocast")]
        assert r["status"] == "ok" and r["output_dtype"] == "float32" and r["forward"]["reduced_ulp"] <= 2


# ---- MLX#4188: a large common offset ------------------------------------------------------------

MLX = """
import torch


def mlx_ce(x, t, reduction="mean"):
    # MLX's composition before the fix: logsumexp(x) − x_t, the gap lost next to the offset
    loss = torch.logsumexp(x, -1) - x.gather(-1, t[:, None])[:, 0]
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
"""


def test_mlx_4188_probe(tmp_path):
    path = _write(tmp_path, "mlx", MLX)
    got = []
    for offset in (1.0, 1e4, 1e6, 1e8):  # the PR's equal logits: log 2 at every offset
        r = api.probe("cross_entropy", [[offset, offset]], [0], dtype="float32", impls=[f"{path}:mlx_ce"])
        assert r.reference["forward"] == round_exact(MP.log(2), "float32").nearest
        by = _by_impl(r.records)
        got.append(by["mlx_ce"]["forward"]["value"])
        assert by["stable"]["forward"]["reduced_ulp"] == 0 and by["torch"]["forward"]["reduced_ulp"] <= 1
    assert got == [float(np.float32(math.log(2))), 0.693359375, 0.6875, 0.0]  # the PR's numbers
    assert _by_impl(r.records)["mlx_ce"]["forward"]["underflow"] == 1  # 0 where the truth is log 2


def test_mlx_4188_bench(tmp_path):
    path = _write(tmp_path, "mlx", MLX)
    cfg = Config.from_mapping(
        {"name": "t4188", "losses": ["cross_entropy"], "implementations": ["stable", "torch"], "scales": [1],
         "batch_sizes": [16], "classes": [4], "dtypes": ["float32"], "distributions": ["common_offset"],
         "reductions": ["none"], "timing": False,
         "custom": [{"name": "mlx_ce", "function": f"{path}:mlx_ce", "losses": ["cross_entropy"]}]}, "<test>")
    (case,) = sweep.cases(cfg)
    data = sweep.point_data(LOSSES["cross_entropy"], case, cfg.seed)
    ref = reference(LOSSES["cross_entropy"], data.inp, data.target, {}, "none")
    MP.dps = 60
    for i in (0, 1):  # an offset-1e6 row and an offset-1e8 row: the exact loss of the rounded row
        row = data.inp[i].double().tolist()
        exact = MP.log(MP.fsum(MP.exp(MP.mpf(v) - row[0]) for v in row)) + row[0] - row[int(data.target[i])]
        assert float(ref.loss[i]) == round_exact(exact, "float32").nearest
    assert float(data.inp[1].min()) >= 1e8 - 64  # the odd rows sit at 1e8
    by = _by_impl(sweep.run(cfg, 1))
    assert by["stable"]["forward"]["max_ulp"] == 0
    mlx = by["mlx_ce"]["forward"]
    assert mlx["max_bits"] == 24 and mlx["underflow"] + mlx["saturated"] > 0


# ---- item 3: (N, C) multi-label inputs with a per-class pos_weight vector in bench --------------

MULTILABEL = {
    "name": "ml", "losses": ["bce_with_logits"], "implementations": ["stable", "torch"], "scales": [3],
    "batch_sizes": [6], "dtypes": ["float32"], "distributions": ["normal"], "targets": ["soft"],
    "labels": [1, 4], "pos_weights": [1, [0.5, 2, 0, -1]], "reductions": ["none"], "timing": False,
}


def test_multilabel_pos_weight_vector_bench():
    cfg = Config.from_mapping(MULTILABEL, "<test>")
    assert cfg.labels == (1, 4) and cfg.pos_weights == (1.0, "(0.5, 2, 0, -1)")
    assert Config.from_mapping(cfg.as_dict(), "<again>") == Config.from_mapping(MULTILABEL, "<again>")
    assert cfg.as_dict()["pos_weights"] == [1.0, [0.5, 2.0, 0.0, -1.0]]
    cases = list(sweep.cases(cfg))
    # The vector goes with 4 labels only: (1, hard), (4, hard), (4, vector).
    assert sorted(str(sorted(dict(c.options).items())) for c in cases) == sorted(
        [str([("targets", "soft")]), str([("labels", 4), ("targets", "soft")]),
         str([("labels", 4), ("pos_weight", "(0.5, 2, 0, -1)"), ("targets", "soft")])])
    loss = LOSSES["bce_with_logits"]
    case = next(c for c in cases if "pos_weight" in dict(c.options))
    data = sweep.point_data(loss, case, cfg.seed)
    assert tuple(data.inp.shape) == (6, 4) and data.options["pos_weight"].tolist() == [0.5, 2.0, 0.0, -1.0]
    ref = reference(loss, data.inp, data.target, data.options, "none")
    MP.dps = 50

    def softplus(v):
        return MP.log1p(MP.exp(v)) if v < 0 else v + MP.log1p(MP.exp(-v))

    for i in range(6):
        for j, pw in enumerate([0.5, 2.0, 0.0, -1.0]):
            x, y = MP.mpf(float(data.inp[i, j])), MP.mpf(float(data.target[i, j]))
            exact = pw * y * softplus(-x) + (1 - y) * softplus(x)
            assert float(ref.loss[i, j]) == round_exact(exact, "float32").nearest
    records = [r for r in sweep.run(cfg, 1) if r["options"].get("pos_weight")]
    by = _by_impl(records)
    # torch's (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x) cancels for a negative pos_weight: some
    # ULPs, within the threshold.
    assert by["stable"]["forward"]["max_ulp"] == 0 and by["torch"]["status"] == "ok"
    assert by["torch"]["forward"]["max_bits"] < by["torch"]["threshold_bits"]
    # The same inputs through probe: the same reference (bench and probe alike).
    r = api.probe("bce_with_logits", data.inp, data.target, pos_weight="[0.5, 2, 0, -1]", reduction="none")
    assert torch.equal(r.ref.loss.reshape(6, 4), ref.loss)


@pytest.mark.parametrize("change,fragment", [
    ({"pos_weights": [[0.5, 2, 3]]}, "no `labels` value"),
    ({"pos_weights": [[0.5]]}, "bad vector"),
    ({"pos_weights": [[0.5, ".nan"]]}, "bad vector"),
    ({"labels": [0]}, "labels"),
    ({"pos_weights": [[1, 2, 3, 4], [1, 2, 3, 4]]}, "duplicate"),
])
def test_multilabel_config_errors(tmp_path, change, fragment):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MULTILABEL, **change}))
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(tmp_path / "out")])
    assert_one_error_line(result, "bad.yaml", fragment)

