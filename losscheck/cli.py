"""The command line: each command parses, calls one core function, renders, maps to an exit code.

Exit codes: 0 success, 1 regression (the gate), 2 usage/config/input error (one line on
stderr, no traceback), 130 interrupted (the finished points are written).

The group loads a command's module only when that command runs (commands.py, info_commands.py,
probe_command.py), and lists the commands from the summaries kept here, so that `--help` and
`--version` import neither torch nor any command module.
"""

from __future__ import annotations

import importlib
import os

import click

from . import __version__, verbosity
from .errors import LosscheckError

# OpenMP's worker threads spin for about 0.1 ms (GOMP_SPINCOUNT 10000) after a parallel region
# ends, then sleep, instead of libgomp's ~3 ms (300000). libgomp reads this once, when torch
# loads it: hence here, before a command imports torch; the worker processes inherit it. On a
# shared CPU a spinning worker takes the time slices of the thread that issues the audit's next
# operation. Measured side by side on the 2-core dev machine, whole runs, idle / one core busy
# (`yes`, a CI runner's neighbour):
#   configs/quick.yaml        libgomp default 6.5 / 17.1 s, spin 10000 6.9 / 8.2-9.3 s,
#                             spin 2000 7.3 / 6.9 s, OMP_WAIT_POLICY=PASSIVE 7.2 / 6.3-6.7 s;
#   the default config, idle  default 105 s, spin 10000 106 s, spin 2000 116 s, PASSIVE 127 s
# (benchmarks/audit_overhead.py: PASSIVE made an idle 4096 x 1000 float32 point 14-31 % slower).
# 10000 keeps the idle machine's speed and takes about 2/3 of what PASSIVE saves with a busy
# neighbour. The command line only: `import losscheck` leaves a user's process alone; a user's
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Results record both (environment).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# name -> (module, attribute, summary). The summary is the first paragraph of the command's
# docstring, as `--help` lists it (tests/test_cli_startup.py checks that they agree). Each fits
# on one line of an 80-column `--help` listing (at most 60 characters), so that Click never
# shortens it with "...".
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("losscheck.commands", "bench", "Run the sweep of CONFIG_PATH (or of the embedded default)."),
    "compare": (
        "losscheck.commands",
        "compare_cmd",
        "Gate CURRENT_PATH against BASELINE_PATH: exit 1 on a regression.",
    ),
    "merge": ("losscheck.commands", "merge_cmd", "Merge the results of the shards of one run (bench --shard)."),
    "baseline": (
        "losscheck.commands",
        "baseline_cmd",
        "Accept RESULTS_PATH as the baseline the gate compares against.",
    ),
    "report": ("losscheck.commands", "report_cmd", "Re-render the Markdown report (and plots) from a results file."),
    "list": ("losscheck.info_commands", "list_cmd", "Losses, implementations, dtypes, value sets and devices here."),
    "explain": (
        "losscheck.info_commands",
        "explain_cmd",
        "Why LOSS breaks: formulas, limits and a live breakdown sweep.",
    ),
    "probe": ("losscheck.probe_command", "probe_command", "Audit LOSS on the exact inputs that broke your training."),
    "accumulate": (
        "losscheck.accumulate_command",
        "accumulate_command",
        "Gradient accumulation: micro-batch means vs the full batch.",
    ),
}


class _Group(click.Group):
    """Maps every LosscheckError to one line on stderr and exit code 2; imports a command's
    module only when the command is looked up to run."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LosscheckError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)

    def list_commands(self, ctx) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx, name: str):
        if name in self.commands or name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr, _ = COMMANDS[name]
        command = getattr(importlib.import_module(module), attr)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx, formatter) -> None:
        # Click's listing looks every command up (importing them all) and cuts summaries short
        # with "..." on a narrow terminal; this one lists the kept summaries whole (wrapped
        # where the terminal is narrow), through stand-in commands that hold only them.
        def stand_in(name):
            return self.commands[name] if name in self.commands else click.Command(name, help=COMMANDS[name][2])

        commands = [(name, stand_in(name)) for name in self.list_commands(ctx)]
        rows = [(name, (cmd.help or "").partition("\n\n")[0]) for name, cmd in commands if not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl([(name, " ".join(text.split())) for name, text in rows])


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="losscheck")
@verbosity.options
def main() -> None:
    """Benchmark and audit the numerical stability of loss functions.

    `losscheck COMMAND --help` for a command's options and examples. -q/-v work before or
    after the command. Exit codes: 0 success, 1 regression (bench --baseline, compare),
    2 bad input (one line on stderr), 130 interrupted. Docs: docs/USAGE.md in the repository.
    """


def __getattr__(name: str):
    # The helpers that lived here before the commands moved to commands.py (parse_impl_flag, ...)
    # and bench's run to bench_run.py (_Incremental, _resumed) are still reachable as
    # cli.<name>, loading those modules on first use.
    if name.startswith("__"):
        raise AttributeError(name)
    commands = importlib.import_module("losscheck.commands")
    if hasattr(commands, name):
        return getattr(commands, name)
    return getattr(importlib.import_module("losscheck.bench_run"), name)
