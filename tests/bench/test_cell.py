"""Small real cells on the memory broker, and the order checker on its own."""

from __future__ import annotations

import struct

import pytest
import trio

from keylane.bench import cell, suite, targets
from keylane.bench.models import CellSpec
from keylane.bench.naive import run_naive
from keylane.brokers.memory import MemoryBroker
from keylane.message import Message


def _msg(key: int, seq: int, offset: int) -> Message:
    value = struct.pack("<IIdd", key, seq, 0.0, 0.0)
    return Message("t", 0, offset, b"k", value, {}, 0.0)


async def test_the_order_checker_counts_messages_finishing_behind_a_later_one() -> None:
    probe = cell.Probe(keys=2)
    for key, seq, offset in [(0, 0, 0), (0, 2, 1), (0, 1, 2), (1, 0, 3), (0, 3, 4)]:
        await probe.handle(_msg(key, seq, offset))
    assert probe.violations == 1  # key 0's seq 1 ended after its seq 2
    assert probe.overlaps == 0
    assert len(probe.latencies) == 5


async def test_the_overlap_checker_sees_one_key_running_twice() -> None:
    probe = cell.Probe(keys=1)
    slow = struct.pack("<IIdd", 0, 0, 0.01, 0.0)
    async with trio.open_nursery() as n:
        n.start_soon(probe.handle, Message("t", 0, 0, b"k", slow, {}, 0.0))
        await trio.sleep(0.001)
        n.start_soon(probe.handle, _msg(0, 1, 1))
    assert probe.overlaps == 1
    assert probe.max_in_flight == 2


def test_a_total_order_cell_runs_one_message_at_a_time_near_its_bound() -> None:
    spec = CellSpec("total", 20, 2.0, concurrency=64, messages=300)
    r = cell.run_cell(targets.memory(), spec)
    assert r.max_in_flight == 1
    assert r.order_violations == 0
    assert r.ideal_throughput == pytest.approx(500)
    # One message at a time can never beat 1 / latency (a broken
    # serialization point with concurrency 64 would be ~60x above it), and
    # Trio's timer rounding costs at most ~1 ms a message here.
    assert 0.4 * 500 < r.throughput <= 500 * 1.02
    assert r.messages == 300
    assert 0 < r.p50_ms <= r.p99_ms <= r.p999_ms
    assert r.peak_rss_mb > 0


@pytest.mark.parametrize("model", ["partition", "key"])
def test_ordered_models_keep_order_under_long_tail_work(model: str) -> None:
    spec = CellSpec(model, 8, 1.0, "longtail", concurrency=64, partitions=4, messages=400)
    r = cell.run_cell(targets.memory(), spec)
    assert r.order_violations == 0
    assert r.key_overlaps == 0
    assert r.throughput <= r.ideal_throughput * 1.02  # type: ignore[operator]


def test_no_order_breaks_order_and_the_check_says_so() -> None:
    spec = CellSpec("none", 2, 1.0, "longtail", concurrency=64, messages=400)
    r = cell.run_cell(targets.memory(), spec)
    assert r.key_overlaps > 0
    assert r.order_violations > 0
    assert r.max_in_flight > 2


def test_the_grid_by_default_is_four_models_five_key_counts_two_distributions() -> None:
    specs = suite.Grid().specs()
    assert len(specs) == 40
    assert {s.model for s in specs} == {"total", "partition", "key", "none"}
    assert {s.keys for s in specs} == {1, 10, 100, 1_000, 10_000}
    assert {s.distribution for s in specs} == {"fixed", "longtail"}
    assert {(s.concurrency, s.partitions, s.latency_ms) for s in specs} == {(256, 12, 1.0)}
    assert max(s.messages for s in specs) == 20_000
    assert min(s.messages for s in specs) == 1_000


def test_the_trio_ceiling_is_near_concurrency_over_latency() -> None:
    b = suite.trio_ceiling(CellSpec("none", 1, 2.0, concurrency=10, messages=200))
    # 10 tasks each sleeping 2 ms twenty times: >= 40 ms, timer rounding aside.
    assert 0.039 <= b.seconds < 0.2
    assert b.throughput == pytest.approx(200 / b.seconds)


@pytest.mark.parametrize(("ordering", "most"), [("total", 1), ("partition", 2), ("none", 64)])
async def test_the_naive_baseline_runs_the_same_ordering_model(ordering: str, most: int) -> None:
    broker = MemoryBroker(partitions=2)
    broker.create_topic("t", 2)
    for i in range(64):
        broker.produce("t", key=b"one-key", value=b"", partition=i % 2)
    running = peak = 0

    async def handler(msg: Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.002)
        running -= 1

    with trio.fail_after(10):
        await run_naive(broker, "t", "g", handler, concurrency=64, ordering=ordering)
    assert peak == most
    assert sum(broker.committed("g").values()) == 64
