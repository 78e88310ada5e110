"""`-q/--quiet` and `-v/--verbose`, accepted by the group and by every command alike
(`losscheck -q bench` = `losscheck bench -q`), as pytest counts them: the level is the
number of -v minus the number of -q, over the group and the command together.

Level -2 (-qq): errors and warnings only. -1 (-q): the one-line result only (no progress
bar, no "wrote ..." lines, no Markdown comparison on stdout). 0: the default. 1 (-v):
bench also prints each point as it finishes. Errors (exit 2) and warnings are never
silenced. Torch-free: the group (cli.py) imports it.
"""

from __future__ import annotations

import json

import click

_KEY = "losscheck.verbosity"


def _add(delta: int):
    def callback(ctx: click.Context, param, count: int) -> None:
        root = ctx.find_root()
        root.meta[_KEY] = root.meta.get(_KEY, 0) + delta * (count or 0)

    return callback


def options(f):
    """Adds -q/--quiet and -v/--verbose (both repeatable) to a command or group."""
    f = click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_add(+1),
        help="More output (repeatable; bench: one line per finished point).",
    )(f)
    return click.option(
        "-q",
        "--quiet",
        count=True,
        expose_value=False,
        callback=_add(-1),
        help="Less output (repeatable): -q the one-line result only, -qq errors only.",
    )(f)


def level() -> int:
    """The verbosity of the running command (0 outside a command)."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().meta.get(_KEY, 0) if ctx else 0


def say(message: str, min_level: int = 0, err: bool = False) -> None:
    """Echo `message` when the verbosity (-q/-v) is at least `min_level`."""
    if level() >= min_level:
        click.echo(message, err=err)


def json_option(what: str):
    """`--json`: a command prints `what` as one JSON object (print_json) in place of its text."""
    return click.option(
        "--json", "as_json", is_flag=True, help=f"Print {what} as one JSON object on stdout instead of text."
    )


def print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, allow_nan=False, default=str))
