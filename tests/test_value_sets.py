"""Value sets beyond random sampling (inputs.py) and the limits at ±inf logits.

* the distributions `ties`, `dominant`, `target_min` (multi-class) and `nonfinite` (logit
  losses): which losses they apply to, their shapes and defining properties;
* the reference's limits at ±inf logits, in both working precisions, with numpy's
  floating-point warnings raised as errors;
* `stable` returns exactly those limits (0 ULP, NaN only where the reference is NaN),
  forward and backward, where `naive` and torch return NaN (measured behaviour, asserted).

The reference's limits are also certified against mpmath in tests/test_reference.py
(`_exact_limit`: a path oracle with no case analysis).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losscheck import inputs
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, reference
from helpers import FLAT_LOSSES
from losscheck.losses import bce_with_logits as bcewl_module
from losscheck.losses import cross_entropy as ce_module
from losscheck.metrics import ErrorStats, ulp_distance
from test_reference import MP, round_exact  # the integer-exact rounding oracle

INF = math.inf
NAN = math.nan
LONGDOUBLE_OK = np.finfo(np.longdouble).nmant >= 63
needs_longdouble = pytest.mark.skipif(
    not LONGDOUBLE_OK, reason="float64 references need x86 long double (64-bit significand)")
DTYPES = [pytest.param(n, marks=needs_longdouble) if n == "float64" else n for n in FORMATS]
WORKS = [np.float64, pytest.param(np.longdouble, marks=needs_longdouble)]
NEW_MULTICLASS = ("ties", "dominant", "target_min")


def _dtype(name):
    return FORMATS[name].torch_dtype


def _gen(loss_name, batch, classes, scale, dist, seed=0):
    """The generator's float64 CPU tensors, as numpy arrays (the checks below are numpy)."""
    loss = LOSSES[loss_name]
    x, y = inputs.generate(loss_name, loss.multiclass, batch, classes, scale, dist, seed)
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    return x.numpy(), y.numpy()


def _make(loss_name, x, y, name):
    loss = LOSSES[loss_name]
    return loss.make_input(np.asarray(x, dtype=np.float64), _dtype(name)), \
        loss.make_target(np.asarray(y), _dtype(name))


def _run(loss_name, impl, inp, target):
    """(per-element loss, gradient of the mean loss), as the sweep computes them."""
    fn = LOSSES[loss_name].implementations[impl].fn
    with torch.no_grad():
        elements = fn(inp, target, "none")
    xg = inp.detach().clone().requires_grad_(True)
    mean = fn(xg, target, "mean")
    mean.backward()
    return elements, xg.grad, mean.detach()


def _same(a, b):
    """Bitwise-equal up to ±0 and NaN payloads: 0 ULP everywhere (NaN against NaN is 0)."""
    if a.numel() == 0:
        return b.numel() == 0
    return float(ulp_distance(a.reshape(-1), b.reshape(-1)).max()) == 0.0


# ---- which distributions apply to which loss ---------------------------------------------

def test_applies_per_kind_of_loss():
    expected = {  # loss: the new distributions that apply to it
        "bce": set(),
        "bce_with_logits": {"nonfinite"},
        "sigmoid_bce": {"nonfinite"},
        "cross_entropy": {"ties", "dominant", "target_min", "nonfinite"},
        "sharded_cross_entropy": {"ties", "dominant", "target_min", "nonfinite"},
        "nll_loss": {"ties", "dominant", "target_min"},  # log-probabilities: no ±inf logits
        "token_logprobs": {"ties", "dominant", "target_min", "nonfinite"},
        "entropy": {"ties", "dominant", "target_min", "nonfinite"},
        "focal_loss": {"nonfinite"},
        "softmax_focal_loss": {"ties", "dominant", "target_min", "nonfinite"},
    }
    new = set(NEW_MULTICLASS) | {"nonfinite"}
    for name, loss in FLAT_LOSSES.items():
        got = {d for d in inputs.DISTRIBUTIONS if inputs.applies(d, loss.multiclass, loss.input_kind)}
        assert got & new == expected[name], name
        assert set(inputs.COMMON_DISTRIBUTIONS) <= got  # the old five apply everywhere
        assert inputs.distributions_for(loss.multiclass, loss.input_kind) == \
            tuple(d for d in inputs.DISTRIBUTIONS if d in got)
    with pytest.raises(ValueError, match="unknown distribution"):
        inputs.applies("gaussian", True, "logits")


def test_every_distribution_is_described():
    assert list(inputs.DESCRIPTIONS) == list(inputs.DISTRIBUTIONS)
    assert len(set(inputs.DISTRIBUTIONS)) == len(inputs.DISTRIBUTIONS)


@pytest.mark.parametrize("dist", NEW_MULTICLASS)
def test_multiclass_value_sets_are_refused_for_binary_losses(dist):
    with pytest.raises(ValueError, match="multi-class losses only"):
        inputs.generate("bce_with_logits", False, 8, None, 10.0, dist, 0)


def _applicable():
    for name, loss in FLAT_LOSSES.items():
        for d in inputs.distributions_for(loss.multiclass, loss.input_kind):
            yield name, d


@pytest.mark.parametrize("loss_name,dist", list(_applicable()))
def test_shapes_labels_and_determinism(loss_name, dist):
    loss = LOSSES[loss_name]
    x, y = _gen(loss_name, 13, 7, 3.0, dist, seed=5)
    assert x.dtype == np.float64
    assert x.shape == ((13, 7) if loss.multiclass else (13,))
    assert not np.isnan(x).any()
    if loss.multiclass:
        assert y.shape == (13,) and y.min() >= 0 and y.max() < 7
    else:
        assert y.shape == (13,) and set(y.tolist()) <= {0.0, 1.0}
    x2, y2 = _gen(loss_name, 13, 7, 3.0, dist, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


# ---- ties, dominant, target_min ------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("classes", [2, 7, 1000])
def test_ties_reference_is_log_c_exactly(name, classes):
    n = 8
    x, t = _gen("cross_entropy", n, classes, 1e8, "ties")
    assert (x == 1e8).all()
    inp, target = _make("cross_entropy", x, t, name)
    assert (inp == inp[0, 0]).all()  # still all tied after rounding (float16: clipped to 65504)
    ref = reference(LOSSES["cross_entropy"], inp, target)
    assert ref.loss.double().tolist() == [round_exact(MP.log(classes), name).nearest] * n
    # gradient of the mean: (1/C − [j = t]) / N
    g = ref.grad.double()
    rows = torch.arange(n)
    assert g[rows, target].tolist() == [round_exact(-MP.mpf(classes - 1) / classes / n, name).nearest] * n
    other = torch.ones_like(g, dtype=torch.bool)
    other[rows, target] = False
    assert (g[other] == round_exact(MP.mpf(1) / classes / n, name).nearest).all()


@pytest.mark.parametrize("classes", [10, 1000])
def test_cross_entropy_ties_at_1e8_float32(classes):
    # logits all 1e8: stable's x − m is exactly 0 and gives log1p(C − 1) within 1 ULP of
    # log C; torch's max-shifted logsumexp does too; the naive exp(1e8) = inf gives inf/inf.
    x, t = _gen("cross_entropy", 16, classes, 1e8, "ties")
    inp, target = _make("cross_entropy", x, t, "float32")
    ref = reference(LOSSES["cross_entropy"], inp, target)
    stable, stable_grad, _ = _run("cross_entropy", "stable", inp, target)
    assert float(ulp_distance(stable, ref.loss).max()) <= 1
    assert float(ulp_distance(stable_grad, ref.grad).max()) <= 1
    torch_loss, _, _ = _run("cross_entropy", "torch", inp, target)
    assert float(ulp_distance(torch_loss, ref.loss).max()) <= 1
    naive, naive_grad, _ = _run("cross_entropy", "naive", inp, target)
    assert torch.isnan(naive).all() and torch.isnan(naive_grad).all()


@pytest.mark.parametrize("scale", [0.5, 30.0, 1e4])
def test_dominant_is_one_non_target_at_scale_and_zeros(scale):
    n, c = 64, 7
    x, t = _gen("cross_entropy", n, c, scale, "dominant")
    rows = np.arange(n)
    assert (x[rows, t] == 0).all()
    assert ((x == scale).sum(axis=1) == 1).all()
    assert ((x == 0).sum(axis=1) == c - 1).all()
    assert len(set(x.argmax(axis=1).tolist())) > 1  # the dominant class varies
    # the reference: loss = scale + log1p((C − 1)·e^−scale), correctly rounded
    inp, target = _make("cross_entropy", x, t, "float32")
    ref = reference(LOSSES["cross_entropy"], inp, target)
    s = MP.mpf(scale)
    expected = round_exact(s + MP.log1p((c - 1) * MP.exp(-s)), "float32").nearest
    assert ref.loss.double().tolist() == [expected] * n


@pytest.mark.parametrize("scale", [0.1, 1.0, 1e4])
def test_target_min_is_the_row_minimum(scale):
    n, c = 256, 7
    x, t = _gen("cross_entropy", n, c, scale, "target_min")
    rows = np.arange(n)
    xt = x[rows, t]
    assert (xt == x.min(axis=1)).all()
    assert (xt <= -scale).all()
    others = x.copy()
    others[rows, t] = np.inf
    # −scale, unless an N(0, 1) draw is below it: then the others' minimum
    assert (xt == np.minimum(-scale, others.min(axis=1))).all()
    if scale == 0.1:
        assert (xt < -scale).any()  # the rule matters at small scales
    if scale == 1e4:
        assert (xt == -scale).all()


# ---- nonfinite -----------------------------------------------------------------------------

def test_nonfinite_binary_has_every_inf_label_combination():
    x, y = _gen("bce_with_logits", 16, None, 5.0, "nonfinite")
    inf = np.isinf(x)
    assert inf.sum() == 8 and np.isfinite(x).sum() == 8
    assert {(float(a), float(b)) for a, b in zip(x[inf], y[inf])} == \
        {(INF, 0.0), (INF, 1.0), (-INF, 0.0), (-INF, 1.0)}
    assert (np.abs(x[~inf]) > 0).all() and np.abs(x[~inf]).max() > 5.0  # N(0, 1)·5
    for name in FORMATS:
        inp, _ = _make("bce_with_logits", x, y, name)
        assert torch.equal(torch.isinf(inp), torch.from_numpy(inf))
        assert torch.equal(inp[torch.from_numpy(inf)].double(), torch.from_numpy(x[inf]))


def _row_kind(row, t):
    pos, neg = np.isposinf(row), np.isneginf(row)
    if pos.sum() > 1 or neg.all():
        return "undefined"
    if pos[t]:
        return "target +inf"
    if pos.any():
        return "other +inf"
    if neg[t]:
        return "target -inf"
    if neg.any():
        return "masked"
    return "finite"


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_nonfinite_multiclass_has_every_kind_of_row(classes):
    x, t = _gen("cross_entropy", 16, classes, 5.0, "nonfinite")
    kinds = [_row_kind(row, ti) for row, ti in zip(x, t)]
    assert set(kinds) == {"masked", "target -inf", "target +inf", "other +inf"}, kinds
    assert all(k == ["masked", "target -inf", "target +inf", "other +inf"][i % 4] for i, k in enumerate(kinds))
    assert np.isfinite(x).any(axis=1)[np.array(kinds) != "target +inf"].all()
    for name in FORMATS:
        inp, _ = _make("cross_entropy", x, t, name)
        assert torch.equal(torch.isposinf(inp), torch.from_numpy(np.isposinf(x)))
        assert torch.equal(torch.isneginf(inp), torch.from_numpy(np.isneginf(x)))


def test_make_input_clips_finite_overflow_but_keeps_inf():
    x = np.array([1e39, -1e39, INF, -INF, 1.0, 7e4])
    y = np.zeros(6)
    f32, _ = _make("bce_with_logits", x, y, "float32")
    big = float(torch.finfo(torch.float32).max)
    assert f32.double().tolist() == [big, -big, INF, -INF, 1.0, 7e4]
    f16, _ = _make("bce_with_logits", x, y, "float16")
    assert f16.double().tolist() == [65504.0, -65504.0, INF, -INF, 1.0, 65504.0]
    ce, _ = _make("cross_entropy", x.reshape(2, 3), np.array([0, 1]), "bfloat16")
    bmax = float(torch.finfo(torch.bfloat16).max)
    assert ce.double().tolist() == [[bmax, -bmax, INF], [-INF, 1.0, 70144.0]]
    # probabilities: σ(±inf) is exactly 1 and 0, as σ(±1e39) is
    p, _ = _make("bce", x, y, "float32")
    assert p.double().tolist()[:4] == [1.0, 0.0, 1.0, 0.0]


# ---- the reference's limits ----------------------------------------------------------------

# Raise on any floating-point exception but underflow: the reference must produce its
# limits without inf − inf, 0·inf or overflow, even where no caller wraps it in np.errstate.
STRICT = dict(divide="raise", over="raise", invalid="raise")

BCEWL_LIMITS = [  # x, y, loss, gradient σ(x) − y
    (-INF, 0.0, 0.0, 0.0),
    (INF, 0.0, INF, 1.0),
    (INF, 1.0, 0.0, 0.0),
    (-INF, 1.0, INF, -1.0),
]


@pytest.mark.parametrize("work", WORKS)
def test_bce_with_logits_reference_limits(work):
    x = np.array([r[0] for r in BCEWL_LIMITS] + [0.0], dtype=work)
    y = np.array([r[1] for r in BCEWL_LIMITS] + [1.0])
    with np.errstate(**STRICT):
        loss, grad = bcewl_module.reference_chunk(x, y)
    assert loss.dtype == work and grad.dtype == work
    assert loss.tolist()[:4] == [r[2] for r in BCEWL_LIMITS]
    assert grad.tolist()[:4] == [r[3] for r in BCEWL_LIMITS]
    assert loss[4] == np.log(work(2)) and grad[4] == work(-0.5)


CE_LIMITS = [  # row, target, loss, gradient (NaN: undefined)
    ([0.0, INF, 1.0], 0, INF, [-1.0, 1.0, 0.0]),  # +inf non-target
    ([INF, 0.0, 1.0], 0, 0.0, [0.0, 0.0, 0.0]),  # +inf target
    ([-INF, INF, -INF], 0, INF, [-1.0, 1.0, 0.0]),  # −inf target, +inf other
    ([INF, -INF, 5.0], 1, INF, [1.0, -1.0, 0.0]),
    ([INF, INF, 0.0], 2, INF, [NAN, NAN, -1.0]),  # two +inf, finite target: loss still +inf
    ([INF, INF, 0.0], 0, NAN, [NAN, NAN, 0.0]),  # two +inf, one the target: undefined
    ([-INF, -INF, -INF], 1, NAN, [NAN, NAN, NAN]),  # all masked: undefined
]


@pytest.mark.parametrize("work", WORKS)
def test_cross_entropy_reference_limits(work):
    x = np.array([r[0] for r in CE_LIMITS], dtype=work)
    t = np.array([r[1] for r in CE_LIMITS])
    with np.errstate(**STRICT):
        loss, grad = ce_module.reference_chunk(x, t)
    assert loss.dtype == work and grad.dtype == work
    np.testing.assert_array_equal(loss.astype(np.float64), [r[2] for r in CE_LIMITS])
    np.testing.assert_array_equal(grad.astype(np.float64), [r[3] for r in CE_LIMITS])


@pytest.mark.parametrize("work", WORKS)
def test_cross_entropy_reference_single_class_limits(work):
    # C = 1: the loss is identically 0 (softmax of one logit is 1), so are its limits.
    x = np.array([[-INF], [INF], [3.0]], dtype=work)
    with np.errstate(**STRICT):
        loss, grad = ce_module.reference_chunk(x, np.zeros(3, dtype=np.int64))
    assert loss.tolist() == [0.0] * 3 and grad.reshape(-1).tolist() == [0.0] * 3


@pytest.mark.parametrize("work", WORKS)
def test_cross_entropy_reference_masked_logits_are_probability_zero(work):
    # −inf logits of a row with a finite maximum: the loss and gradient of the row without
    # them (bit for bit), 0 at the masked places; a masked target: loss +inf, gradient −1.
    x = np.array([[1.5, -INF, -2.0, 0.25, -INF], [3.0, -INF, -INF, -INF, -1.0]], dtype=work)
    t = np.array([0, 4])
    with np.errstate(**STRICT):
        loss, grad = ce_module.reference_chunk(x, t)
        kept_loss, kept_grad = ce_module.reference_chunk(
            np.array([[1.5, -2.0, 0.25]], dtype=work), np.array([0]))
        row1_loss, row1_grad = ce_module.reference_chunk(np.array([[3.0, -1.0]], dtype=work), np.array([1]))
        masked_t_loss, masked_t_grad = ce_module.reference_chunk(
            np.array([[1.5, -INF, -2.0]], dtype=work), np.array([1]))
    assert loss[0] == kept_loss[0] and grad[0, [0, 2, 3]].tolist() == kept_grad[0].tolist()
    assert loss[1] == row1_loss[0] and grad[1, [0, 4]].tolist() == row1_grad[0].tolist()
    assert grad[0, [1, 4]].tolist() == [0.0, 0.0] and grad[1, 1:4].tolist() == [0.0] * 3
    assert masked_t_loss[0] == INF
    assert masked_t_grad[0, 1] == -1.0  # p_t − 1 with p_t = 0
    p = 1 / (1 + math.exp(-3.5))  # the other two: softmax of (1.5, −2.0)
    assert abs(masked_t_grad[0, 0] - p) < 1e-15 and abs(masked_t_grad[0, 2] - (1 - p)) < 1e-15


@pytest.mark.parametrize("work", WORKS)
def test_cross_entropy_reference_finite_rows_unchanged_next_to_infinite_ones(work):
    # A chunk with ±inf logits goes through the limit path; its finite rows must come out
    # bit for bit as in an all-finite chunk (the certified formulation).
    x, t = _gen("cross_entropy", 32, 9, 30.0, "normal")
    xi, ti = _gen("cross_entropy", 32, 9, 30.0, "nonfinite")
    xa, ta = x.astype(work), t
    both = np.concatenate([xa, xi.astype(work)])
    with np.errstate(**STRICT):
        loss, grad = ce_module.reference_chunk(xa, ta)
        loss2, grad2 = ce_module.reference_chunk(both, np.concatenate([ta, ti]))
    assert np.array_equal(loss, loss2[:32]) and np.array_equal(grad, grad2[:32])


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("loss_name", ["bce_with_logits", "cross_entropy"])
def test_reference_of_the_nonfinite_value_set_is_defined(loss_name, name):
    # The value set holds only rows with a defined limit: no NaN in the reference, and
    # every kind of infinity it is meant to produce.
    x, y = _gen(loss_name, 64, 10, 1e4, "nonfinite")
    inp, target = _make(loss_name, x, y, name)
    ref = reference(LOSSES[loss_name], inp, target)
    assert not torch.isnan(ref.loss).any() and not torch.isnan(ref.grad).any()
    assert (ref.loss == INF).any() and (ref.loss == 0).any()
    assert ref.mean.item() == INF


# ---- stable returns exactly the limits -----------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("loss_name", ["bce_with_logits", "cross_entropy"])
def test_stable_returns_the_limits_exactly(loss_name, name):
    for scale in (1.0, 1e4):
        x, y = _gen(loss_name, 64, 10, scale, "nonfinite")
        inp, target = _make(loss_name, x, y, name)
        ref = reference(LOSSES[loss_name], inp, target)
        loss, grad, mean = _run(loss_name, "stable", inp, target)
        # Exact (0 ULP): the loss and gradient of every element (binary) or row
        # (multi-class) with a +inf logit and of every binary −inf one, every loss whose
        # limit is +inf (a −inf target too), and the gradient at every ±inf logit (0 at a
        # masked one, −1 at a masked target, ±1 or 0 at a +inf one).
        limit = torch.isinf(inp) if inp.dim() == 1 else torch.isposinf(inp).any(1)
        assert limit.sum() >= 16 and (ref.loss == INF).sum() >= 16
        assert _same(loss[limit], ref.loss[limit]), (scale, loss[limit], ref.loss[limit])
        assert _same(grad[limit], ref.grad[limit]), (scale, grad[limit], ref.grad[limit])
        assert (loss[ref.loss == INF] == INF).all()
        at_inf = torch.isinf(inp)
        assert _same(grad[at_inf], ref.grad[at_inf])
        assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
        assert mean.item() == ref.mean.item() == INF
        # what is finite stays accurate (masked rows: the softmax of the other logits)
        assert float(ulp_distance(loss, ref.loss).max()) <= 4
        assert float(ulp_distance(grad, ref.grad).max()) <= 4


@pytest.mark.parametrize("name", DTYPES)
def test_stable_cross_entropy_matches_undefined_limits(name):
    # NaN exactly where the limit is undefined, the limit everywhere else.
    inp, target = _make("cross_entropy", [r[0] for r in CE_LIMITS], [r[1] for r in CE_LIMITS], name)
    ref = reference(LOSSES["cross_entropy"], inp, target)
    loss, grad, _ = _run("cross_entropy", "stable", inp, target)
    assert _same(loss, ref.loss), (loss, ref.loss)
    assert _same(grad, ref.grad), (grad, ref.grad)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref.loss))
    assert torch.equal(torch.isnan(grad), torch.isnan(ref.grad))


@pytest.mark.parametrize("name", DTYPES)
def test_stable_bce_with_logits_limits(name):
    x, y = [r[0] for r in BCEWL_LIMITS], [r[1] for r in BCEWL_LIMITS]
    inp, target = _make("bce_with_logits", x, y, name)
    loss, grad, _ = _run("bce_with_logits", "stable", inp, target)
    assert loss.double().tolist() == [r[2] for r in BCEWL_LIMITS]
    assert (grad * 4).double().tolist() == [r[3] for r in BCEWL_LIMITS]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stable_cross_entropy_random_infinities_float32(data):
    # Random rows mixing ±inf and finite logits: rows with a +inf logit or only −inf ones
    # are limits (0 ULP, NaN where the reference has it); masked rows stay within 4 ULPs.
    c = data.draw(st.integers(1, 6), label="classes")
    n = data.draw(st.integers(1, 5), label="rows")
    elem = st.one_of(st.sampled_from([INF, -INF]),
                     st.floats(-50, 50, width=32), st.floats(allow_nan=False, allow_infinity=False, width=32))
    rows = data.draw(st.lists(st.lists(elem, min_size=c, max_size=c), min_size=n, max_size=n))
    t = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    inp = torch.tensor(rows, dtype=torch.float32)
    ref = reference(LOSSES["cross_entropy"], inp, t)
    loss, grad, _ = _run("cross_entropy", "stable", inp, t)
    limit = torch.isposinf(inp).any(1) | torch.isneginf(inp).all(1)
    assert _same(loss[limit], ref.loss[limit]) and _same(grad[limit], ref.grad[limit])
    assert torch.equal(torch.isnan(loss), torch.isnan(ref.loss))
    assert torch.equal(torch.isnan(grad), torch.isnan(ref.grad))
    assert float(ulp_distance(loss, ref.loss).max()) <= 4
    assert float(ulp_distance(grad, ref.grad).max()) <= 4


# ---- what torch and the naive forms do at ±inf (measured on torch 2.13, CPU) -----------------

def test_torch_bce_with_logits_is_nan_at_x_minus_inf_y_0_and_x_inf_y_1_and_x_minus_inf_y_1():
    # Measured: torch's max(−x, 0) + log(e^−max + e^(−x−max)) form computes inf − inf at
    # three of the four combinations; only (+inf, 0) gives its limit +inf. Its gradient
    # (σ(x) − y) is right at all four.
    x = torch.tensor([r[0] for r in BCEWL_LIMITS])
    y = torch.tensor([r[1] for r in BCEWL_LIMITS])
    loss, grad, _ = _run("bce_with_logits", "torch", x, y)
    assert math.isnan(loss[0]) and math.isnan(loss[2]) and math.isnan(loss[3])
    assert loss[1].item() == INF
    assert (grad * 4).tolist() == [0.0, 1.0, 0.0, -1.0]
    ref = reference(LOSSES["bce_with_logits"], x, y)
    assert ref.loss.tolist() == [0.0, INF, 0.0, INF]
    fwd = ErrorStats(12.0)
    fwd.add(loss, ref.loss)
    # NaN where the reference is finite (0) and where it is +inf: all three counted (METRICS.md,
    # "Overflow": NaN is counted wherever the reference is not NaN), and infinitely wrong.
    assert fwd.nan == 3
    assert fwd.max_ulp == INF
    assert _same(F.binary_cross_entropy_with_logits(x, y, reduction="none")[1:2], ref.loss[1:2])


def test_naive_bce_with_logits_gradient_is_nan_at_every_infinite_logit():
    x = torch.tensor([r[0] for r in BCEWL_LIMITS])
    y = torch.tensor([r[1] for r in BCEWL_LIMITS])
    loss, grad, _ = _run("bce_with_logits", "naive", x, y)
    # σ = 1/(1 + e^−x) is exact (0 or 1), then y·log σ = 0·(−inf) = NaN where the limit is 0
    assert math.isnan(loss[0]) and math.isnan(loss[2])
    assert loss[1].item() == INF and loss[3].item() == INF
    assert torch.isnan(grad).all()


def test_torch_cross_entropy_is_nan_on_rows_with_a_plus_inf_logit():
    # Measured: F.cross_entropy handles −inf (masked) logits and a −inf target exactly as
    # the limits say, but any +inf logit makes the row's loss and gradient NaN (x − max
    # computes inf − inf), even where the limit is 0 (+inf target) or +inf (+inf other).
    rows = [[1.0, -INF, 2.0], [-INF, 0.0, 1.0], [INF, 0.0, 1.0], [0.0, INF, 1.0]]
    t = [0, 0, 0, 0]
    inp, target = _make("cross_entropy", rows, t, "float32")
    ref = reference(LOSSES["cross_entropy"], inp, target)
    loss, grad, _ = _run("cross_entropy", "torch", inp, target)
    assert float(ulp_distance(loss[:2], ref.loss[:2]).max()) <= 1
    assert float(ulp_distance(grad[:2], ref.grad[:2]).max()) <= 1
    assert ref.loss[2:].tolist() == [0.0, INF]
    assert torch.isnan(loss[2:]).all() and torch.isnan(grad[2:]).all()
    stable, stable_grad, _ = _run("cross_entropy", "stable", inp, target)
    assert _same(stable[2:], ref.loss[2:]) and _same(stable_grad[2:], ref.grad[2:])


@pytest.mark.parametrize("name", ["float32", pytest.param("float64", marks=needs_longdouble)])
def test_stable_cross_entropy_is_not_nan_where_x_minus_max_overflows(name):
    # Finite logits ±max: x − m overflows to −inf and TwoSum's error term is NaN (inf − inf);
    # before the error term was zeroed there, stable returned NaN loss and gradient.
    big = float(torch.finfo(_dtype(name)).max)
    inp, target = _make("cross_entropy", [[big, -big, 0.0], [big, -big, 0.0]], [0, 2], name)
    ref = reference(LOSSES["cross_entropy"], inp, target)
    loss, grad, _ = _run("cross_entropy", "stable", inp, target)
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    assert _same(loss, ref.loss) and _same(grad, ref.grad)


@pytest.mark.parametrize("work", WORKS)
def test_soft_target_on_a_finite_logit_beside_several_plus_inf_has_a_limit(work):
    # The split between two +inf logits is undefined, but the finite logit's probability is 0
    # whatever it is: −log p = +inf there, and its gradient entry W·p − c = −c. Only the +inf
    # entries are undefined (NaN). The same in `stable` (float32 and float64).
    x = np.array([[INF, INF, 0.0], [INF, INF, 0.0]], dtype=work)
    q = np.array([[0.0, 0.0, 1.0], [0.0, 0.25, 0.75]], dtype=work)
    with np.errstate(all="raise"):
        loss, grad = ce_module.reference_chunk(x, q)
    assert loss[0] == INF and math.isnan(loss[1])  # the second puts weight on a +inf logit
    assert grad[0, 2] == -1.0 and grad[1, 2] == -0.75
    assert np.isnan(grad[:, :2]).all()
    for dt in (torch.float32, torch.float64):
        inp = torch.tensor(x.astype(np.float64), dtype=dt)
        tq = torch.tensor(q.astype(np.float64), dtype=dt)
        ref = reference(LOSSES["cross_entropy"], inp, tq, {}, "none")
        out = ce_module.stable(inp, tq, "none")
        assert _same(out, ref.loss)
        xg = inp.clone().requires_grad_(True)
        ce_module.stable(xg, tq, "sum").backward()
        assert _same(xg.grad, ref.grad)


# ---- dominant_target and masked: the value sets of optax #1020 and #896 (issue 14 item 5) ----

def _point(loss_name, dist, dtype, batch, classes, scale, options=()):
    from losscheck import sweep

    case = sweep.Case(0, loss_name, "cpu", dtype, batch, classes, dist, float(scale), "mean", tuple(options))
    data = sweep.point_data(LOSSES[loss_name], case, seed=0)
    return data, reference(LOSSES[loss_name], data.inp, data.target, data.options, "mean")


@pytest.mark.parametrize("scale", [0.5, 20.0, 1e4])
def test_dominant_target_is_all_zeros_but_the_target(scale):
    x, t = _gen("cross_entropy", 16, 9, scale, "dominant_target")
    expected = np.zeros((16, 9))
    expected[np.arange(16), t] = scale
    assert np.array_equal(x, expected)


def test_masked_rows_hide_at_least_one_non_target_never_the_target():
    x, t = _gen("cross_entropy", 400, 6, 3.0, "masked")
    rows = np.arange(400)
    assert np.isfinite(x[rows, t]).all()
    masked = np.isneginf(x)
    assert (masked.sum(axis=1) >= 1).all() and not np.isposinf(x).any()
    assert 0.4 < masked.sum() / (400 * 5) < 0.75  # each other non-target with probability ½
    x2, _ = _gen("cross_entropy", 5, 1, 3.0, "masked")  # one class: nothing to mask
    assert np.isfinite(x2).all()


def test_masked_soft_targets_are_exactly_zero_at_minus_inf_logits():
    data, _ = _point("cross_entropy", "masked", "float32", 64, 7, 2.0, (("targets", "soft"),))
    masked = torch.isneginf(data.inp)
    assert masked.any() and bool((data.target[masked] == 0).all())
    assert bool((data.target[~masked] > 0).all())
    assert torch.allclose(data.target.double().sum(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-6)
    # Other value sets keep their soft targets as they were (no zero anywhere).
    other, _ = _point("cross_entropy", "nonfinite", "float32", 64, 7, 2.0, (("targets", "soft"),))
    assert bool((other.target > 0).all())


def _mp_cross_entropy(row, q):
    """−Σ q_j log p_j over q_j > 0 and its gradient (Σ q)·p − q, in mpmath (a −inf logit:
    p_j = 0); Σ q is 1 only up to the targets' rounding to the dtype."""
    finite = [MP.mpf(float(v)) for v in row if math.isfinite(v)]
    m = max(finite)
    s = MP.fsum(MP.exp(v - m) for v in finite)
    lse = m + MP.log(s)
    p = [MP.exp(MP.mpf(float(v)) - lse) if math.isfinite(v) else MP.mpf(0) for v in row]
    loss = MP.fsum(-MP.mpf(float(qj)) * (MP.mpf(float(v)) - lse) for v, qj in zip(row, q) if qj > 0)
    total = MP.fsum(MP.mpf(float(qj)) for qj in q)
    return loss, [total * pj - MP.mpf(float(qj)) for pj, qj in zip(p, q)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", pytest.param("float64", marks=needs_longdouble)])
@pytest.mark.parametrize("classes", [2, 7])
def test_masked_soft_reference_is_certified_by_mpmath(dtype, classes):
    """optax #896 (classes 2: logits [−inf, x], targets [0, 1], loss exactly 0): the reference
    is the correctly rounded −Σ q log p, gradient 0 at the masked logits."""
    data, ref = _point("cross_entropy", "masked", dtype, 8, classes, 3.0, (("targets", "soft"),))
    x, q = data.inp.double(), data.target.double()
    total = MP.mpf(0)
    for i in range(8):
        loss, grad = _mp_cross_entropy(x[i].tolist(), q[i].tolist())
        total += loss
        assert float(ref.loss[i]) == round_exact(loss, dtype).nearest, (i, loss)
        for j in range(classes):
            want = round_exact(grad[j] / 8, dtype)
            assert float(ref.grad[i, j]) in (want.nearest, want.below, want.above) if want.tie \
                else float(ref.grad[i, j]) == want.nearest, (i, j)
        if classes == 2:
            assert float(ref.loss[i]) == 0.0 and q[i].tolist() in ([0.0, 1.0], [1.0, 0.0])
    assert float(ref.reduced) == round_exact(total / 8, dtype).nearest


def test_dominant_target_reference_at_the_optax_1020_point():
    """bfloat16, vocabulary 128256, every logit 0 but the target's at 20: loss
    log1p(128255·e^−20) = 2.643183e-4, correctly rounded to bfloat16."""
    c = 128256
    data, ref = _point("cross_entropy", "dominant_target", "bfloat16", 2, c, 20)
    exact = MP.log1p((c - 1) * MP.exp(-20))
    assert abs(float(exact) - 2.643183e-4) < 1e-10
    want = round_exact(exact, "bfloat16").nearest
    assert ref.loss.tolist() == [want, want] and float(ref.reduced) == want
    assert ref.value == pytest.approx(float(exact), rel=1e-12)
    # The target's gradient is −(1 − p_t)/2 per row of the mean, every other p_j/2.
    p_other = MP.exp(-20) / (1 + (c - 1) * MP.exp(-20))
    target = data.target.tolist()
    assert float(ref.grad[0, target[0]]) == round_exact(-(1 - (1 - (c - 1) * p_other)) / 2, "bfloat16").nearest
    assert float(ref.grad[0, (target[0] + 1) % c]) == round_exact(p_other / 2, "bfloat16").nearest
