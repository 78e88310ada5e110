"""The `losscheck accumulate` command: parses its flags, calls `accumulate.run`, prints (the
work lives in accumulate.py; cli.py loads this module only when the command runs)."""

from __future__ import annotations

import json

import click


@click.command("accumulate")
@click.option("--batch", default=8, show_default=True, help="Sequences in the full batch.")
@click.option("--time", "time_", default=64, show_default=True, help="Longest sequence; lengths are uniform in [1, T].")
@click.option("--vocab", default=1000, show_default=True, help="Vocabulary size V (classes).")
@click.option("--micro-batches", default=4, show_default=True, help="Micro-batches m the batch is split into.")
@click.option("--masked", default=0, show_default=True, help="How many micro-batches (the last) are all padding.")
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    metavar="DTYPE",
    help="float32 (default), bfloat16, float16, float64; repeatable.",
)
@click.option("--scale", default=1.0, show_default=True, help="Logits are N(0, scale²).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of Markdown.")
def accumulate_command(batch, time_, vocab, micro_batches, masked, dtypes, scale, seed, device, as_json):
    """Gradient accumulation: micro-batch means vs the full batch.

    The same tokens as one batch and as micro-batches normalised per micro-batch (mean of
    means, with and without a 0/0 guard) or by the global token count; all-padding
    micro-batches with --masked. Example: losscheck accumulate --vocab 32000 --masked 1
    --dtype float32 --dtype bfloat16
    """
    from . import accumulate

    specs = [
        accumulate.check(accumulate.Spec(batch, time_, vocab, micro_batches, masked, d, scale, seed, device))
        for d in (dtypes or ("float32",))
    ]
    results = [accumulate.run(s) for s in specs]
    click.echo(json.dumps(results, indent=2, sort_keys=True) if as_json else "\n".join(map(accumulate.render, results)))
