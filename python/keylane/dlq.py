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

import base64
import dataclasses
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import trio

from keylane.brokers.base import Broker
from keylane.errors import ConfigError, KeylaneError
from keylane.message import Message

log = logging.getLogger("keylane.dlq")

FORMAT = 1
REPLAY_HEADER = "keylane-replay-of"
PARKED_HEADER = "keylane-parked-from"
PARKED_REASON_HEADER = "keylane-parked-reason"
_MAX_ERROR_TEXT = 8192


class DeadLetterFormatError(KeylaneError, ValueError):
    """A dead-letter record could not be decoded (not written by keylane,
    or damaged). Replay stops at it (``ReplayStopped``) unless told to park
    it; nothing is skipped silently."""


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
        """The record as msgpack. Never fails for anything a message can
        hold: a header name that is not valid text (a lone surrogate) is
        stored as its surrogate-preserving UTF-8 bytes (a bin key, turned
        back into the same str by ``decode``), and error text that is not
        valid text is stored with backslash escapes."""
        record = {
            "format": FORMAT,
            "topic": _text(self.topic),
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "value": self.value,
            "headers": {_header_name(k): v for k, v in self.headers.items()},
            "timestamp": self.timestamp,
            "error_type": _text(self.error_type),
            "error": _text(self.error),
            "attempts": self.attempts,
            "failed_at": self.failed_at,
            "group": _text(self.group),
        }
        out: bytes = msgpack.packb(record, use_bin_type=True)
        return out

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        """The record written by ``encode``; anything else (not msgpack, a
        field missing or of the wrong type) is a ``DeadLetterFormatError``."""
        if not isinstance(data, bytes):
            raise DeadLetterFormatError(f"a dead letter is bytes, not {type(data).__name__}")
        try:
            record: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise DeadLetterFormatError(f"not a msgpack dead-letter record: {e}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise DeadLetterFormatError(f"not a keylane dead-letter record (format {FORMAT})")
        fields: dict[str, Any] = {}
        for name, kinds in _FIELD_TYPES.items():
            if name not in record:
                raise DeadLetterFormatError(f"dead-letter record lacks {name!r}")
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise DeadLetterFormatError(
                    f"dead-letter field {name!r} is a {type(value).__name__}"
                )
            fields[name] = value
        headers: dict[str, bytes] = {}
        for k, v in fields["headers"].items():
            if isinstance(k, bytes):
                k = k.decode("utf-8", "surrogatepass")
            if not isinstance(k, str) or not isinstance(v, bytes):
                raise DeadLetterFormatError("dead-letter headers must map names to bytes")
            headers[k] = v
        fields["headers"] = headers
        return cls(**fields)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "topic": str,
    "partition": int,
    "offset": int,
    "key": (bytes, type(None)),
    "value": bytes,
    "headers": dict,
    "timestamp": (int, float),
    "error_type": str,
    "error": str,
    "attempts": int,
    "failed_at": (int, float),
    "group": str,
}


def _header_name(name: str) -> str | bytes:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")
    return name


def _text(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


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


class ReplayStopped(DeadLetterFormatError):
    """Replay met a record it cannot decode. Everything before it was
    replayed and committed; ``topic``/``partition``/``offset`` name it."""

    def __init__(self, message: str, topic: str, partition: int, offset: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


async def replay(
    broker: Broker,
    dlq_topic: str,
    *,
    group: str,
    rate: float = 100.0,
    burst: int | None = None,
    limit: int | None = None,
    skip_malformed: bool = False,
    park_topic: str | None = None,
    park_file: str | os.PathLike[str] | None = None,
) -> int:
    """Replays the dead-letter topic into the original topics and returns
    how many records were replayed. Progress is committed under the consumer
    group ``<group>.dlq-replay`` after every batch, so each record is
    replayed once even across runs; it returns when the topic is drained (or
    ``limit`` records were replayed).

    A record that is not a keylane dead letter stops the replay with
    ``ReplayStopped`` naming its offset (what came before it is committed).
    With ``skip_malformed`` it is parked instead -- produced unchanged to
    ``park_topic`` or appended to ``park_file`` (JSON lines, bytes in
    base64) -- and the replay goes on past it; exactly one of the two is
    required, so nothing is dropped."""
    bucket = TokenBucket(rate, burst if burst is not None else max(1, int(rate)))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an int >= 0, got {limit!r}")
    park = _parking(skip_malformed, park_topic, park_file)
    consumer = broker.consumer(f"{group}.dlq-replay", [dlq_topic])
    await consumer.join()
    replayed = parked = 0
    try:
        while limit is None or replayed < limit:
            want = bucket.burst if limit is None else min(bucket.burst, limit - replayed)
            fetch = await consumer.fetch(want, 0.1)
            if fetch.revoked:
                await consumer.release(fetch.revoked)
            for tp, records in fetch.chunks:
                done = None
                try:
                    for record in records:
                        origin = f"{tp.topic}/{tp.partition}/{record.offset}"
                        try:
                            dead = DeadLetter.decode(record.value)
                        except DeadLetterFormatError as e:
                            if park is None:
                                raise ReplayStopped(
                                    f"dead letter {origin} is malformed ({e}); the records "
                                    "before it were replayed and committed. Rerun with "
                                    "skip_malformed (--skip-malformed) and a park topic or "
                                    "file to set it aside and go on.",
                                    tp.topic,
                                    tp.partition,
                                    record.offset,
                                ) from None
                            await park(broker, record, origin, str(e))
                            log.warning("parked malformed dead letter %s: %s", origin, e)
                            parked += 1
                            done = record.offset
                            continue
                        await bucket.take()
                        headers: dict[str, bytes | str] = {**dead.headers, REPLAY_HEADER: origin}
                        broker.produce(dead.topic, dead.key, dead.value, headers)
                        replayed += 1
                        done = record.offset
                finally:
                    if done is not None:
                        # Also on the way out of an error: a rerun must not
                        # produce the records before it again.
                        with trio.CancelScope(shield=True):
                            await broker.flush()
                            await consumer.commit({tp: done + 1})
                        log.info("replayed %s/%d up to offset %d", tp.topic, tp.partition, done)
            if fetch.at_end and not fetch.chunks:
                break
    finally:
        with trio.CancelScope(shield=True):
            await consumer.close()
    if parked:
        log.warning("replay parked %d malformed dead letters", parked)
    return replayed


_Park = Callable[[Broker, Message, str, str], Awaitable[None]]


def _parking(skip: bool, topic: str | None, path: str | os.PathLike[str] | None) -> _Park | None:
    if not skip:
        if topic is not None or path is not None:
            raise ConfigError(
                "park_topic/park_file (--park-topic/--park-file) only go with "
                "skip_malformed=True (--skip-malformed)"
            )
        return None
    if (topic is None) == (path is None):
        raise ConfigError(
            "skip_malformed (--skip-malformed) needs exactly one place to park what it "
            "skips, so that nothing is lost: park_topic (--park-topic TOPIC) or "
            "park_file (--park-file PATH)"
        )
    if topic is not None:

        async def to_topic(broker: Broker, record: Message, origin: str, problem: str) -> None:
            headers: dict[str, bytes | str] = {
                **record.headers,
                PARKED_HEADER: origin,
                PARKED_REASON_HEADER: _text(problem)[:_MAX_ERROR_TEXT],
            }
            broker.produce(topic, record.key, record.value, headers)
            await broker.flush()

        return to_topic
    assert path is not None
    target = Path(path)

    async def to_file(broker: Broker, record: Message, origin: str, problem: str) -> None:
        line = json.dumps(
            {
                "origin": origin,
                "problem": _text(problem),
                "key": None if record.key is None else base64.b64encode(record.key).decode(),
                "value": base64.b64encode(record.value).decode(),
                "headers": {
                    _text(k): base64.b64encode(v).decode() for k, v in record.headers.items()
                },
                "timestamp": record.timestamp,
            }
        )

        def append() -> None:
            with target.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())

        await trio.to_thread.run_sync(append)

    return to_file
