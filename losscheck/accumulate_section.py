"""The `accumulate:` section of a config and its table, without torch (issue 18 item 5).

`losscheck accumulate` (accumulate.py) runs one gradient-accumulation experiment from flags; a
config's `accumulate:` section asks `bench` to run it after the sweep, once per dtype, and the
results file keeps the tables (top-level `accumulate`, results.py) for the report. The checks
of the experiment's parameters (`problem`) and the table (`render`) are here so that the config
and the report need no torch; accumulate.py uses both.
"""

from __future__ import annotations

import math

from .errors import ConfigError
from .formats import FORMATS

# The experiment's parameters that a config sets (seed: the config's; dtypes: a list of them).
KEYS = ("batch", "time", "vocab", "micro_batches", "masked", "scale", "dtypes")
DEFAULTS = {"batch": 8, "time": 64, "vocab": 1000, "micro_batches": 4, "masked": 0, "scale": 1.0}
HELP = (
    "mapping with batch (sequences), time (longest sequence), vocab, micro_batches, masked (all-padding "
    "micro-batches), scale (logits N(0, scale²)), dtypes (default: the config's): gradient accumulation "
    "run after the sweep"
)


def problem(p: dict) -> tuple[str, object, str] | None:
    """The first bad parameter of an experiment as (name, value, what is allowed), or None.
    `p` holds batch, time, vocab, micro_batches, masked, dtype, scale and seed."""
    for name, lo in (("batch", 1), ("time", 1), ("vocab", 2), ("micro_batches", 1), ("seed", 0)):
        if isinstance(p[name], bool) or not isinstance(p[name], int) or p[name] < lo:
            return name, p[name], f"integers >= {lo}"
    if p["micro_batches"] > p["batch"]:
        return "micro_batches", p["micro_batches"], f"at most the batch ({p['batch']}): each holds a sequence"
    masked = p["masked"]
    if isinstance(masked, bool) or not isinstance(masked, int) or not 0 <= masked < p["micro_batches"]:
        return "masked", masked, f"0 to {p['micro_batches'] - 1} (micro-batches − 1: some tokens must count)"
    if p["dtype"] not in FORMATS:
        return "dtype", p["dtype"], ", ".join(FORMATS)
    scale = p["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        return "scale", scale, "a positive finite number"
    return None


def validate(section, source: str, dtypes: tuple[str, ...], seed: int) -> dict:
    """`accumulate:` checked: the section with every key (defaults filled in), or a one-line
    ConfigError naming `accumulate.<key>`."""
    if not isinstance(section, dict):
        raise ConfigError(source, "accumulate", f"expected a mapping, got {type(section).__name__}", HELP)
    for key in section:
        if key not in KEYS:
            raise ConfigError(source, f"accumulate.{key}", "unknown key", ", ".join(KEYS))
    out = {**DEFAULTS, **{k: v for k, v in section.items() if k != "dtypes"}}
    listed = section.get("dtypes", list(dtypes))
    if not isinstance(listed, (list, tuple)) or not listed:
        raise ConfigError(source, "accumulate.dtypes", f"expected a non-empty list, got {listed!r}", ", ".join(FORMATS))
    for dtype in listed:
        found = problem({**out, "dtype": dtype, "seed": seed})
        if found:
            name, value, allowed = found
            key = "accumulate." + ("dtypes" if name == "dtype" else name)
            raise ConfigError(source, key, f"bad value {value!r}", allowed)
    return {**out, "scale": float(out["scale"]), "dtypes": list(dict.fromkeys(listed))}


def _pct(x: float | None) -> str:
    return "0/0 (NaN)" if x is None else ("0" if x == 0 else f"{100 * x:.3g} %")


def render(result: dict) -> str:
    """The Markdown table of one experiment's result (accumulate.run)."""
    s = result["spec"]
    p = FORMATS[s["dtype"]].significand_bits
    lines = [
        f"Gradient accumulation: {s['batch']} sequences (lengths 1..{s['time']}, vocab {s['vocab']}, "
        f"{s['dtype']}) as {s['micro_batches']} micro-batches of {result['tokens']} tokens"
        + (f", the last {s['masked']} all padding" if s["masked"] else "")
        + f"; against the full batch's per-token mean; bits of {p}.",
        "",
        "| convention | loss | loss bits lost | loss bias (exact) | gradient max bits | gradient NaN "
        "| gradient bias (exact) |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in result["outcomes"]:
        g = o["grad"]
        lines.append(
            f"| {o['convention']} | {o['loss']:.7g} | {o['loss_bits']:.1f} | {_pct(o['loss_bias'])} "
            f"| {g['max_bits']:.1f} | {g['nan']} | {_pct(o['grad_bias'])} |"
        )
    lines += [
        "",
        f"Full batch: {result['outcomes'][0]['reference']:.10g} per token. A bias is the convention's "
        "own error in exact arithmetic (0/0: an all-padding micro-batch); bits lost add rounding to it.",
    ]
    return "\n".join(lines) + "\n"


def section(results: list[dict]) -> str:
    """The report's section for a results file's `accumulate` list ('' when there is none)."""
    if not results:
        return ""
    # The advice is the data's: the conventions without bias or NaN in every experiment.
    exact = [
        c
        for c in dict.fromkeys(o["convention"] for r in results for o in r["outcomes"])
        if all(
            o["loss_bias"] == 0 and o["grad_bias"] == 0 and not o["grad"]["nan"]
            for r in results
            for o in r["outcomes"]
            if o["convention"] == c
        )
    ]
    advice = (
        f" Unbiased and finite here: {', '.join(f'`{c}`' for c in exact)}; the others' bias is their formula's "
        "(exact arithmetic), not rounding."
        if exact
        else ""
    )
    head = (
        "## Gradient accumulation\n\nThe config's `accumulate:` section, run after the sweep: the same "
        "tokens as one batch and as micro-batches, normalised per micro-batch (`microbatch_mean`: the mean "
        "of the micro-batch means; `microbatch_mean_guarded`: with a 0/0 guard) or by the batch's token "
        f"count (`global_tokens`, transformers' `num_items_in_batch`).{advice}"
    )
    return "\n\n".join([head, *(render(r).rstrip() for r in results)])
