"""`keylane bench --preset latency` on the memory broker: open-loop load.

Messages arrive at a fixed mean rate, with exponential gaps (Poisson), while
the App runs: a producer task on the App's own Trio loop (the memory broker
lives in this process) produces every message whose arrival time has come,
stamped with the time of its ``produce`` call. Produced records are moved
out of the cyclic GC's sight every 1,000 (``gc.freeze``), as the backlog
runs do once: they are the in-process broker's, not the App's.

Per model, the saturation throughput is measured first, then the load runs
at 10%, 50% and 90% of it. Saturation is measured as the load is run: an
open-loop producer at 1.5x a first estimate (taken with a standing backlog
of 2,000 messages), counting what the App handled in two seconds — so the
producer's own share of the loop is in it, as it is under load.

Reported per load: dispatch latency (fetched → handler start) and
end-to-end latency (produced → handler end), p50/p99/p99.9.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import random
import struct
import time
import uuid
from collections.abc import Callable, Sequence

import trio
import trio.lowlevel

from keylane.app import App
from keylane.bench.cell import quantile
from keylane.bench.models import durations, key_name
from keylane.bench.sleep import sleep
from keylane.bench.targets import Stamped
from keylane.brokers.memory import MemoryBroker
from keylane.message import Message

LOADS = (0.1, 0.5, 0.9)
SATURATION_S = 2.0
# Target (issue #10): per-key order, dispatch p99 <= 1 ms at 50% load with a
# no-op handler.
TARGET_DISPATCH_P99_MS = 1.0
_VALUE = struct.Struct("<Idd")  # key index, work seconds, produced at
_DRAIN_S = 30.0
FREEZE_EVERY = 1_000
FLAT_OUT_BACKLOG = 2_000


@dataclasses.dataclass
class LoadResult:
    model: str
    keys: int
    latency_ms: float
    distribution: str
    concurrency: int
    partitions: int
    load: float
    rate: float
    saturation: float
    seconds: float
    messages: int
    throughput: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    dispatch_p50_ms: float
    dispatch_p99_ms: float
    dispatch_p999_ms: float
    broker: str = "memory"
    preset: str = "latency"

    @property
    def verdict(self) -> str | None:
        """PASS/MISS for the cell the target names, else ``None``."""
        if self.model != "key" or self.load != 0.5 or self.latency_ms != 0:
            return None
        return "PASS" if self.dispatch_p99_ms <= TARGET_DISPATCH_P99_MS else "MISS"


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    model: str = "key"
    keys: int = 10_000
    latency_ms: float = 0.0
    distribution: str = "fixed"
    concurrency: int = 256
    partitions: int = 12
    seconds: float = 5.0
    seed: int = 1


class _Recorder:
    def __init__(self) -> None:
        self.fetched: dict[tuple[int, int], float] = {}
        self.dispatch: list[float] = []
        self.latency: list[float] = []
        # Set once ``expect`` messages were handled.
        self.expect: int | None = None
        self.drained = trio.Event()

    async def handle(self, msg: Message) -> None:
        clock = time.perf_counter
        now = clock()
        _, work, produced = _VALUE.unpack(msg.value)
        fetched = self.fetched.pop((msg.partition, msg.offset), None)
        if fetched is not None:
            self.dispatch.append(now - fetched)
        if work:
            await sleep(work)
        self.latency.append(clock() - produced)
        if self.expect is not None and len(self.latency) >= self.expect:
            self.drained.set()


async def _drive(
    spec: LoadSpec, rate: float | None, seconds: float, drain: bool = True
) -> tuple[int, float, _Recorder]:
    """Runs an App while producing at ``rate`` (``None``: flat out) for
    ``seconds``; returns (messages handled, seconds, recorder). Flat out or
    without ``drain``, the count is what was handled by the deadline;
    otherwise every produced
    message is waited for (bounded)."""
    broker = MemoryBroker(partitions=spec.partitions)
    broker.create_topic("load", spec.partitions)
    rec = _Recorder()
    app = App(
        Stamped(broker, rec.fetched),
        topics=["load"],
        group=f"load-{uuid.uuid4().hex[:8]}",
        ordering=spec.model,  # type: ignore[arg-type]
        concurrency=spec.concurrency,
    )
    app.handler(rec.handle)
    rng = random.Random(spec.seed)
    names = [key_name(i) for i in range(spec.keys)]
    mean = spec.latency_ms / 1e3
    pack = _VALUE.pack
    clock = time.perf_counter
    produced = frozen = 0
    gc.collect()
    async with trio.open_nursery() as n:
        await n.start(functools.partial(app.run, handle_signals=False))
        started = clock()
        end = started + seconds
        due = started
        while (now := clock()) < end:
            if rate is None:
                # Flat out, but keeping only a standing backlog: producing
                # more per turn would make each scheduler cycle longer and
                # starve the models that hand out one message per cycle.
                batch = 64 if produced - len(rec.latency) < FLAT_OUT_BACKLOG else 0
            else:
                batch = 0
                while due <= now:
                    batch += 1
                    due += rng.expovariate(rate)
            works = durations(spec.distribution, mean, batch, rng)
            for work in works:
                key = (produced * 7919) % spec.keys
                broker.produce("load", names[key], pack(key, work, clock()))
                produced += 1
            if produced >= frozen + FREEZE_EVERY:
                # The in-process broker keeps every record; keep the cyclic
                # GC from walking them again and again (a broker in another
                # process would not cost that). Refcounting still frees
                # what the App drops.
                gc.freeze()
                frozen = produced
            if rate is None:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(max(0.0, min(due, end) - clock()))
        if rate is None or not drain:
            handled = len(rec.latency)
            elapsed = clock() - started
        else:
            rec.expect = produced
            if len(rec.latency) >= produced:
                rec.drained.set()
            with trio.fail_after(_DRAIN_S):
                await rec.drained.wait()
            handled = produced
            elapsed = seconds
        n.cancel_scope.cancel()
    gc.unfreeze()
    return handled, elapsed, rec


def saturation(spec: LoadSpec) -> float:
    """What the App handles per second when messages arrive faster than
    that, the producer working as it does under load: a first estimate
    with a standing backlog, then an open-loop run at 1.5x it, counting
    what was handled by the deadline."""
    handled, elapsed, _ = trio.run(_drive, spec, None, 1.0)
    estimate = handled / elapsed
    handled, elapsed, _ = trio.run(_drive, spec, 1.5 * estimate, SATURATION_S, False)
    return handled / elapsed


def run_load(spec: LoadSpec, load: float, saturated: float) -> LoadResult:
    rate = load * saturated
    handled, elapsed, rec = trio.run(_drive, spec, rate, spec.seconds)
    lat = sorted(rec.latency)
    disp = sorted(rec.dispatch)
    return LoadResult(
        model=spec.model,
        keys=spec.keys,
        latency_ms=spec.latency_ms,
        distribution=spec.distribution,
        concurrency=spec.concurrency,
        partitions=spec.partitions,
        load=load,
        rate=rate,
        saturation=saturated,
        seconds=elapsed,
        messages=handled,
        throughput=handled / elapsed,
        p50_ms=quantile(lat, 0.5) * 1e3,
        p99_ms=quantile(lat, 0.99) * 1e3,
        p999_ms=quantile(lat, 0.999) * 1e3,
        dispatch_p50_ms=quantile(disp, 0.5) * 1e3,
        dispatch_p99_ms=quantile(disp, 0.99) * 1e3,
        dispatch_p999_ms=quantile(disp, 0.999) * 1e3,
    )


def run(
    specs: Sequence[LoadSpec],
    loads: Sequence[float] = LOADS,
    *,
    progress: Callable[[str, int, int], None] = lambda label, done, total: None,
) -> list[LoadResult]:
    total = len(specs) * (1 + len(loads))
    done = 0
    out = []
    for spec in specs:
        progress(f"{spec.model} order: saturation", done, total)
        saturated = saturation(spec)
        done += 1
        if not math.isfinite(saturated) or saturated <= 0:
            raise RuntimeError(f"{spec.model}: nothing was handled while saturating")
        for load in loads:
            progress(f"{spec.model} order at {load:.0%} of {saturated:,.0f} msg/s", done, total)
            out.append(run_load(spec, load, saturated))
            done += 1
    progress("done", total, total)
    return out
