"""repartition: a keyed topic grows from 6 to 12 partitions mid-stream.

Several members consume with a backlog and bounded memory while production
goes on. At the growth, about half the keys hash to another partition; the
new partition's owner starts on their new records while the old partition,
owned by another member, still holds their older ones. Harm: a key's later
message applied before an earlier one (inversions), and one key running in
two members at once. Defence: ``App(repartition="hold")``."""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import trio

from keylane._native import repartition_moves
from keylane.lab.ledger import Ledger, Options, Row, key_name, value
from keylane.lab.members import Group
from keylane.lab.target import open_broker

NAME = "repartition"
DESCRIPTION = "a topic grows 6 -> 12 partitions mid-stream; moved keys race their own past"
BEFORE, AFTER = 6, 12
MESSAGES, KEYS, CONSUMERS = 18_000, 1_000, 4


def run(opts: Options) -> list[Row]:
    # Kafka's keylane default is cooperative-sticky; MemoryBroker has
    # round-robin and range. Range moves old partitions on a growth too.
    spread = "round-robin" if opts.broker == "memory" else "cooperative-sticky"
    return [
        _run(opts, "off", spread),
        _run(opts, "hold", spread),
        _run(opts, "hold", "range"),
    ]


def _run(opts: Options, mode: str, assignor: str) -> Row:
    n = opts.messages or MESSAGES
    keys = opts.keys or KEYS
    members = opts.consumers or CONSUMERS
    rng = random.Random(opts.seed)
    broker = open_broker(opts, partitions=BEFORE, assignor=assignor)
    topic = f"lab-repartition-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, BEFORE)
    produced: dict[int, int] = {}
    order = [rng.randrange(keys) for _ in range(n)]

    sent = 0

    def produce(count: int) -> None:
        nonlocal sent
        for k in order[sent : sent + count]:
            seq = produced.get(k, 0)
            produced[k] = seq + 1
            broker.produce(topic, key_name(k), value(k, seq))
        sent += count

    ledger = Ledger()
    group = Group(
        broker.broker,
        topic,
        f"lab-{uuid.uuid4().hex[:8]}",
        members,
        work=lambda r: r.uniform(0.002, 0.008),
        seed=opts.seed,
        ledger=ledger,
        ordering="key",
        repartition=mode,
        concurrency=8,
        capacity=1_000,
        fetch_max=250,
        commit_interval=0.2,
        shutdown_timeout=10,
        # The lab's Kafka clients refresh metadata every 0.5 s.
        repartition_grace=1.0 if broker.kafka else None,
    )
    grown_at: list[float] = []

    async def main() -> float:
        backlog = n // 3
        produce(backlog)
        await broker.flush()
        async with trio.open_nursery() as nursery:
            await group.start(nursery)
            # The rest in steps at about the group's pace, the topic growing
            # half way through (while handlers run and the backlog waits).
            steps = 40
            rest = n - backlog
            for i in range(steps):
                produce(rest // steps + (1 if i < rest % steps else 0))
                await broker.flush()
                if i == steps // 2:
                    await broker.grow(topic, AFTER)
                    grown_at.append(time.perf_counter())
                await trio.sleep(0.05)
            seconds = await group.wait_applied(n, limit=120)
            group.stop()
        return seconds

    try:
        seconds = trio.run(main)
    finally:
        broker.close()
    waits = group.histograms("repartition_wait")
    held = sum(h.count for h in waits)
    wait_sum = sum(h.sum for h in waits)
    wait_max = max((h.max for h in waits), default=0.0)
    extra: dict[str, Any] = {
        "assignor": assignor,
        "inversions": ledger.inversions,
        "concurrent_runs": ledger.overlaps,
        "duplicates": ledger.duplicates,
        "moved_keys": round(
            repartition_moves([key_name(k) for k in range(keys)], BEFORE, AFTER), 3
        ),
        "held": held,
        "hold_mean_ms": round(1000 * wait_sum / held, 1) if held else 0.0,
        "hold_max_ms": round(1000 * wait_max, 1),
        "seconds": round(seconds, 2),
    }
    return Row(
        scenario=NAME,
        setting=f"repartition={mode}, {assignor}",
        protected=mode == "hold",
        harm=ledger.inversions + ledger.overlaps,
        lost=ledger.lost(produced),
        throughput=round(n / seconds, 1),
        extra=extra,
    )
