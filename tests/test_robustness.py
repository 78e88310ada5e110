"""Robustness of the long-running paths: interrupt and --resume, --shard and `merge`,
incremental writing of the results file, and fuzzed (damaged) results files.

`test_minimal_crash` keeps the minimal reproducers of crashes found by fuzzing (all fixed:
the loader now rejects each with a one-line error) as regression guards.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import assert_one_error_line
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from losscheck import bench_run, cli, results, sweep
from losscheck.cli import main
from losscheck.config import parse_config

# The tiny sweep has 48 cases (3 implementations each, 144 points); half are cuda points.
TINY_CASES = 48

# Fast and timing-free: 12 cases, 36 points, cpu only.
FAST_CONFIG = """\
name: fast
losses: [bce, bce_with_logits, cross_entropy]
implementations: [naive, stable, torch]
scales: [1, 100]
batch_sizes: [8]
classes: [3]
dtypes: [float32, float16]
devices: [cpu]
distributions: [normal]
seed: 0
timing: false
"""
FAST_CASES = 12
_REAL_RUN_CASE = sweep.run_case


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _bench(runner, cfg_path, out, *extra):
    return runner.invoke(main, ["bench", str(cfg_path), "--out", str(out), "--no-progress", "--no-plots", *extra])


def _raw(path) -> dict:
    """The file as stored (non-finite values stay the strings "inf"/"nan", so == works)."""
    return json.loads(path.read_text())


def _untimed(records: list[dict]) -> str:
    """The records without their `timing` and `memory` sections (measurements that vary from run
    to run), in file order, as one comparable text."""
    return json.dumps([{k: v for k, v in r.items() if k not in ("timing", "memory")} for r in records], sort_keys=True)


def _keys(records) -> list[tuple]:
    return [results.record_key(r) for r in records]


def _counting_run_case(monkeypatch, interrupt_after: int | None = None) -> list:
    """Wrap sweep.run_case: record each case run; raise KeyboardInterrupt instead of running
    case number `interrupt_after` (0-based), i.e. after that many finished cases."""
    real = _REAL_RUN_CASE  # not sweep.run_case: that may be an earlier wrapper of this test
    ran = []

    def wrapper(config, case, *args, **kwargs):
        if interrupt_after is not None and len(ran) == interrupt_after:
            raise KeyboardInterrupt
        ran.append(case.index)
        return real(config, case, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_case", wrapper)
    return ran


def _no_traceback(result):
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


# ---- the reference: the tiny sweep once, uninterrupted, unsharded ----------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_text):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _write(tmp, "tiny.yaml", tiny_config_text)
    result = _bench(CliRunner(), cfg, tmp / "A")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = _raw(tmp / "A" / "tiny.json")
    assert data["complete"] is True and len(data["records"]) == 3 * TINY_CASES
    return cfg, data


# ---- 1. interrupted, then resumed --------------------------------------------------------------

def test_interrupted_run_resumed_redoes_nothing_and_equals_the_uninterrupted_run(
        runner, tmp_path, monkeypatch, reference):
    cfg, ref = reference
    out = tmp_path / "B"
    k = 5
    ran = _counting_run_case(monkeypatch, interrupt_after=k)
    result = _bench(runner, cfg, out)
    assert result.exit_code == 130, (result.stdout, result.stderr)
    _no_traceback(result)
    assert f"interrupted: writing the {3 * k} finished points (continue with --resume)" in result.stderr
    assert ran == list(range(k))

    partial = results.load(out / "tiny.json")  # a valid results file
    assert partial["complete"] is False
    assert {r["index"] for r in partial["records"]} == set(range(k))
    raw = _raw(out / "tiny.json")
    assert _untimed(raw["records"]) == _untimed(ref["records"][:3 * k])
    assert "**Incomplete run**" in (out / "tiny.md").read_text()

    ran = _counting_run_case(monkeypatch)
    result = _bench(runner, cfg, out, "--resume")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    assert ran == list(range(k, TINY_CASES))  # only the remaining cases, none redone
    assert result.stdout.startswith(f"{3 * TINY_CASES} points (")
    resumed = _raw(out / "tiny.json")
    assert resumed["complete"] is True
    assert _untimed(resumed["records"]) == _untimed(ref["records"])
    assert "**Incomplete run**" not in (out / "tiny.md").read_text()


def test_resume_of_a_complete_run_runs_nothing(runner, tmp_path, monkeypatch):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    assert _bench(runner, cfg, tmp_path / "out").exit_code == 0
    before = _raw(tmp_path / "out" / "fast.json")
    ran = _counting_run_case(monkeypatch)
    result = _bench(runner, cfg, tmp_path / "out", "--resume")
    assert result.exit_code == 0, result.stderr
    assert ran == []
    after = _raw(tmp_path / "out" / "fast.json")
    assert after["complete"] is True and after["records"] == before["records"]


def test_resume_twice_after_two_interrupts(runner, tmp_path, monkeypatch):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    out = tmp_path / "out"
    _counting_run_case(monkeypatch, interrupt_after=3)
    assert _bench(runner, cfg, out).exit_code == 130
    ran = _counting_run_case(monkeypatch, interrupt_after=4)
    assert _bench(runner, cfg, out, "--resume").exit_code == 130
    assert ran == [3, 4, 5, 6]
    assert len(_raw(out / "fast.json")["records"]) == 3 * 7
    ran = _counting_run_case(monkeypatch)
    assert _bench(runner, cfg, out, "--resume").exit_code == 0
    assert ran == list(range(7, FAST_CASES))
    data = _raw(out / "fast.json")
    assert data["complete"] is True
    assert [r["index"] for r in data["records"]] == [i for i in range(FAST_CASES) for _ in range(3)]


# ---- 2. --resume: another config, no file ---------------------------------------------------

def test_resume_with_another_config_exits_2_and_leaves_the_file(runner, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _bench(runner, _write(tmp_path, "fast.yaml", FAST_CONFIG), out).exit_code == 0
    before = (out / "fast.json").read_bytes()
    other = _write(tmp_path, "other.yaml", FAST_CONFIG.replace("seed: 0", "seed: 1"))
    ran = _counting_run_case(monkeypatch)
    result = _bench(runner, other, out, "--resume")
    assert_one_error_line(result, str(out / "fast.json"), "another config", "--resume")
    assert result.stdout == ""
    assert ran == []
    assert (out / "fast.json").read_bytes() == before


def test_resume_without_a_file_runs_everything(runner, tmp_path, monkeypatch):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    ran = _counting_run_case(monkeypatch)
    result = _bench(runner, cfg, tmp_path / "out", "--resume")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    assert ran == list(range(FAST_CASES))
    data = _raw(tmp_path / "out" / "fast.json")
    assert data["complete"] is True and len(data["records"]) == 3 * FAST_CASES
    # The same as a run without --resume.
    assert _bench(runner, cfg, tmp_path / "plain").exit_code == 0
    assert _untimed(data["records"]) == _untimed(_raw(tmp_path / "plain" / "fast.json")["records"])


def test_resume_after_an_interrupt_in_the_middle_of_a_case_has_no_duplicate_point(runner, tmp_path, monkeypatch):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    out = tmp_path / "out"
    real_tick = bench_run._Incremental.tick
    ticks = []

    def tick(self):
        ticks.append(1)
        if len(ticks) == 4:  # after the first record of the second case (Ctrl-C while saving)
            raise KeyboardInterrupt
        real_tick(self)

    monkeypatch.setattr(bench_run._Incremental, "tick", tick)
    assert _bench(runner, cfg, out).exit_code == 130
    assert len(_raw(out / "fast.json")["records"]) == 4
    monkeypatch.undo()
    assert _bench(runner, cfg, out, "--resume").exit_code == 0
    keys = _keys(_raw(out / "fast.json")["records"])
    assert len(keys) == len(set(keys)) == 3 * FAST_CASES


def test_resume_of_a_file_without_index_is_not_a_crash(runner, tmp_path, monkeypatch):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    out = tmp_path / "out"
    _counting_run_case(monkeypatch, interrupt_after=2)
    assert _bench(runner, cfg, out).exit_code == 130
    monkeypatch.undo()
    data = _raw(out / "fast.json")
    for r in data["records"]:
        del r["index"]
    (out / "fast.json").write_text(json.dumps(data))
    result = _bench(runner, cfg, out, "--resume")
    _no_traceback(result)
    assert result.exit_code in (0, 2)


# ---- 3. shards and merge ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory, reference):
    cfg, _ = reference
    out = tmp_path_factory.mktemp("shards")
    for shard in ("1/2", "2/2"):
        result = _bench(CliRunner(), cfg, out, "--shard", shard)
        assert result.exit_code == 0, (result.stdout, result.stderr)
    return out / "tiny.shard-1-of-2.json", out / "tiny.shard-2-of-2.json"


def test_shards_are_disjoint_halves_whose_union_is_the_sweep(shards, reference):
    _, ref = reference
    one, two = shards
    assert sorted(p.name for p in one.parent.iterdir()) == [
        "tiny.shard-1-of-2.json", "tiny.shard-1-of-2.md", "tiny.shard-2-of-2.json", "tiny.shard-2-of-2.md"]
    a, b = _raw(one), _raw(two)
    assert a["shard"] == [1, 2] and b["shard"] == [2, 2]
    assert a["complete"] is True and b["complete"] is True
    assert "--shard 1/2" in a["command"]
    assert {r["index"] for r in a["records"]} == set(range(0, TINY_CASES, 2))
    assert {r["index"] for r in b["records"]} == set(range(1, TINY_CASES, 2))
    ka, kb = set(_keys(a["records"])), set(_keys(b["records"]))
    assert len(ka) == len(kb) == 3 * TINY_CASES // 2
    assert not ka & kb
    assert ka | kb == set(_keys(ref["records"]))
    by_key = {results.record_key(r): r for r in ref["records"]}
    assert _untimed(a["records"]) == _untimed([by_key[k] for k in _keys(a["records"])])


def test_a_shard_run_twice_gives_the_same_records(runner, tmp_path, shards, reference):
    cfg, _ = reference
    result = _bench(runner, cfg, tmp_path, "--shard", "1/2")
    assert result.exit_code == 0, result.stderr
    assert _untimed(_raw(tmp_path / "tiny.shard-1-of-2.json")["records"]) == _untimed(_raw(shards[0])["records"])


def test_selected_shards_partition_the_cases(tiny_config_text):
    cfg = parse_config(tiny_config_text, "tiny.yaml")
    every = [c.index for c in sweep.cases(cfg)]
    assert every == list(range(TINY_CASES))
    for n in (1, 2, 3, 5, 47, 48, 60):
        parts = [[c.index for c in sweep.selected(cfg, (i, n))] for i in range(1, n + 1)]
        assert sorted(sum(parts, [])) == every
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sweep.count_points(cfg, (1, 2)) + sweep.count_points(cfg, (2, 2)) == sweep.count_points(cfg)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["1,2", "2,1"])
def test_merge_of_all_shards_equals_the_unsharded_run(runner, tmp_path, shards, reference, order):
    _, ref = reference
    out = tmp_path / "all.json"
    paths = [str(shards[i]) for i in order]
    result = runner.invoke(main, ["merge", *paths, "-o", str(out), "--no-plots"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    assert result.stdout == f"merged 2 files, {3 * TINY_CASES} points, complete -> {out}\n"
    merged = _raw(out)
    assert merged["complete"] is True
    assert merged["config"] == ref["config"]
    assert _untimed(merged["records"]) == _untimed(ref["records"])
    assert (tmp_path / "all.md").is_file()
    assert "**Incomplete run**" not in (tmp_path / "all.md").read_text()
    results.load(out)


def test_merge_of_one_of_two_shards_is_incomplete(runner, tmp_path, shards):
    out = tmp_path / "half.json"
    result = runner.invoke(main, ["merge", str(shards[1]), "-o", str(out), "--no-plots"])
    assert result.exit_code == 0, result.stderr
    assert "incomplete" in result.stdout
    assert _raw(out)["complete"] is False
    assert "**Incomplete run**" in (tmp_path / "half.md").read_text()


def test_merge_of_an_interrupted_shard_is_incomplete(runner, tmp_path, monkeypatch, shards, reference):
    cfg, _ = reference
    _counting_run_case(monkeypatch, interrupt_after=2)
    assert _bench(runner, cfg, tmp_path, "--shard", "2/2").exit_code == 130
    result = runner.invoke(main, ["merge", str(shards[0]), str(tmp_path / "tiny.shard-2-of-2.json"),
                                  "-o", str(tmp_path / "m.json"), "--no-plots"])
    assert result.exit_code == 0, result.stderr
    assert "incomplete" in result.stdout
    assert _raw(tmp_path / "m.json")["complete"] is False


@pytest.mark.parametrize("bad", ["0/2", "3/2", "x", "1/0", "1/2/3", "-1/2", "", "1.5/2"])
def test_bad_shard_is_a_usage_error(runner, tmp_path, bad):
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    result = _bench(runner, cfg, tmp_path / "out", "--shard", bad)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Invalid value for '--shard'" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


# ---- 4. merge refuses --------------------------------------------------------------------------

def _merge(runner, tmp_path, *paths):
    return runner.invoke(main, ["merge", *map(str, paths), "-o", str(tmp_path / "m.json"), "--no-plots"])


def test_merge_refuses_shards_of_different_configs(runner, tmp_path):
    a = _write(tmp_path, "a.yaml", FAST_CONFIG)
    b = _write(tmp_path, "b.yaml", FAST_CONFIG.replace("seed: 0", "seed: 1"))
    assert _bench(runner, a, tmp_path / "a", "--shard", "1/2").exit_code == 0
    assert _bench(runner, b, tmp_path / "b", "--shard", "2/2").exit_code == 0
    second = tmp_path / "b" / "fast.shard-2-of-2.json"
    result = _merge(runner, tmp_path, tmp_path / "a" / "fast.shard-1-of-2.json", second)
    assert_one_error_line(result, str(second), "another config")
    assert result.stdout == "" and not (tmp_path / "m.json").exists()


def test_merge_refuses_a_future_schema_version(runner, tmp_path, shards):
    data = _raw(shards[1])
    data["schema_version"] = 99
    bad = _write(tmp_path, "bad.json", json.dumps(data))
    result = _merge(runner, tmp_path, shards[0], bad)
    assert_one_error_line(result, str(bad), "schema_version 99 is not supported")
    assert not (tmp_path / "m.json").exists()


def test_merge_refuses_the_same_point_twice(runner, tmp_path, shards):
    copy_ = tmp_path / "copy.json"
    shutil.copy(shards[0], copy_)
    result = _merge(runner, tmp_path, shards[0], copy_)
    first = _raw(shards[0])["records"][0]
    assert_one_error_line(result, str(copy_), f"point {results.record_key(first)}", f"is also in {shards[0]}")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("field", ["torch", "numpy", "python", "losscheck"])
def test_merge_refuses_different_versions(runner, tmp_path, shards, field):
    data = _raw(shards[1])
    data["environment"][field] = "0.0.1-other"
    other = _write(tmp_path, "other.json", json.dumps(data))
    result = _merge(runner, tmp_path, shards[0], other)
    assert_one_error_line(result, str(other), f"environment '{field}'", "'0.0.1-other'")
    assert not (tmp_path / "m.json").exists()


def test_merge_function_directly(shards, reference):
    _, ref = reference
    parts = [(str(p), results.load(p)) for p in reversed(shards)]
    merged = results.merge(parts)
    assert merged["complete"] is True and len(merged["environments"]) == 2
    assert _keys(merged["records"]) == _keys(ref["records"])
    assert results.same_config(merged["config"], ref["config"])
    other = copy.deepcopy(ref["config"])
    other["seed"] = 1
    assert not results.same_config(other, ref["config"])


# ---- 5. incremental writing -------------------------------------------------------------------

def test_incremental_writes_are_valid_files_during_the_run(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run._Incremental.__init__, "__defaults__", (0.0,))  # every=0: save at each point
    monkeypatch.setattr(bench_run._Incremental, "DUTY", 0)  # ...however long a write takes
    real_save = results.save
    seen = []

    def spy(data, path, compact=False):
        real_save(data, path, compact)
        loaded = results.load(path)  # each write, read back at once, is a valid results file
        seen.append((len(loaded["records"]), loaded["complete"], sorted(_keys(loaded["records"]))))

    monkeypatch.setattr(results, "save", spy)
    k = 4
    _counting_run_case(monkeypatch, interrupt_after=k)
    cfg = _write(tmp_path, "fast.yaml", FAST_CONFIG)
    result = _bench(runner, cfg, tmp_path / "out")
    assert result.exit_code == 130, result.stderr
    assert len(seen) > 1
    assert [n for n, _, _ in seen] == list(range(1, 3 * k + 1)) + [3 * k]
    assert all(complete is False for _, complete, _ in seen)
    for (_, _, before), (_, _, after) in zip(seen, seen[1:]):
        assert set(before) <= set(after)  # a write never loses a point
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fast.json", "fast.md"]  # no temp files


def test_incremental_saves_at_most_every_interval(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(bench_run.time, "monotonic", lambda: clock[0])
    saves = []
    monkeypatch.setattr(results, "save", lambda data, path, compact=False: saves.append((data, compact)))
    inc = bench_run._Incremental(lambda complete: {"complete": complete}, tmp_path / "r.json", every=2.0)
    inc.tick()
    clock[0] += 1.9
    inc.tick()
    assert saves == []
    clock[0] += 0.2
    inc.tick()
    inc.tick()
    assert saves == [({"complete": False}, True)]  # a partial file: compact
    inc.save(True)
    assert saves[-1] == ({"complete": True}, False)  # the complete one: indented


# ---- 6. fuzzed results files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_base(tiny_results, tmp_path_factory) -> str:
    """A small valid results file as JSON text: a dozen varied records of the tiny sweep
    (timed, untimed, skipped, overflowing) to keep each example fast."""
    data = copy.deepcopy(tiny_results)
    recs = data["records"]
    pick = ([r for r in recs if r["timing"]][:3] + [r for r in recs if r["status"] == "skipped"][:2]
            + [r for r in recs if r["status"] == "ok" and r["forward"]["max_ulp"] == float("inf")][:3]
            + [r for r in recs if r["status"] == "ok" and not r["timing"]][:4])
    data["records"] = list({id(r): r for r in pick}.values())
    # Schema 2 fields with values to damage: options set, another reduction, a sequence length.
    data["records"][0]["options"] = {"weight": "random", "label_smoothing": 0.1}
    data["records"][1]["reduction"] = "sum"
    data["records"][2]["time"] = 16
    path = tmp_path_factory.mktemp("fuzz") / "base.json"
    results.save(data, path)
    return path.read_text()


SCALARS = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers()
           | st.sampled_from([10**20, -10**20, 10**400, -10**400])
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=4) | st.sampled_from(["inf", "-inf", "nan", "ok", "error", "cpu", "float32", "bce"]))


def _json_values(scalars):
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=4)


JSON_VALUES = _json_values(SCALARS)
# Without integers too large for a float (a known crash, see CRASHES "scale-huge" / "max_ulp-huge").
FLOATABLE_VALUES = _json_values(st.none() | st.booleans() | st.integers(-2**63, 2**63)
                                | st.floats(allow_nan=False, allow_infinity=False)
                                | st.text(max_size=4) | st.sampled_from(["inf", "-inf", "nan", "ok", "skipped"]))


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def _kind(v) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def _mutate(data, base_text: str, kinds: tuple[str, ...], path_ok=lambda kind, p: True,
            values=JSON_VALUES) -> str:
    """Apply 1-3 random mutations of `kinds` to the base file; return the text to write."""
    obj = json.loads(base_text)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(kinds), label="kind")
        paths = [p for p in _paths(obj) if path_ok(kind, p)]
        if kind == "delete" and paths:
            path = data.draw(st.sampled_from(paths), label="delete")
            del _parent(obj, path)[path[-1]]
        elif kind == "replace" and paths:
            path = data.draw(st.sampled_from(paths), label="replace")
            old = _parent(obj, path)[path[-1]]
            _parent(obj, path)[path[-1]] = data.draw(values.filter(lambda v: _kind(v) != _kind(old)),
                                                     label="value")
        elif kind == "schema":
            obj["schema_version"] = data.draw(values, label="schema_version")
    text = json.dumps(obj, indent=1)
    if "truncate" in kinds and data.draw(st.booleans(), label="truncate?"):
        text = text[:data.draw(st.integers(0, len(text)), label="cut")]
    return text


def _assert_clean(result, command):
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code in (0, 2), (command, result.exit_code, repr(result.exception), result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def _check_report_and_compare(tmp_path, text):
    path = tmp_path / "fuzzed.json"
    path.write_text(text)
    runner = CliRunner()
    _assert_clean(runner.invoke(main, ["report", str(path), "--stdout"]), "report")
    _assert_clean(runner.invoke(main, ["compare", str(path), str(path)]), "compare")


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _loader_guarded(kind, path) -> bool:
    """Damage results.load is meant to catch: a top-level key or a record key deleted; the
    records list, a record, or a record's status, scale or batch replaced."""
    if len(path) == 1:
        return path[0] not in ("environment", "config")  # their types are not checked: see CRASHES
    if len(path) == 2:
        return path[0] == "records" and kind == "replace"
    return (len(path) == 3 and path[0] == "records"
            and path[2] in (results.RECORD_KEYS if kind == "delete" else ("status", "scale", "batch")))


@FUZZ
@given(data=st.data())
def test_fuzzed_structure_is_exit_0_or_2_never_a_crash(tmp_path, fuzz_base, data):
    """Truncation, schema_version, and deleting top-level keys or the record keys the loader checks."""
    text = _mutate(data, fuzz_base, ("delete", "replace", "schema", "truncate"), path_ok=_loader_guarded,
                   values=FLOATABLE_VALUES)
    _check_report_and_compare(tmp_path, text)


@settings(FUZZ, phases=[Phase.explicit, Phase.generate])  # no shrinking: the minimized cases are below
@given(data=st.data())
def test_fuzzed_anything_is_exit_0_or_2_never_a_crash(tmp_path, fuzz_base, data):
    text = _mutate(data, fuzz_base, ("delete", "replace", "schema", "truncate"))
    _check_report_and_compare(tmp_path, text)


def _first(data, pred) -> dict:
    return next(r for r in data["records"] if pred(r))


def _ok(r):
    return r["status"] == "ok"


def _timed(r):
    return r["status"] == "ok" and r["timing"]


# Minimal mutations of a valid file (each alone, each accepted by results.load) that crash
# `report` and/or `compare` with a traceback (exit 1) instead of exiting 2 with one line.
CRASHES = {
    "environment-list": ("environment = [] (AttributeError: 'list' object has no attribute 'get')",
                         lambda d: d.update(environment=[]), ("report", "compare")),
    "gate-str": ("config.gate = 'x' (AttributeError in gate.policy_from_config)",
                 lambda d: d["config"].update(gate="x"), ("compare",)),
    "dtype-list": ("an ok record's dtype = [] (TypeError: unhashable type: 'list')",
                   lambda d: _first(d, _ok).update(dtype=[]), ("report", "compare")),
    "device-int": ("an ok record's device = 49 (TypeError: '<' between str and int)",
                   lambda d: _first(d, _ok).update(device=49), ("report",)),
    "max_ulp-missing": ("an ok record lacks forward.max_ulp (KeyError: the loader's .get() takes missing as null)",
                        lambda d: _first(d, _ok)["forward"].pop("max_ulp"), ("report",)),
    "max_bits-null": ("a stable ok record's forward.max_bits = null (TypeError in analysis.versus; "
                      "the loader allows null)",
                      lambda d: _first(d, lambda r: _ok(r) and r["impl"] == "stable")["forward"].update(max_bits=None),
                      ("report",)),
    "inf-nan": ("backward.inf = 'nan' (ValueError: int(nan) in analysis.nonfinite; the string becomes a float)",
                lambda d: _first(d, _ok)["backward"].update(inf="nan"), ("report", "compare")),
    "max_ulp-huge": ("backward.max_ulp = 10**400 (OverflowError: int too large to convert to float)",
                     lambda d: _first(d, _ok)["backward"].update(max_ulp=10**400), ("report",)),
    "scale-huge": ("an ok record's scale = 10**400 (OverflowError: int too large to convert to float; "
                   "_is_number accepts it)",
                   lambda d: _first(d, _ok).update(scale=10**400), ("report", "compare")),
    "threads-missing": ("timing.threads missing (TypeError: None < int; timing keys beyond TIMING_KEYS unchecked)",
                        lambda d: _first(d, _timed)["timing"].pop("threads"), ("report",)),
    "int-5000-digits": ("an integer of 5000 digits (ValueError from json.loads is not a JSONDecodeError)",
                        '{"schema_version": ' + "1" * 5000 + "}", ("report", "compare")),
    "deep-nesting": ("deeply nested JSON (RecursionError from json.loads)",
                     "[" * 100000 + "]" * 100000, ("report", "compare")),
}
CRASH_CASES = [pytest.param(name, command, id=f"{name}-{command}")
               for name, (_, _, commands) in CRASHES.items() for command in commands]


@pytest.mark.parametrize("name, command", CRASH_CASES)
def test_minimal_crash(tmp_path, fuzz_base, name, command):
    _, mutation, _ = CRASHES[name]
    if isinstance(mutation, str):
        text = mutation
    else:
        data = json.loads(fuzz_base)
        mutation(data)
        text = json.dumps(data)
    path = _write(tmp_path, "bad.json", text)
    args = ["report", str(path), "--stdout"] if command == "report" else ["compare", str(path), str(path)]
    _assert_clean(CliRunner().invoke(main, args), command)


def test_merge_of_a_file_whose_environment_is_not_an_object(runner, tmp_path, shards):
    data = _raw(shards[1])
    data["environment"] = []
    bad = _write(tmp_path, "bad.json", json.dumps(data))
    assert_one_error_line(_merge(runner, tmp_path, shards[0], bad))


def test_incremental_saves_wait_longer_when_a_write_is_slow(tmp_path, monkeypatch):
    # A write taking 0.5 s pushes the next one DUTY (50) x 0.5 = 25 s away (about 2% of the time).
    clock = [100.0]
    monkeypatch.setattr(bench_run.time, "monotonic", lambda: clock[0])
    saves = []

    def slow_save(data, path, compact=False):
        clock[0] += 0.5
        saves.append(data)

    monkeypatch.setattr(results, "save", slow_save)
    inc = bench_run._Incremental(lambda complete: {"complete": complete}, tmp_path / "r.json", every=2.0)
    clock[0] += 2.0
    inc.tick()
    assert len(saves) == 1
    clock[0] += 24.0
    inc.tick()
    assert len(saves) == 1
    clock[0] += 1.1
    inc.tick()
    assert len(saves) == 2


def test_partial_results_files_are_compact_and_read_back_as_the_indented_ones(tmp_path):
    data = {"records": [{"a": 1.5, "b": float("inf")}], "complete": False}
    results.save(data, tmp_path / "c.json", compact=True)
    results.save(data, tmp_path / "i.json")
    compact, indented = (tmp_path / "c.json").read_text(), (tmp_path / "i.json").read_text()
    assert "\n" not in compact.rstrip("\n") and "\n" in indented.rstrip("\n")
    assert json.loads(compact) == json.loads(indented) == {"records": [{"a": 1.5, "b": "inf"}], "complete": False}


def test_a_gradient_that_was_not_measured_is_no_crash_anywhere(tmp_path, fuzz_base):
    """`backward: null` on an ok record (a numpy implementation returning no gradient) is valid:
    report, plots and the gate must take it (the gate crashed on it once)."""
    data = json.loads(fuzz_base)
    ok = [r for r in data["records"] if r["status"] == "ok"]
    for r in ok[::2]:
        r["backward"] = None
    path = tmp_path / "nograd.json"
    path.write_text(json.dumps(data))
    runner = CliRunner()
    for args in (["report", str(path), "-o", str(tmp_path / "r.md")], ["compare", str(path), str(path)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output, repr(result.exception))
    assert "Traceback" not in result.output


# ---- 7. the findings list: validated on load, derived for files without it -------------------

@pytest.fixture(scope="module")
def findings_base(tiny_results, tmp_path_factory) -> str:
    """A small valid file whose `findings` list has several kinds to damage."""
    from losscheck import findings as F

    data = copy.deepcopy(tiny_results)
    data["records"] = [r for r in data["records"] if r["status"] == "ok"][:24]
    data["findings"] = F.findings(data["records"])
    assert len({f["kind"] for f in data["findings"]}) >= 2
    path = tmp_path_factory.mktemp("findings") / "base.json"
    results.save(data, path)
    return path.read_text()


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: d.update(findings={}), "key 'findings' must be a list"),
    (lambda d: d["findings"].__setitem__(0, 3), "findings[0] is not an object"),
    (lambda d: d["findings"][0].pop("kind"), "findings[0] lacks key 'kind'"),
    (lambda d: d["findings"][0].update(kind="bogus"), "findings[0] kind 'bogus' is not one of formula, overflow"),
    (lambda d: d["findings"][0].update(impl=7), "findings[0] 'impl' must be a string"),
    (lambda d: d["findings"][0].update(evidence=[]), "findings[0] 'evidence' must be an object"),
    (lambda d: d["findings"][0]["evidence"].update(points=-1), "'evidence.points' must be a count"),
    (lambda d: d["findings"][0]["evidence"].update(first_scale="inf"), "'evidence.first_scale' must be a finite"),
    (lambda d: d["findings"][0]["evidence"].update(scales=[[1]]), "'evidence.scales' must be a list"),
])
def test_a_malformed_finding_is_one_line_and_exit_2(runner, tmp_path, findings_base, damage, fragment):
    data = json.loads(findings_base)
    damage(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    for command in (["report", str(path), "--stdout"], ["compare", str(path), str(path)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 2, (command, result.output)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: {path}: ") and fragment in line, line


def test_findings_are_derived_for_a_file_without_them_and_kept_when_present(tmp_path, findings_base):
    data = json.loads(findings_base)
    stored = data["findings"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    assert results.load(path)["findings"] == stored
    # A stored list is the file's verdict, not recomputed (an empty one stays empty).
    path.write_text(json.dumps({**data, "findings": []}))
    assert results.load(path)["findings"] == []
    del data["findings"]
    path.write_text(json.dumps(data))
    assert results.load(path)["findings"] == stored


def _in_findings(kind, path) -> bool:
    return len(path) >= 2 and path[0] == "findings"


@settings(FUZZ, phases=[Phase.explicit, Phase.generate])
@given(data=st.data())
def test_fuzzed_findings_are_exit_0_or_2_never_a_crash(tmp_path, findings_base, data):
    text = _mutate(data, findings_base, ("delete", "replace"), path_ok=_in_findings)
    _check_report_and_compare(tmp_path, text)


# ---- one writer per results file (issue 16) ---------------------------------------------------

def test_a_second_bench_on_the_same_out_is_refused_not_overwriting(runner, tmp_path, tiny_config_text):
    # Regression: two runs on one --out replaced a finished 576-point file by the other's partial one.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config_text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.json").write_text("the first run's results")
    with results.exclusive(out / "tiny.json"):
        result = runner.invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots"])
        assert_one_error_line(result, "tiny.json: another losscheck run is writing it", f"(pid {os.getpid()})")
    assert (out / "tiny.json").read_text() == "the first run's results"
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json"]  # the lock is gone with its holder


def test_an_out_that_cannot_be_written_fails_before_the_sweep(runner, tmp_path, tiny_config_text):
    # Regression: the whole sweep ran, then the write failed with a traceback and exit 1.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config_text)
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    result = runner.invoke(main, ["bench", str(cfg), "--out", str(a_file / "sub"), "--no-progress", "--no-plots"])
    assert_one_error_line(result, "cannot write there")
    assert result.stdout == ""  # no point was run


def test_absurd_thread_counts_are_refused_before_the_sweep(runner, tmp_path, tiny_config_text):
    # Regression: --threads 100000 segfaulted inside torch.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config_text)
    result = runner.invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "out"), "--threads", "100000"])
    assert_one_error_line(result, "--threads 100000: more than 4 × the", "allowed: 1 to")
    assert not (tmp_path / "out").exists()


def test_resume_and_merge_refuse_another_thread_count(runner, tmp_path, tiny_config_text):
    # Regression: a resumed file claimed 2 threads where most of its points used 1.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config_text.replace("timing:\n  min_run_time: 0.001\n  scales: [1]\n", "timing: false\n"))
    out = tmp_path / "out"
    first = runner.invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots", "--threads", "1"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, ["bench", str(cfg), "--out", str(out), "--no-progress", "--no-plots", "--threads", "2",
                                 "--resume"])
    assert_one_error_line(again, "made with threads 1, this is 2", "--resume does not mix")
    other = tmp_path / "other"
    runner.invoke(main, ["bench", str(cfg), "--out", str(other), "--no-progress", "--no-plots", "--threads", "2",
                         "--shard", "1/2"])
    runner.invoke(main, ["bench", str(cfg), "--out", str(other), "--no-progress", "--no-plots", "--threads", "1",
                         "--shard", "2/2"])
    merged = runner.invoke(main, ["merge", str(other / "tiny.shard-1-of-2.json"), str(other / "tiny.shard-2-of-2.json"),
                                  "-o", str(tmp_path / "m.json"), "--no-plots"])
    assert_one_error_line(merged, "environment 'threads' is 1", "thread counts cannot be merged")


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["records"][0].update(dtype="float99"), "records[0]: dtype 'float99' is not one of float64"),
    (lambda d: d["config"].update(thresholds={"float32": "abc"}), "key 'config.thresholds' must map dtypes"),
    (lambda d: d["config"].update(thresholds={"float99": 3}), "key 'config.thresholds' must map dtypes"),
    (lambda d: d["config"].update(thresholds=[1]), "key 'config.thresholds' must map dtypes"),
])
def test_an_unknown_dtype_or_bad_thresholds_in_a_results_file_is_one_line(tmp_path, fuzz_base, damage, message):
    data = json.loads(fuzz_base)
    damage(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    for command in (["report", str(path), "--stdout"], ["compare", str(path), str(path)]):
        assert_one_error_line(CliRunner().invoke(main, command), message)
