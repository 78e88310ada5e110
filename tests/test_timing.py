"""timing._calibrate: the block size of the timing rounds, and what calibrating costs."""

from __future__ import annotations

import pytest
import torch

from losscheck import timing


class _FakeTimer:
    """A timer whose every run takes `per_run` seconds; counts the runs it was asked for."""

    def __init__(self, per_run: float):
        self.per_run = per_run
        self.runs = 0

    def timeit(self, number: int):
        self.runs += number
        return type("M", (), {"median": self.per_run})()


@pytest.mark.parametrize("per_run", [1e-7, 3e-6, 1e-4, 7e-4, 2e-3, 0.5])
@pytest.mark.parametrize("block", [0.01 / 11, 0.05 / 11, 0.2])
def test_a_block_lasts_about_the_block_time_and_calibration_a_fraction_of_it(per_run, block):
    t = _FakeTimer(per_run)
    number, measured = timing._calibrate(t, block)
    assert measured == per_run
    assert number == max(1, round(block / per_run))
    # The whole calibration (warm-up included) is under a block, or two runs where one run
    # is longer than a quarter block (torch's blocked_autorange took up to ten blocks).
    assert t.runs * per_run <= max(block, 2 * per_run) + per_run + 1e-12


def test_timers_for_gives_each_part_its_block_and_per_run_time():
    x = torch.randn(64, 10)
    t = torch.randint(0, 10, (64,))

    def impl(x, t, reduction="mean"):
        return torch.nn.functional.cross_entropy(x, t, reduction=reduction)

    made = timing.timers_for(impl, x, t, "mean", {}, 1, 0.011, 11)
    assert set(made) == {"forward", "backward"}
    for _, number, per_run in made.values():
        assert number >= 1 and 0 < per_run < 0.1


@pytest.mark.parametrize("number", [1, 3, 250])
def test_a_block_is_one_warm_up_call_and_its_runs(number):
    """torch's Timer.timeit warms up with max(number // 100, 2) calls before each block: for a
    large point (number 1) two thirds of its timing. BlockTimer: one call, then the block."""
    calls = []
    timer = timing.BlockTimer(stmt="fn()", globals={"fn": lambda: calls.append(1)}, num_threads=1)
    m = timer.timeit(number)
    assert len(calls) == 1 + number
    assert len(m.times) == 1 and m.times[0] > 0 and m.number_per_run == number


def test_a_block_runs_on_the_timers_threads():
    seen = []
    before = torch.get_num_threads()
    timing.BlockTimer(stmt="fn()", globals={"fn": lambda: seen.append(torch.get_num_threads())}, num_threads=1).timeit(2)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
