"""`keylane bench --preset parallel-consumer`: the workload of the Confluent
Parallel Consumer README, on any broker keylane has an adapter for.

10,000 messages on one partition, each handler sleeping a uniform 0-5 ms
(the durations are drawn once, with a fixed seed, and carried in the
messages, so the bound and the run use the same work), concurrency 100.
Rows: partition order; key order with 1, 2, 5, 10, 20, 100, 1,000 and 10,000
keys; unordered. Each row's bound is computed from the same durations: the
larger of total work / concurrency and the longest serial chain the model
imposes (the busiest key; the whole partition for partition order). A row
is timed from its first handler start to the end of the run (final commit
included; a real broker's group join is not).

Published seconds (Confluent Parallel Consumer README; their machine, their
client, Kafka): PARTITION 22.221; KEY 1 → 26.743, 2 → 13.576, 5 → 5.916,
10 → 3.310, 20 → 2.242, 100 → 2.178, 1,000 → 2.056, 10,000 → 2.128;
UNORDERED 2.829.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import trio

from keylane.app import App
from keylane.brokers.base import Broker
from keylane.message import Message

MESSAGES = 10_000
CONCURRENCY = 100
MAX_WORK_S = 0.005
DESCRIPTION = (
    f"{MESSAGES:,} messages on one partition, handlers sleeping uniform 0-5 ms, "
    f"concurrency {CONCURRENCY}; partition order, key order over 1-10,000 keys, unordered"
)
# Target: every row within this factor of its bound.
TARGET_RATIO = 1.25

# (model, keys) → published seconds.
PUBLISHED: dict[tuple[str, int], float] = {
    ("partition", MESSAGES): 22.221,
    ("key", 1): 26.743,
    ("key", 2): 13.576,
    ("key", 5): 5.916,
    ("key", 10): 3.310,
    ("key", 20): 2.242,
    ("key", 100): 2.178,
    ("key", 1000): 2.056,
    ("key", 10_000): 2.128,
    ("none", MESSAGES): 2.829,
}
ROWS: list[tuple[str, int]] = list(PUBLISHED)


@dataclasses.dataclass
class Row:
    model: str
    keys: int
    seconds: float
    bound_s: float
    published_s: float

    @property
    def ratio(self) -> float:
        return self.seconds / self.bound_s

    @property
    def verdict(self) -> str:
        return "PASS" if self.ratio <= TARGET_RATIO else "MISS"


def work(seed: int = 1, messages: int = MESSAGES) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, MAX_WORK_S) for _ in range(messages)]


def bound(model: str, keys: int, durations: list[float]) -> float:
    total = sum(durations)
    if model == "partition":
        return total  # one partition: one message at a time
    spread = total / CONCURRENCY
    if model == "none":
        return max(spread, max(durations))
    per_key: dict[int, float] = defaultdict(float)
    for i, d in enumerate(durations):
        per_key[i % keys] += d
    return max(spread, max(per_key.values()))


def run_row(
    broker: Broker,
    create_topic: Callable[[str, int], None],
    flush: Callable[[], None],
    model: str,
    keys: int,
    durations: list[float],
) -> Row:
    topic = f"pc-{model}-{keys}-{uuid.uuid4().hex[:8]}"
    create_topic(topic, 1)
    for i, d in enumerate(durations):
        broker.produce(topic, key=f"k{i % keys}", value=struct.pack("<d", d))
    flush()
    app = App(
        broker,
        topics=[topic],
        group=f"pc-{uuid.uuid4().hex[:8]}",
        ordering=model,  # type: ignore[arg-type]
        concurrency=CONCURRENCY,
    )
    first: list[float] = []

    # Timed from the first handler start (a real broker's group join is not
    # part of the work) to the end of the run, its final commit included.
    @app.handler
    async def sleep_for(msg: Message) -> None:
        if not first:
            first.append(time.perf_counter())
        (seconds,) = struct.unpack("<d", msg.value)
        await trio.sleep(seconds)

    trio.run(functools.partial(app.run, until_idle=True, handle_signals=False))
    elapsed = time.perf_counter() - first[0]
    if app.stats()["handled"] != len(durations):
        raise RuntimeError(f"handled {app.stats()['handled']} of {len(durations)}")
    published = PUBLISHED.get((model, keys), float("nan"))
    return Row(model, keys, elapsed, bound(model, keys, durations), published)


def run(
    broker: Broker,
    create_topic: Callable[[str, int], None],
    flush: Callable[[], None],
    *,
    progress: Callable[[str], None] = lambda line: None,
) -> list[Row]:
    durations = work()
    rows = []
    for model, keys in ROWS:
        started = time.perf_counter()
        row = run_row(broker, create_topic, flush, model, keys, durations)
        rows.append(row)
        progress(
            f"{model:9} keys={keys:>6,}: {row.seconds:6.3f} s, bound {row.bound_s:6.3f} s "
            f"({row.ratio:.2f}x, {row.verdict}); published {row.published_s:6.3f} s "
            f"[{time.perf_counter() - started:.1f} s with producing]"
        )
    return rows
