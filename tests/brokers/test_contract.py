"""The broker contract: what the runtime relies on, checked on every adapter.

Each test runs on every adapter (``harness``: MemoryBroker, the real Kafka
broker, ElasticMQ for SQS FIFO) or on those whose topics have partitions
(``partitioned``).
Real time throughout: a real broker cannot follow a virtual clock. Every
wait is bounded.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import trio

import keylane
from keylane.brokers import Acknowledging, Consumer, Fetch, TopicPartition
from tests.brokers.conftest import Harness
from tests.conftest import OrderChecker
from tests.kafka_server import unique


async def fetch_until(
    c: Consumer, done: object, *, bound: float, max_records: int = 1000, ack: bool = True
) -> list[Fetch]:
    """Fetches until ``done(fetches)`` holds; fails after ``bound`` seconds.
    ``ack``: acknowledges what each fetch brought, as the runtime would once
    handled (brokers that take acks: SQS gives a group nothing more until)."""
    fetches: list[Fetch] = []
    assert callable(done)
    with trio.move_on_after(bound) as cs:
        while not done(fetches):
            f = await c.fetch(max_records, 0.2)
            fetches.append(f)
            if ack and isinstance(c, Acknowledging) and f.chunks:
                await c.ack({tp: [m.offset for m in chunk] for tp, chunk in f.chunks})
    assert not cs.cancelled_caught, f"condition not met within {bound}s: {fetches[-3:]}"
    return fetches


def records(fetches: list[Fetch]) -> list[keylane.Message]:
    return [m for f in fetches for _, chunk in f.chunks for m in chunk]


def assigned(fetches: list[Fetch]) -> set[TopicPartition]:
    out: set[TopicPartition] = set()
    for f in fetches:
        out -= f.revoked | f.lost
        out |= f.assigned
    return out


def produce(h: Harness, topic: str, n: int, keys: int) -> None:
    for i in range(n):
        h.broker.produce(topic, key=f"k{i % keys}", value=str(i), headers={"seq": str(i)})
    h.flush()


async def test_join_assigns_every_partition_to_a_lone_member(harness: Harness) -> None:
    topic = harness.topic(4)
    n = 4 if harness.partitioned else 1
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    fetches = await fetch_until(c, lambda fs: len(assigned(fs)) == n, bound=harness.join_bound)
    assert assigned(fetches) == {TopicPartition(topic, p) for p in range(n)}
    assert c.assignment() == assigned(fetches)
    await c.close()


async def test_fetches_keep_partition_order_and_place_keys_by_murmur2(
    partitioned: Harness,
) -> None:
    harness = partitioned
    topic = harness.topic(3)
    produce(harness, topic, 600, keys=37)
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    fetches = await fetch_until(
        c, lambda fs: len(records(fs)) >= 600, bound=harness.join_bound, max_records=100
    )
    got = records(fetches)
    assert len(got) == 600
    by_partition: dict[int, list[int]] = defaultdict(list)
    for m in got:
        assert m.partition == keylane.partition_for_key(m.key or b"", 3)
        by_partition[m.partition].append(m.offset)
    for p, offsets in by_partition.items():
        # In order, none twice (dense from 0 where offsets are counters).
        assert offsets == sorted(set(offsets)), f"partition {p} out of order"
        if harness.name != "redis":
            assert offsets == list(range(len(offsets)))
    assert sorted(int(m.headers["seq"]) for m in got) == list(range(600))
    for f in fetches:
        for _, chunk in f.chunks:
            assert len(chunk) <= 100
    await c.close()


async def test_fetch_zero_returns_no_records_and_keeps_membership(harness: Harness) -> None:
    topic = harness.topic(2)
    produce(harness, topic, 50, keys=5)
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    n = 2 if harness.partitioned else 1
    fetches = await fetch_until(c, lambda fs: len(assigned(fs)) == n, bound=harness.join_bound)
    held = records(fetches)
    # Full: only empty fetches for a while. Nothing may come back, nothing
    # may be lost: afterwards every record arrives exactly once.
    for _ in range(10):
        f = await c.fetch(0, 0.0)
        assert not f.chunks
        assert not f.revoked
        assert not f.lost
        await trio.sleep(0.05)
    more = await fetch_until(
        c, lambda fs: len(held) + len(records(fs)) >= 50, bound=harness.join_bound
    )
    seqs = sorted(int(m.headers["seq"]) for m in held + records(more))
    assert seqs == list(range(50))
    await c.close()


async def test_commit_then_a_new_member_resumes_from_it(partitioned: Harness) -> None:
    harness = partitioned
    topic = harness.topic(2)
    produce(harness, topic, 100, keys=10)
    group = unique("group")
    c = harness.consumer(group, [topic])
    await c.join()
    got = records(
        await fetch_until(c, lambda fs: len(records(fs)) >= 100, bound=harness.join_bound)
    )
    # Commit half of each partition: the offset of its middle record (its
    # count halved where offsets are counters).
    offsets: dict[TopicPartition, list[int]] = defaultdict(list)
    for m in got:
        offsets[TopicPartition(topic, m.partition)].append(m.offset)
    half = {tp: sorted(os)[len(os) // 2] for tp, os in offsets.items()}
    rest = [m for m in got if m.offset >= half[TopicPartition(topic, m.partition)]]
    await c.commit(half)
    assert harness.committed(group) == half
    await c.close()
    c2 = harness.consumer(group, [topic], new_client=True)
    await c2.join()
    again = records(
        await fetch_until(c2, lambda fs: len(records(fs)) >= len(rest), bound=harness.join_bound)
    )
    key = lambda m: (m.partition, m.offset, m.value)  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, rest))
    assert len(got) == 100
    await c2.close()


async def test_uncommitted_records_are_delivered_again(harness: Harness) -> None:
    topic = harness.topic(2)
    produce(harness, topic, 40, keys=4)
    group = unique("group")
    c = harness.consumer(group, [topic])
    await c.join()
    first = records(
        await fetch_until(c, lambda fs: len(records(fs)) >= 40, bound=harness.join_bound, ack=False)
    )
    await c.close()
    c2 = harness.consumer(group, [topic], new_client=True)
    await c2.join()
    second = records(
        await fetch_until(
            c2, lambda fs: len(records(fs)) >= 40, bound=harness.join_bound, ack=False
        )
    )
    seq = lambda m: int(m.headers["seq"])  # noqa: E731
    assert sorted(map(seq, first)) == sorted(map(seq, second)) == list(range(40))
    await c2.close()


async def test_rebalance_hands_over_only_after_release(partitioned: Harness) -> None:
    harness = partitioned
    topic = harness.topic(4)
    group = unique("group")
    a = harness.consumer(group, [topic])
    await a.join()
    await fetch_until(a, lambda fs: len(assigned(fs)) == 4, bound=harness.join_bound)
    b = harness.consumer(group, [topic], new_client=True)
    async with trio.open_nursery() as nursery:
        b_fetches: list[Fetch] = []

        async def run_b() -> None:
            await b.join()
            with trio.move_on_after(harness.join_bound):
                while len(assigned(b_fetches)) < 2:
                    b_fetches.append(await b.fetch(100, 0.2))

        nursery.start_soon(run_b)
        a_fetches = await fetch_until(
            a, lambda fs: any(f.revoked for f in fs), bound=harness.join_bound
        )
        revoked = frozenset().union(*(f.revoked for f in a_fetches))
        assert revoked, "the first member gave nothing up"
        # Until released, the revoked partitions belong to nobody else.
        await trio.sleep(0.5)
        assert not (assigned(b_fetches) & revoked)
        assert revoked <= a.assignment()
        await a.commit(dict.fromkeys(revoked, 0))
        await a.release(revoked)
        assert not (a.assignment() & revoked)
        # Members keep fetching (the runtime always does): that is how the
        # group learns the release and completes the handover. (An eager
        # protocol revokes everything and gives some back; a cooperative
        # one revokes only what moves.)
        every = {TopicPartition(topic, p) for p in range(4)}
        with trio.move_on_after(harness.join_bound):
            while not (assigned(b_fetches) and assigned(b_fetches) | a.assignment() == every):
                await a.fetch(100, 0.2)
    assert assigned(b_fetches) | a.assignment() == every
    assert not (assigned(b_fetches) & a.assignment())
    await a.close()
    await b.close()


async def test_commit_of_a_partition_not_owned_is_refused(harness: Harness) -> None:
    topic = harness.topic(1)
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    await fetch_until(c, lambda fs: len(assigned(fs)) == 1, bound=harness.join_bound)
    with pytest.raises(keylane.NotAssigned, match="/7"):
        await c.commit({TopicPartition(topic, 7): 0})
    await c.close()


async def test_produce_keys_values_and_headers_round_trip(harness: Harness) -> None:
    topic = harness.topic(3)
    big = {f"h{i}": bytes([i]) * 1000 for i in range(20)}
    sent = [
        (b"", b"empty key", {"a": b"1"}),
        (b"\x00\xff\x80binary", b"", {}),
        (None, b"no key", {"n": b"", "u": "é".encode()}),
        ("é-str".encode(), b"v" * 10_000, big),
    ]
    for key, value, headers in sent:
        harness.broker.produce(topic, key, value, headers)
    harness.flush()
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    got = records(await fetch_until(c, lambda fs: len(records(fs)) >= 4, bound=harness.join_bound))
    seen = sorted((m.key or b"-", m.value, dict(m.headers)) for m in got)
    assert seen == sorted((k or b"-", v, h) for k, v, h in sent)
    for m in got:
        if m.key is not None and harness.partitioned:
            assert m.partition == keylane.partition_for_key(m.key, 3)
        assert m.timestamp > 1.7e9
    await c.close()


async def test_app_keeps_per_key_order_and_commits_the_log_ends(harness: Harness) -> None:
    topic = harness.topic(6)
    n, keys = 3000, 50
    for i in range(n):
        harness.broker.produce(topic, key=f"k{i % keys}", value=b"", headers={"version": str(i)})
    harness.flush()
    group = unique("group")
    app = keylane.App(
        harness.broker, topics=[topic], group=group, concurrency=64, commit_interval=0.2
    )
    check = OrderChecker()

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        await trio.sleep(0.0005 * (msg.offset % 3))
        check.end(msg)

    with trio.fail_after(harness.join_bound + 60):
        await app.run(until_idle=True, handle_signals=False)
    check.assert_ordered()
    assert check.count == n
    if harness.drained is not None:
        assert harness.drained(group, topic)
    else:
        ends = harness.end_offsets(topic)
        assert harness.committed(group) == {
            TopicPartition(topic, p): e for p, e in enumerate(ends) if e
        }


async def test_few_keys_keep_every_key_busy(harness: Harness) -> None:
    # 10 keys, 100 workers, handlers that sleep: each key should have a
    # handler running almost all the time. (A key's next message once waited
    # behind a completion that the worker holding it had not handed back
    # while it ran another key's handler: on Kafka about half the keys sat
    # idle.)
    topic = harness.topic(1)
    for i in range(400):
        harness.broker.produce(topic, key=f"k{i % 10}", value=b"", headers={"version": str(i)})
    harness.flush()
    app = keylane.App(harness.broker, topics=[topic], group=unique("group"), concurrency=100)
    running = 0
    samples: list[int] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        nonlocal running
        running += 1
        await trio.sleep(0.003)
        samples.append(running)
        running -= 1

    with trio.fail_after(harness.join_bound + 60):
        await app.run(until_idle=True, handle_signals=False)
    assert len(samples) == 400
    # Handlers running at each completion, over the middle of the run (the
    # defect gave a median of 1 on Kafka; 4-6 now with 3 ms sleeps, Trio's
    # timer rounding and the thread hops on 2 cores; ~9 of 10 on longer runs).
    middle = sorted(samples[100:300])
    assert middle[len(middle) // 2] >= 4, middle


# ---- what the repartition defence asks of a broker -----------------------------------------


async def test_committed_offsets_and_offsets_for_times_of_any_partition(
    partitioned: Harness,
) -> None:
    harness = partitioned
    topic = harness.topic(2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    for i in range(5):
        harness.broker.produce(topic, value=str(i), partition=0)
    harness.flush()
    await trio.sleep(0.1)
    middle = time.time()
    await trio.sleep(0.1)
    for i in range(5, 10):
        harness.broker.produce(topic, value=str(i), partition=0)
    harness.flush()
    group = unique("group")
    # Asked by a consumer that owns nothing (it never joined).
    asker = harness.consumer(group, [topic], new_client=True)
    # Where offsets are not counters (Redis stream ids), the record offsets.
    reader = harness.consumer(unique("reader"), [topic], new_client=True)
    await reader.join()
    p0_offsets = sorted(
        m.offset
        for m in records(
            await fetch_until(reader, lambda fs: len(records(fs)) >= 10, bound=harness.join_bound)
        )
    )
    end = harness.end_offsets(topic)[0]
    with trio.fail_after(harness.join_bound):
        assert await asker.committed_offsets([p0, p1]) == {p0: 0, p1: 0}
        found = await asker.offsets_for_times({p0: middle, p1: middle})
        assert found == {p0: p0_offsets[5], p1: 0}
        assert await asker.offsets_for_times({p0: 0.0}) == {p0: p0_offsets[0]}
        assert await asker.offsets_for_times({p0: time.time() + 3600}) == {p0: end}
        assert end > p0_offsets[-1]
    owner = harness.consumer(group, [topic])
    await owner.join()
    await fetch_until(owner, lambda fs: len(assigned(fs)) == 2, bound=harness.join_bound)
    await owner.commit({p0: 3})
    with trio.fail_after(harness.join_bound):
        assert await asker.committed_offsets([p0, p1]) == {p0: 3, p1: 0}


async def test_set_paused_holds_back_only_those_partitions(partitioned: Harness) -> None:
    harness = partitioned
    topic = harness.topic(2)
    p0 = TopicPartition(topic, 0)
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    await fetch_until(c, lambda fs: len(assigned(fs)) == 2, bound=harness.join_bound)
    c.set_paused([p0])
    await c.fetch(0, 0.2)  # a paused Kafka client drops what it prefetched
    for i in range(20):
        harness.broker.produce(topic, value=str(i), partition=i % 2)
    harness.flush()
    fetches = await fetch_until(
        c, lambda fs: len(records(fs)) >= 10, bound=harness.join_bound, max_records=100
    )
    # A little longer, so records of p0 would have had time to come.
    with trio.move_on_after(1.0):
        while True:
            fetches.append(await c.fetch(100, 0.2))
    got = records(fetches)
    assert {m.partition for m in got} == {1}
    assert len(got) == 10
    c.set_paused([])
    fetches = await fetch_until(
        c, lambda fs: len(records(fs)) >= 10, bound=harness.join_bound, max_records=100
    )
    p0_offsets = [m.offset for m in records(fetches) if m.partition == 0]
    assert len(p0_offsets) == 10
    assert p0_offsets == sorted(set(p0_offsets))


async def test_fetch_reports_partition_counts_and_their_growth(partitioned: Harness) -> None:
    harness = partitioned
    topic = harness.topic(2)
    c = harness.consumer(unique("group"), [topic])
    await c.join()
    fetches = await fetch_until(c, lambda fs: len(assigned(fs)) == 2, bound=harness.join_bound)
    assert fetches[-1].partitions == {topic: 2}
    await trio.to_thread.run_sync(harness.add_partitions, topic, 4)
    fetches = await fetch_until(
        c, lambda fs: bool(fs) and fs[-1].partitions.get(topic) == 4, bound=harness.join_bound
    )
    # (When the group assigns the new partitions is the broker's business:
    # Kafka's leader notices at its next metadata refresh.) A fetch that
    # hands out a new partition already reports the count that made it.
    for f in fetches:
        if any(tp.partition >= 2 for tp in f.assigned):
            assert f.partitions[topic] == 4


async def test_commit_metadata_is_readable_by_any_member(partitioned: Harness) -> None:
    harness = partitioned
    topic = harness.topic(2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    harness.broker.produce(topic, value="x", partition=0)
    harness.flush()
    group = unique("group")
    owner = harness.consumer(group, [topic])
    await owner.join()
    await fetch_until(owner, lambda fs: len(assigned(fs)) == 2, bound=harness.join_bound)
    await owner.commit({p0: 1}, "keylane:repartition:1:[]")
    asker = harness.consumer(group, [topic], new_client=True)
    with trio.fail_after(harness.join_bound):
        assert await asker.committed_metadata([p0, p1]) == {p0: "keylane:repartition:1:[]", p1: ""}
    await owner.commit({p0: 1})  # no metadata: clears it
    with trio.fail_after(harness.join_bound):
        assert await asker.committed_metadata([p0]) == {p0: ""}
