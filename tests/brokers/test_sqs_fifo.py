"""keylane on a real SQS FIFO server (ElasticMQ, started by
scripts/elasticmq.sh): order at concurrency 256, a consumer process killed
mid-stream, long handlers and retries that keep their group, the DLQ, the
server stopped mid-run, and bad input.

They never skip. Real time throughout; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal

import msgpack
import pytest
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
from tests.conftest import SQS, OrderChecker
from tests.servers import unique

pytestmark = pytest.mark.sqs

# Short, so that what lapses lapses within the tests' bounds.
VISIBILITY = 3


@pytest.fixture
def broker(sqs_endpoint: str) -> keylane.SqsFifoBroker:
    return keylane.SqsFifoBroker(sqs_endpoint, config={"visibility_timeout": VISIBILITY})


def queue(broker: keylane.SqsFifoBroker, prefix: str) -> str:
    name = unique(prefix) + ".fifo"
    broker.create_topic(name)
    return name


async def test_keyed_order_at_concurrency_256_with_random_latency(
    broker: keylane.SqsFifoBroker,
) -> None:
    q = queue(broker, "order")
    n, keys = 3000, 300
    await trio.to_thread.run_sync(produce_versions, broker, q, n, keys)
    app = keylane.App(broker, topics=[q], group="g", concurrency=256)
    check = OrderChecker()
    rng = random.Random(5)

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
    assert broker.counts(q) == (0, 0)
    assert app.stats()["acks"] == n


async def test_sigkill_one_of_two_member_processes(
    broker: keylane.SqsFifoBroker, sqs_endpoint: str, tmp_path: pathlib.Path
) -> None:
    q = queue(broker, "crash")
    n, keys = 4000, 100
    await trio.to_thread.run_sync(produce_versions, broker, q, n, keys)
    table, effects = str(tmp_path / "effects.lmdb"), str(tmp_path / "effects.log")
    a = spawn_member(f"sqs:{sqs_endpoint}", q, "g", table, effects)
    b = spawn_member(f"sqs:{sqs_endpoint}", q, "g", table, effects)
    try:
        await wait_for(
            lambda: os.path.exists(effects) and os.path.getsize(effects) > 4_000, 60, "start"
        )
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        # What the killed member held comes back once its visibility lapses.
        await wait_for(lambda: broker.counts(q) == (0, 0), 120, "the survivor handles all")
    finally:
        stop_members(a, b)
    assert b.returncode == 0
    await trio.to_thread.run_sync(check_effects, effects, table, n, keys, 16)


async def test_long_handlers_and_retries_keep_their_group_from_other_consumers(
    sqs_endpoint: str,
) -> None:
    # Two Apps on one queue. Key "slow" has a handler that runs 3 visibility
    # timeouts; key "flaky" fails twice with backoffs longer than one. Their
    # messages must never go to the other App meanwhile, nor run twice.
    config = {"visibility_timeout": VISIBILITY}
    brokers = [keylane.SqsFifoBroker(sqs_endpoint, config=config) for _ in range(2)]
    q = queue(brokers[0], "hold")
    for v in range(60):
        key = ("slow", "flaky", f"k{v % 4}")[v % 3]
        brokers[0].produce(q, key=key, value=b"", headers={"version": str(v)})
    await trio.to_thread.run_sync(brokers[0].flush_sync)
    check = OrderChecker()
    runs: dict[int, list[tuple[int, int]]] = {}
    retry = keylane.RetryPolicy(
        max_attempts=3, backoff_base=1.5 * VISIBILITY, backoff_factor=1, jitter=0
    )

    def make(i: int) -> keylane.App:
        app = keylane.App(brokers[i], topics=[q], group="g", concurrency=8, retry=retry)

        @app.handler
        async def handle(msg: keylane.Message) -> None:
            v = int(msg.headers["version"])
            runs.setdefault(v, []).append((i, msg.attempt))
            check.start(msg)
            try:
                if msg.key == b"slow" and v == 0:
                    await trio.sleep(3 * VISIBILITY)
                if msg.key == b"flaky" and v == 1 and msg.attempt < 2:
                    raise RuntimeError("not yet")
                await trio.sleep(0.01)
            finally:
                check.running.discard(msg.key)
            check.end(msg)

        return app

    apps = [make(0), make(1)]
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for app in apps:
                await nursery.start(app.run)
            await wait_for(lambda: len(runs) == 60 and not check.running, 80, "all handled")
            await wait_for(lambda: brokers[0].counts(q) == (0, 0), 20, "all deleted")
            for app in apps:
                app.stop()
    check.assert_ordered()
    # Every message ran once, but the flaky one (three attempts, one App).
    for v, attempts in runs.items():
        if v == 1:
            assert [a for _, a in attempts] == [0, 1, 2], attempts
            assert len({i for i, _ in attempts}) == 1, attempts
        else:
            assert len(attempts) == 1, (v, attempts)
    assert sum(app.stats()["retried"] for app in apps) == 2


async def test_dead_lettered_messages_leave_their_group_moving(
    broker: keylane.SqsFifoBroker,
) -> None:
    q, dlq = queue(broker, "dl"), queue(broker, "dl-dead")
    for v in range(20):
        broker.produce(
            q, key=f"k{v % 2}", value=b"poison" if v == 4 else b"ok", headers={"version": str(v)}
        )
    await trio.to_thread.run_sync(broker.flush_sync)
    fast = keylane.RetryPolicy(max_attempts=2, backoff_base=0.01, jitter=0)
    app = keylane.App(broker, topics=[q], group="g", retry=fast, dlq=dlq)
    handled: list[int] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        if msg.value == b"poison":
            raise ValueError("cannot parse")
        handled.append(int(msg.headers["version"]))

    with trio.fail_after(60):
        await app.run(until_idle=True, handle_signals=False)
    assert sorted(handled) == [v for v in range(20) if v != 4]
    assert [v for v in handled if v % 2 == 0] == [0, 2, 6, 8, 10, 12, 14, 16, 18]
    assert broker.counts(q) == (0, 0)
    c = broker.consumer("reader", [dlq])
    await c.join()
    with trio.fail_after(20):
        got: list[keylane.Message] = []
        while not got:
            f = await c.fetch(10, 1.0)
            got = [m for _, chunk in f.chunks for m in chunk]
    await c.close()
    (dead,) = got
    record = msgpack.unpackb(dead.value)
    assert (record["topic"], record["value"], record["key"]) == (q, b"poison", b"k0")
    assert dead.key == b"k0"


async def test_server_stopped_answering_mid_run_then_back_loses_nothing(
    sqs_endpoint: str,
) -> None:
    # The server is frozen (SIGSTOP): every call hangs until its timeout.
    # (A restart is not used: ElasticMQ's store can lose deletes and
    # receives across one, which no client could make up for.)
    config = {"visibility_timeout": VISIBILITY, "read_timeout": 2, "connect_timeout": 1}
    broker = keylane.SqsFifoBroker(sqs_endpoint, config=config)
    q = queue(broker, "down")
    n = 1500
    await trio.to_thread.run_sync(produce_versions, broker, q, n, 50)
    app = keylane.App(broker, topics=[q], group="g", concurrency=8, broker_timeout=3)
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
                await wait_for(lambda: check.count > 200, 60, "handling starts")
                await trio.to_thread.run_sync(SQS.pause)
                down_at = app.stats()["broker_retries"]
                await trio.sleep(2 * VISIBILITY)
                assert app.stats()["broker_retries"] > down_at, "no retries while down"
                await trio.to_thread.run_sync(SQS.unpause)
                await wait_for(lambda: broker.counts(q) == (0, 0), 120, "resume")
                await wait_for(lambda: not check.running, 10, "handlers finish")
                app.stop()
    finally:
        await trio.to_thread.run_sync(SQS.unpause)
    # While frozen, visibilities lapsed: those messages came back once.
    check.assert_ordered_with_replays(2)
    missing = set(range(n)) - {v for vs in check.versions.values() for v in vs}
    assert not missing, (sorted(missing)[:20], len(missing), app.stats())


async def test_unreachable_endpoint_fails_clearly_within_a_bound() -> None:
    broker = keylane.SqsFifoBroker(
        "http://127.0.0.1:9", config={"connect_timeout": 0.5, "max_attempts": 1}
    )
    app = keylane.App(broker, topics=["nowhere.fifo"], group="g", broker_timeout=2)
    app.handler(_noop)
    with (
        trio.fail_after(30),
        pytest.raises(keylane.BrokerError, match=r"nowhere\.fifo|127\.0\.0\.1"),
    ):
        await app.run(handle_signals=False)


async def test_missing_queue_is_a_clear_error(broker: keylane.SqsFifoBroker) -> None:
    app = keylane.App(broker, topics=[unique("missing") + ".fifo"], group="g")
    app.handler(_noop)
    with trio.fail_after(30), pytest.raises(keylane.UnknownTopic, match="does not exist"):
        await app.run(handle_signals=False)
    broker.produce(unique("missing") + ".fifo", key="k", value="v")
    with pytest.raises(keylane.UnknownTopic, match="1 message"):
        broker.flush_sync()
    broker.flush_sync()  # dropped, and said so: nothing left to send


def test_bad_input_is_refused_clearly(broker: keylane.SqsFifoBroker) -> None:
    q = queue(broker, "bad")
    with pytest.raises(keylane.InvalidArgument, match="larger than SQS allows"):
        broker.produce(q, key="k", value=b"x" * 300_000)
    with pytest.raises(keylane.InvalidArgument, match="no partitions"):
        broker.produce(q, key="k", value=b"x", partition=1)
    with pytest.raises(keylane.ConfigError, match="not a FIFO queue name"):
        broker.produce("plain", key="k", value=b"x")
    with pytest.raises(keylane.ConfigError, match="not a FIFO queue name"):
        broker.consumer("g", ["plain"])
    with pytest.raises(keylane.ConfigError, match="unknown SqsFifoBroker option"):
        keylane.SqsFifoBroker("http://127.0.0.1:9324", config={"visibility": 3})
    with pytest.raises(keylane.ConfigError, match="visibility_timeout"):
        keylane.SqsFifoBroker("http://127.0.0.1:9324", config={"visibility_timeout": 1})
    with pytest.raises(keylane.ConfigError, match="endpoint_url"):
        keylane.SqsFifoBroker("127.0.0.1:9324")
    # Nothing refused was queued: the flush sends nothing.
    broker.flush_sync()
    assert broker.counts(q) == (0, 0)


def test_keylane_bench_on_sqs_writes_both_sides(sqs_endpoint: str, tmp_path: pathlib.Path) -> None:
    address = sqs_endpoint.split("://", 1)[1]
    data = bench_both_sides(f"sqs://{address}", tmp_path, "-n", "300", "--keys", "50")
    assert data["broker"] == f"sqs://{address}"


def test_sqs_fifo_preset_shows_the_single_group_cap(
    sqs_endpoint: str, tmp_path: pathlib.Path
) -> None:
    from click.testing import CliRunner

    from keylane.cli import ENV_PREFIX, main

    out = tmp_path / "sqs.json"
    address = sqs_endpoint.split("://", 1)[1]
    args = ["bench", "--preset", "sqs-fifo", "--broker", f"sqs://{address}", "-n", "200"]
    args += ["--keys", "1,8", "--repeat", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args, auto_envvar_prefix=ENV_PREFIX)
    assert result.exit_code == 0, result.output
    one, eight = json.loads(out.read_text())
    assert (one["keys"], eight["keys"]) == (1, 8)
    # One group runs one message at a time: never above 1 / latency.
    assert one["throughput"] <= 1000 / 5.0
    assert one["max_in_flight"] == 1
    assert eight["throughput"] > 2 * one["throughput"]
    assert one["order_violations"] == eight["order_violations"] == 0


async def _noop(msg: keylane.Message) -> None:
    return None
