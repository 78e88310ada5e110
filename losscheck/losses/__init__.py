"""The registry of losses: name -> `Loss` (see `base.py` for the contract)."""
from __future__ import annotations

from . import bce, bce_with_logits, cross_entropy
from .base import Impl, Loss, Reference, reference

LOSSES: dict[str, Loss] = {m.LOSS.name: m.LOSS for m in (bce, bce_with_logits, cross_entropy)}

__all__ = ["LOSSES", "Impl", "Loss", "Reference", "reference"]
