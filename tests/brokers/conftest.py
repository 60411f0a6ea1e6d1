"""Fixtures of the broker contract suite: one harness per adapter.

``harness`` runs a test on every adapter; ``partitioned`` only on those
whose topics have partitions (SQS FIFO queues have none: no placement by
hash, no rebalances, no offsets to look up, so those tests are not made for
it rather than skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

import keylane
from keylane.brokers import Broker, Consumer, TopicPartition
from tests import kafka_server

# Short sessions so a killed member is noticed within seconds.
KAFKA_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
# A message a consumer gave up comes back after this long.
SQS_CONFIG = {"visibility_timeout": 6}
# A member that died is presumed dead after this long.
REDIS_CONFIG = {"lease_ms": 3000}


@dataclasses.dataclass
class Harness:
    """What the contract tests need of an adapter besides the protocol."""

    name: str
    broker: Broker
    create_topic: Callable[[str, int], None]
    end_offsets: Callable[[str], list[int]]
    committed: Callable[[str], dict[TopicPartition, int]]
    add_partitions: Callable[[str, int], None]
    flush: Callable[[], None]
    # A member killed without leaving is noticed after about this long.
    session_timeout: float
    # How long a join and first assignment may take.
    join_bound: float
    # Topics have partitions (with offsets, rebalances, lookups).
    partitioned: bool = True
    # Whether everything produced to the topic is handled and committed
    # (given the group and the topic's produced count).
    drained: Callable[[str, str], bool] | None = None

    consumers: list[Consumer] = dataclasses.field(default_factory=list)

    def consumer(self, group: str, topics: list[str], *, new_client: bool = False) -> Consumer:
        """A group member, closed when the test ends (a Kafka consumer that
        is never closed hangs the process when the GC reaches it)."""
        broker = self.new_broker() if new_client else self.broker
        c = broker.consumer(group, topics)
        self.consumers.append(c)
        return c

    def topic(self, partitions: int) -> str:
        """A new topic of ``partitions`` partitions (one where topics have none)."""
        name = kafka_server.unique("contract")
        if not self.partitioned:
            name += ".fifo"
            partitions = 1
        self.create_topic(name, partitions)
        return name

    def new_broker(self) -> Broker:
        """Another client of the same cluster (a second process would have one)."""
        if self.name == "kafka":
            assert isinstance(self.broker, keylane.KafkaBroker)
            return keylane.KafkaBroker(self.broker.bootstrap_servers, config=KAFKA_CONFIG)
        if self.name == "sqs":
            assert isinstance(self.broker, keylane.SqsFifoBroker)
            return keylane.SqsFifoBroker(self.broker.endpoint_url, config=SQS_CONFIG)
        if self.name == "redis":
            assert isinstance(self.broker, keylane.RedisStreamsBroker)
            return keylane.RedisStreamsBroker(self.broker.url, config=REDIS_CONFIG)
        return self.broker


def memory_harness() -> Harness:
    b = keylane.MemoryBroker(partitions=1, session_timeout=2.0)
    return Harness(
        name="memory",
        broker=b,
        create_topic=b.create_topic,
        end_offsets=b.end_offsets,
        committed=b.committed,
        add_partitions=b.add_partitions,
        flush=lambda: None,
        session_timeout=2.0,
        join_bound=5.0,
    )


def kafka_harness(bootstrap: str) -> Harness:
    b = keylane.KafkaBroker(bootstrap, config=KAFKA_CONFIG)
    return Harness(
        name="kafka",
        broker=b,
        create_topic=b.create_topic,
        end_offsets=b.end_offsets,
        committed=b.committed,
        add_partitions=b.add_partitions,
        flush=b.flush_sync,
        session_timeout=6.0,
        join_bound=30.0,
    )


def sqs_harness(endpoint: str) -> Harness:
    b = keylane.SqsFifoBroker(endpoint, config=SQS_CONFIG)

    def nothing_left(group: str, topic: str) -> bool:
        return b.counts(topic) == (0, 0)

    def no_partitions(*args: object) -> Any:
        raise AssertionError("SQS FIFO queues have no partitions or offsets")

    return Harness(
        name="sqs",
        broker=b,
        create_topic=b.create_topic,
        end_offsets=no_partitions,
        committed=no_partitions,
        add_partitions=no_partitions,
        flush=b.flush_sync,
        session_timeout=float(SQS_CONFIG["visibility_timeout"]),
        join_bound=20.0,
        partitioned=False,
        drained=nothing_left,
    )


def redis_harness(url: str) -> Harness:
    b = keylane.RedisStreamsBroker(url, config=REDIS_CONFIG)
    return Harness(
        name="redis",
        broker=b,
        create_topic=b.create_topic,
        end_offsets=b.end_offsets,
        committed=b.committed,
        add_partitions=b.add_partitions,
        flush=b.flush_sync,
        session_timeout=REDIS_CONFIG["lease_ms"] / 1000,
        join_bound=20.0,
    )


def _make(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return memory_harness()
    if request.param == "kafka":
        return kafka_harness(request.getfixturevalue("kafka_bootstrap"))
    if request.param == "redis":
        return redis_harness(request.getfixturevalue("redis_url"))
    assert request.param == "sqs"
    return sqs_harness(request.getfixturevalue("sqs_endpoint"))


async def _closing(h: Harness) -> AsyncIterator[Harness]:
    yield h
    with trio.move_on_after(30):
        for c in h.consumers:
            with contextlib.suppress(keylane.KeylaneError):
                await c.close()


_PARTITIONED = [
    "memory",
    pytest.param("kafka", marks=pytest.mark.kafka),
    pytest.param("redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=[*_PARTITIONED, pytest.param("sqs", marks=pytest.mark.sqs)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Every adapter."""
    async for h in _closing(_make(request)):
        yield h


@pytest.fixture(params=_PARTITIONED)
async def partitioned(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Adapters whose topics have partitions."""
    async for h in _closing(_make(request)):
        yield h
