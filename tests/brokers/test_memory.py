"""MemoryBroker: partitioning, groups, rebalances, persistence, faults."""

from __future__ import annotations

import pathlib

import pytest
import trio

import keylane
from keylane.brokers import Faults, MemoryBroker, TopicPartition
from keylane.brokers.memory import MemoryConsumer

T = "orders"


def tp(p: int, topic: str = T) -> TopicPartition:
    return TopicPartition(topic, p)


async def drain(c: MemoryConsumer, n: int) -> list[keylane.Message]:
    got: list[keylane.Message] = []
    while len(got) < n:
        f = await c.fetch(n - len(got), 1.0)
        for _, records in f.chunks:
            got.extend(records)
    return got


# ---- producing ------------------------------------------------------------------------------


def test_keys_go_where_kafka_puts_them() -> None:
    b = MemoryBroker(partitions=12)
    for i in range(200):
        m = b.produce(T, key=f"acct-{i}", value=b"v")
        assert m.partition == keylane.partition_for_key(f"acct-{i}", 12)
        assert m.key == f"acct-{i}".encode()
    assert sum(b.end_offsets(T)) == 200


def test_keyless_round_robin_and_explicit_partition() -> None:
    b = MemoryBroker(partitions=3)
    assert [b.produce(T, value=b"x").partition for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    m = b.produce(T, key="k", value="text", headers={"h": "é", "b": b"\x00"}, partition=2)
    assert (m.partition, m.offset, m.value, m.headers) == (
        2,
        2,
        b"text",
        {"h": "é".encode(), "b": b"\x00"},
    )
    assert m.attempt == 0
    assert m.timestamp > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key": 5}, keylane.InvalidType, "key must be"),
        ({"value": None}, keylane.InvalidType, "value must be"),
        ({"value": 3.5}, keylane.InvalidType, "value must be"),
        ({"headers": {"h": 1}}, keylane.InvalidType, "header 'h'"),
        ({"headers": {1: b"x"}}, keylane.InvalidType, "header names"),
        ({"headers": [("h", b"x")]}, keylane.InvalidType, "headers must be a mapping"),
        ({"partition": 3}, keylane.InvalidArgument, "does not exist"),
        ({"partition": -1}, keylane.InvalidArgument, "does not exist"),
        ({"partition": "1"}, keylane.InvalidType, "partition must be an int"),
    ],
)
def test_produce_rejects_bad_input(kwargs: dict[str, object], error: type, match: str) -> None:
    b = MemoryBroker(partitions=3)
    b.create_topic(T)
    with pytest.raises(error, match=match):
        b.produce(T, **kwargs)  # type: ignore[arg-type]
    assert sum(b.end_offsets(T)) == 0


def test_bad_topic_names_and_options() -> None:
    b = MemoryBroker()
    for bad in ("", "a b", "x/y", "é", "a" * 250):
        with pytest.raises(keylane.InvalidArgument, match="topic name"):
            b.produce(bad, value=b"v")
    with pytest.raises(keylane.ConfigError, match="partitions"):
        MemoryBroker(partitions=0)
    with pytest.raises(keylane.ConfigError, match="session_timeout"):
        MemoryBroker(session_timeout=-1)
    with pytest.raises(keylane.ConfigError, match="redeliver"):
        Faults(redeliver=2)
    with pytest.raises(keylane.ConfigError, match="recover"):
        MemoryBroker(recover="maybe")  # type: ignore[arg-type]
    b.create_topic("t", 4)
    with pytest.raises(keylane.ConfigError, match="add_partitions"):
        b.create_topic("t", 8)


# ---- groups ---------------------------------------------------------------------------------


async def test_one_member_gets_everything_in_order() -> None:
    b = MemoryBroker(partitions=4)
    for i in range(100):
        b.produce(T, key=f"k{i % 7}", value=str(i))
    c = b.consumer("g", [T])
    await c.join()
    first = await c.fetch(10, 1.0)
    assert first.assigned == frozenset(tp(p) for p in range(4))
    got = [m for _, chunk in first.chunks for m in chunk]
    got += await drain(c, 100 - len(got))
    assert len(got) == 100
    by_partition: dict[int, list[int]] = {}
    for m in got:
        by_partition.setdefault(m.partition, []).append(m.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    last = await c.fetch(10, 0.01)
    assert last.at_end
    assert last.chunks == []


async def test_fetch_waits_for_new_records(autojump_clock: trio.abc.Clock) -> None:
    b = MemoryBroker(partitions=1)
    c = b.consumer("g", [T])
    await c.join()
    await c.fetch(10, 0.0)  # the assignment

    async def later() -> None:
        await trio.sleep(2)
        b.produce(T, value=b"late")

    async with trio.open_nursery() as n:
        n.start_soon(later)
        start = trio.current_time()
        f = await c.fetch(10, 5.0)
        assert trio.current_time() - start == pytest.approx(2)
        assert [m.value for _, ch in f.chunks for m in ch] == [b"late"]


async def test_two_members_split_and_hand_over_after_release() -> None:
    b = MemoryBroker(partitions=4)
    a = b.consumer("g", [T])
    await a.join()
    assert (await a.fetch(0, 0)).assigned == frozenset(tp(p) for p in range(4))
    c = b.consumer("g", [T])
    await c.join()
    f = await a.fetch(0, 0)
    assert f.revoked == frozenset({tp(1), tp(3)})
    # Until a releases them, c does not get them (no double processing).
    assert (await c.fetch(0, 0.01)).assigned == frozenset()
    await a.commit({tp(1): 0})  # a may still commit what it is giving up
    await a.release(f.revoked)
    assert (await c.fetch(0, 0)).assigned == frozenset({tp(1), tp(3)})
    assert b.assignment("g") == {a.member_id: {tp(0), tp(2)}, c.member_id: {tp(1), tp(3)}}
    with pytest.raises(keylane.NotAssigned, match="does not own"):
        await a.commit({tp(1): 0})


@pytest.mark.parametrize(
    ("assignor", "members", "partitions", "expected"),
    [
        ("round-robin", 3, 7, [[0, 3, 6], [1, 4], [2, 5]]),
        ("range", 3, 7, [[0, 1, 2], [3, 4], [5, 6]]),
        ("range", 3, 2, [[0], [1], []]),
        ("range", 2, 12, [list(range(6)), list(range(6, 12))]),
    ],
)
async def test_assignors_split_partitions(
    assignor: str, members: int, partitions: int, expected: list[list[int]]
) -> None:
    b = MemoryBroker(partitions=partitions, assignor=assignor)  # type: ignore[arg-type]
    cs = [b.consumer("g", [T]) for _ in range(members)]
    for c in cs:
        await c.join()
    for _ in range(3):  # revokes released, handovers fetched
        for c in cs:
            f = await c.fetch(0, 0)
            await c.release(f.revoked)
    assert [sorted(p.partition for p in c.assignment()) for c in cs] == expected


def test_bad_assignor_is_refused() -> None:
    with pytest.raises(keylane.ConfigError, match="assignor"):
        MemoryBroker(assignor="sticky")  # type: ignore[arg-type]


def test_produce_batch_with_and_without_idempotence() -> None:
    b = MemoryBroker(partitions=2)
    b.create_topic(T, 2)
    assert b.produce_batch(T, 1, [("k", b"1"), ("k", b"2")]) == 2
    assert b.produce_batch(T, 1, [("k", b"1"), ("k", b"2")]) == 2  # a plain retry duplicates
    assert [m.value for m in b.records(T, 1)] == [b"1", b"2", b"1", b"2"]
    # Idempotent: per producer and partition, numbered from 0.
    assert b.produce_batch(T, 0, [("a", b"x"), ("a", b"y")], producer_id=7, sequence=0) == 2
    assert b.produce_batch(T, 0, [("a", b"x"), ("a", b"y")], producer_id=7, sequence=0) == 0
    with pytest.raises(keylane.BrokerError, match="expected 2") as refused:
        b.produce_batch(T, 0, [("a", b"w")], producer_id=7, sequence=3)
    assert refused.value.retriable
    assert refused.value.code == "OUT_OF_ORDER_SEQUENCE_NUMBER"
    assert b.produce_batch(T, 0, [("a", b"z")], producer_id=7, sequence=2) == 1
    assert b.produce_batch(T, 0, [("a", b"q")], producer_id=8, sequence=0) == 1  # another producer
    assert [m.value for m in b.records(T, 0)] == [b"x", b"y", b"z", b"q"]
    with pytest.raises(keylane.InvalidArgument, match="go together"):
        b.produce_batch(T, 0, [("a", b"x")], producer_id=7)
    with pytest.raises(keylane.InvalidArgument, match="no partition 5"):
        b.produce_batch(T, 5, [("a", b"x")])


async def test_set_paused_and_offset_lookups() -> None:
    b = MemoryBroker(partitions=2)
    for i, ts in enumerate([10.0, 20.0, 30.0]):
        b.produce(T, value=str(i), partition=0, timestamp=ts)
    b.produce(T, value="p1", partition=1, timestamp=5.0)
    c = b.consumer("g", [T])
    await c.join()
    c.set_paused([tp(0)])
    f = await c.fetch(10, 0)
    assert [(t.partition, len(r)) for t, r in f.chunks] == [(1, 1)]
    assert f.partitions == {T: 2}
    c.set_paused([])
    f = await c.fetch(10, 0)
    assert [(t.partition, len(r)) for t, r in f.chunks] == [(0, 3)]
    found = await c.offsets_for_times({tp(0): 20.0, tp(1): 6.0})
    assert found == {tp(0): 1, tp(1): 1}
    assert await c.offsets_for_times({tp(0): 20.5}) == {tp(0): 2}
    assert await c.committed_offsets([tp(0), tp(1)]) == {tp(0): 0, tp(1): 0}
    await c.commit({tp(0): 2})
    assert await c.committed_offsets([tp(0)]) == {tp(0): 2}
    with pytest.raises(keylane.InvalidArgument, match="no partition 9"):
        await c.committed_offsets([tp(9)])


async def test_a_leaving_member_hands_over_at_once() -> None:
    b = MemoryBroker(partitions=2)
    a, c = b.consumer("g", [T]), b.consumer("g", [T])
    await a.join()
    await c.join()
    await a.release((await a.fetch(0, 0)).revoked)
    await c.close()
    assert (await a.fetch(0, 0)).assigned == frozenset({tp(1)})


async def test_a_silent_member_loses_its_partitions_after_the_session_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = MemoryBroker(partitions=2, session_timeout=10)
    a, c = b.consumer("g", [T]), b.consumer("g", [T])
    await a.join()
    await c.join()
    await a.release((await a.fetch(0, 0)).revoked)
    await c.fetch(0, 0)
    # c goes silent (as if its process died); a keeps polling.
    for _ in range(12):
        await trio.sleep(1)
        await a.heartbeat()
    assert (await a.fetch(0, 0)).assigned == frozenset({tp(1)})
    # c comes back: it learns its partitions were lost.
    f = await c.fetch(0, 0)
    assert f.lost == frozenset({tp(1)})


async def test_uncommitted_records_are_redelivered_to_the_next_owner() -> None:
    b = MemoryBroker(partitions=1)
    for i in range(10):
        b.produce(T, value=str(i))
    a = b.consumer("g", [T])
    await a.join()
    got = await drain(a, 10)
    await a.commit({tp(0): 6})  # handled 0..5 only
    await a.close()
    c = b.consumer("g", [T])
    await c.join()
    again = await drain(c, 4)
    assert [m.offset for m in again] == [6, 7, 8, 9]
    assert again == got[6:]


async def test_commit_checks_offsets() -> None:
    b = MemoryBroker(partitions=1)
    b.produce(T, value=b"x")
    c = b.consumer("g", [T])
    await c.join()
    await c.fetch(0, 0)
    with pytest.raises(keylane.InvalidArgument, match="outside"):
        await c.commit({tp(0): 5})
    await c.commit({tp(0): 1})
    assert b.committed("g") == {tp(0): 1}


async def test_add_partitions_rebalances_and_moves_keys() -> None:
    b = MemoryBroker(partitions=6)
    c = b.consumer("g", [T])
    await c.join()
    await c.fetch(0, 0)
    b.add_partitions(T, 12)
    assert (await c.fetch(0, 0)).assigned == frozenset(tp(p) for p in range(6, 12))
    moved = keylane.repartition_moves([f"acct-{i}" for i in range(1000)], 6, 12)
    assert 0.4 < moved < 0.6


# ---- faults ---------------------------------------------------------------------------------


async def test_faults_redeliver_and_duplicate() -> None:
    b = MemoryBroker(partitions=1, faults=Faults(redeliver=1.0, duplicate=1.0, seed=7))
    for i in range(5):
        b.produce(T, value=str(i))
    c = b.consumer("g", [T])
    await c.join()
    f1 = await c.fetch(3, 0)
    assert [m.offset for _, ch in f1.chunks for m in ch] == [0, 1, 2, 2]
    f2 = await c.fetch(3, 0)  # rewound to the committed offset (0): old records again
    assert [m.offset for _, ch in f2.chunks for m in ch] == [0, 1, 2, 2]


async def test_fetch_delay(autojump_clock: trio.abc.Clock) -> None:
    b = MemoryBroker(partitions=1, faults=Faults(fetch_delay=0.25))
    b.produce(T, value=b"x")
    c = b.consumer("g", [T])
    await c.join()
    start = trio.current_time()
    await c.fetch(1, 1.0)
    assert trio.current_time() - start == pytest.approx(0.25)


# ---- persistence ----------------------------------------------------------------------------


async def test_persisted_broker_resumes(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=2, persist_dir=tmp_path)
    for i in range(10):
        b.produce(T, key=f"k{i}", value=str(i), headers={"version": str(i)})
    c = b.consumer("g", [T])
    await c.join()
    await drain(c, 10)
    await c.commit({tp(0): 2})
    await b.aclose()
    again = MemoryBroker(partitions=2, persist_dir=tmp_path)
    assert again.topics() == {T: 2}
    assert [again.records(T, p) for p in (0, 1)] == [b.records(T, p) for p in (0, 1)]
    assert again.committed("g") == {tp(0): 2}
    more = again.produce(T, key="k0", value=b"more")
    assert more.offset == len(b.records(T, more.partition)), "appends after what was loaded"


def _write_some(tmp_path: pathlib.Path) -> pathlib.Path:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    for i in range(5):
        b.produce(T, value=str(i) * 10)
    b.close()
    return tmp_path / "log" / f"{T}-0.log"


def test_truncated_log_is_refused_then_recovered(tmp_path: pathlib.Path) -> None:
    log = _write_some(tmp_path)
    log.write_bytes(log.read_bytes()[:-3])
    with pytest.raises(keylane.CorruptLogError, match=r"truncated record .* after 4 good records"):
        MemoryBroker(partitions=1, persist_dir=tmp_path)
    b = MemoryBroker(partitions=1, persist_dir=tmp_path, recover="truncate")
    assert [m.value for m in b.records(T, 0)] == [str(i).encode() * 10 for i in range(4)]
    assert b.produce(T, value=b"next").offset == 4


def test_corrupted_log_is_refused(tmp_path: pathlib.Path) -> None:
    log = _write_some(tmp_path)
    data = bytearray(log.read_bytes())
    data[12] ^= 0xFF
    log.write_bytes(bytes(data))
    with pytest.raises(keylane.CorruptLogError, match="checksum mismatch at byte 0"):
        MemoryBroker(partitions=1, persist_dir=tmp_path)
    assert isinstance(keylane.CorruptLogError("x"), OSError)


def test_damaged_metadata_is_refused(tmp_path: pathlib.Path) -> None:
    _write_some(tmp_path)
    (tmp_path / "topics.msgpack").write_bytes(b"\xc1garbage")
    with pytest.raises(keylane.CorruptLogError, match=r"topics\.msgpack"):
        MemoryBroker(persist_dir=tmp_path)
