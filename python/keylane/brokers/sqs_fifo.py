"""SqsFifoBroker: keylane on Amazon SQS FIFO queues (or ElasticMQ), through boto3.

```python
broker = keylane.SqsFifoBroker("http://127.0.0.1:9324")  # None: AWS itself
app = keylane.App(broker, topics=["payments.fifo"], group="wallet")
```

- A topic is a FIFO queue (its name ends in ``.fifo``); a record's key is
  its ``MessageGroupId`` and a fresh id per ``produce`` call its
  ``MessageDeduplicationId``, so a send the client retries is stored once
  (SQS's 5-minute deduplication window). See ``_sqs_codec`` for the wire form.
- Consuming: ``SqsFifoConsumer`` (``_sqs_consumer.py``): receives of 10 with
  long polling, ``receivers`` of them in parallel, each a worker thread;
  handled messages deleted as they finish; visibility extended while a
  message is held. There are no partitions: every consumer of a queue takes
  part in all of it, and SQS gives each message group to one at a time.
  ``group`` is only a label (SQS has no consumer groups: two Apps on one
  queue share its messages whatever their groups).
- Producing: ``produce`` queues, ``flush`` sends in batches of 10 (up to the
  size limit), one lane of batches per group hash so a group's messages are
  sent in order while different groups go in parallel.
- ``config``: keylane's options for this adapter (``_sqs_common.Options``):
  ``visibility_timeout`` (s, 30), ``receivers`` (4), ``wait_time`` (long
  poll, s, 1), ``max_message_bytes`` (262,144), ``connect_timeout``,
  ``read_timeout``, ``max_attempts`` (botocore's own retries) and
  credentials (``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``; else boto3's usual chain; a local endpoint with
  none anywhere gets dummy ones).
- Admin (blocking, bounded; for tests, benchmarks and tools):
  ``create_topic``, ``delete_topic``, ``topics``, ``counts``, ``queue_url``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from keylane.brokers._checks import subscription
from keylane.brokers._sqs_codec import encode
from keylane.brokers._sqs_common import Options, broker_error, check_queue_name, make_client
from keylane.brokers._sqs_consumer import SqsFifoConsumer
from keylane.errors import BrokerError, ConfigError, InvalidArgument, UnknownTopic
from keylane.message import (
    HeaderValue,
    KeyLike,
    ValueLike,
    encode_headers,
    encode_key,
    encode_value,
)

T = TypeVar("T")

__all__ = ["SqsFifoBroker", "SqsFifoConsumer"]

# Parallel lanes of sends in a flush (a group always uses the same one).
_LANES = 4
# A batch entry refused this many times in a row fails the flush.
_SEND_TRIES = 5


class SqsFifoBroker:
    """SQS FIFO queues keylane consumes from and produces to.

    ``endpoint_url``: None for AWS itself, or a local server such as
    ElasticMQ (``"http://127.0.0.1:9324"``). ``config``: see the module
    docstring. ``timeout`` bounds each blocking call the broker makes itself
    (admin calls, flush)."""

    # No partitions, so no repartitioning to wait out (App's repartition_grace).
    metadata_max_age = 0.0

    def __init__(
        self,
        endpoint_url: str | None = None,
        *,
        region: str = "us-east-1",
        config: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if endpoint_url is not None and (
            not isinstance(endpoint_url, str)
            or not endpoint_url.startswith(("http://", "https://"))
        ):
            raise ConfigError(
                f"endpoint_url must be None or an http(s) URL such as "
                f"'http://127.0.0.1:9324', got {endpoint_url!r}"
            )
        if not isinstance(region, str) or not region:
            raise ConfigError(f"region must be a non-empty str, got {region!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.endpoint_url = endpoint_url
        self.region = region
        self.options = Options.of(config)
        self.timeout = float(timeout)
        self.client = make_client(endpoint_url, region, self.options)
        self.limiter = trio.CapacityLimiter(self.options.receivers + 8)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._urls: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SqsFifoBroker({self.endpoint_url!r}, region={self.region!r})"

    # ---- consuming ------------------------------------------------------------------------

    def consumer(self, group: str, topics: Sequence[str]) -> SqsFifoConsumer:
        return SqsFifoConsumer(self, group, subscription(group, topics, check_queue_name, "queue"))

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """One blocking client call in a worker thread, under this broker's limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def queue_url(self, name: str) -> str:
        """The queue's URL (blocking); ``UnknownTopic`` if there is no such
        queue, ``ConfigError`` if it is not a FIFO queue."""
        check_queue_name(name)
        known = self._urls.get(name)
        if known is not None:
            return known
        try:
            url: str = self.client.get_queue_url(QueueName=name)["QueueUrl"]
            attrs = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["FifoQueue"])
        except Exception as e:
            raise broker_error(e, f"look up queue {name}") from e
        if attrs.get("Attributes", {}).get("FifoQueue") != "true":
            raise ConfigError(f"queue {name!r} is not a FIFO queue")
        self._urls[name] = url
        return url

    def _exists(self, name: str) -> bool:
        try:
            self.queue_url(name)
        except UnknownTopic:
            return False
        return True

    # ---- producing ------------------------------------------------------------------------

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
    ) -> str:
        """Queues a message for the next ``flush``; returns its
        deduplication id. ``partition`` may only be None or 0."""
        check_queue_name(topic)
        if partition not in (None, 0):
            raise InvalidArgument(
                f"SQS FIFO queues have no partitions (got partition={partition!r})"
            )
        group, body, attributes = encode(
            encode_key(key),
            encode_value(value),
            encode_headers(headers),
            self.options.max_message_bytes,
        )
        dedupe = uuid.uuid4().hex
        entry = {
            "MessageBody": body,
            "MessageGroupId": group,
            "MessageDeduplicationId": dedupe,
            "MessageAttributes": attributes,
        }
        with self._lock:
            self._pending.append((topic, entry))
        return dedupe

    async def flush(self) -> None:
        await trio.to_thread.run_sync(self.flush_sync, limiter=self.limiter)

    def flush_sync(self, timeout: float | None = None) -> None:
        """Sends everything produced so far (blocking). On failure the
        messages not sent stay queued for the next flush, in order."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        # Messages to a queue that does not exist are dropped, and said so.
        try:
            missing = dict.fromkeys([t for t in {t for t, _ in pending} if not self._exists(t)], 0)
        except BaseException:
            with self._lock:
                self._pending[:0] = pending
            raise
        if missing:
            for topic, _ in pending:
                if topic in missing:
                    missing[topic] += 1
            pending = [(t, e) for t, e in pending if t not in missing]
        lanes: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(_LANES)]
        for topic, entry in pending:
            lane = zlib.crc32(f"{topic}\0{entry['MessageGroupId']}".encode()) % _LANES
            lanes[lane].append((topic, entry))
        deadline = time.monotonic() + (timeout or max(60.0, self.timeout))
        unsent: list[tuple[str, dict[str, Any]]] = []
        errors: list[BaseException] = []
        with concurrent.futures.ThreadPoolExecutor(_LANES) as pool:
            futures = [pool.submit(self._send_lane, lane, deadline) for lane in lanes if lane]
            for f in futures:
                left, error = f.result()
                unsent.extend(left)
                if error is not None:
                    errors.append(error)
        if unsent:
            with self._lock:
                self._pending[:0] = unsent
        if errors:
            raise errors[0]
        if missing:
            raise UnknownTopic(
                "SQS: no such queue: "
                + ", ".join(f"{t} ({n} message(s) not sent)" for t, n in sorted(missing.items()))
                + "; create it first (keylane never creates queues implicitly)"
            )

    def _send_lane(
        self, lane: list[tuple[str, dict[str, Any]]], deadline: float
    ) -> tuple[list[tuple[str, dict[str, Any]]], BaseException | None]:
        """Sends one lane in order; returns what was not sent and why."""
        i = 0
        tries = 0
        while i < len(lane):
            topic = lane[i][0]
            batch = [lane[i]]
            size = _size(lane[i][1])
            while (
                i + len(batch) < len(lane)
                and len(batch) < 10
                and lane[i + len(batch)][0] == topic
                and size + _size(lane[i + len(batch)][1]) <= self.options.max_message_bytes
            ):
                size += _size(lane[i + len(batch)][1])
                batch.append(lane[i + len(batch)])
            try:
                sent = self._send_batch(topic, [entry for _, entry in batch])
            except BrokerError as err:
                if not err.retriable or time.monotonic() > deadline or tries >= _SEND_TRIES:
                    return lane[i:], err
                tries += 1
                time.sleep(min(2.0, 0.1 * 2**tries))
                continue
            i += sent
            tries = 0 if sent else tries + 1
            if not sent:
                if tries >= _SEND_TRIES or time.monotonic() > deadline:
                    return lane[i:], BrokerError(f"SQS send to {topic}: refused {tries} times")
                time.sleep(min(2.0, 0.1 * 2**tries))
        return [], None

    def _send_batch(self, topic: str, entries: list[dict[str, Any]]) -> int:
        """Sends a batch; returns how many of its first entries are stored
        (the rest are resent: a group's messages must go in order, so an
        entry after a refused one is never counted as sent)."""
        url = self.queue_url(topic)
        try:
            r = self.client.send_message_batch(
                QueueUrl=url, Entries=[{"Id": str(i), **e} for i, e in enumerate(entries)]
            )
        except Exception as e:
            raise broker_error(e, f"send to {topic}") from e
        failed = {int(f["Id"]): f for f in r.get("Failed", [])}
        if not failed:
            return len(entries)
        first = min(failed)
        f = failed[first]
        if f.get("SenderFault", False):
            raise BrokerError(
                f"SQS send to {topic}: {f.get('Code')}: {f.get('Message')}", code=f.get("Code")
            )
        # A group's entry stored after one of its entries was refused would
        # be out of order once the refused one is resent: say so, loudly.
        refused_at: dict[str, int] = {}
        for i in sorted(failed):
            refused_at.setdefault(entries[i]["MessageGroupId"], i)
        for i, entry in enumerate(entries):
            at = refused_at.get(entry["MessageGroupId"])
            if at is not None and i > at and i not in failed:
                raise BrokerError(
                    f"SQS send to {topic}: a message of group {entry['MessageGroupId']!r} was "
                    f"refused ({f.get('Code')}) but a later one was stored: their order is lost"
                )
        # Other groups' entries after the refused one are sent again with the
        # rest, and SQS drops them as duplicates (same deduplication id,
        # within its 5-minute window): nothing is doubled or reordered.
        return first

    # ---- admin ----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1, **attributes: str) -> None:
        """Creates a FIFO queue (``partitions`` must be 1; ``attributes``:
        SQS queue attributes such as ``RedrivePolicy``)."""
        check_queue_name(name)
        if partitions != 1:
            raise InvalidArgument(f"SQS FIFO queues have no partitions (got {partitions})")
        attrs = {
            "FifoQueue": "true",
            "VisibilityTimeout": str(self.options.visibility_timeout),
            **attributes,
        }
        try:
            self.client.create_queue(QueueName=name, Attributes=attrs)
        except Exception as e:
            raise broker_error(e, f"create queue {name}") from e

    def delete_topic(self, name: str) -> None:
        try:
            self.client.delete_queue(QueueUrl=self.queue_url(name))
        except BrokerError:
            raise
        except Exception as e:
            raise broker_error(e, f"delete queue {name}") from e
        self._urls.pop(name, None)

    def topics(self) -> list[str]:
        try:
            urls = self.client.list_queues(MaxResults=1000).get("QueueUrls", [])
        except Exception as e:
            raise broker_error(e, "list queues") from e
        return sorted(u.rsplit("/", 1)[-1] for u in urls if u.endswith(".fifo"))

    def counts(self, name: str) -> tuple[int, int]:
        """(visible, in flight) messages of a queue (SQS's approximate counts;
        exact on ElasticMQ)."""
        try:
            a = self.client.get_queue_attributes(
                QueueUrl=self.queue_url(name),
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
        except BrokerError:
            raise
        except Exception as e:
            raise broker_error(e, f"count messages of {name}") from e
        return int(a["ApproximateNumberOfMessages"]), int(
            a["ApproximateNumberOfMessagesNotVisible"]
        )


def _size(entry: Mapping[str, Any]) -> int:
    attrs = entry["MessageAttributes"]
    return len(entry["MessageBody"].encode("utf-8")) + sum(
        len(name) + len(a["DataType"]) + len(a.get("BinaryValue", b"")) for name, a in attrs.items()
    )
