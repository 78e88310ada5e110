"""The tensor audit behind `losscheck probe` and `losscheck.probe(...)`: the exact inputs that broke a
training run, measured as bench measures a sweep point.

Split by what it does: `load` (inline lists and files), `convert` (once, to the dtype under
test), `evaluate` (bench's point and records), `notes` (limits and undefined values),
`render` (table, JSON), `text` (how values are written). The Click command is
`losscheck.probe_command`; this package is named `probing` so that no submodule shadows the
function `losscheck.probe`.

The inputs come inline (JSON-style lists: ``'[inf, 1.0]'``, ``'[[1, 2], [3, -inf]]'``;
``inf``, ``-inf`` and ``nan`` are accepted) or from files: ``.pt``/``.pth`` (``torch.load``
with ``weights_only=True``: a tensor, a dict holding one tensor, or ``FILE.pt:KEY``),
``.npy``, ``.npz`` (the only array, or ``FILE.npz:KEY``). Each is converted **once** to the
dtype under test (correctly rounded: ``reference.round_to`` from float64 sources,
``tensor.to(dtype)`` otherwise), and the output says whether that conversion changed any
value; the reference is computed from the converted values (METRICS.md, "Inputs").

The numbers are bench's, by construction: the probe builds a `sweep.PointData` and a
`sweep.Case` of the probe's shape, computes `losses.reference` and calls `sweep.evaluate`
for every implementation (naive, stable, torch, and the user's own, ``--impl`` /
``--numpy-impl``), exactly as a sweep point is measured. On top of the record it finds each
implementation's worst element (per-element ULP distances of its ``"none"`` output against
the reference) and explains the points where the true value is a limit (±inf logits) or
undefined (0/0 when every target is ignored; several +inf logits in one row; a NaN input).
Its findings are bench's (`findings.findings` on its records, every kind but `formula`,
which needs a sweep), printed under the table and in the JSON's `findings`.

Shapes: binary losses (``bce`` on probabilities — values beyond [0, 1] and NaN are measured
as out of domain, not refused —, ``bce_with_logits``, ``sigmoid_bce``) take an input of any
shape with a target of labels in [0, 1] (hard or soft) of the same shape, flattened to
``(N,)`` (the losses are elementwise, so the mean and sum do not change; element indices are
reported in the original shape; a per-class ``--pos-weight`` vector is spread with them);
``cross_entropy`` takes ``(N, C)`` logits with ``(N,)`` class indices or an
``(N, C)`` floating target (soft targets); ``sequence_cross_entropy`` takes ``(B, T, V)``
logits with ``(B, T)`` class indices, ``-100`` marking padding unless ``--ignore-index``
says otherwise.

Memory: a probe holds what a bench point of the same shape holds (`sweep.INPUT_COPIES`,
6 copies of the input in the dtype under test: the input, an implementation's own copy of
it, the reference's gradient, the implementation's gradient and its working copies), plus the
per-row outputs. Files are read without a float64 copy of the whole input: ``.npy`` files are memory-mapped and ``.pt``
files (zip format, the default since torch 1.6) are loaded with ``mmap=True``; when the
file's dtype is the dtype under test its tensor is used as is, otherwise it is converted in
blocks of 2^20 values into one tensor of the dtype. ``.npz`` members and old-format ``.pt``
files are read whole (one more copy, in the file's dtype). Before converting, the probe
checks the estimate against the memory available (`sweep.memory_problem`, which honours
``LOSSCHECK_MEMORY_LIMIT``) and refuses with a one-line error rather than being killed.

Everything a user can get wrong is a `ProbeError` (a `ConfigError`, so: one line on
stderr and exit code 2 through the CLI's group); an implementation that fails is a result
(``status: error``), as in bench.
"""

from __future__ import annotations

from .convert import Conversion, convert
from .evaluate import OPTION_FLAGS, ProbeResult, run_probe, supported_flags
from .load import BLOCK, FILE_SUFFIXES, INLINE_HELP, Loaded, ProbeError, load_array, parse_inline
from .render import HEADERS, render_table, table_rows, to_dict, to_json

__all__ = [
    "BLOCK",
    "FILE_SUFFIXES",
    "HEADERS",
    "INLINE_HELP",
    "OPTION_FLAGS",
    "Conversion",
    "Loaded",
    "ProbeError",
    "ProbeResult",
    "convert",
    "load_array",
    "parse_inline",
    "render_table",
    "run_probe",
    "supported_flags",
    "table_rows",
    "to_dict",
    "to_json",
]
