"""Test oracle: losscheck.inputs as it was before the move to torch.Generator (the numpy
Generator of commit dc65c96, results files without `environment.inputs`), kept verbatim apart
from the imports and a `device` argument that it ignores (its values are numpy, on the host).

`use_legacy_inputs` swaps it in for the package's generator, so that the current evaluation
(reference, metrics, sweep) can be run on the old inputs and its records compared with files
the old code wrote: the input generator is then the only change (issue 13, item 1).
"""
from __future__ import annotations

import zlib

import numpy as np

from losscheck import inputs as _new
from losscheck.inputs import (GENERATE_CHUNK, MULTICLASS_DISTRIBUTIONS, SOFT_MIX,  # noqa: F401
                              WEIGHT_RANGE, rows_blocks)

NAME = "numpy"  # what a results file without `environment.inputs` means


def use_legacy_inputs(setattr_) -> None:
    """Swap the old generator in: `setattr_(module, name, value)` (pytest's
    monkeypatch.setattr, or plain setattr in a script)."""
    from losscheck import environment
    for name in ("generate", "generate_blocks", "sequence_padding", "option_values"):
        setattr_(_new, name, globals()[name])
    setattr_(environment, "INPUTS_GENERATOR", None)  # written as absent, as the old code did


def rng_for(seed: int, *key: object) -> np.random.Generator:
    # crc32 of the key's text: stable across processes (unlike hash()).
    return np.random.default_rng([seed, zlib.crc32("|".join(map(repr, key)).encode())])


def generate(loss: str, multiclass: bool, batch: int, classes: int | None, scale: float,
             distribution: str, seed: int, device="cpu") -> tuple[np.ndarray, np.ndarray]:
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


def generate_blocks(loss: str, batch: int, classes: int, scale: float, distribution: str, seed: int,
                    time: int | None = None, device="cpu"):
    """(rows slice, float64 logits, labels) for each block of a multi-class point's rows
    (batch·time rows for sequence losses). One block is exactly `generate`'s values."""
    rows = batch * (time or 1)
    key = (loss, batch, classes, float(scale), distribution) + ((time,) if time else ())
    for i, block in enumerate(rows_blocks(rows, classes)):
        rng = rng_for(seed, *key) if i == 0 else rng_for(seed, *key, i)
        x, t = _multiclass(rng, block.stop - block.start, int(classes), float(scale), distribution)
        yield block, x, t


def sequence_padding(batch: int, time: int, seed: int, device="cpu") -> np.ndarray:
    """Padding mask (batch, time): sequence b has a length uniform in [⌈time/2⌉, time] and
    the positions after it are padding (ignore_index)."""
    rng = rng_for(seed, "sequence_lengths", batch, time)
    lengths = rng.integers((time + 1) // 2, time + 1, batch)
    return np.arange(time)[None, :] >= lengths[:, None]


def option_values(loss: str, multiclass: bool, options: dict, rows: int, classes: int | None,
                  labels, seed: int, device="cpu") -> dict:
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
        onehot[np.arange(rows), np.asarray(labels)] = 1.0
        out["soft"] = SOFT_MIX * onehot + (1 - SOFT_MIX) * noise
    return out
