"""Gradient-accumulation normalisation (issue 18 item 5; `losscheck accumulate`).

The same tokens — B sequences of ragged lengths over a vocabulary V, padding ignored — run as
one batch and as m micro-batches, each micro-batch's cross entropy normalised by one of the
conventions training loops use, its backward accumulated into the gradient as a loop does:

* ``microbatch_mean``: each micro-batch's own token mean (F.cross_entropy's "mean"), the
  micro-batch losses averaged: (1/m)·Σ_k mean_k. Not the full batch's per-token mean once
  lengths are ragged (transformers #34191, #35203, #37766; trl #2175), and 0/0 = NaN for a
  micro-batch whose every target is padding (torchtune #2341, OpenRLHF #583);
* ``microbatch_mean_guarded``: the same with the token count clamped to at least 1 (the
  NaN guard of those fixes): finite, still biased;
* ``global_tokens``: each micro-batch's token sum divided by the full batch's token count
  (transformers' ``num_items_in_batch``): the full batch's mean up to rounding.

Each is compared with the full batch's per-token mean and its gradient from losscheck's
certified cross-entropy reference (METRICS.md): the loss and gradient error in bits of the
dtype, NaN counts, and the convention's *formula* bias — its value in exact arithmetic
against the full batch's — so that a normalisation error is told apart from rounding. The
bias of the gradient is exact: a token of micro-batch k is scaled by w_k·N instead of 1
(w_k: the convention's weight of micro-batch k, N the batch's token count), a rational number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F

from . import inputs, reference as R
from .accumulate_section import problem, render  # noqa: F401  (render: accumulate.render for its users)
from .catalog import IGNORE_INDEX
from .dtypes import FORMATS
from .errors import LosscheckError
from .losses import LOSSES, reference
from .metrics import ErrorStats, bits, ulp_distance

CONVENTIONS = ("microbatch_mean", "microbatch_mean_guarded", "global_tokens")


@dataclass(frozen=True)
class Spec:
    """One accumulation experiment (validated by `check`)."""

    batch: int = 8  # sequences
    time: int = 64  # the longest sequence; lengths are uniform in [1, time]
    vocab: int = 1000
    micro_batches: int = 4
    masked: int = 0  # micro-batches (the last ones) whose every target is padding
    dtype: str = "float32"
    scale: float = 1.0  # logits N(0, scale²)
    seed: int = 0
    device: str = "cpu"


def check(spec: Spec) -> Spec:
    """`spec`, or a LosscheckError naming the flag, the bad value and what is allowed."""
    found = problem(asdict(spec))
    if found:
        name, value, allowed = found
        raise LosscheckError(f"accumulate: --{name.replace('_', '-')} {value!r} is not allowed; allowed: {allowed}")
    return spec


@dataclass(frozen=True)
class Batch:
    logits: torch.Tensor  # (B, T, V) in the dtype
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX at padding
    groups: tuple[slice, ...]  # the micro-batches: contiguous runs of sequences


def make_batch(spec: Spec) -> Batch:
    """Logits from the seed rounded once to the dtype, lengths uniform in [1, T], the last
    `masked` micro-batches all padding (a prompt-only sample whose labels are all masked)."""
    b, t, v = spec.batch, spec.time, spec.vocab
    d = inputs.generator_for(spec.seed, "accumulate", b, t, v, device=spec.device)
    logits = R.round_to(d.normal((b, t, v), spec.scale), FORMATS[spec.dtype].torch_dtype)
    targets = d.integers(0, v, (b, t)).to(torch.int64)
    lengths = d.integers(1, t + 1, (b,))
    targets[torch.arange(t, device=targets.device)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    bounds = [round(k * b / spec.micro_batches) for k in range(spec.micro_batches + 1)]
    groups = tuple(slice(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False))
    for g in groups[spec.micro_batches - spec.masked :]:
        targets[g] = IGNORE_INDEX
    return Batch(logits, targets, groups)


def _weights(convention: str, counts: list[int], total: int) -> list[Fraction | None]:
    """w_k: the factor of micro-batch k's token sum in the convention's loss (None: 0/0)."""
    m = len(counts)
    if convention == "global_tokens":
        return [Fraction(1, total)] * m
    if convention == "microbatch_mean_guarded":
        return [Fraction(1, m * max(n, 1)) for n in counts]
    return [Fraction(1, m * n) if n else None for n in counts]


def _run(convention: str, batch: Batch, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The convention as a training loop runs it, in the dtype: per micro-batch forward,
    backward into the logits' gradient (accumulated there), loss summed in the dtype."""
    x = batch.logits.detach().clone().requires_grad_(True)
    m, v = len(batch.groups), x.shape[-1]
    acc = torch.zeros((), dtype=x.dtype, device=x.device)
    for g in batch.groups:
        z, t = x[g].reshape(-1, v), batch.targets[g].reshape(-1)
        if convention == "microbatch_mean":
            loss = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX) / m
        elif convention == "microbatch_mean_guarded":
            n = int((t != IGNORE_INDEX).sum())
            loss = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1) / m
        else:
            loss = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, reduction="sum") / total
        loss.backward()
        acc = acc + loss.detach()
    assert x.grad is not None
    return acc, x.grad


@dataclass
class Outcome:
    """One convention's results against the full batch (the `--json` form: `asdict`)."""

    convention: str
    loss: float
    reference: float  # the full batch's per-token mean (working precision)
    loss_bits: float  # of the dtype: the computed loss against the rounded full-batch mean
    loss_bias: float | None  # relative, in exact arithmetic: the formula's own error (None: 0/0)
    grad: dict = field(default_factory=dict)  # ErrorStats.as_dict() of the gradient
    grad_bias: float | None = None  # max over tokens of |w_k·N − 1|, exact (None: 0/0 somewhere)


def run(spec: Spec) -> dict:
    """Every convention on `spec`'s batch: {"spec": ..., "tokens": ..., "outcomes": [...]}."""
    check(spec)
    batch = make_batch(spec)
    v = spec.vocab
    flat_t = batch.targets.reshape(-1)
    counts = [int((batch.targets[g] != IGNORE_INDEX).sum()) for g in batch.groups]
    total = sum(counts)
    ce = LOSSES["cross_entropy"]
    options = {"ignore_index": IGNORE_INDEX}
    full = reference(ce, batch.logits.reshape(-1, v), flat_t, options, "mean")
    sums = [
        reference(ce, batch.logits[g].reshape(-1, v), batch.targets[g].reshape(-1), options, "sum").value or 0.0
        for g in batch.groups
    ]
    assert full.reduced is not None and full.value is not None
    fmt = FORMATS[spec.dtype]
    outcomes = []
    for convention in CONVENTIONS:
        loss, grad = _run(convention, batch, total)
        stats = ErrorStats(fmt.default_threshold_bits)
        stats.add(grad.reshape(-1, v), full.grad)
        w = _weights(convention, counts, total)
        kept = [wk for wk, n in zip(w, counts, strict=True) if n]
        grad_bias = None if None in kept else float(max(abs(wk * total - 1) for wk in kept if wk is not None))
        # Relative bias Σ_k (w_k·N − 1)·S_k / Σ_k S_k: the rational factors exact, the token sums
        # S_k from the reference, so that global_tokens' (w_k·N = 1) is exactly 0.
        bias = _bias([wk for wk in w if wk is not None], sums, total) if None not in w else None
        outcomes.append(
            Outcome(
                convention=convention,
                loss=float(loss),
                reference=full.value,
                loss_bits=_bits(loss, full.reduced, fmt),
                loss_bias=bias,
                grad=stats.as_dict(),
                grad_bias=grad_bias,
            )
        )
    return {"spec": asdict(spec), "tokens": counts, "outcomes": [asdict(o) for o in outcomes]}


def _bias(w: list[Fraction], sums: list[float], total: int) -> float:
    scaled = sum(((wk * total - 1) * Fraction(sk) for wk, sk in zip(w, sums, strict=True)), Fraction(0))
    whole = sum((Fraction(sk) for sk in sums), Fraction(0))
    return float(abs(scaled / whole)) if whole else 0.0


def _bits(value: torch.Tensor, reference: torch.Tensor, fmt) -> float:
    return float(bits(float(ulp_distance(value.reshape(1), reference.reshape(1))[0]), fmt))
