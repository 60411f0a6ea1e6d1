"""The benchmarks' precise sleep: never early, reusable after a cancel."""

from __future__ import annotations

import sys
import time

import pytest
import trio

from keylane.bench import sleep as precise


def test_it_is_the_timerfd_sleep_on_linux() -> None:
    # The figures in docs/benchmarks.md depend on it; a silent fallback to
    # trio.sleep would change them.
    assert sys.platform.startswith("linux") == precise.PRECISE


@pytest.mark.parametrize("seconds", [0.0003, 0.0021, 0.004])
async def test_a_sleep_never_ends_before_its_time(seconds: float) -> None:
    for _ in range(20):
        started = time.monotonic()
        await precise.sleep(seconds)
        assert time.monotonic() - started >= seconds


async def test_a_cancelled_sleep_leaves_its_timer_reusable() -> None:
    """A cancelled sleep's timer still fires later; the descriptor goes back
    to the free list, and the next sleep on it must wait its own time."""
    with trio.move_on_after(0.001):
        await precise.sleep(0.005)
    await trio.sleep(0.02)  # the abandoned timer has fired by now
    fds = list(precise._FREE)
    started = time.monotonic()
    await precise.sleep(0.01)
    assert time.monotonic() - started >= 0.01
    assert fds == precise._FREE, "the same descriptor was reused"


async def test_many_sleepers_at_once_each_wait_their_time() -> None:
    ends: dict[int, float] = {}
    started = time.monotonic()

    async def one(i: int) -> None:
        await precise.sleep(0.001 * (i % 5 + 1))
        ends[i] = time.monotonic() - started

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(one, i)
    assert len(ends) == 50
    assert all(ends[i] >= 0.001 * (i % 5 + 1) for i in ends)
    assert len(precise._FREE) >= 50


async def test_zero_is_a_checkpoint() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await precise.sleep(0)
