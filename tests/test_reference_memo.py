"""reference.ChunkMemo: a small point's chunk results shared by its reductions — the same
bits as computing them again, each caller its own copy, and no key shared by different values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from losscheck import reference as R
from losscheck import sweep
from losscheck.config import config_from_dict
from losscheck.losses import LOSSES, base, reference

REDUCTIONS = ("mean", "sum", "none")


def _point(loss_name: str, dtype: str, options: dict):
    stored = {"name": "c", "losses": [loss_name], "implementations": ["torch"], "scales": [30],
              "batch_sizes": [64], "classes": [10], "dtypes": [dtype], "distributions": ["normal"],
              "timing": False, **options}
    config = config_from_dict(stored, "memo")
    case = next(sweep.cases(config))
    return sweep.point_data(LOSSES[loss_name], case, 0)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("loss_name, options", [
    ("bce_with_logits", {"targets": ["soft"], "weights": ["random"], "pos_weights": [1000]}),
    ("cross_entropy", {"label_smoothing": [0.1], "ignored": [0.25]}),
])
def test_memo_gives_the_bits_of_computing_again(monkeypatch, dtype, loss_name, options):
    data = _point(loss_name, dtype, options)
    loss = LOSSES[loss_name]
    kept = [reference(loss, data.inp, data.target, data.options, r) for r in REDUCTIONS]
    monkeypatch.setattr(R, "MEMO_ELEMENTS", -1)  # no point is small: every chunk computed
    again = [reference(loss, data.inp, data.target, data.options, r) for r in REDUCTIONS]
    for a, b in zip(kept, again, strict=True):
        assert _same(a.loss, b.loss) and _same(a.grad, b.grad) and _same(a.reduced, b.reduced)
        assert repr(a.value) == repr(b.value)


def test_the_reductions_of_a_point_evaluate_its_chunk_once(monkeypatch):
    calls = []
    real = LOSSES["bce_with_logits"]

    def counted(*a, **k):
        calls.append(1)
        return real.reference_chunk(*a, **k)

    loss = dataclasses.replace(real, reference_chunk=counted)  # same name, another function
    data = _point("bce_with_logits", "float32", {"targets": ["soft"]})
    reference(real, data.inp, data.target, data.options, "mean")  # kept under the real function
    for r in REDUCTIONS:
        reference(loss, data.inp, data.target, data.options, r)
    assert len(calls) == 1
    monkeypatch.setattr(R, "MEMO_ELEMENTS", -1)
    reference(loss, data.inp, data.target, data.options, "mean")
    assert len(calls) == 2


def test_each_caller_gets_its_own_copy():
    memo = R.ChunkMemo()
    key = memo.key("x", np.arange(3.0))
    memo.put(key, (np.ones(3), torch.ones(2)))
    a, t = memo.get(key)
    a[:] = 7.0
    t.fill_(7.0)
    b, u = memo.get(key)
    assert b.tolist() == [1.0, 1.0, 1.0] and u.tolist() == [1.0, 1.0]


def test_keys_tell_apart_what_differs_and_leave_out_what_they_cannot_read():
    memo = R.ChunkMemo()
    z = torch.zeros(4, dtype=torch.float64)
    keys = {
        memo.key("bce", z, {"pos_weight": 1.0}),
        memo.key("bce", -z, {"pos_weight": 1.0}),  # −0.0: other bits
        memo.key("bce", z.float(), {"pos_weight": 1.0}),  # other dtype, same values
        memo.key("bce", z, {"pos_weight": 1.0000000000000002}),
        memo.key("bce", z.reshape(2, 2), {"pos_weight": 1.0}),
        memo.key("bce_with_logits", z, {"pos_weight": 1.0}),
        memo.key("bce", z, {"pos_weight": np.longdouble(1) + np.finfo(np.longdouble).eps}),
    }
    assert len(keys) == 7 and None not in keys
    assert memo.key("bce", object()) is None  # not readable: not kept
    memo2 = R.ChunkMemo(size=2)
    for i in range(3):
        memo2.put(memo2.key(i), (np.full(1, float(i)),))
    assert memo2.get(memo2.key(0)) is None and memo2.get(memo2.key(2))[0].tolist() == [2.0]
