"""Dead-letter records, and replaying them to where they came from.

A message that fails its last attempt is written to the dead-letter topic
as a msgpack map (format 1):

``topic, partition, offset, key, value, headers, timestamp`` (the original
record), ``error_type`` (module.QualifiedName), ``error`` (its text, at most
8 KiB), ``attempts``, ``failed_at`` (seconds since the epoch) and ``group``.

Replaying re-produces each record to its original topic, with its original
key, value and headers (so its version header comes along and the version
check drops anything that is stale by now), at a limited rate: replaying a
backlog at full speed would reorder it against live traffic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback
from collections.abc import Mapping
from typing import Any

import msgpack
import trio

from keylane.brokers.base import Broker
from keylane.errors import ConfigError, KeylaneError
from keylane.message import Message

log = logging.getLogger("keylane.dlq")

FORMAT = 1
REPLAY_HEADER = "keylane-replay-of"
_MAX_ERROR_TEXT = 8192


class DeadLetterFormatError(KeylaneError, ValueError):
    """A dead-letter record could not be decoded (not written by keylane,
    or damaged). Replay stops at it; nothing is skipped silently."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Mapping[str, bytes]
    timestamp: float
    error_type: str
    error: str
    attempts: int
    failed_at: float
    group: str

    @classmethod
    def of(cls, message: Message, error: BaseException, attempts: int, group: str) -> DeadLetter:
        kind = type(error)
        text = "".join(traceback.format_exception_only(kind, error)).strip()
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            headers=dict(message.headers),
            timestamp=message.timestamp,
            error_type=f"{kind.__module__}.{kind.__qualname__}",
            error=text[:_MAX_ERROR_TEXT],
            attempts=attempts,
            failed_at=time.time(),
            group=group,
        )

    def encode(self) -> bytes:
        record = dataclasses.asdict(self)
        record["headers"] = dict(self.headers)
        record["format"] = FORMAT
        out: bytes = msgpack.packb(record, use_bin_type=True)
        return out

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        try:
            record: Any = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise DeadLetterFormatError(f"not a msgpack dead-letter record: {e}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise DeadLetterFormatError(f"not a keylane dead-letter record (format {FORMAT})")
        try:
            fields = {f.name: record[f.name] for f in dataclasses.fields(cls)}
        except KeyError as e:
            raise DeadLetterFormatError(f"dead-letter record lacks {e}") from None
        return cls(**fields)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked."""

    def __init__(self, rate: float, burst: int) -> None:
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not math.isfinite(rate)
            or rate <= 0
        ):
            raise ConfigError(
                f"rate must be a positive number of messages per second, got {rate!r}"
            )
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"burst must be an int >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    async def take(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            wait = (1 - self._tokens) / self.rate
            await trio.sleep(wait)
            self._tokens += wait * self.rate
            self._stamp = trio.current_time()
        self._tokens -= 1


async def replay(
    broker: Broker,
    dlq_topic: str,
    *,
    group: str,
    rate: float = 100.0,
    burst: int | None = None,
    limit: int | None = None,
) -> int:
    """Replays the dead-letter topic into the original topics and returns
    how many records were replayed. Progress is committed under the consumer
    group ``<group>.dlq-replay``, so each record is replayed once even
    across runs; it returns when the topic is drained (or ``limit`` records
    were replayed)."""
    bucket = TokenBucket(rate, burst if burst is not None else max(1, int(rate)))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an int >= 0, got {limit!r}")
    consumer = broker.consumer(f"{group}.dlq-replay", [dlq_topic])
    await consumer.join()
    replayed = 0
    try:
        while limit is None or replayed < limit:
            want = bucket.burst if limit is None else min(bucket.burst, limit - replayed)
            fetch = await consumer.fetch(want, 0.1)
            if fetch.revoked:
                await consumer.release(fetch.revoked)
            for tp, records in fetch.chunks:
                done = None
                for record in records:
                    dead = DeadLetter.decode(record.value)
                    await bucket.take()
                    origin = f"{tp.topic}/{tp.partition}/{record.offset}"
                    headers: dict[str, bytes | str] = {**dead.headers, REPLAY_HEADER: origin}
                    broker.produce(dead.topic, dead.key, dead.value, headers)
                    replayed += 1
                    done = record.offset
                if done is not None:
                    await broker.flush()
                    await consumer.commit({tp: done + 1})
                    log.info("replayed %s/%d up to offset %d", tp.topic, tp.partition, done)
            if fetch.at_end and not fetch.chunks:
                break
    finally:
        with trio.CancelScope(shield=True):
            await consumer.close()
    return replayed
