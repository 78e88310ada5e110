"""Implementations in worker processes (issue 16, item 1): whatever audited code does —
crash, exit, hang in C, allocate 50 GiB, write into its input, print, chdir, change torch's
global state — its point is an error with the cause, the other points are untouched, and
`bench --baseline` still decides."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from losscheck import memory, sweep, worker
from losscheck.config import config_from_dict
from losscheck.isolation import GlobalState

HOSTILE = Path(__file__).parent / "data" / "hostile.py"
BUILTINS = ("naive", "stable", "torch")
# name -> what its points' messages must say
CAUSES = {
    "segfault": "killed by signal 11 (SIGSEGV) during evaluation",
    "exit0": "exited with status 0 during evaluation",
    "system_exit": "SystemExit: 3",
    "c_hang": "timed out after 5 s during evaluation: its worker process did not answer and was killed",
    "huge": "out of memory: RuntimeError",
    "mutate": "modified its input in place",
    "chdir": "changed the global state (working directory:",
    "torch_state": "changed the global state (torch default dtype: torch.float32 -> torch.float64; "
                   "torch threads: 1 -> ",  # +1 at each of its two calls
}
CONFIG = """\
name: {name}
losses: [bce_with_logits]
implementations: [naive, stable, torch]
scales: [1, 30]
batch_sizes: [64]
dtypes: [float32]
devices: [cpu]
distributions: [normal]
timeout: 2
timing:
  min_run_time: 0.01
  distributions: [normal]
  scales: [1]
"""


def _bench(tmp: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    def limit():  # 50 GiB must fail to allocate, whatever this machine has
        resource.setrlimit(resource.RLIMIT_AS, (32 << 30, 32 << 30))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "losscheck", "bench", f"{name}.yaml", "--out", "out",
                           "--threads", "1", *args], cwd=tmp, capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=900, check=False)


@pytest.mark.slow
def test_hostile_implementations_next_to_the_builtins(tmp_path):
    (tmp_path / "clean.yaml").write_text(CONFIG.format(name="clean"))
    custom = "".join(f"  - {{name: {n}, function: '{HOSTILE}:{n}'}}\n" for n in [*CAUSES, "prints"])
    (tmp_path / "hostile.yaml").write_text(CONFIG.format(name="hostile") + "custom:\n" + custom)
    clean = _bench(tmp_path, "clean")
    assert clean.returncode == 0, clean.stderr
    run = _bench(tmp_path, "hostile", "--baseline", "out/clean.json")
    # The gate ran after the sweep and decided: the hostile implementations (new, custom) are
    # held against torch and fail; the built-ins pass against the baseline.
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    for name in BUILTINS:
        assert any(line.startswith(f"| {name} ") and line.rstrip().endswith("| pass      |")
                   for line in run.stdout.splitlines()), run.stdout
    # What user code printed (Python print and a write to fd 1) is on stderr, not stdout.
    assert "HOSTILE" not in run.stdout and "HOSTILE PRINT" in run.stderr and "HOSTILE FD1" in run.stderr
    records = json.loads((tmp_path / "out" / "hostile.json").read_text())["records"]
    assert len(records) == 2 * (3 + len(CAUSES) + 1)
    for name, cause in CAUSES.items():
        mine = [r for r in records if r["impl"] == name]
        assert len(mine) == 2  # the worker restarted after the first point's crash
        for r in mine:
            assert r["status"] == "error" and cause in r["message"], (name, r["message"])
            assert r["forward"] is None and r["backward"] is None
    printer = [r for r in records if r["impl"] == "prints"]
    assert [r["status"] for r in printer] == ["ok", "ok"]  # printing is allowed, only not on stdout
    # It is F.binary_cross_entropy_with_logits, as torch's: the same numbers, timed in its worker.
    torch_records = [r for r in records if r["impl"] == "torch"]
    assert [r["forward"] for r in printer] == [r["forward"] for r in torch_records]
    assert printer[0]["timing"]["backward_runs"] > 0
    # A chdir in user code did not move the relative --out: the files are where they belong.
    assert (tmp_path / "out" / "hostile.md").is_file()

    def strip(r):  # what depends on the moment: timing and memory
        return {k: v for k, v in r.items() if k not in ("timing", "memory")}
    reference = json.loads((tmp_path / "out" / "clean.json").read_text())["records"]
    builtins = [strip(r) for r in records if r["impl"] in BUILTINS]
    assert json.dumps(builtins, sort_keys=True) == json.dumps([strip(r) for r in reference], sort_keys=True)


def _config(isolation: str, impls=BUILTINS, **extra):
    return config_from_dict({"name": "iso", "losses": ["bce_with_logits"], "implementations": list(impls),
                             "scales": [1, 100], "batch_sizes": [32], "dtypes": ["float32", "bfloat16"],
                             "distributions": ["normal"], "timing": False, "isolation": isolation, **extra})


def _numbers(records):
    return json.dumps([(r["impl"], r["status"], r["forward"], r["backward"]) for r in records], sort_keys=True)


def test_builtins_in_workers_give_the_same_numbers():
    impls = sweep.resolve(_config("process"))
    assert all(isinstance(i.fn, worker.RemoteFn) for row in impls.values() for i in row.values())
    assert [i.kind for i in impls["bce_with_logits"].values()] == ["naive", "stable", "framework"]
    here = sweep.run(_config("none"), 1)
    there = sweep.run(_config("process"), 1, impls=impls)
    assert _numbers(here) == _numbers(there)
    assert all(r["memory"]["peak_bytes"] > 0 for r in there)  # measured in the worker


def test_auto_isolates_custom_only_and_none_nothing():
    spec = [{"name": "prints", "function": f"{HOSTILE}:prints"}]
    auto = sweep.resolve(_config("auto", ("torch",), custom=spec))["bce_with_logits"]
    assert not isinstance(auto["torch"].fn, worker.RemoteFn) and isinstance(auto["prints"].fn, worker.RemoteFn)
    assert auto["prints"].summary == f"{HOSTILE}:prints (custom, torch)"
    none = sweep.resolve(_config("none", ("torch",), custom=spec))["bce_with_logits"]
    assert not isinstance(none["prints"].fn, worker.RemoteFn)


def test_a_custom_module_that_fails_to_import_in_its_worker_is_a_config_error(tmp_path):
    from losscheck.errors import ConfigError
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('nope')\n")
    with pytest.raises(ConfigError, match=r"key 'custom:bad': cannot import .*ImportError: nope"):
        sweep.resolve(_config("auto", ("torch",), custom=[{"name": "bad", "function": f"{bad}:f"}]))


def test_a_worker_is_restarted_after_it_dies():
    impls = sweep.resolve(_config("process", ("torch",)))
    remote = impls["bce_with_logits"]["torch"].fn
    first = sweep.run(_config("process", ("torch",)), 1, impls=impls)
    os.kill(remote.worker._proc.pid, signal.SIGKILL)
    remote.worker._proc.join(10)  # dead before the next point (not killed during one)
    again = sweep.run(_config("process", ("torch",)), 1, impls=impls)
    assert remote.worker.starts == 2
    assert _numbers(first) == _numbers(again)


def test_isolation_key_is_validated():
    from losscheck.errors import ConfigError
    with pytest.raises(ConfigError, match=r"key 'isolation': unknown value 'proces' \(did you mean 'process'\?\); "
                                          r"allowed: auto, process, none"):
        _config("proces")
    written = _config("none").as_dict()
    assert written["isolation"] == "none" and config_from_dict(written).isolation == "none"  # round trip


@pytest.mark.parametrize("code,oom,expected", [
    (-11, False, "killed by signal 11 (SIGSEGV) during evaluation"),
    (-9, False, "killed by signal 9 (SIGKILL) during evaluation"),
    (-9, True, "out of memory (killed by the kernel, signal 9) during evaluation"),
    (0, False, "exited with status 0 during evaluation"),
    (3, True, "exited with status 3 during evaluation"),
])
def test_describe_exit(code, oom, expected):
    assert worker.describe_exit(code, "during evaluation", oom) == expected


def test_oom_kills_read_from_the_process_cgroup(tmp_path, monkeypatch):
    (tmp_path / "proc").write_text("0::/job/step\n")
    (tmp_path / "job" / "step").mkdir(parents=True)
    (tmp_path / "job" / "step" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    monkeypatch.setattr(memory, "_PROC_CGROUP", str(tmp_path / "proc"))
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(tmp_path))
    assert worker._oom_kills() == 2
    (tmp_path / "proc").write_text("4:memory:/v1job\n")
    (tmp_path / "memory" / "v1job").mkdir(parents=True)
    (tmp_path / "memory" / "v1job" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    assert worker._oom_kills() == 7


def test_kill_after_leaves_room_beyond_the_timeout():
    assert worker.kill_after(None) is None
    assert worker.kill_after(2) == 5
    assert worker.kill_after(300) == 331


def test_global_state_is_put_back_and_named(tmp_path):
    state = GlobalState.capture()
    threads = torch.get_num_threads()
    try:
        os.chdir(tmp_path)
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(threads + 1)
        changed = state.restore()
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)
        os.chdir(state.cwd)
    assert changed == [f"working directory: {state.cwd} -> {tmp_path}",
                       "torch default dtype: torch.float32 -> torch.float64",
                       f"torch threads: {threads} -> {threads + 1}"]
    assert GlobalState.capture() == state and state.restore() == []


def test_in_process_a_mutated_input_and_a_chdir_are_errors_and_undone(tmp_path):
    spec = [{"name": n, "function": f"{HOSTILE}:{n}"} for n in ("mutate", "chdir", "prints")]
    cwd = os.getcwd()
    records = sweep.run(_config("none", ("torch",), custom=spec), 1)
    assert os.getcwd() == cwd
    by = {}
    for r in records:
        by.setdefault(r["impl"], []).append(r)
    assert all(r["status"] == "error" and "modified its input in place" in r["message"] for r in by["mutate"])
    assert all(r["status"] == "error" and "working directory" in r["message"] for r in by["chdir"])
    # The implementations after the mutating one got the point's real inputs.
    assert [r["forward"] for r in by["prints"]] == [r["forward"] for r in by["torch"]]


def test_probe_json_stdout_stays_json_when_user_code_prints(tmp_path):
    # In process (probe runs custom code here): print() and writes to fd 1 both go to stderr.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-m", "losscheck", "probe", "bce_with_logits", "--input", "[1.0, 2.0]",
                          "--target", "[1, 0]", "--impl", f"{HOSTILE}:prints", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["loss"] == "bce_with_logits"
    assert "HOSTILE PRINT" in run.stderr and "HOSTILE FD1" in run.stderr


def test_a_worker_dying_while_timed_fails_that_point_only():
    spec = [{"name": "exit_when_timed", "function": f"{HOSTILE}:exit_when_timed"}]
    cfg = config_from_dict({"name": "iso", "losses": ["bce_with_logits"], "implementations": ["torch"],
                            "scales": [1, 10], "batch_sizes": [32], "dtypes": ["float32"], "distributions": ["normal"],
                            "timing": {"min_run_time": 0.01, "scales": [1]}, "custom": spec})
    records = {(r["impl"], r["scale"]): r for r in sweep.run(cfg, 1)}
    timed = records[("exit_when_timed", 1.0)]
    assert timed["status"] == "error"
    assert timed["message"] == "while timing: exited with status 5 in its worker process"
    assert records[("torch", 1.0)]["status"] == "ok" and records[("torch", 1.0)]["timing"]["forward_runs"] > 0
    # Started again for the next point, whose evaluation (two calls) is fine.
    assert records[("exit_when_timed", 10.0)]["status"] == "ok"
