"""`losscheck accumulate` (issue 18 item 5): each thread's failure mode, with the expected values
from mpmath (per-token cross entropies at 60 digits) and exact rational arithmetic —
transformers #34191 / #35203 / #37766 and trl #2175 (per-micro-batch means of ragged sequences
are not the full batch's per-token mean, in the loss and in the gradient), torchtune #2341 /
OpenRLHF #583 (an all-padding micro-batch gives 0/0 = NaN) — and the command's input errors."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_error_line
from test_reference import MP, exact_cross_entropy, round_exact

from losscheck import accumulate as A
from losscheck.catalog import IGNORE_INDEX
from losscheck.cli import main
from losscheck.errors import LosscheckError

SMALL = dict(batch=6, time=7, vocab=5, micro_batches=3, scale=3.0, seed=1)


def _exact(spec: A.Spec):
    """Per micro-batch: the exact per-token losses (mpmath) of the batch `run` uses."""
    batch = A.make_batch(spec)
    out = []
    for g in batch.groups:
        x = batch.logits[g].double().reshape(-1, spec.vocab).tolist()
        t = batch.targets[g].reshape(-1).tolist()
        out.append([exact_cross_entropy(row, k)[0] for row, k in zip(x, t, strict=True) if k != IGNORE_INDEX])
    return out


def _by(result):
    return {o["convention"]: o for o in result["outcomes"]}


def test_transformers_34191_mean_of_means_is_not_the_token_mean():
    spec = A.Spec(**SMALL, dtype="float64")
    per = _exact(spec)
    counts = [len(p) for p in per]
    assert len(set(counts)) > 1  # ragged: the failure needs unequal token counts
    n, m = sum(counts), len(counts)
    full = MP.fsum(MP.fsum(p) for p in per) / n
    mean_of_means = MP.fsum(MP.fsum(p) / len(p) for p in per) / m
    result = A.run(spec)
    by = _by(result)
    assert result["tokens"] == counts
    assert abs(MP.mpf(by["global_tokens"]["reference"]) - full) <= abs(full) * MP.mpf(2) ** -50
    expected_bias = abs(mean_of_means / full - 1)
    assert expected_bias > 1e-3
    assert abs(MP.mpf(by["microbatch_mean"]["loss_bias"]) - expected_bias) <= expected_bias * MP.mpf(10) ** -12
    # The computed mean of means is the exact mean of means rounded (a few ULP), not the token mean.
    assert abs(MP.mpf(by["microbatch_mean"]["loss"]) - mean_of_means) <= abs(mean_of_means) * MP.mpf(2) ** -50
    assert by["microbatch_mean"]["loss_bits"] > 40
    # global_tokens: no bias at all, and correctly rounded up to an ULP or two of summation.
    assert by["global_tokens"]["loss_bias"] == 0 and by["global_tokens"]["loss_bits"] <= 2
    # (Its gradient is torch's softmax − onehot in the dtype, divided: a few ULP, not a bias.)
    assert by["global_tokens"]["grad"]["max_bits"] <= 4 < by["microbatch_mean"]["grad"]["max_bits"]
    # The gradient bias is exact: max_k |N/(m·n_k) − 1|.
    assert by["microbatch_mean"]["grad_bias"] == float(max(abs(Fraction(n, m * c) - 1) for c in counts))


def test_trl_2175_gradient_of_each_micro_batch_is_scaled_by_n_over_m_nk():
    """trl #2175 / transformers #35203, #37766: per micro-batch normalisation rescales each
    token's gradient by N/(m·n_k) against the global token mean (checked in float64)."""
    spec = A.Spec(**SMALL, dtype="float64")
    batch = A.make_batch(spec)
    counts = [int((batch.targets[g] != IGNORE_INDEX).sum()) for g in batch.groups]
    total, m = sum(counts), len(counts)
    _, g_mean = A._run("microbatch_mean", batch, total)
    _, g_global = A._run("global_tokens", batch, total)
    for g, c in zip(batch.groups, counts, strict=True):
        kept = batch.targets[g] != IGNORE_INDEX
        ratio = g_mean[g][kept] / g_global[g][kept]
        assert torch.allclose(ratio, torch.full_like(ratio, total / (m * c)), rtol=1e-13, atol=0)
        assert (g_mean[g][~kept] == 0).all()  # padding has no gradient in either


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torchtune_2341_all_padding_micro_batch_is_nan(dtype):
    """torchtune #2341 / OpenRLHF #583: F.cross_entropy's mean over a micro-batch of padding
    only is 0/0: the accumulated loss is NaN. The guard makes it finite but leaves the bias;
    the global count is the full batch's mean, correctly rounded or an ULP off."""
    spec = A.Spec(**SMALL, masked=1, dtype=dtype)
    per = _exact(spec)
    assert per[-1] == []  # the last micro-batch: padding only
    full = MP.fsum(MP.fsum(p) for p in per) / sum(len(p) for p in per)
    by = _by(A.run(spec))
    mean = by["microbatch_mean"]
    assert mean["loss"] != mean["loss"] and mean["loss_bias"] is None
    assert mean["loss_bits"] == {"float32": 24, "bfloat16": 8}[dtype]  # all bits lost
    # The backward of that 0/0 mean is zeros (no token to differentiate): the gradient stays
    # finite, biased on the other micro-batches by N/(m·n_k) as without padding.
    counts = [len(p) for p in per]
    n = sum(counts)
    assert mean["grad"]["nan"] == 0
    assert mean["grad_bias"] == float(max(abs(Fraction(n, spec.micro_batches * c) - 1) for c in counts if c))
    guarded = by["microbatch_mean_guarded"]
    m = spec.micro_batches
    expected = MP.fsum(MP.fsum(p) / max(len(p), 1) for p in per) / m
    assert abs(MP.mpf(guarded["loss_bias"]) - abs(expected / full - 1)) <= abs(expected / full - 1) * 1e-12
    assert guarded["grad"]["nan"] == 0
    glob = by["global_tokens"]
    nearest = round_exact(full, dtype).nearest
    assert glob["loss_bits"] <= 1.6 and abs(glob["loss"] - nearest) <= abs(nearest) * 2 ** -6
    assert glob["grad"]["nan"] == 0 and glob["loss_bias"] == 0


def test_equal_lengths_and_one_micro_batch_have_no_bias():
    spec = A.Spec(batch=4, time=5, vocab=7, micro_batches=1, dtype="float32")
    by = _by(A.run(spec))
    assert by["microbatch_mean"]["loss_bias"] == 0 == by["microbatch_mean"]["grad_bias"]


# ---- the command ---------------------------------------------------------------------------

def test_command_prints_the_table_and_json():
    runner = CliRunner()
    result = runner.invoke(main, ["accumulate", "--batch", "4", "--time", "6", "--vocab", "11",
                                  "--micro-batches", "2", "--masked", "1", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "| microbatch_mean | nan |" in result.stdout and "0/0 (NaN)" in result.stdout
    result = runner.invoke(main, ["accumulate", "--batch", "4", "--time", "6", "--vocab", "11", "--json"])
    assert result.exit_code == 0
    (data,) = json.loads(result.stdout)
    assert [o["convention"] for o in data["outcomes"]] == list(A.CONVENTIONS)


@pytest.mark.parametrize("args,fragment", [
    (["--masked", "4"], "--masked 4"), (["--micro-batches", "9"], "--micro-batches 9"),
    (["--dtype", "float8"], "--dtype 'float8'"), (["--vocab", "1"], "--vocab 1"),
    (["--scale", "0"], "--scale 0.0"), (["--batch", "0"], "--batch 0")])
def test_command_bad_input_is_one_line_exit_2(args, fragment):
    result = CliRunner().invoke(main, ["accumulate", "--batch", "8", *args])
    assert_one_error_line(result, fragment, "allowed")


def test_check_is_the_edge():
    with pytest.raises(LosscheckError, match="--time 0"):
        A.check(A.Spec(time=0))
