"""Every command of the README runs as written (issue 17: "every command in it runs as written").

The commands are the `$ ` lines of the README's ```console blocks, in order. Those whose comment
says `# long` (the full sweeps, `make`, CI itself) are not run here; the others run one by one,
each in its own `bash -o pipefail -c`, in a temporary copy of what they read (configs/,
examples/, reports/baseline.json) with `.venv` pointing at this interpreter's virtual
environment and the package of this checkout first on the path, so that what they write stays
under tmp_path. Each must exit 0 without a traceback.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from losscheck.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LONG = re.compile(r"\s#\s*long\b")
# What the README's commands read, copied into the temporary directory.
INPUTS = ("configs", "examples", "reports/baseline.json")


def commands(text: str) -> list[tuple[str, bool]]:
    """(command, long) for every `$ ` line of the ```console blocks, in order; a line ending in
    a backslash continues on the next."""
    out: list[tuple[str, bool]] = []
    fence: str | None = None
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence != "console":
            continue
        if pending:
            line, pending = pending + line.lstrip(), ""
        elif not line.startswith("$ "):
            continue  # the output shown under a command
        else:
            line = line[2:]
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        out.append((line, bool(LONG.search(line))))
    return out


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "## Contents" in text
    for doc in ("docs/USAGE.md", "docs/CI.md", "docs/METRICS.md", "docs/RESULTS.md", "docs/EXTENDING.md"):
        assert f"]({doc}" in text and (ROOT / doc).exists(), doc
    # Commands live in console blocks only, where this test finds them.
    fences = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert all(lang == "console" for lang, body in fences if re.search(r"^\$ ", body, flags=re.MULTILINE))


def test_commands_are_found_and_the_long_ones_marked():
    found = commands(README.read_text())
    run = [c for c, long in found if not long]
    long = [c for c, long in found if long]
    assert len(run) >= 8, run
    # The full sweeps, make and CI itself are the long ones; a bench of the whole default,
    # options or CI config must say so.
    assert any(c.startswith("make test") for c in long) and any(c.startswith(".ci/run") for c in long)
    for c in run:
        assert not c.startswith(("make", ".ci/run")), c
        assert not re.match(r"losscheck bench\s*(#|$)", c), c  # the embedded default sweep
    # The parser joins continued lines and skips output lines.
    assert commands("```console\n$ a \\\n  b\nout\n$ c  # long\n```\n```bash\n$ d\n```\n") == \
        [("a b", False), ("c  # long", True)]


def _environment(tmp_path: Path) -> dict:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's commands run from a virtual environment (.venv), as make test does")
    (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env["PATH"] = f"{tmp_path / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # as activating does
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    return env


def test_every_command_runs_as_written(tmp_path):
    env = _environment(tmp_path)
    for item in INPUTS:
        src, dst = ROOT / item, tmp_path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    ran = 0
    for command, long in commands(README.read_text()):
        if long:
            continue
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        ran += 1
    assert ran >= 8
    # What the tour says it writes, it writes.
    assert (tmp_path / "out" / "quick.json").exists() and (tmp_path / "out" / "quick.md").exists()


def test_results_md_names_every_field_a_results_file_holds(tiny_results, tmp_path):
    """docs/RESULTS.md documents the file as the code writes it: every key of a fresh file
    (top level, environment, records and their sections, findings and their evidence) and of
    the --json summaries is named there."""
    from losscheck import summaries

    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    keys = set(tiny_results) | set(tiny_results["environment"])
    for record in tiny_results["records"]:
        keys |= set(record)
        for section in ("forward", "backward", "timing", "memory"):
            keys |= set(record[section] or {})
    for finding in tiny_results["findings"]:
        keys |= set(finding) | set(finding["evidence"])
    keys |= set(summaries.bench_summary([], True, "a", "b", None)) | set(summaries.inventory())
    small = tmp_path / "small.json"
    shutil.copy(ROOT / "tests" / "data" / "small_results.json", small)
    compared = CliRunner().invoke(main, ["compare", str(small), str(small), "--json"])
    assert compared.exit_code == 0, compared.stderr
    keys |= set(json.loads(compared.stdout))
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, missing
