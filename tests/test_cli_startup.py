"""The CLI starts without torch where torch is not needed (issue 13, item 3).

Each command runs in a fresh interpreter (torch, once imported, stays in sys.modules), and
an atexit hook records whether torch was imported by the time the process ended, after the
command's own work and its sys.exit.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from losscheck import cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = Path(__file__).parent / "data" / "small_results.json"

_RUN = """
import atexit, os, sys
def _record():
    with open(os.environ["LOSSCHECK_TEST_MODULES"], "w") as f:
        f.write(repr(sorted(m for m in ("torch", "losscheck.commands", "losscheck.probe_command") if m in sys.modules)))
atexit.register(_record)
sys.argv = ["losscheck", *sys.argv[1:]]
from losscheck.cli import main
main()
"""


def run(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `losscheck ARGS` in a fresh interpreter: the process, and which of torch and the
    command modules it had imported when it exited."""
    marker = tmp_path / "modules.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LOSSCHECK_TEST_MODULES": str(marker)}
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    return proc, eval(marker.read_text())


def test_help_and_version_import_no_command_module(tmp_path):
    proc, modules = run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "Audit LOSS on the exact inputs" in proc.stdout
    assert modules == []
    proc, modules = run(["--version"], tmp_path)
    assert proc.returncode == 0 and "losscheck, version" in proc.stdout
    assert modules == []


def test_command_help_loads_only_that_command(tmp_path):
    proc, modules = run(["compare", "--help"], tmp_path)
    assert proc.returncode == 0 and "BASELINE_PATH" in proc.stdout
    assert modules == ["losscheck.commands"]


def test_report_compare_baseline_work_from_the_json_alone(tmp_path):
    small = tmp_path / "small.json"
    shutil.copy(SMALL, small)
    current = tmp_path / "current.json"
    shutil.copy(SMALL, current)

    proc, modules = run(["report", small, "-o", tmp_path / "small.md"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "small.md").read_text().startswith("#")
    assert "torch" not in modules

    proc, modules = run(["report", small, "--stdout"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("#")
    assert "torch" not in modules

    proc, modules = run(["compare", small, current], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "current.compare.md").exists()
    assert "torch" not in modules

    proc, modules = run(["baseline", small, "-o", tmp_path / "baseline.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "baseline.json").read_text())["records"]
    assert "torch" not in modules


def test_merge_without_torch(tmp_path):
    data = json.loads(SMALL.read_text())
    half = len(data["records"]) // 2
    paths = []
    for i, records in enumerate((data["records"][:half], data["records"][half:]), start=1):
        shard = copy.deepcopy(data)
        shard["records"], shard["shard"] = records, [i, 2]
        paths.append(tmp_path / f"shard-{i}.json")
        paths[-1].write_text(json.dumps(shard))
    proc, modules = run(["merge", *paths, "-o", tmp_path / "merged.json", "--no-plots"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "merged.json").read_text())["records"]) == len(data["records"])
    assert "torch" not in modules


def test_bench_rejects_a_bad_config_before_importing_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    config["losses"] = ["cross_entropi"]  # a valid config but for one misspelt loss
    bad.write_text(yaml.safe_dump(config))
    proc, modules = run(["bench", bad, "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "'losses'" in proc.stderr and "cross_entropi" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "torch" not in modules
    assert not (tmp_path / "out").exists()

    # A bad baseline is an input error before the sweep, and before torch too.
    proc, modules = run(["bench", "--baseline", tmp_path / "missing.json"], tmp_path)
    assert proc.returncode == 2 and "missing.json" in proc.stderr
    assert "torch" not in modules


def test_list_works_without_torch(tmp_path):
    proc, modules = run(["list"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cross_entropy" in proc.stdout and "bfloat16" in proc.stdout and "cpu" in proc.stdout
    assert "torch" not in modules

    proc, modules = run(["list", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [loss["name"] for loss in data["losses"]][:2] == ["bce", "bce_with_logits"]
    assert data["packages"]["torch"]["version"]  # found on disk by find_spec, not imported
    assert data["devices"]["cuda"].startswith("not checked")
    assert "torch" not in modules


def test_list_devices_asks_torch(tmp_path):
    # Whether CUDA or MPS can be used is torch's to say (a driver on disk does not mean
    # torch can use it): --devices imports it, on purpose.
    proc, modules = run(["list", "--devices", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    devices = json.loads(proc.stdout)["devices"]
    assert devices["cpu"] == "available" and not devices["cuda"].startswith("not checked")
    assert "torch" in modules


def test_help_lists_every_summary_whole_on_one_line(tmp_path):
    # Click cuts a summary that does not fit with "..."; ours are listed whole, each on the
    # line of its command at the default width, and wrapped (still whole) on a narrow one.
    proc, _ = run(["--help"], tmp_path)
    lines = proc.stdout.splitlines()
    for name, (_, _, summary) in cli.COMMANDS.items():
        line = next(line for line in lines if line.strip().startswith(name + " "))
        assert line.split(None, 1)[1] == summary, name
    narrow = click.testing.CliRunner().invoke(cli.main, ["--help"], terminal_width=50)
    commands = narrow.output.partition("Commands:")[2]
    assert "..." not in commands
    text = " ".join(commands.split())
    for name, (_, _, summary) in cli.COMMANDS.items():
        assert f"{name} {summary}" in text, name


def test_kept_summaries_are_the_commands_docstrings():
    """The summaries cli.py lists without importing the commands are those of the commands."""
    for name, (module, attr, summary) in cli.COMMANDS.items():
        command = getattr(__import__(module, fromlist=[attr]), attr)
        assert command.name == name
        assert command.help.partition("\n\n")[0].split() == summary.split(), name


def test_help_listing_is_clicks_own(tmp_path):
    """--help from the kept summaries is what Click prints with every command loaded."""
    lazy = click.testing.CliRunner().invoke(cli.main, ["--help"])
    loaded = click.Group("main", help=cli.main.help, params=cli.main.params)
    for name, (module, attr, _) in cli.COMMANDS.items():
        loaded.add_command(getattr(__import__(module, fromlist=[attr]), attr), name)
    eager = click.testing.CliRunner().invoke(loaded, ["--help"], prog_name="main")
    assert lazy.exit_code == eager.exit_code == 0
    assert lazy.output == eager.output
    assert lazy.output.count("\n  ") >= len(cli.COMMANDS)


def test_torch_free_tables_agree_with_torch():
    import torch

    from losscheck import dtypes, formats
    from losscheck.catalog import LOSS_INFO
    from losscheck.losses import LOSSES

    assert list(formats.FORMATS) == list(dtypes.FORMATS)
    for name, f in formats.FORMATS.items():
        t = dtypes.FORMATS[name]
        info = torch.finfo(t.torch_dtype)
        assert f.significand_bits == t.significand_bits == 1 - math.log2(info.eps)
        assert f.total_bits == t.total_bits == info.bits
        assert f.default_threshold_bits == t.default_threshold_bits
    assert list(LOSS_INFO) == list(LOSSES)
    for name, info in LOSS_INFO.items():
        loss = LOSSES[name]
        assert (loss.summary, loss.formulas, loss.options) == (info.summary, info.formulas, info.options)


def test_a_loss_added_to_the_registry_is_known_to_config_validation(monkeypatch):
    """Once `losses` is imported its registry is the authority, as before the torch-free catalog."""
    import dataclasses

    from losscheck.catalog import LOSS_INFO, loss_registry
    from losscheck.config import custom_spec
    from losscheck.errors import ConfigError
    from losscheck.losses import LOSSES

    with pytest.raises(ConfigError):
        custom_spec("m:f", None, ["toy"])
    monkeypatch.setitem(LOSSES, "toy", dataclasses.replace(LOSSES["bce"], name="toy"))
    assert custom_spec("m:f", None, ["toy"]).losses == ("toy",)
    assert loss_registry() is LOSSES and "toy" not in LOSS_INFO
