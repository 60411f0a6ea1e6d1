"""dlq-replay: some messages fail and go to the dead-letter topic while
later versions of the same keys are applied; then the dead letters are
replayed into the live topic, while live traffic goes on.

Each message sets its key's whole state to its version. Harm: stale
overwrites (an older version applied after a newer one: the state goes
back). Replaying slower spares live traffic's latency but not the state;
the version check drops what became stale."""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from keylane.brokers.memory import MemoryBroker
from keylane.lab.ledger import Ledger, Options, Row, key_name, value
from keylane.lab.members import Group, poll_until
from keylane.lab.target import check_memory_only
from keylane.message import Message
from keylane.retry import RetryPolicy

NAME = "dlq-replay"
DESCRIPTION = "failed messages replayed from the DLQ after newer versions: stale overwrites"
MESSAGES, KEYS, FAIL = 4_000, 400, 0.05
LIVE, LIVE_RATE = 1_000, 1_000.0
SETTINGS = (
    ("full-speed replay", None, False),
    ("rate-limited replay (200/s)", 200.0, False),
    ("full-speed replay + version check", None, True),
)


def run(opts: Options) -> list[Row]:
    check_memory_only(opts, NAME)
    return [_run(opts, *setting) for setting in SETTINGS]


def _run(opts: Options, setting: str, rate: float | None, versions: bool) -> Row:
    n = opts.messages or MESSAGES
    keys = opts.keys or KEYS
    rng = random.Random(opts.seed)
    broker = MemoryBroker(6)
    topic = f"lab-dlq-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, 6)
    produced: dict[int, int] = {}
    failing: set[tuple[int, int]] = set()

    def produce(k: int) -> None:
        seq = produced.get(k, 0)
        produced[k] = seq + 1
        broker.produce(topic, key_name(k), value(k, seq), {"version": str(seq + 1)})

    order = [rng.randrange(keys) for _ in range(n)]
    for k in order:
        if rng.random() < FAIL and produced.get(k, 0) < 1_000:
            failing.add((k, produced.get(k, 0)))
        produce(k)
    # Live traffic during the replay uses keys of its own.
    live_keys = range(keys, keys + max(1, keys // 4))
    latencies: list[float] = []

    def apply(msg: Message, k: int, seq: int) -> None:
        if (k, seq) in failing:
            failing.discard((k, seq))
            raise RuntimeError("lab: this delivery fails")
        if k >= keys:
            latencies.append(time.time() - msg.timestamp)

    tmp = tempfile.TemporaryDirectory()
    options: dict[str, Any] = {
        "concurrency": 16,
        "commit_interval": 0.1,
        "dlq": f"{topic}-dlq",
        "retry": RetryPolicy(max_attempts=1),
    }
    if versions:
        options["versions"] = Path(tmp.name) / "versions"
    ledger = Ledger()
    group = Group(broker, topic, "lab", 1, work=lambda r: r.uniform(0.0005, 0.002),
                  seed=opts.seed, ledger=ledger, apply=apply, **options)  # fmt: skip
    app = group.apps[0]
    failed = len(failing)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await group.start(nursery)
            await poll_until(
                lambda: app.stats()["dead_lettered"] >= failed and ledger.distinct >= n - failed,
                limit=120,
                what="the first pass",
            )
            started = time.perf_counter()
            async with trio.open_nursery() as traffic:
                traffic.start_soon(_live, broker, produce, live_keys)
                await app.replay_dlq(rate=rate if rate is not None else 1e9)
            await poll_until(lambda: _settled(app, ledger, n + LIVE), limit=120, what="the replay")
            seconds = time.perf_counter() - started
            group.stop()
        return seconds

    try:
        seconds = trio.run(main)
    finally:
        broker.close()
        tmp.cleanup()
    stale_dropped = int(app.stats()["stale_dropped"])
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
    return Row(
        scenario=NAME,
        setting=setting,
        protected=versions,
        harm=ledger.inversions,
        # Dropped as stale is accounted for: a newer version was applied.
        lost=ledger.lost(produced) - stale_dropped,
        throughput=round((failed + LIVE) / seconds, 1),
        extra={
            "dead_lettered": failed,
            "stale_overwrites": ledger.inversions,
            "stale_dropped": stale_dropped,
            "live_p99_ms": round(1000 * p99, 1),
        },
    )


async def _live(broker: MemoryBroker, produce: Any, live_keys: range) -> None:
    for i in range(LIVE):
        produce(live_keys[i % len(live_keys)])
        if i % 10 == 9:
            await trio.sleep(10 / LIVE_RATE)
    await broker.flush()


def _settled(app: Any, ledger: Ledger, total: int) -> bool:
    stats = app.stats()
    return bool(ledger.distinct + stats["stale_dropped"] >= total and stats["queued"] == 0)
