"""One cell of the ordering-model comparison, run for real: its messages
produced into a fresh topic, then consumed by an ``App`` with the cell's
ordering model whose handler does the message's work and checks order.

What each figure means:

- ``seconds``: first handler start to the end of ``run`` (its final commit
  included; a real broker's group join is not).
- latency ``p50/p99/p99.9``: produce call → handler end. Every message is
  produced just before the run (a backlog), so this is how long the model
  makes messages wait, plus their work.
- ``dispatch_p99``: record fetched from the broker → its handler starts.
- ``order_violations``: handler ends whose sequence number (carried in the
  message) is below one already ended for the same key. The check is the
  handler's own, independent of the dispatcher: for ``none`` the count is
  the harm of having no order.
- ``key_overlaps``: handler starts while another message of the same key
  was running.
- ``peak_rss_mb``: the highest resident set size sampled (every 20 ms)
  during the run.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import struct
import sys
import time
import uuid
from typing import Any

import trio

from keylane.app import App
from keylane.bench.models import CellSpec, Work, draw, ideal_throughput, key_name
from keylane.bench.sleep import sleep
from keylane.bench.targets import Stamped, Target
from keylane.message import Message

_VALUE = struct.Struct("<IIdd")  # key index, sequence in key, work seconds, produced at
RSS_EVERY_S = 0.02


@dataclasses.dataclass
class CellResult:
    model: str
    keys: int
    latency_ms: float
    distribution: str
    concurrency: int
    partitions: int
    messages: int
    skew: float
    seed: int
    seconds: float
    throughput: float
    ideal_throughput: float | None
    p50_ms: float
    p99_ms: float
    p999_ms: float
    dispatch_p99_ms: float
    max_in_flight: int
    peak_rss_mb: float
    order_violations: int
    key_overlaps: int
    broker: str = "memory"
    preset: str = "models"
    published_s: float | None = None
    # Latency (produce → handled) at every percent, 0 to 100: for CDF plots.
    cdf_ms: list[float] = dataclasses.field(default_factory=list)
    # With --repeat: every run's throughput (the cell is the median run).
    round_throughputs: list[float] = dataclasses.field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        """Share of the ideal throughput reached."""
        if self.ideal_throughput is None:
            return None
        return self.throughput / self.ideal_throughput

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fraction_of_ideal": self.fraction}


def quantile(ordered: list[float], q: float) -> float:
    """``q`` (0..1) of an already sorted list; 0.0 if empty."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb() -> float:
    """This process's resident set size now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Probe:
    """The instrumented handler and what it measured."""

    def __init__(self, keys: int) -> None:
        self.fetched: dict[tuple[int, int], float] = {}
        self.first: float | None = None
        self.latencies: list[float] = []
        self.dispatch: list[float] = []
        self.running = [0] * keys
        self.done_max = [-1] * keys
        self.in_flight = 0
        self.max_in_flight = 0
        self.violations = 0
        self.overlaps = 0
        self.peak_rss = 0.0

    async def handle(self, msg: Message) -> None:
        clock = time.perf_counter
        now = clock()
        if self.first is None:
            self.first = now
        key, seq, work, produced = _VALUE.unpack(msg.value)
        fetched = self.fetched.pop((msg.partition, msg.offset), None)
        if fetched is not None:
            self.dispatch.append(now - fetched)
        if self.running[key]:
            self.overlaps += 1
        self.running[key] += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            if work:
                await sleep(work)
        finally:
            self.in_flight -= 1
            self.running[key] -= 1
        if seq < self.done_max[key]:
            self.violations += 1
        else:
            self.done_max[key] = seq
        self.latencies.append(clock() - produced)

    async def sample_rss(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, rss_mb())
            await trio.sleep(RSS_EVERY_S)


def produce(target: Target, spec: CellSpec, work: Work) -> tuple[Any, str]:
    broker, topic = target.fresh(spec.partitions)
    names = [key_name(i) for i in range(spec.keys)]
    pack = _VALUE.pack
    clock = time.perf_counter
    send = broker.produce
    for key, seq, seconds in zip(work.keys, work.seqs, work.seconds, strict=True):
        send(topic, names[key], pack(key, seq, seconds, clock()))
    target.flush(broker)
    return broker, topic


def run_cell(target: Target, spec: CellSpec, *, preset: str = "models") -> CellResult:
    """Runs one cell; raises ``RuntimeError`` if any message was not handled."""
    work = draw(spec)
    broker, topic = produce(target, spec, work)
    probe = Probe(spec.keys)
    app = App(
        Stamped(broker, probe.fetched),
        topics=[topic],
        group=f"bench-{uuid.uuid4().hex[:12]}",
        ordering=spec.model,  # type: ignore[arg-type]
        concurrency=spec.concurrency,
    )
    app.handler(probe.handle)
    gc.collect()
    gc.freeze()  # the produced records stay out of the collector's walks
    try:
        ended = trio.run(_run, app, probe)
    finally:
        gc.unfreeze()
    handled = app.stats()["handled"]
    if handled != spec.messages or probe.first is None:
        raise RuntimeError(f"{spec.model} cell handled {handled} of {spec.messages} messages")
    seconds = ended - probe.first
    lat = sorted(probe.latencies)
    dispatch = sorted(probe.dispatch)
    return CellResult(
        model=spec.model,
        keys=spec.keys,
        latency_ms=spec.latency_ms,
        distribution=spec.distribution,
        concurrency=spec.concurrency,
        partitions=spec.partitions,
        messages=spec.messages,
        skew=spec.skew,
        seed=spec.seed,
        seconds=seconds,
        throughput=spec.messages / seconds,
        ideal_throughput=ideal_throughput(spec, work),
        p50_ms=quantile(lat, 0.5) * 1e3,
        p99_ms=quantile(lat, 0.99) * 1e3,
        p999_ms=quantile(lat, 0.999) * 1e3,
        dispatch_p99_ms=quantile(dispatch, 0.99) * 1e3,
        max_in_flight=probe.max_in_flight,
        peak_rss_mb=probe.peak_rss,
        order_violations=probe.violations,
        key_overlaps=probe.overlaps,
        broker=target.name,
        preset=preset,
        cdf_ms=[round(quantile(lat, i / 100) * 1e3, 3) for i in range(101)],
    )


async def _run(app: App, probe: Probe) -> float:
    async with trio.open_nursery() as outer:
        outer.start_soon(probe.sample_rss)
        await app.run(until_idle=True, handle_signals=False)
        ended = time.perf_counter()
        outer.cancel_scope.cancel()
    return ended
