"""OpenMP's wait policy (losscheck/cli.py): the command line sets PASSIVE unless the user chose
one, before torch is imported (libgomp reads it once, when torch loads it); `import losscheck`
leaves a user's process alone; results record the policy."""

import os
import subprocess
import sys

CHECK = "import {module}, os, sys; print(os.environ.get('OMP_WAIT_POLICY', '-'), 'torch' in sys.modules)"


def _run(module, env):
    code = CHECK.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _unset():
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def test_the_command_line_sets_passive_before_torch():
    assert _run("losscheck.cli", _unset()) == ["PASSIVE", "False"]


def test_the_library_leaves_the_policy_alone():
    assert _run("losscheck", _unset()) == ["-", "False"]


def test_the_users_choice_is_kept():
    assert _run("losscheck.cli", {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "False"]


def test_results_record_the_policy(monkeypatch):
    from losscheck import environment

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert environment.capture(1)["omp_wait_policy"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert environment.capture(1)["omp_wait_policy"] is None
