"""`keylane bench --broker kafka://HOST:PORT`: keylane on a real Kafka broker
against a bare confluent-kafka loop that only counts messages.

The workload is produced once into a topic named after its shape (reused by
later runs while it holds exactly that many records). Each round consumes it
as a new consumer group, keylane and the bare loop alternating. Both are
timed from the moment the consumer is subscribed (the group join happens in
the first poll for both) until the last message is handled; keylane's time
also includes its final commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import confluent_kafka

from keylane.bench.bare import BareComparison, alternate
from keylane.bench.workloads import Workload
from keylane.brokers._kafka_consumer import consumer_config
from keylane.brokers.kafka import KafkaBroker
from keylane.errors import ConfigError


def parse_url(url: str) -> str:
    """``kafka://HOST:PORT[,HOST:PORT...]`` → bootstrap servers."""
    if not url.startswith("kafka://") or not url[len("kafka://") :].strip("/"):
        raise ConfigError(f"a Kafka broker URL looks like kafka://127.0.0.1:9092, got {url!r}")
    return url[len("kafka://") :].strip("/")


def _topic(w: Workload) -> str:
    return f"keylane-bench-{w.partitions}p-{w.messages}m-{w.keys}k"


def prepare(broker: KafkaBroker, w: Workload) -> tuple[str, float | None]:
    """The workload's topic, produced unless it already holds it; and how
    long producing took (None if reused)."""
    topic = _topic(w)
    if topic in broker.topics() and sum(broker.end_offsets(topic)) == w.messages:
        return topic, None
    if topic in broker.topics():
        broker.delete_topic(topic)
        deadline = time.monotonic() + broker.timeout
        while topic in broker.topics() and time.monotonic() < deadline:
            time.sleep(0.2)
    broker.create_topic(topic, w.partitions)
    started = time.perf_counter()
    keys = [f"key-{i:06d}".encode() for i in range(w.keys)]
    value = b"x" * 64
    for i in range(w.messages):
        broker.produce(topic, keys[(i * 7919) % w.keys], value)
    broker.flush_sync(timeout=max(60.0, broker.timeout))
    return topic, time.perf_counter() - started


def _bare_round(broker: KafkaBroker, topic: str, w: Workload) -> float:
    # The same librdkafka options as keylane's consumer, so the two differ
    # only by what runs on top of librdkafka.
    c = confluent_kafka.Consumer(consumer_config(broker, f"bench-bare-{uuid.uuid4().hex[:8]}"))
    c.subscribe([topic])
    started = time.perf_counter()
    seen = 0
    deadline = time.monotonic() + 600
    while seen < w.messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bare loop saw {seen} of {w.messages} messages in 600 s")
        for m in c.consume(1000, 1.0):
            if m.error() is None:
                seen += 1
    elapsed = time.perf_counter() - started
    c.close()
    return elapsed


def run(
    w: Workload,
    bootstrap: str,
    *,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda line: None,
) -> BareComparison:
    broker = KafkaBroker(bootstrap)
    topic, produce_s = prepare(broker, w)
    result = BareComparison(w, "Kafka", "bare confluent-kafka loop", produce_s)
    return alternate(
        result,
        broker,
        topic,
        lambda: _bare_round(broker, topic, w),
        rounds=rounds,
        progress=progress,
    )
