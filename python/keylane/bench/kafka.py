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

import dataclasses
import statistics
import time
import uuid
from collections.abc import Callable

import confluent_kafka

from keylane.bench.runner import keylane_round
from keylane.bench.workloads import Workload
from keylane.brokers.kafka import KafkaBroker
from keylane.errors import ConfigError

# keylane with a no-op handler must reach this fraction of the bare loop.
TARGET_RATIO = 0.7


@dataclasses.dataclass
class KafkaResult:
    workload: Workload
    bootstrap: str
    produce_s: float | None
    keylane: list[float] = dataclasses.field(default_factory=list)
    bare: list[float] = dataclasses.field(default_factory=list)

    def rate(self, seconds: float) -> float:
        return self.workload.messages / seconds

    @property
    def keylane_rate(self) -> float:
        return self.rate(statistics.median(self.keylane))

    @property
    def bare_rate(self) -> float:
        return self.rate(statistics.median(self.bare))

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios keylane / bare (higher is better)."""
        return statistics.median(b / k for b, k in zip(self.bare, self.keylane, strict=True))

    def summary(self) -> list[str]:
        lines = [
            f"keylane on Kafka: {self.keylane_rate:,.0f} msg/s; bare confluent-kafka loop: "
            f"{self.bare_rate:,.0f} msg/s; keylane is {self.ratio:.2f}x the bare loop "
            f"(median of {len(self.keylane)} per-round ratios)"
        ]
        w = self.workload
        if not w.handler_sleep and w.ordering == "key":
            verdict = "PASS" if self.ratio >= TARGET_RATIO else "MISS"
            lines.append(f"target: >= {TARGET_RATIO}x the bare loop: {verdict}")
        return lines


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


def _bare_round(bootstrap: str, topic: str, w: Workload) -> float:
    c = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
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
) -> KafkaResult:
    broker = KafkaBroker(bootstrap)
    topic, produce_s = prepare(broker, w)
    if produce_s is None:
        progress(f"reusing topic {topic} ({w.messages:,} messages)")
    else:
        progress(f"produced {w.messages:,} messages to {topic} in {produce_s:.1f} s")
    result = KafkaResult(w, bootstrap, produce_s)
    for r in range(1, rounds + 1):
        result.keylane.append(
            keylane_round(broker, w, f"bench-keylane-{uuid.uuid4().hex[:8]}", topic)
        )
        result.bare.append(_bare_round(bootstrap, topic, w))
        progress(
            f"round {r}: keylane {result.rate(result.keylane[-1]):,.0f} msg/s | bare loop "
            f"{result.rate(result.bare[-1]):,.0f} msg/s | "
            f"{result.bare[-1] / result.keylane[-1]:.2f}x"
        )
    return result
