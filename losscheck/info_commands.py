"""The commands that describe rather than measure or gate: `list` (what is installed and
configurable here) and `explain` (why a loss breaks). Split from commands.py by size; the group
(cli.py) imports this module only when one of them runs. No torch at load: `list --devices`
and `explain` import it when they run.
"""

from __future__ import annotations

import click
from tabulate import tabulate

from . import summaries, verbosity
from .catalog import LOSS_INFO
from .config import KEYS, OPTION_AXES
from .errors import LosscheckError
from .formats import FORMATS


@click.command("list")
@click.option(
    "--devices",
    "check_devices",
    is_flag=True,
    help="Also check whether CUDA and MPS can be used (imports torch: a few seconds).",
)
@verbosity.json_option("the losses, implementations, dtypes, value sets and installed packages")
@verbosity.options
def list_cmd(check_devices: bool, as_json: bool) -> None:
    """Losses, implementations, dtypes, value sets and devices here.

    Imports no torch (packages are found with importlib.util.find_spec) unless --devices
    asks whether CUDA or MPS can be used: that is torch's to say.

    \b
    Examples:
      losscheck list
      losscheck list --devices --json
    """
    data = summaries.inventory()
    data["devices"] = _devices(check_devices)
    if as_json:
        verbosity.print_json(data)
        return
    rows = [
        [loss["name"], loss["summary"], ", ".join(f"{i['name']} ({i['kind']})" for i in loss["implementations"])]
        for loss in data["losses"]
    ]
    click.echo(tabulate(rows, headers=["loss", "what", "implementations"], tablefmt="simple"))
    click.echo()
    fam_rows = [
        [f["name"], f["kind"], "yes" if f["default"] else "no", f["unavailable"] or "available", f["summary"]]
        for f in data["families"]
    ]
    click.echo(tabulate(fam_rows, headers=["family", "kind", "default", "here", "what"], tablefmt="simple"))
    click.echo()
    click.echo(
        tabulate(
            [[f["name"], f["significand_bits"], f"{f['default_threshold_bits']:g}"] for f in data["dtypes"]],
            headers=["dtype", "significand bits", "default threshold (bits)"],
            tablefmt="simple",
        )
    )
    click.echo()
    click.echo(
        tabulate(
            [[d["name"], d["inputs"]] for d in data["distributions"]],
            headers=["distribution", "inputs"],
            tablefmt="simple",
        )
    )
    click.echo()
    click.echo(tabulate(list(data["devices"].items()), headers=["device", "status"], tablefmt="simple"))
    click.echo()
    options = {name: info.options for name, info in LOSS_INFO.items()}
    option_rows = [
        [key, KEYS[key], ", ".join(n for n, opts in options.items() if option in opts)]
        for option, key in OPTION_AXES.items()
    ]
    option_rows += [
        ["reductions", KEYS["reductions"], "every loss"],
        ["sequence_lengths", KEYS["sequence_lengths"], "sequence_cross_entropy"],
    ]
    click.echo(tabulate(option_rows, headers=["config key", "values", "losses"], tablefmt="simple"))
    click.echo()
    click.echo(
        tabulate(
            [[name, p["version"] or "not installed", p["used_for"]] for name, p in data["packages"].items()],
            headers=["package", "version", "used for"],
            tablefmt="simple",
        )
    )
    click.echo(
        f"\nimplementation names for configs: {', '.join(f['name'] for f in data['families'])}; your own: `custom:` in a config, "
        "or bench --impl [LOSS=]module:function (kind: custom; this imports and runs that code)"
    )


def _devices(check: bool) -> dict[str, str]:
    """Device -> "available" or why not; without `check`, CUDA and MPS are "not checked"
    (the cpu always runs)."""
    if not check:
        return {"cpu": "available", "cuda": "not checked (list --devices)", "mps": "not checked (list --devices)"}
    from . import environment  # imports torch

    return {d: environment.device_problem(d) or "available" for d in ("cpu", "cuda", "mps")}


@click.command("explain")
@click.argument("loss")
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    metavar="DTYPE",
    help=f"Dtypes of the live breakdown measurement, any of {', '.join(FORMATS)} (default: all).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPU threads for the live breakdown sweep.",
)
@verbosity.options
def explain_cmd(loss: str, dtypes: tuple[str, ...], threads: int) -> None:
    """Why LOSS breaks: formulas, limits and a live breakdown sweep.

    Prints the formula of LOSS, its naive transcription, why it breaks (dtype limits and a
    small sweep measured now), the stable rewriting and the gradient, as Markdown.

    \b
    Example:
      losscheck explain cross_entropy --dtype float16
    """
    from . import explain  # measures live, with torch

    try:
        text = explain.explain(loss, dtypes or None, threads)
    except ValueError as e:
        raise LosscheckError(str(e)) from None
    click.echo(text)
