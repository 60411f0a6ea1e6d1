"""keylane on a real redis-server (started by scripts/redis.sh): order at
concurrency 256, a member process killed mid-stream, two members sharing a
topic, retries and the DLQ, the server stopped mid-run, and bad input.

They never skip. Real time throughout; every wait is bounded.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal

import msgpack
import pytest
import redis
import trio

import keylane
from tests.brokers.crash import (
    bench_both_sides,
    check_effects,
    produce_versions,
    spawn_member,
    stop_members,
    wait_for,
)
from tests.conftest import REDIS, OrderChecker
from tests.servers import unique

pytestmark = pytest.mark.redis

CONFIG = {"lease_ms": 3000}
# Each test's topics are new; the group may be shared.
GROUP = "g"


@pytest.fixture
def broker(redis_url: str) -> keylane.RedisStreamsBroker:
    return keylane.RedisStreamsBroker(redis_url, config=CONFIG)


def topic(broker: keylane.RedisStreamsBroker, prefix: str, partitions: int) -> str:
    name = unique(prefix)
    broker.create_topic(name, partitions)
    return name


def all_committed(broker: keylane.RedisStreamsBroker, group: str, name: str) -> bool:
    ends = broker.end_offsets(name)
    committed = {tp: o for tp, o in broker.committed(group).items() if tp.topic == name}
    return committed == {keylane.TopicPartition(name, p): e for p, e in enumerate(ends) if e}


async def test_keyed_order_at_concurrency_256_with_random_latency(
    broker: keylane.RedisStreamsBroker,
) -> None:
    t = topic(broker, "order", 12)
    n, keys = 20_000, 500
    await trio.to_thread.run_sync(produce_versions, broker, t, n, keys)
    app = keylane.App(broker, topics=[t], group=GROUP, concurrency=256, commit_interval=0.2)
    check = OrderChecker()
    rng = random.Random(3)

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        await trio.sleep(rng.uniform(0, 0.004))
        check.end(msg)

    with trio.fail_after(120):
        await app.run(until_idle=True, handle_signals=False)
    check.assert_ordered()
    assert check.count == n
    assert {v for vs in check.versions.values() for v in vs} == set(range(n))
    assert all_committed(broker, GROUP, t)
    # Everything acknowledged: nothing pending in any stream.
    r = redis.Redis.from_url(broker.url)
    for p in range(12):
        assert r.xpending(broker.keys.stream(t, p), "g")["pending"] == 0


async def test_sigkill_one_of_two_member_processes(
    broker: keylane.RedisStreamsBroker, redis_url: str, tmp_path: pathlib.Path
) -> None:
    t = topic(broker, "crash", 6)
    n, keys = 20_000, 200
    await trio.to_thread.run_sync(produce_versions, broker, t, n, keys)
    table, effects = str(tmp_path / "effects.lmdb"), str(tmp_path / "effects.log")
    a = spawn_member(f"redis:{redis_url}", t, GROUP, table, effects)
    b = spawn_member(f"redis:{redis_url}", t, GROUP, table, effects)
    try:
        await wait_for(
            lambda: os.path.exists(effects) and os.path.getsize(effects) > 20_000, 60, "start"
        )
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        # The survivor takes the dead member's streams once its lease ends,
        # and claims what it had read but not committed.
        await wait_for(lambda: all_committed(broker, GROUP, t), 120, "the survivor commits all")
    finally:
        stop_members(a, b)
    assert b.returncode == 0
    await trio.to_thread.run_sync(check_effects, effects, table, n, keys, 16)


async def test_two_members_split_a_topic_and_keep_each_key_in_one(
    broker: keylane.RedisStreamsBroker, redis_url: str
) -> None:
    t = topic(broker, "two", 8)
    n, keys = 4000, 100
    await trio.to_thread.run_sync(produce_versions, broker, t, n, keys)
    check = OrderChecker()
    where: dict[int, set[bytes | None]] = {0: set(), 1: set()}

    def make(i: int) -> keylane.App:
        b = keylane.RedisStreamsBroker(redis_url, config=CONFIG)
        app = keylane.App(b, topics=[t], group=GROUP, concurrency=8, commit_interval=0.2)

        @app.handler
        async def handle(msg: keylane.Message) -> None:
            check.start(msg)
            where[i].add(msg.key)
            await trio.sleep(0.01)
            check.end(msg)

        return app

    apps = [make(0), make(1)]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for app in apps:
                await nursery.start(app.run)
            await wait_for(lambda: all_committed(broker, GROUP, t), 100, "all committed")
            await wait_for(lambda: not check.running, 10, "handlers finish")
            for app in apps:
                app.stop()
    # A handover may replay from the last commit; never two at once.
    check.assert_ordered_with_replays(2)
    assert {v for vs in check.versions.values() for v in vs} == set(range(n))
    assert where[0], "the first member did nothing"
    assert where[1], "the second member did nothing"


async def test_a_member_that_lost_its_lease_cannot_commit(
    broker: keylane.RedisStreamsBroker,
) -> None:
    t = topic(broker, "fence", 1)
    await trio.to_thread.run_sync(produce_versions, broker, t, 10, 2)
    group = unique("fence")
    c = broker.consumer(group, [t])
    await c.join()
    tp = keylane.TopicPartition(t, 0)
    got: list[keylane.Message] = []
    with trio.fail_after(20):
        while len(got) < 10:
            f = await c.fetch(100, 0.2)
            got += [m for _, chunk in f.chunks for m in chunk]
    # Its lease lapses (a stall) and another member takes the partition.
    r = redis.Redis.from_url(broker.url)
    r.set(broker.keys.owner(group, t, 0), "someone-else")
    with pytest.raises(keylane.NotAssigned, match="lease lapsed"):
        await c.commit({tp: got[-1].offset + 1})
    assert broker.committed(group) == {}
    assert r.xpending(broker.keys.stream(t, 0), group)["pending"] == 10
    # The next fetch reports it lost.
    f = await c.fetch(100, 0.0)
    assert tp in f.lost
    assert tp not in c.assignment()


async def test_fetches_report_end_offsets_for_lag(broker: keylane.RedisStreamsBroker) -> None:
    t = topic(broker, "ends", 3)
    await trio.to_thread.run_sync(produce_versions, broker, t, 30, 7)
    c = broker.consumer(unique("ends"), [t])
    await c.join()
    with trio.fail_after(20):
        f = await c.fetch(0, 0.0)
        while not f.assigned:
            f = await c.fetch(0, 0.1)
    ends = broker.end_offsets(t)
    assert f.ends == {keylane.TopicPartition(t, p): e for p, e in enumerate(ends)}
    assert all(ends)
    await c.close()


async def test_retries_and_the_dlq(broker: keylane.RedisStreamsBroker) -> None:
    t, dlq = topic(broker, "dl", 2), topic(broker, "dl-dead", 1)
    for v in range(20):
        value = b"poison" if v == 4 else b"flaky" if v == 6 else b"ok"
        broker.produce(t, key=f"k{v % 2}", value=value, headers={"version": str(v)})
    await trio.to_thread.run_sync(broker.flush_sync)
    fast = keylane.RetryPolicy(max_attempts=3, backoff_base=0.05, jitter=0)
    app = keylane.App(broker, topics=[t], group=GROUP, retry=fast, dlq=dlq)
    handled: list[int] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        if msg.value == b"poison" or (msg.value == b"flaky" and msg.attempt < 2):
            raise ValueError("cannot parse")
        handled.append(int(msg.headers["version"]))

    with trio.fail_after(60):
        await app.run(until_idle=True, handle_signals=False)
    assert [v for v in handled if v % 2 == 0] == [0, 2, 6, 8, 10, 12, 14, 16, 18]
    assert sorted(handled) == [v for v in range(20) if v != 4]
    assert app.stats()["dead_lettered"] == 1
    assert all_committed(broker, GROUP, t)
    c = broker.consumer("reader", [dlq])
    await c.join()
    got: list[keylane.Message] = []
    with trio.fail_after(20):
        while not got:
            f = await c.fetch(10, 0.2)
            got = [m for _, chunk in f.chunks for m in chunk]
    await c.close()
    (dead,) = got
    record = msgpack.unpackb(dead.value)
    assert (record["topic"], record["value"], record["key"]) == (t, b"poison", b"k0")


async def test_server_stopped_mid_run_then_back_loses_nothing(
    broker: keylane.RedisStreamsBroker,
) -> None:
    t = topic(broker, "down", 4)
    n = 4000
    await trio.to_thread.run_sync(produce_versions, broker, t, n, 50)
    app = keylane.App(broker, topics=[t], group=GROUP, concurrency=8, commit_interval=0.2)
    check = OrderChecker()

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        await trio.sleep(0.005)
        check.end(msg)

    try:
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                await nursery.start(app.run)
                await wait_for(lambda: check.count > 300, 60, "handling starts")
                await trio.to_thread.run_sync(REDIS.halt)
                down_at = app.stats()["broker_retries"]
                await trio.sleep(2.0)
                assert app.stats()["broker_retries"] > down_at, "no retries while down"
                await trio.to_thread.run_sync(REDIS.resume)
                await wait_for(lambda: all_committed(broker, GROUP, t), 120, "resume")
                await wait_for(lambda: not check.running, 10, "handlers finish")
                app.stop()
    finally:
        await trio.to_thread.run_sync(REDIS.resume)
    # While the server was away the member's lease may have lapsed: its
    # streams then replay from the last commit.
    check.assert_ordered_with_replays(2)
    assert {v for vs in check.versions.values() for v in vs} == set(range(n))


async def test_unreachable_server_fails_clearly_within_a_bound() -> None:
    broker = keylane.RedisStreamsBroker("redis://127.0.0.1:9/0", config={"connect_timeout": 0.5})
    app = keylane.App(broker, topics=["nowhere"], group=GROUP, broker_timeout=2)
    app.handler(_noop)
    with trio.fail_after(30), pytest.raises(keylane.BrokerError, match="join"):
        await app.run(handle_signals=False)


async def test_missing_topic_is_a_clear_error(broker: keylane.RedisStreamsBroker) -> None:
    app = keylane.App(broker, topics=[unique("missing")], group=GROUP)
    app.handler(_noop)
    with trio.fail_after(30), pytest.raises(keylane.UnknownTopic, match="create_topic"):
        await app.run(handle_signals=False)
    with pytest.raises(keylane.UnknownTopic):
        broker.produce(unique("missing"), key="k", value="v")


def test_bad_input_is_refused_clearly(broker: keylane.RedisStreamsBroker) -> None:
    t = topic(broker, "bad", 2)
    with pytest.raises(keylane.InvalidArgument, match="larger than"):
        broker.produce(t, key="k", value=b"x" * 2_000_000)
    with pytest.raises(keylane.InvalidArgument, match="partition must be in"):
        broker.produce(t, key="k", value=b"x", partition=2)
    with pytest.raises(keylane.InvalidArgument, match="exists already"):
        broker.create_topic(t, 2)
    with pytest.raises(keylane.ConfigError, match="without ':'"):
        broker.consumer("g", ["a:b"])
    with pytest.raises(keylane.ConfigError, match="unknown RedisStreamsBroker option"):
        keylane.RedisStreamsBroker("redis://127.0.0.1:6399/0", config={"lease": 3})
    with pytest.raises(keylane.ConfigError, match="url must look like"):
        keylane.RedisStreamsBroker("127.0.0.1:6399")
    broker.flush_sync()
    assert broker.end_offsets(t) == [0, 0]


async def test_a_foreign_entry_is_dead_lettered_not_handled(
    broker: keylane.RedisStreamsBroker,
) -> None:
    t, dlq = topic(broker, "foreign", 1), topic(broker, "foreign-dead", 1)
    r = redis.Redis.from_url(broker.url)
    r.xadd(broker.keys.stream(t, 0), {"something": "else"})
    broker.produce(t, key="k", value=b"fine", partition=0)
    await trio.to_thread.run_sync(broker.flush_sync)
    app = keylane.App(broker, topics=[t], group=GROUP, dlq=dlq)
    handled: list[bytes] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        handled.append(msg.value)

    with trio.fail_after(30):
        await app.run(until_idle=True, handle_signals=False)
    assert handled == [b"fine"]
    assert app.stats()["dead_lettered"] == 1
    assert broker.end_offsets(dlq)[0] > 0


def test_keylane_bench_on_redis_writes_both_sides(redis_url: str, tmp_path: pathlib.Path) -> None:
    address = redis_url.split("://", 1)[1]
    data = bench_both_sides(f"redis://{address}", tmp_path, "-n", "3000", "--keys", "50")
    assert data["broker"] == f"redis://{address}"


async def _noop(msg: keylane.Message) -> None:
    return None
