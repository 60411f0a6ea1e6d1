"""RedisStreamsBroker: keylane on Redis Streams, through redis-py.

```python
broker = keylane.RedisStreamsBroker("redis://127.0.0.1:6399/0")
broker.create_topic("payments", partitions=12)
app = keylane.App(broker, topics=["payments"], group="wallet")
```

- A topic is a set of streams, one per partition (``{prefix}{topic}:{p}``),
  its partition count stored at ``{prefix}{topic}:partitions``. Producers
  place a key with ``keylane.partition_for_key`` (Kafka's murmur2), so each
  key lives in one stream, in order; key-less records go to a random
  partition. Why streams per partition rather than one stream per topic:
  docs/design.md, "Redis Streams".
- Consuming: ``RedisStreamsConsumer`` (``_redis_consumer.py``) with the
  lease protocol of ``_redis_membership.py``: one owner per stream at a
  time, rebalanced as members come and go, dead members' pending entries
  claimed with ``XAUTOCLAIM``.
- Producing: ``produce`` queues an entry, ``flush`` sends them in one
  pipeline (a worker thread): ``XADD`` with server-made ids.
- The sync client runs in worker threads, one hop per batch, under the
  broker's own limiter (redis-py's asyncio client is asyncio, not Trio).
- ``config`` (``_redis_common.Options``): ``prefix`` ("keylane:"),
  ``lease_ms`` (10,000), ``metadata_max_age`` (s, 5), ``max_message_bytes``
  (1 MiB), ``socket_timeout``, ``connect_timeout``.
- Admin (blocking, for tests, benchmarks and tools): ``create_topic``,
  ``add_partitions``, ``partitions``, ``delete_topic``, ``topics``,
  ``end_offsets``, ``committed``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis
import redis.exceptions
import trio

from keylane._native import partition_for_key
from keylane.brokers._checks import subscription
from keylane.brokers._redis_common import (
    Keys,
    Options,
    broker_error,
    connect,
    encode,
    offset_of,
)
from keylane.brokers._redis_consumer import RedisStreamsConsumer
from keylane.brokers.base import TopicPartition
from keylane.errors import ConfigError, InvalidArgument, UnknownTopic
from keylane.message import (
    HeaderValue,
    KeyLike,
    ValueLike,
    encode_headers,
    encode_key,
    encode_value,
)

T = TypeVar("T")

__all__ = ["RedisStreamsBroker", "RedisStreamsConsumer"]

_THREADS = 8


class RedisStreamsBroker:
    """A Redis server keylane consumes streams from and produces to.

    ``url``: redis-py's URL form (``redis://host:port/db``, ``rediss://``
    for TLS, ``unix://``). ``timeout`` bounds each blocking call the broker
    makes itself (admin calls, flush)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6399/0",
        *,
        config: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"url must look like redis://127.0.0.1:6399/0, got {url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = url
        self.options = Options.of(config)
        self.timeout = float(timeout)
        self.keys = Keys(self.options.prefix)
        self.client = connect(url, self.options)
        self.limiter = trio.CapacityLimiter(_THREADS)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[bytes, bytes]]] = []
        self._counts: dict[str, tuple[int, float]] = {}

    @property
    def metadata_max_age(self) -> float:
        """How long producers may place keys by an old partition count."""
        return self.options.metadata_max_age

    def __repr__(self) -> str:
        return f"RedisStreamsBroker({self.url!r})"

    def consumer(self, group: str, topics: Sequence[str]) -> RedisStreamsConsumer:
        names = subscription(group, topics, _check_topic, "topic")
        if ":" in group:
            raise ConfigError(f"a group name has no ':' on Redis, got {group!r}")
        return RedisStreamsConsumer(self, group, names)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """One blocking client call in a worker thread, under this broker's limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # ---- producing ------------------------------------------------------------------------

    def _count(self, topic: str) -> int:
        known = self._counts.get(topic)
        now = time.monotonic()
        if known is not None and now - known[1] < self.options.metadata_max_age:
            return known[0]
        n = self.partitions(topic)
        self._counts[topic] = (n, now)
        return n

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
    ) -> int:
        """Queues an entry for the next ``flush``; returns its partition.
        Reads the topic's partition count (blocking) at most every
        ``metadata_max_age`` seconds."""
        _check_topic(topic)
        k = encode_key(key)
        fields = encode(
            k, encode_value(value), encode_headers(headers), self.options.max_message_bytes
        )
        n = self._count(topic)
        if partition is None:
            partition = partition_for_key(k, n) if k is not None else random.randrange(n)
        elif (
            isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < n
        ):
            raise InvalidArgument(
                f"partition must be in [0, {n}) for topic {topic!r}, got {partition!r}"
            )
        with self._lock:
            self._pending.append((self.keys.stream(topic, partition), fields))
        return partition

    async def flush(self) -> None:
        await self._in_thread(self.flush_sync)

    def flush_sync(self, timeout: float | None = None) -> None:
        """Sends everything produced so far (blocking). On failure what was
        not sent stays queued, in order, for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, []
        step = 2000
        for i in range(0, len(pending), step):
            p = self.client.pipeline(transaction=False)
            for stream, fields in pending[i : i + step]:
                p.xadd(stream, fields)  # type: ignore[arg-type]
            try:
                p.execute()
            except redis.exceptions.RedisError as e:
                # A pipeline that failed may have stored part of its entries:
                # resending them could repeat them, so they are reported, not
                # kept; later ones stay queued for the next flush.
                later = pending[i + step :]
                with self._lock:
                    self._pending[:0] = later
                chunk = len(pending[i : i + step])
                raise broker_error(
                    e,
                    f"flush: {chunk} entries may not be stored (not resent); "
                    f"{len(later)} more stay queued",
                ) from e

    # ---- admin ----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        _check_topic(name)
        _check_count(partitions)
        try:
            created = self.client.set(self.keys.partitions(name), partitions, nx=True)
        except redis.exceptions.RedisError as e:
            raise broker_error(e, f"create topic {name}") from e
        if not created:
            raise InvalidArgument(f"topic {name!r} exists already")

    def add_partitions(self, name: str, total: int) -> None:
        """Grows a topic to ``total`` partitions (never shrinks one)."""
        _check_count(total)
        now = self.partitions(name)
        if total <= now:
            raise InvalidArgument(f"topic {name!r} has {now} partitions; {total} is not more")
        try:
            self.client.set(self.keys.partitions(name), total)
        except redis.exceptions.RedisError as e:
            raise broker_error(e, f"add partitions to {name}") from e
        self._counts.pop(name, None)

    def partitions(self, name: str) -> int:
        try:
            n = self.client.get(self.keys.partitions(name))
        except redis.exceptions.RedisError as e:
            raise broker_error(e, f"look up topic {name}") from e
        if n is None:
            raise UnknownTopic(
                f"Redis: no such topic {name!r} (create it first with create_topic: keylane "
                "never creates topics implicitly)"
            )
        return int(n)

    def delete_topic(self, name: str) -> None:
        n = self.partitions(name)
        try:
            self.client.delete(
                self.keys.partitions(name), *[self.keys.stream(name, p) for p in range(n)]
            )
        except redis.exceptions.RedisError as e:
            raise broker_error(e, f"delete topic {name}") from e
        self._counts.pop(name, None)

    def topics(self) -> list[str]:
        suffix = ":partitions"
        pattern = f"{self.options.prefix}*{suffix}"
        try:
            found = [k.decode() for k in self.client.scan_iter(match=pattern, count=1000)]
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "list topics") from e
        start = len(self.options.prefix)
        return sorted(k[start : -len(suffix)] for k in found if not k[start:].startswith("group:"))

    def end_offsets(self, name: str) -> list[int]:
        """Per partition, the offset after its last entry (0 if empty)."""
        n = self.partitions(name)
        out = []
        for p in range(n):
            try:
                info = self.client.xinfo_stream(self.keys.stream(name, p))
            except redis.exceptions.ResponseError:
                out.append(0)  # no entry was ever added
                continue
            except redis.exceptions.RedisError as e:
                raise broker_error(e, f"describe {name}/{p}") from e
            last = info.get("last-generated-id", b"0-0")
            out.append(offset_of(last) + 1 if offset_of(last) else 0)
        return out

    def committed_of(self, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offset of each partition (0 where none)."""
        if not tps:
            return {}
        try:
            values = self.client.hmget(
                self.keys.metadata(group) + ":offsets", [f"{tp.topic}:{tp.partition}" for tp in tps]
            )
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "read committed offsets") from e
        return {tp: int(v) if v else 0 for tp, v in zip(tps, values, strict=True)}

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """Every committed offset of ``group`` (partitions without a commit left out)."""
        try:
            raw: dict[Any, Any] = self.client.hgetall(self.keys.metadata(group) + ":offsets")
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "read committed offsets") from e
        out = {}
        for field, v in raw.items():
            topic, _, p = field.decode().rpartition(":")
            if int(v):
                out[TopicPartition(topic, int(p))] = int(v)
        return out

    def offsets_for_times_sync(
        self, times: dict[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        out = {}
        for tp, t in times.items():
            stream = self.keys.stream(*tp)
            try:
                first: Any = self.client.xrange(stream, min=str(max(0, int(t * 1000))), count=1)
            except redis.exceptions.RedisError as e:
                raise broker_error(e, f"look up {tp.topic}/{tp.partition} by time") from e
            if first:
                out[tp] = offset_of(first[0][0])
            else:
                ends = self.end_offsets(tp.topic)
                out[tp] = ends[tp.partition] if tp.partition < len(ends) else 0
        return out


def _check_topic(name: object) -> None:
    if not isinstance(name, str) or not name or ":" in name or len(name) > 200:
        raise ConfigError(f"a topic name is a non-empty str without ':', got {name!r}")


def _check_count(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
        raise InvalidArgument(f"partitions must be an int in [1, 10000], got {n!r}")
