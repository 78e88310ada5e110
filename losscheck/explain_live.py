"""The small sweep `losscheck explain` runs on the spot (explain.py): its parameters, its config
and its run, with the breakdown scales analysed as a report does."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import analysis, sweep
from .config import BUILTIN_IMPLS, Config
from .losses import LOSSES, Loss

# The live sweep: small enough to run in well under a second per dtype on 2 cores.
SCALES = (1, 2, 3, 5, 10, 20, 30, 50, 100, 300, 1000, 10000)
DISTRIBUTIONS = ("normal", "extreme", "confident_correct", "confident_wrong")
BATCH = 256
CLASSES = 10
# Sequence losses (`Loss.sequence`): SEQUENCE_BATCH sequences of SEQUENCE_LENGTH tokens, as
# many tokens as BATCH rows (the config's default of 64 tokens per sequence is 16 times slower).
SEQUENCE_BATCH = 32
SEQUENCE_LENGTH = 8
SEED = 0


def sweep_implementations(loss: Loss) -> tuple[str, ...]:
    """The built-in implementations this loss has, in the usual order."""
    return tuple(i for i in BUILTIN_IMPLS if i in loss.implementations)


def is_sequence(loss: Loss) -> bool:
    return bool(getattr(loss, "sequence", False))


def sweep_batch(loss: Loss) -> int:
    return SEQUENCE_BATCH if is_sequence(loss) else BATCH


def sweep_mapping(loss_name: str, dtypes: tuple[str, ...]) -> dict:
    """The config of the sweep `explain` runs, as a mapping (`Config.from_mapping`)."""
    loss = LOSSES[loss_name]
    return {
        "name": "explain",
        "losses": [loss_name],
        "implementations": list(sweep_implementations(loss)),
        "scales": list(SCALES),
        "batch_sizes": [sweep_batch(loss)],
        "classes": [CLASSES],
        **({"sequence_lengths": [SEQUENCE_LENGTH]} if is_sequence(loss) else {}),
        "dtypes": list(dtypes),
        "devices": ["cpu"],
        "distributions": list(DISTRIBUTIONS),
        "seed": SEED,
        "timing": False,
    }


@dataclass
class Live:
    config: Config
    records: list[dict]
    breakdowns: dict[tuple, analysis.Breakdown]
    seconds: float


def run_live(loss_name: str, dtypes: tuple[str, ...], threads: int = 1) -> Live:
    """Run the explain sweep for one loss and compute its breakdown scales."""
    config = Config.from_mapping(sweep_mapping(loss_name, dtypes), "<explain>")
    before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        records = sweep.run(config, threads)
    finally:
        torch.set_num_threads(before)  # sweep.run sets the process-wide thread count
    seconds = time.perf_counter() - start
    return Live(config, records, analysis.breakdown_scales(records), seconds)
