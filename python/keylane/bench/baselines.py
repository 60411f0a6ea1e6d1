"""Pure-Python baselines that the native code is measured (and tested) against.

These are deliberately the straightforward versions a team would write or
copy before reaching for keylane; they are correct, not tuned.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import Any

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995


def murmur2_py(data: bytes) -> int:
    """Kafka's murmur2 in plain Python, returning the Java ``int`` value."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length & ~3
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key_py(key: bytes, num_partitions: int) -> int:
    """The Java producer's partition for a non-null key, in plain Python."""
    return (murmur2_py(key) & 0x7FFFFFFF) % num_partitions


class PyKeyDispatcher:
    """Per-key dispatch in plain Python: a dict of deques, a ready queue of
    keys, and per-partition sorted lists of outstanding offsets.

    Tickets are the pushed ``(key, partition, offset, item)`` tuples.
    """

    def __init__(self, max_in_flight: int = 1 << 30) -> None:
        self.max_in_flight = max_in_flight
        self.lanes: dict[object, deque[tuple[Any, int, int, Any]]] = {}
        self.busy: set[object] = set()
        self.scheduled: set[object] = set()
        self.ready: deque[object] = deque()
        self.outstanding: dict[int, list[int]] = {}
        self.last_pushed: dict[int, int] = {}
        self.in_flight = 0

    def push_many(self, entries: Iterable[tuple[Any, int, int, Any]]) -> int:
        n = 0
        for entry in entries:
            key, partition, offset, _ = entry
            if offset <= self.last_pushed.get(partition, -1):
                raise ValueError(f"offset {offset} is not increasing on partition {partition}")
            self.last_pushed[partition] = offset
            # Offsets arrive in increasing order, so appending keeps it sorted.
            self.outstanding.setdefault(partition, []).append(offset)
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = deque()
            lane.append(entry)
            if key not in self.busy and key not in self.scheduled:
                self.scheduled.add(key)
                self.ready.append(key)
            n += 1
        return n

    def pop_ready(self, max_items: int) -> list[tuple[Any, int, int, Any]]:
        out: list[tuple[Any, int, int, Any]] = []
        limit = min(max_items, self.max_in_flight - self.in_flight)
        while len(out) < limit and self.ready:
            key = self.ready.popleft()
            self.scheduled.discard(key)
            out.append(self.lanes[key].popleft())
            self.busy.add(key)
        self.in_flight += len(out)
        return out

    def complete_many(self, tickets: Iterable[tuple[Any, int, int, Any]]) -> int:
        n = 0
        for key, partition, offset, _ in tickets:
            offsets = self.outstanding[partition]
            del offsets[bisect_left(offsets, offset)]
            self.busy.discard(key)
            lane = self.lanes[key]
            if lane:
                self.scheduled.add(key)
                self.ready.append(key)
            else:
                del self.lanes[key]
            n += 1
        self.in_flight -= n
        return n

    def committable(self) -> dict[int, int]:
        return {
            p: (offsets[0] if offsets else self.last_pushed[p] + 1)
            for p, offsets in self.outstanding.items()
        }


class PyLmdbVersions:
    """``check_and_set_many`` written in Python on the ``lmdb`` package: the
    version map a team would write before keylane (same encoding: big-endian
    8-byte versions, one write transaction per batch)."""

    def __init__(self, path: str, *, map_size: int = 1 << 30, durable: bool = True) -> None:
        import lmdb  # a dev/bench dependency only

        self.env = lmdb.open(path, map_size=map_size, max_dbs=2, sync=durable, metasync=durable)
        self.db = self.env.open_db(b"versions")

    def check_and_set_many(self, pairs: Iterable[tuple[bytes, int]]) -> list[bool]:
        out = []
        with self.env.begin(write=True, db=self.db) as txn:
            for key, version in pairs:
                stored = txn.get(key)
                if stored is None or version > int.from_bytes(stored, "big"):
                    txn.put(key, version.to_bytes(8, "big"))
                    out.append(True)
                else:
                    out.append(False)
        return out

    def close(self) -> None:
        self.env.close()
