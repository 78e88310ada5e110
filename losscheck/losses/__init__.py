"""The registry of losses: name -> `Loss` (see `base.py` for the contract)."""

from __future__ import annotations

from .. import families
from . import (
    bce,
    bce_with_logits,
    cross_entropy,
    entropy,
    focal_loss,
    js_div,
    kl_div,
    linear_cross_entropy,
    log_softmax,
    nll_loss,
    sequence_cross_entropy,
    sharded_cross_entropy,
    sigmoid_bce,
    token_logprobs,
)
from .base import IGNORE_INDEX, OPTION_DEFAULTS, Impl, Loss, Reference, reference

LOSSES: dict[str, Loss] = {
    m.LOSS.name: m.LOSS
    for m in (
        bce,
        bce_with_logits,
        sigmoid_bce,
        cross_entropy,
        nll_loss,
        log_softmax,
        sequence_cross_entropy,
        sharded_cross_entropy,
        linear_cross_entropy,
        token_logprobs,
        entropy,
        kl_div,
        js_div,
        focal_loss,
    )
}
# focal_loss.py holds both focal losses (one reference module): its multi-class one follows.
LOSSES[focal_loss.MULTICLASS.name] = focal_loss.MULTICLASS


def _skipping(reason: str):
    def skipped(*args, **kwargs):
        raise families.Unsupported(reason)

    return skipped


def implementation(loss: Loss, name: str) -> Impl:
    """The implementation of `loss` by the family `name` (families/__init__.py), as the sweep
    runs it: a family that is unavailable here or has none for this loss gives an Impl whose
    calls raise families.Unsupported (its points are skipped with the reason)."""
    family = families.get(name)
    if family is None:
        raise KeyError(f"no implementation family {name!r} (families: {', '.join(families.names())})")
    why = family.unavailable()
    fn = None if why else family.provide(loss)
    if fn is None:
        fn = _skipping(why or f"{name} has no implementation of {loss.name}")
    return Impl(name, family.kind, fn, family.text(loss))


__all__ = ["IGNORE_INDEX", "LOSSES", "OPTION_DEFAULTS", "Impl", "Loss", "Reference", "implementation", "reference"]
