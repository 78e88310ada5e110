"""Users' own implementations (`custom:` in a config, `bench --impl`), the examples under
examples/, and the isolation of every failure mode to its point: an implementation that
raises, returns garbage, hangs past the timeout or runs out of memory; a point that cannot
fit in memory is skipped with its estimate."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_error_line

from losscheck import results, sweep
from losscheck.cli import main
from losscheck.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

BASE = """\
name: {name}
losses: [{loss}]
implementations: [naive, stable, torch]
scales: [1, 100]
batch_sizes: [16]
classes: [5]
dtypes: [float32, float16]
devices: [cpu]
distributions: [normal, extreme]
timing: false
"""


def _write(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _bench(tmp_path, config_text, *flags, name="c"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(config_text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots", *flags])
    data = results.load(out / f"{name}.json") if (out / f"{name}.json").exists() else None
    return result, data, out


def _custom(records, impl):
    return [r for r in records if r["impl"] == impl]


# ---- the examples --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples_run(tmp_path_factory):
    """examples/custom.yaml, cut to two dtypes and three scales, run from the repository root
    (its paths are relative to it, as the README's command is)."""
    tmp = tmp_path_factory.mktemp("examples")
    text = (EXAMPLES / "custom.yaml").read_text()
    text = text.replace("dtypes: [float64, float32, float16, bfloat16]", "dtypes: [float32, bfloat16]")
    text = text.replace("scales: [1, 3, 10, 30, 100, 1000]", "scales: [1, 10, 1000]")
    text = text.replace("timing:\n", "timing_was:\n").split("timing_was:")[0] + "timing: false\n"
    cfg = tmp / "custom.yaml"
    cfg.write_text(text)
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        result = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp), "--no-progress", "--no-plots"])
    assert result.exit_code == 0, (result.output, result.stderr)
    return results.load(tmp / "custom.json"), (tmp / "custom.md").read_text()


def test_custom_implementations_run_over_the_same_sweep_as_kind_custom(examples_run):
    data, _ = examples_run
    recs = data["records"]
    builtin_points = {(r["dtype"], r["scale"], r["distribution"]) for r in recs
                      if r["loss"] == "bce" and r["impl"] == "torch"}
    for impl in ("missing_bracket", "missing_bracket_np"):
        mine = _custom(recs, impl)
        assert {r["kind"] for r in mine} == {"custom"}
        assert {(r["dtype"], r["scale"], r["distribution"]) for r in mine} == builtin_points
    assert {r["loss"] for r in _custom(recs, "custom_bcewl")} == {"bce_with_logits"}


def test_the_correct_custom_loss_never_breaks(examples_run):
    data, md = examples_run
    mine = _custom(data["records"], "custom_bcewl")
    assert mine and all(r["status"] == "ok" for r in mine)
    for r in mine:
        assert r["forward"]["nan"] == r["forward"]["inf"] == 0
        assert r["forward"]["reduced_ulp"] <= 4 and r["backward"]["max_ulp"] <= 8, r
    assert "- **bce_with_logits / custom_bcewl (custom)**: no finding (" in md


@pytest.mark.parametrize("impl", ["missing_bracket", "missing_bracket_np"])
def test_the_missing_bracket_is_wrong_at_every_scale_a_formula_error(examples_run, impl):
    data, md = examples_run
    mine = [r for r in _custom(data["records"], impl) if r["distribution"] == "normal"]
    assert mine
    for r in mine:  # scale 1 included: far more than half the bits lost on the mean
        bits = math.log2(1 + r["forward"]["reduced_ulp"])
        assert bits > r["threshold_bits"], (r["dtype"], r["scale"], bits)
    [line] = [x for x in md.splitlines() if x.startswith(f"- **bce / {impl} (custom)**")]
    assert "formula error" in line and "every swept scale" in line
    # naive is an instability, not a formula error: exact at scale 1, broken at large scales
    naive = [x for x in md.splitlines() if x.startswith("- **bce / naive**")]
    assert not any("formula error" in x for x in naive) and any("**overflow**" in x for x in naive)


def test_numpy_and_torch_versions_of_the_same_formula_agree(examples_run):
    data, _ = examples_run
    by = {}
    for r in data["records"]:
        if r["impl"] in ("missing_bracket", "missing_bracket_np"):
            by.setdefault((r["dtype"], r["scale"], r["distribution"]), {})[r["impl"]] = r
    assert by
    for key, pair in by.items():
        a, b = pair["missing_bracket"], pair["missing_bracket_np"]
        assert a["forward"]["nan"] == b["forward"]["nan"], key
        assert b["backward"] is not None  # the numpy version returns (loss, grad)


def test_impl_flag_adds_a_custom_implementation(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result, data, out = _bench(
        tmp_path, BASE.format(name="c", loss="bce_with_logits"),
        "--impl", "bce_with_logits=examples/custom_bce_with_logits.py:bce_with_logits")
    assert result.exit_code == 0, (result.output, result.stderr)
    mine = _custom(data["records"], "bce_with_logits")
    assert len(mine) == 8 and all(r["kind"] == "custom" and r["status"] == "ok" for r in mine)
    assert "--impl bce_with_logits=examples/custom_bce_with_logits.py:bce_with_logits" in data["command"]
    assert "bce_with_logits (custom)" in (out / "c.md").read_text()


# ---- broken callables: one clear error per point, the sweep goes on -------------------------------

BROKEN = '''
import time
import numpy as np
import torch

def one_arg(x):
    return x.sum()

def wrong_shape(x, t, reduction="mean", **kw):
    return x.sum() if reduction == "none" else x[:2]

def wrong_dtype(x, t, reduction="mean", **kw):
    out = torch.nn.functional.binary_cross_entropy_with_logits(x.double(), t.double(), reduction=reduction)
    return out

def raises(x, t, reduction="mean", **kw):
    raise ZeroDivisionError("my bug")

def not_a_tensor(x, t, reduction="mean", **kw):
    return 1.5

def hangs(x, t, reduction="mean", **kw):
    time.sleep(60)

def busy(x, t, reduction="mean", **kw):
    while True:
        pass

def oom_cuda(x, t, reduction="mean", **kw):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

def oom_host(x, t, reduction="mean", **kw):
    np.empty(1 << 50, dtype=np.uint8)  # a real allocation failure: 1 PiB

def wrong_device(x, t, reduction="mean", **kw):
    return torch.zeros(x.shape if reduction == "none" else (), device="meta")

def np_int(x, t, reduction="mean"):
    return np.ones(x.shape, dtype=np.int64) if reduction == "none" else np.int64(1)

def np_no_grad(x, t, reduction="mean"):
    loss = np.logaddexp(0, np.where(t > 0.5, -x, x)).astype(x.dtype)
    return loss if reduction == "none" else np.asarray(loss.mean(), dtype=x.dtype)
'''

CASES = {
    "one_arg": "cannot be called as fn(input, target, reduction)",
    "wrong_shape": "reduction='none' returned shape (), expected (16,)",
    "wrong_dtype": "returned torch.float64, expected torch.float32",
    "raises": "ZeroDivisionError: my bug",
    "not_a_tensor": "returned float, not a tensor",
    "hangs": "timeout: hangs (evaluation) took longer than the 0.5 s timeout",
    "busy": "timeout: busy (evaluation) took longer than the 0.5 s timeout",
    "oom_cuda": "out of memory: OutOfMemoryError: CUDA out of memory",
    "oom_host": "out of memory: MemoryError",
    "wrong_device": "reduction='none' returned a tensor on meta, expected cpu",
}


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "broken.py").write_text(BROKEN)
    custom = "".join(f"  - {{function: '{tmp / 'broken.py'}:{n}'}}\n" for n in CASES) + \
        f"  - {{function: '{tmp / 'broken.py'}:np_int', api: numpy}}\n" + \
        f"  - {{function: '{tmp / 'broken.py'}:np_no_grad', api: numpy}}\n"
    text = BASE.format(name="broken", loss="bce_with_logits").replace("dtypes: [float32, float16]", "dtypes: [float32]") \
        .replace("scales: [1, 100]", "scales: [1]") + "timeout: 0.5\ncustom:\n" + custom
    result, data, _ = _bench(tmp, text, name="broken")
    return result, data


def test_broken_callables_do_not_stop_the_sweep(broken_run):
    result, data = broken_run
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    recs = data["records"]
    assert {r["impl"]: r["status"] for r in recs if r["impl"] in ("naive", "stable", "torch")} == \
        {"naive": "ok", "stable": "ok", "torch": "ok"}
    assert len(recs) == 2 * (3 + len(CASES) + 2)  # two value sets, every implementation at each


@pytest.mark.parametrize("impl,message", list(CASES.items()))
def test_each_broken_callable_gets_a_clear_error_at_each_point(broken_run, impl, message):
    _, data = broken_run
    mine = _custom(data["records"], impl)
    assert len(mine) == 2
    for r in mine:
        assert r["status"] == "error" and message in r["message"], r["message"]
        assert "\n" not in r["message"]


def test_a_numpy_implementation_returning_integers_is_an_error(broken_run):
    _, data = broken_run
    for r in _custom(data["records"], "np_int"):
        assert r["status"] == "error" and "returned a int64 loss, expected floating values" in r["message"]


def test_a_numpy_implementation_without_gradient_is_audited_forward_only(broken_run):
    _, data = broken_run
    mine = _custom(data["records"], "np_no_grad")
    assert mine and all(r["status"] == "ok" and r["backward"] is None for r in mine)
    assert all(r["message"].startswith("forward only: ") for r in mine)
    normal = next(r for r in mine if r["distribution"] == "normal")
    assert normal["forward"]["max_ulp"] <= 4  # logaddexp is accurate: its forward is measured


def test_a_failure_after_the_timeout_leaves_no_alarm_behind(broken_run):
    import signal
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("spec,fragment", [
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    ("missing/file.py:fn", "file 'missing/file.py' not found"),
    ("{dir}/ok.py:nope", "has no attribute 'nope'"),
    ("{dir}/ok.py:VALUE", "is a int, not a callable"),
    ("{dir}/bad.py:fn", "cannot import"),
    ("no-colon", "bad value 'no-colon'"),
])
def test_a_custom_implementation_that_cannot_be_loaded_is_a_one_line_error(tmp_path, spec, fragment):
    (tmp_path / "ok.py").write_text("VALUE = 3\ndef fn(x, t, reduction='mean'):\n    return x.sum()\n")
    (tmp_path / "bad.py").write_text("raise RuntimeError('import-time failure')\n")
    spec = spec.format(dir=tmp_path)
    result, data, _ = _bench(tmp_path, BASE.format(name="c", loss="bce"), "--impl", spec)
    assert_one_error_line(result, fragment)
    assert data is None  # refused before the sweep: nothing measured, nothing written


def test_config_errors_for_custom_entries(tmp_path):
    for entry, fragment in [("{function: 'a.py:f', api: jax}", "custom[0].api"),
                            ("{function: 'a.py:f', losses: [hinge]}", "custom[0].losses"),
                            ("{function: 'a.py:f', name: stable}", "built-in implementation's name"),
                            ("{function: 'a.py:f', colour: red}", "custom[0].colour")]:
        result, _, _ = _bench(tmp_path, BASE.format(name="c", loss="bce") + f"custom:\n  - {entry}\n")
        assert_one_error_line(result, fragment)


def test_code_is_imported_only_when_a_config_or_flag_names_it(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "spy.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "import torch.nn.functional as F\n"
        "def fn(x, t, reduction='mean', **kw):\n    return F.binary_cross_entropy(x, t, reduction=reduction)\n")
    result, _, out = _bench(tmp_path, BASE.format(name="c", loss="bce"), "--impl", f"{tmp_path}/spy.py:fn")
    assert result.exit_code == 0 and marker.exists()
    marker.unlink()
    # Re-rendering the report of a run that named the code does not import it again.
    result = CliRunner().invoke(main, ["report", str(out / "c.json"), "--no-plots"])
    assert result.exit_code == 0 and not marker.exists()
    result, _, _ = _bench(tmp_path, BASE.format(name="c", loss="bce"))
    assert result.exit_code == 0 and not marker.exists()


# ---- memory ---------------------------------------------------------------------------------------

def test_every_measured_point_reports_its_peak_memory(broken_run):
    _, data = broken_run
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        m = r["memory"]
        assert m["peak_bytes"] >= m["baseline_bytes"] > 0 and "RSS" in m["measure"]
        assert m["setup_peak_bytes"] > 0


def test_a_point_that_cannot_fit_is_skipped_with_its_estimate(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSCHECK_MEMORY_LIMIT", "100K")
    result, data, _ = _bench(tmp_path, BASE.format(name="c", loss="cross_entropy"))
    assert result.exit_code == 0, result.stderr
    recs = data["records"]
    # 16 × 5 float32 values: 6 copies = 1920 B, float16 960 B, plus the cached float64 input: they fit;
    # the same config at 512 × 128000 does not.
    assert all(r["status"] == "ok" for r in recs)
    big = BASE.format(name="c", loss="cross_entropy").replace("batch_sizes: [16]", "batch_sizes: [512]") \
        .replace("classes: [5]", "classes: [128000]").replace("scales: [1, 100]", "scales: [1]")
    result, data, _ = _bench(tmp_path, big)
    assert result.exit_code == 0
    for r in data["records"]:
        assert r["status"] == "skipped", r
        assert r["message"].startswith("needs about ") and "available on cpu" in r["message"]
    assert "1.46 GiB" in data["records"][0]["message"]  # 512·128000·4 B · 6 copies (float32)


def test_a_malformed_memory_limit_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSCHECK_MEMORY_LIMIT", "lots")
    result, _, _ = _bench(tmp_path, BASE.format(name="c", loss="bce"))
    assert_one_error_line(result, "LOSSCHECK_MEMORY_LIMIT")


def test_an_out_of_memory_while_building_a_point_is_recorded(monkeypatch):
    cfg = parse_config(BASE.format(name="c", loss="bce").replace("scales: [1, 100]", "scales: [1]"), "<t>")

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated: cannot allocate the reference")

    monkeypatch.setattr(sweep, "reference", no_memory)
    records = sweep.run(cfg, 1)
    assert len(records) == 12 and all(r["status"] == "error" for r in records)
    assert all(r["message"].startswith("out of memory while building the point: MemoryError") for r in records)


def test_timeout_can_be_disabled_and_is_validated(tmp_path):
    assert parse_config(BASE.format(name="c", loss="bce") + "timeout: null\n", "<t>").timeout is None
    result, _, _ = _bench(tmp_path, BASE.format(name="c", loss="bce") + "timeout: -1\n")
    assert_one_error_line(result, "timeout", "positive number of seconds")


assert sys.version_info >= (3, 10)


def test_an_implementation_writing_into_its_input_does_not_corrupt_the_next(tmp_path):
    # Regression (issue 16): one that changed its input in place made a correct one after it
    # 28 bits off at the same point. Custom implementations run in their order after the
    # built-in ones: the vandal first, then a correct one, whose records must be those of a
    # run without the vandal.
    vandal = tmp_path / "vandal.py"
    vandal.write_text("import torch.nn.functional as F\n\n"
                      "def vandal(x, y, reduction='mean', **options):\n"
                      "    out = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **options)\n"
                      "    x.data.mul_(3.0)\n"
                      "    y.data.fill_(0.5)\n"
                      "    return out\n")
    good = EXAMPLES / "custom_bce_with_logits.py"
    cfg = BASE.format(name="c", loss="bce_with_logits").replace(
        "implementations: [naive, stable, torch]", "implementations: [torch]")
    with_vandal = cfg + (f"custom:\n  - {{name: vandal, function: '{vandal}:vandal'}}\n"
                         f"  - {{name: good, function: '{good}:bce_with_logits'}}\n")
    alone = cfg + f"custom:\n  - {{name: good, function: '{good}:bce_with_logits'}}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result, data, _ = _bench(tmp_path / "a", with_vandal)
    assert result.exit_code == 0, result.stderr
    result, clean, _ = _bench(tmp_path / "b", alone)
    assert result.exit_code == 0, result.stderr

    def good_numbers(d):
        return [(r["scale"], r["dtype"], r["distribution"], r["forward"], r["backward"])
                for r in d["records"] if r["impl"] == "good"]
    assert good_numbers(data) == good_numbers(clean) and good_numbers(clean)


def test_an_implementation_calling_sys_exit_is_an_error_of_its_point(tmp_path):
    # Regression (issue 16): SystemExit from audited code ended bench (and the gate) with exit 0.
    quitter = tmp_path / "quitter.py"
    quitter.write_text("import sys\n\ndef quitter(x, y, reduction='mean', **options):\n    sys.exit(0)\n")
    cfg = BASE.format(name="c", loss="bce_with_logits")
    cfg += f"custom:\n  - {{name: quitter, function: '{quitter}:quitter', losses: [bce_with_logits]}}\n"
    result, data, _ = _bench(tmp_path, cfg)
    assert result.exit_code == 0, result.stderr
    mine = [r for r in data["records"] if r["impl"] == "quitter"]
    assert mine and all(r["status"] == "error" and r["message"].startswith("SystemExit") for r in mine
                        if r["status"] != "skipped")
    assert any(r["status"] == "ok" for r in data["records"] if r["impl"] == "torch")
