"""The `torch_compile` family: compiled values against the reference, compile time recorded and
kept out of the timing, a failed compilation and a fallback to eager skipped with the reason."""
from __future__ import annotations

import pytest
import torch

from losscheck import config as C, families, sweep
from losscheck.families import Family, registered, torch_compile as TC
from losscheck.losses import LOSSES

needs_compiler = pytest.mark.skipif(TC.FAMILY.unavailable() is not None, reason="no C++ compiler for Inductor")

POINTS = {"name": "tc", "losses": ["bce_with_logits"], "scales": [1, 30], "batch_sizes": [32],
          "dtypes": ["float32", "float16"], "devices": ["cpu"], "distributions": ["normal"], "seed": 0,
          "timing": {"min_run_time": 0.002, "scales": [1]}}


@pytest.fixture(autouse=True)
def _cold_compiler():
    """Each test starts with nothing compiled in this process: the probe's and other tests'
    compiled graphs (the family keeps them for the process) would serve these points."""
    TC._COMPILED.clear()
    torch._dynamo.reset()
    yield


def _run(impls, **over):
    cfg = C.Config.from_mapping({**POINTS, "implementations": impls, **over}, "tc.yaml")
    return sweep.run(cfg, 1)


def _family(name, make_eager, backend):
    """A family compiling `make_eager(loss)` with `backend` (declared in the test only)."""
    return Family(name, "framework", "test", lambda loss: TC.Compiled(make_eager(loss), name, backend), order=95,
                  default=False)


@needs_compiler
def test_compiled_torch_against_the_reference_with_compile_time_out_of_the_timing():
    records = _run(["torch", "torch_compile"])
    tc = [r for r in records if r["impl"] == "torch_compile"]
    assert [r["status"] for r in tc] == ["ok"] * 4, [r["message"] for r in tc]
    assert {r["kind"] for r in tc} == {"framework"}
    for r in tc:
        # Correctly rounded or nearly so at scale 1; the reference is the certified one.
        if r["scale"] == 1:
            assert r["forward"]["max_ulp"] <= 4 and r["backward"]["max_ulp"] <= 4, r
    first = {r["dtype"]: r for r in tc if r["scale"] == 1}
    for dtype, r in first.items():
        c = r["compile"]
        # This point compiled its three graphs (no autograd "none", the mean with its backward, and
        # the timed forward of the mean), in seconds; the next point of the dtype reuses them.
        assert c["graphs"] == 3 and c["seconds"] > 0.05 and c["graph_breaks"] == 0 and c["fallback"] is None
        assert "compiled_while_timed" not in c
        t = r["timing"]
        # Timed after compilation: every block and the calibration are of the compiled code.
        assert max(t["backward_times_s"]) < c["seconds"] / 5 and t["backward_calibration_s"] < c["seconds"] / 5
    later = [r for r in tc if r["scale"] == 30]
    assert all(r["compile"]["graphs"] == 0 and r["compile"]["seconds"] == 0 for r in later)
    # The eager records carry no compile field.
    assert not any("compile" in r for r in records if r["impl"] == "torch")


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernel for this dtype on this device\nsecond line of the compiler's report")


def test_a_failing_compilation_is_skipped_with_the_compilers_one_line_reason():
    fam = _family("broken_compile", lambda loss: loss.implementations["torch"].fn, _failing_backend)
    with registered(fam):
        records = _run(["stable", "broken_compile"])
    broken = [r for r in records if r["impl"] == "broken_compile"]
    assert {r["status"] for r in broken} == {"skipped"}
    for r in broken:
        assert r["message"].startswith("torch.compile failed: ") and "no kernel for this dtype" in r["message"]
        assert "\n" not in r["message"] and r["forward"] is None and r["timing"] is None
    assert {r["status"] for r in records if r["impl"] == "stable"} == {"ok"}


def test_hitting_the_recompile_limit_is_a_recorded_fallback_never_compiled(monkeypatch):
    def make_eager(loss):
        torch_fn = loss.implementations["torch"].fn

        def fresh(x, target, reduction="mean", **options):  # a code object of its own: a fresh cache
            return torch_fn(x, target, reduction, **options)

        return fresh

    # One graph allowed: float32's first graph compiles, everything after it hits the limit.
    monkeypatch.setattr(TC, "RECOMPILE_LIMIT", 1)
    with registered(_family("tight_compile", make_eager, "eager")):
        records = _run(["tight_compile"], scales=[1], dtypes=["float32", "float16"])
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    for r in records:
        assert r["message"].startswith("torch.compile fell back to eager: recompile limit (1) hit")
        assert r["compile"]["fallback"].startswith("recompile limit (1)")
        assert r["forward"] is None and r["timing"] is None


def test_compilation_while_timed_drops_the_timing():
    loss = LOSSES["bce_with_logits"]
    torch_fn = loss.implementations["torch"].fn

    def fresh(x, target, reduction="mean", **options):
        return torch_fn(x, target, reduction, **options)

    c = TC.Compiled(fresh, "test", "eager")
    x, y = torch.randn(8), torch.randint(0, 2, (8,)).float()
    c.prepare(x, y, "mean", {})
    first = c.take_record()
    assert first["compile"]["graphs"] == 2 and "timing" not in first and first["compile"]["seconds"] > 0
    c.prepare(x, y, "mean", {})  # nothing new to compile
    c(x.half(), y.half(), "mean")  # a new dtype while "being timed": a compilation inside the timing
    rec = c.take_record()
    assert rec["compile"]["compiled_while_timed"] is True and rec["timing"] is None


def test_unavailable_without_a_cxx_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    why = TC.FAMILY.unavailable()
    assert why and "C++ compiler" in why
    assert families.get("torch_compile") is TC.FAMILY and not TC.FAMILY.default


def test_mps_points_are_skipped_as_unsupported():
    assert TC.FAMILY.unsupported("float32", "mps") == "torch_compile does not run on mps (runs on cpu, cuda)"
    assert TC.FAMILY.unsupported("bfloat16", "cuda:1") is None


def test_graph_breaks_are_counted_and_said():
    def broken(x, target, reduction="mean", **options):
        y = torch.nn.functional.softplus(-x)
        torch._dynamo.graph_break()  # the rest runs as a second graph; the break itself eagerly
        return (y + (1 - target) * x).mean() if reduction == "mean" else y + (1 - target) * x

    c = TC.Compiled(broken, "test", "eager")
    x, y = torch.randn(8), torch.randint(0, 2, (8,)).float()
    assert torch.allclose(c(x, y, "mean"), broken(x, y, "mean"))
    rec = c.take_record()
    assert rec["compile"]["graph_breaks"] >= 1 and rec["compile"]["fallback"] is None
    assert rec["message"].startswith("partly eager: ") and "skip" not in rec


@needs_compiler
def test_the_compile_record_comes_back_from_a_worker_process():
    """`isolation: process`: compiled in the worker before timing, its `compile` field carried
    back (it was lost: the parent's RemoteFn had neither prepare nor take_record)."""
    records = _run(["torch_compile"], dtypes=["float32"], isolation="process")
    assert [r["status"] for r in records] == ["ok", "ok"], [r["message"] for r in records]
    first, later = records
    c = first["compile"]
    assert c["graphs"] == 3 and c["seconds"] > 0.05 and c["graph_breaks"] == 0 and c["fallback"] is None
    assert "compiled_while_timed" not in c
    # Prepared (compiled) in the worker before timing: the timed blocks are of the compiled code.
    assert max(first["timing"]["backward_times_s"]) < c["seconds"] / 5
    assert later["compile"]["graphs"] == 0 and later["compile"]["seconds"] == 0


def test_a_worker_is_asked_for_its_record_before_its_hooks_are_known():
    """A point whose evaluation was skipped (a fallback to eager) taught the parent nothing: the
    worker is asked all the same, so that the fallback is recorded and its state reset."""
    from losscheck import worker

    w = worker.Worker("torch_compile")
    try:
        w.ready()
        fn = worker.RemoteFn(w, "bce_with_logits")
        assert fn.take_record()["compile"] == {"seconds": 0.0, "graphs": 0, "graph_breaks": 0, "fallback": None}
        w.hooks["bce_with_logits"] = ()  # learnt from an evaluation: nothing to ask
        assert fn.take_record() is None
    finally:
        w.stop()


def test_a_worker_that_died_is_not_started_again_to_report():
    from losscheck import worker

    w = worker.Worker("torch_compile")
    fn = worker.RemoteFn(w, "bce_with_logits")
    w.hooks["bce_with_logits"] = ("prepare", "take_record")  # as learnt from an evaluation
    assert fn.take_record() is None and w.starts == 0
