"""sharded_cross_entropy (issue 18 item 2): shards that divide the vocabulary or not, against
the unsharded value computed in mpmath; the known mistakes of tensor-parallel code, each as a
custom implementation written like the buggy code and as losscheck's opt-in `shard_mistake`
of naive; and a sweep through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from test_lm_cross_entropy import exact_lm
from test_reference import MP, round_exact

from losscheck import families, results
from losscheck.cli import main
from losscheck.losses import LOSSES, reference, sharded_cross_entropy as sce

LOSS = LOSSES["sharded_cross_entropy"]


def _rows(seed=0, n=6, v=11, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(torch.float32)
    return x, torch.randint(0, v, (n,), generator=g)


def _exact_mean(x, t, alpha=0.0, conv="alpha_over_k"):
    rows = [exact_lm([float(a) for a in x[i]], int(t[i]), alpha=alpha, conv=conv) for i in range(x.shape[0])]
    return MP.fsum(r[0] for r in rows) / len(rows), rows


def test_bounds_cover_the_vocabulary_whatever_the_count():
    assert sce.bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert sce.bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]  # more shards than entries: empty ones left out
    assert sce.bounds(50257, 2) == [(0, 25129), (25129, 50257)]
    assert sce.bounds(5, 2, "uneven_split") == [(0, 2), (2, 4)]  # entry 4 in no shard (#1754)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7, 11, 13])
@pytest.mark.parametrize("smooth", [(0.0, "alpha_over_k"), (0.1, "alpha_over_k"), (0.1, "alpha_v_over_v_minus_1")])
def test_stable_is_the_unsharded_value_rounded(shards, smooth):
    alpha, conv = smooth
    x, t = _rows(seed=shards)
    exact, rows = _exact_mean(x.double(), t, alpha, conv)
    opts = {"shards": shards, "label_smoothing": alpha, "smoothing_convention": conv}
    xx = x.clone().requires_grad_()
    out = LOSS.implementations["stable"].fn(xx, t, "mean", **opts)
    out.backward()
    out = out.detach()
    assert float(out) == round_exact(exact, "float32").nearest
    ref = reference(LOSS, x, t, dict(opts), "mean")
    assert float(ref.reduced) == float(out)
    for i, (_, g) in enumerate(rows):
        for j, gj in enumerate(g):
            want = round_exact(gj / x.shape[0], "float32").nearest
            assert abs(float(xx.grad[i, j]) - want) <= abs(want) * 2.0**-22, (i, j)
    naive = LOSS.implementations["naive"].fn(x, t, "mean", **opts)
    torch_ = LOSS.implementations["torch"].fn(x, t, "mean", **opts)
    for value in (naive, torch_):
        assert abs(float(value) - float(exact)) <= 1e-5 * float(exact)


def test_a_masked_shard_adds_nothing():
    x, t = _rows(seed=20, v=12)
    x[:, 8:] = -math.inf  # the last of three shards is all padding
    t = t % 8
    exact, _ = _exact_mean(x.double(), t)
    for name in ("stable", "naive", "torch"):
        out = LOSS.implementations[name].fn(x, t, "mean", shards=3)
        assert abs(float(out) - float(exact)) <= 1e-6 * float(exact), name


def test_mistakes_run_in_naive_only():
    x, t = _rows()
    for name in ("stable", "torch"):
        with pytest.raises(families.Unsupported, match="naive"):
            LOSS.implementations[name].fn(x, t, "mean", shards=2, shard_mistake="log_shards")


# ---- the issue threads, each as code written like the buggy code -----------------------------


def megatron_vocab_parallel(x, t, shards, alpha, rank):
    """Megatron-LM's vocab_parallel_cross_entropy as rank `rank` computes it with label
    smoothing (#737): max and sum of exp all-reduced, but `vocab_size = exp_logits.size(-1)`
    (the partition's) in the smoothing coefficient and the mean log-probability local."""
    parts = sce.bounds(x.shape[1], shards)
    m = torch.stack([x[:, a:b].max(1).values for a, b in parts]).max(0).values[:, None]
    total = sum(torch.exp(x[:, a:b] - m).sum(1) for a, b in parts)
    a, b = parts[rank]
    predicted = sum(
        torch.where((t >= a_) & (t < b_), (x - m).gather(1, t[:, None]).squeeze(1), 0.0) for a_, b_ in parts
    )
    loss = torch.log(total) - predicted
    vocab_size = b - a  # the bug: the partition's size
    smoothing = alpha * vocab_size / (vocab_size - 1)
    log_probs = torch.log(torch.exp(x[:, a:b] - m) / total[:, None])
    mean_log_probs = log_probs.mean(-1)  # the bug: no all-reduce
    return ((1 - smoothing) * loss - smoothing * mean_log_probs).mean()


def test_megatron_737_label_smoothing_differs_by_rank():
    x, t = _rows(seed=3, v=10)
    ranks = [float(megatron_vocab_parallel(x.double(), t, 2, 0.1, r)) for r in range(2)]
    exact, _ = _exact_mean(x.double(), t, 0.1, "alpha_v_over_v_minus_1")
    assert abs(ranks[0] - ranks[1]) > 1e-3  # the ranks disagree
    assert all(abs(r - float(exact)) > 1e-3 for r in ranks)  # and neither is right
    opts = {"shards": 2, "label_smoothing": 0.1, "smoothing_convention": "alpha_v_over_v_minus_1"}
    mistake = LOSS.implementations["naive"].fn(x.double(), t, "mean", shard_mistake="local_smoothing", **opts)
    assert float(mistake) == pytest.approx(ranks[0], rel=1e-12)  # losscheck's option is that bug
    assert float(LOSS.implementations["stable"].fn(x, t, "mean", **opts)) == round_exact(exact, "float32").nearest


def test_gathered_logits_path_adds_log_shards():
    """Megatron-LM #7452 (2): the labels path with gathered logits returns loss + log(TP):
    every rank's sum of exp is already the whole vocabulary's, and they are all-reduced."""

    def gathered_then_reduced(x, t, shards):
        per_rank = torch.logsumexp(x, 1).exp()  # each rank holds the gathered logits
        return (torch.log(per_rank * shards) - x.gather(1, t[:, None]).squeeze(1)).mean()

    x, t = _rows(seed=4)
    exact, _ = _exact_mean(x.double(), t)
    for k in (2, 4, 8):
        wrong = float(gathered_then_reduced(x.double(), t, k))
        assert wrong - float(exact) == pytest.approx(math.log(k), rel=1e-9)
        naive = LOSS.implementations["naive"].fn(x.double(), t, "mean", shards=k, shard_mistake="log_shards")
        assert float(naive) == pytest.approx(wrong, rel=1e-12)


def test_megatron_1754_vocabulary_not_divisible():
    """Megatron-LM #1754: 50257 entries on 2 ranks as ⌊V/k⌋ per rank: the last entry is in no
    shard, and a target there contributes logit 0 — here 50 % of the loss; stable's uneven
    shards (torch.tensor_split's) give the exact value."""

    def floor_partition(x, t, shards):
        size = x.shape[1] // shards
        kept = x[:, : size * shards]
        own = t < size * shards
        xt = torch.where(own, kept.gather(1, torch.where(own, t, 0)[:, None]).squeeze(1), 0.0)
        return (torch.logsumexp(kept, 1) - xt).mean()

    v = 50257
    x = torch.zeros(1, v, dtype=torch.float32)
    x[0, v - 1] = 12.0  # the last token, the one in no shard, is the confident target
    t = torch.tensor([v - 1])
    exact = MP.log(MP.exp(12) + (v - 1)) - 12
    wrong = float(floor_partition(x.double(), t, 2))
    assert abs(wrong - float(exact)) / float(exact) > 0.5
    naive = LOSS.implementations["naive"].fn(x.double(), t, "mean", shards=2, shard_mistake="uneven_split")
    assert float(naive) == pytest.approx(wrong, rel=1e-12)
    stable = LOSS.implementations["stable"].fn(x, t, "mean", shards=2)
    assert float(stable) == round_exact(exact, "float32").nearest


def test_liger_1260_the_other_smoothing_formula():
    x, t = _rows(seed=5)
    exact_torch, _ = _exact_mean(x.double(), t, 0.1, "alpha_over_k")
    exact_megatron, _ = _exact_mean(x.double(), t, 0.1, "alpha_v_over_v_minus_1")
    assert abs(float(exact_torch) - float(exact_megatron)) > 1e-3
    mixed = LOSS.implementations["naive"].fn(
        x.double(), t, "mean", shards=3, label_smoothing=0.1, shard_mistake="smoothing_formula"
    )
    assert float(mixed) == pytest.approx(float(exact_megatron), rel=1e-12)


SWEEP = """
name: shard
losses: [sharded_cross_entropy]
implementations: [naive, stable, torch]
scales: [1, 100]
batch_sizes: [4]
classes: [1001]
dtypes: [float32, bfloat16]
distributions: [normal, confident_correct]
label_smoothing: [0, 0.1]
shards: [1, 3, 8]
shard_mistakes: [none, log_shards]
timing: false
"""


def test_sweep(tmp_path):
    (tmp_path / "s.yaml").write_text(SWEEP)
    out = tmp_path / "out"
    args = ["bench", str(tmp_path / "s.yaml"), "--out", str(out), "--no-progress", "--no-plots"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.output + result.stderr
    data = results.load(out / "shard.json")
    recs = data["records"]
    for r in recs:
        mistake = dict(r["options"]).get("shard_mistake", "none")
        if mistake != "none" and r["impl"] != "naive":
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r["message"]
        if r["impl"] == "stable":
            assert r["forward"]["max_ulp"] <= 1 and r["backward"]["max_ulp"] <= 1, r
    formula = [f for f in data["findings"] if f["kind"] == "formula"]
    # log(shards) on every row: a formula error at every shard count but 1 (log 1 = 0). (Label
    # smoothing's gradient p − ε/V cancels in float32 and bfloat16 for naive and torch alike,
    # sharded or not: those findings are cross entropy's own.)
    for k in (3, 8):
        variants = [f["variant"] for f in formula if f["impl"] == "naive" and f["dtype"] == "float32"]
        assert f"shard_mistake=log_shards, shards={k}" in variants
    assert not [f for f in formula if f["impl"] == "stable"]
    assert not [f for f in formula if "shard_mistake" in f["variant"] and "shards=" not in f["variant"]
                and "label_smoothing" not in f["variant"]]
