"""Foreign code never changes dtype silently (issue 14 item 4): the numpy route receives every
tensor of a point in the point's own dtype (bfloat16 as ml_dtypes.bfloat16) and must return
that dtype; where it cannot be represented the point is skipped saying so. Also: array types
with __array__ or DLPack as outputs, read-only outputs, the loss name and `need_grad` on
request, and adapter errors that name the route to use instead."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from losscheck import custom, results
from losscheck.cli import main
from losscheck.config import CustomSpec
from losscheck.dtypes import FORMATS
from losscheck.families import Unsupported

ml_dtypes = pytest.importorskip("ml_dtypes")

NUMPY_OF = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# A numpy implementation that logs the dtype of every floating array it receives (to the file
# named by LOG_PATH) and computes BCE-with-logits or cross entropy in that dtype.
RECORDER = '''
import json, os
import numpy as np

LOG = os.environ["LOSSCHECK_TEST_DTYPE_LOG"]

def _log(loss_name, **arrays):
    seen = {k: str(v.dtype) for k, v in arrays.items() if isinstance(v, np.ndarray) and v.dtype.kind != "i"}
    with open(LOG, "a") as f:
        f.write(json.dumps({"loss": loss_name, **seen}) + "\\n")

def _reduce(loss, grad, reduction):
    if reduction == "none":
        return loss, grad
    n = loss.dtype.type(1 if reduction == "sum" else loss.size)
    return loss.sum() / n, grad / n

def bcewl(x, y, reduction="mean", weight=None, loss_name=None):
    _log(loss_name, x=x, y=y, weight=weight)
    one = x.dtype.type(1)
    p = one / (one + np.exp(-x))
    w = weight if weight is not None else one
    loss = w * (np.logaddexp(x.dtype.type(0), x) - y * x)
    return _reduce(loss.astype(x.dtype), (w * (p - y)).astype(x.dtype), reduction)

def ce(x, t, reduction="mean", weight=None, loss_name=None):
    _log(loss_name, x=x, t=t, weight=weight)
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    q = t if t.dtype.kind != "i" else np.eye(x.shape[1], dtype=x.dtype)[t]
    loss = (q * ((m + np.log(s)) - x)).sum(axis=1)
    return _reduce(loss.astype(x.dtype), (p - q).astype(x.dtype), reduction)
'''


def _bench(tmp_path, monkeypatch, loss, function, extra="", dtypes=tuple(FORMATS), isolation="auto"):
    (tmp_path / "rec.py").write_text(RECORDER)
    log = tmp_path / "dtypes.log"
    monkeypatch.setenv("LOSSCHECK_TEST_DTYPE_LOG", str(log))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: c
        losses: [{loss}]
        implementations: [stable]
        scales: [1]
        batch_sizes: [8]
        classes: [5]
        dtypes: [{", ".join(dtypes)}]
        devices: [cpu]
        distributions: [normal]
        timing: false
        isolation: {isolation}
        custom:
          - {{function: '{tmp_path / "rec.py"}:{function}', api: numpy, name: rec}}
        """) + extra)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots"])
    assert result.exit_code == 0, (result.output, result.stderr)
    records = [r for r in results.load(out / "c.json")["records"] if r["impl"] == "rec"]
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return records, seen


@pytest.mark.parametrize("loss,function,extra", [
    ("bce_with_logits", "bcewl", "weights: [none, random]\n"),
    ("cross_entropy", "ce", "weights: [none, random]\ntargets: [hard, soft]\n"),
])
def test_every_array_reaching_a_numpy_implementation_has_the_points_dtype(tmp_path, monkeypatch, loss, function, extra):
    """Through the worker process (the default isolation), for every dtype losscheck audits."""
    records, seen = _bench(tmp_path, monkeypatch, loss, function, extra)
    assert {r["dtype"] for r in records} == set(FORMATS)
    assert all(r["status"] == "ok" and r["backward"] is not None for r in records), \
        [r["message"] for r in records if r["status"] != "ok"]
    # Each point calls the implementation twice (reduction none, then mean), one dtype at a time.
    by_call = [set(s.values()) - {loss} for s in seen]
    assert all(len(dtypes) == 1 for dtypes in by_call), seen
    calls_per_point = 2
    points = [(r["dtype"], json.dumps(r["options"], sort_keys=True)) for r in records]
    assert len(seen) == calls_per_point * len(points)
    assert sorted(d for (d,) in by_call) == sorted(
        str(np.dtype(NUMPY_OF[dtype])) for dtype, _ in points for _ in range(calls_per_point))
    assert {s["loss"] for s in seen} == {loss}  # the loss name, asked for by `loss_name=`
    soft = [s for s in seen if "t" in s]
    if loss == "cross_entropy":
        assert soft and all(s["t"] == s["x"] for s in soft)  # soft targets in the input's dtype
    assert any("weight" in s for s in seen) and all(s.get("weight", s["x"]) == s["x"] for s in seen)


@pytest.mark.parametrize("name", list(FORMATS))
def test_values_reach_the_implementation_and_come_back_bit_for_bit(name):
    dtype = FORMATS[name].torch_dtype
    x = torch.tensor([0.1, -2.5, 3e4, 1e-3], dtype=torch.float64).to(dtype)
    got = {}

    def identity(a, t, reduction="mean"):
        got["a"] = a
        return (a.copy(), a.copy()) if reduction == "none" else (a.sum(), np.ones_like(a))

    fn = custom._Adapter(identity, "identity", "numpy")
    y = fn(x, x, "none")
    assert got["a"].dtype == NUMPY_OF[name] and y.dtype == dtype
    bits = FORMATS[name].int_dtype
    assert torch.equal(y.view(bits), x.view(bits))
    xg = x.clone().requires_grad_(True)
    out = fn(xg, x, "sum")
    out.backward()
    assert out.dtype == dtype and xg.grad.dtype == dtype and torch.equal(xg.grad, torch.ones_like(x))


def test_a_result_in_another_dtype_is_an_error_not_converted():
    def widens(a, t, reduction="mean"):
        return a.astype(np.float32)

    fn = custom._Adapter(widens, "widens", "numpy")
    with pytest.raises(custom.ImplementationError, match="returned a float32 loss for bfloat16 input"):
        fn(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), "none")


def test_without_ml_dtypes_bfloat16_points_are_skipped_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    with pytest.raises(Unsupported, match=r"pip install 'losscheck\[jax\]'"):
        custom.numpy_dtype(torch.bfloat16)
    records, _ = _bench(tmp_path, monkeypatch, "bce_with_logits", "bcewl", dtypes=("float32", "bfloat16"),
                        isolation="none")
    status = {r["dtype"]: (r["status"], r["message"]) for r in records}
    assert status["float32"][0] == "ok"
    assert status["bfloat16"] == ("skipped", "api: numpy needs ml_dtypes for bfloat16 "
                                             "(pip install 'losscheck[jax]' (or ml_dtypes))")


class _ArrayLike:
    """A foreign array exposing only __array__ (as JAX's and many others do)."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


class _DLPackOnly:
    """A foreign array exposing only the DLPack protocol."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("wrap", [_ArrayLike, _DLPackOnly, _read_only, lambda a: torch.from_numpy(a.copy())],
                         ids=["__array__", "dlpack", "read-only", "torch"])
def test_foreign_and_read_only_outputs_are_accepted_without_a_warning(wrap):
    # pytest turns warnings into errors (pyproject.toml): torch.from_numpy's warning on a
    # read-only array would fail this test.
    def fn(a, t, reduction="mean"):
        return wrap(a * 2) if reduction == "none" else wrap(np.asarray(a.sum()))

    adapter = custom._Adapter(fn, "fn", "numpy")
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(adapter(x, x, "none"), x * 2)
    assert float(adapter(x, x, "sum")) == 6.0


def test_an_output_that_is_no_array_names_the_route_to_use():
    adapter = custom._Adapter(lambda a, t, reduction="mean": "1.0", "fn", "numpy")
    with pytest.raises(custom.ImplementationError, match="use api: torch for code returning tensors"):
        adapter(torch.ones(2), torch.ones(2), "none")


def test_need_grad_tells_the_function_whether_a_gradient_is_wanted():
    """Forward timing (no gradient wanted) measures the forward only for a function that can
    skip its gradient."""
    asked = []

    def fn(a, t, reduction="mean", need_grad=True):
        asked.append(need_grad)
        return (a.copy(), a.copy()) if need_grad else a.copy()

    adapter = custom._Adapter(fn, "fn", "numpy")
    x = torch.ones(3)
    adapter(x, x, "none")
    adapter(x.clone().requires_grad_(True), x, "none")
    assert asked == [False, True]


def test_torch_code_without_autograd_is_told_to_use_the_numpy_route():
    def detached(x, t, reduction="mean"):
        return torch.nn.functional.binary_cross_entropy_with_logits(x.detach(), t, reduction=reduction)

    adapter = custom._Adapter(detached, "detached", "torch")
    with pytest.raises(custom.ImplementationError, match="does not require grad.*use api: numpy for code without"):
        adapter(torch.zeros(3, requires_grad=True), torch.ones(3), "mean")
    numpy_code = custom._Adapter(lambda x, t, reduction="mean": x.numpy(), "np", "torch")
    with pytest.raises(custom.ImplementationError, match="use api: numpy for code that returns numpy arrays"):
        numpy_code(torch.zeros(3), torch.ones(3), "none")


def test_the_loss_name_is_passed_only_to_a_function_that_declares_it():
    seen = []

    def named(x, t, reduction="mean", loss_name=None):
        seen.append(loss_name)
        return x.copy()

    def options_only(x, t, reduction="mean", **options):
        seen.append(options)
        return x.copy()

    for f in (named, options_only):
        impl = custom.Impl("f", "custom", custom._Adapter(f, "f", "numpy"), "")
        custom.for_loss(impl, "cross_entropy").fn(torch.ones(2), torch.ones(2), "none")
    assert seen == ["cross_entropy", {}]


def test_a_numpy_implementation_on_another_device_is_skipped():
    spec = CustomSpec(name="f", function="x:f", api="numpy")
    adapter = custom._Adapter(lambda x, t, reduction="mean": x, spec.function, spec.api)
    with pytest.raises(Unsupported, match="api: numpy runs on the CPU only; use api: torch"):
        adapter(torch.ones(2, device="meta"), torch.ones(2, device="meta"), "none")
