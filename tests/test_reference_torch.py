"""The torch port of the reference (issue 13, step 1): float32/float16/bfloat16 targets are
evaluated in float64 tensors on the input's device.

* `round_to` on tensors is correct rounding, where torch's own float64 -> float16/bfloat16
  casts double-round (they go through float32);
* each loss's tensor formulation gives the values of the numpy formulation it replaced
  (still in the tree as the float64 targets' extended path, run here in float64) to within
  a few float64 rounding errors — the libm's log1p and the order of row sums differ — with
  the same ±inf/NaN limits, on random, extreme and ±inf inputs with every option;
* nothing in that path goes through the host (no numpy, no `.cpu()`), and on CUDA it gives
  the CPU's reference (skipped without a GPU);
* `TensorCompensatedSum` recovers every rounding error like `CompensatedSum`.

The mpmath certification of the same path is in test_reference.py, test_options.py,
test_value_sets.py and test_zero_weight.py (numpy float64 arrays are run through it).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from losscheck import inputs
from losscheck import reference as R
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES, reference
from losscheck.losses import bce, bce_with_logits, cross_entropy as ce
from test_reference import round_exact, screened

MP = mpmath.MPContext()
MP.dps = 60
HALF = ["float16", "bfloat16"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: torch's thread pool only adds overhead (see test_options.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- round_to on tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("name", HALF)
def test_torch_casts_double_round_and_round_to_does_not(name):
    # 1 + u/2 + 2**-40 (u: the ULP at 1) is just above a tie: it rounds up. float64 -> float32
    # drops the 2**-40 and leaves the exact tie, which float32 -> half breaks to even (down).
    dt = FORMATS[name].torch_dtype
    u = 2.0 ** -(FORMATS[name].significand_bits - 1)
    values = torch.tensor([1 + u / 2 + 2.0**-40, -(1 + u / 2 + 2.0**-40), 1 + 3 * u / 2 - 2.0**-40],
                          dtype=torch.float64)
    exact = [round_exact(MP.mpf(float(v)), name).nearest for v in values]
    assert exact == [1 + u, -(1 + u), 1 + u]
    assert values.to(dt).double().tolist() != exact  # torch's direct cast: the test is not vacuous
    assert R.round_to(values, dt).double().tolist() == exact


@pytest.mark.parametrize("name", HALF)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_round_to_tensor_is_correct_rounding(name, data):
    # A whole tensor at once: values anywhere, near ties of the target (nudged by a few
    # float64 ULPs), in its subnormal range and beyond its largest value.
    dt = FORMATS[name].torch_dtype
    p = FORMATS[name].significand_bits
    fi = torch.finfo(dt)
    values = []
    for kind in data.draw(st.lists(st.sampled_from(["any", "tie", "subnormal", "huge"]), min_size=1, max_size=16)):
        if kind == "any":
            v = data.draw(st.floats(allow_nan=False, allow_infinity=False))
        elif kind == "subnormal":
            v = data.draw(st.floats(-float(fi.tiny), float(fi.tiny)))
        elif kind == "huge":
            v = data.draw(st.floats(float(fi.max) * 0.99, float(fi.max) * 1.01)) * data.draw(st.sampled_from([-1, 1]))
        else:
            base = float(torch.tensor(data.draw(st.floats(-3e38, 3e38))).to(dt))
            if not math.isfinite(base) or base == 0:
                continue
            ulp = 2.0 ** (math.frexp(abs(base))[1] - p)
            v = base + math.copysign(ulp / 2, base)
            for _ in range(data.draw(st.integers(0, 3))):
                v = float(np.nextafter(v, data.draw(st.sampled_from([-math.inf, math.inf]))))
        values.append(v)
    if not values:
        return
    got = R.round_to(torch.tensor(values, dtype=torch.float64), dt)
    assert got.dtype == dt
    assert got.double().tolist() == [round_exact(MP.mpf(v), name).nearest for v in values], values
    assert screened(values, dt) == got.double().tolist(), values  # the path of large tensors


def test_round_to_tensor_keeps_nan_and_infinities():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        out = R.round_to(torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=torch.float64), dt)
        assert math.isnan(out[0]) and out[1:3].double().tolist() == [math.inf, -math.inf]
        assert out[3] == 0 and math.copysign(1, float(out[3])) == -1


# ---- the tensor formulations against the numpy ones they replaced --------------------------------

def _close(t: torch.Tensor, a: np.ndarray, what: str, ulps: int = 4, row_scale=None) -> None:
    """The tensor values equal the numpy values to within `ulps` float64 ULPs, with the same
    NaNs and the same infinities. For gradients, ULPs of `row_scale` (or of the row's largest
    entry): smoothed and soft rows form W·p_j − c_j (W = Σ_j c_j), whose cancellation turns
    a last-bit difference in p_j (another order of the row sum) into one of W·ulp(p_j)."""
    a = np.asarray(a, dtype=np.float64)
    got = t.numpy()
    assert got.shape == a.shape, what
    assert (np.isnan(got) == np.isnan(a)).all(), what
    both = ~np.isnan(a)
    inf = np.isinf(a) & both
    assert (got[inf] == a[inf]).all(), what
    size = np.where(both & ~inf, np.abs(a), 0.0)
    if a.ndim == 2:
        size = np.maximum(size, size.max(axis=1, keepdims=True))
        if row_scale is not None:
            size = np.maximum(size, np.asarray(row_scale, dtype=np.float64)[:, None])
    fin = both & ~inf
    tol = ulps * np.spacing(size[fin])
    bad = np.abs(got[fin] - a[fin]) > tol
    assert not bad.any(), (what, got[fin][bad][:5], a[fin][bad][:5])


def _np_args(*args, **options):
    return ([a.numpy() if isinstance(a, torch.Tensor) else a for a in args],
            {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()})


def _both(chunk, *args, **options):
    """(tensor formulation, numpy formulation in float64) of one chunk."""
    t_out = chunk.on_tensors(*args, **options)
    n_args, n_opts = _np_args(*args, **options)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        n_out = chunk.extended(*n_args, **n_opts)
    return t_out, n_out


DISTRIBUTIONS = ["normal", "uniform", "extreme", "confident_wrong", "ties", "dominant", "target_min", "nonfinite"]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.1}, {"ignore_index": True},
                                     {"soft": True}, {"soft": True, "weight": True, "label_smoothing": 0.2},
                                     {"weight": True, "label_smoothing": 0.3, "ignore_index": True}],
                         ids=["plain", "weight", "smooth", "ignored", "soft", "soft+weight+smooth",
                              "weight+smooth+ignored"])
def test_cross_entropy_tensor_formulation_is_the_numpy_one(dist, scale, options):
    if not inputs.applies(dist, True, "logits"):
        pytest.skip(f"{dist} does not apply to cross entropy")
    x, labels = (v.numpy() for v in inputs.generate("cross_entropy", True, 64, 7, scale, dist, 3))
    x = R.round_to(np.clip(x, -3e38, 3e38) if dist != "nonfinite" else x, torch.float32).double()
    rng = np.random.default_rng(5)
    t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    opts = {}
    if options.get("weight"):
        w = torch.from_numpy(np.exp(rng.uniform(-2, 2, 7)))
        w[2] = 0.0  # a zero class weight: removed rows
        opts["weight"] = w
    if options.get("label_smoothing"):
        opts["label_smoothing"] = options["label_smoothing"]
    if options.get("ignore_index"):
        t = torch.where(torch.arange(64) % 5 == 0, -100, t)
        opts["ignore_index"] = -100
    if options.get("soft"):
        q = rng.dirichlet(np.ones(7), 64)
        q[0] = 0.0
        q[0, 1] = 1.0
        t = R.round_to(q, torch.float32).double()
        opts.pop("ignore_index", None)
    (tl, tg), (nl, ng) = _both(ce.reference_chunk, x, t, **opts)
    _close(tl, nl, "loss")
    # W = Σ_j c_j of a row: the class weights (1 without) times the smoothed target row.
    w = opts.get("weight", torch.ones(7, dtype=torch.float64)).abs()
    _close(tg, ng, "grad", row_scale=(w.sum() if not options.get("soft") else (t.abs() + 1) @ w).expand(64).numpy())
    (td,), (nd,) = [ce.denominators.on_tensors(t, **opts)], [ce.denominators.extended(*_np_args(t)[0], **_np_args(**opts)[1])]
    _close(td, nd, "denominators", 0)


@pytest.mark.parametrize("name", ["bce", "bce_with_logits"])
@pytest.mark.parametrize("dist", ["normal", "uniform", "extreme", "nonfinite"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("weighted,pos_weight", [(False, None), (True, None), (True, 3.0), (False, 0.0)])
def test_binary_tensor_formulation_is_the_numpy_one(name, dist, scale, weighted, pos_weight):
    loss = LOSSES[name]
    if not inputs.applies(dist, False, loss.input_kind):
        pytest.skip(f"{dist} does not apply to {name}")
    x, labels = inputs.generate(name, False, 256, None, scale, dist, 4)
    inp = loss.make_input(x, torch.float32).double()
    y = torch.from_numpy(np.asarray(labels, dtype=np.float64))
    opts = {}
    rng = np.random.default_rng(6)
    if weighted:
        w = torch.from_numpy(np.exp(rng.uniform(-2, 2, 256)))
        w[::7] = 0.0
        opts["weight"] = w
    if pos_weight is not None:
        opts["pos_weight"] = torch.tensor([pos_weight], dtype=torch.float64)
    chunk = {"bce": bce.reference_chunk, "bce_with_logits": bce_with_logits.reference_chunk}[name]
    (tl, tg), (nl, ng) = _both(chunk, inp, y, **opts)
    _close(tl, nl, "loss")
    _close(tg, ng, "grad")


# ---- the rounded reference: no host, any device -----------------------------------------------------

class _NoHost(TorchFunctionMode):
    """Fails on any tensor method that moves values to the host or into numpy."""

    FORBIDDEN = {torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.tolist}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"the torch reference path called {func.__name__}")
        if func is torch.Tensor.to:
            # .to(device) to another device than the tensor's own (a no-op move is fine:
            # the input's device is the CPU here).
            wanted = [torch.device(a) for a in (*args[1:], *(kwargs or {}).values())
                      if isinstance(a, (str, torch.device)) and not isinstance(a, torch.dtype)]
            if any(d != args[0].device for d in wanted):
                raise AssertionError(f"the torch reference path moved a tensor to {wanted}")
        return func(*args, **(kwargs or {}))


def _point(name: str, dtype: torch.dtype, options: dict):
    loss = LOSSES[name]
    x, labels = inputs.generate(name, loss.multiclass, 48, 5 if loss.multiclass else None, 30.0, "nonfinite"
                                if loss.input_kind == "logits" else "normal", 0)
    inp, target = loss.make_input(x, dtype), loss.make_target(labels, dtype)
    opts = {}
    if "weight" in options:
        opts["weight"] = torch.rand(5 if loss.multiclass else 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    if "ignore_index" in options and loss.multiclass:
        target = torch.where(torch.arange(48) % 4 == 0, -100, target)
        opts["ignore_index"] = -100
    if "label_smoothing" in options and loss.multiclass:
        opts["label_smoothing"] = 0.1
    if "pos_weight" in options and not loss.multiclass:
        opts["pos_weight"] = torch.tensor([2.0], dtype=dtype)
    return loss, inp, target, opts


OPTION_SETS = [(), ("weight",), ("weight", "ignore_index", "label_smoothing"), ("weight", "pos_weight")]


@pytest.mark.parametrize("name", ["bce", "bce_with_logits", "cross_entropy"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_never_goes_through_the_host(monkeypatch, name, options, reduction):
    # The chunk memo (reference.ChunkMemo) keys small CPU points by their bytes, read on the
    # host; it is off on every other device, which is the path this test stands for (and a
    # hit would skip the computation it watches).
    monkeypatch.setattr(R, "MEMO_ELEMENTS", -1)
    loss, inp, target, opts = _point(name, torch.bfloat16, options)
    expected = reference(loss, inp, target, opts, reduction)

    def no_numpy(*a, **k):
        raise AssertionError("the torch reference path called torch.from_numpy")

    monkeypatch.setattr(torch, "from_numpy", no_numpy)
    with _NoHost():
        ref = reference(loss, inp, target, opts, reduction)
    monkeypatch.undo()
    assert torch.equal(ref.loss.nan_to_num(7.0), expected.loss.nan_to_num(7.0))
    assert ref.value == expected.value or (math.isnan(ref.value) and math.isnan(expected.value))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path is run on a GPU machine")
@pytest.mark.parametrize("name", ["bce", "bce_with_logits", "cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
def test_reference_on_cuda_is_the_cpu_reference(name, dtype, options):
    # CUDA's exp and log1p are not the CPU's (both within ~1 float64 ULP): the rounded
    # references agree except where the exact value is within ~2**-50 relative of a
    # rounding boundary of the target, i.e. everywhere on inputs like these.
    loss, inp, target, opts = _point(name, dtype, options)
    cpu = reference(loss, inp, target, opts)
    cuda = reference(loss, inp.cuda(), target.cuda(), {k: v.cuda() if isinstance(v, torch.Tensor) else v
                                                        for k, v in opts.items()})
    assert cuda.loss.device.type == "cuda" and cuda.grad.device.type == "cuda"
    for a, b in ((cpu.loss, cuda.loss), (cpu.grad, cuda.grad), (cpu.reduced, cuda.reduced)):
        assert torch.equal(a.nan_to_num(7.0), b.cpu().nan_to_num(7.0))
    assert cpu.value == pytest.approx(cuda.value, rel=1e-15, nan_ok=True)


# ---- elementwise helpers without torch.where ------------------------------------------------------

def _awkward_float64(n: int) -> torch.Tensor:
    """Specials (±0, ±inf, NaNs of both signs, subnormals, exp's and the sigmoid's edges)
    among random values of every magnitude, `n` of them (odd sizes reach the vector loops' tails)."""
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 2.2e-308, -1e-310,
                             745.2, -745.2, 709.8, -709.8, 36.7, -36.7, 1e308, -1e308, 1.0, -1.0],
                            dtype=torch.float64)
    neg_nan = torch.tensor([math.nan], dtype=torch.float64).view(torch.int64).bitwise_or(-(1 << 63)).view(torch.float64)
    g = torch.Generator().manual_seed(11)
    rand = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 12 - 4)
    x = torch.cat([specials, neg_nan, rand])[:n].clone()
    return x[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("n", [1, 7, 20, 4099])
def test_negate_where_is_where_of_the_negation_bit_for_bit(n):
    x = _awkward_float64(n)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    got = R.negate_where(mask, x).view(torch.int64)
    assert torch.equal(got, torch.where(mask, -x, x).view(torch.int64))


@pytest.mark.parametrize("n", [1, 7, 20, 4099])
def test_softplus_and_sigmoid_are_the_textbook_forms_bit_for_bit(n):
    # The shared form against R.softplus and R.sigmoid (torch.where of 1/(1 + e) and e/(1 + e)).
    # A NaN z gives NaN, its bits aside (the payload and sign that each form propagates).
    z = _awkward_float64(n)
    nan = z.isnan()
    for got, expected in zip(R.softplus_and_sigmoid(z), (R.softplus(z), R.sigmoid(z)), strict=True):
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int64), expected[~nan].view(torch.int64))
    # numpy, in float64 and long double (the extended references' working type): equal values
    # (±0 told apart by their signs), NaN where z is NaN.
    for work in (np.float64, np.longdouble):
        zn = z.numpy().astype(work)
        for got, expected in zip(R.softplus_and_sigmoid(zn), (R.softplus(zn), R.sigmoid(zn)), strict=True):
            assert got.dtype == work
            assert np.array_equal(np.isnan(got), nan.numpy())
            assert np.array_equal(got, expected, equal_nan=True)
            assert np.array_equal(np.signbit(got), np.signbit(expected))


# ---- TensorCompensatedSum -------------------------------------------------------------------------

def test_tensor_compensated_sum_recovers_every_rounding_error():
    s = R.TensorCompensatedSum()
    for chunk in ([1e100], [1.0, 2.0**-60], [-1e100, 3e-17], [1e-300]):
        s.add(torch.tensor(chunk, dtype=torch.float64))
    assert float(s.mean(1)) == math.fsum([1.0, 2.0**-60, 3e-17, 1e-300])
    # and against the numpy one on many random terms of mixed magnitudes, in uneven chunks
    rng = np.random.default_rng(0)
    values = rng.standard_normal(300_001) * np.exp(rng.uniform(-30, 30, 300_001))
    s, n = R.TensorCompensatedSum(), R.CompensatedSum()
    for start, stop in ((0, 17), (17, 200_000), (200_000, 300_001)):
        s.add(torch.from_numpy(values[start:stop]))
        n.add(values[start:stop])
    assert float(s.mean(3)) == float(n.mean(3, np.float64)) == math.fsum(values) / 3


def test_tensor_compensated_sum_of_non_finite_terms_is_ieee():
    s = R.TensorCompensatedSum()
    s.add(torch.tensor([1.0, 2.0], dtype=torch.float64))
    s.add(torch.tensor([math.inf, 1.0], dtype=torch.float64))
    assert float(s.mean(2)) == math.inf
    s = R.TensorCompensatedSum()
    s.add(torch.tensor([math.inf], dtype=torch.float64))
    s.add(torch.tensor([-math.inf], dtype=torch.float64))
    assert math.isnan(float(s.mean(1)))
    assert float(R.TensorCompensatedSum().mean(4)) == 0.0
