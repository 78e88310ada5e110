"""Sweep-point inputs from a seed: float64 logits and targets (METRICS.md, "Inputs").

Inputs depend on (seed, loss, batch, classes, scale, distribution) but not on the dtype:
every dtype sees the same float64 values, rounded once to it (`Loss.make_input`).

They are drawn by a `torch.Generator` on the point's device, seeded from the seed and a
hash of the point's key (`generator_for`), so they are made where they are used: a GPU
point's inputs never exist on the host. What holds (INPUTS_GENERATOR names this generator in
results files; files without the field were made by the former numpy generator):

* same seed, same config, same torch version and device type -> bit-identical inputs on the
  CPU, whatever the thread count and the machine's load (every step is either a serial draw
  of the generator, an elementwise operation with one implementation, or erfinv, which is
  not that and runs on one thread: `_one_thread`, tests/test_inputs.py);
* the CPU and CUDA generators are different algorithms (mt19937, Philox), so a
  `devices: [cpu, cuda]` sweep gives each device its own draws of the same distributions:
  a device's records are comparable with that device's, in distribution with the other's,
  not value by value. Generated per device rather than on the host and moved, because the
  point of issue 13 is that a GPU audit costs GPU time: a 8 × 4096 × 128k input made on
  the host is seconds of host work and a transfer for milliseconds of GPU work. CUDA
  draws are reproducible on one GPU model and torch version (Philox's output is fixed per
  offset, but torch's launch configuration, and so the offsets, follow the device).

N(0, 1) values come from the inverse CDF, √2·erfinv(v), v uniform on the odd multiples of
2**-53 in (−1, 1): exact float64 arithmetic but for erfinv, symmetric, never ±1 (no
infinite draw), and 5 times faster than torch's float64 `randn` on the CPU (scalar
Box–Muller); tails reach ±8.3 σ.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING


class _Torch:
    """torch, imported on first use: config and the CLI read the tables below without it
    (`losscheck --help`, `compare` and `report` never import torch, issue 13)."""

    def __getattr__(self, name):
        import torch as module

        globals()["torch"] = module
        return getattr(module, name)


if TYPE_CHECKING:
    import torch
else:
    torch = _Torch()

# Named in results files (the config's `inputs`, see results.py): a change of what any seed
# draws must change it, so that `compare` and the gate can tell that points differ in input.
INPUTS_GENERATOR = "torch-1"

# Every loss: random and extreme finite logits.
COMMON_DISTRIBUTIONS = ("normal", "uniform", "extreme", "confident_correct", "confident_wrong")
# Multi-class losses only: value sets with no binary counterpart (as PyTorch's op tests use).
# `dominant_target` and `masked` reach optax's bugs #1020 and #896 (issue 14 item 5).
MULTICLASS_DISTRIBUTIONS = ("ties", "dominant", "target_min", "common_offset", "dominant_target", "masked")
# Losses taking logits only: ±inf logits. For probability inputs (bce) σ(±inf) is exactly
# 0 or 1, which large scales already produce.
LOGIT_DISTRIBUTIONS = ("nonfinite",)
# Every loss: inputs outside the loss's domain (NaN; probabilities above 1 or below 0), made in
# the dtype under test (`out_of_domain`): what each implementation does with them is recorded,
# not scored (METRICS.md, "Out-of-domain inputs").
OUT_OF_DOMAIN = "out_of_domain"

# Losses of hidden states times a classifier (linear_cross_entropy) only; they take these and
# HIDDEN_APPLIES of the others (their inputs: losses/linear_cross_entropy_ref.py).
HIDDEN_DISTRIBUTIONS = ("offset",)
HIDDEN_APPLIES = ("normal", "uniform", "confident_correct", "confident_wrong", "ties", "offset")
# Those of a student's and a teacher's logits (kl_div, js_div: losses/divergence.py), each
# drawn from the value set independently: finite logits only (no NaN, no masked classes).
PAIR_APPLIES = ("normal", "uniform", "extreme", "confident_correct", "confident_wrong", "ties", "dominant")
DISTRIBUTIONS = (
    COMMON_DISTRIBUTIONS + MULTICLASS_DISTRIBUTIONS + LOGIT_DISTRIBUTIONS + HIDDEN_DISTRIBUTIONS + (OUT_OF_DOMAIN,)
)
# What `generate` accepts for binary losses (bce: see `applies`, nonfinite does not apply).
BINARY_DISTRIBUTIONS = COMMON_DISTRIBUTIONS + LOGIT_DISTRIBUTIONS + (OUT_OF_DOMAIN,)
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
    "common_offset": "multi-class: logits N(0, 1)·scale plus a large offset shared by the row, which the "
    "exact loss ignores; the one value set that depends on the dtype: even rows 1e6, odd rows 1e8 in float32, "
    "4096/32768 in float16, 256/65536 in bfloat16, 1e12/1e16 in float64",
    "dominant_target": "multi-class: every logit 0 but the target's, +scale (loss log1p((C−1)·e^−scale); "
    "optax #1020 in bfloat16 at a vocabulary of 128256 and scale 20: 0.0 for 2.643e-4)",
    "masked": "multi-class: logits N(0, 1)·scale, about half the non-targets −inf (at least one); soft "
    "targets are exactly 0 there (optax #896: logits [−inf, 0], targets [0, 1], loss 0)",
    "nonfinite": "logit losses: ±inf logits among N(0, 1)·scale ones; binary: every "
    "(±inf, y) combination; multi-class: rows with −inf (masked) non-targets, a −inf target, "
    "a +inf target, a +inf non-target (at most one +inf per row)",
    "offset": "linear_cross_entropy: a common offset of +scale in every logit (a bias of scale), on logits of spread 1",
    OUT_OF_DOMAIN: "N(0, 1)·scale logits, then by element (row) index mod 4 in the dtype: "
    "probability inputs 0: 1 + ulp(1) (just above 1), 1: −ulp(1)/2 (just below 0), 2: NaN; "
    "logit inputs 2: NaN (multi-class: the row's first logit); recorded, not scored",
}


# `common_offset`: the row offsets (even rows, odd rows) per dtype. Softmax is shift-invariant, so
# the exact loss of the rounded row ignores the offset; what an implementation gets is the
# variation that survives rounding next to it (optax's stability tests use 1e6/1e8 in float32,
# 4096 in float16, 256 in bfloat16; MLX#4188: logits at 1e8 gave loss 0 and a zero gradient).
# The only inputs that depend on the dtype, added after generation (`row_offsets`).
COMMON_OFFSETS = {
    "float64": (1e12, 1e16),
    "float32": (1e6, 1e8),
    "float16": (4096.0, 32768.0),
    "bfloat16": (256.0, 65536.0),
}


def row_offsets(distribution: str, dtype: str, rows: int, device="cpu") -> torch.Tensor | None:
    """The (rows, 1) float64 offsets `distribution` adds to the logits in `dtype`, or None
    where it adds none (every value set but `common_offset`)."""
    if distribution != "common_offset":
        return None
    even, odd = COMMON_OFFSETS[dtype]
    parity = torch.arange(rows, device=device) % 2 == 1
    return _pick(parity, odd, even).reshape(rows, 1)


def applies(distribution: str, multiclass: bool, input_kind: str) -> bool:
    """Whether `distribution` is a value set of a loss with these properties.

    A distribution that does not apply produces no sweep points for that loss:
    multi-class value sets (ties, dominant, target_min) have no binary counterpart, and
    ±inf logits (nonfinite) are no input of a probability loss.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    if input_kind == "logit_pairs":
        return distribution in PAIR_APPLIES
    if input_kind == "hidden" or distribution in HIDDEN_DISTRIBUTIONS:
        return input_kind == "hidden" and distribution in HIDDEN_APPLIES
    if distribution in MULTICLASS_DISTRIBUTIONS and not multiclass:
        return False
    return not (distribution in LOGIT_DISTRIBUTIONS and input_kind != "logits")


def distributions_for(multiclass: bool, input_kind: str) -> tuple[str, ...]:
    """The distributions that apply to a loss, in `DISTRIBUTIONS` order."""
    return tuple(d for d in DISTRIBUTIONS if applies(d, multiclass, input_kind))


class _Draws:
    """A seeded generator on a device and the few draws the value sets need."""

    def __init__(self, seed: int, key: tuple, device):
        # blake2b of the key's text: stable across processes (unlike hash()), 64 bits.
        digest = hashlib.blake2b(repr((int(seed),) + key).encode(), digest_size=8).digest()
        self.device = torch.device(device)
        self.g = torch.Generator(self.device).manual_seed(int.from_bytes(digest, "little"))

    def symmetric(self, shape) -> torch.Tensor:
        """Uniform on the odd multiples of 2**-53 in (−1, 1) (torch's float64 `rand` gives
        multiples of 2**-53 in [0, 1)): every step exact, symmetric, never ±1."""
        u = torch.rand(shape, dtype=torch.float64, device=self.device, generator=self.g)
        # 2u − (1 − 2**-53) in one pass (2u is exact: one rounding either way, none in fact).
        return torch.add(self._half_odd, u, alpha=2, out=u)

    @property
    def _half_odd(self) -> torch.Tensor:
        return torch.tensor(-(1 - 2.0**-53), dtype=torch.float64, device=self.device)

    def uniform(self, lo: float, hi: float, shape) -> torch.Tensor:
        return torch.rand(shape, dtype=torch.float64, device=self.device, generator=self.g).mul_(hi - lo).add_(lo)

    def normal(self, shape, scale: float = 1.0) -> torch.Tensor:
        v = self.symmetric(shape)
        with _one_thread(v):
            v.erfinv_()
        return v.mul_(math.sqrt(2) * scale)

    def exponential(self, shape) -> torch.Tensor:
        """Exp(1) draws: −log(1 − u), 1 − u in (0, 1] exactly."""
        return pieces(
            torch.log, torch.rand(shape, dtype=torch.float64, device=self.device, generator=self.g).neg_().add_(1)
        ).neg_()

    def integers(self, lo: int, hi: int, shape) -> torch.Tensor:
        return torch.randint(lo, hi, shape, device=self.device, generator=self.g)

    def other_class(self, t: torch.Tensor, c: int) -> torch.Tensor:
        """A class other than `t`, uniform among the c − 1 others."""
        return (t + self.integers(1, c, t.shape)) % c


# Elementwise transcendental functions (exp, log) run on the CPU as a vector kernel plus a
# scalar tail, which may differ in the last bit, and torch splits a tensor among threads
# from 32768 elements on: pieces below that size make the bits independent of the thread count.
_PIECE = 16384


def pieces(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise fn, its bits independent of the thread count."""
    if x.device.type != "cpu" or x.numel() <= _PIECE:
        return fn(x)
    flat = x.reshape(-1)
    return torch.cat([fn(p) for p in flat.split(_PIECE)]).reshape(x.shape)


def _one_thread(t: torch.Tensor):
    """torch on one CPU thread for the block (a CPU tensor `t`'s operation; others as they are).

    torch's CPU erfinv is not reproducible across threads: on a loaded machine, 6 runs of 50
    gave the second thread's half of a 64 × 300 float64 draw values off by ~1e-9 relative
    (one path without erfinv's full Newton refinement, it seems), while one thread gave the
    correct, mpmath-checked values every time, the values two threads give when they
    agree. So erfinv runs on one thread: the inputs earlier runs drew when their threads
    agreed, every time (tests/test_inputs.py, benchmarks/input_reproducibility.py)."""
    if t.device.type != "cpu":
        return contextlib.nullcontext()
    from torch.utils.benchmark.utils import common  # its thread-count context, as timing.py uses

    return common.set_torch_threads(1)


def _pick(cond: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """float64 `a` where `cond`, else `b` (torch.where of Python numbers is float32)."""
    return torch.full(cond.shape, b, dtype=torch.float64, device=cond.device).masked_fill_(cond, a)


def generator_for(seed: int, *key: object, device="cpu") -> _Draws:
    return _Draws(seed, key, device)


def generate(
    loss: str,
    multiclass: bool,
    batch: int,
    classes: int | None,
    scale: float,
    distribution: str,
    seed: int,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) on `device`: logits float64 of shape (batch,) or (batch, classes);
    labels float64 0/1 (binary) or int64 class indices."""
    draws = generator_for(seed, loss, batch, classes, float(scale), distribution, device=device)
    if multiclass:
        assert classes is not None, "a multi-class point has classes"
        return _multiclass(draws, batch, int(classes), float(scale), distribution)
    return _binary(draws, batch, float(scale), distribution)


def _binary(d: _Draws, n, scale, dist):
    y = d.integers(0, 2, (n,)).to(torch.float64)
    i = torch.arange(n, device=d.device)
    if dist in ("normal", OUT_OF_DOMAIN):  # out_of_domain: see `out_of_domain`
        x = d.normal((n,), scale)
    elif dist == "uniform":
        x = d.symmetric((n,)).mul_(scale)
    elif dist == "extreme":
        x = _pick(i % 2 == 0, scale, -scale)
        y = ((i // 2) % 2).to(torch.float64)
    elif dist in ("confident_correct", "confident_wrong"):
        side = 2 * y - 1 if dist == "confident_correct" else 1 - 2 * y
        x = side * d.uniform(0.5, 1.0, (n,)).mul_(scale)
    elif dist == "nonfinite":
        # Even elements: ±inf, cycling through (+inf, 0), (+inf, 1), (−inf, 0), (−inf, 1);
        # odd elements: N(0, 1)·scale with a random label.
        x = d.normal((n,), scale)
        special = i % 2 == 0
        combo = (i // 2) % 4
        x = torch.where(special, _pick(combo < 2, math.inf, -math.inf), x)
        y = torch.where(special, (combo % 2).to(torch.float64), y)
    elif dist in MULTICLASS_DISTRIBUTIONS:
        raise ValueError(f"distribution {dist!r} applies to multi-class losses only")
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x, y


def _multiclass(d: _Draws, n, c, scale, dist):
    t = d.integers(0, c, (n,))
    rows = torch.arange(n, device=d.device)
    if dist in ("normal", OUT_OF_DOMAIN):  # out_of_domain: see `out_of_domain`
        x = d.normal((n, c), scale)
    elif dist == "uniform":
        x = d.symmetric((n, c)).mul_(scale)
    elif dist == "extreme":
        x = _pick(d.integers(0, 2, (n, c)) == 1, scale, -scale)
        # Even rows: target on a +scale logit; odd rows: on a −scale one (where one exists).
        x[rows, t] = _pick(rows % 2 == 0, scale, -scale)
    elif dist == "confident_correct":
        x = d.normal((n, c))
        x[rows, t] = scale
    elif dist == "confident_wrong":
        x = d.normal((n, c))
        if c > 1:
            x[rows, d.other_class(t, c)] = scale
        x[rows, t] = -scale
    elif dist == "ties":
        x = torch.full((n, c), scale, dtype=torch.float64, device=d.device)
    elif dist == "dominant":
        # The target stays at 0 with the others: the loss is scale + log1p((C−1)·e^−scale),
        # the target's gradient −(1 − p_t) with p_t ≈ e^−scale.
        x = torch.zeros((n, c), dtype=torch.float64, device=d.device)
        if c > 1:
            x[rows, d.other_class(t, c)] = scale
    elif dist == "dominant_target":
        x = torch.zeros((n, c), dtype=torch.float64, device=d.device)
        x[rows, t] = scale
    elif dist == "masked":
        x = d.normal((n, c), scale)
        if c > 1:
            masked = d.uniform(0.0, 1.0, (n, c)) < 0.5
            masked[rows, d.other_class(t, c)] = True
            masked[rows, t] = False
            x[masked] = -math.inf
    elif dist == "target_min":
        # −scale, or the others' minimum where an N(0, 1) draw is below −scale (small
        # scales): the target is always the row minimum.
        x = d.normal((n, c))
        x[rows, t] = math.inf
        x[rows, t] = torch.clamp(x.amin(dim=1), max=-scale)
    elif dist == "nonfinite":
        x = _multiclass_nonfinite(d, n, c, scale, t)
    elif dist == "common_offset":
        x = d.normal((n, c), scale)  # the offset is the dtype's: `row_offsets`, added in sweep.point_data
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return x, t


def _multiclass_nonfinite(d: _Draws, n, c, scale, t):
    """N(0, 1)·scale logits with ±inf, row kind by row index mod 4:

    0: some non-target logits −inf (masked), the target finite;
    1: the target −inf, at least one other logit finite (loss +inf);
    2: the target +inf, the only +inf of its row (loss 0 in the limit);
    3: one non-target +inf, the target finite (loss +inf).

    In every row each other non-target logit is also −inf with probability ¼. No row has
    two +inf logits or only −inf ones: their limits are undefined (tested on their own).
    """
    rows = torch.arange(n, device=d.device)
    kind = rows % 4
    x = d.normal((n, c), scale)
    if c == 1:  # only the target: a +inf target is the one defined non-finite row
        x[kind == 2, 0] = math.inf
        return x
    other = d.other_class(t, c)
    masked = d.uniform(0.0, 1.0, (n, c)) < 0.25
    masked[rows, t] = False
    masked[rows, other] = kind == 0  # masked in kind 0, finite (or +inf) in the others
    x[masked] = -math.inf
    x[rows[kind == 1], t[kind == 1]] = -math.inf
    x[rows[kind == 2], t[kind == 2]] = math.inf
    x[rows[kind == 3], other[kind == 3]] = math.inf
    return x


def out_of_domain(inp: torch.Tensor, input_kind: str, multiclass: bool) -> torch.Tensor:
    """The `out_of_domain` value set's input from an N(0, 1)·scale one already in the dtype
    under test (a copy): by element index mod 4 (rows of a multi-class input), probabilities
    become 1 + ulp(1) (0), −ulp(1)/2 (1) and NaN (2), logits NaN (2); index 3 stays in
    the domain. Made in the dtype because no rounding of an in-domain value leaves it."""
    out = inp.clone()
    flat = out.reshape(-1, out.shape[-1]) if multiclass else out.reshape(-1)
    kind = torch.arange(flat.shape[0], device=out.device) % 4
    if input_kind == "probabilities":
        eps = torch.finfo(out.dtype).eps
        flat[kind == 0] = 1 + eps  # the next value above 1: p = 1.0000001 in float32 (pytorch#51866)
        flat[kind == 1] = -eps / 2
    if multiclass:
        flat[kind == 2, 0] = math.nan
    else:
        flat[kind == 2] = math.nan
    return out


def outside_domain(inp: torch.Tensor, input_kind: str) -> torch.Tensor:
    """Where an input value is outside its loss's domain: NaN, and for probabilities a value
    below 0 or above 1 (elementwise, bool)."""
    bad = inp.isnan()
    return bad | (inp < 0) | (inp > 1) if input_kind == "probabilities" else bad


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


def generate_blocks(
    loss: str,
    batch: int,
    classes: int | None,  # None only for a binary loss, which never comes here
    scale: float,
    distribution: str,
    seed: int,
    time: int | None = None,
    device="cpu",
):
    """(rows slice, float64 logits, labels) for each block of a multi-class point's rows
    (batch·time rows for sequence losses), on `device`. One block is exactly `generate`'s
    values."""
    assert classes is not None, "a multi-class point has classes"
    rows = batch * (time or 1)
    key = (loss, batch, classes, float(scale), distribution) + ((time,) if time else ())
    for i, block in enumerate(rows_blocks(rows, classes)):
        draws = generator_for(seed, *key, device=device) if i == 0 else generator_for(seed, *key, i, device=device)
        x, t = _multiclass(draws, block.stop - block.start, int(classes), float(scale), distribution)
        yield block, x, t


# Value sets whose soft targets put no probability on a −inf (masked) logit (`zero_masked`).
MASKED_SOFT = ("masked",)


def zero_masked(soft: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Soft target rows (float64) with exactly 0 where the logit is −inf, renormalized: what
    a masked vocabulary's target distribution is (0·log 0 = 0, no 0·(−inf) to take)."""
    q = soft.masked_fill(torch.isneginf(logits.reshape(soft.shape)), 0.0)
    return q / q.cumsum(dim=1)[:, -1:]  # cumsum: a sum in row order whatever the threads


def sequence_padding(batch: int, time: int, seed: int, device="cpu") -> torch.Tensor:
    """Padding mask (batch, time), bool: sequence b has a length uniform in [⌈time/2⌉, time]
    and the positions after it are padding (ignore_index)."""
    d = generator_for(seed, "sequence_lengths", batch, time, device=device)
    lengths = d.integers((time + 1) // 2, time + 1, (batch,))
    return torch.arange(time, device=d.device)[None, :] >= lengths[:, None]


def option_values(
    loss: str,
    multiclass: bool,
    options: dict,
    rows: int,
    classes: int | None,
    labels: torch.Tensor,
    seed: int,
    device="cpu",
) -> dict:
    """The tensors and numbers behind a point's options (METRICS.md "Inputs": generated in
    float64 from the seed on `device`; rounded to the dtype by the caller):

    * ``weight``: per element (binary) or per class, log-uniform in WEIGHT_RANGE;
    * ``pos_weight``, ``label_smoothing``: the number;
    * ``ignored``: a bool mask of exactly round(fraction·rows) ignored targets;
    * ``soft``: target rows 0.9·onehot(t) + 0.1·Dirichlet(1) (for ``targets: soft``); binary
      losses: 0.9·y + 0.1·U(0, 1) per element.

    They do not depend on the scale or value set, so every scale sees the same weights.
    """
    out: dict = {}
    if options.get("weight", "none") != "none":
        d = generator_for(seed, loss, "weight", rows, classes, device=device)
        size = classes if multiclass else rows
        out["weight"] = pieces(torch.exp, d.uniform(math.log(WEIGHT_RANGE[0]), math.log(WEIGHT_RANGE[1]), (size,)))
    pw = options.get("pos_weight", 1.0)
    if isinstance(pw, str):  # one per label (config.pos_weight_vector)
        out["pos_weight"] = tuple(float(v) for v in pw.strip("()").split(","))
    elif float(pw) != 1.0:
        out["pos_weight"] = float(pw)
    if float(options.get("label_smoothing", 0.0)):
        out["label_smoothing"] = float(options["label_smoothing"])
    fraction = float(options.get("ignored", 0.0))
    if fraction:
        d = generator_for(seed, loss, "ignored", rows, fraction, device=device)
        mask = torch.zeros(rows, dtype=torch.bool, device=d.device)
        mask[torch.randperm(rows, generator=d.g, device=d.device)[: int(round(fraction * rows))]] = True
        out["ignored"] = mask
    if options.get("targets", "hard") == "soft" and classes is None:
        # Binary: 0.9·y + 0.1·U(0, 1), in [0, 1] (at most 1 after rounding): soft labels as
        # label smoothing makes them, and hard ones only where u is 0 or 1.
        d = generator_for(seed, loss, "soft", rows, device=device)
        y = torch.as_tensor(labels, device=d.device).to(torch.float64)
        out["soft"] = SOFT_MIX * y + (1 - SOFT_MIX) * d.uniform(0.0, 1.0, (rows,))
    elif options.get("targets", "hard") == "soft":
        assert classes is not None, "soft targets of a multi-class loss"
        d = generator_for(seed, loss, "soft", rows, classes, device=device)
        # Dirichlet(1, …, 1): independent Exp(1) draws divided by their row's sum.
        noise = d.exponential((rows, int(classes)))
        # The row sums by cumsum: sequential along the row whatever the thread count (a
        # sum's order may follow the threads).
        noise /= noise.cumsum(dim=1)[:, -1:]
        onehot = torch.zeros((rows, int(classes)), dtype=torch.float64, device=d.device)
        onehot[torch.arange(rows, device=d.device), torch.as_tensor(labels, device=d.device)] = 1.0
        out["soft"] = SOFT_MIX * onehot + (1 - SOFT_MIX) * noise
    return out


# Upstream gradients of a `reduction: none` point (METRICS.md "Upstream gradients"): ones (the
# gradient of the sum), N(0, 1) values, one element 1 and the rest 0, all 0.
GRAD_OUTPUTS = ("ones", "random", "onehot", "zeros")


def grad_output_values(kind: str, loss: str, shape: tuple, seed: int, device="cpu") -> torch.Tensor:
    """The float64 upstream gradient `kind` of a point whose per-element loss has `shape`,
    from the seed (rounded to the dtype by the caller): the same for every dtype and scale."""
    if kind not in GRAD_OUTPUTS:
        raise ValueError(f"unknown grad_output {kind!r}; known: {', '.join(GRAD_OUTPUTS)}")
    shape = tuple(int(s) for s in shape)
    if kind in ("ones", "zeros"):
        return torch.full(shape, 1.0 if kind == "ones" else 0.0, dtype=torch.float64, device=device)
    d = generator_for(seed, loss, "grad_output", kind, shape, device=device)
    if kind == "random":
        return d.normal(shape)
    out = torch.zeros(math.prod(shape), dtype=torch.float64, device=d.device)
    if out.numel():
        out[d.integers(0, out.numel(), (1,))] = 1.0
    return out.reshape(shape)
