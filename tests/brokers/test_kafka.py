"""keylane on the real Kafka broker: partitioning, order at scale, crashes,
restarts, slow handlers, rebalances and bad input.

These need the broker scripts/kafka.sh starts (``kafka_bootstrap``); they
never skip. Real time throughout; every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import signal
import time

import pytest
import trio

import keylane
from keylane.brokers import TopicPartition
from tests import kafka_server
from tests.brokers.conftest import KAFKA_CONFIG
from tests.brokers.crash import (
    check_effects,
    produce_versions,
    spawn_member,
    stop_members,
    wait_for,
)
from tests.conftest import OrderChecker
from tests.kafka_server import unique

pytestmark = pytest.mark.kafka


@pytest.fixture
def broker(kafka_bootstrap: str) -> keylane.KafkaBroker:
    return keylane.KafkaBroker(kafka_bootstrap, config=KAFKA_CONFIG)


def committed_ends(broker: keylane.KafkaBroker, topic: str) -> dict[TopicPartition, int]:
    return {TopicPartition(topic, p): e for p, e in enumerate(broker.end_offsets(topic)) if e}


@pytest.mark.parametrize("partitions", [1, 3, 12, 100])
async def test_records_land_where_partition_for_key_says(
    broker: keylane.KafkaBroker, partitions: int
) -> None:
    topic = unique("murmur")
    broker.create_topic(topic, partitions)
    rng = random.Random(partitions)
    keys = [f"user-{i}".encode() for i in range(1500)]
    keys += [rng.randbytes(rng.randint(0, 40)) for _ in range(500)]
    for k in keys:
        broker.produce(topic, key=k, value=b"x")
    broker.flush_sync()
    c = broker.consumer(unique("murmur"), [topic])
    await c.join()
    seen: list[keylane.Message] = []
    with trio.fail_after(60):
        while len(seen) < len(keys):
            f = await c.fetch(5000, 0.5)
            seen.extend(m for _, chunk in f.chunks for m in chunk)
    await c.close()
    assert sorted(m.key or b"" for m in seen) == sorted(keys)
    wrong = [
        (m.key, m.partition)
        for m in seen
        if m.partition != keylane.partition_for_key(m.key or b"", partitions)
    ]
    assert wrong == []


async def test_keyed_end_to_end_100k(broker: keylane.KafkaBroker) -> None:
    topic, group = unique("e2e"), unique("e2e")
    broker.create_topic(topic, 12)
    n, keys = 100_000, 1000
    await trio.to_thread.run_sync(produce_versions, broker, topic, n, keys)
    app = keylane.App(
        broker, topics=[topic], group=group, ordering="key", concurrency=256, commit_interval=0.5
    )
    check = OrderChecker()
    rng = random.Random(7)

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        if rng.random() < 0.05:
            await trio.sleep(rng.random() * 0.004)
        else:
            await trio.lowlevel.checkpoint()
        check.end(msg)

    with trio.fail_after(240):
        await app.run(until_idle=True, handle_signals=False)
    check.assert_ordered()
    assert check.count == n
    assert sum(len(v) for v in check.versions.values()) == n
    assert broker.committed(group) == committed_ends(broker, topic)


async def test_sigkill_one_of_two_member_processes(
    broker: keylane.KafkaBroker, kafka_bootstrap: str, tmp_path: pathlib.Path
) -> None:
    topic, group = unique("crash"), unique("crash")
    broker.create_topic(topic, 6)
    n, keys = 20_000, 200
    await trio.to_thread.run_sync(produce_versions, broker, topic, n, keys)
    table, effects = str(tmp_path / "effects.lmdb"), str(tmp_path / "effects.log")
    a = spawn_member(f"kafka:{kafka_bootstrap}", topic, group, table, effects)
    b = spawn_member(f"kafka:{kafka_bootstrap}", topic, group, table, effects)
    try:
        # Both members working, then one dies mid-stream.
        await wait_for(
            lambda: os.path.exists(effects) and os.path.getsize(effects) > 20_000, 60, "start"
        )
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        ends = committed_ends(broker, topic)
        await wait_for(lambda: broker.committed(group) == ends, 120, "the survivor commits all")
    finally:
        stop_members(a, b)
    assert b.returncode == 0
    await trio.to_thread.run_sync(check_effects, effects, table, n, keys, 16)


async def test_restart_resumes_from_committed_offsets(broker: keylane.KafkaBroker) -> None:
    topic, group = unique("restart"), unique("restart")
    broker.create_topic(topic, 3)
    await trio.to_thread.run_sync(produce_versions, broker, topic, 500, 20)
    seen: list[int] = []

    def make_app() -> keylane.App:
        app = keylane.App(broker, topics=[topic], group=group, commit_interval=0.2)

        @app.handler
        async def handle(msg: keylane.Message) -> None:
            seen.append(int(msg.headers["version"]))

        return app

    with trio.fail_after(60):
        await make_app().run(until_idle=True, handle_signals=False)
    assert sorted(seen) == list(range(500))
    await trio.to_thread.run_sync(lambda: produce_versions(broker, topic, 300, 20, start=500))
    with trio.fail_after(60):
        await make_app().run(until_idle=True, handle_signals=False)
    assert sorted(seen) == list(range(800))
    assert broker.committed(group) == committed_ends(broker, topic)


async def test_app_survives_a_broker_restart(broker: keylane.KafkaBroker) -> None:
    topic, group = unique("bounce"), unique("bounce")
    broker.create_topic(topic, 4)
    n = 4000
    await trio.to_thread.run_sync(produce_versions, broker, topic, n, 100)
    app = keylane.App(broker, topics=[topic], group=group, concurrency=4, commit_interval=0.2)
    check = OrderChecker()

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        await trio.sleep(0.01)
        check.end(msg)

    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            await wait_for(lambda: check.count > 300, 60, "handling starts")
            assert check.count < n // 2, "nearly done before the broker restarted"
            await trio.to_thread.run_sync(kafka_server.bounce)
            await wait_for(
                lambda: broker.committed(group) == committed_ends(broker, topic), 150, "resume"
            )
            app.stop()
    # Redelivery after the restart may replay from the last commit.
    check.assert_ordered_with_replays(2)
    assert {v for vs in check.versions.values() for v in vs} == set(range(n))


async def test_slow_handler_small_capacity_stays_in_the_group(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "session.timeout.ms": 2000,
        "heartbeat.interval.ms": 500,
        "max.poll.interval.ms": 2000,
    }
    broker = keylane.KafkaBroker(kafka_bootstrap, config=config)
    topic, group = unique("slow"), unique("slow")
    broker.create_topic(topic, 2)
    await trio.to_thread.run_sync(produce_versions, broker, topic, 24, 24)
    app = keylane.App(
        broker, topics=[topic], group=group, concurrency=2, capacity=2, commit_interval=0.2
    )
    seen: list[int] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        await trio.sleep(0.5)
        seen.append(int(msg.headers["version"]))

    caplog.set_level(logging.INFO, logger="keylane")
    start = time.monotonic()
    with trio.fail_after(90):
        await app.run(until_idle=True, handle_signals=False)
    # 24 messages, 2 at a time, 0.5 s each: 6 s, three times the poll interval.
    assert time.monotonic() - start > 6
    assert sorted(seen) == list(range(24)), "a message was handled twice or lost"
    text = caplog.text
    assert "lost" not in text, text[-3000:]
    assert "revoked" not in text, text[-3000:]
    assert app.stats()["redelivered_dropped"] == 0


@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
async def test_rebalance_while_handlers_run(kafka_bootstrap: str, strategy: str) -> None:
    config = {**KAFKA_CONFIG, "partition.assignment.strategy": strategy}
    topic, group = unique("rebal"), unique("rebal")
    first = keylane.KafkaBroker(kafka_bootstrap, config=config)
    first.create_topic(topic, 6)
    n = 6000
    await trio.to_thread.run_sync(produce_versions, first, topic, n, 300)
    check = OrderChecker()

    def member(broker: keylane.KafkaBroker) -> keylane.App:
        app = keylane.App(broker, topics=[topic], group=group, concurrency=32, commit_interval=0.2)

        @app.handler
        async def handle(msg: keylane.Message) -> None:
            check.start(msg)
            await trio.sleep(0.003)
            check.end(msg)

        return app

    a = member(first)
    b = member(keylane.KafkaBroker(kafka_bootstrap, config=config))
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await wait_for(lambda: check.count > 500, 60, "a starts")
            await nursery.start(b.run)
            await wait_for(
                lambda: first.committed(group) == committed_ends(first, topic), 150, "done"
            )
            a.stop()
            b.stop()
    # One key never ran in both members at once; after a handover the new
    # owner replays from the partition's committed offset (at-least-once).
    check.assert_ordered_with_replays(2)
    assert {v for vs in check.versions.values() for v in vs} == set(range(n))
    assert b.stats()["handled"] > 0


async def test_unreachable_bootstrap_fails_clearly_within_a_bound() -> None:
    broker = keylane.KafkaBroker("127.0.0.1:1", config={"socket.connection.setup.timeout.ms": 1000})
    app = keylane.App(broker, topics=["t"], group="g", broker_timeout=3)

    @app.handler
    async def handle(msg: keylane.Message) -> None: ...

    start = time.monotonic()
    with trio.fail_after(30), pytest.raises(keylane.BrokerError, match=r"127\.0\.0\.1:1"):
        await app.run(handle_signals=False)
    assert time.monotonic() - start < 25


def test_producing_to_an_unknown_topic_is_a_clear_error(broker: keylane.KafkaBroker) -> None:
    missing = unique("missing")
    with pytest.raises(keylane.UnknownTopic, match=missing):
        broker.produce(missing, key="k", value=b"v")
    broker.create_topic(missing, 1)
    broker.produce(missing, key="k", value=b"v")
    broker.flush_sync()
    assert broker.end_offsets(missing) == [1]


async def test_unknown_topic_is_a_clear_error(broker: keylane.KafkaBroker) -> None:
    app = keylane.App(broker, topics=[unique("missing")], group=unique("g"))

    @app.handler
    async def handle(msg: keylane.Message) -> None: ...

    with trio.fail_after(30), pytest.raises(keylane.UnknownTopic, match="create"):
        await app.run(handle_signals=False)


def test_broker_options_are_validated() -> None:
    with pytest.raises(keylane.ConfigError, match="bootstrap_servers"):
        keylane.KafkaBroker("")
    with pytest.raises(keylane.ConfigError, match="config"):
        keylane.KafkaBroker("127.0.0.1:9092", config=[("a", 1)])  # type: ignore[arg-type]
    broker = keylane.KafkaBroker("127.0.0.1:9092")
    with pytest.raises(keylane.InvalidArgument, match="topic name"):
        broker.produce("../x", key="k")
    with pytest.raises(keylane.InvalidType, match="key"):
        broker.produce("t", key=5)  # type: ignore[arg-type]


def test_keylane_bench_on_kafka_writes_both_sides(
    kafka_bootstrap: str, tmp_path: pathlib.Path
) -> None:
    from click.testing import CliRunner

    from keylane.cli import ENV_PREFIX, main

    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "throughput", "--broker", f"kafka://{kafka_bootstrap}"]
    args += ["-n", "3000", "--keys", "50", "--partitions", "3", "--rounds", "1"]
    args += ["--json", str(out)]
    result = CliRunner().invoke(main, args, auto_envvar_prefix=ENV_PREFIX)
    assert result.exit_code == 0, result.output
    assert "the bare loop" in result.output
    (data,) = json.loads(out.read_text())
    assert data["preset"] == "throughput"
    assert len(data["keylane"]) == len(data["bare"]) == 1
    assert data["keylane"][0] > 0
    assert data["bare"][0] > 0


def test_bench_refuses_a_malformed_broker_url() -> None:
    from click.testing import CliRunner

    from keylane.cli import main

    result = CliRunner().invoke(main, ["bench", "--broker", "kafka:/x", "-n", "10"])
    assert result.exit_code == 2
    assert "kafka://127.0.0.1:9092" in result.output


def test_latency_preset_measures_every_message(kafka_bootstrap: str) -> None:
    from keylane.bench import kafka_latency

    result = kafka_latency.run(kafka_bootstrap, rate=300, seconds=2)
    assert result.messages == 600
    assert 0 < result.p50_ms <= result.p99_ms <= result.p999_ms <= result.max_ms
    # Produced and handled on one machine: far below a minute, whatever the load.
    assert result.max_ms < 60_000
