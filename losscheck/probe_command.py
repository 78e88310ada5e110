"""The `losscheck probe` command: parses its flags, calls `losscheck.probe` (api.py), prints.

The work lives in `losscheck.probing`; this module is the command layer's thin wrapper, loaded
by cli.py only when `probe` runs.
"""

from __future__ import annotations

import click

from . import api


@click.command("probe")
@click.argument("loss_name", metavar="LOSS")
@click.option(
    "--input",
    "input_spec",
    required=True,
    metavar="LIST|FILE",
    help="The input (logits; probabilities for bce): an inline list such as '[inf, 1.0]' (nested for "
    "2-D/3-D; inf, -inf, nan accepted) or a .pt/.pth, .npy, .npz file (FILE:KEY for one entry).",
)
@click.option(
    "--target",
    "target_spec",
    default=None,
    metavar="LIST|FILE",
    help="The target, inline or from a file: labels in [0, 1] (binary losses, the input's shape: hard 0/1 or "
    "soft), class indices (N,) or (B, T), or class probabilities of the input's shape (cross_entropy soft targets). "
    "Required, except for log_softmax (it takes none).",
)
@click.option(
    "--dtype",
    default=None,
    metavar="DTYPE",
    help="Evaluate in float64, float32, float16 or bfloat16 (default: the input file's dtype if "
    "floating, else float32). The input is rounded once to it.",
)
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE", help="cpu, cuda, cuda:N or mps.")
@click.option(
    "--weight",
    default=None,
    metavar="LIST|FILE",
    help="Weights: per element for binary losses, per class for cross entropy.",
)
@click.option(
    "--pos-weight",
    default=None,
    metavar="NUMBER|ARRAY",
    help="Weight of the positive term (binary losses): a number (zero and negative too), or one per class "
    "of (N, C) multi-label inputs (an inline list or a file).",
)
@click.option("--label-smoothing", default=None, metavar="NUMBER", help="Label smoothing in [0, 1] (cross entropy).")
@click.option(
    "--ignore-index",
    default=None,
    metavar="INT",
    help="Target value to ignore (cross_entropy; sequence_cross_entropy: padding, default -100).",
)
@click.option("--reduction", default="mean", show_default=True, metavar="none|mean|sum", help="The reduction.")
@click.option(
    "--impl",
    "impls",
    multiple=True,
    metavar="MODULE:FUNCTION",
    help="Your own torch implementation, fn(input, target, reduction, **options) "
    "('pkg.mod:fn' or 'file.py:fn'); repeatable.",
)
@click.option(
    "--numpy-impl",
    "numpy_impls",
    multiple=True,
    metavar="MODULE:FUNCTION",
    help="Your own numpy implementation (returns loss or (loss, grad)); repeatable.",
)
@click.option(
    "--grad-output",
    default=None,
    metavar="LIST|FILE|KIND",
    help="With --reduction none: the upstream gradient, shaped like the per-element loss (inline or a "
    "file), or ones, random, onehot, zeros (drawn as bench does); the audited gradient is that of Σ g·loss.",
)
@click.option(
    "--dim",
    default=None,
    metavar="INT",
    help="log_softmax: the dimension it normalises along, any of the input's (default -1).",
)
@click.option(
    "--precision",
    default="native",
    show_default=True,
    metavar="native|autocast|upcast",
    help="float16/bfloat16 inputs: run the implementations as given, under torch.autocast for the device, "
    "or on a float32 upcast (bench's precision axis); a wider output is audited in its own dtype.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the table.")
def probe_command(
    loss_name,
    input_spec,
    target_spec,
    dtype,
    device,
    weight,
    pos_weight,
    label_smoothing,
    ignore_index,
    reduction,
    impls,
    numpy_impls,
    grad_output,
    dim,
    precision,
    as_json,
) -> None:
    """Audit LOSS on the exact inputs that broke your training.

    Evaluates every implementation (naive, stable, torch and yours) on the input and target
    given, against losscheck's reference, with bench's measurements: the reduced loss's
    error in ULPs and bits, NaN/inf in the forward and the gradient, the worst element; names
    the cause of each failure as bench's findings do (overflow, saturation, underflow,
    reduction, limit, undefined); and says where the true value is a limit (±inf logits) or
    undefined (0/0).

    \b
    losscheck probe bce_with_logits --input '[inf, 1.0]' --target '[1, 0]' --dtype float32
    losscheck probe cross_entropy --input logits.pt --target labels.pt --dtype bfloat16 --ignore-index -100
    losscheck probe bce --input probs.npy --target y.npy --reduction sum --json
    losscheck probe log_softmax --input x.pt --dim 2 --dtype float16 --reduction none
    """
    result = api.probe(
        loss_name,
        input_spec,
        target_spec,
        dtype=dtype,
        device=device,
        reduction=reduction,
        weight=weight,
        pos_weight=pos_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        impls=impls,
        numpy_impls=numpy_impls,
        grad_output=grad_output,
        dim=dim,
        precision=precision,
    )
    click.echo(result.to_json() if as_json else result.render(), nl=False)
