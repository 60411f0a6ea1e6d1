"""KafkaBroker: keylane on Apache Kafka, through confluent-kafka (librdkafka).

```python
broker = keylane.KafkaBroker("127.0.0.1:9092", config={"session.timeout.ms": 10_000})
app = keylane.App(broker, topics=["payments"], group="wallet")
```

- Consuming: one ``KafkaConsumer`` per App run (``_kafka_consumer.py``):
  batches of up to ``fetch_max`` records in worker threads, offsets
  committed only as the runtime's watermark says (auto-commit is off),
  rebalances eager or cooperative (the default here), backpressure by
  pausing partitions while still polling.
- Producing: an idempotent producer (``enable.idempotence=true``) with
  ``partitioner=murmur2_random``, the Java client's partitioner, so a key
  lands where ``keylane.partition_for_key`` says.
- Admin: ``create_topic``, ``add_partitions``, ``partitions``, ``topics``,
  ``end_offsets``, ``committed``, ``delete_topic`` (blocking calls with a
  bound: for tests, benchmarks, the lab and tools, not for a Trio task).

``config`` is passed to every librdkafka client the broker creates (consumer,
producer, admin); librdkafka logs and ignores options that do not apply to
one of them. keylane's defaults are overridable except
``bootstrap.servers``, ``group.id`` and ``enable.auto.commit``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import confluent_kafka
import trio
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    NewPartitions,
    NewTopic,
    OffsetSpec,
)

from keylane.brokers._checks import subscription
from keylane.brokers._kafka_common import (
    RateLimitedLog,
    broker_error,
    check_config,
    client_config,
    from_exception,
)
from keylane.brokers._kafka_consumer import KafkaConsumer
from keylane.brokers.base import TopicPartition
from keylane.errors import (
    BrokerError,
    BrokerTimeout,
    ConfigError,
    InvalidArgument,
    UnknownTopic,
)
from keylane.message import (
    HeaderValue,
    KeyLike,
    ValueLike,
    encode_headers,
    encode_key,
    encode_value,
)

T = TypeVar("T")

__all__ = ["KafkaBroker", "KafkaConsumer"]

# Threads one broker may use at once for blocking client calls.
_THREADS = 8


class KafkaBroker:
    """A Kafka cluster keylane consumes from and produces to.

    ``bootstrap_servers`` is librdkafka's ``bootstrap.servers`` (e.g.
    ``"127.0.0.1:9092"``). ``config``: librdkafka options for every client
    (see the module docstring). ``timeout`` bounds each blocking call the
    broker makes itself (admin calls, flush, joining).
    """

    # Kafka clients refresh topic metadata every 5 minutes by default, so a
    # producer may place keys by the old partition count that long after a
    # topic grows (App's repartition_grace; lower it if every producer
    # refreshes sooner).
    metadata_max_age = 300.0

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        config: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            raise ConfigError("bootstrap_servers must be a non-empty str such as '127.0.0.1:9092'")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.bootstrap_servers = bootstrap_servers.strip()
        self.config = check_config(config)
        self.timeout = float(timeout)
        self._limiter = trio.CapacityLimiter(_THREADS)
        self._lock = threading.Lock()
        self._producer: confluent_kafka.Producer | None = None
        self._admin: kafka_admin.AdminClient | None = None
        self._errors = RateLimitedLog()
        self._delivery_error: confluent_kafka.KafkaError | None = None
        self._undelivered = 0
        self._known_topics: set[str] = set()

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap_servers!r})"

    # ---- consuming ------------------------------------------------------------------------

    def consumer(self, group: str, topics: Sequence[str]) -> KafkaConsumer:
        return KafkaConsumer(self, group, subscription(group, topics, _check_topic, "topic"))

    async def _in_thread(self, fn: Callable[..., T], *args: Any, abandon: bool = False) -> T:
        """One blocking client call in a worker thread, under this broker's
        limiter. ``abandon``: a cancelled caller does not wait for it (for
        calls whose late completion is harmless)."""
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=abandon
        )

    # ---- producing ------------------------------------------------------------------------

    def _get_producer(self) -> confluent_kafka.Producer:
        with self._lock:
            if self._producer is None:
                conf = client_config(
                    self.bootstrap_servers,
                    self.config,
                    linger_ms=5,
                    partitioner="murmur2_random",
                )
                conf["enable.idempotence"] = conf.get("enable.idempotence", True)
                conf["on_delivery"] = self._delivered
                conf["error_cb"] = lambda err: self._errors(err, "producer")
                try:
                    self._producer = confluent_kafka.Producer(conf)
                except confluent_kafka.KafkaException as e:
                    raise from_exception(e, "creating the producer") from None
                except (ValueError, TypeError) as e:
                    raise InvalidArgument(f"kafka: invalid producer config: {e}") from None
            return self._producer

    def _delivered(self, err: confluent_kafka.KafkaError | None, _msg: object) -> None:
        if err is not None:
            with self._lock:
                self._undelivered += 1
                if self._delivery_error is None:
                    self._delivery_error = err

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Queues a record; ``flush`` waits until the broker stored it (and
        raises if any record since the last flush could not be).

        The partition is ``partition`` if given, else murmur2 of the key as
        Java's producer does, else a random one for a key-less record. If
        librdkafka's queue is full, waits for room up to the broker's
        ``timeout``, then raises a retriable ``BrokerError``. The first
        record for a topic checks that the topic exists (one metadata call):
        a missing topic is an ``UnknownTopic`` at once, not a delivery
        timeout later.
        """
        _check_topic(topic)
        key_bytes = encode_key(key)
        value_bytes = encode_value(value)
        header_list = list(encode_headers(headers).items()) or None
        if partition is not None and (
            isinstance(partition, bool) or not isinstance(partition, int) or partition < 0
        ):
            raise InvalidArgument(f"partition must be an int >= 0 or None, got {partition!r}")
        if topic not in self._known_topics:
            self.partitions(topic)
            self._known_topics.add(topic)
        p = self._get_producer()
        kwargs: dict[str, Any] = {"key": key_bytes, "headers": header_list}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp is not None:
            kwargs["timestamp"] = int(timestamp * 1000)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                p.produce(topic, value_bytes, **kwargs)
                break
            except BufferError:
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"kafka: the producer queue stayed full for {self.timeout:.0f}s "
                        f"(is {self.bootstrap_servers} reachable?); flush() and retry",
                        retriable=True,
                        code="_QUEUE_FULL",
                    ) from None
                p.poll(0.05)
            except confluent_kafka.KafkaException as e:
                raise from_exception(e, f"produce to {topic!r}") from None
        p.poll(0)

    async def flush(self) -> None:
        await self._in_thread(self.flush_sync)

    def flush_sync(self, timeout: float | None = None) -> None:
        """``flush`` for code outside Trio (producer scripts, tests)."""
        with self._lock:
            p = self._producer
        if p is None:
            return
        bound = self.timeout if timeout is None else timeout
        left = p.flush(bound)
        with self._lock:
            err, n = self._delivery_error, self._undelivered
            self._delivery_error, self._undelivered = None, 0
        if err is not None:
            raise broker_error(err, f"delivering {n} record(s)")
        if left:
            raise BrokerTimeout(
                f"kafka: {left} record(s) not acknowledged by {self.bootstrap_servers} "
                f"within {bound:.0f}s"
            )

    def close(self) -> None:
        """Flushes (bounded) and drops this broker's producer and admin client."""
        try:
            self.flush_sync()
        finally:
            with self._lock:
                self._producer = None
                self._admin = None

    # ---- admin ----------------------------------------------------------------------------

    def _get_admin(self) -> kafka_admin.AdminClient:
        with self._lock:
            if self._admin is None:
                conf = client_config(self.bootstrap_servers, self.config)
                for key in ("partitioner", "enable.idempotence"):
                    conf.pop(key, None)
                conf["error_cb"] = lambda err: self._errors(err, "admin")
                self._admin = kafka_admin.AdminClient(conf)
            return self._admin

    def _wait(self, futures: Mapping[Any, Any], doing: str) -> dict[Any, Any]:
        out = {}
        for name, fut in futures.items():
            try:
                out[name] = fut.result(timeout=self.timeout)
            except confluent_kafka.KafkaException as e:  # noqa: PERF203
                raise from_exception(e, doing) from None
            except TimeoutError:
                raise BrokerTimeout(
                    f"kafka: {doing} got no answer from {self.bootstrap_servers} "
                    f"within {self.timeout:.0f}s"
                ) from None
        return out

    def topics(self) -> dict[str, int]:
        """Topic → partition count (internal topics left out)."""
        try:
            meta = self._get_admin().list_topics(timeout=self.timeout)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, "listing topics") from None
        return {
            name: len(t.partitions)
            for name, t in meta.topics.items()
            if not name.startswith("__") and t.error is None
        }

    def partitions(self, topic: str) -> int:
        """The partition count of ``topic`` (``UnknownTopic`` if missing)."""
        _check_topic(topic)
        try:
            meta = self._get_admin().list_topics(topic, timeout=self.timeout)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, f"describing {topic!r}") from None
        t = meta.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            raise UnknownTopic(f"kafka: no topic {topic!r} on {self.bootstrap_servers}")
        return len(t.partitions)

    def create_topic(self, topic: str, partitions: int = 1, *, replication: int = 1) -> None:
        """Creates ``topic``; a no-op if it exists with that many partitions
        (``ConfigError`` if with another count). Returns once the cluster's
        metadata shows every partition."""
        _check_topic(topic)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"partitions must be an int >= 1, got {partitions!r}")
        new = NewTopic(topic, num_partitions=partitions, replication_factor=replication)
        try:
            self._wait(self._get_admin().create_topics([new]), f"creating {topic!r}")
        except BrokerError as e:
            if e.code != "TOPIC_ALREADY_EXISTS":
                raise
        self._await_partitions(topic, partitions, exact=True)

    def add_partitions(self, topic: str, total: int) -> None:
        """Grows ``topic`` to ``total`` partitions (Kafka never shrinks one).
        Existing records stay where they are; keys may now hash elsewhere."""
        current = self.partitions(topic)
        if isinstance(total, bool) or not isinstance(total, int) or total <= current:
            raise ConfigError(f"total must be an int above the current {current} partitions")
        futures = self._get_admin().create_partitions([NewPartitions(topic, total)])
        self._wait(futures, f"adding partitions to {topic!r}")
        self._await_partitions(topic, total, exact=False)

    def delete_topic(self, topic: str) -> None:
        _check_topic(topic)
        self._wait(self._get_admin().delete_topics([topic]), f"deleting {topic!r}")

    def _await_partitions(self, topic: str, n: int, *, exact: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                have = self.partitions(topic)
            except UnknownTopic:
                have = 0
            if have == n or (not exact and have > n):
                return
            if have and exact:
                raise ConfigError(
                    f"topic {topic!r} exists with {have} partitions, not {n}; "
                    "use add_partitions() to grow it"
                )
            if time.monotonic() >= deadline:
                raise BrokerTimeout(
                    f"kafka: topic {topic!r} did not show {n} partitions within {self.timeout:.0f}s"
                )
            time.sleep(0.05)

    def end_offsets(self, topic: str) -> list[int]:
        """Per partition, the offset the next record will get."""
        n = self.partitions(topic)
        spec = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        request = {confluent_kafka.TopicPartition(topic, p): spec for p in range(n)}
        found = self._wait(self._get_admin().list_offsets(request), f"end offsets of {topic!r}")
        ends = [0] * n
        for ktp, info in found.items():
            ends[ktp.partition] = info.offset
        return ends

    def committed(
        self, group: str, topics: Sequence[str] | None = None
    ) -> dict[TopicPartition, int]:
        """A group's committed offsets (next offset to read), where it has
        one, for ``topics`` (default: every topic of the cluster)."""
        if not isinstance(group, str) or not group:
            raise ConfigError("group must be a non-empty str")
        names = self.topics() if topics is None else {t: self.partitions(t) for t in topics}
        ktps = [confluent_kafka.TopicPartition(t, p) for t, n in names.items() for p in range(n)]
        if not ktps:
            return {}
        # A plain consumer's OffsetFetch, not AdminClient's
        # list_consumer_group_offsets: librdkafka 2.16.0 crashes (SIGSEGV
        # in rd_kafka_cgrp_op) handling the latter's response while the
        # group coordinator moves, e.g. during a broker restart.
        conf = client_config(self.bootstrap_servers, self.config, consumer=True)
        conf["group.id"] = group
        conf["enable.auto.commit"] = False
        conf["error_cb"] = lambda err: self._errors(err, "offsets")
        c = confluent_kafka.Consumer(conf)
        try:
            found = c.committed(ktps, timeout=self.timeout)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, f"offsets of {group!r}") from None
        finally:
            c.close()
        return {TopicPartition(k.topic, k.partition): k.offset for k in found if k.offset >= 0}


def _check_topic(topic: object) -> None:
    if not isinstance(topic, str) or not topic or len(topic) > 249:
        raise InvalidArgument(f"topic name {topic!r} is invalid: use 1-249 characters")
    bad = set(topic) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    if bad or topic in (".", ".."):
        raise InvalidArgument(
            f"topic name {topic!r} is invalid: use characters from [A-Za-z0-9._-] only"
        )
