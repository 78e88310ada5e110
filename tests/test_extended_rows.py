"""Long double reference chunks in row blocks on threads (losscheck/extended_rows.py): the
same bits as one call on this thread, whatever the number of threads; numpy only on the
pool's threads; the blocks' thread falling back to this one where its x87 unit rounds."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from losscheck import extended_rows as X
from losscheck import reference as R
from losscheck.losses import LOSSES, reference

pytestmark = pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63, reason="needs x86 long double")
LD = np.longdouble
ROWS, CLASSES = 90, 400  # 36,000 values: above PARALLEL_ELEMENTS


def _logits(seed: int, nonfinite: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((ROWS, CLASSES)) * 30).astype(LD)
    if nonfinite:  # rows with −inf, +inf (one or two), a NaN, every logit −inf
        x[1, :7] = -np.inf
        x[2, 3] = np.inf
        x[3, [4, 9]] = np.inf
        x[4, 0] = np.nan
        x[5, :] = -np.inf
    return x


def _cases():
    rng = np.random.default_rng(1)
    t = rng.integers(0, CLASSES, ROWS)
    t_ignored = t.copy()
    t_ignored[::3] = -100
    soft = rng.random((ROWS, CLASSES)).astype(LD)
    soft /= soft.sum(axis=1, keepdims=True)
    weight = rng.uniform(0.25, 4, CLASSES).astype(LD)
    weight[5] = 0
    y = rng.integers(0, 2, ROWS * CLASSES).astype(LD)
    elementwise_weight = rng.uniform(0.25, 4, ROWS * CLASSES).astype(LD)
    binary_x = (rng.standard_normal(ROWS * CLASSES) * 30).astype(LD)
    binary_x[:4] = [np.inf, -np.inf, np.nan, 0]
    probabilities = rng.random(ROWS * CLASSES).astype(LD)
    probabilities[:3] = [0, 1, np.nan]
    return [
        ("cross_entropy", _logits(0), t, {}, ()),
        ("cross_entropy", _logits(2, nonfinite=True), t, {}, ()),
        ("cross_entropy", _logits(3, nonfinite=True), t_ignored,
         {"weight": weight, "label_smoothing": 0.1, "ignore_index": -100}, ()),
        ("cross_entropy", _logits(4, nonfinite=True), soft, {"label_smoothing": 0.1}, ()),
        ("cross_entropy", _logits(5), t, {"z_loss": 1e-4, "softcap": 30.0, "label_smoothing": 0.1,
                                          "smoothing_convention": "alpha_over_k_minus_1"}, ()),
        ("nll_loss", _logits(6, nonfinite=True), t_ignored, {"weight": weight, "ignore_index": -100}, ()),
        ("token_logprobs", _logits(7), t, {}, ()),
        ("bce_with_logits", binary_x, y, {"weight": elementwise_weight, "pos_weight": 1000.0}, ("weight",)),
        ("bce", probabilities, y, {"weight": elementwise_weight}, ("weight",)),
    ]


def _identical(a, b) -> bool:
    return all(np.array_equal(p, q, equal_nan=True) and p.dtype == q.dtype for p, q in zip(a, b, strict=True))


def _in_blocks(fn, x, t, options: dict, per_row, threads: int, alone):
    """fn(x, t, **options) through `X.rounded` on `threads` threads (from x's float64 values,
    which it holds exactly): the long double loss and gradient as the blocks computed them
    (the gradient caught by `finish`), and the float64 outputs the blocks rounded. `alone`:
    fn's result on this thread, for the outputs' shapes."""
    x64 = x.astype(np.float64)
    assert np.array_equal(x64.astype(LD), x, equal_nan=True)
    loss64, grad64 = np.empty(alone[0].shape), np.empty(alone[1].shape)
    grad = np.empty_like(alone[1])

    def finish(gw, rows):
        grad[rows] = gw
        return gw

    loss = X.rounded(fn, x64, t, options, per_row, {}, threads, finish, loss64, grad64)
    assert loss is not None, "computed in row blocks"
    return (loss, grad), (loss64, grad64)


@pytest.mark.parametrize("case", range(len(_cases())))
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_row_blocks_give_the_same_bits(case, threads):
    name, x, t, options, per_row = _cases()[case]
    fn = LOSSES[name].reference_chunk
    assert X.applies(fn, x, t, threads)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        alone = fn(x, t, **options)
        blocks, rounded = _in_blocks(fn, x, t, options, per_row, threads, alone)
        assert _identical(alone, blocks)
        assert _identical([a.astype(np.float64) for a in alone], rounded)


def test_what_stays_on_this_thread():
    ce = LOSSES["cross_entropy"].reference_chunk
    x, t = _logits(0), np.zeros(ROWS, dtype=int)
    assert not X.applies(ce, x, t, 1)  # one thread
    assert not X.applies(ce, x[:40], t[:40], 2)  # a small chunk (16,000 values)
    assert X.applies(ce, x.astype(np.float64), t, 2)  # the float64 rows `rounded` takes: the same answer
    # log_softmax's extended formulation is double-double in torch: never on the pool.
    assert LOSSES["log_softmax"].reference_chunk.rowwise is None
    # Soft binary targets go through torch too.
    bce = LOSSES["bce_with_logits"].reference_chunk
    y = np.zeros(ROWS * CLASSES, dtype=LD)
    assert X.applies(bce, x.reshape(-1), y, 2)
    y[7] = LD(0.25)
    assert not X.applies(bce, x.reshape(-1), y, 2)


class _TorchCalls:
    """Calls into torch (Python functions of its modules, its C functions and methods)
    made on threads other than the main one, seen through threading.setprofile."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, frame, event, arg):
        if threading.current_thread() is threading.main_thread():
            return
        if event == "call" and frame.f_globals.get("__name__", "").startswith("torch"):
            self.seen.append(frame.f_code.co_name)
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            module = getattr(arg, "__module__", None) or type(owner).__module__
            if (module or "").startswith("torch"):
                self.seen.append(getattr(arg, "__name__", repr(arg)))


@pytest.fixture
def torch_calls(monkeypatch):
    calls = _TorchCalls()
    monkeypatch.setattr(X, "_pool", None)  # a fresh pool: its threads start with the profile
    threading.setprofile(calls)
    try:
        yield calls
    finally:
        threading.setprofile(None)
        if X._pool is not None:
            X._pool[0].shutdown(wait=True)


@pytest.mark.parametrize("case", range(len(_cases())))
def test_only_numpy_runs_on_the_pool(case, torch_calls):
    name, x, t, options, per_row = _cases()[case]
    fn = LOSSES[name].reference_chunk
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        _in_blocks(fn, x, t, options, per_row, 2, fn(x, t, **options))
    assert X._pool is not None, "the blocks ran on the pool"
    assert torch_calls.seen == []


@pytest.mark.parametrize("case", ["cross_entropy options", "cross_entropy upstream", "bce_with_logits options"])
def test_only_numpy_runs_on_the_pool_end_to_end(case, torch_calls):
    """losses.reference of a float64 point on 2 threads: the blocks that also convert and
    round (`rounded`, with the caller's upstream weights and division) call no torch."""
    name, x, t, opts, upstream = _point(case)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for r in ("none",) if upstream is not None else ("mean", "none"):
            reference(LOSSES[name], x, t, opts, r, upstream)
    finally:
        torch.set_num_threads(before)
    assert X._pool is not None, "the blocks ran on the pool"
    assert torch_calls.seen == []


def test_the_torch_detector_sees_torch(torch_calls):
    """The check above can fail: log_softmax's extended formulation (torch double-double),
    declared row-wise for the test, is seen calling torch on the pool."""
    inner = LOSSES["log_softmax"].reference_chunk
    fn = R.chunk_function(inner.on_tensors, inner.extended, inner.dd, rowwise=R.always)
    x = _logits(0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        _in_blocks(fn, x, None, {}, (), 2, fn(x, None))
    assert torch_calls.seen


def test_a_thread_whose_x87_rounds_leaves_its_block_here(monkeypatch):
    """The x87 precision control is per thread: a block whose thread has lost extended
    precision is computed on the calling thread (which the reference checked)."""
    main = threading.main_thread()
    ran_here = []
    real = R._extended_now
    monkeypatch.setattr(R, "_extended_now", lambda: real() and threading.current_thread() is main)
    fn = LOSSES["cross_entropy"].reference_chunk

    def counting(x, t, **options):
        ran_here.append(threading.current_thread() is main)
        return fn(x, t, **options)

    counting.rowwise = fn.rowwise  # type: ignore[attr-defined]
    x, t = _logits(0), np.arange(ROWS) % CLASSES
    alone = fn(x, t)
    got, rounded = _in_blocks(counting, x, t, {}, (), 3, alone)
    assert ran_here == [True, True, True]
    assert _identical(got, alone)
    assert _identical([a.astype(np.float64) for a in alone], rounded)


def _point(case: str):
    """(loss, logits, targets, options, grad_output) of a float64 point of several chunks."""
    g = torch.Generator().manual_seed(0)
    if case in ("bce_with_logits", "bce_with_logits options"):
        x = torch.randn(600_000, generator=g, dtype=torch.float64) * 50
        t = torch.randint(0, 2, (600_000,), generator=g).to(torch.float64)
        opts = {}
        if case.endswith("options"):
            opts = {"weight": torch.rand(600_000, generator=g, dtype=torch.float64) * 4, "pos_weight": torch.tensor([3.0], dtype=torch.float64)}
            opts["weight"][::7] = 0
        return "bce_with_logits", x, t, opts, None
    x = torch.randn(700, 1000, generator=g, dtype=torch.float64) * 50
    x[3, 5] = math.inf
    t = torch.randint(0, 1000, (700,), generator=g)
    opts, upstream = {}, None
    if case.endswith("options"):  # weights (one zero), ignored rows, smoothing: a weighted mean
        weight = torch.rand(1000, generator=g, dtype=torch.float64) * 4
        weight[t[0]] = 0
        t[1::5] = -100
        opts = {"weight": weight, "ignore_index": -100}
        if case.startswith("cross_entropy"):
            opts["label_smoothing"] = 0.1
    if case.endswith("ignored"):  # every row ignored: the mean is undefined, its gradient 0
        t[:] = -100
        opts = {"ignore_index": -100}
    if case.endswith("upstream"):  # reduction none with an upstream gradient (a zero among it)
        upstream = torch.randn(700, generator=g, dtype=torch.float64)
        upstream[9] = 0
    return case.split()[0], x, t, opts, upstream


@pytest.mark.parametrize("case", ["cross_entropy", "cross_entropy options", "cross_entropy ignored",
                                  "cross_entropy upstream", "nll_loss options", "bce_with_logits",
                                  "bce_with_logits options"])
def test_float64_references_do_not_depend_on_the_thread_count(case, monkeypatch):
    """End to end (losses.reference of a float64 point of several chunks): 1 and 2 threads,
    the latter in row blocks that also round (`extended_rows.rounded`): the same bits, with
    weights, ignored rows, smoothing, an undefined mean and upstream gradients."""
    name, x, t, opts, upstream = _point(case)
    blocks, rounded = [], []
    block, rounding = X._block, X.rounded
    monkeypatch.setattr(X, "_block", lambda *a: blocks.append(1) or block(*a))
    monkeypatch.setattr(X, "rounded", lambda *a: rounded.append(rounding(*a)) or rounded[-1])
    reductions = ("none",) if upstream is not None else ("mean", "sum", "none")
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [reference(LOSSES[name], x, t, opts, r, upstream) for r in reductions]
            assert bool(blocks) == (threads == 2)  # on the pool with 2 threads only
            assert any(r is not None for r in rounded) == (threads == 2)
    finally:
        torch.set_num_threads(before)
    for one, two in zip(out[1], out[2], strict=True):
        assert torch.equal(one.loss.nan_to_num(), two.loss.nan_to_num())
        assert torch.equal(one.grad.nan_to_num(), two.grad.nan_to_num())
        assert one.value == two.value or (math.isnan(one.value) and math.isnan(two.value))
        assert one.undefined == two.undefined
    if case.endswith("ignored"):
        assert out[2][0].undefined and not bool(out[2][0].grad.any())
