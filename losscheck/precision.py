"""Precision policies: how training code runs a loss on half-precision logits (issue 15).

* ``native``: the implementation gets the point's tensors in their dtype (every point without
  the option);
* ``autocast``: the call runs under ``torch.autocast`` for the point's device, its dtype the
  input's (bfloat16 or float16). Autocast decides per operation: on the CPU ``cross_entropy``
  and ``binary_cross_entropy(_with_logits)`` compute in float32 and return float32, while
  ``log_softmax`` stays in bfloat16; on CUDA ``binary_cross_entropy`` refuses to run
  ("unsafe to autocast") — emulated where no GPU is present by a note in the record;
* ``upcast``: the input, floating targets and floating options cast to float32 before the call,
  as ``F.cross_entropy(logits.float(), y)`` does; the result stays float32 and the gradient
  reaches the input in its own dtype (autograd casts it back).

The policies apply to float16 and bfloat16 points only: for float32 and float64 inputs
autocast changes none of these losses' operations and an upcast to float32 is the identity, so
such points would repeat the native ones. An output wider than the input (float32 for a
bfloat16 point) is audited against the reference rounded to the output's dtype, its breakdown
threshold the input's, moved to the output's significand (METRICS.md, "Precision policies").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .catalog import PRECISIONS  # noqa: F401  (re-exported: the policies' names)

HALF = ("float16", "bfloat16")
UPCAST = torch.float32

# Where autocast refuses a loss on CUDA (torch raises): emulated on other devices by a note.
CUDA_AUTOCAST_REFUSES = {"bce": "binary_cross_entropy"}


def applies(policy: str, dtype: str) -> bool:
    """Whether a point of `dtype` is swept under `policy` (native: always)."""
    return policy == "native" or dtype in HALF


def wrap(fn: Callable, policy: str, device: str) -> Callable:
    """`fn` as a call under `policy`, with the same signature."""
    if policy == "native":
        return fn
    if hasattr(fn, "with_policy"):  # worker.RemoteFn: wrapped in its worker process
        return fn.with_policy(policy)
    if policy == "upcast":

        def upcast(x, target, reduction="mean", **options):
            def up(v):
                return v.to(UPCAST) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

            return fn(up(x), up(target), reduction, **{k: up(v) for k, v in options.items()})

        return upcast
    if policy == "autocast":
        device_type = torch.device(device).type

        def autocast(x, target, reduction="mean", **options):
            with torch.autocast(device_type, dtype=x.dtype):
                return fn(x, target, reduction, **options)

        return autocast
    raise ValueError(f"unknown precision policy {policy!r}; known: {', '.join(PRECISIONS)}")


def accepts(out: torch.dtype, inp: torch.dtype, policy: str) -> bool:
    """Whether an output of dtype `out` is a valid result for input dtype `inp` under `policy`:
    the input's dtype, or (autocast, upcast) a wider floating dtype."""
    if out == inp:
        return True
    return policy != "native" and out.is_floating_point and torch.finfo(out).bits > torch.finfo(inp).bits


def cuda_note(loss: str, policy: str, device: str) -> str:
    """The record's note where autocast on CUDA would refuse the loss and the point runs elsewhere."""
    op = CUDA_AUTOCAST_REFUSES.get(loss)
    if policy != "autocast" or op is None or torch.device(device).type == "cuda":
        return ""
    return f"on CUDA, torch.autocast refuses F.{op} (unsafe to autocast); on {device} it computes in float32"
