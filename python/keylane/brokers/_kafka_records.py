"""librdkafka messages as keylane ``Message`` batches, and the watermark
look-up, for the Kafka consumer (``_kafka_consumer.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import confluent_kafka

from keylane.brokers._kafka_common import RateLimitedLog, broker_error
from keylane.brokers.base import TopicPartition
from keylane.errors import UnknownTopic
from keylane.message import Message, UndecodableRecord, delivered

_NO_HEADERS: Mapping[str, bytes] = MappingProxyType({})


@dataclasses.dataclass
class Batch:
    chunks: dict[TopicPartition, list[Message]]
    ends: dict[TopicPartition, int]
    # Every assigned partition has been consumed to the end offset queried
    # in this hop (only computed when the hop consumed nothing).
    at_end: bool


def convert(
    raw: list[confluent_kafka.Message], errors: RateLimitedLog
) -> dict[TopicPartition, list[Message]]:
    chunks: dict[TopicPartition, list[Message]] = {}
    last: tuple[str | None, int | None] = (None, None)
    chunk: list[Message] = []
    for m in raw:
        err = m.error()
        if err is not None:
            if err.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                continue
            e = broker_error(err, "consume")
            if isinstance(e, UnknownTopic) or not e.retriable:
                raise e
            errors(err, "consume")
            continue
        topic, partition = m.topic(), m.partition()
        if (topic, partition) != last:
            assert topic is not None
            assert partition is not None
            last = (topic, partition)
            chunk = chunks.setdefault(TopicPartition(topic, partition), [])
        offset = m.offset()
        assert offset is not None
        problem: str | None = None
        try:
            headers = m.headers()
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            # One record's bad header must not fail the whole batch: the
            # runtime dead-letters it (or skips/blocks, per on_exhausted).
            headers, problem = None, f"its headers cannot be decoded: {e}"
        message = delivered(
            topic,  # type: ignore[arg-type]
            partition,  # type: ignore[arg-type]
            offset,
            m.key(),
            m.value() or b"",
            _headers(headers) if headers else _NO_HEADERS,
            m.timestamp()[1] / 1000.0,
        )
        chunk.append(message if problem is None else UndecodableRecord.of(message, problem))
    return chunks


def _headers(raw: Any) -> dict[str, bytes]:
    # Kafka allows a header without a value; keylane's headers are bytes.
    return {k: v or b"" for k, v in raw}


def watermarks(c: confluent_kafka.Consumer, ktp: Any, **kw: Any) -> tuple[int, int] | None:
    # None when librdkafka has no answer (unknown yet, or timed out).
    found: tuple[int, int] | None = c.get_watermark_offsets(ktp, **kw)
    return found
