"""The extended (long double) reference on the run's threads (reference.map_chunks): the
same bits as one chunk after another, chunks in order, failures raised, memory bounded."""

from __future__ import annotations

import threading

import pytest
import torch

from losscheck import reference as R
from losscheck.losses import LOSSES, reference

pytestmark = pytest.mark.skipif(R.path(torch.float64) != "extended", reason="no x86 extended precision here")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _input(rows: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, classes, dtype=torch.float64, generator=g) * 30
    x[5, 7], x[9, 2], x[11] = -torch.inf, torch.inf, -torch.inf  # limits in some chunks
    return x, torch.randint(0, classes, (rows,), generator=g)


@pytest.mark.parametrize("name, reduction", [("cross_entropy", "mean"), ("nll_loss", "sum"), ("bce_with_logits", "none")])
def test_threaded_chunks_give_the_bits_of_one_thread(threads, name, reduction):
    loss = LOSSES[name]
    if loss.multiclass:
        x, t = _input(3000, 300)  # 900,000 logits: 4 chunks of 2**18
        if name == "nll_loss":
            x = torch.log_softmax(x.nan_to_num(posinf=50.0, neginf=-50.0), 1)
    else:
        x, _ = _input(3000, 300)
        x = x.reshape(-1)
        t = (torch.arange(x.numel()) % 3 == 0).double()
    threads(1)
    one = reference(loss, x, t, {}, reduction)
    threads(2)
    two = reference(loss, x, t, {}, reduction)
    assert torch.equal(one.loss.view(torch.int64), two.loss.view(torch.int64))
    assert torch.equal(one.grad.view(torch.int64), two.grad.view(torch.int64))
    assert repr(one.value) == repr(two.value)  # None, a number or nan alike


def test_map_chunks_keeps_order_and_bounds_what_is_in_flight(threads):
    threads(2)
    running, most, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return i * i
        finally:
            with lock:
                running[0] -= 1

    assert list(R.map_chunks(fn, range(50), threaded=True)) == [i * i for i in range(50)]
    assert most[0] <= 2


def test_map_chunks_raises_a_chunks_failure_and_leaves_nothing_running(threads):
    threads(2)
    started = []

    def fn(i):
        started.append(i)
        if i == 3:
            raise ValueError("chunk 3")
        return i

    with pytest.raises(ValueError, match="chunk 3"):
        list(R.map_chunks(fn, range(100), threaded=True))
    assert len(started) <= 3 + 2 + 1  # chunks after the failure were not all started
