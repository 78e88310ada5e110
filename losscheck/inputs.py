"""Sweep-point inputs from a seed: float64 logits and targets (METRICS.md, "Inputs").

Inputs depend on (seed, loss, batch, classes, scale, distribution) but not on the dtype
or the device, so every dtype sees the same float64 values, rounded once to it.
"""
from __future__ import annotations

import zlib

import numpy as np

BINARY_DISTRIBUTIONS = ("normal", "uniform", "extreme", "confident_correct", "confident_wrong")
DISTRIBUTIONS = BINARY_DISTRIBUTIONS
DESCRIPTIONS = {
    "normal": "logits N(0, 1)·scale",
    "uniform": "logits U(−scale, scale)",
    "extreme": "logits ±scale exactly, every sign/target combination",
    "confident_correct": "binary: |x| = scale·U(½, 1) on the target's side; "
    "multi-class: target logit +scale, others N(0, 1)",
    "confident_wrong": "binary: |x| = scale·U(½, 1) on the wrong side; "
    "multi-class: target logit −scale, one other +scale, others N(0, 1)",
}


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
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x, t
