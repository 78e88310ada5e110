"""token_logprobs and entropy (issue 18, item 3): the references against mpmath (loss, gradient
and mean, every dtype), the absolute error in nats in the records, and the log-probability
threads of issue 18 reproduced with losscheck — each with a custom implementation written
like the code of the thread, and the correct value from mpmath:

* TRL #2799 / OpenRLHF #718: the memory-saving x_t − logsumexp(x) in bfloat16 cancels;
* genlm-backend #66: bfloat16 log-probabilities of tail tokens are 0.126 nats off (storage);
* open-instruct #1387: the LM head's logits rounded to bfloat16 move log-probabilities by nats
  over a sequence; a float32 head does not;
* TRL #7084: a kernel path that skips the float32 upcast (a review finding on the PR).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import bench_results
from test_reference import DTYPES, MP, round_exact

from losscheck import sweep
from losscheck.losses import LOSSES, reference, token_logprobs as tl

TOKEN = LOSSES["token_logprobs"]
ENTROPY = LOSSES["entropy"]


def _point(loss, dtype="float32", dist="normal", scale=1.0, batch=4, classes=9):
    case = sweep.Case(0, loss.name, "cpu", dtype, batch, classes, dist, scale, "mean", ())
    return sweep.point_data(loss, case, 0)


def _softmax(row):
    m = max(row)
    e = [MP.exp(x - m) for x in row]
    s = MP.fsum(e)
    return [v / s for v in e], m + MP.log(s)


def exact_logprob(row, t):
    """log softmax(row)_t and its gradient e_t − softmax(row), exactly."""
    row = [MP.mpf(float(x)) for x in row]
    p, lse = _softmax(row)
    return row[t] - lse, [(1 if j == t else 0) - p[j] for j in range(len(row))]


def exact_entropy(row):
    """H(softmax(row)) and its gradient −p_j (log p_j + H), exactly."""
    row = [MP.mpf(float(x)) for x in row]
    p, lse = _softmax(row)
    logp = [x - lse for x in row]
    h = -MP.fsum(pj * lj for pj, lj in zip(p, logp, strict=True))
    return h, [-pj * (lj + h) for pj, lj in zip(p, logp, strict=True)]


def _assert_rounded(got, exact, dtype, what):
    r = round_exact(exact, dtype)
    assert got == r.nearest or (r.tie and got in (r.below, r.above)), (what, dtype, got, float(exact), r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist,scale", [("normal", 3.0), ("confident_correct", 40.0), ("confident_wrong", 25.0),
                                        ("ties", 2.0), ("extreme", 1.0)])
@pytest.mark.parametrize("name", ["token_logprobs", "entropy"])
def test_reference_is_correctly_rounded(name, dtype, dist, scale):
    loss = LOSSES[name]
    data = _point(loss, dtype, dist, scale)
    ref = reference(loss, data.inp, data.target, data.options, "mean")
    rows = data.inp.double().tolist()
    total = MP.mpf(0)
    for i, row in enumerate(rows):
        value, grad = exact_logprob(row, int(data.target[i])) if name == "token_logprobs" else exact_entropy(row)
        total += value
        _assert_rounded(float(ref.loss[i]), value, dtype, "loss")
        # The exact values behind the error in nats: float64 within 2**-50 relative.
        assert abs(float(ref.exact[i]) - float(value)) <= 2**-50 * max(1.0, abs(float(value)))
        for j, g in enumerate(grad):
            _assert_rounded(float(ref.grad[i, j]), g / len(rows), dtype, "gradient")
    _assert_rounded(float(ref.reduced), total / len(rows), dtype, "mean")


def _config(losses, dtypes, dists, scales, classes=1000, extra="", batch=8):
    return (f"name: c\nlosses: {losses}\nimplementations: [stable, torch]\nscales: {scales}\nbatch_sizes: [{batch}]\n"
            f"classes: [{classes}]\ndtypes: {dtypes}\ndistributions: {dists}\nreductions: [none]\n"
            f"timing: false\n{extra}")


def _by(data):
    out = {}
    for r in data["records"]:
        assert r["status"] == "ok", r["message"]
        out[(r["impl"], r["dtype"], r["distribution"], r["scale"], r["options"].get("precision", "native"))] = r
    return out


def _custom(by, impl_prefix):
    return {k[1:]: r for k, r in by.items() if k[0].startswith(impl_prefix)}


IMPLS = '''
import torch
import torch.nn.functional as F

def gather_lse(x, t, reduction="mean"):
    # TRL #2799 / OpenRLHF #718: gather the target logit, subtract the logsumexp: no (N, V) output.
    out = x.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
    return out if reduction == "none" else out.mean()

def kernel_no_upcast(x, t, reduction="mean"):
    # TRL #7084: liger_selective_log_softmax called on the bfloat16 logits (the CUDA path of
    # `_selective_log_softmax`), its log-probabilities and the sequence's sum in bfloat16, where
    # chunk_forward and the CPU fallback upcast with .float() before log_softmax.
    out = F.log_softmax(x, -1).gather(-1, t[:, None]).squeeze(-1)
    return out if reduction == "none" else out.sum() if reduction == "sum" else out.mean()
'''


@pytest.fixture
def impls(tmp_path):
    path = tmp_path / "impls.py"
    path.write_text(IMPLS)
    return path


def test_trl_2799_gather_minus_logsumexp_cancels_in_bfloat16(tmp_path, impls):
    # Confident rows (target logit 10 or 20 above the rest): log p_t is a small negative number,
    # which x_t − logsumexp(x) forms from two bfloat16 numbers near 10 or 20 (ULP 1/16, 1/8):
    # its relative precision is gone, although the absolute error stays below an ULP of the
    # logits. In float32 the same form is within a few ULPs on ordinary rows (why TRL keeps it
    # there and loops over rows with log_softmax for bfloat16).
    data = bench_results(tmp_path, _config("[token_logprobs]", "[float32, bfloat16]", "[normal, confident_correct]",
                                    "[1, 10, 20]"), "--impl", f"token_logprobs={impls}:gather_lse")
    by = _by(data)
    mine = _custom(by, "gather_lse")
    assert mine[("float32", "normal", 1.0, "native")]["forward"]["max_ulp"] <= 8
    assert max(mine[("bfloat16", "confident_correct", s, "native")]["forward"]["max_bits"] for s in (10.0, 20.0)) == 8.0
    for s in (10.0, 20.0):
        assert by[("stable", "bfloat16", "confident_correct", s, "native")]["forward"]["max_ulp"] <= 1
    # The correct value, from mpmath: on a row whose target is 20 above 999 logits of 0,
    # log p_t = −log1p(999 e^−20) ≈ −2.06e−6; x_t − logsumexp in bfloat16 returns 0 (all bits lost).
    row = torch.zeros(1, 1000, dtype=torch.bfloat16)
    row[0, 0] = 20
    exact, _ = exact_logprob(row[0].tolist(), 0)
    assert float(exact) == pytest.approx(-math.log1p(999 * math.exp(-20)), rel=1e-12)
    t0 = torch.zeros(1, dtype=torch.int64)
    assert float(tl.gather_logsumexp(row, t0, "none")[0]) != round_exact(exact, "bfloat16").nearest
    assert float(tl.stable(row, t0, "none")[0]) == round_exact(exact, "bfloat16").nearest


def test_genlm_66_bfloat16_tail_logprobs_are_a_tenth_of_a_nat_off(tmp_path):
    # Tail tokens (normal logits of spread 8 over 1000 classes: log p_t down to about −60): a
    # bfloat16 log-probability has an ULP of 0.25 in [−64, −32), so even the correctly rounded one
    # is up to 0.125 nats off — genlm's 0.126 in its deep bin. The float32 output (`precision:
    # upcast`, genlm's fix) is within 1e−5 nats.
    data = bench_results(tmp_path, _config("[token_logprobs]", "[bfloat16]", "[normal]", "[8]", batch=64,
                                    extra="precision: [native, upcast]\n"))
    by = _by(data)
    for impl in ("stable", "torch"):
        native = by[(impl, "bfloat16", "normal", 8.0, "native")]["forward"]
        assert native["max_ulp"] <= 1  # correctly rounded (or nearly): the error is the storage's
        assert 0.05 < native["abs_nats"]["max"] <= 0.126
    upcast = by[("torch", "bfloat16", "normal", 8.0, "upcast")]["forward"]
    assert upcast["abs_nats"]["max"] < 1e-5
    # mpmath: log p of the second class of [0, −40.3125] is −40.3125 − log1p(e^−40.3125), which
    # bfloat16 (ULP 0.25 there) rounds 0.0625 nats away.
    exact, _ = exact_logprob([0.0, -40.3125], 1)
    assert abs(round_exact(exact, "bfloat16").nearest - float(exact)) == pytest.approx(0.0625, rel=1e-9)


def test_open_instruct_1387_bf16_lm_head_moves_log_probs():
    # open-instruct #1387 ("Add fp32 LM head option for GRPO", allenai/open-instruct pull request,
    # 2026-01-19): vLLM's and the trainer's log-probs of the same sequences "can diverge by 2-24+
    # nats" through "bf16 precision loss in the LM head projection (hidden @ lm_head.T -> logits
    # -> softmax -> logprobs)"; the fix runs the head in fp32. Here the head alone, on one
    # 2048-token sequence (hidden size 256, vocabulary 4096, logits to about ±20): the exact
    # log-probabilities come from losscheck's token_logprobs reference on the float64 logits
    # (every bf16 × bf16 product is exact in float64), checked against mpmath on the worst token.
    g = torch.Generator().manual_seed(0)
    n, h, v = 2048, 256, 4096
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
    head = (torch.randn(v, h, generator=g) * 4 / h**0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    z64 = hidden.double() @ head.double().T
    exact = reference(TOKEN, z64, t, {}, "none").exact

    def logprobs(z):  # the sampler's and the trainer's float32 log_softmax of the logits
        return torch.log_softmax(z.float(), -1).gather(1, t[:, None]).squeeze(1).double()

    bf16_head = logprobs(hidden @ head.T) - exact  # the logits rounded to bfloat16 first
    fp32_head = logprobs(hidden.float() @ head.float().T) - exact
    assert bf16_head.abs().max() > 0.03 and abs(float(bf16_head.sum())) > 0.3  # nats, one token / the sequence
    assert 2 <= float(bf16_head.abs().sum()) <= 24  # Σ|error| over the sequence: the thread's range
    assert fp32_head.abs().max() < 1e-5 and abs(float(fp32_head.sum())) < 1e-3
    i = int(bf16_head.abs().argmax())
    row = [math.fsum(float(a) * float(b) for a, b in zip(hidden[i].tolist(), head[j].tolist(), strict=True))
           for j in range(v)]  # fmt: skip
    value, _ = exact_logprob(row, int(t[i]))
    assert abs(float(exact[i]) - float(value)) <= 1e-12 * abs(float(value))


def test_trl_7084_kernel_without_the_float32_upcast(tmp_path, impls):
    # TRL #7084 ("Support precomputed reference log-probs with fused DPO", huggingface/trl pull
    # request; cursor[bot]'s review of trl/losses/fused_linear_preference.py, 2026-09-06,
    # "Selective log-softmax skips FP32 upcast"): the new CUDA path runs the selective
    # log-softmax on the original BF16/FP16 logits, so policy log-probs disagree with the
    # chunked fused loss and with cached reference scores, which upcast first.
    # A sequence's log-probability (the sum over its 64 tokens, about −1900 here) from a kernel
    # that keeps bfloat16: bfloat16's ULP is 8 at that size, so the sequence log-prob that DPO
    # compares with cached reference scores is nats off; the upcast path (`precision: upcast`:
    # float32 throughout) is within a thousandth of a nat.
    data = bench_results(tmp_path, _config("[token_logprobs]", "[bfloat16]", "[normal]", "[8]", batch=64,
                                    extra="precision: [native, upcast]\n").replace("[none]", "[sum]"),
                  "--impl", f"token_logprobs={impls}:kernel_no_upcast")
    by = _by(data)
    kernel = _custom(by, "kernel_no_upcast")[("bfloat16", "normal", 8.0, "native")]["forward"]
    assert abs(kernel["reference"]) > 1024  # bfloat16's ULP is 8 there
    assert kernel["abs_nats"]["reduced"] >= 0.5
    upcast = by[("torch", "bfloat16", "normal", 8.0, "upcast")]["forward"]
    assert upcast["abs_nats"]["reduced"] < 1e-3
    # mpmath: the sum of [−20.3125, −30.40625, −40.3125] … of 64 such tokens is exact in
    # float32 and 4 nats from the nearest bfloat16 at −1900 (the spacing there is 8).
    assert round_exact(MP.mpf(-1900), "bfloat16").nearest in (-1896.0, -1904.0)


def test_entropy_naive_is_nan_where_a_probability_underflows_and_stable_is_not(tmp_path):
    # 0·log 0: softmax underflows to 0 on a confident row (scale 200: e^−200 is below float32's
    # subnormals), the naive −Σ p log p is NaN; the exact entropy is tiny and positive.
    data = bench_results(tmp_path, _config("[entropy]", "[float32]", "[confident_correct]", "[200]").replace(
        "[stable, torch]", "[naive, stable, torch]"))
    by = _by(data)
    assert by[("naive", "float32", "confident_correct", 200.0, "native")]["forward"]["nan"] > 0
    stable = by[("stable", "float32", "confident_correct", 200.0, "native")]
    assert stable["forward"]["nan"] == 0 and stable["backward"]["nan"] == 0
    assert stable["forward"]["max_ulp"] <= 1
    h, _ = exact_entropy([200.0, 0.0, 0.0])
    assert 0 < float(h) < 1e-80


def test_nats_field_is_the_distance_to_the_exact_value():
    data = _point(TOKEN, "bfloat16", "confident_wrong", 40.0)
    ref = reference(TOKEN, data.inp, data.target, data.options, "none")
    from losscheck.metrics import abs_nats

    out = abs_nats(ref.loss, ref.exact)
    exact = [exact_logprob(r, int(t))[0] for r, t in zip(data.inp.double().tolist(), data.target.tolist(), strict=True)]
    want = max(abs(float(ref.loss[i]) - float(e)) for i, e in enumerate(exact))
    assert out["max"] == pytest.approx(want, rel=1e-2)
    nan = abs_nats(torch.tensor([math.nan, 1.0]), torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert nan["max"] == math.inf and nan["mean"] == math.inf
