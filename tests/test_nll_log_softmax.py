"""nll_loss, log_softmax and (N, C, d…) cross entropy (issue 15 item 4).

The references are checked against mpmath at 60 digits (log_softmax's values and its
vector-Jacobian product with a random upstream gradient, ±inf limits included), rounded with
integers by test_reference's oracle; the threads are reproduced with losscheck: pytorch#85791
(float16 cross entropy on (N, C, d) overflowing to inf, at (20, 100, 1025)), nll_loss's mean
overflowing in float16, torch.log_softmax returning 0 for a dominant entry whose true value is
−1.09e-16.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_error_line
from test_reference import DTYPES, MP, round_exact

from losscheck import api, sweep
from losscheck.cli import main
from losscheck.config import parse_config
from losscheck.dtypes import FORMATS
from losscheck.errors import ConfigError
from losscheck.losses import LOSSES, reference
from losscheck.probe_command import probe_command

main.add_command(probe_command)  # what cli.py does; idempotent
INF = math.inf


# ---- log_softmax: the reference against mpmath -----------------------------------------------

def exact_log_softmax(row, g):
    """(out_j, g_j − softmax_j·Σg) at 60 digits, with the limits at ±inf logits."""
    n = len(row)
    total = MP.fsum(MP.mpf(v) for v in g)
    if any(math.isnan(v) for v in row) or all(v == -INF for v in row) and n > 1:
        return [MP.nan] * n, [MP.nan] * n
    pos = [v == INF for v in row]
    if any(pos):
        one = sum(pos) == 1
        out = [(MP.mpf(0) if one else MP.nan) if p else -MP.inf for p in pos]
        p = [(MP.mpf(1) if one else MP.nan) if q else MP.mpf(0) for q in pos]
    else:
        # The log1p form: log Σ e^x at 60 digits would lose a dominant entry's −1e-106.
        xs = [MP.mpf(v) for v in row]
        a = max(range(n), key=lambda k: xs[k])
        rest = MP.log1p(MP.fsum(MP.exp(v - xs[a]) for k, v in enumerate(xs) if k != a and v != -MP.inf))
        out = [(v - xs[a]) - rest for v in xs]
        p = [MP.exp(v) if v != -MP.inf else MP.mpf(0) for v in out]
    return out, [MP.mpf(gj) - pj * total for gj, pj in zip(g, p, strict=True)]


def _rows(case: str, name: str, rng) -> np.ndarray:
    big = float(torch.finfo(FORMATS[name].torch_dtype).max)
    if case.startswith("normal_"):
        return rng.standard_normal((12, 5)) * float(case.split("_")[1])
    if case == "dominant":  # one logit 20-60 above the others: its log-probability is −tiny
        x = rng.standard_normal((12, 5))
        x[:, 2] += np.linspace(20, 60, 12)
        return x
    if case == "ties":
        return np.repeat(rng.uniform(-3, 3, (12, 1)), 5, axis=1)
    if case == "huge":
        return np.where(rng.integers(0, 2, (12, 5)) == 1, 1.0, -1.0) * big * rng.uniform(0.5, 1.0, (12, 5))
    if case == "nonfinite":  # masked (−inf), one +inf, two +inf, all −inf
        x = rng.standard_normal((12, 5)) * 3
        x[0:3, 1] = -INF
        x[3:6, 4] = INF
        x[6:8, [0, 3]] = INF
        x[8, :] = -INF
        return x
    raise AssertionError(case)


CASES = ["normal_1", "normal_30", "normal_1000", "dominant", "ties", "huge", "nonfinite"]


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_log_softmax_reference_matches_mpmath(case, name, dim):
    loss = LOSSES["log_softmax"]
    rng = np.random.default_rng([len(case), sum(map(ord, case + name))])
    dtype = FORMATS[name].torch_dtype
    x = loss.make_input(_rows(case, name, rng), dtype)  # rows (12, 5), rounded once
    g = torch.tensor(rng.standard_normal((12, 5)), dtype=torch.float64).to(dtype)
    g[1] = 0  # a zero upstream row: gradient exactly 0
    inp, up = (x, g) if dim == -1 else (x.T.contiguous(), g.T.contiguous())
    opts = {} if dim == -1 else {"dim": 0}
    ref = reference(loss, inp, torch.zeros(12, dtype=torch.int64), opts, "none", grad_output=up)
    out, grad = (ref.loss, ref.grad) if dim == -1 else (ref.loss.T, ref.grad.T)
    problems, ties = [], 0
    for i in range(12):
        row, gi = x[i].double().tolist(), g[i].double().tolist()
        ev, eg = exact_log_softmax(row, gi)
        for j in range(5):
            for what, got, v in (("out", float(out[i, j]), ev[j]), ("grad", float(grad[i, j]), eg[j])):
                r = round_exact(v, name)
                if MP.isnan(v):
                    ok = math.isnan(got)
                elif r.tie:
                    ties += 1
                    ok = got in (r.below, r.above)
                else:
                    ok = got == r.nearest
                if not ok:
                    problems.append(f"{what}[{i},{j}] row={row} g={gi}: got {got!r}, exact {MP.nstr(v, 20)}")
    assert not problems, "\n".join(problems[:10])
    assert ties <= 240 // 8  # as test_reference: the tie allowance stays an exception


def test_log_softmax_sum_and_mean_are_over_every_element():
    loss = LOSSES["log_softmax"]
    x = torch.tensor([[0.5, -1.0, 2.0], [3.0, 3.0, -7.0]], dtype=torch.float32)
    t = torch.zeros(2, dtype=torch.int64)
    MP.dps = 60
    exact = [v for r in x.double().tolist() for v in exact_log_softmax(r, [1.0] * 3)[0]]
    total = MP.fsum(exact)
    assert float(reference(loss, x, t, {}, "sum").reduced) == round_exact(total, "float32").nearest
    assert float(reference(loss, x, t, {}, "mean").reduced) == round_exact(total / 6, "float32").nearest


def test_torch_log_softmax_drops_the_dominant_log_probability():
    """float32 row [37, 0, 0, 0, 0]... at a gap of 37: log_softmax_0 = −log1p(4e^−37) = −3.4e-16
    (a normal float32); torch.log_softmax gives 0 (log of a sum that rounds to e^0), the
    stable log1p form the exact value: a bench point sees it as underflow."""
    cfg = parse_config(
        "name: dom\nlosses: [log_softmax]\nscales: [100]\nbatch_sizes: [64]\nclasses: [8]\n"
        "dtypes: [float32]\ndistributions: [dominant]\nreductions: [none]\ntiming: false\n",
        "<test>",
    )
    records = {r["impl"]: r for r in sweep.run(cfg, 1)}
    assert records["torch"]["forward"]["underflow"] > 0  # exactly 0 where the truth is not
    assert records["stable"]["forward"]["max_ulp"] == 0
    x = torch.tensor([[37.0, 0.0, 0.0, 0.0, 0.0]])
    exact = -MP.log1p(4 * MP.exp(-37))
    ref = reference(LOSSES["log_softmax"], x, torch.zeros(1, dtype=torch.int64), {}, "none")
    assert float(ref.loss[0, 0]) == round_exact(exact, "float32").nearest != 0.0
    assert float(torch.log_softmax(x, 1)[0, 0]) == 0.0


# ---- nll_loss -----------------------------------------------------------------------------------

def test_nll_loss_float16_mean_overflows_in_the_dtype_sum():
    """40000 log-probabilities near −2.3: their sum, −92103, is beyond float16 (65504) though
    the mean is not; summed in the dtype (naive) the mean is −inf → inf, the reference is the
    exact mean rounded once."""
    loss = LOSSES["nll_loss"]
    n, c = 40000, 10
    g = torch.Generator().manual_seed(1)
    x = loss.make_input(torch.randn(n, c, generator=g, dtype=torch.float64), torch.float16)
    t = torch.randint(0, c, (n,), generator=g)
    ref = reference(loss, x, t, {}, "mean")
    MP.dps = 40
    exact = -MP.fsum(MP.mpf(v) for v in x.double()[torch.arange(n), t].tolist()) / n
    assert float(ref.reduced) == round_exact(exact, "float16").nearest
    assert math.isfinite(float(ref.reduced))
    assert loss.implementations["naive"].fn(x, t, "mean").item() == INF
    assert loss.implementations["stable"].fn(x, t, "mean").item() == float(ref.reduced)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_loss_torch_agrees_on_weights_and_ignore_index(dtype):
    loss = LOSSES["nll_loss"]
    x = torch.log_softmax(torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 1)
    x = x.to(dtype)
    t = torch.tensor([0, 1, 2, 3, -100, 1, 2, 0, -100])
    w = torch.tensor([0.5, 2.0, 0.0, 1.25], dtype=dtype)
    opts = {"weight": w, "ignore_index": -100}
    ref = reference(loss, x, t, opts, "mean")
    torch_value = loss.implementations["torch"].fn(x, t, "mean", **opts)
    assert abs(float(torch_value) - float(ref.reduced)) <= 4 * float(torch.finfo(dtype).eps) * abs(float(ref.reduced))


# ---- (N, C, d…) inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_name,soft", [("cross_entropy", False), ("cross_entropy", True), ("nll_loss", False)])
def test_spatial_reference_is_that_of_the_rows(loss_name, soft):
    """(N, C, d1, d2) against the same values as rows (N·d1·d2, C): bit for bit, loss,
    gradient and an upstream gradient alike."""
    loss = LOSSES[loss_name]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 2, 5, generator=g)
    if soft:
        t = torch.softmax(torch.randn(3, 4, 2, 5, generator=g), 1)
        t_rows = t.movedim(1, -1).reshape(-1, 4)
    else:
        t = torch.randint(0, 4, (3, 2, 5), generator=g)
        t_rows = t.reshape(-1)
    up = torch.randn(3, 2, 5, generator=g)
    rows = x.movedim(1, -1).reshape(-1, 4)
    for reduction, u, u_rows in (("none", up, up.reshape(-1)), ("mean", None, None)):
        a = reference(loss, x, t, {}, reduction, grad_output=u)
        b = reference(loss, rows, t_rows, {}, reduction, grad_output=u_rows)
        assert tuple(a.loss.shape) == (3, 2, 5)
        assert torch.equal(a.loss.reshape(-1), b.loss)
        assert torch.equal(a.grad.movedim(1, -1).reshape(-1, 4), b.grad)
        assert a.value == b.value


def test_spatial_config_axis_and_its_errors():
    base = "name: s\nlosses: [cross_entropy]\nscales: [1]\nbatch_sizes: [2]\ndtypes: [float32]\ndistributions: [normal]\n"
    cfg = parse_config(base + "spatial: [[], [3, 4]]\n", "<t>")
    assert cfg.spatial == ("none", "3x4") and cfg.as_dict()["spatial"] == [[], [3, 4]]
    shapes = [sweep.point_data(LOSSES["cross_entropy"], c, 0).inp.shape for c in sweep.cases(cfg)]
    assert shapes == [(2, 10), (2, 10, 3, 4)]
    for bad in ("[[0]]", "[3]", "[[2.5]]", "[[2], [2]]"):
        with pytest.raises(ConfigError) as e:
            parse_config(base + f"spatial: {bad}\n", "<t>")
        assert "spatial" in str(e.value)
    with pytest.raises(ConfigError, match="dims"):
        parse_config(base + "dims: [1]\n", "<t>")


# pytorch#85791: F.cross_entropy on float16 (20, 14749, 1025) logits gives inf (true 9.645); at
# (20, 100, 1025) the float16 sum of 20500 losses near 5 passes 65504 as well.
SPATIAL_85791 = """\
name: issue85791
losses: [cross_entropy]
implementations: [stable, torch]
scales: [1]
batch_sizes: [20]
classes: [100]
spatial: [[1025]]
dtypes: [float16]
distributions: [normal]
timing: false
"""


def _independent_mean(x: torch.Tensor, t: torch.Tensor) -> float:
    """The exact mean cross entropy to ~1e-15, from float64 log-sum-exp rows and math.fsum."""
    rows = x.double().movedim(1, -1).reshape(-1, x.shape[1]).numpy()
    tt = t.reshape(-1).numpy()
    m = rows.max(1)
    lse = m + np.log(np.exp(rows - m[:, None]).sum(1))
    return math.fsum((lse - rows[np.arange(len(tt)), tt]).tolist()) / len(tt)


@pytest.fixture(scope="module")
def point_85791():
    cfg = parse_config(SPATIAL_85791, "<test>")
    (case,) = sweep.cases(cfg)
    return cfg, case, sweep.point_data(LOSSES["cross_entropy"], case, cfg.seed)


def test_pytorch_85791_bench(point_85791):
    cfg, case, data = point_85791
    assert tuple(data.inp.shape) == (20, 100, 1025) and data.inp.dtype == torch.float16
    records = {r["impl"]: r for r in sweep.run(cfg, 2)}
    true = _independent_mean(data.inp, data.target)
    assert 4.5 < true < 6  # finite, far below float16's range
    torch_f = records["torch"]["forward"]
    assert torch_f["value"] == INF and math.isfinite(torch_f["reference"])
    assert abs(torch_f["reference"] - float(torch.tensor(true).half())) == 0
    assert records["stable"]["forward"]["reduced_ulp"] == 0


def test_pytorch_85791_probe(point_85791, tmp_path):
    _, _, data = point_85791
    torch.save(data.inp, tmp_path / "x.pt")
    torch.save(data.target, tmp_path / "t.pt")
    result = api.probe("cross_entropy", str(tmp_path / "x.pt"), str(tmp_path / "t.pt"))
    by = {r["impl"]: r for r in result.results}
    assert result.dtype == "float16"
    assert by["torch"]["forward"]["value"] == INF
    assert result.reference["forward"] == float(torch.tensor(_independent_mean(data.inp, data.target)).half())


# ---- probe --grad-output ------------------------------------------------------------------------

def test_probe_grad_output_values_and_errors():
    runner = CliRunner()
    args = ["probe", "cross_entropy", "--input", "[[1, 2, 3], [3, 1, -2]]", "--target", "[0, 2]"]
    ok = runner.invoke(main, [*args, "--reduction", "none", "--grad-output", "[2, -0.5]", "--json"])
    assert ok.exit_code == 0, ok.output
    res = api.probe("cross_entropy", "[[1, 2, 3], [3, 1, -2]]", "[0, 2]", reduction="none", grad_output="[2, -0.5]")
    plain = api.probe("cross_entropy", "[[1, 2, 3], [3, 1, -2]]", "[0, 2]", reduction="none")
    assert torch.equal(res.ref.grad, torch.stack([2 * plain.ref.grad[0], -0.5 * plain.ref.grad[1]]))
    assert res.case.options == (("grad_output", "given"),)
    assert "upstream gradient: given" in res.render()
    named = api.probe("cross_entropy", "[[1, 2, 3], [3, 1, -2]]", "[0, 2]", reduction="none", grad_output="zeros")
    assert float(named.ref.grad.abs().sum()) == 0.0
    assert_one_error_line(runner.invoke(main, [*args, "--grad-output", "ones"]), "--grad-output", "none")
    assert_one_error_line(
        runner.invoke(main, [*args, "--reduction", "none", "--grad-output", "[1, 2, 3]"]), "--grad-output", "(2,)"
    )


def test_probe_spatial_input():
    res = api.probe("cross_entropy", "[[[1, 2], [3, 4]], [[3, 1], [-2, 0]]]", "[[0, 1], [1, 1]]", dtype="float32")
    rows = api.probe("cross_entropy", "[[1, 3], [2, 4], [3, -2], [1, 0]]", "[0, 1, 1, 1]", dtype="float32")
    assert res.reference["value"] == rows.reference["value"]
    assert all(r["status"] == "ok" for r in res.results)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_log_softmax_stable_never_breaks(dtype):
    """As tests/test_losses.py's for the losses: every value set and scale, both layouts, every
    upstream gradient: `stable` within an ULP of the reference, ±inf limits included."""
    cfg = parse_config(
        "name: ls\nlosses: [log_softmax]\nimplementations: [stable]\nscales: [1, 10000]\nbatch_sizes: [16]\n"
        f"classes: [6]\ndtypes: [{dtype}]\n"
        "distributions: [normal, extreme, confident_correct, ties, dominant, target_min, nonfinite]\n"
        "reductions: [none, mean, sum]\ngrad_outputs: [ones, random, onehot]\ndims: [-1, 0]\ntiming: false\n",
        "<test>",
    )
    records = sweep.run(cfg, 1)
    assert len(records) == 7 * 2 * 2 * 5
    bad = [
        (r["distribution"], r["scale"], r["options"], r["reduction"], r["forward"]["max_ulp"], r["backward"]["max_ulp"])
        for r in records
        if r["forward"]["max_ulp"] > 1 or r["backward"]["max_ulp"] > 1 or r["forward"]["nan"] or r["backward"]["nan"]
    ]
    assert not bad, bad[:10]
