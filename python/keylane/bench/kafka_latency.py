"""`keylane bench --broker kafka://HOST:PORT --preset latency`: produce →
handler-start latency on Kafka at a steady produce rate.

A producer in another process (so it shares no GIL with the App) sends
records at ``rate`` per second for ``seconds``, each carrying the wall-clock
time of its ``produce`` call in a header; the App (ordering ``key``,
concurrency 256, no-op handler) records, at each handler start, how long ago
that was. Without ``rate`` the saturation throughput is measured first
(keylane over a backlog, as the throughput preset does) and half of it is
used. Producer linger (5 ms by default in keylane's producer) is part of
what is measured: it is part of what a service sees.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import trio

from keylane.app import App
from keylane.brokers.kafka import KafkaBroker
from keylane.message import Message

KEYS = 10_000
PARTITIONS = 12


@dataclasses.dataclass
class LatencyResult:
    rate: float
    seconds: float
    messages: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    saturation: float | None

    def summary(self) -> list[str]:
        lines = []
        if self.saturation is not None:
            lines.append(f"saturation (measured first): {self.saturation:,.0f} msg/s")
        lines.append(
            f"produce -> handler start at {self.rate:,.0f} msg/s for {self.seconds:g} s "
            f"({self.messages:,} messages): p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
            f"p99.9 {self.p999_ms:.2f} ms, max {self.max_ms:.2f} ms"
        )
        return lines


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def produce_paced(bootstrap: str, topic: str, rate: float, seconds: float) -> None:
    """Sends ``rate * seconds`` records, paced every millisecond."""
    broker = KafkaBroker(bootstrap)
    total = int(rate * seconds)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            broker.produce(
                topic, f"key-{sent % KEYS}", b"x" * 64, {"t": struct.pack("<d", time.time())}
            )
            sent += 1
        time.sleep(0.001)
    broker.flush_sync(timeout=60)


def run(
    bootstrap: str,
    *,
    rate: float | None,
    seconds: float = 10.0,
    saturation: Callable[[], float] | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> LatencyResult:
    measured = None
    if rate is None:
        assert saturation is not None
        measured = saturation()
        rate = measured / 2
        progress(f"saturation {measured:,.0f} msg/s; producing at half: {rate:,.0f} msg/s")
    broker = KafkaBroker(bootstrap)
    topic = f"keylane-latency-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, PARTITIONS)
    total = int(rate * seconds)
    latencies: list[float] = []
    app = App(broker, topics=[topic], group=f"latency-{uuid.uuid4().hex[:8]}", concurrency=256)
    all_handled = trio.Event()

    @app.handler
    async def record(msg: Message) -> None:
        (sent,) = struct.unpack("<d", msg.headers["t"])
        latencies.append(time.time() - sent)
        if len(latencies) >= total:
            all_handled.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            # The group is joined: start producing now.
            producer = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "keylane.bench.kafka_latency",
                    bootstrap,
                    topic,
                    str(rate),
                    str(seconds),
                ],
                stdin=subprocess.DEVNULL,
            )
            with trio.fail_after(seconds * 3 + 60):
                await all_handled.wait()
                await producer.wait()
            app.stop()

    trio.run(main)
    if len(latencies) < total:
        raise RuntimeError(f"handled {len(latencies)} of {total} messages")
    # The first second includes the group's first fetches: leave it out.
    steady = sorted(latencies[int(rate) :]) or sorted(latencies)
    return LatencyResult(
        rate=rate,
        seconds=seconds,
        messages=total,
        p50_ms=_quantile(steady, 0.5) * 1e3,
        p99_ms=_quantile(steady, 0.99) * 1e3,
        p999_ms=_quantile(steady, 0.999) * 1e3,
        max_ms=steady[-1] * 1e3,
        saturation=measured,
    )


if __name__ == "__main__":
    bootstrap_, topic_, rate_, seconds_ = sys.argv[1:5]
    produce_paced(bootstrap_, topic_, float(rate_), float(seconds_))
