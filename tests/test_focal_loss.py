"""focal_loss and softmax_focal_loss (issue 18 item 4): the references against mpmath at γ = 0,
γ < 1, γ > 1 and with α, hard and soft targets; `stable` without NaN where the textbook
derivative has (1 − p_t)^(γ−1) = ∞; the threads as custom implementations written like the
buggy code — optax #1267 (γ = 0.0 at logit 1000: NaN gradient), optax #1346 (NaN Hessian at
logit 100 for γ < 2), kornia #918 / torchvision's expression (γ = 0.5 at logit 100), sam3 #576
(a backward that forms (1 − p_t)^(γ−1) at γ = 0) — with the correct values from mpmath."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_reference import MP, Checker, _logits, exact_focal, exact_softmax_focal, needs_longdouble, round_exact

from losscheck import reference as R, results, sweep
from losscheck.cli import main
from losscheck.config import parse_config
from losscheck.dtypes import FORMATS
from losscheck.errors import ConfigError
from losscheck.losses import LOSSES, reference

BINARY, MULTI = LOSSES["focal_loss"], LOSSES["softmax_focal_loss"]
DTYPES = ["float32", "bfloat16", "float16", pytest.param("float64", marks=needs_longdouble)]
OPTIONS = [{"gamma": 0.0}, {"gamma": 0.25}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 1.5}, {"alpha": 0.75}]


def certify_with(loss, inp, target, options) -> Checker:
    """test_reference.certify with the loss's options: raw within 1/64 ULP, rounded correctly."""
    name = {f.torch_dtype: n for n, f in FORMATS.items()}[inp.dtype]
    chk = Checker(name)
    x = R.to_work(inp, R.work_dtype(inp.dtype))
    t = target.double().numpy() if target.is_floating_point() else target.numpy()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lw, gw = loss.reference_chunk(x, t, **options)
    ref = reference(loss, inp, target, options)
    exact = functools.partial(exact_softmax_focal if loss.multiclass else exact_focal, **options)
    xs, n, losses = inp.double().numpy(), inp.shape[0], []
    for i in range(n):
        lv, gv = exact(xs[i].tolist() if loss.multiclass else float(xs[i]),
                       int(t[i]) if loss.multiclass else float(t[i]))
        losses.append(lv)
        chk.raw(lw[i], lv, f"loss[{i}] x={xs[i]} t={t[i]}")
        chk.rounded_(float(ref.loss[i]), lv, f"rounded loss[{i}] x={xs[i]} t={t[i]}")
        for j, g in (enumerate(gv) if loss.multiclass else [(None, gv)]):
            idx = (i, j) if loss.multiclass else (i,)
            chk.raw(gw[idx], g, f"grad{list(idx)} x={xs[i]} t={t[i]}")
            chk.rounded_(float(ref.grad[idx]), g / n, f"rounded grad/N{list(idx)} x={xs[i]}")
    chk.rounded_(float(ref.mean), MP.fsum(losses) / n, "mean")
    chk.done()
    return chk


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("case", ["normal_30", "extreme_100", "nonfinite_1"])
def test_binary_reference_matches_mpmath_with_options(case, options, name):
    inp, target = _logits("focal_loss", name, case)
    assert certify_with(BINARY, inp, target, options).rounded > 40


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("case", ["normal_30", "confident_correct", "dominant_10000", "undefined"])
def test_multiclass_reference_matches_mpmath_with_options(case, options, name):
    inp, target = _logits("softmax_focal_loss", name, case)
    assert certify_with(MULTI, inp, target, options).rounded > 40


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("options", [{}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 0.0}])
def test_binary_soft_targets_reference_matches_mpmath(options, name):
    inp, hard = _logits("focal_loss", name, "normal_30")
    rng = np.random.default_rng(3)
    soft = 0.9 * hard.double().numpy() + 0.1 * rng.uniform(0, 1, hard.shape)
    soft[:3] = [0.5, 0.25, 0.75]  # dyadic: σ(x) − y cancels exactly at x = 0 only
    target = R.round_to(torch.from_numpy(soft), inp.dtype)
    certify_with(BINARY, inp, target, options)


# ---- stable: no NaN where 1 − p_t rounds to 0 -----------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stable_is_finite_and_close_where_p_t_rounds_to_one(dtype, gamma):
    x = torch.tensor([100.0, -100.0, 30.0, -30.0, 18.0, 1e4, -1e4, 0.5], dtype=dtype)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=dtype)
    x.requires_grad_(True)
    loss = BINARY.implementations["stable"].fn(x, y, "sum", gamma=gamma)
    loss.backward()
    ref = reference(BINARY, x.detach(), y, {"gamma": gamma}, "sum")
    assert torch.equal(x.grad, ref.grad) or (x.grad - ref.grad).abs().max() <= ref.grad.abs().max() * 2 ** -7
    assert x.grad.isfinite().all() and loss.isfinite()
    # The textbook's autograd NaNs there for 0 < γ < 1 (and γ = 0 in the naive's log(0)).
    x.grad = None
    BINARY.implementations["torch"].fn(x, y, "sum", gamma=gamma).backward()
    assert bool(x.grad.isnan().any()) == (0 < gamma < 1)


# ---- the threads, as custom implementations written like the buggy code ---------------------

def _sigmoid_focal_exact_grad(x: float, y: float, gamma: float, alpha: float = -1.0):
    return exact_focal(x, y, gamma, alpha)[1]


def test_optax_1267_gamma_zero_float_at_logit_1000():
    """optax ≤ 0.2.4: ce·(1 − p_t)**γ with γ = 0.0 (a float): d/dm m^0.0 = 0·m^−1 = NaN at
    m = 0 in JAX. The gradient is σ(x) − y = −σ(−1000), which rounds to −0 in float32."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy

    def optax_0_2_4(logits, labels, gamma):  # the transcription of the library code
        p = jax.nn.sigmoid(logits)
        ce = optax.sigmoid_binary_cross_entropy(logits, labels)
        p_t = p * labels + (1 - p) * (1 - labels)
        return ce * ((1 - p_t) ** gamma)

    g = jax.grad(optax_0_2_4)(jnp.float32(1000.0), jnp.float32(1.0), 0.0)
    assert math.isnan(float(g))
    exact = _sigmoid_focal_exact_grad(1000.0, 1.0, 0.0)
    x, y = torch.tensor([1000.0]), torch.tensor([1.0])
    ref = reference(BINARY, x, y, {"gamma": 0.0}, "sum")
    assert float(ref.grad[0]) == round_exact(exact, "float32").nearest == 0.0  # −σ(−1000): −0
    x = torch.tensor([30.0], dtype=torch.float64)  # where the exact gradient is a float64 number
    exact = _sigmoid_focal_exact_grad(30.0, 1.0, 0.0)
    assert float(reference(BINARY, x, y.double(), {"gamma": 0.0}, "sum").grad[0]) == \
        round_exact(exact, "float64").nearest
    assert float(exact) == pytest.approx(-math.exp(-30) / (1 + math.exp(-30)), rel=1e-15)


def test_optax_1346_hessian_at_logit_100_for_gamma_below_2():
    """optax #1346: (1 − p_t)^γ at logit 100 has a NaN second derivative for 1 < γ < 2
    (γ(γ−1)·0^(γ−2) = ∞ times σ'' = 0) and a NaN first one for γ < 1. losscheck audits
    gradients, not Hessians: the gradient is checked through the reference, the Hessian
    against mpmath's derivative of the exact gradient."""
    x0, y0 = 100.0, 1.0
    for gamma in (0.5, 1.5):
        x = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
        y = torch.tensor([y0], dtype=torch.float64)
        (g,) = torch.autograd.grad(BINARY.implementations["torch"].fn(x, y, "sum", gamma=gamma), x,
                                   create_graph=True)
        if gamma < 1:
            assert g.isnan().all()
            continue
        (h,) = torch.autograd.grad(g.sum(), x)
        assert h.isnan().all()
        exact_h = MP.diff(lambda v, gamma=gamma: exact_focal(v, y0, gamma)[1], MP.mpf(x0))
        assert exact_h > 0 and MP.isfinite(exact_h)
    # The gradient at γ = 0.5, where the buggy form NaNs: the reference is the correctly rounded one.
    exact = _sigmoid_focal_exact_grad(x0, y0, 0.5)
    ref = reference(BINARY, torch.tensor([x0], dtype=torch.float64), torch.tensor([y0], dtype=torch.float64),
                    {"gamma": 0.5}, "sum")
    if R.work_dtype(torch.float64) is not np.float64:  # long double: certified to 1/64 ULP
        assert float(ref.grad[0]) == round_exact(exact, "float64").nearest


SAM3_576 = '''
import torch
import torch.nn.functional as F


class _Reduced(torch.autograd.Function):
    """sam3's reduced Triton focal loss, its backward transcribed: (1 − p_t)**(γ − 1) first."""

    @staticmethod
    def forward(ctx, x, y, alpha, gamma):
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        a_t = alpha * y + (1 - alpha) * (1 - y)
        ctx.save_for_backward(x, y)
        ctx.alpha, ctx.gamma = alpha, gamma
        return (a_t * ce * (1 - p_t) ** gamma).mean()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        a_t = alpha * y + (1 - alpha) * (1 - y)
        tmp = (1 - p_t) ** (gamma - 1)          # 0 ** -1 = inf at gamma = 0, p_t = 1
        d_pt = (2 * y - 1) * p * (1 - p)
        grad = a_t * (-gamma * tmp * d_pt * ce + (1 - p_t) * tmp * (p - y))
        return grad * g / x.numel(), None, None, None


def sam3_focal(x, y, reduction="mean", gamma=2.0, alpha=-1.0):
    alpha = 0.5 if alpha < 0 else alpha
    if reduction == "none":  # per element (the sweep's forward audit): the plain formula
        p_t = torch.sigmoid(x) * y + (1 - torch.sigmoid(x)) * (1 - y)
        a_t = alpha * y + (1 - alpha) * (1 - y)
        return a_t * F.binary_cross_entropy_with_logits(x, y, reduction="none") * (1 - p_t) ** gamma
    assert reduction == "mean"
    return _Reduced.apply(x, y, alpha, gamma)
'''


def test_sam3_576_gamma_zero_backward_nan(tmp_path):
    (tmp_path / "sam3.py").write_text(SAM3_576)
    import importlib.util

    spec = importlib.util.spec_from_file_location("sam3_576", tmp_path / "sam3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = torch.tensor([18.0], requires_grad=True), torch.tensor([1.0])
    loss = mod.sam3_focal(x, y, gamma=0.0, alpha=0.5)
    loss.backward()
    assert x.grad.isnan().all()  # the thread's output (its Triton forward also printed a loss of 0)
    exact = _sigmoid_focal_exact_grad(18.0, 1.0, 0.0, 0.5)  # α_t·(σ(x) − y) = −σ(−18)/2
    assert float(exact) == pytest.approx(-0.5 / (1 + math.exp(18)), rel=1e-15)
    ref = reference(BINARY, x.detach(), y, {"gamma": 0.0, "alpha": 0.5})
    assert float(ref.grad[0]) == round_exact(exact, "float32").nearest
    x.grad = None
    BINARY.implementations["stable"].fn(x, y, gamma=0.0, alpha=0.5).backward()
    assert float(x.grad[0]) == round_exact(exact, "float32").nearest


FOCAL_CONFIG = """\
name: focal
losses: [focal_loss]
implementations: [stable, torch]
scales: [1, 100]
batch_sizes: [64]
dtypes: [float32]
distributions: [normal]
gammas: [0, 0.5, 2]
alphas: [-1, 0.25]
timing: false
"""


def test_a_sweep_finds_the_nan_gradients_of_the_buggy_forms(tmp_path):
    (tmp_path / "sam3.py").write_text(SAM3_576)
    cfg = tmp_path / "focal.yaml"
    cfg.write_text(FOCAL_CONFIG)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots",
                                       "--impl", f"focal_loss={tmp_path / 'sam3.py'}:sam3_focal"])
    assert result.exit_code in (0, 1), result.output + result.stderr
    recs = results.load(out / "focal.json")["records"]
    assert {r["status"] for r in recs} == {"ok"}, [r["message"] for r in recs if r["status"] != "ok"]

    def at(impl, scale, gamma, alpha=-1.0):
        (rec,) = [r for r in recs if r["impl"] == impl and r["scale"] == scale
                  and r["options"].get("gamma", 2.0) == gamma and r["options"].get("alpha", -1.0) == alpha]
        return rec

    for gamma in (0.0, 0.5, 2.0):
        stable = at("stable", 100.0, gamma)
        assert stable["backward"]["nan"] == 0 and stable["backward"]["max_bits"] < 2, stable["backward"]
    assert at("torch", 100.0, 0.5)["backward"]["nan"] > 0  # torchvision's expression, γ < 1
    assert at("torch", 100.0, 0.0)["backward"]["nan"] == 0  # torch's pow special-cases exponent 0
    assert at("torch", 1.0, 0.5)["backward"]["nan"] == 0
    assert at("sam3_focal", 100.0, 0.0, 0.25)["backward"]["nan"] > 0  # sam3 #576
    assert at("sam3_focal", 1.0, 0.0, 0.25)["backward"]["nan"] == 0


# ---- the config ----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,fragment", [
    ("gammas", "[-1]", "bad value -1"), ("gammas", "[a]", "bad value 'a'"), ("gammas", "[1, 1]", "duplicate"),
    ("alphas", "[1.5]", "bad value 1.5"), ("alphas", "[-0.5]", "bad value -0.5")])
def test_focal_options_errors(key, value, fragment):
    text = FOCAL_CONFIG.replace(f"{key}: ", f"{key}: {value}\n_old: ")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("_old"))
    with pytest.raises(ConfigError) as info:
        parse_config(text, "focal.yaml")
    assert info.value.key == key and fragment in str(info.value)


def test_focal_option_axes():
    cfg = parse_config(FOCAL_CONFIG.replace("focal_loss]", "focal_loss, softmax_focal_loss, cross_entropy]"))
    assert cfg.option_sets("cross_entropy") == [{}]  # no focal axes there
    sets = cfg.option_sets("softmax_focal_loss")
    assert {(o.get("gamma", 2.0), o.get("alpha", -1.0)) for o in sets} == {
        (g, a) for g in (0.0, 0.5, 2.0) for a in (-1.0, 0.25)}
    case = next(c for c in sweep.cases(cfg) if dict(c.options).get("gamma") == 0.5)
    data = sweep.point_data(LOSSES[case.loss], case, 0)
    assert data.options["gamma"] == 0.5
    assert parse_config(cfg_text := FOCAL_CONFIG).as_dict()["gammas"] == [0.0, 0.5, 2.0]
    assert parse_config(cfg_text).as_dict()["alphas"] == [-1.0, 0.25]
