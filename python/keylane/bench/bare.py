"""keylane on a real broker against a bare client loop that only receives
and acknowledges: the result every adapter's throughput benchmark shares."""

from __future__ import annotations

import dataclasses
import statistics
import uuid
from collections.abc import Callable

from keylane.bench.runner import keylane_round
from keylane.bench.workloads import Workload
from keylane.brokers.base import Broker

# keylane with a no-op handler must reach this fraction of the bare loop.
TARGET_RATIO = 0.7


@dataclasses.dataclass
class BareComparison:
    """Per round, seconds for keylane and for the bare loop (alternating)."""

    workload: Workload
    label: str
    bare_name: str
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

    def round_line(self, n: int) -> str:
        k, b = self.keylane[-1], self.bare[-1]
        return (
            f"round {n}: keylane {self.rate(k):,.0f} msg/s | bare loop {self.rate(b):,.0f} "
            f"msg/s | {b / k:.2f}x"
        )

    def summary(self) -> list[str]:
        lines = [
            f"keylane on {self.label}: {self.keylane_rate:,.0f} msg/s; {self.bare_name}: "
            f"{self.bare_rate:,.0f} msg/s; keylane is {self.ratio:.2f}x the bare loop "
            f"(median of {len(self.keylane)} per-round ratios)"
        ]
        w = self.workload
        if not w.handler_sleep and w.ordering == "key":
            verdict = "PASS" if self.ratio >= TARGET_RATIO else "MISS"
            lines.append(f"target: >= {TARGET_RATIO}x the bare loop: {verdict}")
        return lines


def alternate(
    result: BareComparison,
    broker: Broker,
    topic: str,
    bare_round: Callable[[], float],
    *,
    rounds: int,
    progress: Callable[[str], None],
) -> BareComparison:
    """Rounds of keylane (a new consumer group each) and the bare loop, in
    turn, over a topic that keeps its records (Kafka, Redis)."""
    w = result.workload
    if result.produce_s is None:
        progress(f"reusing topic {topic} ({w.messages:,} records)")
    else:
        progress(f"produced {w.messages:,} records to {topic} in {result.produce_s:.1f} s")
    for r in range(1, rounds + 1):
        result.keylane.append(
            keylane_round(broker, w, f"bench-keylane-{uuid.uuid4().hex[:8]}", topic)
        )
        result.bare.append(bare_round())
        progress(result.round_line(r))
    return result
