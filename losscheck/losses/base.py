"""The loss-module contract.

Every loss module builds one `Loss`: its implementations (plain functions of torch
tensors, so they run on any device) and its reference (numpy, high precision).

An implementation is called as ``fn(input, target, reduction="mean", **options)`` — the
signature of ``torch.nn.functional``'s losses — where

* ``input`` is a floating tensor of the dtype under test: logits of shape ``(N,)`` for
  binary losses, ``(N, C)`` for multi-class ones (``(B, T, V)`` for sequence losses), or
  probabilities for ``bce``;
* ``target`` is a tensor of labels in [0, 1] in the input's dtype (binary losses: hard 0/1,
  or soft with ``targets: soft``), of
  int64 class indices of the input's shape less its last dimension (multi-class losses;
  ``ignore_index`` marks an ignored position), or of class probabilities like the input
  (soft targets);
* ``reduction`` is ``"none"``, ``"mean"`` or ``"sum"``, as in ``torch.nn.functional``;
* ``options`` are the keyword options a sweep point sets, and only those: ``weight``
  (a tensor in the input's dtype: per element for binary losses, per class for
  multi-class ones), ``pos_weight`` (binary: a one-element tensor, any finite value; a probe
  of (N, C) multi-label inputs passes one per element, its per-class vector spread over the
  flattened input), ``label_smoothing``
  (a float) and ``ignore_index`` (an int, -100 as in torch);

and returns the loss in the input's dtype: shaped like the target's rows for
``"none"``, a scalar otherwise. losscheck differentiates the result through autograd,
so an implementation must be differentiable with respect to ``input``.

A reference evaluates one chunk of rows in working precision (see `reference.py`):
``reference_chunk(x, t, **options) -> (loss, grad)`` with ``x`` the input values exactly
(2-D rows for multi-class losses), ``loss`` of shape ``(rows,)`` and ``grad`` the gradient
of the *summed* loss with respect to the input; ``denominators(t, **options)`` gives each
row's share of the mean's denominator (1 per element, the target's class weight for a
weighted cross entropy, 0 for an ignored target). `reference()` below divides, and
rounds once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .. import extended_rows, reference as R
from ..catalog import IGNORE_INDEX, OPTION_DEFAULTS, REDUCTIONS, Formulas  # noqa: F401  (re-exported)
from ..inputs import outside_domain, pieces
from .shared import (  # noqa: F401  (re-exported: base.<name> for the loss modules)
    accumulate_dtype,
    binary_factor,
    class_dim_last,
    compensated_sum,
    compute_dtype,
    grad_scale,
    reduce_accurate,
    reduce_naive,
    safe_denominator,
    scale_grad,
    two_sum,
)

KINDS = ("naive", "stable", "framework", "custom")


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str
    fn: Callable[..., torch.Tensor]
    summary: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")


# OPTION_DEFAULTS: options a loss may support (`Loss.options`), with the record value that
# means "not set" (in catalog.py, with Formulas and REDUCTIONS, so that readers need no torch).


@dataclass(frozen=True)
class Loss:
    name: str
    summary: str
    multiclass: bool
    input_kind: str  # "logits", "probabilities", "log_probabilities" (rows of log_softmax) or "hidden"
    implementations: dict[str, Impl]
    reference_chunk: R.ChunkFunction  # numpy arrays or tensors in, the same kind out
    formulas: Formulas
    # Sweep options this loss supports (keys of OPTION_DEFAULTS).
    options: tuple[str, ...] = field(default=())
    # Each row's share of the mean's denominator; None: 1 per row.
    denominators: Callable[..., Any] | None = None  # arrays or tensors, as reference_chunk
    # Sequence losses take (batch, time, vocab) logits and (batch, time) targets.
    sequence: bool = False
    # A tensor output shaped like the input (log_softmax): per element, not per row; its
    # reference takes the upstream gradient itself (`grad_output=`), as a row's gradient is
    # then no multiple of that of its sum (METRICS.md "Tensor outputs").
    elementwise: bool = False
    # The differentiated inputs, in the implementations' argument order. A loss of several
    # (linear_cross_entropy: hidden, classifier) gets them packed into one tensor through the
    # sweep, and supplies the hooks below; `backward` audits the gradient of the first and
    # `backward_<name>` that of each other one.
    inputs: tuple[str, ...] = ("input",)
    # packed input, target -> the inputs' views, in `inputs` order.
    unpack: Callable[..., tuple] | None = None
    # fn(input_1, input_2, ..., target, reduction, **options) -> fn(packed, target, reduction,
    # **options): how a custom implementation is called (built-ins are adapted already).
    adapt: Callable[[Callable], Callable] | None = None
    # (case, seed, dtype, device) -> (packed input in dtype, int64 targets, options the value
    # set needs, e.g. a bias): the point's input, instead of `make_input` of generated logits.
    make_point: Callable[..., tuple] | None = None
    # reference(loss, inp, target, options, reduction) -> Reference, instead of the generic
    # row-chunked one (a loss whose gradient sums over rows).
    reference_fn: Callable[..., Any] | None = None
    # case -> values of the packed input; case -> bytes the logits would take (recorded).
    input_elements: Callable[..., int] | None = None
    logits_bytes: Callable[..., int] | None = None

    def split(self, values: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A packed input or gradient as one tensor per differentiated input."""
        return (values,) if self.unpack is None else tuple(self.unpack(values, target))

    def custom(self, fn: Callable) -> Callable:
        """A custom implementation as the sweep calls it."""
        return fn if self.adapt is None else self.adapt(fn)

    def make_input(self, logits, dtype: torch.dtype) -> torch.Tensor:
        """The input under test from float64 logits (a tensor, on its device, or numpy
        values), rounded once to `dtype`; never the logits' own storage."""
        if self.input_kind == "probabilities":
            # Tensors in thread-independent pieces (see inputs.pieces); numpy values as before.
            p = pieces(R.sigmoid, logits) if isinstance(logits, torch.Tensor) else R.sigmoid(logits)
            return R.round_to(p, dtype)
        x = torch.as_tensor(logits, dtype=torch.float64)
        if self.input_kind == "log_probabilities":
            # log_softmax of the value set's logits in float64, rounded once below (saturated
            # as a logit would be: a log-probability of −1e8 is not −inf).
            x = torch.log_softmax(x, dim=-1)
        if dtype == torch.float64:  # no finite float64 value is beyond float64's range
            return x.clone()
        out = R.round_to(x, dtype)
        # Finite logits beyond the dtype's range are saturated to its largest finite value
        # (a scale of 1e8 is a large logit in float16 too, not an infinite one); genuine
        # ±inf logits (the `nonfinite` value set: masking with −inf) stay infinite. Only an
        # infinite result can need it (clipping first changes nothing else): the clip costs
        # its passes only then. An infinity is the minimum or the maximum, and a NaN (no
        # generated logit is one) makes both NaN: one reduction, 10 times cheaper than
        # isinf(out).any() on the CPU (isinf is not vectorised there).
        if out.numel() and not bool(torch.stack(torch.aminmax(out)).isfinite().all()):
            limit = torch.finfo(dtype).max
            out = R.round_to(torch.where(torch.isinf(x), x, x.clamp(-limit, limit)), dtype)
        return out

    def make_target(self, labels, dtype: torch.dtype) -> torch.Tensor:
        """Targets from labels (a tensor, on its device, or numpy values): int64 class
        indices (multi-class), 0/1 in `dtype` (binary)."""
        if self.multiclass:
            return torch.as_tensor(labels).to(torch.int64)
        return torch.as_tensor(labels).to(torch.float64).to(dtype)


@dataclass(frozen=True)
class Reference:
    """The reference of one sweep point, rounded to the dtype under test."""

    loss: torch.Tensor  # per element, shaped like the target's rows
    grad: torch.Tensor  # like the input: gradient of the reduced loss (of the sum for "none")
    reduced: torch.Tensor | None  # scalar; None for reduction "none"
    value: float | None  # the reduced value in working precision, before rounding (for display)
    reduction: str = "mean"
    # Why the reduced value is undefined (e.g. 0/0: every target ignored), else None. The
    # reduced value and gradient are then the sensible convention, 0 (nothing to learn).
    undefined: str | None = None
    # Inputs outside the loss's domain (NaN; probabilities beyond [0, 1]): which elements (rows
    # of a multi-class loss; shaped like `loss`) and why, else None. There is no true value
    # there: the reference is NaN, and implementations are recorded, not scored (METRICS.md).
    outside: torch.Tensor | None = None
    out_of_domain: str | None = None
    # The exact per-element values in float64 (losses valued in nats: token_logprobs, entropy,
    # kl_div, js_div), for the absolute error in nats (METRICS.md); None for the others.
    exact: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor | None:
        return self.reduced if self.reduction == "mean" else None

    @property
    def mean_value(self) -> float | None:
        return self.value if self.reduction == "mean" else None


def class_dim(loss: Loss, inp: torch.Tensor, options: dict | None = None) -> int:
    """Where the classes are: the last dimension of (N, C) and of sequence (B, T, V) inputs,
    dimension 1 of (N, C, d1, d2, …) inputs, as torch's cross_entropy and nll_loss take them;
    option `dim` of an elementwise function (log_softmax)."""
    if loss.elementwise:
        return int((options or {}).get("dim", -1)) % inp.dim()
    return 1 if loss.multiclass and not loss.sequence and inp.dim() > 2 else inp.dim() - 1


def _classes_last(loss: Loss, t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if dim == t.dim() - 1 else t.movedim(dim, -1)


def rows_of(
    loss: Loss, inp: torch.Tensor, target: torch.Tensor, options: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target as rows: (R, C) and (R,) or (R, C) for multi-class, (R,) for binary;
    the class dimension of (N, C, d…) inputs (and soft targets) moved last first."""
    if not loss.multiclass:
        return inp.reshape(-1), target.reshape(-1)
    dim = class_dim(loss, inp, options)
    if dim != inp.dim() - 1:
        inp = inp.movedim(dim, -1)
        target = target.movedim(dim, -1) if target.is_floating_point() else target
    c = inp.shape[-1]
    x = inp.reshape(-1, c)
    return x, (target.reshape(-1, c) if target.is_floating_point() else target.reshape(-1))


def element_shape(loss: Loss, inp: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    """The shape of the per-element loss (reduction "none"): the target's, less the class
    dimension of soft targets; the input's for an elementwise function."""
    if loss.elementwise:
        return tuple(inp.shape)
    if loss.multiclass and target.is_floating_point():
        dim = class_dim(loss, inp)
        return tuple(s for i, s in enumerate(target.shape) if i != dim % target.dim())
    return tuple(target.shape)


def _unrows(loss: Loss, grad_rows: torch.Tensor, inp: torch.Tensor, options: dict | None = None) -> torch.Tensor:
    """The reverse of `rows_of` for a gradient: rows back to the input's layout."""
    dim = class_dim(loss, inp, options) if loss.multiclass else 0
    if loss.multiclass and dim != inp.dim() - 1:
        return grad_rows.reshape(inp.movedim(dim, -1).shape).movedim(-1, dim)
    return grad_rows.reshape(inp.shape)


def _per_element(loss: Loss, loss_rows: torch.Tensor, inp, target, layout) -> torch.Tensor:
    """The per-element losses (R,), or an elementwise function's rows (R, C), in their shape."""
    if loss.elementwise:
        return _unrows(loss, loss_rows, inp, layout)
    return loss_rows.reshape(element_shape(loss, inp, target))


def _upstream_rows(loss: Loss, grad_output, reduction: str, inp, options) -> torch.Tensor | None:
    """The upstream gradient as rows (METRICS.md "Upstream gradients"): only for "none"; (R,)
    per row, or (R, C) laid out as the input's rows for an elementwise function."""
    if grad_output is None or reduction != "none":
        return None
    if loss.elementwise:
        return rows_of(loss, grad_output, grad_output, options)[0]
    return grad_output.reshape(-1)


def _weigh_rows(gw, g):
    """g_i·∇ℓ_i: each row's gradient times its upstream gradient; a zero removes the row
    (0 even where ∇ℓ_i is infinite), a NaN gradient (no limit) stays NaN."""
    g = g[:, None] if gw.ndim == 2 else g
    return R.weigh(gw, g, undefined=gw != gw)


def reference(
    loss: Loss,
    inp: torch.Tensor,
    target: torch.Tensor,
    options: dict | None = None,
    reduction: str = "mean",
    grad_output: torch.Tensor | None = None,
) -> Reference:
    """Evaluate `loss`'s reference on `inp`/`target` chunk by chunk (bounded memory).

    float32/float16/bfloat16 inputs are evaluated in float64 tensors on their own device,
    and the result (`Reference`'s tensors) stays there; float64 inputs in numpy long double
    on the host where that is extended precision and the input on the CPU (its rounded
    result put back on the input's device), else in double-double tensors on their device
    (`_reference_dd`; `reference.path`). Only `Reference.value` (one number) is read on the host.

    `options` are the implementation's keyword options (tensors are read exactly in
    working precision). The mean's denominator is summed first (it depends on the
    targets and weights only), so that the gradient of the mean is divided once and
    rounded once. `grad_output` (reduction "none" only; shaped like the per-element loss, in
    the dtype): the gradient is that of Σ g_i·ℓ_i, each row's scaled exactly before rounding.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    if loss.reference_fn is not None:
        return loss.reference_fn(loss, inp, target, options, reduction)
    dtype = inp.dtype
    how = R.path(dtype, inp.device)
    if how == "dd" and getattr(loss.reference_chunk, "dd", None) is not None:
        return _mark_domain(loss, inp, _reference_dd(loss, inp, target, options, reduction, grad_output))
    work = R.work_dtype(dtype)
    ext = work is not np.float64
    device = inp.device
    layout = options  # `dim` of an elementwise function: where its rows lie, not a formula's option
    x_rows, t_rows = rows_of(loss, inp, target, layout)
    options = {k: v for k, v in (options or {}).items() if k != "dim"}
    n = x_rows.shape[0]
    row_elems = x_rows[0].numel() if n else 1
    chunk = R.CHUNK_ELEMENTS if ext else R.chunk_elements(device, R.HOST_FLOAT64_CHUNK_ELEMENTS)

    def read(t):
        """Values exactly in working precision: numpy long double, or float64 on the device."""
        if ext:
            return R.to_work(t, work) if t.is_floating_point() else t.detach().cpu().numpy()
        return t.detach().to(device=device, dtype=R.WORK) if t.is_floating_point() else t.detach().to(device)

    opts = {k: (read(v) if isinstance(v, torch.Tensor) else v) for k, v in _binary_options(loss, inp, options).items()}
    per_row = {k: v for k, v in opts.items() if _per_element_option(loss, k, v)}
    upstream = _upstream_rows(loss, grad_output, reduction, inp, layout)
    g_rows = None if upstream is None else read(upstream)

    def chunk_options(rows):
        return {**opts, **{k: v[rows] for k, v in per_row.items()}}

    def new_sum():
        return R.CompensatedSum() if ext else R.TensorCompensatedSum()

    count = x_rows.numel() if loss.elementwise else n  # the mean of a tensor output: over every element
    denominator = work(count) if ext else torch.tensor(float(count), dtype=R.WORK, device=device)
    if loss.denominators is not None:
        total_d = new_sum()
        for rows in R.row_chunks(n, row_elems, chunk):
            d = loss.denominators(read(t_rows[rows]), **chunk_options(rows))
            total_d.add(np.asarray(d, dtype=work) if ext else d.to(R.WORK))
        denominator = total_d.mean(1, work)
    undefined = None
    if reduction == "mean" and bool(denominator == 0):
        undefined = (
            "every target is ignored: the mean is 0/0, undefined; "
            "the sensible answer is 0 with gradient 0 (nothing to learn from)"
        )
    divide = reduction == "mean" and not undefined
    loss_out = torch.empty(x_rows.shape if loss.elementwise else n, dtype=dtype, device=device)
    grad_out = torch.empty(x_rows.shape, dtype=dtype, device=device)
    small = x_rows.numel() <= R.MEMO_ELEMENTS and device.type == "cpu"
    total = new_sum()

    def weighed(gw, rows):
        """A chunk's gradient before its division: 0 for an undefined mean, the rows' upstream weights."""
        if undefined:
            gw = np.zeros_like(gw) if ext else torch.zeros_like(gw)
        if g_rows is not None and not loss.elementwise:
            gw = _weigh_rows(gw, g_rows[rows])
        return gw

    def finish(gw, rows):
        """A long double gradient as it is rounded (a block's: `extended_rows.rounded`)."""
        gw = weighed(gw, rows)
        return gw / denominator if divide else gw

    for rows in R.row_chunks(n, row_elems, chunk):
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            # An elementwise function's reference takes the upstream gradient: its own VJP.
            extra = {"grad_output": g_rows[rows]} if loss.elementwise and g_rows is not None else {}
            t_chunk = read(t_rows[rows])
            if ext and not small:  # in row blocks on the run's threads, rounding included
                lw = extended_rows.rounded(
                    loss.reference_chunk,
                    x_rows[rows].detach().cpu().numpy(),
                    t_chunk,
                    chunk_options(rows),
                    per_row,
                    extra,
                    torch.get_num_threads(),
                    lambda gw, b, r=rows: finish(gw, slice(r.start + b.start, r.start + b.stop)),
                    loss_out[rows].numpy(),
                    grad_out[rows].numpy(),
                )
                if lw is not None:
                    total.add(lw)
                    continue
            lw, gw = _chunk(loss, read(x_rows[rows]), t_chunk, chunk_options(rows), extra, small)
            loss_out[rows] = R.round_to(lw, dtype)
            gw = weighed(gw, rows)
            if dtype == torch.float32 and not ext:
                # Rounded as it is stored (round_to's float32 rounding is the IEEE conversion
                # the store does). (A division into the float32 output, without the float64
                # quotient, is a slower mixed-dtype pass: 0.26 against 0.18 ms per 2**18.)
                grad_out[rows] = gw / denominator if divide else gw
            else:
                grad_out[rows] = R.round_to(gw / denominator if divide else gw, dtype)
        total.add(lw)
    value = None
    if reduction != "none":
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if undefined:
                value = work(0) if ext else torch.zeros((), dtype=R.WORK, device=device)
            else:
                value = total.mean(1, work) / (denominator if divide else 1)
    reduced = None
    if value is not None:
        reduced = R.round_to(np.asarray([value], dtype=work) if ext else value.reshape(1), dtype)[0].to(device)
    return _mark_domain(
        loss,
        inp,
        Reference(
            loss=_per_element(loss, loss_out, inp, target, layout),
            grad=_unrows(loss, grad_out, inp, layout),
            reduced=reduced,
            value=None if value is None else float(value),
            reduction=reduction,
            undefined=undefined,
        ),
    )


_MEMO = R.ChunkMemo()


def _chunk(loss: Loss, x, t, options: dict, extra: dict, small: bool):
    """loss.reference_chunk(x, t, **options, **extra), kept for the point's other reductions
    where the point is `small` (reference.ChunkMemo)."""
    key = _MEMO.key(loss.name, x, t, options, extra) if small else None
    if key is not None:
        key = (loss.reference_chunk, key)  # the function itself: a loss replaced under its name
    got = None if key is None else _MEMO.get(key)
    if got is None:
        got = loss.reference_chunk(x, t, **options, **extra)
        if key is not None:
            _MEMO.put(key, got)
    return got


def _mark_domain(loss: Loss, inp: torch.Tensor, ref: Reference) -> Reference:
    """`ref`, marked where the input is outside the loss's domain (`inputs.outside_domain`)."""
    if loss.input_kind == "logits" and not bool(ref.loss.isnan().any()):
        return ref  # a NaN logit makes its row's reference NaN: no pass over a large input otherwise
    if loss.elementwise:
        # A function with one output per input (log_softmax): a NaN input makes its row's
        # outputs NaN along whichever dimension it normalises, which the reference shows.
        if not bool(outside_domain(inp, loss.input_kind).any()):
            return ref
        rows = ref.loss.isnan()
    elif loss.multiclass:
        # Rows in blocks: a bool copy of a 2**32-value input would be 4 GiB.
        flat = inp.reshape(-1, inp.shape[-1])
        rows = torch.cat([outside_domain(flat[b], loss.input_kind).any(-1) for b in R.row_chunks(*flat.shape)])
    else:
        rows = outside_domain(inp, loss.input_kind)
    if not bool(rows.any()):
        return ref
    rows = rows.reshape(ref.loss.shape)
    what = "NaN or outside [0, 1]" if loss.input_kind == "probabilities" else "NaN"
    why = (
        f"{int(rows.sum())} of {rows.numel()} {'rows' if loss.multiclass else 'elements'} have inputs outside "
        f"the domain of {loss.name} ({what}): there is no true value, the reference is NaN there"
    )
    # A formula may still give a number there (−log p at p = 1 + ulp): no true value all the same.
    elems = rows.reshape(*rows.shape, *([1] * (inp.dim() - rows.dim()))).expand(inp.shape)
    return replace(
        ref,
        loss=ref.loss.masked_fill(rows, math.nan),
        grad=ref.grad.masked_fill(elems, math.nan),
        reduced=None if ref.reduced is None else torch.full_like(ref.reduced, math.nan),
        value=None if ref.value is None else math.nan,
        outside=rows,
        out_of_domain=why,
    )


def _per_element_option(loss: Loss, name: str, value) -> bool:
    """Whether an option holds one value per element of a binary loss (sliced with the rows
    of each chunk): its weight, and a pos_weight spread by `_binary_options`."""
    if loss.multiclass:
        return False
    return name == "weight" or (
        name == "pos_weight" and int(np.size(value) if isinstance(value, np.ndarray) else value.numel()) > 1
    )


def _binary_options(loss: Loss, inp: torch.Tensor, options: dict | None) -> dict:
    """`options`, with a binary loss's pos_weight vector (one per class of (N, C) multi-label
    inputs, as torch broadcasts it against the input) spread over the input's elements."""
    opts = dict(options or {})
    pw = opts.get("pos_weight")
    if not loss.multiclass and isinstance(pw, torch.Tensor) and pw.numel() > 1:
        opts["pos_weight"] = torch.broadcast_to(pw, inp.shape).reshape(-1)
    if not loss.multiclass and isinstance(opts.get("weight"), torch.Tensor):  # (N, C) multi-label: as the rows
        opts["weight"] = opts["weight"].reshape(-1)
    return opts


# The sum of the losses is also carried scaled by 2**-_DD_SHIFT, for means of losses near 1e308.
_DD_SHIFT = 64


def _reference_dd(
    loss: Loss,
    inp: torch.Tensor,
    target: torch.Tensor,
    options: dict | None,
    reduction: str,
    grad_output: torch.Tensor | None = None,
) -> Reference:
    """`reference` for float64 inputs in double-double (losscheck.doubledouble), on the
    input's device: each chunk's loss and gradient come as scaled dds (hi, lo, k), rounded
    to float64 once (`round_scaled`: correctly, subnormals included); the sums that reduce
    them and the mean's denominator are carried as dds, and divided in dd before rounding."""
    from .. import doubledouble as D

    device = inp.device
    layout = options  # `dim` of an elementwise function: where its rows lie, not a formula's option
    x_rows, t_rows = rows_of(loss, inp, target, layout)
    options = {k: v for k, v in (options or {}).items() if k != "dim"}
    n = x_rows.shape[0]
    row_elems = x_rows[0].numel() if n else 1
    chunk = R.chunk_elements(device, R.HOST_DD_CHUNK_ELEMENTS)
    dd_chunk = loss.reference_chunk.dd
    assert dd_chunk is not None, "reference() takes this path only for a loss with a dd formulation"
    opts = {
        k: (v.detach().to(device=device, dtype=R.WORK) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in _binary_options(loss, inp, options).items()
    }
    per_row = {k for k, v in opts.items() if _per_element_option(loss, k, v)}
    upstream = _upstream_rows(loss, grad_output, reduction, inp, layout)

    def chunk_options(rows):
        return {k: (v[rows] if k in per_row else v) for k, v in opts.items()}

    count = x_rows.numel() if loss.elementwise else n  # the mean of a tensor output: over every element
    denominator = D.dd(torch.tensor(float(count), dtype=R.WORK, device=device))
    if loss.denominators is not None:
        total_d = R.TensorCompensatedSum()
        for rows in R.row_chunks(n, row_elems, chunk):
            total_d.add(loss.denominators(t_rows[rows].detach().to(device), **chunk_options(rows)).to(R.WORK))
        denominator = total_d.total_dd(device)
    undefined = None
    if reduction == "mean" and bool(denominator[0] == 0):
        undefined = (
            "every target is ignored: the mean is 0/0, undefined; "
            "the sensible answer is 0 with gradient 0 (nothing to learn from)"
        )
    divide = reduction == "mean" and not undefined
    # A power-of-two denominator (the mean over a batch of 2**k rows) divides exactly by
    # moving the scale: no division per entry (a third of a cross entropy's dd time).
    mantissa, exponent = torch.frexp(denominator[0])
    power_of_two = divide and bool((mantissa == 0.5) & (denominator[1] == 0))
    loss_out = torch.empty(x_rows.shape if loss.elementwise else n, dtype=torch.float64, device=device)
    grad_out = torch.empty(x_rows.shape, dtype=torch.float64, device=device)
    total, total_scaled = R.TensorCompensatedSum(), R.TensorCompensatedSum()
    for rows in R.row_chunks(n, row_elems, chunk):
        extra = {}
        if loss.elementwise and upstream is not None:  # the upstream gradient's own VJP
            extra["grad_output"] = upstream[rows].to(device=device, dtype=R.WORK)
        lw, gw = dd_chunk(
            x_rows[rows].detach().to(R.WORK), t_rows[rows].detach().to(device), **chunk_options(rows), **extra
        )
        loss_out[rows] = D.round_scaled(*lw)
        if undefined:
            gw = D.exact_scaled(0.0, gw[0])
        elif power_of_two:
            gw = (gw[0], gw[1], gw[2] - (exponent.to(torch.int64) - 1))
        elif divide:
            gw = D.normalize_scaled(gw)
            d = (denominator[0].expand_as(gw[0]), denominator[1].expand_as(gw[0]))
            gw = (*D.div(gw[:2], d), gw[2])
        if upstream is not None and not loss.elementwise:
            g = upstream[rows].to(device=device, dtype=R.WORK)
            gw = D.weigh_scaled(gw, g[:, None] if gw[0].dim() == 2 else g, undefined=gw[0].isnan())
        grad_out[rows] = D.round_scaled(*gw)
        for t, shift in ((total, 0), (total_scaled, _DD_SHIFT)):
            t.add(D.ldexp(lw[0], lw[2] - shift))
            t.add(D.ldexp(lw[1], lw[2] - shift))
    value = reduced = None
    shift0 = torch.zeros((), dtype=torch.int64, device=device)
    if reduction != "none":
        value = D.exact_scaled(0.0, denominator[0]) if undefined else (*total.total_dd(device), shift0)
        if not undefined and not bool(value[0].isfinite()):
            # The sum left float64's range (losses near 1e308) but its mean may not: the
            # same sum scaled by 2**-_DD_SHIFT (IEEE's inf/NaN where terms are inf/NaN).
            scaled = total_scaled.total_dd(device)
            value = (*scaled, shift0 + _DD_SHIFT) if bool(scaled[0].isfinite()) else value
        if divide:
            value = (*D.div(value[:2], denominator), value[2])
        reduced = D.round_scaled(*(v.reshape(1) for v in value))[0]
    return Reference(
        loss=_per_element(loss, loss_out, inp, target, layout),
        grad=_unrows(loss, grad_out, inp, layout),
        reduced=reduced,
        value=None if reduced is None or value is None else float(D.ldexp(value[0] + value[1], value[2])),
        reduction=reduction,
        undefined=undefined,
    )
