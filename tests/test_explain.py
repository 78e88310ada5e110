"""`losscheck.explain`: every loss explains, and its numbers are live and right.

The numbers in an explanation are checked against independent computations: the dtype
limits against torch.finfo and an exhaustive search over the dtype's values, the breakdown
scales against a sweep run here and `analysis.breakdown_scales` called directly. A loss
whose naive implementation is swapped for the stable one must show "none" — the numbers
are measured, not typed in.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from losscheck import analysis, explain as E, sweep
from losscheck.config import parse_config
from losscheck.dtypes import FORMATS
from losscheck.losses import LOSSES

ALL_DTYPES = tuple(FORMATS)


@pytest.fixture(scope="module")
def explained() -> dict[str, str]:
    """Each loss explained once (all four dtypes), shared by the tests of this module."""
    return {name: E.explain(name) for name in LOSSES}


# ---- helpers: read the explanation back -------------------------------------------------------

def section(text: str, number: int) -> str:
    """The text of section `number` (1-based), up to the next section header."""
    start = text.index(f"## {E.SECTIONS[number - 1]}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def tables(text: str) -> list[tuple[list[str], list[dict[str, str]]]]:
    """Every pipe table in `text`: (headers, rows as dicts)."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    out = []
    for block in blocks:
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
        headers = cells[0]
        out.append((headers, [dict(zip(headers, row)) for row in cells[2:]]))
    return out


def table_with(text: str, header: str) -> list[dict[str, str]]:
    found = [rows for headers, rows in tables(text) if header in headers]
    assert len(found) == 1, (header, text)
    return found[0]


def breakdown_table(text: str) -> dict[str, dict[str, str]]:
    """implementation -> dtype -> cell, from section 3."""
    return {row["implementation"]: row for row in table_with(section(text, 3), "implementation")}


def first_word(cell: str) -> str:
    return cell.split()[0]


def independent_breakdowns(loss: str, dtypes=ALL_DTYPES) -> dict[tuple, analysis.Breakdown]:
    """The same sweep as explain's, written out here and analysed directly."""
    impls = [i for i in ("naive", "stable", "torch") if i in LOSSES[loss].implementations]
    sequence = bool(getattr(LOSSES[loss], "sequence", False))
    batch = E.SEQUENCE_BATCH if sequence else E.BATCH
    text = f"""
name: independent
losses: [{loss}]
implementations: [{', '.join(impls)}]
scales: [{', '.join(str(s) for s in E.SCALES)}]
batch_sizes: [{batch}]
classes: [{E.CLASSES}]
{f"sequence_lengths: [{E.SEQUENCE_LENGTH}]" if sequence else ""}
dtypes: [{', '.join(dtypes)}]
devices: [cpu]
distributions: [{', '.join(E.DISTRIBUTIONS)}]
seed: {E.SEED}
timing: false
"""
    threads = torch.get_num_threads()
    try:
        records = sweep.run(parse_config(text, "test"), 1)
    finally:
        torch.set_num_threads(threads)
    return analysis.breakdown_scales(records)


def expected_cell(b: analysis.Breakdown) -> str:
    if b.status != "measured":
        return b.status
    return "none" if b.scale is None else f"{b.scale:g}"


# ---- every loss, every section ----------------------------------------------------------------

@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_explains_with_every_section_in_order(explained, loss):
    text = explained[loss]
    positions = [text.index(f"## {header}") for header in E.SECTIONS]
    assert positions == sorted(positions)
    assert text.startswith(f"# losscheck explain {loss}")
    # Plain text with unicode math, not LaTeX.
    assert "\\" not in text
    assert "\\frac" not in text and "\\sigma" not in text
    # The live parts are there: limits, breakdown table, the sentence saying what it means.
    sec3 = " ".join(section(text, 3).split())  # prose is wrapped
    assert "ln(max)" in sec3 or "p = 1 from" in sec3
    assert set(breakdown_table(text)) == set(E.sweep_implementations(LOSSES[loss]))
    assert "smallest swept logit scale" in sec3
    assert "half the significand bits" in sec3


def test_bce_names_the_source_pages_formula_error(explained):
    sec2 = section(explained["bce"], 2)
    assert "bracket" in sec2 and "wrong sign" in sec2
    assert "formula error" in sec2 and "instability" in sec2
    # Live: the misprinted formula is far off at scale 1, where naive is exact.
    rows = {r["scale"]: r for r in table_with(sec2, "as misprinted")}
    assert "1" in rows
    def bits(cell):  # "0.7 (0 bits off)", or "… (all bits lost)": p bits, capped at the precision
        words = cell.split("(")[1].split()
        return math.inf if words[0] == "all" else float(words[0])
    naive_bits = bits(rows["1"]["naive"])
    misprint_bits = bits(rows["1"]["as misprinted"])
    assert naive_bits <= 1
    assert misprint_bits >= 20


def test_cross_entropy_names_the_gradient_mislabel(explained):
    sec5 = section(explained["cross_entropy"], 5)
    assert "mislabelled" in sec5
    assert "softmax(x) − onehot" in sec5
    # The autograd demonstration: ∂L/∂x equals softmax − onehot, computed here independently.
    x = torch.tensor([2.0, 1.0, 0.1], dtype=torch.float64)
    g = torch.softmax(x, 0) - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert "(" + ", ".join(f"{float(v):.4f}" for v in g) + ")" in sec5


def test_bce_shows_torch_clamp_live(explained):
    sec4 = section(explained["bce"], 4)
    assert "Clamping is not a fix" in sec4
    assert "- torch on p: 100" in sec4  # F.binary_cross_entropy clamps log at −100
    assert "- stable on p: inf" in sec4


# ---- the numbers match independent computations ------------------------------------------------

def limits_rows(text: str) -> dict[str, dict[str, str]]:
    return {row["dtype"]: row for row in table_with(section(text, 3), "significand bits")}


def test_log_max_matches_finfo(explained):
    rows = limits_rows(explained["bce_with_logits"])
    assert rows["float16"]["ln(max)"] == f"{math.log(65504):.2f}" == "11.09"
    for dtype in ALL_DTYPES:
        assert rows[dtype]["ln(max)"] == f"{math.log(torch.finfo(FORMATS[dtype].torch_dtype).max):.2f}"
        assert rows[dtype]["significand bits"] == str(FORMATS[dtype].significand_bits)


def _sigmoid_one_exhaustive(dtype: str) -> float:
    """The smallest x of `dtype` with 1/(1 + exp(−x)) == 1 in that dtype, by trying every
    candidate value (all of float16/bfloat16; float32 between 16 and 17)."""
    f = FORMATS[dtype]
    if dtype == "float32":
        lo = int(torch.tensor([16.0]).view(torch.int32))
        hi = int(torch.tensor([17.0]).view(torch.int32))
        bits = torch.arange(lo, hi + 1, dtype=torch.int32)
    else:
        top = int(torch.tensor([torch.finfo(f.torch_dtype).max], dtype=f.torch_dtype).view(f.int_dtype))
        bits = torch.arange(0, top + 1, dtype=torch.int32).to(f.int_dtype)
    x = bits.view(f.torch_dtype)
    one = 1 / (1 + torch.exp(-x)) == 1
    assert one.any() and not one[0]
    return float(x[one.nonzero()[0, 0]])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sigmoid_saturation_matches_exhaustive_search(explained, dtype):
    rows = limits_rows(explained["bce_with_logits"])
    assert rows[dtype]["σ = 1 from"] == f"{_sigmoid_one_exhaustive(dtype):.2f}"
    eps = torch.finfo(FORMATS[dtype].torch_dtype).eps
    assert rows[dtype]["ln(2/ε)"] == f"{math.log(2 / eps):.2f}"


def test_sigmoid_saturation_float64(explained):
    # 1 + e^−x rounds to 1 once e^−x ≤ 2^−53 (half an ULP above 1, ties to even).
    rows = limits_rows(explained["bce_with_logits"])
    assert rows["float64"]["σ = 1 from"] == f"{53 * math.log(2):.2f}"


def test_dtype_limits_directly():
    L = E.dtype_limits("float16")
    assert L.log_max == pytest.approx(math.log(65504))
    # exp_overflow_at is the first float16 whose exp overflows: the value before it does not.
    at = torch.tensor([L.exp_overflow_at], dtype=torch.float16)
    assert torch.isinf(torch.exp(at))
    assert torch.isfinite(torch.exp(torch.nextafter(at, torch.zeros_like(at))))
    # σ rounded once: 1 − e^−x within a quarter ULP of 1, ln(4/ε) = 12·ln 2 for float16.
    assert f"{L.p_one_at:.2f}" == f"{math.log(4 / 2 ** -10):.2f}"
    assert float(torch.exp(torch.tensor([E.dtype_limits("float32").exp_underflow_below]))) == 0


@pytest.mark.parametrize("loss", list(LOSSES))
def test_breakdown_scales_match_an_independent_sweep(explained, loss):
    table = breakdown_table(explained[loss])
    expected = independent_breakdowns(loss)
    assert expected, "the independent sweep produced no breakdowns"
    for (lname, impl, dtype, device), b in expected.items():
        assert (lname, device) == (loss, "cpu")
        assert first_word(table[impl][dtype]) == expected_cell(b), (impl, dtype, table[impl][dtype], b)


def test_naive_float32_bce_with_logits_breakdown(explained):
    b = independent_breakdowns("bce_with_logits", ("float32",))[("bce_with_logits", "naive", "float32", "cpu")]
    assert b.scale is not None  # naive does break in float32 within the sweep
    cell = breakdown_table(explained["bce_with_logits"])["naive"]["float32"]
    assert first_word(cell) == f"{b.scale:g}"
    assert b.reason in cell


@pytest.mark.parametrize("loss", list(LOSSES))
def test_stable_never_breaks(explained, loss):
    row = breakdown_table(explained[loss])["stable"]
    assert [row[d] for d in ALL_DTYPES] == ["none"] * len(ALL_DTYPES)
    assert "`stable` never breaks in this sweep" in section(explained[loss], 3)


def test_what_goes_wrong_names_the_failure(explained):
    sec3 = section(explained["bce_with_logits"], 3)
    assert "What goes wrong at the breakdown scale:" in sec3
    wrong = sec3.split("What goes wrong at the breakdown scale:")[1]
    for dtype in ALL_DTYPES:
        assert f"- naive, {dtype}, scale " in wrong
    # Naive BCE-with-logits produces NaN/inf losses and gradients at its breakdown point.
    assert "NaN in the gradient" in wrong or "inf in the gradient" in wrong
    assert "+inf loss" in wrong or "NaN loss" in wrong


def test_describe_record_names_each_failure():
    def record(**fwd):
        base = {"n": 256, "nan": 0, "inf": 0, "posinf": 0, "neginf": 0, "saturated": 0,
                "value": 1.0, "reference": 1.0, "reduced_ulp": 0}
        return {"status": "ok", "threshold_bits": 12.0, "loss": "x", "impl": "naive",
                "forward": {**base, **fwd.pop("forward", {})},
                "backward": {**base, "value": None, "reference": None, "reduced_ulp": None,
                             **fwd.pop("backward", {})}}
    assert "NaN in the gradient (3/256)" in E.describe_record(record(backward={"nan": 3}))
    text = E.describe_record(record(forward={"posinf": 2, "inf": 2, "value": math.inf, "reference": 4.0}))
    assert "+inf loss in 2/256 elements" in text and "mean loss inf (reference 4)" in text
    assert "mean off by 20 bits" in E.describe_record(record(forward={"reduced_ulp": 2 ** 20 - 1}))
    assert E.describe_record({"status": "error", "message": "boom"}) == "error: boom"


# ---- the numbers are live -------------------------------------------------------------------------

def test_breakdown_follows_the_implementation(monkeypatch, explained):
    """Replace naive BCE-with-logits by the stable one: its breakdown scale becomes "none"."""
    before = breakdown_table(explained["bce_with_logits"])["naive"]
    assert any(before[d] != "none" for d in ALL_DTYPES)
    loss = LOSSES["bce_with_logits"]
    impls = dict(loss.implementations)
    impls["naive"] = dataclasses.replace(impls["stable"], name="naive", kind="naive")
    monkeypatch.setitem(LOSSES, "bce_with_logits", dataclasses.replace(loss, implementations=impls))
    after = breakdown_table(E.explain("bce_with_logits"))["naive"]
    assert [after[d] for d in ALL_DTYPES] == ["none"] * len(ALL_DTYPES)


@pytest.mark.parametrize("base", ["bce_with_logits", "cross_entropy", "bce"])
def test_a_loss_without_prose_falls_back_to_its_summaries(monkeypatch, base):
    name = f"toy_{base}"
    loss = dataclasses.replace(LOSSES[base], name=name, summary=f"a toy copy of {base} for the test")
    monkeypatch.setitem(LOSSES, name, loss)
    assert name not in E.PROSE
    text = E.explain(name, dtypes=("float32",))
    for header in E.SECTIONS:
        assert f"## {header}" in text
    assert f"a toy copy of {base} for the test" in text
    assert loss.implementations["naive"].summary in text
    assert loss.implementations["stable"].summary in text
    assert "\\" not in text
    table = breakdown_table(text)
    assert table["stable"]["float32"] == "none"
    expected = independent_breakdowns(name, ("float32",))[(name, "naive", "float32", "cpu")]
    assert first_word(table["naive"]["float32"]) == expected_cell(expected)


# ---- options and errors ---------------------------------------------------------------------------

def test_dtypes_subset():
    text = E.explain("cross_entropy", dtypes=("float16",))
    rows = limits_rows(text)
    assert set(rows) == {"float16"}
    assert rows["float16"]["ln(max)"] == "11.09"
    assert set(breakdown_table(text)["naive"]) == {"implementation", "float16"}


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        E.explain("hinge")
    message = str(info.value)
    assert "hinge" in message and "\n" not in message
    for name in LOSSES:
        assert name in message


def test_unknown_dtype():
    with pytest.raises(ValueError, match="float8"):
        E.explain("bce", dtypes=("float8",))


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    E.explain("bce_with_logits", dtypes=("float32",), threads=1)
    assert torch.get_num_threads() == before


def test_unlatex_of_the_shipped_formulas():
    for loss in LOSSES.values():
        formulas = getattr(loss, "formulas", None)
        if formulas is None:
            continue
        for text in dataclasses.astuple(formulas):
            plain = E.unlatex(text)
            assert "\\" not in plain and "\\frac" not in plain, (text, plain)
    assert E.unlatex(r"\partial\ell/\partial x = \frac{p - y}{p(1-p)}") == "∂ℓ/∂ x = (p − y)/(p(1−p))"
    assert E.unlatex(r"\sigma(x) = \frac{1}{1+e^{-x}}") == "σ(x) = 1/(1+e^−x)"
    assert E.unlatex(r"\ell = -\log \frac{a}{b}") == "ℓ = −log a/b"


def test_a_broken_stable_is_reported_not_hidden(monkeypatch):
    loss = LOSSES["bce_with_logits"]
    impls = dict(loss.implementations)
    impls["stable"] = dataclasses.replace(impls["naive"], name="stable", kind="stable")
    monkeypatch.setitem(LOSSES, "bce_with_logits", dataclasses.replace(loss, implementations=impls))
    text = E.explain("bce_with_logits", dtypes=("float16",))
    assert breakdown_table(text)["stable"]["float16"] != "none"
    assert "NOTE: `stable` does not hold in float16" in " ".join(text.split())


def test_breakdown_cell():
    assert E.breakdown_cell(analysis.Breakdown(10.0, "fwd non-finite", "measured")) == "10 (fwd non-finite)"
    assert E.breakdown_cell(analysis.Breakdown(None, "", "measured")) == "none"
    assert E.breakdown_cell(analysis.Breakdown(None, "no long double here", "skipped")) == "skipped"


def test_described_bits_never_exceed_the_precision():
    # docs/METRICS.md: bits never exceed p in any rendered text ("mean off by 62 bits" in float64 before).
    record = {"status": "ok", "threshold_bits": 26.5, "loss": "x", "impl": "naive", "dtype": "float64",
              "forward": {"n": 4, "nan": 0, "inf": 0, "posinf": 0, "neginf": 0, "saturated": 0,
                          "value": 1.0, "reference": 2.0, "reduced_ulp": 2 ** 62},
              "backward": None}
    text = E.describe_record(record)
    assert "mean off by all its bits" in text and "62 bits" not in text
