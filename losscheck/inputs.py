"""Sweep-point inputs from a seed: float64 logits and targets (METRICS.md, "Inputs").

Inputs depend on (seed, loss, batch, classes, scale, distribution) but not on the dtype
or the device, so every dtype sees the same float64 values, rounded once to it.
"""
from __future__ import annotations

import zlib

import numpy as np

# Every loss: random and extreme finite logits.
COMMON_DISTRIBUTIONS = ("normal", "uniform", "extreme", "confident_correct", "confident_wrong")
# Multi-class losses only: value sets with no binary counterpart (as PyTorch's op tests use).
MULTICLASS_DISTRIBUTIONS = ("ties", "dominant", "target_min")
# Losses taking logits only: ±inf logits. For probability inputs (bce) σ(±inf) is exactly
# 0 or 1, which large scales already produce.
LOGIT_DISTRIBUTIONS = ("nonfinite",)
DISTRIBUTIONS = COMMON_DISTRIBUTIONS + MULTICLASS_DISTRIBUTIONS + LOGIT_DISTRIBUTIONS
# What `generate` accepts for binary losses (bce: see `applies`, nonfinite does not apply).
BINARY_DISTRIBUTIONS = COMMON_DISTRIBUTIONS + LOGIT_DISTRIBUTIONS
DESCRIPTIONS = {
    "normal": "logits N(0, 1)·scale",
    "uniform": "logits U(−scale, scale)",
    "extreme": "logits ±scale exactly, every sign/target combination",
    "confident_correct": "binary: |x| = scale·U(½, 1) on the target's side; "
    "multi-class: target logit +scale, others N(0, 1)",
    "confident_wrong": "binary: |x| = scale·U(½, 1) on the wrong side; "
    "multi-class: target logit −scale, one other +scale, others N(0, 1)",
    "ties": "multi-class: every logit +scale (loss log C, gradient 1/C − onehot)",
    "dominant": "multi-class: one non-target logit +scale, all others (the target included) 0 "
    "(loss scale + log1p((C−1)·e^−scale))",
    "target_min": "multi-class: target logit −scale, others N(0, 1); the target is the row "
    "minimum (min(−scale, the others' minimum) where an N(0, 1) draw is below −scale)",
    "nonfinite": "logit losses: ±inf logits among N(0, 1)·scale ones; binary: every "
    "(±inf, y) combination; multi-class: rows with −inf (masked) non-targets, a −inf target, "
    "a +inf target, a +inf non-target (at most one +inf per row)",
}


def applies(distribution: str, multiclass: bool, input_kind: str) -> bool:
    """Whether `distribution` is a value set of a loss with these properties.

    A distribution that does not apply produces no sweep points for that loss:
    multi-class value sets (ties, dominant, target_min) have no binary counterpart, and
    ±inf logits (nonfinite) are no input of a probability loss.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    if distribution in MULTICLASS_DISTRIBUTIONS and not multiclass:
        return False
    if distribution in LOGIT_DISTRIBUTIONS and input_kind != "logits":
        return False
    return True


def distributions_for(multiclass: bool, input_kind: str) -> tuple[str, ...]:
    """The distributions that apply to a loss, in `DISTRIBUTIONS` order."""
    return tuple(d for d in DISTRIBUTIONS if applies(d, multiclass, input_kind))


def rng_for(seed: int, *key: object) -> np.random.Generator:
    # crc32 of the key's text: stable across processes (unlike hash()).
    return np.random.default_rng([seed, zlib.crc32("|".join(map(repr, key)).encode())])


def generate(loss: str, multiclass: bool, batch: int, classes: int | None, scale: float,
             distribution: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels): logits float64 of shape (batch,) or (batch, classes)."""
    rng = rng_for(seed, loss, batch, classes, float(scale), distribution)
    if multiclass:
        return _multiclass(rng, batch, int(classes), float(scale), distribution)
    return _binary(rng, batch, float(scale), distribution)


def _binary(rng, n, scale, dist):
    y = rng.integers(0, 2, n).astype(np.float64)
    if dist == "normal":
        x = rng.standard_normal(n) * scale
    elif dist == "uniform":
        x = rng.uniform(-scale, scale, n)
    elif dist == "extreme":
        i = np.arange(n)
        x = np.where(i % 2 == 0, scale, -scale)
        y = ((i // 2) % 2).astype(np.float64)
    elif dist in ("confident_correct", "confident_wrong"):
        side = 2 * y - 1 if dist == "confident_correct" else 1 - 2 * y
        x = side * scale * rng.uniform(0.5, 1.0, n)
    elif dist == "nonfinite":
        # Even elements: ±inf, cycling through (+inf, 0), (+inf, 1), (−inf, 0), (−inf, 1);
        # odd elements: N(0, 1)·scale with a random label.
        i = np.arange(n)
        x = rng.standard_normal(n) * scale
        special = i % 2 == 0
        combo = (i // 2) % 4
        x = np.where(special, np.where(combo < 2, np.inf, -np.inf), x)
        y = np.where(special, (combo % 2).astype(np.float64), y)
    elif dist in MULTICLASS_DISTRIBUTIONS:
        raise ValueError(f"distribution {dist!r} applies to multi-class losses only")
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x, y


def _multiclass(rng, n, c, scale, dist):
    t = rng.integers(0, c, n)
    rows = np.arange(n)
    if dist == "normal":
        x = rng.standard_normal((n, c)) * scale
    elif dist == "uniform":
        x = rng.uniform(-scale, scale, (n, c))
    elif dist == "extreme":
        x = np.where(rng.integers(0, 2, (n, c)) == 1, scale, -scale)
        # Even rows: target on a +scale logit; odd rows: on a −scale one (where one exists).
        want = np.where(rows % 2 == 0, scale, -scale)
        x[rows, t] = want
    elif dist == "confident_correct":
        x = rng.standard_normal((n, c))
        x[rows, t] = scale
    elif dist == "confident_wrong":
        x = rng.standard_normal((n, c))
        if c > 1:
            other = (t + rng.integers(1, c, n)) % c
            x[rows, other] = scale
        x[rows, t] = -scale
    elif dist == "ties":
        x = np.full((n, c), scale)
    elif dist == "dominant":
        # The target stays at 0 with the others: the loss is scale + log1p((C−1)·e^−scale),
        # the target's gradient −(1 − p_t) with p_t ≈ e^−scale.
        x = np.zeros((n, c))
        if c > 1:
            other = (t + rng.integers(1, c, n)) % c
            x[rows, other] = scale
    elif dist == "target_min":
        # −scale, or the others' minimum where an N(0, 1) draw is below −scale (small
        # scales): the target is always the row minimum.
        x = rng.standard_normal((n, c))
        x[rows, t] = np.inf
        x[rows, t] = np.minimum(-scale, x.min(axis=1))
    elif dist == "nonfinite":
        x = _multiclass_nonfinite(rng, n, c, scale, t)
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x, t


def _multiclass_nonfinite(rng, n, c, scale, t):
    """N(0, 1)·scale logits with ±inf, row kind by row index mod 4:

    0: some non-target logits −inf (masked), the target finite;
    1: the target −inf, at least one other logit finite (loss +inf);
    2: the target +inf, the only +inf of its row (loss 0 in the limit);
    3: one non-target +inf, the target finite (loss +inf).

    In every row each other non-target logit is also −inf with probability ¼. No row has
    two +inf logits or only −inf ones: their limits are undefined (tested on their own).
    """
    rows = np.arange(n)
    kind = rows % 4
    x = rng.standard_normal((n, c)) * scale
    if c == 1:  # only the target: a +inf target is the one defined non-finite row
        x[kind == 2, 0] = np.inf
        return x
    other = (t + rng.integers(1, c, n)) % c
    masked = rng.random((n, c)) < 0.25
    masked[rows, t] = False
    masked[rows, other] = kind == 0  # masked in kind 0, finite (or +inf) in the others
    x[masked] = -np.inf
    x[rows[kind == 1], t[kind == 1]] = -np.inf
    x[rows[kind == 2], t[kind == 2]] = np.inf
    x[rows[kind == 3], other[kind == 3]] = np.inf
    return x


# ---- options and sequences ---------------------------------------------------------------

# Multi-class logits of more values than this are generated in blocks of rows, each from
# its own stream (block 0 from the point's own), straight into the dtype under test: a
# 512 × 128k point never exists in float64 at once.
GENERATE_CHUNK = 1 << 22
WEIGHT_RANGE = (0.25, 4.0)  # `weights: random`: log-uniform in this range
SOFT_MIX = 0.9  # soft targets: 0.9·onehot(t) + 0.1·(a random distribution)


def rows_blocks(rows: int, classes: int) -> list[slice]:
    """Row blocks of at most GENERATE_CHUNK values, multiples of 4 rows (row kinds of the
    `nonfinite` and `extreme` value sets cycle with period 4 and 2)."""
    step = max(4, (GENERATE_CHUNK // max(1, classes)) // 4 * 4)
    return [slice(s, min(rows, s + step)) for s in range(0, rows, step)]


def generate_blocks(loss: str, batch: int, classes: int, scale: float, distribution: str, seed: int,
                    time: int | None = None):
    """(rows slice, float64 logits, labels) for each block of a multi-class point's rows
    (batch·time rows for sequence losses). One block is exactly `generate`'s values."""
    rows = batch * (time or 1)
    key = (loss, batch, classes, float(scale), distribution) + ((time,) if time else ())
    for i, block in enumerate(rows_blocks(rows, classes)):
        rng = rng_for(seed, *key) if i == 0 else rng_for(seed, *key, i)
        x, t = _multiclass(rng, block.stop - block.start, int(classes), float(scale), distribution)
        yield block, x, t


def sequence_padding(batch: int, time: int, seed: int) -> np.ndarray:
    """Padding mask (batch, time): sequence b has a length uniform in [⌈time/2⌉, time] and
    the positions after it are padding (ignore_index)."""
    rng = rng_for(seed, "sequence_lengths", batch, time)
    lengths = rng.integers((time + 1) // 2, time + 1, batch)
    return np.arange(time)[None, :] >= lengths[:, None]


def option_values(loss: str, multiclass: bool, options: dict, rows: int, classes: int | None,
                  labels: np.ndarray, seed: int) -> dict:
    """The arrays and numbers behind a point's options (METRICS.md "Inputs": generated in
    float64 from the seed; rounded to the dtype by the caller):

    * ``weight``: per element (binary) or per class, log-uniform in WEIGHT_RANGE;
    * ``pos_weight``, ``label_smoothing``: the number;
    * ``ignored``: a mask of exactly round(fraction·rows) ignored targets;
    * ``soft``: target rows 0.9·onehot(t) + 0.1·Dirichlet(1) (for ``targets: soft``).

    They do not depend on the scale or value set, so every scale sees the same weights.
    """
    out: dict = {}
    if options.get("weight", "none") != "none":
        rng = rng_for(seed, loss, "weight", rows, classes)
        size = classes if multiclass else rows
        lo, hi = np.log(WEIGHT_RANGE[0]), np.log(WEIGHT_RANGE[1])
        out["weight"] = np.exp(rng.uniform(lo, hi, size))
    if float(options.get("pos_weight", 1.0)) != 1.0:
        out["pos_weight"] = float(options["pos_weight"])
    if float(options.get("label_smoothing", 0.0)):
        out["label_smoothing"] = float(options["label_smoothing"])
    fraction = float(options.get("ignored", 0.0))
    if fraction:
        rng = rng_for(seed, loss, "ignored", rows, fraction)
        mask = np.zeros(rows, dtype=bool)
        mask[rng.permutation(rows)[:int(round(fraction * rows))]] = True
        out["ignored"] = mask
    if options.get("targets", "hard") == "soft":
        rng = rng_for(seed, loss, "soft", rows, classes)
        noise = rng.dirichlet(np.ones(int(classes)), rows)
        onehot = np.zeros((rows, int(classes)))
        onehot[np.arange(rows), labels] = 1.0
        out["soft"] = SOFT_MIX * onehot + (1 - SOFT_MIX) * noise
    return out
