"""Shared test helpers."""

from __future__ import annotations

import collections
import itertools
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import trio.testing

import keylane
from keylane.brokers import TopicPartition
from tests import kafka_server
from tests.servers import Server

SQS = Server("elasticmq.sh", "ElasticMQ, the SQS FIFO server for the real-broker tests")
REDIS = Server("redis.sh", "redis-server for the Redis Streams tests")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The address of the real broker (started if scripts/test did not)."""
    address, started = kafka_server.start()
    yield address
    if started:
        kafka_server.stop()


@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    """The endpoint URL of the ElasticMQ server (started if scripts/test did not)."""
    address, started = SQS.start()
    yield address
    if started:
        SQS.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of the redis-server (started if scripts/test did not)."""
    address, started = REDIS.start()
    yield address
    if started:
        REDIS.stop()


# Retries quick enough for tests on a virtual clock.
FAST_RETRY = keylane.RetryPolicy(
    max_attempts=3, backoff_base=0.01, backoff_factor=2, backoff_max=0.05, jitter=0
)


def make_app(broker: keylane.MemoryBroker, **kw: Any) -> keylane.App:
    """An App on ``payments`` as group ``wallet``, committing every 50 ms."""
    kw.setdefault("topics", ["payments"])
    kw.setdefault("group", "wallet")
    kw.setdefault("commit_interval", 0.05)
    return keylane.App(broker, **kw)


def produce_many(
    broker: keylane.MemoryBroker, topic: str, n: int, keys: int, *, start: int = 0
) -> list[keylane.Message]:
    """``n`` records over ``keys`` keys, with a ``version`` header that grows
    per key (so a per-key order check can use it)."""
    return [
        broker.produce(topic, key=f"k{i % keys}", value=str(i), headers={"version": str(i)})
        for i in range(start, start + n)
    ]


def end_offsets(broker: keylane.MemoryBroker, topic: str) -> dict[TopicPartition, int]:
    return {TopicPartition(topic, p): n for p, n in enumerate(broker.end_offsets(topic)) if n}


class OrderChecker:
    """Records handler starts and ends, independently of keylane: checks that
    no key runs twice at once and that each key's versions only increase
    (unless a redelivery is allowed to repeat them)."""

    def __init__(self) -> None:
        self.running: set[bytes | None] = set()
        self.versions: dict[bytes | None, list[int]] = collections.defaultdict(list)
        self.overlaps: list[bytes | None] = []
        self.count = 0

    def start(self, msg: keylane.Message) -> None:
        if msg.key in self.running:
            self.overlaps.append(msg.key)
        self.running.add(msg.key)

    def end(self, msg: keylane.Message) -> None:
        self.running.discard(msg.key)
        self.versions[msg.key].append(int(msg.headers["version"]))
        self.count += 1

    def assert_ordered(self, *, strictly: bool = True) -> None:
        assert self.overlaps == [], f"keys ran concurrently: {self.overlaps[:5]}"
        for key, seen in self.versions.items():
            pairs: Iterable[tuple[int, int]] = itertools.pairwise(seen)
            bad = [(a, b) for a, b in pairs if (b <= a if strictly else b < a)]
            assert not bad, f"key {key!r} went back: {bad[:5]}"

    def assert_ordered_with_replays(self, max_replays: int) -> None:
        """Per-key order under at-least-once: a key's versions increase,
        except where a redelivery (after a rebalance or a restart) replays
        from the partition's last commit — then they increase again. At most
        ``max_replays`` replays per key, and no key ran twice at once."""
        assert self.overlaps == [], f"keys ran concurrently: {self.overlaps[:5]}"
        for key, seen in self.versions.items():
            replays = [(a, b) for a, b in itertools.pairwise(seen) if b <= a]
            assert len(replays) <= max_replays, f"key {key!r} went back: {replays[:5]}"


@pytest.fixture
def thread_safe_clock() -> trio.testing.MockClock:
    """A virtual clock for tests whose App flushes versions in a worker
    thread: it jumps only after 20 ms of real idleness, so time does not leap
    ahead while a thread works (the plain autojump clock would fire every
    timeout then)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def wait_until(
    condition: Callable[[], bool], step: float = 0.01, bound: float = 60.0
) -> None:
    """Polls ``condition`` every ``step`` seconds (of the test's clock);
    fails after ``bound`` seconds of it."""
    deadline = trio.current_time() + bound
    while not condition():
        if trio.current_time() >= deadline:
            raise AssertionError(f"condition not met within {bound}s")
        await trio.sleep(step)


def run_isolated(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter, for what might crash the
    process. Dying by a signal (SIGABRT, SIGBUS, SIGSEGV: -6, -7, -11) fails
    the test; so does running past ``timeout`` (a deadlock)."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise AssertionError(f"the process died with {name}:\n{result.stderr[-3000:]}")
    return result
