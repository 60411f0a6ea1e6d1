"""Where a benchmark runs: a broker that gives each run a fresh topic, and a
wrapper that stamps when each record was fetched (for dispatch latency).

A run never shares a topic with another: on the memory broker each gets a
new broker (so nothing earlier stays in memory), on Kafka a new topic.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence

from keylane.brokers.base import Acknowledging, Broker, Consumer, Fetch, TopicPartition
from keylane.brokers.memory import MemoryBroker
from keylane.errors import ConfigError
from keylane.message import HeaderValue, KeyLike, ValueLike


@dataclasses.dataclass(frozen=True)
class Target:
    """``fresh(partitions)`` gives a broker and an empty topic on it;
    ``flush(broker)`` waits until what was produced is stored."""

    name: str
    fresh: Callable[[int], tuple[Broker, str]]
    flush: Callable[[Broker], None]


def memory() -> Target:
    def fresh(partitions: int) -> tuple[Broker, str]:
        broker = MemoryBroker(partitions=partitions)
        broker.create_topic("bench", partitions)
        return broker, "bench"

    return Target("memory", fresh, lambda broker: None)


def kafka(bootstrap: str) -> Target:
    from keylane.brokers.kafka import KafkaBroker

    broker = KafkaBroker(bootstrap)

    def fresh(partitions: int) -> tuple[Broker, str]:
        topic = f"bench-{uuid.uuid4().hex[:12]}"
        broker.create_topic(topic, partitions)
        return broker, topic

    def flush(b: Broker) -> None:
        broker.flush_sync()

    return Target(f"kafka://{bootstrap}", fresh, flush)


def sqs_fifo(endpoint: str) -> Target:
    """Each run a new FIFO queue (SQS queues have no partitions: one)."""
    from keylane.brokers.sqs_fifo import SqsFifoBroker

    broker = SqsFifoBroker(endpoint)

    def fresh(partitions: int) -> tuple[Broker, str]:
        queue = f"bench-{uuid.uuid4().hex[:12]}.fifo"
        broker.create_topic(queue)
        return broker, queue

    def flush(b: Broker) -> None:
        broker.flush_sync(timeout=600)

    return Target(f"sqs://{endpoint.split('://', 1)[1]}", fresh, flush)


def redis_streams(url: str) -> Target:
    from keylane.brokers.redis_streams import RedisStreamsBroker

    broker = RedisStreamsBroker(url)

    def fresh(partitions: int) -> tuple[Broker, str]:
        topic = f"bench-{uuid.uuid4().hex[:12]}"
        broker.create_topic(topic, partitions)
        return broker, topic

    def flush(b: Broker) -> None:
        broker.flush_sync()

    return Target(url, fresh, flush)


def parse(url: str) -> Target:
    """``memory``, ``kafka://HOST:PORT``, ``sqs://HOST:PORT`` or ``redis://HOST:PORT[/DB]``."""
    if url == "memory":
        return memory()
    if url.startswith("kafka://"):
        from keylane.bench.kafka import parse_url

        return kafka(parse_url(url))
    if url.startswith("sqs://"):
        from keylane.bench import sqs_fifo as sqs

        return sqs_fifo(sqs.parse_url(url))
    if url.startswith("redis://"):
        from keylane.bench import redis_streams as rs

        return redis_streams(rs.parse_url(url))
    raise ConfigError(
        "broker must be memory, kafka://HOST:PORT, sqs://HOST:PORT or redis://HOST:PORT "
        f"(e.g. kafka://127.0.0.1:9092), got {url!r}"
    )


class Stamped:
    """A broker whose consumers record, per (partition, offset), when the
    record was fetched: one dict store per record, on the Trio thread."""

    def __init__(self, inner: Broker, stamps: dict[tuple[int, int], float]) -> None:
        self._inner = inner
        self._stamps = stamps

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        inner = self._inner.consumer(group, topics)
        if isinstance(inner, Acknowledging):
            # Kept acknowledging (SQS): without acks a group would wait for
            # the watermark's commit before SQS hands out its next message.
            return _StampedAckingConsumer(inner, self._stamps)
        return _StampedConsumer(inner, self._stamps)

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
    ) -> object:
        return self._inner.produce(topic, key, value, headers, partition=partition)

    async def flush(self) -> None:
        await self._inner.flush()


class _StampedConsumer:
    def __init__(self, inner: Consumer, stamps: dict[tuple[int, int], float]) -> None:
        self._inner = inner
        self._stamps = stamps

    @property
    def group(self) -> str:
        return self._inner.group

    @property
    def member_id(self) -> str:
        return self._inner.member_id

    def assignment(self) -> frozenset[TopicPartition]:
        return self._inner.assignment()

    async def join(self) -> None:
        await self._inner.join()

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        fetch = await self._inner.fetch(max_records, max_wait)
        if fetch.chunks:
            now = time.perf_counter()
            stamps = self._stamps
            for tp, records in fetch.chunks:
                p = tp.partition
                for msg in records:
                    stamps[p, msg.offset] = now
        return fetch

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        await self._inner.commit(offsets, metadata)

    async def heartbeat(self) -> None:
        await self._inner.heartbeat()

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        await self._inner.release(partitions)

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        self._inner.set_paused(partitions)

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return await self._inner.committed_offsets(partitions)

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        return await self._inner.committed_metadata(partitions)

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        return await self._inner.offsets_for_times(times)

    async def close(self) -> None:
        await self._inner.close()


class _StampedAckingConsumer(_StampedConsumer):
    async def ack(self, done: Mapping[TopicPartition, Collection[int]]) -> None:
        inner = self._inner
        assert isinstance(inner, Acknowledging)
        await inner.ack(done)
