"""OpenMP's waiting (losscheck/cli.py): the command line sets GOMP_SPINCOUNT 10000 unless the
user chose a wait policy or a spin count, before torch is imported (libgomp reads it once, when
torch loads it); `import losscheck` leaves a user's process alone; results record both."""

import os
import subprocess
import sys

CHECK = (
    "import {module}, os, sys; "
    "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'), 'torch' in sys.modules)"
)


def _run(module, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = CHECK.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_command_line_shortens_the_spin_before_torch():
    assert _run("losscheck.cli") == ["-", "10000", "False"]


def test_the_library_leaves_the_process_alone():
    assert _run("losscheck") == ["-", "-", "False"]


def test_the_users_choice_is_kept():
    assert _run("losscheck.cli", OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "-", "False"]
    assert _run("losscheck.cli", OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "-", "False"]
    assert _run("losscheck.cli", GOMP_SPINCOUNT="300000") == ["-", "300000", "False"]


def test_results_record_the_setting(monkeypatch):
    from losscheck import environment

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    env = environment.capture(1)
    assert (env["omp_wait_policy"], env["gomp_spincount"]) == ("PASSIVE", "10000")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("GOMP_SPINCOUNT")
    env = environment.capture(1)
    assert (env["omp_wait_policy"], env["gomp_spincount"]) == (None, None)
