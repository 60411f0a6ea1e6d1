"""`keylane bench`: keylane's runtime against the naive one, round by round.

Both consume the same messages (produced once into a MemoryBroker), each
round as a fresh consumer group, in alternating order. A run is timed from
the moment the consumer has joined (its first fetch follows at once) to the
return of the run, after its last commit.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio

from keylane._native import VersionTable
from keylane.app import App
from keylane.bench.naive import run_naive
from keylane.bench.workloads import TOPIC, Workload
from keylane.brokers.base import Broker
from keylane.brokers.memory import MemoryBroker
from keylane.message import Message

TARGET_MSG_PER_S = 300_000
# A task beside the App sleeps this long in a loop; how late it wakes is how
# long the event loop was held (issue #13's targets: p99 <= 2 ms, max <= 20 ms).
HEARTBEAT_S = 0.001
TARGET_LATE_P99_S = 0.002
TARGET_LATE_MAX_S = 0.020


@dataclasses.dataclass
class Result:
    workload: Workload
    produce_s: float
    keylane: list[float] = dataclasses.field(default_factory=list)
    naive: list[float] = dataclasses.field(default_factory=list)
    # Heartbeat lateness (seconds) over every keylane round.
    late: list[float] = dataclasses.field(default_factory=list)

    def rate(self, seconds: float) -> float:
        return self.workload.messages / seconds

    @property
    def keylane_rate(self) -> float:
        return self.rate(statistics.median(self.keylane))

    @property
    def naive_rate(self) -> float | None:
        return self.rate(statistics.median(self.naive)) if self.naive else None

    def lateness(self, q: float) -> float | None:
        """Quantile ``q`` (0..1; 1 is the max) of the heartbeat's lateness."""
        if not self.late:
            return None
        ordered = sorted(self.late)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def speedup(self) -> float | None:
        if not self.naive:
            return None
        return statistics.median(n / k for n, k in zip(self.naive, self.keylane, strict=True))


async def _timed(start: Callable[..., Awaitable[object]], late: list[float] | None = None) -> float:
    async with trio.open_nursery() as outer:
        if late is not None:
            outer.start_soon(_heartbeat, late)
        async with trio.open_nursery() as n:
            await n.start(start)
            began = time.perf_counter()
        elapsed = time.perf_counter() - began
        outer.cancel_scope.cancel()
    return elapsed


async def _heartbeat(late: list[float]) -> None:
    """What a service's other tasks (an HTTP endpoint, a heartbeat) see."""
    clock = time.perf_counter
    while True:
        due = clock() + HEARTBEAT_S
        await trio.sleep(HEARTBEAT_S)
        late.append(max(0.0, clock() - due))


def keylane_round(
    broker: Broker,
    w: Workload,
    group: str,
    topic: str = TOPIC,
    late: list[float] | None = None,
    versions: VersionTable | str | os.PathLike[str] | None = None,
    stats: dict[str, Any] | None = None,
    dedupe: bool = False,
    repartition: Literal["hold", "off"] | None = None,
) -> float:
    """One timed run of keylane over the workload as consumer group
    ``group``; with ``versions``, a version table there checks and records
    every message (its offset as its version: always new); with ``dedupe``
    too, every message's id (partition and offset: always new) is checked
    and recorded instead. ``repartition``: the App's option (default: the
    App's)."""
    app = App(
        broker,
        topics=[topic],
        group=group,
        ordering=w.ordering,  # type: ignore[arg-type]
        concurrency=w.concurrency,
        versions=versions,
        version_of=_offset_version if versions is not None and not dedupe else None,
        dedupe=dedupe or None,
        id_of=_offset_id if dedupe else None,
        repartition=repartition,
    )
    app.handler(w.handler())
    run = functools.partial(app.run, until_idle=True, handle_signals=False)
    elapsed = trio.run(_timed, run, late)
    if stats is not None:
        stats.update(app.stats())
    handled = app.stats()["handled"]
    if handled != w.messages:
        raise RuntimeError(f"keylane handled {handled} of {w.messages} messages")
    return elapsed


def _offset_version(msg: Message) -> int:
    return msg.offset


def _offset_id(msg: Message) -> str:
    return f"{msg.partition}:{msg.offset}"


def _naive_round(broker: MemoryBroker, w: Workload, group: str) -> float:
    run = functools.partial(
        run_naive,
        broker,
        TOPIC,
        group,
        w.handler(),
        concurrency=w.concurrency,
        ordering=w.ordering,
    )
    elapsed = trio.run(_timed, run)
    if sum(broker.committed(group).values()) != w.messages:
        raise RuntimeError("the naive runtime did not commit every message")
    return elapsed


def run(
    workload: Workload,
    *,
    rounds: int = 3,
    baseline: bool = True,
    freeze_gc: bool = True,
    heartbeat: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> Result:
    started = time.perf_counter()
    broker = workload.broker()
    result = Result(workload, time.perf_counter() - started)
    progress(f"produced {workload.messages:,} messages in {result.produce_s:.1f} s")
    # The produced messages live as long as the in-process broker; keep the
    # collector from walking them over and over (a broker in another
    # process would not cost that either). Both runtimes get the same.
    gc.collect()
    if freeze_gc:
        gc.freeze()
    try:
        for r in range(1, rounds + 1):
            late: list[float] | None = [] if heartbeat else None
            result.keylane.append(keylane_round(broker, workload, f"keylane-{r}", late=late))
            result.late.extend(late or ())
            line = f"round {r}: keylane {result.rate(result.keylane[-1]):,.0f} msg/s"
            if baseline:
                result.naive.append(_naive_round(broker, workload, f"naive-{r}"))
                line += (
                    f" | naive {result.rate(result.naive[-1]):,.0f} msg/s"
                    f" | {result.naive[-1] / result.keylane[-1]:.2f}x"
                )
            progress(line)
    finally:
        gc.unfreeze()
    return result
