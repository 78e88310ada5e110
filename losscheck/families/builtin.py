"""The families every loss module implements itself: its `implementations` naive, stable and
torch (losses/*.py keep the functions; these families hand them to the sweep)."""

from __future__ import annotations

from . import Family


def own(name: str, kind: str, summary: str, order: int) -> Family:
    """The family of each loss's own implementation `name` (losses/base.py: Loss.implementations)."""

    def provide(loss):
        impl = loss.implementations.get(name)
        return impl.fn if impl is not None else None

    def describe(loss) -> str:
        impl = loss.implementations.get(name)
        return impl.summary if impl is not None else summary

    return Family(name, kind, summary, provide, order=order, describe=describe)
