"""Embedding an App in programs that are not Trio: ``start_in_thread`` and
``on_asyncio_loop``, driven from a real asyncio program. Every wait is
bounded."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import pytest
import trio

import keylane
from keylane import MemoryBroker, Message, RetryPolicy
from keylane.brokers import TopicPartition

from .conftest import end_offsets


def asyncio_service(broker: MemoryBroker, n_before: int, n_after: int) -> dict[str, object]:
    """An asyncio program: its own state and tasks, the App in a thread,
    handlers that run on the program's loop."""

    async def main() -> dict[str, object]:
        applied: dict[bytes, list[int]] = collections.defaultdict(list)
        running: collections.Counter[bytes] = collections.Counter()
        overlaps = 0
        loop_threads: set[int] = set()
        ticks = 0
        all_applied = asyncio.Event()

        async def handle(msg: Message) -> None:
            nonlocal overlaps
            assert msg.key is not None
            loop_threads.add(threading.get_ident())
            if running[msg.key]:
                overlaps += 1
            running[msg.key] += 1
            await asyncio.sleep(0.001)  # the service's own asyncio I/O
            applied[msg.key].append(int(msg.value))
            running[msg.key] -= 1
            if sum(map(len, applied.values())) == n_before + n_after:
                all_applied.set()

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        app = keylane.App(broker, topics=["jobs"], group="svc", concurrency=32)
        app.handler(keylane.on_asyncio_loop(handle))
        beat = asyncio.create_task(heartbeat())
        thread = await asyncio.to_thread(app.start_in_thread)
        try:
            for i in range(n_before, n_before + n_after):
                await asyncio.to_thread(thread.call, broker.produce, "jobs", f"k{i % 20}", str(i))
            await asyncio.wait_for(all_applied.wait(), 60)
        finally:
            thread.stop()
            await asyncio.wait_for(thread.wait(), 60)
            beat.cancel()
        return {
            "applied": applied,
            "overlaps": overlaps,
            "threads": loop_threads,
            "main": threading.get_ident(),
            "ticks": ticks,
            "stats": thread.stats(),
            "running": thread.running,
        }

    return asyncio.run(main())


def test_an_asyncio_service_runs_an_app_in_a_thread_with_asyncio_handlers() -> None:
    broker = MemoryBroker(partitions=4)
    for i in range(300):
        broker.produce("jobs", key=f"k{i % 20}", value=str(i))
    out = asyncio_service(broker, 300, 200)
    applied = out["applied"]
    assert isinstance(applied, dict)
    assert sum(map(len, applied.values())) == 500
    for key, values in applied.items():
        assert values == sorted(values), f"{key!r} applied out of order"
    assert out["overlaps"] == 0
    # Handlers ran on the service's loop thread, not the App's.
    assert out["threads"] == {out["main"]}
    assert isinstance(out["ticks"], int)
    assert out["ticks"] > 0  # the loop kept running its own tasks
    assert out["running"] is False
    assert broker.committed("svc") == end_offsets(broker, "jobs")
    stats = out["stats"]
    assert isinstance(stats, dict)
    assert stats["handled"] == 500


def test_an_asyncio_handler_failure_is_the_handlers_failure(tmp_path: object) -> None:
    broker = MemoryBroker(partitions=1)
    for i in range(10):
        broker.produce("jobs", key="k", value=str(i))

    async def main() -> keylane.AppThread:
        async def handle(msg: Message) -> None:
            if msg.value == b"3":
                raise ValueError("three")

        app = keylane.App(
            broker, topics=["jobs"], group="g", dlq="jobs.dlq",
            retry=RetryPolicy(max_attempts=2, backoff_base=0.01),
        )  # fmt: skip
        app.handler(keylane.on_asyncio_loop(handle))
        thread = app.start_in_thread(until_idle=True)
        await asyncio.wait_for(thread.wait(), 60)
        return thread

    thread = asyncio.run(main())
    stats = thread.stats()
    assert (stats["handled"], stats["failed"], stats["dead_lettered"]) == (9, 2, 1)
    assert broker.committed("g") == {TopicPartition("jobs", 0): 10}


def test_start_in_thread_from_plain_threaded_code() -> None:
    broker = MemoryBroker(partitions=2)
    for i in range(50):
        broker.produce("jobs", key=f"k{i % 5}", value=str(i))
    app = keylane.App(broker, topics=["jobs"], group="g")
    seen: list[bytes] = []

    @app.handler
    async def handle(msg: Message) -> None:
        seen.append(msg.value)

    thread = app.start_in_thread(until_idle=True)
    thread.join(60)
    assert len(seen) == 50
    assert not thread.running
    thread.stop()  # harmless once over


def test_embedding_errors() -> None:
    broker = MemoryBroker()
    app = keylane.App(broker, topics=["jobs"], group="g")
    with pytest.raises(keylane.ConfigError, match="no handler"):
        app.start_in_thread()

    def not_async(msg: Message) -> None: ...

    with pytest.raises(keylane.InvalidType, match="async def"):
        keylane.on_asyncio_loop(not_async)  # type: ignore[arg-type]

    async def handle(msg: Message) -> None: ...

    with pytest.raises(keylane.ConfigError, match="loop="):
        keylane.on_asyncio_loop(handle)


def test_an_app_that_cannot_start_raises_in_the_caller() -> None:
    class Refusing(MemoryBroker):
        def consumer(self, group: str, topics: object) -> object:  # type: ignore[override]
            raise keylane.BrokerError("cannot reach the cluster")

    app = keylane.App(Refusing(), topics=["jobs"], group="g")

    @app.handler
    async def handle(msg: Message) -> None: ...

    with pytest.raises(keylane.BrokerError, match="cannot reach"):
        app.start_in_thread(timeout=30)


def test_an_app_that_does_not_start_in_time_is_stopped_not_left_starting() -> None:
    joining = threading.Event()

    class Hanging(MemoryBroker):
        def consumer(self, group: str, topics: object) -> object:  # type: ignore[override]
            inner = super().consumer(group, topics)  # type: ignore[arg-type]

            class Slow:
                def __getattr__(self, name: str) -> object:
                    return getattr(inner, name)

                async def join(self) -> None:
                    joining.set()
                    await trio.sleep_forever()

            return Slow()

    app = keylane.App(Hanging(), topics=["jobs"], group="g", broker_timeout=60)

    @app.handler
    async def handle(msg: Message) -> None: ...

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not start consuming"):
        app.start_in_thread(timeout=0.5)
    assert joining.is_set()
    # The start was cancelled: the App's thread ends soon, without consuming.
    threads = [t for t in threading.enumerate() if t.name == "keylane g"]
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - started < 20
