"""What `keylane bench` runs: messages produced into a MemoryBroker, and the
handlers that consume them."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from keylane.bench.sleep import sleep
from keylane.brokers.memory import MemoryBroker
from keylane.errors import ConfigError
from keylane.message import Message

TOPIC = "bench"


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    messages: int = 1_000_000
    keys: int = 10_000
    partitions: int = 12
    ordering: str = "key"
    concurrency: int = 256
    # Seconds each handler sleeps; 0 is a no-op handler that never suspends.
    handler_sleep: float = 0.0

    def __post_init__(self) -> None:
        for name in ("messages", "keys", "partitions", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.handler_sleep < 0:
            raise ConfigError(f"handler_sleep must be >= 0, got {self.handler_sleep}")

    def describe(self) -> str:
        handler = (
            "no-op handler"
            if not self.handler_sleep
            else f"handler sleeping {self.handler_sleep * 1e3:g} ms"
        )
        return (
            f"{self.messages:,} messages, {self.keys:,} keys, {self.partitions} partitions, "
            f"ordering={self.ordering}, concurrency={self.concurrency}, {handler}"
        )

    def broker(self) -> MemoryBroker:
        """A MemoryBroker holding the workload's messages (produced once;
        every round consumes them as a new consumer group)."""
        broker = MemoryBroker(partitions=self.partitions)
        keys = [f"key-{i:06d}".encode() for i in range(self.keys)]
        value = b"x" * 64
        produce = broker.produce
        for i in range(self.messages):
            # A multiplicative stride spreads consecutive messages over keys.
            produce(TOPIC, keys[(i * 7919) % self.keys], value)
        return broker

    def handler(self) -> Callable[[Message], Awaitable[None]]:
        if not self.handler_sleep:

            async def noop(msg: Message) -> None:
                return None

            return noop
        delay = self.handler_sleep

        async def sleeper(msg: Message) -> None:
            await sleep(delay)

        return sleeper
