"""The broker a lab scenario runs on: the embedded MemoryBroker, or a real
one (``--broker kafka://HOST:PORT`` or ``redis://HOST:PORT``) for the
scenarios that support it."""

from __future__ import annotations

from typing import Any

import trio

from keylane.brokers.memory import MemoryBroker
from keylane.errors import ConfigError
from keylane.lab.ledger import Options


class LabBroker:
    def __init__(self, broker: Any, *, kafka: bool) -> None:
        self.broker = broker
        self.kafka = kafka

    def create_topic(self, topic: str, partitions: int) -> None:
        self.broker.create_topic(topic, partitions)

    def produce(self, topic: str, key: str, value: bytes, **kw: Any) -> Any:
        return self.broker.produce(topic, key, value, **kw)

    async def flush(self) -> None:
        await self.broker.flush()

    async def grow(self, topic: str, total: int) -> None:
        if self.kafka:
            await trio.to_thread.run_sync(self.broker.add_partitions, topic, total)
        else:
            self.broker.add_partitions(topic, total)

    def close(self) -> None:
        if not self.kafka:
            self.broker.close()


def open_broker(opts: Options, *, partitions: int, **memory_options: Any) -> LabBroker:
    """A fresh broker for one row (MemoryBroker), or the Kafka cluster."""
    if opts.broker == "memory":
        return LabBroker(MemoryBroker(partitions, **memory_options), kafka=False)
    # (Kafka: "range" is Kafka's range assignor; anything else keylane's
    # default, cooperative-sticky.)
    if opts.broker.startswith("redis://"):
        from keylane.bench.redis_streams import parse_url
        from keylane.brokers.redis_streams import RedisStreamsBroker

        # Producers re-read partition counts every second; members notice a
        # dead member within 3 s.
        options = {"metadata_max_age": 1.0, "lease_ms": 3000}
        return LabBroker(RedisStreamsBroker(parse_url(opts.broker), config=options), kafka=True)
    if opts.broker.startswith("kafka://"):
        from keylane.brokers.kafka import KafkaBroker

        config: dict[str, Any] = {
            # A growth must reach the group within the run, not after the
            # 5-minute default metadata refresh.
            "topic.metadata.refresh.interval.ms": 500,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
        if memory_options.get("assignor") == "range":
            config["partition.assignment.strategy"] = "range"
        return LabBroker(KafkaBroker(opts.broker[len("kafka://") :], config=config), kafka=True)
    raise ConfigError(
        f"--broker must be memory, kafka://HOST:PORT or redis://HOST:PORT, got {opts.broker!r}"
    )


def check_memory_only(opts: Options, scenario: str) -> None:
    if opts.broker != "memory":
        raise ConfigError(f"lab scenario {scenario} runs on the memory broker only")
