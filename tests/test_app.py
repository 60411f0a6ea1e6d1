"""keylane.App on the MemoryBroker: order, failures, shutdown, rebalance."""

from __future__ import annotations

import functools
import itertools
import pathlib
import random
import warnings
from collections import Counter
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel

import keylane
from keylane import App, MemoryBroker, Message, RetryPolicy
from keylane.brokers import TopicPartition

from .conftest import FAST_RETRY, OrderChecker, end_offsets, make_app, produce_many, wait_until


def test_the_readme_example_runs_until_idle() -> None:
    """The code from the issue, verbatim apart from the handler body."""
    broker = keylane.MemoryBroker(partitions=12)
    for i in range(1000):
        broker.produce("payments", key=f"acct-{i % 50}", value=b"...", headers={"version": str(i)})

    app = keylane.App(broker, topics=["payments"], group="wallet", ordering="key", concurrency=256)
    seen: list[Message] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        seen.append(msg)

    trio.run(functools.partial(app.run, until_idle=True))
    assert len(seen) == 1000
    m = seen[0]
    assert (type(m.topic), type(m.partition), type(m.offset)) == (str, int, int)
    assert m.key is not None
    assert m.key.startswith(b"acct-")
    assert (m.value, m.attempt) == (b"...", 0)
    assert isinstance(m.headers["version"], bytes)
    assert broker.committed("wallet") == end_offsets(broker, "payments")
    stats = app.stats()
    assert (stats["consumed"], stats["handled"], stats["failed"]) == (1000, 1000, 0)


@pytest.mark.parametrize("repartition", ["hold", "off"])
def test_a_finished_run_is_freed_without_the_cyclic_collector(repartition: str) -> None:
    """A run's state (dispatcher, per-key maps) is freed when the App lets
    go of it, not left in a reference cycle until a full collection frees
    it in one long pause on whatever loop is running then."""
    import gc
    import weakref

    from keylane import _runtime

    broker = MemoryBroker(partitions=4)
    produce_many(broker, "t", 200, keys=20)
    app = App(broker, topics=["t"], group="g", repartition=repartition)  # type: ignore[arg-type]
    runs: list[weakref.ref[_runtime.Run]] = []
    real_run = _runtime.Run

    def watched(*args: Any, **kwargs: Any) -> _runtime.Run:
        run = real_run(*args, **kwargs)
        runs.append(weakref.ref(run))
        return run

    @app.handler
    async def handle(msg: Message) -> None:
        pass

    gc.collect()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(keylane.app, "Run", watched)
            trio.run(functools.partial(app.run, until_idle=True, handle_signals=False))
        assert app.stats()["handled"] == 200
        assert len(runs) == 1
        assert runs[0]() is None, "the finished run is still alive: a reference cycle holds it"
    finally:
        gc.enable()


async def test_per_key_order_with_many_workers_and_random_latency(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=12)
    produce_many(broker, "payments", 3000, keys=40)
    app = make_app(broker, concurrency=128)
    checker = OrderChecker()
    rng = random.Random(1)
    concurrent = [0, 0]

    @app.handler
    async def handle(msg: Message) -> None:
        checker.start(msg)
        concurrent[0] += 1
        concurrent[1] = max(concurrent)
        await trio.sleep(rng.random() * 0.01)
        concurrent[0] -= 1
        checker.end(msg)

    await app.run(until_idle=True)
    assert checker.count == 3000
    checker.assert_ordered()
    assert concurrent[1] >= 20, "keys ran in parallel"
    assert broker.committed("wallet") == end_offsets(broker, "payments")


async def test_an_idle_run_ends_when_its_last_handler_does(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``until_idle``: once every record is fetched and handled, the run
    commits and returns at once; it does not wait out a fetch's wait for
    records that are not coming (that wait was on the end of every run)."""
    broker = MemoryBroker(partitions=4)
    produce_many(broker, "payments", 200, keys=20)
    app = make_app(broker, concurrency=8)
    last = [0.0]

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.003 + 0.001 * (msg.offset % 7))
        last[0] = trio.current_time()

    await app.run(until_idle=True)
    assert app.stats()["handled"] == 200
    assert broker.committed("wallet") == end_offsets(broker, "payments")
    assert trio.current_time() - last[0] < 0.005


@pytest.mark.parametrize(("ordering", "limit"), [("total", 1), ("partition", 4), ("none", 64)])
async def test_other_orderings_bound_concurrency(
    autojump_clock: trio.abc.Clock, ordering: str, limit: int
) -> None:
    broker = MemoryBroker(partitions=4)
    produce_many(broker, "payments", 400, keys=20)
    app = make_app(broker, ordering=ordering, concurrency=64)
    running, peak = [0], [0]
    per_partition: dict[int, list[int]] = {}

    @app.handler
    async def handle(msg: Message) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await trio.sleep(0.001)
        running[0] -= 1
        per_partition.setdefault(msg.partition, []).append(msg.offset)

    await app.run(until_idle=True)
    assert peak[0] == limit
    if ordering != "none":
        for offsets in per_partition.values():
            assert offsets == sorted(offsets)


@pytest.mark.parametrize("record_versions", ["each", "batched"])
async def test_crash_and_restart_loses_nothing_and_applies_nothing_twice(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path, record_versions: str
) -> None:
    # Coarse timings: this clock jumps only after real idleness (the
    # version flush runs in a thread), so fewer distinct wake-ups run faster.
    broker = MemoryBroker(partitions=6, session_timeout=1)
    produce_many(broker, "payments", 600, keys=30)
    applied: dict[bytes | None, list[int]] = {}
    handled: set[tuple[int, int]] = set()

    def handler_for(app: App) -> None:
        @app.handler
        async def handle(msg: Message) -> None:
            await trio.sleep(0.05)
            handled.add((msg.partition, msg.offset))
            applied.setdefault(msg.key, []).append(int(msg.headers["version"]))

    options = {"versions": tmp_path / "v", "concurrency": 32, "record_versions": record_versions}
    first = make_app(broker, commit_interval=0.2, **options)
    handler_for(first)
    async with trio.open_nursery() as n:
        n.start_soon(first.run)
        # Mid-stream, after a few commits: some work is committed, some
        # handled but not committed yet, most not started.
        await wait_until(
            lambda: first.stats()["handled"] >= 200 and first.stats()["commits"] >= 2, 0.05
        )
        first.abort()  # no final commit, no leaving the group
    committed = sum(broker.committed("wallet").values())
    assert 0 < committed < 600
    marks = {tp.partition: o for tp, o in broker.committed("wallet").items()}
    handled_not_committed = {(p, o) for p, o in handled if o >= marks.get(p, 0)}
    with keylane.VersionTable(tmp_path / "v") as table:
        recorded = {key: table.get(key) for key in applied}
    before_crash = {key: list(v) for key, v in applied.items()}

    second = make_app(broker, commit_interval=0.2, **options)
    handler_for(second)
    await second.run(until_idle=True)

    # Nothing lost: every record was handled, and everything is committed.
    everything = {(m.partition, m.offset) for p in range(6) for m in broker.records("payments", p)}
    assert handled == everything
    assert broker.committed("wallet") == end_offsets(broker, "payments")
    # What the crash left uncommitted came again; versions it had recorded
    # were dropped as stale instead of applied twice.
    assert second.stats()["consumed"] >= 600 - committed
    if record_versions == "each":
        # Handled but not committed when it died: redelivered, and stale.
        # (How many depends on where the crash fell between two commits.)
        assert second.stats()["stale_dropped"] >= len(handled_not_committed)
    for key, versions in applied.items():
        again = versions[len(before_crash.get(key, [])) :]
        if record_versions == "each":
            # Recorded as each handler returned: nothing applied twice.
            assert versions == sorted(set(versions)), f"{key!r} applied {versions}"
        else:
            # Batched: only the window since the last flush can repeat.
            floor = recorded[key] if recorded.get(key) is not None else -1
            repeated = set(before_crash.get(key, [])) & set(again)
            assert all(v > floor for v in repeated), f"{key!r} repeated recorded versions"
            assert again == sorted(again), f"{key!r} applied {again} after the restart"


async def test_retries_in_place_keep_the_key_blocked(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="a1")
    broker.produce("payments", key="a", value="a2")
    broker.produce("payments", key="b", value="b1")
    app = make_app(broker, retry=FAST_RETRY)
    log: list[tuple[bytes, int]] = []

    @app.handler
    async def handle(msg: Message) -> None:
        log.append((msg.value, msg.attempt))
        if msg.value == b"a1" and msg.attempt < 2:
            raise RuntimeError("flaky")

    await app.run(until_idle=True)
    assert [e for e in log if e[0].startswith(b"a")] == [
        (b"a1", 0),
        (b"a1", 1),
        (b"a1", 2),
        (b"a2", 0),
    ]
    # b was not held up by a's failures.
    assert log.index((b"b1", 0)) < log.index((b"a1", 2))
    stats = app.stats()
    assert (stats["failed"], stats["retried"], stats["handled"]) == (2, 2, 3)


async def test_exhausted_messages_go_to_the_dlq_and_release_the_key(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=2)
    broker.produce("payments", key="a", value="poison", headers={"version": "1"})
    broker.produce("payments", key="a", value="next", headers={"version": "2"})
    app = make_app(broker, retry=FAST_RETRY, dlq="payments.dlq")
    handled: list[bytes] = []

    @app.handler
    async def handle(msg: Message) -> None:
        if msg.value == b"poison":
            raise ValueError("cannot parse")
        handled.append(msg.value)

    await app.run(until_idle=True)
    assert handled == [b"next"]
    assert app.stats()["dead_lettered"] == 1
    (dead,) = [m for p in range(2) for m in broker.records("payments.dlq", p)]
    record = msgpack.unpackb(dead.value)
    assert record["format"] == 1
    assert (record["topic"], record["value"], record["attempts"], record["group"]) == (
        "payments",
        b"poison",
        3,
        "wallet",
    )
    assert record["key"] == b"a"
    assert record["headers"] == {"version": b"1"}
    assert record["error_type"] == "builtins.ValueError"
    assert "cannot parse" in record["error"]
    assert dead.key == b"a"
    assert broker.committed("wallet") == end_offsets(broker, "payments")


async def test_without_a_dlq_skip_gives_up_and_block_keeps_trying(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="bad")
    broker.produce("payments", key="a", value="good")
    skipping = make_app(broker, group="s", retry=FAST_RETRY, on_exhausted="skip")

    @skipping.handler
    async def fail_bad(msg: Message) -> None:
        if msg.value == b"bad":
            raise RuntimeError("no")

    await skipping.run(until_idle=True)
    assert skipping.stats()["skipped"] == 1
    assert broker.committed("s") == {TopicPartition("payments", 0): 2}

    blocking = make_app(broker, group="b", retry=FAST_RETRY)
    attempts: list[int] = []

    @blocking.handler
    async def fail_bad_then_recover(msg: Message) -> None:
        if msg.value == b"bad":
            attempts.append(msg.attempt)
            if msg.attempt < 6:  # a dependency that comes back after a while
                raise RuntimeError("still down")

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(blocking.run, handle_signals=False))
        await wait_until(lambda: broker.committed("b") == {TopicPartition("payments", 0): 2})
        blocking.stop()
    assert attempts == list(range(7)), "kept retrying past max_attempts, at backoff_max"
    assert blocking.stats()["skipped"] == 0


async def test_until_idle_with_only_blocked_keys_left_reports_them(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # Once everything else is handled and committed, run(until_idle=True)
    # does not wait forever for keys blocked by messages that fail every
    # attempt: it stops and raises BlockedKeys naming them.
    broker = MemoryBroker(partitions=2)
    for i in range(40):
        broker.produce("payments", key=f"k{i % 8}", value=b"bad" if i in (9, 10, 17) else b"ok")
    app = make_app(broker, retry=FAST_RETRY)
    handled: list[int] = []

    @app.handler
    async def handle(msg: Message) -> None:
        if msg.value == b"bad":
            raise RuntimeError("permanently broken")
        handled.append(msg.offset)

    with pytest.raises(keylane.BlockedKeys, match="2 key\\(s\\) are blocked") as raised:
        await app.run(until_idle=True)
    blocked = raised.value.blocked
    # One entry per key, its oldest: 9 and 17 are both k1 (17 waits behind 9).
    assert sorted(b["key"] for b in blocked) == [b"k1", b"k2"]
    assert all(b["attempts"] >= FAST_RETRY.max_attempts for b in blocked)
    assert all("permanently broken" in b["error"] for b in blocked)
    # Every key but the blocked ones was handled, and committed up to them.
    assert len(handled) == 40 - sum(1 for i in range(9, 40) if i % 8 in (1, 2))
    stats = app.stats()
    assert [(b["key"], b["offset"]) for b in stats["blocked"]] == [
        (b["key"], b["offset"]) for b in blocked
    ]
    assert "blocked key(s)" in caplog.text
    for tp, offset in broker.committed(app.group).items():
        firsts = [b["offset"] for b in blocked if b["partition"] == tp.partition]
        assert offset == (min(firsts) if firsts else broker.end_offsets("payments")[tp.partition])


async def test_blocked_keys_of_a_partition_given_away_are_no_longer_reported(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=2)
    for p in range(2):
        broker.produce("payments", key=f"k{p}", value=b"bad", partition=p)
    first = make_app(broker, retry=FAST_RETRY)
    second = make_app(broker, retry=FAST_RETRY)

    async def fail(msg: Message) -> None:
        raise RuntimeError("broken")

    first.handler(fail)
    second.handler(fail)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(first.run, handle_signals=False))
        await wait_until(lambda: len(first.stats()["blocked"]) == 2)
        await nursery.start(functools.partial(second.run, handle_signals=False))
        await wait_until(lambda: len(first.stats()["blocked"]) == 1)
        await wait_until(lambda: len(second.stats()["blocked"]) == 1)
        owned = {b["partition"] for b in first.stats()["blocked"]}
        assert owned.isdisjoint(b["partition"] for b in second.stats()["blocked"])
        first.stop()
        second.stop()


async def test_a_malformed_version_header_is_counted_and_named(
    autojump_clock: trio.abc.Clock, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value=b"", headers={"version": "1"})
    broker.produce("payments", key="b", value=b"", headers={"version": "seven"})
    broker.produce("payments", key="c", value=b"", headers={"version": "3"})
    app = make_app(broker, versions=tmp_path / "v", on_exhausted="skip")
    seen: list[bytes | None] = []

    @app.handler
    async def handle(msg: Message) -> None:
        seen.append(msg.key)

    await app.run(until_idle=True)
    stats = app.stats()
    assert (stats["failed"], stats["malformed"], stats["skipped"]) == (1, 1, 1)
    assert seen == [b"a", b"c"]
    assert "version header b'seven' is not a decimal integer" in caplog.text
    # With on_exhausted="block" (the default) the key stays blocked, and
    # until_idle says so instead of waiting forever.
    blocking = make_app(broker, group="blocking", versions=tmp_path / "w")
    blocking.handler(handle)
    with pytest.raises(keylane.BlockedKeys) as raised:
        await blocking.run(until_idle=True)
    assert [b["key"] for b in raised.value.blocked] == [b"b"]
    assert blocking.stats()["malformed"] >= 1


async def test_dlq_replay_is_rate_limited_and_stale_versions_are_dropped(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=3)
    for i in range(20):
        broker.produce("payments", key=f"k{i}", value="v", headers={"version": "5"})
    app = make_app(
        broker, retry=RetryPolicy(max_attempts=1), dlq="payments.dlq", versions=tmp_path / "v"
    )
    down = [True]

    @app.handler
    async def handle(msg: Message) -> None:
        if down[0]:
            raise ConnectionError("database down")

    await app.run(until_idle=True)
    assert app.stats()["dead_lettered"] == 20
    # Meanwhile k0..k4 moved on to version 6: their replays are stale now.
    down[0] = False
    for i in range(5):
        broker.produce("payments", key=f"k{i}", value="newer", headers={"version": "6"})
    await app.run(until_idle=True)
    start = trio.current_time()
    assert await app.replay_dlq(rate=10, burst=2) == 20
    # 20 records at 10/s with 2 banked: at least 1.8 s.
    assert trio.current_time() - start >= 1.8
    await app.run(until_idle=True)
    stats = app.stats()
    assert stats["stale_dropped"] == 5
    replayed = [
        m
        for p in range(3)
        for m in broker.records("payments", p)
        if "keylane-replay-of" in m.headers
    ]
    assert len(replayed) == 20
    assert all(m.headers["version"] == b"5" for m in replayed)
    # A second replay finds nothing new.
    assert await app.replay_dlq(rate=10) == 0


async def test_stop_lets_running_handlers_finish_and_commits(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 50, keys=50)
    app = make_app(broker, concurrency=8, shutdown_timeout=10)
    finished: list[int] = []

    finished_at: set[tuple[int, int]] = set()

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(1)
        finished.append(msg.offset)
        finished_at.add((msg.partition, msg.offset))

    async with trio.open_nursery() as n:
        n.start_soon(app.run)
        await trio.sleep(0.5)  # 8 handlers are mid-way
        app.stop()
    assert len(finished) == 8, "the running ones finished, nothing new started"
    # Committed per partition: up to the lowest offset not finished.
    for p in range(2):
        mark = 0
        while (p, mark) in finished_at:
            mark += 1
        assert broker.committed("wallet").get(TopicPartition("payments", p), 0) == mark


async def test_shutdown_timeout_cancels_stuck_handlers(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="x")
    app = make_app(broker, shutdown_timeout=2)
    cancelled: list[bool] = []

    @app.handler
    async def handle(msg: Message) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    async with trio.open_nursery() as n:
        await n.start(app.run)
        await trio.sleep(0.1)
        start = trio.current_time()
        app.stop()
    assert cancelled == [True]
    assert trio.current_time() - start == pytest.approx(2, abs=0.2)
    assert broker.committed("wallet").get(TopicPartition("payments", 0), 0) == 0


async def test_cancelling_run_is_clean_and_commits(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 100, keys=10)
    app = make_app(broker)

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.01)

    with trio.move_on_after(0.3):
        await app.run()
    assert 0 < sum(broker.committed("wallet").values()) <= 100
    assert broker.assignment("wallet") == {}, "left the group"
    # It can run again afterwards.
    await app.run(until_idle=True)
    assert broker.committed("wallet") == end_offsets(broker, "payments")


async def test_rebalance_between_two_apps_in_one_group(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=6, session_timeout=5)
    produce_many(broker, "payments", 3000, keys=60)
    overlap = OrderChecker()  # across both apps: is a key ever run twice at once?
    orders = {"a": OrderChecker(), "b": OrderChecker()}  # per app: in order?
    handled: set[tuple[int, int]] = set()

    def app_named(name: str) -> App:
        # A small capacity, so a is mid-backlog when b joins.
        app = make_app(broker, concurrency=16, capacity=100, fetch_max=50)

        @app.handler
        async def handle(msg: Message) -> None:
            overlap.start(msg)
            orders[name].start(msg)
            await trio.sleep(0.01)
            orders[name].end(msg)
            overlap.end(msg)
            handled.add((msg.partition, msg.offset))

        return app

    a, b = app_named("a"), app_named("b")
    async with trio.open_nursery() as n:
        await n.start(a.run)
        await trio.sleep(0.2)  # a is mid-stream when b joins
        await n.start(functools.partial(b.run, until_idle=True))
        await wait_until(lambda: sum(broker.committed("wallet").values()) >= 3000, 0.1)
        a.stop()
    assert overlap.overlaps == [], "a key ran on both members at once"
    for checker in orders.values():
        checker.assert_ordered()
    assert orders["a"].count > 0
    assert orders["b"].count > 0
    assert len(handled) == 3000
    # Handing over at the committed watermark redelivers at most what the
    # old owner had handled above it (a few per partition), never skips.
    assert overlap.count - 3000 < 600
    assert broker.committed("wallet") == end_offsets(broker, "payments")


async def test_rebalance_with_versions_puts_back_the_batch_read_ahead(
    thread_safe_clock: trio.abc.Clock,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ``versions=``, a worker pops the batches after the one it hands
    out and reads their versions in the background. A rebalance while such
    batches are out: its messages of revoked partitions go back (no key runs on
    both members, none is lost), and the revoke does not wait out
    shutdown_timeout for messages no worker runs."""
    broker = MemoryBroker(partitions=6, session_timeout=5)
    produce_many(broker, "payments", 3000, keys=60)
    overlap = OrderChecker()
    handled: set[tuple[int, int]] = set()

    def member() -> App:
        app = make_app(
            broker,
            concurrency=4,
            capacity=400,
            fetch_max=100,
            shutdown_timeout=30,
            versions=tmp_path / "v",
        )

        @app.handler
        async def handle(msg: Message) -> None:
            overlap.start(msg)
            await trio.sleep(0.002)
            overlap.end(msg)
            handled.add((msg.partition, msg.offset))

        return app

    a, b = member(), member()
    started = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(a.run)
        await trio.sleep(0.2)
        assert a._run is not None
        assert any(batch for batch, _ in a._run.ahead), "a batch is read ahead"
        await n.start(functools.partial(b.run, until_idle=True))
        await wait_until(lambda: sum(broker.committed("wallet").values()) >= 3000, 0.1)
        a.stop()
    assert "still running after shutdown_timeout" not in caplog.text
    assert trio.current_time() - started < 30
    assert overlap.overlaps == [], "a key ran on both members at once"
    assert len(handled) == 3000
    assert broker.committed("wallet") == end_offsets(broker, "payments")


class _FetchLog:
    """Wraps a broker's consumers to record each fetch: (time, records)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.fetches: list[tuple[float, int]] = []

    def consumer(self, group: str, topics: Any) -> Any:
        inner = self.broker.consumer(group, topics)
        log = self.fetches
        fetch = inner.fetch

        async def logged(max_records: int, max_wait: float) -> Any:
            got = await fetch(max_records, max_wait)
            log.append((trio.current_time(), sum(len(c) for _, c in got.chunks)))
            return got

        inner.fetch = logged  # type: ignore[method-assign]
        return inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.broker, name)


async def test_a_long_backlog_is_fetched_in_full_fetches(autojump_clock: trio.abc.Clock) -> None:
    """With more queued than workers need, the feeder waits for room for a
    full fetch instead of fetching the few records each completion frees
    (hundreds of small fetches cost a no-op App 15-20% of its time)."""
    broker = MemoryBroker(partitions=4)
    produce_many(broker, "payments", 20_000, keys=500)
    logged = _FetchLog(broker)
    app = make_app(logged, capacity=8000, fetch_max=2000, concurrency=16)  # type: ignore[arg-type]

    @app.handler
    async def handle(msg: Message) -> None:
        return None

    await app.run(until_idle=True)
    assert app.stats()["handled"] == 20_000
    sizes = [n for _, n in logged.fetches if n]
    assert sum(sizes) == 20_000
    # 10 full fetches would do; each completion batch (64) would give ~300.
    assert len(sizes) <= 20, sizes


async def test_the_feeder_still_fetches_while_it_waits_for_room(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Waiting for room for a full fetch is bounded: a broker that needs to
    be called to keep the member in its group is still called at least
    every 0.2 s while slow handlers free room a little at a time."""
    broker = MemoryBroker(partitions=4)
    produce_many(broker, "payments", 6000, keys=500)
    logged = _FetchLog(broker)
    app = make_app(logged, capacity=4000, fetch_max=1000, concurrency=4)  # type: ignore[arg-type]

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.01)

    with trio.move_on_after(5):
        await app.run()
    times = [t for t, _ in logged.fetches]
    assert times[-1] > 4, "the feeder kept fetching"
    assert max(b - a for a, b in itertools.pairwise(times)) <= 0.25


async def test_record_each_writes_of_different_keys_overlap(
    thread_safe_clock: trio.abc.Clock,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``record_versions="each"`` a worker waits for its message's
    write (an fsync) after a handler that never suspends: other workers take
    the ready messages of other keys meanwhile, rather than every write
    waiting for the one before it."""
    from keylane import _guard

    broker = MemoryBroker(partitions=2)
    for i in range(200):
        broker.produce("payments", key=f"k{i % 50}", value=b"x", headers={"version": str(i)})
    writing = [0, 0]  # now, most at once
    record = _guard.Guard.record

    async def counted(self: _guard.Guard, ticket: keylane.Ticket) -> None:
        writing[0] += 1
        writing[1] = max(writing)
        try:
            await record(self, ticket)
        finally:
            writing[0] -= 1

    monkeypatch.setattr(_guard.Guard, "record", counted)
    app = make_app(broker, concurrency=8, versions=tmp_path / "v", record_versions="each")

    @app.handler
    async def handle(msg: Message) -> None:
        return None

    with trio.fail_after(60):
        await app.run(until_idle=True)
    assert app.stats()["handled"] == 200
    assert writing[1] > 1, "the writes ran one at a time"


async def test_backpressure_keeps_memory_bounded(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=4)
    app = make_app(broker, capacity=200, concurrency=4, fetch_max=64)
    peak = [0]

    @app.handler
    async def slow(msg: Message) -> None:
        s = app.stats()
        peak[0] = max(peak[0], s["queued"] + s["in_flight"])
        await trio.sleep(0.01)

    async def producer() -> None:
        for i in range(3000):
            broker.produce("payments", key=f"k{i % 100}", value=b"x")
            if i % 100 == 0:
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        await n.start(app.run)
        n.start_soon(producer)
        await wait_until(lambda: sum(broker.committed("wallet").values()) >= 3000, 0.5)
        app.stop()
    assert 0 < peak[0] <= 200


async def test_versions_drop_stale_and_record_only_successes(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=1)
    for v in (5, 6, 5, 7, 3):  # the [5, 6, 5] redelivery, then a late old one
        broker.produce("payments", key="acct", value=str(v), headers={"version": str(v)})
    broker.produce("payments", key="acct", value="boom", headers={"version": "8"})
    broker.produce("payments", key="other", value="unversioned")
    app = make_app(broker, versions=tmp_path / "v", retry=RetryPolicy(max_attempts=1), dlq="dlq")
    handled: list[bytes] = []

    @app.handler
    async def handle(msg: Message) -> None:
        if msg.value == b"boom":
            raise RuntimeError("failed")
        handled.append(msg.value)

    await app.run(until_idle=True)
    assert [v for v in handled if v != b"unversioned"] == [b"5", b"6", b"7"]
    assert b"unversioned" in handled
    assert app.stats()["stale_dropped"] == 2
    with keylane.VersionTable(tmp_path / "v") as table:
        assert table.get(b"acct") == 7, "the failed version 8 was not recorded"


async def test_version_of_and_id_of_run_once_per_message(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    """The check before a handler and the record after it share one call of
    each: a user's ``version_of``/``id_of`` may be costly (parsing a body)."""
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 300, keys=30)
    calls: Counter[str] = Counter()

    def version_of(msg: Message) -> int:
        calls["version_of", msg.partition, msg.offset] += 1
        return msg.offset

    def id_of(msg: Message) -> bytes:
        calls["id_of", msg.partition, msg.offset] += 1
        return b"%d-%d" % (msg.partition, msg.offset)

    app = make_app(broker, versions=tmp_path / "v", version_of=version_of, dedupe=True, id_of=id_of)

    @app.handler
    async def handle(msg: Message) -> None:
        pass

    await app.run(until_idle=True)
    assert app.stats()["handled"] == 300
    assert len(calls) == 600, "every message's version and id were asked for"
    assert set(calls.values()) == {1}, calls.most_common(3)


async def test_versions_recorded_faster_than_commits_are_written_early(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past Guard's FLUSH_AT recorded versions the committer writes them at
    once (no dict grows to a resize that holds the loop), while offsets are
    still committed once per commit_interval."""
    from keylane import _guard

    monkeypatch.setattr(_guard, "FLUSH_AT", 40)
    writes: list[int] = []
    real_flush = _guard.Guard.flush

    async def counted(self: _guard.Guard) -> None:
        if self.core.recorded:
            writes.append(self.core.recorded)
        await real_flush(self)

    monkeypatch.setattr(_guard.Guard, "flush", counted)
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 2000, keys=1000)
    app = make_app(broker, versions=tmp_path / "v", commit_interval=3600.0)

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.001)

    await app.run(until_idle=True)
    assert app.stats()["handled"] == 2000
    assert len(writes) >= 10, writes
    assert max(writes) <= 400, f"recorded versions waited for a commit: {writes}"
    with keylane.VersionTable(tmp_path / "v") as table:
        assert len(table) == 1000
    assert broker.committed("wallet") == end_offsets(broker, "payments")


async def test_bad_version_header_is_dead_lettered_at_once(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="acct", value="x", headers={"version": "seven"})
    app = make_app(broker, versions=tmp_path / "v", dlq="dlq", retry=FAST_RETRY)
    calls: list[Message] = []

    @app.handler
    async def handle(msg: Message) -> None:
        calls.append(msg)

    await app.run(until_idle=True)
    assert calls == []
    (dead,) = broker.records("dlq", 0)
    record = msgpack.unpackb(dead.value)
    assert record["attempts"] == 1
    assert "not a decimal integer" in record["error"]


async def test_dedupe_skips_seen_ids(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=2)
    for i, mid in enumerate(["m1", "m2", "m1", "m3", "m2"]):
        broker.produce("payments", key=f"k{i}", value=mid, headers={"id": mid})
    broker.produce("payments", key="k9", value="no id")
    app = make_app(broker, versions=tmp_path / "v", dedupe=3600)
    handled: list[bytes] = []

    @app.handler
    async def handle(msg: Message) -> None:
        handled.append(msg.value)

    await app.run(until_idle=True)
    assert sorted(handled) == [b"m1", b"m2", b"m3", b"no id"]
    assert app.stats()["duplicates_skipped"] == 2


async def test_redelivered_and_duplicated_records_are_not_handled_twice(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=3, faults=keylane.Faults(redeliver=0.3, duplicate=0.3, seed=3))
    produce_many(broker, "payments", 600, keys=12)
    app = make_app(broker, fetch_max=50)
    calls: Counter[tuple[int, int]] = Counter()

    @app.handler
    async def handle(msg: Message) -> None:
        calls[(msg.partition, msg.offset)] += 1

    await app.run(until_idle=True)
    assert len(calls) == 600
    assert set(calls.values()) == {1}
    assert app.stats()["redelivered_dropped"] > 0


async def test_a_failing_handler_never_kills_the_app(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 100, keys=10)
    app = make_app(broker, retry=RetryPolicy(max_attempts=1), on_exhausted="skip")

    @app.handler
    async def handle(msg: Message) -> None:
        raise KeyError("every single time")

    await app.run(until_idle=True)
    assert app.stats()["skipped"] == 100


async def test_stats_and_prometheus_registry(autojump_clock: trio.abc.Clock) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 64, keys=4)
    app = make_app(broker, metrics=registry)

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.001)

    await app.run(until_idle=True)
    stats = app.stats()
    expected = {"consumed", "handled", "failed", "retried", "dead_lettered", "stale_dropped"}
    expected |= {"duplicates_skipped", "in_flight", "queued", "lag", "handler_latency"}
    assert expected | {"dispatch_latency"} <= set(stats)
    assert stats["handler_latency"]["count"] >= 1
    assert stats["dispatch_latency"]["count"] >= 1
    # The collector is detached once the run ends; attach a fresh one to read.
    sink = keylane.Prometheus(registry=registry)
    detach = sink.attach(app._metrics, "wallet")
    text = prometheus_client.generate_latest(registry).decode()
    detach()
    assert 'keylane_handled_total{group="wallet"} 64.0' in text
    assert "keylane_handler_latency_seconds_bucket" in text


# ---- bad configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topics": []}, "topics"),
        ({"topics": "payments"}, "topics"),
        ({"group": ""}, "group"),
        ({"ordering": "sometimes"}, "ordering"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"capacity": -1}, "capacity"),
        ({"retry": 3}, "retry"),
        ({"dlq": "payments"}, "loop back"),
        ({"on_exhausted": "ignore"}, "on_exhausted"),
        ({"shutdown_timeout": 0}, "shutdown_timeout"),
        ({"commit_interval": float("nan")}, "commit_interval"),
        ({"dedupe": True}, "dedupe needs versions"),
        ({"version_of": lambda m: 1}, "need versions"),
        ({"versions": 42}, "versions must be"),
        ({"metrics": "yes"}, "metrics must be"),
    ],
)
def test_bad_options_raise_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(keylane.ConfigError, match=match) as info:
        make_app(MemoryBroker(), **kwargs)
    assert isinstance(info.value, ValueError)


def test_a_versions_path_that_cannot_be_a_table_is_refused_at_construction(
    tmp_path: pathlib.Path,
) -> None:
    regular = tmp_path / "a-regular-file"
    regular.write_text("not a table")
    with pytest.raises(keylane.ConfigError, match="is a file"):
        make_app(MemoryBroker(), versions=regular)
    with pytest.raises(keylane.ConfigError, match="is a file, not a directory"):
        make_app(MemoryBroker(), versions=str(regular / "below"))
    with pytest.raises(keylane.ConfigError, match="empty string"):
        make_app(MemoryBroker(), versions="")
    make_app(MemoryBroker(), versions=tmp_path / "new" / "table")  # made on first use


def test_capacity_below_concurrency_is_explained() -> None:
    with pytest.warns(UserWarning, match="so at most that many handlers run at once"):
        make_app(MemoryBroker(), capacity=10, concurrency=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_app(MemoryBroker(), capacity=64, concurrency=64)


def test_retry_policy_validation() -> None:
    with pytest.raises(keylane.ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(keylane.ConfigError, match="backoff_factor"):
        RetryPolicy(backoff_factor=0.5)
    with pytest.raises(keylane.ConfigError, match="jitter"):
        RetryPolicy(jitter=2)
    with pytest.raises(keylane.ConfigError, match="backoff_base"):
        RetryPolicy(backoff_base=float("inf"))
    p = RetryPolicy(backoff_base=0.1, backoff_factor=2, backoff_max=1, jitter=0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5, 10_000)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = RetryPolicy(backoff_base=1, jitter=0.5, backoff_max=10)
    delays = {jittered.delay(1, random.Random(s)) for s in range(50)}
    assert all(0.5 <= d <= 1.5 for d in delays)
    assert len(delays) > 10
    assert not p.exhausted(4)
    assert p.exhausted(5)


def test_handler_must_be_async_and_single() -> None:
    app = make_app(MemoryBroker())

    def sync_handler(msg: Message) -> None: ...

    with pytest.raises(keylane.InvalidType, match="async function"):
        app.handler(sync_handler)  # type: ignore[arg-type]

    class Callable:
        async def __call__(self, msg: Message) -> None: ...

    app.handler(Callable())
    with pytest.raises(keylane.ConfigError, match="already has a handler"):

        @app.handler
        async def second(msg: Message) -> None: ...


async def test_run_needs_a_handler_and_runs_once(autojump_clock: trio.abc.Clock) -> None:
    app = make_app(MemoryBroker())
    with pytest.raises(keylane.ConfigError, match="no handler"):
        await app.run()

    @app.handler
    async def handle(msg: Message) -> None: ...

    async with trio.open_nursery() as n:
        await n.start(app.run)
        with pytest.raises(keylane.ConfigError, match="already running"):
            await app.run()
        app.stop()


async def test_prometheus_http_endpoint(thread_safe_clock: trio.abc.Clock) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = MemoryBroker(partitions=1)
    produce_many(broker, "payments", 10, keys=2)
    prometheus = keylane.Prometheus(port=port)
    assert prometheus.addr == "127.0.0.1", "loopback unless asked to listen wider"
    app = make_app(broker, metrics=prometheus)
    scraped: list[str] = []

    @app.handler
    async def handle(msg: Message) -> None:
        if not scraped:
            url = f"http://127.0.0.1:{port}/metrics"
            body = await trio.to_thread.run_sync(
                lambda: urllib.request.urlopen(url, timeout=10).read()
            )
            scraped.append(body.decode())

    await app.run(until_idle=True)
    assert 'keylane_consumed_total{group="wallet"} 10.0' in scraped[0]
    assert 'keylane_lag{group="wallet",partition="0",topic="payments"}' in scraped[0]
    # The server stopped with the run: nothing listens on the port any more.
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_handlers_that_start_to_suspend_get_every_worker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While handlers return without suspending one worker runs them (more
    would only hold the loop longer); the first that suspends wakes a worker
    for every ready message, so the concurrency is all there again."""
    broker = MemoryBroker(partitions=4)
    produce_many(broker, "payments", 2000, keys=500)
    app = make_app(broker, concurrency=64)
    running, peak, calls = [0], [0], [0]

    @app.handler
    async def handle(msg: Message) -> None:
        calls[0] += 1
        if calls[0] <= 1000:
            return  # never suspends
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            await trio.sleep(1)
        finally:
            running[0] -= 1

    start = trio.current_time()
    await app.run(until_idle=True)
    assert app.stats()["handled"] == 2000
    assert peak[0] == 64
    # 1000 one-second handlers over 64 workers: about 16 s, not 1000 s.
    assert trio.current_time() - start < 40


async def test_a_handler_failing_after_it_suspended_is_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="x")
    app = make_app(broker, retry=FAST_RETRY)
    attempts: list[int] = []

    @app.handler
    async def handle(msg: Message) -> None:
        await trio.sleep(0.01)
        attempts.append(msg.attempt)
        if msg.attempt < 2:
            raise ValueError("not yet")

    await app.run(until_idle=True)
    assert attempts == [0, 1, 2]
    assert app.stats()["handled"] == 1


def test_unordered_with_versions_warns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = keylane.MemoryBroker(partitions=2)
    with pytest.warns(keylane.UnorderedVersionsWarning, match="last writer wins"):
        keylane.App(broker, topics=["t"], group="g", ordering="none", versions=tmp_path / "v")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keylane.App(broker, topics=["t"], group="g", ordering="key", versions=tmp_path / "v")


async def test_a_partial_of_an_async_function_is_a_handler(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=2)
    produce_many(broker, "payments", 20, keys=4)
    seen: list[tuple[str, int]] = []

    async def handle(tag: str, msg: Message) -> None:
        seen.append((tag, msg.offset))

    app = make_app(broker)
    app.handler(functools.partial(handle, "wallet"))
    await app.run(until_idle=True)
    assert len(seen) == 20
    assert {tag for tag, _ in seen} == {"wallet"}
    with pytest.raises(keylane.InvalidType, match="async function"):
        make_app(broker).handler(functools.partial(print, "sync"))  # type: ignore[arg-type]
