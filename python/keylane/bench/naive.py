"""A naive pure-Python runtime: what a team writes before keylane.

The usual first design for per-key order in async Python: one task and one
memory channel per key (so a key's messages run one after another), a
``CapacityLimiter`` for overall concurrency, a semaphore for backpressure,
and per partition a deque of fetched offsets plus a set of finished ones for
the commit watermark. It keeps the same guarantees as keylane's runtime on this
workload (per-key order, commits only below unfinished messages) and is the
in-run baseline of ``keylane bench``.

It runs the same ordering model as what it is compared with: a lane per
key (``"key"``; key-less messages get one each), per partition
(``"partition"``), one lane for everything (``"total"``), or a lane per
message (``"none"``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from keylane.brokers.base import Broker, TopicPartition
from keylane.errors import ConfigError
from keylane.message import Message


async def run_naive(
    broker: Broker,
    topic: str,
    group: str,
    handler: Callable[[Message], Awaitable[None]],
    *,
    concurrency: int,
    ordering: str = "key",
    capacity: int = 100_000,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consumes ``topic`` until everything is handled and committed."""
    consumer = broker.consumer(group, [topic])
    await consumer.join()
    limiter = trio.CapacityLimiter(concurrency)
    room = trio.Semaphore(capacity)
    lane_of = _LANE_OF.get(ordering)
    if lane_of is None:
        raise ConfigError(f"ordering must be one of {', '.join(_LANE_OF)}; got {ordering!r}")
    lanes: dict[object, trio.MemorySendChannel[Message]] = {}
    fetched: dict[TopicPartition, deque[int]] = {}
    finished: dict[TopicPartition, set[int]] = {}
    last: dict[TopicPartition, int] = {}

    def done(msg: Message) -> None:
        finished[TopicPartition(msg.topic, msg.partition)].add(msg.offset)
        room.release()

    def watermark(tp: TopicPartition) -> int:
        offsets, ok = fetched[tp], finished[tp]
        while offsets and offsets[0] in ok:
            ok.discard(offsets.popleft())
        return offsets[0] if offsets else last[tp] + 1

    async def key_task(receive: trio.MemoryReceiveChannel[Message]) -> None:
        async with receive:
            async for msg in receive:
                async with limiter:
                    await handler(msg)
                done(msg)

    async def commit() -> None:
        marks = {tp: watermark(tp) for tp in fetched}
        if marks:
            await consumer.commit(marks)

    async def committer() -> None:
        while True:
            await trio.sleep(1.0)
            await commit()

    async with trio.open_nursery() as top:
        top.start_soon(committer)
        async with trio.open_nursery() as keys:
            task_status.started()
            while True:
                fetch = await consumer.fetch(4096, 0.05)
                for tp, records in fetch.chunks:
                    offsets = fetched.setdefault(tp, deque())
                    finished.setdefault(tp, set())
                    for msg in records:
                        try:
                            room.acquire_nowait()
                        except trio.WouldBlock:
                            await room.acquire()
                        offsets.append(msg.offset)
                        last[tp] = msg.offset
                        lane_id = lane_of(msg)
                        lane = lanes.get(lane_id)
                        if lane is None:
                            send, receive = trio.open_memory_channel[Message](capacity)
                            lane = send
                            if lane_id is not None:
                                lanes[lane_id] = send
                            keys.start_soon(key_task, receive)
                        lane.send_nowait(msg)
                        if lane_id is None:
                            lane.close()
                if not fetch.chunks and fetch.at_end and fetch.settled and room.value == capacity:
                    break
            for lane in lanes.values():
                await lane.aclose()
        await commit()
        top.cancel_scope.cancel()
    await consumer.close()


def _unique(msg: Message) -> None:
    return None


_LANE_OF: dict[str, Callable[[Message], object]] = {
    "key": lambda msg: msg.key,
    "partition": lambda msg: msg.partition,
    "total": lambda msg: 0,
    "none": _unique,
}
