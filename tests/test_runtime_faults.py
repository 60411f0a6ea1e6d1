"""The runtime against a broker that fails, stalls or refuses: bounded calls,
retries with backoff, nothing lost, nothing committed past an unhandled
message, fatal errors end the run with the error itself."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

import keylane
from keylane.brokers.memory import MemoryConsumer
from tests.conftest import OrderChecker, end_offsets, produce_many

T = "orders"


def app_with_checker(
    broker: keylane.MemoryBroker, **options: object
) -> tuple[keylane.App, OrderChecker]:
    app = keylane.App(broker, topics=[T], group="g", commit_interval=0.05, **options)  # type: ignore[arg-type]
    check = OrderChecker()

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        check.start(msg)
        await trio.sleep(0.001)
        check.end(msg)

    return app, check


async def test_fetch_and_commit_errors_are_retried_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    faults = keylane.Faults(fetch_error=0.3, commit_error=0.3, seed=3)
    broker = keylane.MemoryBroker(partitions=4, faults=faults)
    produce_many(broker, T, 2000, keys=50)
    app, check = app_with_checker(broker, concurrency=32)
    with trio.fail_after(600):
        await app.run(until_idle=True, handle_signals=False)
    check.assert_ordered()
    assert check.count == 2000
    assert broker.committed("g") == end_offsets(broker, T)
    # At least one fetch and one commit were refused and retried (how many
    # depends on how many calls the run made: its slicing is real time).
    assert app.stats()["broker_retries"] >= 2
    assert "fetch failed (faults: injected fetch error)" in caplog.text
    assert "commit failed (faults: injected commit error)" in caplog.text


async def test_stalled_calls_time_out_and_are_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    faults = keylane.Faults(stall=0.2, stall_seconds=3600, seed=5)
    broker = keylane.MemoryBroker(partitions=4, faults=faults, session_timeout=1e6)
    produce_many(broker, T, 1000, keys=20)
    app, check = app_with_checker(broker, concurrency=16, broker_timeout=2, fetch_max=50)
    with trio.fail_after(3000):
        await app.run(until_idle=True, handle_signals=False)
    check.assert_ordered()
    assert check.count == 1000
    assert broker.committed("g") == end_offsets(broker, T)
    assert app.stats()["broker_retries"] > 0
    assert "did not finish within 2.0s" in caplog.text


async def test_a_full_app_keeps_its_membership(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A short session and slow handlers behind a tiny capacity: the feeder
    # must keep talking to the broker while it waits for room.
    broker = keylane.MemoryBroker(partitions=2, session_timeout=0.5)
    produce_many(broker, T, 40, keys=40)
    app = keylane.App(broker, topics=[T], group="g", capacity=2, concurrency=2, commit_interval=30)
    seen: list[int] = []

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        await trio.sleep(2)
        seen.append(int(msg.headers["version"]))

    with trio.fail_after(600):
        await app.run(until_idle=True, handle_signals=False)
    assert sorted(seen) == list(range(40))
    assert "session timeout" not in caplog.text
    assert broker.committed("g") == end_offsets(broker, T)


class _FailingConsumer(MemoryConsumer):
    def __init__(self, inner: MemoryConsumer, error: keylane.BrokerError, on: str) -> None:
        super().__init__(inner._broker, inner.group, inner._topics)
        self.error, self.on = error, on

    async def join(self) -> None:
        if self.on == "join":
            raise self.error
        await super().join()

    async def fetch(self, max_records: int, max_wait: float) -> keylane.brokers.Fetch:
        if self.on == "fetch":
            raise self.error
        return await super().fetch(max_records, max_wait)


class _FailingBroker(keylane.MemoryBroker):
    def __init__(self, error: keylane.BrokerError, on: str) -> None:
        super().__init__(partitions=2)
        self.error, self.on = error, on

    def consumer(self, group: str, topics: Sequence[str]) -> MemoryConsumer:
        return _FailingConsumer(super().consumer(group, topics), self.error, self.on)


async def test_a_fatal_fetch_error_ends_run_with_that_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = _FailingBroker(keylane.BrokerError("auth failed", code="SASL"), on="fetch")
    app, _ = app_with_checker(broker)
    with pytest.raises(keylane.BrokerError, match="auth failed") as raised:
        await app.run(handle_signals=False)
    assert raised.value.code == "SASL"
    assert not raised.value.retriable


async def test_a_join_that_keeps_failing_gives_up_after_broker_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _FailingBroker(keylane.BrokerError("refused", retriable=True), on="join")
    app, _ = app_with_checker(broker, broker_timeout=5)
    caplog.set_level(logging.WARNING, logger="keylane")
    start = trio.current_time()
    with pytest.raises(keylane.BrokerError, match="refused"):
        await app.run(handle_signals=False)
    assert 5 <= trio.current_time() - start < 12
    assert "join failed" in caplog.text


def test_broker_timeout_is_validated() -> None:
    with pytest.raises(keylane.ConfigError, match="broker_timeout"):
        keylane.App(keylane.MemoryBroker(), topics=[T], group="g", broker_timeout=0)


def test_new_faults_are_validated() -> None:
    with pytest.raises(keylane.ConfigError, match="fetch_error"):
        keylane.Faults(fetch_error=2)
    with pytest.raises(keylane.ConfigError, match="stall_seconds"):
        keylane.Faults(stall_seconds=-1)
