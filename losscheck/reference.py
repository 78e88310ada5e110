"""High-precision evaluation shared by the losses' references (METRICS.md, "Reference").

References are computed with at least 10 more significand bits than the dtype under test:

* float32/float16/bfloat16 targets in **torch float64 tensors on the input's device** (CPU,
  CUDA: nothing in that path goes through the host or numpy);
* float64 targets in numpy x86 long double (64-bit significand) on the host where it is
  extended precision and the input is on the CPU (the *extended* path: the fast one on a
  CPU), else in double-double (`losscheck.doubledouble`: pairs of float64 tensors, ~106
  bits) on the input's device: aarch64, Apple silicon, GPUs (`path`). Each loss has both
  formulations (`chunk_function`); they give the same float64 references but where long
  double double-rounds (about one value in 2**10, near ties; tests/test_doubledouble.py).

Both never hold more than a bounded chunk of values in working precision at once
(`chunk_elements`), and are rounded to the target dtype exactly once (correct rounding,
see `rounding.round_to`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import numpy as np
import torch

from .dtypes import fmt
from .errors import ReferenceUnavailable
from .rounding import round_to  # noqa: F401  (R.round_to: the losses' rounding of their references)

# Values held in working precision at once on the host (2 MiB per array in float64, 4 MiB in
# long double: cache-sized, which is what the CPU's speed needs). An accelerator takes larger
# chunks (32 MiB per float64 array): each chunk costs a few dozen kernel launches, which
# 2**18-value chunks of a 8 x 4096 x 128k point would turn into seconds of launch overhead.
CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNK_ELEMENTS = 1 << 22
# A loss's float64 reference chunks on the host (`losses.reference`): 8 MiB per array. Each
# chunk costs a few dozen kernel calls and index operations, which at 2**18 values took a
# fifth of a float32 cross entropy's reference (4096 x 1000: 24 -> 19 ms; 512 x 32000
# bfloat16: 131 -> 103 ms, 2 threads).
HOST_FLOAT64_CHUNK_ELEMENTS = 1 << 20
# A loss's double-double chunks on the host (float64 targets without long double): each dd
# operation is a pass over the chunk, with a dozen dd temporaries alive, and at 1 MiB per
# array they stay nearer the cores. Dd reference, 2 threads, 2**18 -> 2**17: CE 4096 x 1000
# 1.20 -> 1.01 s, 512 x 32000 4.43 -> 3.93 s, BCE-with-logits 2**20 0.79 -> 0.65 s (2**16:
# 1.08, 4.06, 0.56 s; 2**15: 1.94, 7.44, 0.92 s). Rows are whole in each chunk; what the size
# changes (which elements meet a float64 first guess's vector kernel or its scalar tail, before
# a dd correction) stays below 2**-100 ahead of the one rounding: the same bits in every test
# and sweep compared (tests/test_doubledouble.py; 510 float64 points, 2**19 to 2**20 values).
HOST_DD_CHUNK_ELEMENTS = 1 << 17
# The working precision of float32/float16/bfloat16 targets.
WORK = torch.float64

_LONGDOUBLE_OK = np.finfo(np.longdouble).nmant >= 63


# How float64 targets are computed on the CPU: "extended" (numpy x86 long double on the host:
# the fast path there, 10-100x faster than torch's double-double on a CPU, whose every
# operation is a separate pass over memory) where long double is extended precision, else
# "dd" (double-double in torch tensors: `losscheck.doubledouble`). Inputs on an accelerator
# always take "dd", on their device. Both give the same float64 references but where the long
# double path double-rounds (tests/test_doubledouble.py).
FLOAT64_PATH = "extended"


def path(dtype: torch.dtype, device: torch.device | str | None = None) -> str:
    """How the reference for `dtype` is computed: "tensors" (float64 tensors: float32 and
    the halves), "extended" or "dd" (float64: see FLOAT64_PATH; "dd" on accelerators and
    wherever long double is not extended precision, so float64 is never skipped)."""
    if dtype != torch.float64:
        fmt(dtype)  # raises KeyError for unsupported dtypes
        return "tensors"
    on_cpu = device is None or torch.device(device).type == "cpu"
    if FLOAT64_PATH == "extended" and on_cpu and _LONGDOUBLE_OK and _extended_now():
        return "extended"
    return "dd"


def work_dtype(dtype: torch.dtype) -> type:
    """The numpy type the reference for `dtype` is computed in: np.float64 means torch
    float64 tensors (`WORK`), np.longdouble the extended (numpy) path."""
    if dtype == torch.float64:
        if not _LONGDOUBLE_OK:
            raise ReferenceUnavailable(
                "the float64 reference needs x86 extended precision (long double), "
                f"which this platform lacks (numpy long double has {np.finfo(np.longdouble).nmant} "
                "fraction bits)"
            )
        if not _extended_now():
            # Some native libraries set the x87 precision control to 53 bits; long double
            # arithmetic then silently rounds like float64, and the reference would be wrong.
            raise ReferenceUnavailable(
                "the x87 FPU is set to double precision in this process (a native library changed "
                "its precision control): long double arithmetic is not extended, so there is no "
                "float64 reference"
            )
        return np.longdouble
    fmt(dtype)  # raises KeyError for unsupported dtypes
    return np.float64


def _extended_now() -> bool:
    """Whether long double arithmetic keeps 64 significand bits right now (1 + 2**-60 > 1)."""
    one = np.longdouble(1)
    return bool(one + np.longdouble(2) ** -60 > one)


def extended(dtype: torch.dtype) -> bool:
    """Whether the reference for `dtype` takes the extended (numpy long double) path."""
    return work_dtype(dtype) is not np.float64


def chunk_elements(device: torch.device | str | None = None, host: int = CHUNK_ELEMENTS) -> int:
    """Values held in working precision at once on `device` (see CHUNK_ELEMENTS): `host` on the CPU."""
    return host if device is None or torch.device(device).type == "cpu" else DEVICE_CHUNK_ELEMENTS


def row_chunks(rows: int, row_elements: int, chunk: int | None = None) -> Iterator[slice]:
    """Slices of whole rows holding at most `chunk` (CHUNK_ELEMENTS) values (at least one row)."""
    step = max(1, (chunk or CHUNK_ELEMENTS) // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# Points of at most this many values have their chunk results kept (`ChunkMemo`): with the
# entries kept, at most ~16 MiB (keys and results in long double).
MEMO_ELEMENTS = 1 << 14


class ChunkMemo:
    """A loss's chunk results (working precision, before rounding) by the chunk's content:
    the reductions of a point (mean, sum, none) share them — they differ only after the chunk
    (division, rounding) — and a config sweeping reductions or upstream gradients would
    otherwise evaluate each chunk three times over (options.yaml: 12,960 points of 2,560
    values, where a soft-target binary reference in double-double costs ~25 ms a chunk).
    Small CPU points only (`MEMO_ELEMENTS`); the last `size` chunks (a sweep's reductions of a
    point are a device-and-dtype group apart: 8 points); copies in and out, so
    that no caller can change what another gets. Keys are the values' bytes, exactly."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def key(self, *parts) -> tuple | None:
        """A key from tensors, arrays, numbers, strings and containers of them; None where
        something else (or a tensor off the CPU) is among them: not kept."""
        try:
            return tuple(_fingerprint(p) for p in parts)
        except _NotKept:
            return None

    def get(self, key: tuple):
        with self._lock:
            got = self._items.get(key)
            if got is None:
                return None
            self._items.move_to_end(key)
        return _copied(got)

    def put(self, key: tuple, value) -> None:
        with self._lock:
            self._items[key] = _copied(value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class _NotKept(Exception):
    pass


def _fingerprint(v):
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise _NotKept
        t = v.detach().contiguous()
        return ("t", str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(v, np.ndarray):
        return ("n", v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return ("v", type(v).__name__, repr(v))
    if isinstance(v, (tuple, list)):
        return ("l", tuple(_fingerprint(x) for x in v))
    if isinstance(v, dict):
        return ("d", tuple((k, _fingerprint(x)) for k, x in sorted(v.items())))
    raise _NotKept


def _copied(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, tuple):
        return tuple(_copied(x) for x in v)
    return v


def to_work(t: torch.Tensor, work: type) -> np.ndarray:
    """A tensor's values, exactly, in working precision (bfloat16 goes through float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    return t.numpy().astype(work)


class CompensatedSum:
    """Sum of many working-precision values with every rounding error recovered.

    Each chunk is summed by a pairwise tree of TwoSums (vectorised: log2(n) numpy steps);
    the exact rounding errors are added up separately, and chunk sums are combined with
    one more TwoSum. The result (head + tail) carries the sum to about twice the working
    precision, far below 1/64 ULP of the target dtype. inf/NaN terms, or partial sums
    beyond the working format's range, fall back to plain IEEE summation.
    """

    def __init__(self) -> None:
        self._hi = None
        self._lo = None
        self._plain: list = []  # sums that are not finite (or left the range)

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(-1)
        if values.size == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(values).all():
                self._plain.append(np.sum(values))
                return
            hi, lo = _tree_sum(values)
            if self._hi is None:
                self._hi, self._lo = values.dtype.type(0), values.dtype.type(0)
            total, err = _two_sum(self._hi, hi)
            if np.isfinite(total) and np.isfinite(err):
                self._hi, self._lo = total, self._lo + lo + err
            else:
                # A partial sum left the working format's range (float64 losses near
                # 1e308): IEEE summation gives the rounded answer, inf.
                self._plain.append(np.sum(values))

    def mean(self, count: int, work: type):
        """The sum divided by `count`, in working precision."""
        with np.errstate(over="ignore", invalid="ignore"):
            total = work(0) if self._hi is None else work(self._hi) + work(self._lo)
            for extra in self._plain:
                total = total + work(extra)
            return total / work(count)


class TensorCompensatedSum:
    """`CompensatedSum` for torch float64 tensors, on their device: the same pairwise tree of
    TwoSums, the same combination of partial sums, with the sum carried to ~2**-100
    relative (so the same float64 total but in cases of that rarity).

    Small additions (a chunk's per-row losses of a wide cross entropy: a few hundred values)
    are gathered until CHUNK_ELEMENTS values wait, then summed as one: a tree costs a dozen
    operations per level whatever its width. No branch reads a value: the fallback to IEEE
    summation for inf/NaN terms is a `torch.where`, so nothing waits for the device until
    the caller reads the total. (Partial sums cannot leave float64's range here: the values
    are losses of float32 or half inputs, at most ~1e77 even weighted.)
    """

    def __init__(self) -> None:
        self._hi: torch.Tensor | None = None
        self._lo: torch.Tensor | None = None
        self._plain: torch.Tensor | None = None
        self._waiting: list[torch.Tensor] = []
        self._count = 0

    def add(self, values: torch.Tensor) -> None:
        x = values.reshape(-1)
        if x.numel() == 0:
            return
        self._waiting.append(x)
        self._count += x.numel()
        if self._count >= CHUNK_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self._waiting:
            return
        x = self._waiting[0] if len(self._waiting) == 1 else torch.cat(self._waiting)
        self._waiting, self._count = [], 0
        if self._hi is None:
            self._hi = self._lo = self._plain = x.new_zeros(())
        plain = x.sum()
        err = x.new_zeros(())
        while x.numel() > 1:
            if x.numel() % 2:
                x = torch.cat([x, x.new_zeros(1)])
            half = x.numel() // 2
            x, e = _two_sum_into(x[:half], x[half:])
            err = err + e.sum()
        hi0, lo0, plain0 = self._parts()
        total, e = _two_sum(hi0, x[0])
        ok = total.isfinite() & e.isfinite()
        self._hi = torch.where(ok, total, hi0)
        self._lo = torch.where(ok, lo0 + err + e, lo0)
        # inf/NaN terms: IEEE's sum is the answer (any order gives the same inf or NaN).
        self._plain = plain0 + torch.where(ok, 0.0, plain)

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The three are set together, by the first flush of any terms; callers check _hi first.
        assert self._hi is not None and self._lo is not None and self._plain is not None
        return self._hi, self._lo, self._plain

    def total_dd(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum as a double-double (hi, lo) of shape () (inf/NaN terms: IEEE's sum in hi)."""
        self._flush()
        if self._hi is None:
            z = torch.zeros((), dtype=WORK, device=device)
            return z, z.clone()
        hi0, lo0, plain0 = self._parts()
        hi, lo = _two_sum(hi0, lo0)
        hi, lo = _two_sum(hi, plain0 + lo)
        ok = hi.isfinite()
        return torch.where(ok, hi, hi0 + lo0 + plain0), torch.where(ok, lo, 0.0)

    def mean(self, count: int, work=None) -> torch.Tensor:
        """The sum divided by `count`, a float64 tensor of shape ()."""
        self._flush()
        if self._hi is None:
            return torch.zeros((), dtype=WORK)
        hi0, lo0, plain0 = self._parts()
        return (hi0 + lo0 + plain0) / count


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_sum_into(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_two_sum` of tensors, the same operations in the same order, into three temporaries
    instead of six (a 2**20-term tree: 4.6 -> 3.6 ms, and less of the allocator's page
    faults: median 9.6 -> 3.9 ms here)."""
    s = a + b
    bb = s - a
    t = torch.sub(s, bb)
    torch.sub(a, t, out=t)
    torch.sub(b, bb, out=bb)
    return s, t.add_(bb)


def _tree_sum(x: np.ndarray):
    err = x.dtype.type(0)
    while x.size > 1:
        if x.size % 2:
            x = np.append(x, x.dtype.type(0))
        half = x.size // 2
        x, e = _two_sum(x[:half], x[half:])
        if not np.isfinite(x).all():
            return np.sum(x), x.dtype.type(0)
        err = err + e.sum()
    return x[0], err


def two_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a - b as an unevaluated sum d + e with |e| <= ulp(d)/2 (Knuth's TwoSum)."""
    d = a - b
    bb = d - a
    e = (a - (d - bb)) + (-b - bb)
    return d, e


def sigmoid(z):
    """Logistic function without overflow or cancellation, elementwise (numpy or torch)."""
    if isinstance(z, torch.Tensor):
        e = torch.exp(-z.abs())
        return torch.where(z >= 0, torch.reciprocal(1 + e), e / (1 + e))
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(z))
    one = z.dtype.type(1)
    return np.where(z >= 0, one / (one + e), e / (one + e))


def softplus(z):
    """log(1 + exp(z)) without overflow: max(z, 0) + log1p(exp(-|z|)); exact limits at ±inf."""
    if isinstance(z, torch.Tensor):
        return torch.maximum(z, z.new_zeros(())) + torch.log1p(torch.exp(-z.abs()))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def softplus_and_sigmoid(z):
    """`softplus(z)` and `sigmoid(z)`, bit for bit (a tensor's NaN's bits aside: NaN for a NaN
    z either way), sharing exp(−|z|) and 1 + exp(−|z|): numpy (long double: half the
    scalar expl calls, a sixth of a BCE-with-logits float64 reference) or torch."""
    if not isinstance(z, torch.Tensor):
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(-np.abs(z))
            one = z.dtype.type(1)
            ope = one + e
            return np.maximum(z, 0) + np.log1p(e), np.where(z >= 0, one / ope, e / ope)
    e = torch.exp(z.abs().neg_())
    ope = 1 + e
    sp = torch.log1p(e).add_(torch.maximum(z, z.new_zeros(())))
    # σ's numerator, 1 for z >= 0 and e below, is exp(min(z, 0)): the same exp of the same
    # argument (or exp(0)), without torch.where (3.4 -> 1.2 ms per 2**20 values here).
    return sp, torch.exp(torch.minimum(z, z.new_zeros(()))).div_(ope)


def negate_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.where(mask, −x, x) for a float64 tensor of mask's shape, bit for bit (NaNs
    included): the sign bits flipped by integer operations, a third of the time of the
    negation and torch.where on the CPU."""
    flip = mask.to(torch.int64).bitwise_left_shift_(63)
    return flip.bitwise_xor_(x.view(torch.int64)).view(torch.float64)


def _per_element(pos_weight):
    """pos_weight as it multiplies the elements: its one value, or one per element (a
    per-class vector already broadcast to the rows by `losses.reference`)."""
    flat = pos_weight.reshape(-1)
    return flat[0] if flat.shape[0] == 1 else flat


def binary_factor(positive, weight, pos_weight, work: type = np.float64):
    """w·(pos_weight if y = 1 else 1) in working precision (exact for the dtypes under
    test: a product of two of their values fits in float64/long double); None if unset.
    Torch tensors (`positive` a bool tensor) or numpy arrays of type `work`."""
    if isinstance(positive, torch.Tensor):
        f = None
        if pos_weight is not None:
            f = torch.where(positive, _per_element(pos_weight).to(WORK), 1.0)
        if weight is not None:
            w = weight.to(WORK)
            f = w if f is None else f * w
        return f
    factor = None
    if pos_weight is not None:
        factor = np.where(positive, _per_element(np.asarray(pos_weight, dtype=work)), work(1))
    if weight is not None:
        w_np: np.ndarray = np.asarray(weight, dtype=work)
        factor = w_np if factor is None else factor * w_np
    return factor


def weigh_binary(loss, grad, inp, positive, weight=None, pos_weight=None):
    """A binary loss's elements and gradient times w·(pos_weight if y = 1 else 1), a zero
    factor removing its element (`weigh`); as they are where neither option is set. Torch
    tensors or numpy arrays (of the working type of `inp`)."""
    work = inp.dtype.type if isinstance(inp, np.ndarray) else np.float64
    f = binary_factor(positive, weight, pos_weight, work)
    if f is None:
        return loss, grad
    nan_input = inp != inp  # a NaN input is not the limit of anything: it stays NaN
    return weigh(loss, f, nan_input), weigh(grad, f, nan_input)


def weigh(values, factor, undefined=None):
    """factor·values, where a zero factor removes its element: 0 even where the unweighted
    value is ±inf or has no limit (METRICS.md, "Options": the limit w → 0 is taken first,
    and w·ℓ(x) → 0 for every x near the limit point). Elements marked `undefined` (a NaN
    input: not the limit of anything) stay NaN. `factor` broadcasts against `values`
    (numpy arrays or torch tensors)."""
    out = values * factor
    if isinstance(values, torch.Tensor):
        zero = factor == 0
        if undefined is not None:
            zero = zero & ~undefined
        return torch.where(zero, 0.0, out)
    zero = np.asarray(factor) == 0
    if undefined is not None:
        zero = zero & ~undefined
    return np.where(zero, values.dtype.type(0), out)


def weigh_binary_dd(loss, grad, inp, positive, weight=None, pos_weight=None):
    """`weigh_binary` for scaled double-doubles (float64 targets): the factor
    w·(pos_weight if y = 1 else 1) formed exactly (TwoProd), a zero factor removing its element."""
    if weight is None and pos_weight is None:
        return loss, grad
    from . import doubledouble as D

    f = None
    if pos_weight is not None:
        f = D.dd(torch.where(positive, _per_element(pos_weight).to(WORK), 1.0))
    if weight is not None:
        w = weight.to(WORK).expand_as(inp)
        f = D.dd(w) if f is None else D.two_prod(f[0], w)
    nan_input = inp.isnan()
    return D.weigh_scaled(loss, f, nan_input), D.weigh_scaled(grad, f, nan_input)


class ChunkFunction(Protocol):
    """What `chunk_function` returns: callable on tensors or arrays (tensors or arrays back),
    with its formulations as attributes (`dd`: the double-double one, None if the loss has none)."""

    on_tensors: Callable
    extended: Callable
    dd: Callable | None
    rowwise: Callable | None

    def __call__(self, x: Any, *args: Any, **options: Any) -> Any: ...


def chunk_function(
    on_tensors: Callable, extended: Callable, dd: Callable | None = None, rowwise: Callable | None = None
) -> ChunkFunction:
    """A loss's `reference_chunk` (or `denominators`) from its two formulations: `on_tensors`
    (torch float64 tensors, any device: float32/float16/bfloat16 targets) and `extended`
    (numpy long double arrays: float64 targets, until issue 13's double-double replaces it).
    `rowwise(x, t)`: whether `extended` computes each row from that row alone with numpy
    only, on these arrays — then its chunks may be split into row blocks computed on threads
    (`extended_rows`); None: never.

    The first argument chooses: a tensor goes to `on_tensors`, long double to `extended`;
    numpy float64 arrays (the tests' mpmath certification, explain) are run through
    `on_tensors` on the CPU and answered as numpy, so what is certified is the torch path.
    """

    def chunk(x, *args, **options):
        if isinstance(x, torch.Tensor):
            return on_tensors(x, *args, **options)
        if np.asarray(x).dtype == np.longdouble:
            return extended(x, *args, **options)
        out = on_tensors(*(_tensor(a) for a in (x, *args)), **{k: _tensor(v) for k, v in options.items()})
        return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()

    chunk.__doc__ = on_tensors.__doc__
    out = cast(ChunkFunction, chunk)  # a function with attributes: the checker cannot see them set
    out.on_tensors, out.extended, out.dd, out.rowwise = on_tensors, extended, dd, rowwise
    return out


def always(*_args) -> bool:
    """`chunk_function`'s `rowwise` of an extended formulation that is row-wise numpy on any rows."""
    return True


def _tensor(v):
    """numpy arrays as tensors (floating: float64, exactly; integer: int64); the rest as is."""
    if not isinstance(v, np.ndarray):
        return v
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64 if v.dtype.kind == "f" else np.int64))
