"""The torch metrics give every number of the numpy ones they replaced (issue 13, step 1).

`numpy_metrics` is the numpy implementation as it was (a verbatim copy); every test here
feeds the same tensors to both and asserts that `ulp_distance`, `ordinal` and every field
of `ErrorStats.as_dict()` are equal — not close: equal. Each test runs twice: with the
per-chunk summary read on the host (what the CPU does) and with every rule applied
unconditionally (what an accelerator does), so both paths are held to the oracle on CPU.
Where a GPU is present the same comparisons run on it.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_metrics as old
from losscheck import metrics
from losscheck.dtypes import FORMATS
from losscheck.metrics import ErrorStats, ordinal, ulp_distance

DTYPES = list(FORMATS)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(params=["summary_on_host", "every_rule_on_device"], autouse=True)
def path(request, monkeypatch):
    # Both paths on every device: the CUDA test runs the host-summary path on the GPU too.
    on_host = frozenset({"cpu", "cuda"}) if request.param == "summary_on_host" else frozenset()
    monkeypatch.setattr(metrics, "_SUMMARY_ON_HOST", on_host)
    return request.param


def from_patterns(patterns, name: str) -> torch.Tensor:
    """Values of dtype `name` from unsigned bit patterns (Python ints)."""
    f = FORMATS[name]
    w = f.total_bits
    signed = [p - (1 << w) if p >= 1 << (w - 1) else p for p in patterns]
    return torch.tensor(signed, dtype=f.int_dtype).view(f.torch_dtype)


def special_patterns(name: str) -> list[int]:
    """±0, subnormals, the normal boundary, 1, the largest finite values, ±inf and NaNs of
    several payloads, quiet and signalling, of both signs."""
    f = FORMATS[name]
    w, frac = f.total_bits, f.significand_bits - 1
    sign = 1 << (w - 1)
    inf = ((1 << (w - 1)) - 1) ^ ((1 << frac) - 1)
    one = (inf >> 1) & ~((1 << frac) - 1)
    positive = [0, 1, 2, (1 << frac) - 1, 1 << frac, (1 << frac) + 1, one, one + 1, inf - 2, inf - 1, inf,
                 inf + 1, inf + (1 << (frac - 1)), inf + (1 << frac) - 1, inf + 3]
    return positive + [p | sign for p in positive]


def _same(a: dict, b: dict) -> bool:
    """Field by field equality where NaN equals NaN (a reduced NaN value)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y or type(x) is not type(y):
            return False
    return True


def assert_unchanged(value: torch.Tensor, ref: torch.Tensor, threshold: float | None = None, device="cpu"):
    """ulp_distance, ordinal and every ErrorStats field equal to the numpy original's."""
    name = FORMATS[{f.torch_dtype: n for n, f in FORMATS.items()}[value.dtype]].name
    threshold = FORMATS[name].default_threshold_bits if threshold is None else threshold
    v, r = value.to(device), ref.to(device)
    d_new = ulp_distance(v, r)
    assert d_new.device == v.device and d_new.dtype == torch.float64
    d_old = old.ulp_distance(value, ref)
    assert torch.equal(d_new.cpu(), d_old), (name, (d_new.cpu() != d_old).nonzero()[:5])
    assert torch.equal(ordinal(v).cpu(), old.ordinal(value))
    new, ref_stats = ErrorStats(threshold), old.NumpyErrorStats(threshold)
    new.add(v, r)
    ref_stats.add(value, ref)
    a, b = new.as_dict(), ref_stats.as_dict()
    assert _same(a, b), (name, a, b)
    # The unrounded sum too, up to the order of float64 additions within a chunk.
    assert new._bits_sum == pytest.approx(ref_stats._bits_sum, rel=1e-13, abs=0)
    if value.numel():
        new.set_reduced(v.reshape(-1)[0], r.reshape(-1)[0])
        ref_stats.set_reduced(value.reshape(-1)[0], ref.reshape(-1)[0])
        assert _same(new.as_dict(), ref_stats.as_dict())
    return a


def near(ref: torch.Tensor, gen: torch.Generator, spread: int) -> torch.Tensor:
    """`ref` moved by a random number of ULPs in [-spread, spread] (bit patterns plus an
    integer: crosses binades, may cross zero's sign or reach ±inf/NaN)."""
    f = FORMATS[{f.torch_dtype: n for n, f in FORMATS.items()}[ref.dtype]].name
    f = FORMATS[f]
    step = torch.randint(-spread, spread + 1, ref.shape, generator=gen, dtype=torch.int64)
    return (ref.view(f.int_dtype).to(torch.int64) + step).to(f.int_dtype).view(ref.dtype)


# ---- random values ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 60.0, 1e30])
def test_random_values_near_and_far_from_the_reference(name, scale):
    f = FORMATS[name]
    gen = torch.Generator().manual_seed(hash((name, scale)) & 0xFFFF)
    ref = (torch.randn(20_000, generator=gen, dtype=torch.float64) * scale).to(f.torch_dtype)
    value = near(ref, gen, 3)
    # a quarter far off: other random values, some of the opposite sign
    far = (torch.randn(5_000, generator=gen, dtype=torch.float64) * scale).to(f.torch_dtype)
    value[:5_000] = far
    assert_unchanged(value, ref)
    assert_unchanged(ref.abs(), near(ref.abs(), gen, 40))  # one sign only (the losses' values)
    assert_unchanged(ref, ref)  # exact


@pytest.mark.parametrize("name", DTYPES)
def test_random_bit_patterns_of_the_whole_format(name):
    f = FORMATS[name]
    rng = np.random.default_rng(7)
    w = f.total_bits
    pats = rng.integers(0, 1 << w, (2, 30_000), dtype=np.uint64).astype(f"uint{w}").view(f"int{w}")
    value, ref = (torch.from_numpy(p.copy()).view(f.torch_dtype) for p in pats)
    for threshold in (0, 3.5, f.default_threshold_bits, f.significand_bits):
        assert_unchanged(value, ref, threshold)


# ---- special values -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_every_pair_of_special_values(name):
    pats = special_patterns(name)
    pairs = list(itertools.product(pats, pats))
    value = from_patterns([a for a, _ in pairs], name)
    ref = from_patterns([b for _, b in pairs], name)
    assert torch.isnan(value).any() and torch.isinf(value).any()
    dct = assert_unchanged(value, ref)
    # Every counter is exercised, so equality above is not equality of zeros.
    for k in ("nan", "posinf", "neginf", "clamped", "underflow", "saturated"):
        assert dct[k] > 0, k
    # One pair at a time: no chunk-wide shortcut changes a verdict.
    for i in range(0, len(pairs), 37):
        assert_unchanged(value[i:i + 1], ref[i:i + 1])


@pytest.mark.parametrize("name", DTYPES)
def test_special_values_against_random_references(name):
    f = FORMATS[name]
    gen = torch.Generator().manual_seed(3)
    specials = from_patterns(special_patterns(name), name)
    ref = (torch.randn(specials.numel() * 50, generator=gen, dtype=torch.float64)).to(f.torch_dtype)
    value = specials.repeat(50)
    assert_unchanged(value, ref)
    assert_unchanged(ref, value)


def test_opposite_signs_in_float64_past_the_int64_range():
    gen = torch.Generator().manual_seed(5)
    mags = torch.randint(0, 0x7FF0000000000000, (20_000,), generator=gen, dtype=torch.int64)
    mags[:4] = torch.tensor([0x7FEFFFFFFFFFFFFF, 0x7FEFFFFFFFFFFFFE, 0x7FE0000000000001, 1])
    pos = mags.view(torch.float64)
    shuffled = mags[torch.randperm(mags.numel(), generator=gen)].view(torch.float64)
    d = assert_unchanged(pos, -shuffled)
    assert d["max_ulp"] > 2.0**63  # past int64: the float sum of magnitudes
    assert_unchanged(-pos, shuffled)
    # 2·max is ~1.8e19: the float64 the numpy code gave, each magnitude rounded first.
    big = torch.tensor([torch.finfo(torch.float64).max], dtype=torch.float64)
    assert float(ulp_distance(big, -big)[0]) == 2.0 * float(0x7FEFFFFFFFFFFFFF)


# ---- the finite fast paths (metrics._Accumulator._finite_chunk) ---------------------------------

def _spy_fast_path(monkeypatch) -> list[str]:
    """The fast paths' answers ("same_signs", "mixed_signs", "": not taken), recorded."""
    taken: list[str] = []
    real = metrics._Accumulator._finite_chunk

    def spy(self, pair):
        taken.append(real(self, pair))
        return taken[-1]

    monkeypatch.setattr(metrics._Accumulator, "_finite_chunk", spy)
    return taken


@pytest.mark.parametrize("name", DTYPES)
def test_same_signs_fast_path_at_its_bounds(monkeypatch, name, path):
    """Mixed-sign values (a gradient's) whose distance to their reference reaches the
    2**(p-1) bound from both sides, zeros of both signs against zeros and non-zero
    references (underflow), and one sign flip per chunk that the bound alone must not let
    through (+0 against -0 is W = -2**(w-1); a tiny value against its negation): the
    numbers of the numpy original, and the same-sign path taken exactly where no sign
    differs (the mixed-sign one where one does)."""
    f = FORMATS[name]
    half = 1 << (f.significand_bits - 1)
    gen = torch.Generator().manual_seed(f.total_bits)
    taken = _spy_fast_path(monkeypatch)
    ref = (torch.randn(4000, generator=gen, dtype=torch.float64) * 3).to(f.torch_dtype)
    ints = ref.view(f.int_dtype).to(torch.int64)
    sign = torch.where(ints < 0, -1, 1)
    for steps in (half - 1, half, half + 1, 3):
        # Away from zero by `steps` ULPs on either side (never across zero, never to ±inf:
        # |ref| <= ~30 keeps far from the top of the range).
        moved = (ints + sign * torch.randint(0, steps + 1, ref.shape, generator=gen)).to(f.int_dtype).view(ref.dtype)
        # A zero of the reference's sign against a non-zero reference: underflow.
        moved[::97] = torch.copysign(torch.zeros(()), ref[::97].float()).to(ref.dtype)
        ref2 = ref.clone()
        ref2[2::97] = -0.0  # zero against zero, of the same sign
        moved[2::97] = -0.0
        assert_unchanged(moved, ref2, threshold=3.0)
    assert taken == (["same_signs"] * 4 if path == "summary_on_host" else [])
    taken.clear()
    v = ref.clone()
    v[ref.abs().argmin()] *= -1  # the value nearest zero flipped
    w = ref.clone()
    w[5] = 0.0 if ref[5] < 0 else -0.0  # a zero of the other sign
    z = torch.zeros(8, dtype=f.torch_dtype)
    for value, reference in ((v, ref), (w, ref), (z, -z), (-z, z)):
        assert_unchanged(value, reference)
    assert taken == (["mixed_signs"] * 4 if path == "summary_on_host" else [])


@pytest.mark.parametrize("name", DTYPES)
def test_the_reduced_distance_of_one_pair_is_ulp_distance(name):
    """set_reduced's Python path (metrics._scalar_distance) against the tensor rules: every
    pair of special values, and random patterns of the whole format (both signs, huge
    distances, float64's past int64)."""
    f = FORMATS[name]
    specials = from_patterns(special_patterns(name), name)
    v = specials.repeat_interleave(specials.numel())
    r = specials.repeat(specials.numel())
    rng = np.random.default_rng(f.total_bits)
    w = f.total_bits
    pats = rng.integers(0, 1 << w, (2, 3000), dtype=np.uint64).astype(f"uint{w}").view(f"int{w}")
    v = torch.cat([v, torch.from_numpy(pats[0].copy()).view(f.torch_dtype)])
    r = torch.cat([r, torch.from_numpy(pats[1].copy()).view(f.torch_dtype)])
    want = ulp_distance(v, r).tolist()
    got = []
    for a, b in zip(v, r, strict=True):
        s = ErrorStats(1.0)
        s.set_reduced(a, b)
        got.append(s.reduced_ulp)
    assert got == want


# ---- chunks and streaming -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 7, 8])
@pytest.mark.parametrize("n", [6, 7, 8, 13, 14, 15, 16, 29])
def test_chunk_boundaries(monkeypatch, chunk, n):
    monkeypatch.setattr(metrics, "CHUNK", chunk)
    monkeypatch.setattr(old, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(chunk * 100 + n)
    name = "float32"
    ref = torch.randn(n, generator=gen).to(torch.float32)
    value = near(ref, gen, 100)
    # non-finite values and zeros on either side of a boundary, and alone in a chunk
    specials = from_patterns(special_patterns(name), name)
    for i in {chunk - 1, chunk, n - 1}:
        if i < n:
            value[i] = specials[(i * 7) % specials.numel()]
            ref[(i + 3) % n] = specials[(i * 11) % specials.numel()]
    assert_unchanged(value, ref, threshold=2.0)


def test_a_large_tensor_over_real_chunks():
    # Two chunks of the shipped size (the second partly filled), float32.
    gen = torch.Generator().manual_seed(11)
    n = metrics.CHUNK + metrics.CHUNK // 8
    ref = torch.randn(n, generator=gen, dtype=torch.float64).float()
    value = near(ref, gen, 2)
    value[metrics.CHUNK + 5] = math.inf  # one chunk with a special value, the others without
    assert_unchanged(value, ref)


def test_streaming_several_adds_including_empty_ones():
    gen = torch.Generator().manual_seed(13)
    new, ref_stats = ErrorStats(12), old.NumpyErrorStats(12)
    for n in (0, 3, 0, 1000, 1, 0, 77):
        r = torch.randn(n, generator=gen).to(torch.float16)
        v = near(r, gen, 5)
        new.add(v, r)
        ref_stats.add(v, r)
        assert _same(new.as_dict(), ref_stats.as_dict())
    assert new.as_dict()["n"] == 1081


@pytest.mark.parametrize("name", DTYPES)
def test_empty_tensors(name):
    f = FORMATS[name]
    empty = torch.empty(0, dtype=f.torch_dtype)
    assert_unchanged(empty, empty)
    s = ErrorStats(4)
    s.add(empty, empty)
    assert s.as_dict()["n"] == 0 and s.as_dict()["max_ulp"] is None


def test_non_contiguous_and_multidimensional_inputs():
    gen = torch.Generator().manual_seed(17)
    ref = torch.randn(64, 33, generator=gen).to(torch.bfloat16)
    value = near(ref, gen, 4)
    assert_unchanged(value.t(), ref.t())
    assert_unchanged(value[:, ::2], ref[:, ::2])


def test_bits_accepts_numpy_arrays_at_the_edges():
    u = np.array([0.0, 3.0, 2.0**60, math.inf])
    assert metrics.bits(u, "float32").tolist() == [0.0, 2.0, 24.0, 24.0]


# ---- hypothesis: bit patterns -----------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hypothesis_bit_patterns(name, data):
    w = FORMATS[name].total_bits
    pattern = st.integers(0, (1 << w) - 1)
    pairs = data.draw(st.lists(st.tuples(pattern, pattern | st.integers(-70, 70)), min_size=0, max_size=40))
    # A second element given as a small offset means "a few ULP from the first" (near pairs
    # are where the distances are small and the rules at ±0, ±inf and NaN meet).
    vals, refs = [], []
    for a, b in pairs:
        if -70 <= b <= 70 and b != a:
            b = (a + b) % (1 << w)
        vals.append(a)
        refs.append(b)
    threshold = data.draw(st.sampled_from([0.0, 1.0, 2.5, FORMATS[name].default_threshold_bits]))
    assert_unchanged(from_patterns(vals, name), from_patterns(refs, name), threshold)


# ---- the device ---------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the CUDA path is compared where a GPU is present")
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("device_chunk", [metrics.DEVICE_CHUNK, 1000], ids=["one_chunk", "chunks_of_1000"])
def test_cuda_gives_the_numbers_of_the_numpy_original(name, device_chunk, monkeypatch):
    monkeypatch.setattr(metrics, "DEVICE_CHUNK", device_chunk)
    f = FORMATS[name]
    gen = torch.Generator().manual_seed(19)
    ref = torch.randn(3 * 4096, generator=gen, dtype=torch.float64).to(f.torch_dtype)
    value = near(ref, gen, 6)
    specials = from_patterns(special_patterns(name), name)
    value[:specials.numel()] = specials
    assert_unchanged(value, ref, device="cuda")
    pats = special_patterns(name)
    pairs = list(itertools.product(pats, pats))
    assert_unchanged(from_patterns([a for a, _ in pairs], name), from_patterns([b for _, b in pairs], name),
                     device="cuda")


def test_only_the_final_scalars_come_to_the_host(monkeypatch, path):
    """Without a summary read back (every rule on the device: MPS, or `_SUMMARY_ON_HOST`
    emptied), one `add` of several chunks transfers one vector of scalars; nothing is copied
    to the host or read through numpy."""
    monkeypatch.setattr(metrics, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(23)
    ref = torch.randn(4500, generator=gen)
    value = near(ref, gen, 3)
    value[1234] = math.nan
    calls = {"tolist": 0, "item": 0, "float": 0}

    def counting(name, original):
        def wrapper(self, *a, **k):
            calls[name] += 1
            return original(self, *a, **k)
        return wrapper

    def forbidden(self, *a, **k):
        raise AssertionError("copied to the host")

    for name, attr in (("tolist", "tolist"), ("item", "item"), ("float", "__float__")):
        monkeypatch.setattr(torch.Tensor, attr, counting(name, getattr(torch.Tensor, attr)))
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    monkeypatch.setattr(torch.Tensor, "numpy", forbidden)
    s = ErrorStats(12)
    s.add(value, ref)
    if path == "every_rule_on_device":
        assert calls == {"tolist": 1, "item": 0, "float": 0}
    else:
        assert calls["tolist"] >= 5  # a summary per chunk, then the scalars
    monkeypatch.undo()
    expected = old.NumpyErrorStats(12)
    expected.add(value, ref)
    assert _same(s.as_dict(), expected.as_dict())
