"""A sweep point's tensors: inputs, targets, options and upstream gradient, generated from the
seed on the point's device and rounded once to its dtype (METRICS.md, "Inputs"), and the
memory a point needs (`estimate_bytes`). Split from sweep.py, which re-exports these names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import inputs, reference as R
from .config import spatial_dims
from .dtypes import FORMATS
from .losses import IGNORE_INDEX, LOSSES, Loss
from .losses.base import element_shape
from .losses.cross_entropy_lm import mask_vocab

# Options of language-model training passed to the implementations as the point sets them.
# Point options the implementations take as they are (numbers and names): the language-model
# cross-entropy options and linear_cross_entropy's logits_precision.
AS_IS_OPTIONS = ("z_loss", "softcap", "smoothing_convention", "shards", "shard_mistake", "logits_precision")

if TYPE_CHECKING:
    from .sweep import Case

# The memory estimate of a point, in copies of its input (in the dtype under test): the
# input, the implementation's own copy of it (custom ones; built-ins share the input, so the
# estimate is one copy high for them), the reference's gradient, the implementation's
# gradient and two working copies (naive and torch hold exp(x) or log_softmax(x) for the
# backward); see `estimate_bytes`.
INPUT_COPIES = 6


class _InputCache:
    """The float64 inputs of the last (loss, device, batch, classes, time, distribution,
    scale), for inputs small enough to be generated at once (see `inputs.GENERATE_CHUNK`):
    every dtype, reduction and option set of that input reuses them."""

    def __init__(self, seed: int):
        self.seed = seed
        self.key: tuple | None = None
        self.value: tuple | None = None

    def get(self, loss: Loss, case: Case):
        key = (case.loss, case.device, case.batch, case.classes, _times(case), case.distribution, case.scale)
        if key != self.key:
            self.value = None  # free the previous input before making the next
            if loss.multiclass:
                ((_, x, t),) = inputs.generate_blocks(
                    case.loss,
                    case.batch,
                    case.classes,
                    case.scale,
                    case.distribution,
                    self.seed,
                    _times(case),
                    case.device,
                )
                self.value = x, t
            else:
                self.value = inputs.generate(
                    case.loss, False, rows_of(case), None, case.scale, case.distribution, self.seed, case.device
                )
            self.key = key
        return self.value


@dataclass
class PointData:
    """The tensors of one case in the dtype under test, on its device: what every
    implementation gets (a copy of)."""

    inp: torch.Tensor
    target: torch.Tensor
    options: dict  # the implementations' keyword options (tensors and numbers)
    # The upstream gradient of a `reduction: none` point (like the per-element loss, in the
    # dtype); None: ones.
    grad_output: torch.Tensor | None = None

    def on(self, device: str, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Copies on `device` (on the CPU too): an implementation that writes into its input
        or options must not corrupt those of the implementations after it (a correct one was
        reported 28 bits off that way, issue 16). `copy=False`: the tensors themselves where
        already on `device`, for the built-in implementations, which never write into their
        inputs (tests/test_inputs.py): a copy of a large input costs a fifth of a forward+backward."""
        opts = {k: (v.to(device, copy=copy) if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()}
        return self.inp.to(device, copy=copy), self.target.to(device, copy=copy), opts


def spatial_of(case: Case) -> tuple[int, ...]:
    """The d1, d2, … of an (N, C, d1, d2, …) point; () for (N, C)."""
    return tuple(spatial_dims(dict(case.options).get("spatial", "none")))


def labels_of(case: Case) -> int:
    """The C of an (N, C) multi-label binary point; 1 for the flat (N,) input."""
    return int(dict(case.options).get("labels", 1))


def _times(case: Case) -> int | None:
    """Rows per batch entry, for the generator: the sequence length, or the positions of an
    (N, C, d…) input (its rows are those of N·d1·d2·… independent (1, C) rows), or the labels
    of an (N, C) multi-label binary input (N·C independent elements)."""
    positions = math.prod(spatial_of(case)) * labels_of(case)
    return case.time if positions == 1 else (case.time or 1) * positions


def rows_of(case: Case) -> int:
    return case.batch * (_times(case) or 1)


def point_data(loss: Loss, case: Case, seed: int, cache: _InputCache | None = None) -> PointData:
    """Inputs, targets and options of `case`, generated from the seed on its device and
    rounded once to the dtype (METRICS.md, "Inputs"). Large multi-class inputs go block by
    block straight into the dtype: they never exist in float64 at once."""
    dtype = FORMATS[case.dtype].torch_dtype
    device = torch.device(case.device)
    rows = rows_of(case)
    opts = dict(case.options)  # the point's option values, by name
    options: dict = {}
    if loss.make_point is not None:  # several inputs (hidden states, classifier): the loss's own
        inp, labels, options = loss.make_point(case, seed, dtype, device)
    elif loss.multiclass and case.classes is not None and rows * case.classes > inputs.GENERATE_CHUNK:
        inp = torch.empty((rows, case.classes), dtype=dtype, device=device)
        labels = torch.empty(rows, dtype=torch.int64, device=device)
        offsets = inputs.row_offsets(case.distribution, case.dtype, rows, device)
        for block, x, t in inputs.generate_blocks(
            case.loss, case.batch, case.classes, case.scale, case.distribution, seed, _times(case), device
        ):
            inp[block] = loss.make_input(x if offsets is None else x + offsets[block], dtype)
            labels[block] = torch.as_tensor(t, device=device)
            del x
    else:
        logits, labels = (cache or _InputCache(seed)).get(loss, case)
        offsets = inputs.row_offsets(case.distribution, case.dtype, rows, device)
        inp = loss.make_input(logits if offsets is None else logits + offsets, dtype)
    if case.distribution == inputs.OUT_OF_DOMAIN:
        inp = inputs.out_of_domain(inp, loss.input_kind, loss.multiclass)
    if float(opts.get("masked_vocab", 0.0)):  # −inf vocabulary padding (issue 18)
        inp, labels = mask_vocab(inp, labels, float(opts["masked_vocab"]))
    values = inputs.option_values(case.loss, loss.multiclass, opts, rows, case.classes, labels, seed, device)
    if "weight" in values:
        options["weight"] = R.round_to(values["weight"], dtype)
    if "pos_weight" in values:  # one number, or one per label (broadcast over the rows as torch does)
        pw = values["pos_weight"]
        options["pos_weight"] = R.round_to(
            torch.tensor(pw if isinstance(pw, tuple) else (pw,), dtype=torch.float64, device=device), dtype
        )
    if "label_smoothing" in values:
        options["label_smoothing"] = values["label_smoothing"]
    for key in AS_IS_OPTIONS:
        if key in opts:
            options[key] = opts[key]
    for name in ("gamma", "alpha"):  # focal losses: plain numbers
        if name in opts:
            options[name] = float(opts[name])
    if opts.get("chunks"):
        options["chunks"] = int(opts["chunks"])
    if "soft" in values:
        if case.distribution in inputs.MASKED_SOFT or "masked_vocab" in opts:
            values["soft"] = inputs.zero_masked(values["soft"], inp)
        target = R.round_to(values["soft"], dtype)
    else:
        target = loss.make_target(labels, dtype)
    if "ignored" in values or loss.sequence:
        target = target.clone()
        mask = values.get("ignored")
        if loss.sequence:
            assert case.time is not None, "a sequence point has a time"
            mask = inputs.sequence_padding(case.batch, case.time, seed, device).reshape(-1)
        target[torch.as_tensor(mask, device=target.device)] = IGNORE_INDEX
        options["ignore_index"] = IGNORE_INDEX
    if loss.sequence:
        assert case.time is not None and case.classes is not None, "a sequence point has time and classes"
        inp = inp.reshape(case.batch, case.time, case.classes)
        target = target.reshape(case.batch, case.time)
    dims = spatial_of(case)
    if dims:
        # Rows (N·d1·d2·…, C) as torch's (N, C, d1, d2, …), contiguous as a model's output is.
        inp = inp.reshape(case.batch, *dims, -1).movedim(-1, 1).contiguous()
        if target.is_floating_point():
            target = target.reshape(case.batch, *dims, -1).movedim(-1, 1).contiguous()
        else:
            target = target.reshape(case.batch, *dims)
    if labels_of(case) > 1:  # (N, C) multi-label: the N·C elements as rows of C labels
        inp, target = inp.reshape(case.batch, -1), target.reshape(case.batch, -1)
        if "weight" in options:
            options["weight"] = options["weight"].reshape(case.batch, -1)
    dim = int(opts.get("dim", -1))
    if dim != -1:
        # log_softmax along dimension 0: the value set's rows as the columns of (C, N).
        inp = inp.T.contiguous()
        options["dim"] = dim
    grad_output = None
    kind = opts.get("grad_output")
    if kind is not None:
        shape = element_shape(loss, inp, target)
        grad_output = R.round_to(inputs.grad_output_values(kind, case.loss, shape, seed, device), dtype)
    return PointData(inp, target, options, grad_output)


def estimate_bytes(case: Case) -> int:
    """Memory one point needs beyond what the process holds already: INPUT_COPIES copies of
    the input in its dtype (soft targets: one more), and the float64 input of a cached case."""
    elements = rows_of(case) * (case.classes or 1)
    copies = INPUT_COPIES + (1 if dict(case.options).get("targets") == "soft" else 0)
    cached = 8 * elements if elements <= inputs.GENERATE_CHUNK else 0
    count = LOSSES[case.loss].input_elements
    if count is not None:
        # Hidden states and classifier: the logits (elements) as the input above, for the
        # implementations that materialise them, plus the packed input and the reference's
        # float64 copies of it and of its gradient (no cached input).
        return elements * FORMATS[case.dtype].torch_dtype.itemsize * copies + 24 * count(case)
    return elements * FORMATS[case.dtype].torch_dtype.itemsize * copies + cached
