"""Fixtures of the broker contract suite: one harness per adapter."""

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

    consumers: list[Consumer] = dataclasses.field(default_factory=list)

    def consumer(self, group: str, topics: list[str], *, new_client: bool = False) -> Consumer:
        """A group member, closed when the test ends (a Kafka consumer that
        is never closed hangs the process when the GC reaches it)."""
        broker = self.new_broker() if new_client else self.broker
        c = broker.consumer(group, topics)
        self.consumers.append(c)
        return c

    def topic(self, partitions: int) -> str:
        name = kafka_server.unique("contract")
        self.create_topic(name, partitions)
        return name

    def new_broker(self) -> Broker:
        """Another client of the same cluster (a second process would have one)."""
        if self.name == "kafka":
            assert isinstance(self.broker, keylane.KafkaBroker)
            return keylane.KafkaBroker(self.broker.bootstrap_servers, config=KAFKA_CONFIG)
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


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        h = memory_harness()
    else:
        bootstrap: Any = request.getfixturevalue("kafka_bootstrap")
        h = kafka_harness(bootstrap)
    yield h
    with trio.move_on_after(30):
        for c in h.consumers:
            with contextlib.suppress(keylane.KeylaneError):
                await c.close()
