"""The repartition defence: when a topic grows, keys that moved to another
partition wait there until their past on the old partition is done.

Growing a topic from N to M partitions sends every key whose murmur2 hash
gives ``h % M != h % N`` to a new partition. Its older records stay on the
old one, which may be owned by another member and lag behind; without a
defence the new owner runs the key's new records first, and the key runs in
two members at once. The rule kept here, for ``ordering="key"``:

    a record of key k placed on partition q by the hash under the new count,
    with timestamp t, runs only once the group's committed offset on k's old
    partition p = h % N has reached ``offsets_for_times(p, min(t, until))``
    — every record of p older than it has been handled and committed.

``until`` is when the member saw the change plus ``grace`` (how long
producers may still place keys by the old count; 0 for MemoryBroker, whose
producers switch at once). Past ``until``, once p's commit reaches
``offsets_for_times(p, until)`` the transition of p is over and nothing
waits for it again. Only moved keys wait; keys that did not move are never
looked at twice. Everything comes from the broker (partition counts,
committed offsets, timestamps), so it works whichever member owns p.

Held records are kept here, outside the dispatcher, so they block nothing:
a key's older records on the old partition (fetched by this member or
another) run meanwhile. A key with held records on a partition has its
later records there held behind them (in order), and released records enter the dispatcher
before any later record of their key. The runtime never commits a
partition past a held record, or past a released one not yet done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import trio

from keylane._native import murmur2
from keylane.brokers.base import TopicPartition
from keylane.errors import BrokerError
from keylane.message import Message
from keylane.metrics import Metrics

if TYPE_CHECKING:
    from keylane._broker_calls import BrokerCalls
    from keylane.brokers.base import Consumer

log = logging.getLogger("keylane")

# How often the broker is asked about held records (seconds), and about open
# transitions with nothing held.
_POLL_HELD = 0.05
_POLL_OPEN = 0.5
# Lookups per poll at most when narrowing down which held records may go.
_ROUNDS = 4
_POSITIVE = 0x7FFFFFFF
# Commit metadata carrying open changes: this prefix, then JSON rows
# [topic, old count, new count, until]; at most this long.
_NOTE = "keylane:repartition:1:"
_NOTE_MAX = 4000


def _parse(text: str) -> list[tuple[str, int, int, float]]:
    if not text.startswith(_NOTE):
        return []
    try:
        rows = json.loads(text[len(_NOTE) :])
    except ValueError:
        return []
    if not isinstance(rows, list):
        return []
    return [(row[0], row[1], row[2], float(row[3])) for row in rows if _valid(row)]


def _valid(row: object) -> bool:
    return (
        isinstance(row, list)
        and len(row) == 4
        and isinstance(row[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:3])
        and 0 < row[1] < row[2]
        and isinstance(row[3], (int, float))
        and not isinstance(row[3], bool)
        and math.isfinite(row[3])
    )


@dataclasses.dataclass(eq=False)
class Change:
    """A topic grew from ``old`` to ``new`` partitions."""

    topic: str
    old: int
    new: int
    seen: float
    until: float
    # Old partitions whose transition is not over.
    open: set[int]


@dataclasses.dataclass(eq=False)
class _Wait:
    change: Change
    old: TopicPartition
    # Records of ``old`` older than this are committed (verified).
    clear_before: float = float("-inf")


@dataclasses.dataclass(eq=False, slots=True)
class Held:
    """A record kept back, with what it waits for: per change its key
    moved in, the wait and the time the old partition must be committed
    up to (none: it only waits behind its key's earlier held records)."""

    msg: Message
    tpid: int
    needs: list[tuple[_Wait, float]]
    since: float

    def ready(self) -> bool:
        return all(due <= w.clear_before for w, due in self.needs)


class Repartition:
    def __init__(
        self,
        consumer: Consumer,
        calls: BrokerCalls,
        metrics: Metrics,
        *,
        grace: float,
        group: str,
        release: Callable[[list[Held]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.consumer = consumer
        self.calls = calls
        self.metrics = metrics
        self.grace = grace
        self.group = group
        self.release = release
        self.clock = clock
        self.counts: dict[str, int] = {}
        # The first count this member saw of each topic: a noted growth to
        # at most that count happened before it looked (it could not see it).
        self.first_seen: dict[str, int] = {}
        # Changes whose transition is over here: a note still carrying one
        # (metadata outlives transitions) does not open it again.
        self.closed: set[tuple[str, int, int]] = set()
        # Open changes per topic, oldest first (topics with none are absent:
        # the feeder's check is one dict lookup).
        self.changes: dict[str, list[Change]] = {}
        self.waits: dict[tuple[int, TopicPartition], _Wait] = {}
        # Held records per key and partition (id), in order.
        self.held: dict[tuple[bytes, int], deque[Held]] = {}
        # Held records per dispatcher partition id (pausing, revokes, commits).
        self.held_by_part: dict[int, int] = {}
        self.holding = 0
        self.wake = trio.Event()

    # ---- seeing changes -------------------------------------------------------------------

    def observe(self, counts: Mapping[str, int]) -> None:
        """Takes the partition counts a fetch reported."""
        for topic, n in counts.items():
            before = self.counts.get(topic)
            self.counts[topic] = n
            self.first_seen.setdefault(topic, n)
            if before is None or n <= before:
                continue
            seen = self.clock()
            change = Change(topic, before, n, seen, seen + self.grace, set(range(before)))
            self.changes.setdefault(topic, []).append(change)
            log.warning(
                "group %s: topic %s grew from %d to %d partitions; records of keys that moved "
                "are held until their old partition's earlier records are committed",
                self.group,
                topic,
                before,
                n,
            )
            self.wake.set()

    # ---- sharing what was seen ------------------------------------------------------------

    def note(self) -> str:
        """The open changes, for the metadata of this member's commits: a
        member that joins during a transition reads them (``learn``) instead
        of taking the grown count for the only one there was."""
        if not self.changes:
            return ""
        rows = [[c.topic, c.old, c.new, c.until] for cs in self.changes.values() for c in cs]
        text = _NOTE + json.dumps(rows, separators=(",", ":"))
        while len(text) > _NOTE_MAX and rows:
            rows.pop(0)  # the oldest first: Kafka keeps 4 KiB of metadata
            text = _NOTE + json.dumps(rows, separators=(",", ":"))
        return text

    def learn(self, notes: Iterable[str], counts: Mapping[str, int]) -> None:
        """Takes the changes other members noted in their commits that this
        member cannot have seen itself (growths to at most the first count it
        saw), then ``counts`` as the topics' counts if it had none. Called
        on the first counts and on every assignment. A note that cannot be
        read is ignored."""
        known = {(c.topic, c.old, c.new) for cs in self.changes.values() for c in cs}
        found: dict[tuple[str, int, int], float] = {}
        for text in notes:
            for topic, old, new, until in _parse(text):
                first = self.first_seen.get(topic, counts.get(topic, 0))
                if topic in counts and new <= min(first, counts[topic]):
                    key = (topic, old, new)
                    found[key] = max(found.get(key, until), until)
        for (topic, old, new), until in sorted(found.items(), key=lambda kv: kv[0][1]):
            if (topic, old, new) in known or (topic, old, new) in self.closed:
                continue
            change = Change(topic, old, new, until - self.grace, until, set(range(old)))
            self.changes.setdefault(topic, []).append(change)
            log.warning(
                "group %s: topic %s grew from %d to %d partitions (noted by another member); "
                "records of keys that moved are held until their old partition's earlier "
                "records are committed",
                self.group,
                topic,
                old,
                new,
            )
            self.wake.set()
        for topic, n in counts.items():
            self.counts.setdefault(topic, n)
            self.first_seen.setdefault(topic, n)

    # ---- the feeder's check ----------------------------------------------------------------

    def divert(self, msg: Message, tpid: int) -> bool:
        """Holds ``msg`` (and returns True) if its key moved and its past is
        not committed yet, or if its key has records held already on the
        same partition."""
        key = msg.key
        if key is None:
            return False
        topic, partition = msg.topic, msg.partition
        h = murmur2(key) & _POSITIVE
        needs = []
        for change in self.changes[topic]:
            old = h % change.old
            if old == partition or h % change.new != partition or old not in change.open:
                continue
            due = min(msg.timestamp, change.until)
            w = self._wait(change, TopicPartition(topic, old))
            if due > w.clear_before:
                needs.append((w, due))
        # Behind the key's held records on this partition only: its records
        # on an old partition are its past (or a late producer's), and
        # holding them would hold what the others wait for.
        queue = self.held.get((key, tpid))
        if not needs and queue is None:
            return False
        if queue is None:
            queue = self.held[(key, tpid)] = deque()
        queue.append(Held(msg, tpid, needs, time.perf_counter()))
        self.held_by_part[tpid] = self.held_by_part.get(tpid, 0) + 1
        self.holding += 1
        self.metrics.counters["repartition_held"] += 1
        self.wake.set()
        return True

    def _wait(self, change: Change, old: TopicPartition) -> _Wait:
        w = self.waits.get((id(change), old))
        if w is None:
            w = self.waits[(id(change), old)] = _Wait(change, old)
        return w

    def lowest_held(self, tpid: int) -> int | None:
        """The lowest offset held of a partition (nothing at or past it may
        be committed)."""
        if tpid not in self.held_by_part:
            return None
        return min(h.msg.offset for q in self.held.values() for h in q if h.tpid == tpid)

    def take(self, partitions: Iterable[int]) -> int:
        """Forgets the held records of ``partitions`` (being given up: the
        next owner fetches them again); returns how many."""
        gone = set(partitions)
        dropped = 0
        for key, queue in list(self.held.items()):
            keep = deque(h for h in queue if h.tpid not in gone)
            dropped += len(queue) - len(keep)
            if keep:
                self.held[key] = keep
            else:
                del self.held[key]
        for p in gone:
            self.held_by_part.pop(p, None)
        self.holding -= dropped
        return dropped

    # ---- the watcher task ------------------------------------------------------------------

    async def watch(self) -> None:
        """Asks the broker how far the old partitions are committed and
        lets held records go; ends transitions that are over."""
        while True:
            if not self.changes:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            try:
                await self._poll()
            except BrokerError as e:
                if not e.retriable:
                    raise
                log.warning("group %s: repartition check failed (%s); retrying", self.group, e)
            with trio.move_on_after(_POLL_HELD if self.holding else _POLL_OPEN):
                self.wake = trio.Event()
                await self.wake.wait()
                # Let a burst of holds gather before asking.
                await trio.sleep(_POLL_HELD)

    async def _poll(self) -> None:
        now = self.clock()
        for changes in self.changes.values():
            for change in changes:
                for p in change.open:
                    key = (id(change), TopicPartition(change.topic, p))
                    if key not in self.waits:
                        self.waits[key] = _Wait(change, key[1])
        waits = list(self.waits.values())
        if not waits:
            return
        committed = await self.calls.call(
            "committed_offsets", self.consumer.committed_offsets, {w.old for w in waits}
        )
        # First ask whether the whole transition is over (the latest time any
        # record waits for), then narrow down among the held records.
        pending: dict[_Wait, set[float]] = {}
        for queue in self.held.values():
            for h in queue:
                for w, due in h.needs:
                    if due > w.clear_before:
                        pending.setdefault(w, set()).add(due)
        asks: dict[_Wait, list[float]] = {}
        for w in waits:
            dues = sorted(pending.get(w, ()))
            if now >= w.change.until:
                dues.append(w.change.until)
            if dues:
                asks[w] = dues
        for _ in range(_ROUNDS):
            if not asks:
                break
            # Per old partition one time per lookup: the latest still open
            # for one wait on it (another change's wait is asked next round).
            probe: dict[TopicPartition, tuple[_Wait, float]] = {}
            for w, dues in asks.items():
                if w.old not in probe:
                    probe[w.old] = (w, dues[-1] if len(dues) < 3 else dues[len(dues) // 2])
            offsets = await self.calls.call(
                "offsets_for_times",
                self.consumer.offsets_for_times,
                {tp: due for tp, (_, due) in probe.items()},
            )
            for tp, (w, due) in probe.items():
                dues = asks[w]
                if committed.get(tp, 0) >= offsets[tp]:
                    w.clear_before = max(w.clear_before, due)
                    dues[:] = [d for d in dues if d > due]
                else:
                    dues[:] = [d for d in dues if d < due]
                if not dues:
                    del asks[w]
        self._let_go(now)

    def _let_go(self, now: float) -> None:
        released: list[Held] = []
        waited = self.metrics.repartition_wait
        perf = time.perf_counter()
        for key, queue in list(self.held.items()):
            while queue and queue[0].ready():
                h = queue.popleft()
                released.append(h)
                waited.observe(perf - h.since)
                n = self.held_by_part[h.tpid] - 1
                if n:
                    self.held_by_part[h.tpid] = n
                else:
                    del self.held_by_part[h.tpid]
            if not queue:
                del self.held[key]
        self.holding -= len(released)
        busy = {w for queue in self.held.values() for h in queue for w, _ in h.needs}
        for wait_key, w in list(self.waits.items()):
            change = w.change
            if w not in busy and now >= change.until and w.clear_before >= change.until:
                change.open.discard(w.old.partition)
                del self.waits[wait_key]
                if not change.open:
                    self.closed.add((change.topic, change.old, change.new))
                    changes = self.changes[change.topic]
                    changes.remove(change)
                    if not changes:
                        del self.changes[change.topic]
                    log.info(
                        "group %s: topic %s: the move from %d to %d partitions is over",
                        self.group,
                        change.topic,
                        change.old,
                        change.new,
                    )
        if released:
            self.release(released)
