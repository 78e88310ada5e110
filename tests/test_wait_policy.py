"""OpenMP's wait policy (losscheck/__init__.py): PASSIVE unless the user chose one, set before
torch is imported (libgomp reads it once, when torch loads it)."""

import os
import subprocess
import sys

CHECK = "import losscheck, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"


def _run(env):
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_passive_by_default_and_before_torch():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _run(env) == ["PASSIVE", "False"]


def test_the_users_choice_is_kept():
    assert _run({**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "False"]
