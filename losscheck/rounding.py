"""Correct rounding of working-precision values to the dtype under test (METRICS.md,
"Reference": a reference is rounded once): float64 tensors or numpy values (long double
for a float64 target) to float64, float32, float16 or bfloat16, round to nearest, ties to
even, on the values' own device. Split from reference.py, which re-exports `round_to`."""

from __future__ import annotations

import numpy as np
import torch


def round_to(a, dtype: torch.dtype) -> torch.Tensor:
    """Correctly round working-precision values to `dtype` (round to nearest, ties to even).

    `a` is a torch tensor (float64, or any dtype it converts from exactly: rounded on its
    own device) or numpy values (float64, long double for a float64 target: rounded on the
    host; an input generator's values, a long-double reference).

    float16 and bfloat16 go through float32 with round-to-odd: rounding first to odd in a
    format with at least 2 more bits, then to nearest, equals one rounding to nearest,
    whereas the plain float64 -> float32 -> half path double-rounds — and torch's own
    float64 -> float16/bfloat16 casts take that path (tests/test_reference.py shows it).
    On the CPU round-to-odd runs only where the plain path can double-round
    (`_round_half_screened`).
    """
    if not isinstance(a, torch.Tensor):
        # Overflow to ±inf is the correct rounding of a value beyond the dtype's range, not
        # an error: without errstate numpy warns ("overflow encountered in cast") on long
        # double -> float64 (a float64 cross entropy's mean at logits near float64's max),
        # which pytest's filterwarnings=error turns into a failure.
        with np.errstate(over="ignore"):
            a = torch.from_numpy(np.array(a, dtype=np.float64, copy=True))
    if dtype == torch.float64:
        return a.to(torch.float64)
    a64 = a.to(torch.float64)
    if dtype == torch.float32:
        return a64.to(torch.float32)  # IEEE conversion: one rounding, ±inf beyond the range
    if a64.device.type != "cpu":
        return _round_half(a64, dtype)  # elementwise kernels: cheap on accelerators
    return _round_half_cpu(a64, dtype)


def _round_half_cpu(a64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = a64.numel()
    if n < _SCREEN_MIN:
        return _round_half(a64, dtype)  # a few kernel calls: fewer than the screen's
    if n > _SCREEN_PIECE:
        # In pieces: the screen's temporaries (float32, int32 and bool copies) stay a few MiB
        # whatever the size (a 512 × 128k soft target is 67 M values).
        return _in_pieces(_round_half_cpu, a64, dtype, _SCREEN_PIECE)
    if _mostly_suspects(_suspects(a64.reshape(-1)[::_SAMPLE_STRIDE]), -(-n // _SAMPLE_STRIDE)):
        return _round_half_pieces(a64, dtype)  # mostly exact values (zeros, integers): at once
    return _round_half_screened(a64, dtype)


# Values rounded at once to a half dtype by `_round_half_pieces` (2 MiB of float64 per temporary).
_ROUND_PIECE = 1 << 18
# The float32 bits a half dtype's midpoint has zero (see `_round_half_screened`): a
# float16 midpoint has at most 12 significant bits (11 of the format, the half ULP),
# bfloat16's 9, of float32's 24.
_MIDPOINT_ZERO_BITS = 0xFFF
# Fewer values than this are rounded to odd everywhere: the screen costs more kernel calls
# than it saves passes (2,560 values: 0.09 ms screened, 0.04 ms everywhere; even at 2**16).
_SCREEN_MIN = 1 << 16
# Every this-many-th value is screened first: where more than 1 in _SUSPECT_SHARE of those
# may be a midpoint (exact values: zeros, integers, ±scale), every value is rounded to odd at
# once. A prime: no period of the rows' layout.
_SAMPLE_STRIDE = 61
_SUSPECT_SHARE = 16
# Values screened at once: larger tensors go piece by piece.
_SCREEN_PIECE = 1 << 20


def _midpoint_mask(f: torch.Tensor) -> torch.Tensor:
    """Where float32 values may be midpoints of a half format (a superset)."""
    return (f.view(torch.int32) & _MIDPOINT_ZERO_BITS) == 0


def _suspects(a64: torch.Tensor) -> int:
    return int(torch.count_nonzero(_midpoint_mask(a64.to(torch.float32))))


def _mostly_suspects(count: int, n: int) -> bool:
    """Whether `count` suspects of `n` values make round to odd everywhere the cheaper way."""
    return count * _SUSPECT_SHARE > n


def _round_half_screened(a64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`round_to` of float64 values to float16 or bfloat16 on the CPU: torch's two casts
    (float64 -> float32 -> half, each a correct rounding), corrected where they can differ
    from one rounding.

    They differ only where the float32 value is a midpoint of the half format: half formats'
    midpoints are float32 values (so rounding to float32 never carries a value across one),
    and a float32 value that is no midpoint rounds to the half its float64 value rounds to.
    A midpoint has its 12 low float32 bits zero; so does 1 value in 4,096 of random data,
    and exact small values (0, integers): those (a superset) get `_round_half`, round to
    odd, and the rest keep the casts' result. On 4 M random values this took 9 ms where
    round to odd everywhere took 19 (tests/test_reference.py: both agree, and are correct)."""
    f = a64.to(torch.float32)
    out = f.to(dtype)
    suspect = _midpoint_mask(f).view(-1)
    count = int(torch.count_nonzero(suspect))
    if _mostly_suspects(count, out.numel()):
        return _round_half_pieces(a64, dtype)  # the sample missed them: at once after all
    if count:
        where = suspect.nonzero().squeeze(1)
        out.view(-1)[where] = _round_half(a64.reshape(-1)[where], dtype)
    return out


def _round_half_pieces(a64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_round_half` of every value, in pieces: each step is elementwise, so the bits are
    those of one call, and the float64 temporaries of a piece stay cache-sized instead of
    being whole-tensor allocations (fresh pages to fault in for every one)."""
    if a64.numel() <= _ROUND_PIECE:
        return _round_half(a64, dtype)
    return _in_pieces(_round_half, a64, dtype, _ROUND_PIECE)


def _in_pieces(fn, a64: torch.Tensor, dtype: torch.dtype, piece: int) -> torch.Tensor:
    """fn(values, dtype) of `a64`'s values `piece` at a time, into one tensor of its shape."""
    out = torch.empty(a64.shape, dtype=dtype, device=a64.device)
    flat, dst = a64.reshape(-1), out.view(-1)
    for start in range(0, flat.numel(), piece):
        dst[start : start + piece] = fn(flat[start : start + piece], dtype)
    return out


def _round_half(a64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`round_to` of float64 values to float16 or bfloat16 (see there)."""
    f = a64.to(torch.float32)  # round to nearest
    back = f.to(torch.float64)
    # Round to odd on the bits: step back toward zero where rounding went away from zero
    # (sign-magnitude: bits − 1 shrinks the magnitude for either sign; a finite value beyond
    # float32's range lands on its largest finite value, which is odd), then set the last
    # bit where the value was inexact. NaN compares unequal and unordered: it stays NaN.
    away = back.abs() > a64.abs()
    inexact = back != a64
    bits = f.view(torch.int32).sub_(away.to(torch.int32)).bitwise_or_(inexact)
    return bits.view(torch.float32).to(dtype)
