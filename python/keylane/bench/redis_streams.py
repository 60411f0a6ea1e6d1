"""`keylane bench --broker redis://HOST:PORT`: keylane on Redis Streams
against a bare redis-py loop that only reads (XREADGROUP) and
acknowledges (XACK).

The workload is produced once into a topic named after its shape (reused
while it holds exactly that many entries). Each round reads it as a new
consumer group, keylane and the bare loop alternating, each timed from its
start until the last entry is handled and acknowledged (keylane: committed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from keylane.bench.bare import BareComparison, alternate
from keylane.bench.workloads import Workload
from keylane.brokers.redis_streams import RedisStreamsBroker
from keylane.errors import ConfigError, UnknownTopic


def parse_url(url: str) -> str:
    """``redis://HOST:PORT[/DB]`` → a redis-py URL (database 0 by default)."""
    rest = url[len("redis://") :] if url.startswith("redis://") else ""
    if not rest.strip("/"):
        raise ConfigError(f"a Redis URL looks like redis://127.0.0.1:6399, got {url!r}")
    return url if "/" in rest.strip("/") else f"redis://{rest.strip('/')}/0"


def prepare(broker: RedisStreamsBroker, w: Workload) -> tuple[str, float | None]:
    topic = f"keylane-bench-{w.partitions}p-{w.messages}m-{w.keys}k"
    try:
        if _entries(broker, topic) == w.messages:
            return topic, None
        broker.delete_topic(topic)
    except UnknownTopic:
        pass
    broker.create_topic(topic, w.partitions)
    started = time.perf_counter()
    keys = [f"key-{i:06d}".encode() for i in range(w.keys)]
    value = b"x" * 64
    for i in range(w.messages):
        broker.produce(topic, keys[(i * 7919) % w.keys], value)
    broker.flush_sync()
    return topic, time.perf_counter() - started


def _entries(broker: RedisStreamsBroker, topic: str) -> int:
    n = broker.partitions(topic)
    return sum(int(broker.client.xlen(broker.keys.stream(topic, p))) for p in range(n))


def _bare_round(broker: RedisStreamsBroker, topic: str, w: Workload) -> float:
    r = broker.client
    group, me = f"bench-bare-{uuid.uuid4().hex[:8]}", "bare"
    streams = [broker.keys.stream(topic, p) for p in range(broker.partitions(topic))]
    for s in streams:
        r.xgroup_create(s, group, id="0")
    started = time.perf_counter()
    seen = 0
    deadline = time.monotonic() + 600
    while seen < w.messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bare loop saw {seen} of {w.messages} entries in 600 s")
        reply: Any = r.xreadgroup(group, me, dict.fromkeys(streams, ">"), count=1000, block=100)
        p = r.pipeline(transaction=False)
        for name, entries in reply or []:
            if entries:
                p.xack(name, group, *[sid for sid, _ in entries])
                seen += len(entries)
        p.execute()
    return time.perf_counter() - started


def run(
    w: Workload,
    url: str,
    *,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda line: None,
) -> BareComparison:
    broker = RedisStreamsBroker(url)
    topic, produce_s = prepare(broker, w)
    result = BareComparison(w, "Redis Streams", "bare redis-py XREADGROUP/XACK loop", produce_s)
    return alternate(
        result,
        broker,
        topic,
        lambda: _bare_round(broker, topic, w),
        rounds=rounds,
        progress=progress,
    )
