"""Turning librdkafka messages into keylane Messages, without a broker."""

from __future__ import annotations

from typing import Any

from keylane.brokers._kafka_common import RateLimitedLog
from keylane.brokers._kafka_records import convert
from keylane.brokers.base import TopicPartition
from keylane.message import Message, UndecodableRecord


class FakeRecord:
    """The part of ``confluent_kafka.Message`` that ``convert`` reads."""

    def __init__(self, offset: int, headers: Any) -> None:
        self._offset, self._headers = offset, headers

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v%d" % self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_500)

    def headers(self) -> Any:
        if isinstance(self._headers, Exception):
            raise self._headers
        return self._headers


def test_a_record_with_undecodable_headers_fails_alone() -> None:
    bad = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    raw = [FakeRecord(0, [("a", b"1")]), FakeRecord(1, bad), FakeRecord(2, None)]
    chunks = convert(raw, RateLimitedLog())  # type: ignore[arg-type]
    first, broken, last = chunks[TopicPartition("t", 0)]
    assert type(first) is Message
    assert dict(first.headers) == {"a": b"1"}
    assert isinstance(broken, UndecodableRecord)
    assert (broken.offset, broken.value, broken.timestamp) == (1, b"v1", 1.5)
    assert "headers cannot be decoded" in broken.problem
    assert type(last) is Message
    assert last.value == b"v2"
