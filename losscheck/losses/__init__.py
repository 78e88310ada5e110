"""The registry of losses: name -> `Loss` (see `base.py` for the contract)."""

from __future__ import annotations

from . import bce, bce_with_logits, cross_entropy, linear_cross_entropy, sequence_cross_entropy
from .base import IGNORE_INDEX, OPTION_DEFAULTS, Impl, Loss, Reference, reference

LOSSES: dict[str, Loss] = {
    m.LOSS.name: m.LOSS for m in (bce, bce_with_logits, cross_entropy, sequence_cross_entropy, linear_cross_entropy)
}

__all__ = ["IGNORE_INDEX", "LOSSES", "OPTION_DEFAULTS", "Impl", "Loss", "Reference", "reference"]
