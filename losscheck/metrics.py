"""Pure functions and accumulators for the accuracy and overflow numbers of METRICS.md.

`ulp_distance` is Herbie's ordinal measure: the number of representable values of the
dtype between two values, +0 and -0 being the same value. Everything works on the raw
bit patterns (the tensor viewed as integers of its width), which is uniform across
float64/32/16 and bfloat16, exact, and runs as tensor operations on the device of the
tensors given: no copy to the host, no numpy; an `ErrorStats.add` reads back one vector of
scalars at its end (and, on the CPU and CUDA, a few flags per chunk that let it skip the rules
that cannot apply: see `_Accumulator`).

Every number equals that of the numpy implementation this replaced (issue 13; the tests
compare with a copy of it, tests/numpy_metrics.py): the distances and counters exactly; the
per-element bits are the same float64 numbers (torch.log2 and numpy's log2 agree on this
machine; distances below 2**16 are read from a table made by torch.log2), summed in torch's
order within a chunk, which can move the last bit of the sum, never `mean_bits` (4 decimals)
short of a tie. On CUDA the bits come from CUDA's log2, which may differ from the CPU's in
the last bit in the same way.

Verdicts sit on top of the distance: a finite value against ±inf is clamped (inf ULP, p
bits), exactly 0 against a non-zero value is underflow, and `bits` never exceeds the
format's precision p — see `ErrorStats` and METRICS.md ("Accuracy", "Overflow").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import cast

import torch

from .dtypes import FloatFormat, fmt
from .formats import ulp_threshold

# Elements per chunk in ErrorStats.add: the temporaries are a few float64/integer copies
# of a chunk, so memory stays bounded however large the point (large vocabularies).
CHUNK = 1 << 20
# On an accelerator, where a chunk's kernels cost their launches (5-10 us of host time each on
# an H200 machine) more than their work: as reference.DEVICE_CHUNK_ELEMENTS, 32 MiB per 64-bit
# temporary. CE 512 x 32000 float32 on an H200, the point's two `add`s: 14.5 ms with CHUNK.
DEVICE_CHUNK = 1 << 22

# Devices on which a chunk's summary (any non-finite value? any zero? any sign change?
# the largest distance) is read back to skip the work it makes useless; elsewhere every rule
# runs unconditionally (the same numbers: tests run both paths, on CUDA too). On CUDA the
# read-backs wait for a queue of microsecond kernels and save most launches: the two `add`s
# of CE 4096 x 1000 float32 on an H200 took 0.79 ms (29 launches) against 2.22 ms (158) for
# every rule, CE 512 x 32000 1.49 against 4.60 ms. MPS is untested, so it runs every rule.
_SUMMARY_ON_HOST = frozenset({"cpu", "cuda"})


@dataclass(frozen=True)
class _Bits:
    """Sign, magnitude bits and ordinals of a tensor's values, as integer tensors of the
    format's width (int16/32/64) on the tensor's device (classification: `_Pair`)."""

    f: FloatFormat
    ints: torch.Tensor  # the values' bits, signed integers of the format's width

    @classmethod
    def of(cls, t: torch.Tensor) -> _Bits:
        f = fmt(t.dtype)
        return cls(f, t.detach().view(f.int_dtype))

    @property
    def _mask(self) -> int:
        return (1 << (self.f.total_bits - 1)) - 1

    @property
    def _inf_bits(self) -> int:
        # All exponent bits set, fraction zero.
        return self._mask ^ ((1 << (self.f.significand_bits - 1)) - 1)

    @property
    def floats(self) -> torch.Tensor:
        return self.ints.view(self.f.torch_dtype)

    @property
    def negative(self) -> torch.Tensor:
        return self.ints < 0

    @property
    def magnitude(self) -> torch.Tensor:
        return self.ints & self._mask

    @property
    def ordinal(self) -> torch.Tensor:
        """-magnitude for negative values, in the format's width: for a negative pattern
        x = MIN + magnitude, MIN - x is -magnitude and never overflows (-0 gives 0)."""
        # Without torch.where (a few times slower on the CPU than these four passes): with
        # s = x >> (w-1), 0 or -1, (x ^ (s & MAX)) - s is x for x >= 0 and, for x = MIN + m,
        # (MIN + MAX - m) + 1 = -m.
        x = self.ints
        s = x >> (self.f.total_bits - 1)
        return torch.bitwise_and(s, self._mask).bitwise_xor_(x).sub_(s)


def ordinal(t: torch.Tensor) -> torch.Tensor:
    """Signed ordinal of each value (int64): consecutive floats have consecutive ordinals."""
    return _Bits.of(t).ordinal.to(torch.int64)


class _Pair:
    """A chunk of values against its references, with the masks the rules need, each
    computed once (on the tensors' device) and only if asked for."""

    def __init__(self, v: _Bits, r: _Bits):
        self.v, self.r = v, r
        self.inf_bits = v._inf_bits

    @cached_property
    def vm(self) -> torch.Tensor:
        return self.v.magnitude

    @cached_property
    def rm(self) -> torch.Tensor:
        return self.r.magnitude

    @cached_property
    def signs_differ(self) -> torch.Tensor:
        return (self.v.ints ^ self.r.ints) < 0

    @cached_property
    def v_finite(self) -> torch.Tensor:
        return self.vm < self.inf_bits

    @cached_property
    def r_inf(self) -> torch.Tensor:
        return self.rm == self.inf_bits

    @cached_property
    def v_inf(self) -> torch.Tensor:
        return self.vm == self.inf_bits

    @cached_property
    def clamped(self) -> torch.Tensor:
        """A finite value where the reference is ±inf, other than the largest finite value
        of the reference's sign (overflow rounding: what round-to-nearest gives a value just
        beyond the range, 1 ULP). The value is finite but has no correct bit: clamped."""
        overflow_rounding = (self.vm == self.inf_bits - 1) & ~self.signs_differ
        return self.r_inf & self.v_finite & ~overflow_rounding

    def finite_distance(self, signs_may_differ: bool = True) -> torch.Tensor:
        """|ordinal(v) - ordinal(r)| as float64, read as if every value were finite (the
        rules for NaN and ±inf go on top: `apply_rules`).

        Of the same sign, the patterns' difference is the magnitudes' difference (the sign
        bit cancels) and fits the format's width; of opposite signs the distance is the sum
        of the magnitudes, up to twice the width's range.
        """
        v, r = self.v, self.r
        same = torch.sub(v.ints, r.ints, out=torch.empty(v.ints.shape, dtype=torch.float64, device=v.ints.device))
        same.abs_()
        if not signs_may_differ:
            return same
        if v.f.total_bits == 64:
            # The sum can pass int64's range; the distance is astronomically large then, so
            # it is taken in float64, each magnitude rounded first (as the numpy original
            # did: the same float64 number, not merely a close one).
            opposite = self.vm.double().add_(self.rm.double())
        else:
            opposite = self.vm.double().add_(self.rm)  # below 2**33: exact
        return torch.where(self.signs_differ, opposite, same)

    def apply_rules(self, d: torch.Tensor) -> None:
        """NaN against NaN is 0; NaN against anything else, an infinity against a different
        value, and a clamped value are inf (in place). A finite value against ±inf is not a
        finite number of steps away: the ordinal distance (100.0 to +inf in float32 is ~1e9
        ULP, "29.9 bits") would pretend some bits were right. It scores the full width;
        overflow rounding keeps its 1 ULP."""
        vnan, rnan = self.vm > self.inf_bits, self.rm > self.inf_bits
        d.masked_fill_(vnan & rnan, 0.0)
        d.masked_fill_((vnan != rnan) | (self.v_inf & (self.v.ints != self.r.ints)) | self.clamped, math.inf)


def _distance(v: _Bits, r: _Bits) -> torch.Tensor:
    pair = _Pair(v, r)
    d = pair.finite_distance()
    pair.apply_rules(d)
    return d


def ulp_distance(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance in ULPs between `value` and `reference` (same dtype and shape), as float64
    on their device.

    NaN against NaN is 0 (both undefined); NaN against a number or an infinity, an
    infinite value against a different reference, and a finite value against an infinite
    reference (clamped) are inf — except the largest finite value of the reference's
    sign against ±inf, which is overflow rounding: 1 ULP.
    """
    if value.dtype != reference.dtype:
        raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
    return _distance(_Bits.of(value), _Bits.of(reference))


def _scalar_distance(vi: int, ri: int, f: FloatFormat) -> float:
    """`ulp_distance` of one value against one reference, from their bit patterns (signed
    integers of the format's width): `_Pair.finite_distance` and `apply_rules` in Python."""
    mask = (1 << (f.total_bits - 1)) - 1
    inf_bits = mask ^ ((1 << (f.significand_bits - 1)) - 1)
    vm, rm = vi & mask, ri & mask
    vnan, rnan = vm > inf_bits, rm > inf_bits
    if vnan and rnan:
        return 0.0
    signs_differ = (vi ^ ri) < 0
    clamped = rm == inf_bits and vm < inf_bits and not (vm == inf_bits - 1 and not signs_differ)
    if vnan != rnan or (vm == inf_bits and vi != ri) or clamped:
        return math.inf
    if not signs_differ:
        return float(abs(vi - ri))
    # Opposite signs: the sum of the magnitudes; in float64 each rounded first (as there).
    return float(vm) + float(rm) if f.total_bits == 64 else float(vm + rm)


def _precision(dtype: torch.dtype | str | FloatFormat) -> int:
    return (dtype if isinstance(dtype, FloatFormat) else fmt(dtype)).significand_bits


def bits(ulp, dtype: torch.dtype | str | FloatFormat):
    """Bits of error of a ULP distance in `dtype` (a torch dtype, its name or a FloatFormat):
    min(log2(1 + ulp), p) with p the significand precision (53, 24, 11, 8). 0 is correctly
    rounded; p means no correct bit is left, and no error scores more (an infinite distance
    included). A float gives a float; a tensor or numpy array gives the same, elementwise.
    """
    p = _precision(dtype)
    if isinstance(ulp, torch.Tensor):
        return torch.clamp(torch.log2(1 + ulp.double()), max=p)
    if type(ulp).__module__ == "numpy" and hasattr(ulp, "shape"):
        # A numpy array (a caller at the files' edge): numpy only here, imported lazily.
        import numpy as np

        return np.minimum(np.log2(1 + np.asarray(ulp, dtype=np.float64)), p)
    ulp = float(ulp)
    if math.isnan(ulp):
        raise ValueError("a ULP distance is never NaN")
    return min(math.log2(1 + ulp), float(p))


def bits_of_error(ulps: torch.Tensor, dtype: torch.dtype | str | FloatFormat | None = None) -> torch.Tensor:
    """log2(1 + ulp) elementwise; capped at `dtype`'s precision when given (as `bits`).
    Kept for callers of the uncapped form; new code uses `bits`."""
    return torch.log2(1 + ulps) if dtype is None else bits(ulps, dtype)


# Distances below this are looked up rather than computed: log2(1 + d) for every integer d
# below it, 512 KiB of float64 per device (a sweep's distances are mostly a few ULP).
_LOG2_TABLE_SIZE = 1 << 16
_LOG2_TABLES: dict[torch.device, torch.Tensor] = {}


def _log2_table(device: torch.device) -> torch.Tensor:
    table = _LOG2_TABLES.get(device)
    if table is None:
        # torch.log2 on the device itself: the numbers a log2 per element would give there.
        table = torch.arange(_LOG2_TABLE_SIZE, dtype=torch.float64, device=device).add_(1).log2_()
        _LOG2_TABLES[device] = table
    return table


def _lookup(d: torch.Tensor) -> torch.Tensor:
    """log2(1 + d) for integral d below the table's size, from the table."""
    index = d if d.dtype in (torch.int32, torch.int64) else d.to(torch.int32)
    return torch.index_select(_log2_table(d.device), 0, index.reshape(-1))


class _Accumulator:
    """One `ErrorStats.add` call on the tensors' device: per-chunk tensors, read back once
    at the end (on the CPU, each chunk's flags and largest distance are read as well).

    The sum of bits is a float64 tensor that starts from the running sum and adds each
    chunk's float64 sum in turn: the additions of the numpy original (running sum + chunk 1
    + chunk 2 ...), so the sums agree to the last bit wherever the chunk sums do (torch and
    numpy sum a chunk's elements in different orders: the last bit of a chunk sum can
    differ, which `mean_bits`, rounded to 4 decimals, does not show).
    """

    COUNTERS = ("saturated", "underflow", "clamped", "nan", "posinf", "neginf")

    def __init__(self, stats: ErrorStats, device: torch.device):
        self.stats = stats
        self.p = stats.float_format.significand_bits
        self.on_host = device.type in _SUMMARY_ON_HOST
        self.ulp_threshold = ulp_threshold(stats.threshold_bits)
        self.bits_sum = torch.tensor(stats._bits_sum, dtype=torch.float64, device=device)
        # Tensors, or numbers where the host has them already (read back by `flush`).
        self.maxima: list[torch.Tensor | float] = []
        self.counts: dict[str, list[torch.Tensor | int]] = {c: [] for c in self.COUNTERS}

    def add(self, v: _Bits, r: _Bits) -> None:
        pair = _Pair(v, r)
        if not self.on_host:
            self._finish(pair, pair.finite_distance(), special=True, zeros=True)
            return
        if self._finite_chunk(pair):
            return
        # A read-back per chunk says which rules can apply at all. Most chunks have no
        # non-finite value and no sign change: their distance is then the patterns'
        # difference, and the rules for NaN, ±inf and signs cost nothing.
        vmin, vmax, rmin, rmax = torch.stack([*torch.aminmax(v.ints), *torch.aminmax(r.ints)]).tolist()
        if vmin >= 0 and rmin >= 0:
            # No sign bit set (a loss's values): the patterns are the magnitudes.
            pair.__dict__.update(vm=v.ints, rm=r.ints)
            zeros, signs_differ = vmin == 0, False
            special = vmax >= pair.inf_bits or rmax >= pair.inf_bits
        else:
            vmin, vmax = torch.aminmax(pair.vm)
            rmin, rmax = torch.aminmax(r.ints.view(r.f.torch_dtype))  # NaN propagates
            flags = torch.stack(
                [vmin == 0, vmax >= pair.inf_bits, ~(rmin.isfinite() & rmax.isfinite()), (v.ints ^ r.ints).amin() < 0]
            )
            zeros, v_special, r_special, signs_differ = flags.tolist()
            special = v_special or r_special
        self._distances(pair, zeros, signs_differ, special)

    def _distances(self, pair: _Pair, zeros: bool, signs_differ: bool, special: bool) -> None:
        """Every number of a chunk whose flags are known: from the integer distance where
        every value is finite in a format of 32 bits or fewer, else by the rules."""
        if not special and pair.v.f.total_bits <= 32:
            self._finite(pair, zeros, signs_differ)
        else:
            self._finish(pair, pair.finite_distance(signs_differ or special), special=special, zeros=zeros)

    def _finite_chunk(self, pair: _Pair) -> str:
        """The common chunks, in fewer passes than the rules below need: every value and
        reference finite. Each value of its reference's sign ("same_signs"): the distance
        is |bits(v) − bits(r)| (the sign bit cancels), exact in the format's width, and
        every number comes from it as in `_finite`. Some signs differing ("mixed_signs"):
        `_finite` (or `_finish`) with what is known already. "" (nothing added) for a chunk
        with a non-finite value or reference.

        The signs need no pass of their own: with finite magnitudes (below inf_bits =
        2**(w−1) − 2**(p−1) in a w-bit format of precision p), a value and a reference of
        opposite signs have a pattern difference W, wrapped to w bits, with |W| > 2**(p−1)
        or W = −2**(w−1). So every |W| below 2**(p−1) proves every sign equal; beyond it
        (bfloat16's 2**7 is soon reached) the signs are compared.
        """
        v, r = pair.v, pair.r
        lo_v, hi_v, lo_r, hi_r = torch.stack([*torch.aminmax(v.floats), *torch.aminmax(r.floats)]).tolist()
        if not all(map(math.isfinite, (lo_v, hi_v, lo_r, hi_r))):
            return ""  # NaN (propagated by aminmax) or ±inf: the rules of `_finish`
        w = torch.sub(v.ints, r.ints)
        wmin, wmax = torch.stack(torch.aminmax(w)).tolist()
        half = 1 << (self.p - 1)
        # Strictly positive or strictly negative throughout (no zero of either sign): one sign.
        one_sign = (lo_v > 0 and lo_r > 0) or (hi_v < 0 and hi_r < 0)
        # (count_nonzero on the floats counts ±0 as zero: one pass, no temporary.)
        zeros = lo_v <= 0 <= hi_v and int(torch.count_nonzero(v.floats)) < v.ints.numel()
        if not (one_sign or -half < wmin <= wmax < half) and bool(torch.bitwise_xor(v.ints, r.ints).amin() < 0):
            # A sign differs (a gradient's entry flushed to 0 of the other sign, say): every
            # value is finite, as `add` would find again, so the chunk goes on from here.
            self._distances(pair, zeros, signs_differ=True, special=False)
            return "mixed_signs"
        largest = max(-wmin, wmax)  # no overflow: |W| < inf_bits with equal signs
        self._tally(pair, w.abs_(), largest, zeros)
        return "same_signs"

    def _finite(self, pair: _Pair, zeros: bool, signs_differ: bool) -> None:
        """A chunk of finite values in a format of 32 bits or fewer: every number comes from
        the integer distance, without float64. With the signs of their references it is
        |bits(v) - bits(r)|, exact in the format's width (below 2**31); where signs may
        differ (a gradient's entries), |ordinal(v) - ordinal(r)|, the sum of the magnitudes
        across zero (below 2**33), in float64 (float32 for a 16-bit format) — exact, so
        `finite_distance`'s float64 numbers exactly."""
        if signs_differ:
            # Ordinals of a w-bit format differ by less than 2**w: exact in a float of more
            # than w significant bits. A float difference of two converted operands is a
            # vectorised pass; an int64 one from int32 operands is not (twice as slow here).
            wide = torch.float32 if pair.v.f.total_bits <= 16 else torch.float64
            d = pair.v.ordinal.to(wide).sub_(pair.r.ordinal.to(wide)).abs_()
        else:
            d = (pair.v.ints - pair.r.ints).abs_()
        self._tally(pair, d, int(d.amax()), zeros)

    def _tally(self, pair: _Pair, d: torch.Tensor, largest: int, zeros: bool) -> None:
        """A finite chunk's numbers from its distances `d` (integral-valued, consumed by
        `_bits`) and their maximum `largest`, known on the host."""
        self.maxima.append(float(largest))  # on the host (see `flush`)
        if largest > self.ulp_threshold:
            # d > t  <=>  d > floor(t) for an integer d (and floor(t) < largest fits the width).
            self.counts["saturated"].append(torch.count_nonzero(d > math.floor(self.ulp_threshold)))
        if zeros:
            # A zero value's distance is its reference's magnitude, non-zero exactly where the
            # reference is (underflow): with the signs of their references, or across zero.
            self.counts["underflow"].append(torch.count_nonzero(torch.eq(pair.v.floats, 0).logical_and_(d != 0)))
        if largest:
            self.bits_sum += self._bits(d, largest).sum()

    def _bits(self, d: torch.Tensor, largest: float) -> torch.Tensor:
        """min(log2(1 + d), p) elementwise in float64 (`d` integral-valued, of a float or
        integer dtype; a float64 `d` is consumed). Distances below the table's size are
        looked up in a table made by the same torch.log2 (the same float64 numbers, without
        a log2 per element); a chunk with a larger one gets a log2 per element."""
        if largest < _LOG2_TABLE_SIZE:
            b = _lookup(d)
        else:
            # A log2 per element: as fast as the lookup here, and 3x faster than looking up
            # the small distances and computing the large ones apart (a count, a clamp and
            # two masked copies).
            b = (d.double() if d.dtype != torch.float64 else d).add_(1).log2_()
        if largest >= 2.0 ** (self.p - 1):
            # The cap can only bite past 2**(p-1) ULP: log2 of 1 + anything less is below p.
            b.clamp_(max=self.p)
        return b

    def _finish(self, pair: _Pair, d: torch.Tensor, *, special: bool, zeros: bool) -> None:
        """Every number of a chunk from its distances `d` (consumed): the rules for NaN and
        ±inf where `special`, max, counters and the bits."""
        inf_bits = pair.inf_bits
        if special:
            pair.apply_rules(d)
        largest = d.amax()
        largest_on_host = float(largest) if self.on_host else math.inf
        self.maxima.append(largest_on_host if self.on_host else largest)
        if largest_on_host > self.ulp_threshold:
            # Finite values above the threshold: silent saturation (clamped ones included).
            above = d > self.ulp_threshold
            if special:
                above &= pair.v_finite
            self.counts["saturated"].append(torch.count_nonzero(above))
        if zeros:
            flushed = (pair.vm == 0) & (pair.rm != 0)
            if special:
                flushed &= pair.rm < inf_bits
            self.counts["underflow"].append(torch.count_nonzero(flushed))
        if special:
            vm, rm = pair.vm, pair.rm
            self.counts["clamped"].append(torch.count_nonzero(pair.clamped))
            self.counts["nan"].append(torch.count_nonzero((vm > inf_bits) & (rm <= inf_bits)))
            wrong_inf = pair.v_inf & ((rm < inf_bits) | (pair.r_inf & pair.signs_differ))
            vneg = pair.v.negative
            self.counts["posinf"].append(torch.count_nonzero(wrong_inf & ~vneg))
            self.counts["neginf"].append(torch.count_nonzero(wrong_inf & vneg))
        if largest_on_host == 0:
            return  # every element exact: 0 bits each, and x + 0.0 is x
        # bits = min(log2(1 + ulp), p), summed in float64 (d is not needed any more).
        self.bits_sum += self._bits(d, largest_on_host).sum()

    def flush(self) -> None:
        """Bring the scalars to the host (one transfer) and add them to the stats."""
        s = self.stats
        if self.on_host:
            # A few scalars per chunk, on the host already: read one by one (stacking them
            # costs more, and a small point's metrics are mostly such fixed costs).
            bits_sum = float(self.bits_sum)
            largest = max(float(m) for m in self.maxima)
            counts = [sum(int(k) for k in self.counts[c]) for c in self.COUNTERS]
        else:
            zero = torch.zeros((), dtype=torch.float64, device=self.bits_sum.device)
            # Off the host every per-chunk scalar is a tensor (plain numbers only on the host path).
            parts = [self.bits_sum, torch.stack(cast(list[torch.Tensor], self.maxima)).amax()]
            for c in self.COUNTERS:
                # Counts are exact in float64 (below 2**53): one float64 vector carries all.
                counts_c = cast(list[torch.Tensor], self.counts[c])
                parts.append(torch.stack(counts_c).sum().double() if counts_c else zero)
            bits_sum, largest, *counts = torch.stack(parts).tolist()
        s._bits_sum = bits_sum
        s.max_ulp = max(s.max_ulp, largest)
        for c, k in zip(self.COUNTERS, counts, strict=True):
            setattr(s, c, getattr(s, c) + int(k))


@dataclass
class ErrorStats:
    """Streams (value, reference) pairs into the per-point numbers of METRICS.md.

    Counters, per element:
    * `nan`: NaN wherever the reference is not NaN (a NaN where the true value is ±inf is
      as wrong as one where it is finite);
    * `posinf`/`neginf`: an infinity where the reference is finite, or the opposite
      infinity (the same infinity is exact);
    * `clamped`: a finite value where the reference is ±inf (torch's BCE at 100 against
      +inf), other than overflow rounding (the largest finite value of that sign, 1 ULP);
      it scores p bits (infinite ULP);
    * `underflow`: exactly 0 where the reference is finite and non-zero; its distance is
      kept as measured (a flushed subnormal is a few ULP): the counter carries the verdict;
    * `saturated`: finite values whose error exceeds the threshold (silent saturation),
      clamped values included (they score p bits), flushed-to-zero ones when far enough off.
    Bits are capped at the precision p (`bits`): `max_bits` ≤ p, and in `mean_bits` each
    element scores at most p, a non-finite one exactly p.
    """

    threshold_bits: float
    n: int = 0
    max_ulp: float = 0.0
    _bits_sum: float = 0.0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    saturated: int = 0
    clamped: int = 0
    underflow: int = 0
    reduced_ulp: float | None = None
    reduced_value: float | None = None
    reduced_reference: float | None = None
    _format: FloatFormat | None = field(default=None, repr=False)

    @property
    def float_format(self) -> FloatFormat:
        # Set by the first `add`/`add_reduced`; read only once elements were counted.
        assert self._format is not None, "no values were added yet"
        return self._format

    def add(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        """Stream the elements of `value` against `reference` (same dtype, any shape, on
        any device): tensor reductions on that device, chunk by chunk, and one transfer of
        the scalars to the host at the end."""
        value = value.detach().reshape(-1)
        reference = reference.detach().reshape(-1)
        if value.dtype != reference.dtype:
            raise TypeError(f"dtype mismatch: {value.dtype} vs {reference.dtype}")
        self._format = fmt(value.dtype)
        n = value.numel()
        if n == 0:
            return
        acc = _Accumulator(self, value.device)
        # Bounded chunks: the temporaries are a few float64/integer copies of a chunk.
        step = CHUNK if value.device.type == "cpu" else DEVICE_CHUNK
        for start in range(0, n, step):
            acc.add(_Bits.of(value[start : start + step]), _Bits.of(reference[start : start + step]))
        acc.flush()
        self.n += n

    def set_reduced(self, value: torch.Tensor, reference: torch.Tensor) -> None:
        # ulp_distance applies the same rules: a finite mean against an infinite reduced
        # reference is inf (clamped), the largest finite value 1 ULP.
        self._format = self._format or fmt(value.dtype)
        if value.dtype == reference.dtype and value.device.type == "cpu" == reference.device.type:
            # One number: its two bit patterns in Python, rather than a dozen tensor
            # operations on one element (a third of a small point's metrics).
            f = fmt(value.dtype)
            vi, ri = (int(t.detach().reshape(1).view(f.int_dtype)[0]) for t in (value, reference))
            self.reduced_ulp = _scalar_distance(vi, ri, f)
        else:
            self.reduced_ulp = float(ulp_distance(value.reshape(1), reference.reshape(1))[0])
        self.reduced_value = float(value)
        self.reduced_reference = float(reference)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    def as_dict(self) -> dict:
        max_bits = bits(self.max_ulp, self.float_format) if self.n else None
        return {
            "n": self.n,
            "max_ulp": int_or_inf(self.max_ulp) if self.n else None,
            "max_bits": _round(max_bits),
            "mean_bits": _round(self._bits_sum / self.n) if self.n else None,
            "reduced_ulp": None if self.reduced_ulp is None else int_or_inf(self.reduced_ulp),
            "value": self.reduced_value,
            "reference": self.reduced_reference,
            "nan": self.nan,
            "inf": self.posinf + self.neginf,
            "posinf": self.posinf,
            "neginf": self.neginf,
            "saturated": self.saturated,
            "clamped": self.clamped,
            "underflow": self.underflow,
        }


def int_or_inf(x: float) -> float | int:
    return int(x) if math.isfinite(x) else x


def _round(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return x
    return round(x, 4)


def abs_nats(values: torch.Tensor, exact: torch.Tensor, reduced: torch.Tensor | None = None, value=None) -> dict:
    """The absolute error in nats (METRICS.md "Absolute error in nats") of a loss valued in nats:
    max and mean over the elements of |value − exact| against the unrounded exact values
    (float64), and the reduced value's against the exact mean/sum. An element that is NaN or
    infinite where the exact value is finite (or another infinity) counts as inf; the same
    infinity as 0."""
    v = values.detach().reshape(-1).to(device=exact.device, dtype=torch.float64)
    e = exact.reshape(-1)
    keep = ~e.isnan()
    v, e = v[keep], e[keep]
    same = (v == e) | (v.isinf() & e.isinf() & (v.sign() == e.sign()))
    d = torch.where(same, 0.0, (v - e).abs())
    d = torch.where(d.isnan(), math.inf, d)
    out: dict = {"max": float(d.max()) if d.numel() else None, "mean": float(d.mean()) if d.numel() else None}
    if reduced is not None and value is not None and not math.isnan(value):
        r = float(reduced)
        out["reduced"] = 0.0 if r == value else (math.inf if math.isnan(r) else abs(r - value))
    return {k: (None if x is None else _round_nats(x)) for k, x in out.items()}


def _round_nats(x: float) -> float:
    # Three significant digits: 0.126 nats, 2.4e-07 nats.
    return x if not math.isfinite(x) or x == 0 else float(f"{x:.3g}")
