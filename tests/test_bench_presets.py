"""The benchmark presets' own arithmetic, and small real runs of them."""

from __future__ import annotations

import pytest

import keylane
from keylane.bench import parallel_consumer as pc


def test_bounds_follow_the_ordering_model() -> None:
    durations = [0.004, 0.001, 0.002, 0.003]
    total = sum(durations)
    assert pc.bound("partition", 4, durations) == pytest.approx(total)
    # Two keys: key 0 holds 0.004 + 0.002, key 1 holds 0.001 + 0.003.
    assert pc.bound("key", 2, durations) == pytest.approx(0.006)
    assert pc.bound("key", 1, durations) == pytest.approx(total)
    # Unordered with plenty of concurrency: the longest single message.
    assert pc.bound("none", 4, durations) == pytest.approx(0.004)


def test_the_published_table_is_complete() -> None:
    assert [k for m, k in pc.ROWS if m == "key"] == [1, 2, 5, 10, 20, 100, 1000, 10_000]
    assert pc.PUBLISHED[("partition", pc.MESSAGES)] == 22.221
    assert pc.PUBLISHED[("none", pc.MESSAGES)] == 2.829


@pytest.mark.parametrize(("model", "keys"), [("key", 4), ("partition", 300)])
def test_a_small_row_runs_near_its_bound_on_the_memory_broker(model: str, keys: int) -> None:
    broker = keylane.MemoryBroker(partitions=1)
    durations = pc.work(seed=2, messages=300)
    row = pc.run_row(broker, broker.create_topic, lambda: None, model, keys, durations)
    # Serial chains of short sleeps pay Trio's timer rounding; a run can
    # never beat its bound, and stays within 2x of it here.
    assert row.seconds >= row.bound_s * 0.98
    assert row.ratio < 2.0
