"""Upstream gradients (issue 15 item 2): `grad_outputs` of `reduction: none` points, applied in
the reference and in the implementations' backward alike, so that the audited gradient is that
of Σ g_i·ℓ_i. The Liger-Kernel #968 bug (a backward that scales every row by grad_output[0])
passes with ones and is caught with random upstream gradients."""
from __future__ import annotations

import textwrap

import mpmath
import pytest
import torch

from losscheck import inputs, sweep
from losscheck.config import Config, parse_config
from losscheck.errors import ConfigError
from losscheck.losses import LOSSES, reference

CONFIG = """\
name: up
losses: [cross_entropy, bce_with_logits]
implementations: [stable, torch]
scales: [1]
batch_sizes: [6]
classes: [4]
dtypes: [float32, float64]
distributions: [normal]
reductions: [none, mean]
grad_outputs: [ones, random, onehot, zeros]
timing: false
"""

# Liger-Kernel #968: the fused backward read grad_output[0] (the scalar of a reduced loss) and
# applied it to every row, also for reduction "none".
LIGER = """\
import torch
import torch.nn.functional as F


class _RowZero(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t):
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            loss = F.cross_entropy(xd, t, reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), xd)
        ctx.save_for_backward(g)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        (g,) = ctx.saved_tensors
        return g * grad_output.reshape(-1)[0], None  # the bug: row 0's upstream gradient for all


def liger_ce(x, t, reduction="mean"):
    loss = _RowZero.apply(x, t)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
"""


def _config(text: str, **extra) -> Config:
    return parse_config(text + "".join(f"{k}: {v}\n" for k, v in extra.items()), "<test>")


def test_cases_cross_grad_outputs_with_reduction_none_only():
    cases = list(sweep.cases(_config(CONFIG)))
    ups = {(c.loss, c.reduction, dict(c.options).get("grad_output", "ones")) for c in cases}
    assert {u for loss, r, u in ups if r == "none"} == {"ones", "random", "onehot", "zeros"}
    assert {u for loss, r, u in ups if r == "mean"} == {"ones"}
    # ones is the point without the option: its key is that of every earlier baseline.
    assert all("grad_output" not in dict(c.options) for c in cases if c.reduction == "mean")


def test_bad_grad_output_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        _config(CONFIG.replace("[ones, random, onehot, zeros]", "[ones, randm]"))
    assert "grad_outputs" in str(e.value) and "'randm'" in str(e.value) and "random" in str(e.value)


def test_values_are_reproducible_and_of_their_kind():
    a = inputs.grad_output_values("random", "cross_entropy", (5, 3), seed=7)
    assert torch.equal(a, inputs.grad_output_values("random", "cross_entropy", (5, 3), seed=7))
    assert not torch.equal(a, inputs.grad_output_values("random", "cross_entropy", (5, 3), seed=8))
    assert bool((a < 0).any()) and bool((a > 0).any())
    one = inputs.grad_output_values("onehot", "cross_entropy", (5, 3), seed=7)
    assert float(one.sum()) == 1.0 and int((one != 0).sum()) == 1
    assert float(inputs.grad_output_values("zeros", "x", (4,), 0).abs().sum()) == 0.0


def _exact_ce_grad(row, t, g):
    """g·(softmax(row) − onehot(t)) at 60 digits, rounded to float64 by mpmath."""
    mpmath.mp.dps = 60
    xs = [mpmath.mpf(float(v)) for v in row]
    z = mpmath.fsum(mpmath.exp(v) for v in xs)
    return [float(mpmath.mpf(float(g)) * (mpmath.exp(v) / z - (1 if j == t else 0))) for j, v in enumerate(xs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_gradient_is_that_of_the_weighted_sum(dtype):
    loss = LOSSES["cross_entropy"]
    x = (torch.arange(12, dtype=torch.float64).reshape(4, 3) * 0.37 - 2).to(dtype)
    t = torch.tensor([0, 2, 1, 2])
    g = torch.tensor([0.5, -3.0, 0.0, 1.25], dtype=dtype)
    ref = reference(loss, x, t, {}, "none", grad_output=g)
    for i in range(4):
        exact = torch.tensor(_exact_ce_grad(x[i], int(t[i]), g[i]), dtype=torch.float64).to(dtype)
        assert torch.equal(ref.grad[i], exact), (i, ref.grad[i], exact)
    # The loss itself does not depend on the upstream gradient.
    assert torch.equal(ref.loss, reference(loss, x, t, {}, "none").loss)


def test_zero_upstream_gradient_removes_an_infinite_gradient():
    """g = 0 at a point whose gradient is infinite (bce on p = 0, y = 1): the row is out of
    Σ g_i·ℓ_i, its gradient 0, not 0·inf = NaN."""
    loss = LOSSES["bce"]
    p = torch.tensor([0.0, 0.5], dtype=torch.float32)
    y = torch.tensor([1.0, 1.0], dtype=torch.float32)
    ref = reference(loss, p, y, {}, "none", grad_output=torch.tensor([0.0, 2.0]))
    assert ref.grad.tolist() == [0.0, -4.0]


def test_sweep_audits_correct_implementations_with_every_upstream_gradient():
    records = sweep.run(_config(CONFIG), 1)
    assert records and all(r["status"] == "ok" for r in records)
    ups = {r["options"].get("grad_output") for r in records}
    assert ups == {None, "random", "onehot", "zeros"}
    for r in records:
        # stable and torch are within an ULP or two of the reference's gradient of Σ g·ℓ.
        assert r["backward"]["max_ulp"] <= 4, r


def _custom_records(tmp_path, name: str, source: str, function: str, grad_outputs: str) -> list[dict]:
    """The records of one custom implementation (in its worker process) over cross entropy with
    reduction none and these upstream gradients."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    text = CONFIG.replace("[cross_entropy, bce_with_logits]", "[cross_entropy]").replace(
        "[ones, random, onehot, zeros]", grad_outputs
    )
    text += f"custom:\n  - name: {name}\n    function: {tmp_path / f'{name}.py'}:{function}\n"
    config = _config(text.replace("reductions: [none, mean]", "reductions: [none]"))
    impls = sweep.resolve(config)
    try:
        return [r for r in sweep.run(config, 1, impls=impls) if r["impl"] == name]
    finally:
        for row in impls.values():
            for impl in row.values():
                stop = getattr(getattr(impl.fn, "worker", None), "stop", None)
                if stop:
                    stop()


def _liger_records(tmp_path, grad_outputs: str):
    return _custom_records(tmp_path, "liger", LIGER, "liger_ce", grad_outputs)


def test_a_correct_isolated_implementation_gets_the_upstream_gradient_in_its_worker(tmp_path):
    """The worker back-propagates the point's g, not ones: a correct custom implementation
    (in its worker process) passes with random and one-hot upstream gradients."""
    right = "import torch.nn.functional as F\n\n\ndef ce(x, t, reduction='mean'):\n" \
            "    return F.cross_entropy(x, t, reduction=reduction)\n"
    mine = _custom_records(tmp_path, "right", right, "ce", "[ones, random, onehot, zeros]")
    assert {r["options"].get("grad_output") for r in mine} == {None, "random", "onehot", "zeros"}
    for r in mine:
        assert r["status"] == "ok" and r["backward"]["max_ulp"] <= 4, r


def test_liger_kernel_968_passes_with_ones_and_is_caught_with_random(tmp_path):
    with_ones = _liger_records(tmp_path, "[ones]")
    assert with_ones and all(r["status"] == "ok" for r in with_ones)
    # The bug cannot be seen with ones: every row's upstream gradient is grad_output[0] = 1.
    assert all(r["backward"]["max_ulp"] <= 4 for r in with_ones)  # torch's own float32 error
    with_random = _liger_records(tmp_path, "[random]")
    assert with_random and all(r["options"] == {"grad_output": "random"} for r in with_random)
    for r in with_random:
        assert r["status"] == "ok"
        # Rows other than 0 get the wrong upstream gradient: far past the threshold.
        assert r["backward"]["max_bits"] > r["threshold_bits"], r["backward"]
        assert r["forward"]["max_ulp"] <= 1  # the forward is right: only the backward is wrong
