"""Questions a Kafka consumer asks about partitions it may not own, for the
runtime's repartition defence: the group's committed offsets, the offset
for a time, and how many partitions a topic has.

The offset questions go through a plain consumer of the same ``group.id``
that never subscribes (so it never joins the group): the member's own
client stays with its consume hops, and these are one thread hop each."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import confluent_kafka

from keylane.brokers._kafka_common import from_exception
from keylane.brokers.base import TopicPartition

if TYPE_CHECKING:
    from keylane.brokers.kafka import KafkaBroker

_KTP = confluent_kafka.TopicPartition
_COORDINATOR_MOVING = (
    confluent_kafka.KafkaError.NOT_COORDINATOR,
    confluent_kafka.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE,
)


def partition_counts(
    c: confluent_kafka.Consumer, topics: Iterable[str], timeout: float
) -> dict[str, int]:
    """Partition count per topic (topics the cluster does not know are left out)."""
    counts = {}
    for topic in topics:
        meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            counts[topic] = len(meta.partitions)
    return counts


class Lookup:
    def __init__(self, broker: KafkaBroker, config: Mapping[str, Any]) -> None:
        self._broker = broker
        self._config = {k: v for k, v in config.items() if not k.endswith("_cb")}
        self._lock = threading.Lock()
        self._c: confluent_kafka.Consumer | None = None

    def _client(self) -> confluent_kafka.Consumer:
        if self._c is None:
            self._c = confluent_kafka.Consumer(self._config)
        return self._c

    async def committed(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        return await self._broker._in_thread(self._committed, list(partitions), abandon=True)

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        found = await self._broker._in_thread(self._fetch_committed, list(partitions), abandon=True)
        return {TopicPartition(k.topic, k.partition): k.metadata or "" for k in found}

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        return await self._broker._in_thread(self._for_times, dict(times), abandon=True)

    def close(self) -> None:
        with self._lock:
            if self._c is not None:
                self._c.close()
                self._c = None

    def _fetch_committed(self, tps: list[TopicPartition]) -> list[confluent_kafka.TopicPartition]:
        timeout = self._broker.timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            c = self._client()
            ktps = [_KTP(tp.topic, tp.partition) for tp in tps]
            while True:
                try:
                    found: list[confluent_kafka.TopicPartition] = c.committed(ktps, timeout=timeout)
                    return found
                except confluent_kafka.KafkaException as e:  # noqa: PERF203 - a retry loop
                    # A group nobody joined yet has no coordinator loaded:
                    # asked again, within the bound.
                    err = e.args[0] if e.args else None
                    retriable = isinstance(err, confluent_kafka.KafkaError) and (
                        err.retriable() or err.code() in _COORDINATOR_MOVING
                    )
                    if not retriable or time.monotonic() > deadline:
                        raise from_exception(e, "committed offsets") from None
                    time.sleep(0.1)

    def _committed(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        found = self._fetch_committed(tps)
        # Nothing committed: the group starts at the log start.
        return self._or_watermark(found, "committed offsets", end=False)

    def _for_times(self, times: dict[TopicPartition, float]) -> dict[TopicPartition, int]:
        # Rounded up to Kafka's milliseconds: a record just before ``t`` must
        # stay before the offset found.
        asked = [
            _KTP(tp.topic, tp.partition, math.ceil(t * 1000 - 1e-3)) for tp, t in times.items()
        ]
        with self._lock:
            try:
                found = self._client().offsets_for_times(asked, timeout=self._broker.timeout)
            except confluent_kafka.KafkaException as e:
                raise from_exception(e, "offsets for times") from None
        # No record that recent: the end of the log.
        return self._or_watermark(found, "offsets for times", end=True)

    def _or_watermark(
        self, found: list[confluent_kafka.TopicPartition], doing: str, *, end: bool
    ) -> dict[TopicPartition, int]:
        """Each partition's offset, or where there is none (negative) its
        low (``end=False``) or high watermark."""
        out = {}
        with self._lock:
            c = self._client()
            try:
                for k in found:
                    offset = k.offset
                    if offset < 0:
                        low, high = c.get_watermark_offsets(
                            _KTP(k.topic, k.partition), timeout=self._broker.timeout
                        )
                        offset = high if end else low
                    out[TopicPartition(k.topic, k.partition)] = offset
            except confluent_kafka.KafkaException as e:
                raise from_exception(e, doing) from None
        return out
