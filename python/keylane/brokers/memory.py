"""MemoryBroker: an in-process broker, keylane's embedded default.

Topics of N partitions (keys placed by Kafka's murmur2 partitioner, key-less
records round-robin), append-only logs, consumer groups with committed
offsets, several members per group with partition assignment and rebalance,
session timeouts, optional persistence to a directory, and fault injection.

It lives in one process and one Trio thread: produce from anywhere in that
thread (or before ``trio.run``), consume from Trio tasks. It is not
thread-safe.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

import trio

from keylane._native import partition_for_key
from keylane.brokers import _log_file
from keylane.brokers._memory_store import TOPIC_NAME, MemoryStore
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import (
    BrokerError,
    ConfigError,
    InvalidArgument,
    InvalidType,
    NotAssigned,
)
from keylane.message import (
    HeaderValue,
    KeyLike,
    Message,
    ValueLike,
    delivered,
    encode_headers,
    encode_key,
    encode_value,
)

log = logging.getLogger("keylane.brokers.memory")


def _timestamp(m: Message) -> float:
    return m.timestamp


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run
        return time.monotonic()


def _check_number(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Faults:
    """Faults a MemoryBroker injects into fetches, for tests and the lab.

    ``redeliver``: probability per fetch that one partition's position is
    rewound to its committed offset, so recent records come again (what a
    consumer reconnect does). ``duplicate``: probability per chunk that its
    last record is delivered twice. ``fetch_delay``: seconds added to every
    fetch. ``fetch_error`` / ``commit_error``: probability per call that a
    fetch or commit fails with a retriable ``BrokerError`` (a failed commit
    commits nothing). ``stall``: probability per fetch or commit that the
    call hangs for ``stall_seconds`` first (a broker that stops answering).
    ``seed`` makes the choices repeatable. All off by default.
    """

    redeliver: float = 0.0
    duplicate: float = 0.0
    fetch_delay: float = 0.0
    fetch_error: float = 0.0
    commit_error: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("redeliver", "duplicate", "fetch_error", "commit_error", "stall"):
            _check_number(name, getattr(self, name), low=0, high=1)
        _check_number("fetch_delay", self.fetch_delay, low=0)
        _check_number("stall_seconds", self.stall_seconds, low=0)

    async def inject(self, rng: random.Random, call: str, error: float) -> None:
        """Stalls and/or fails one ``call`` as the probabilities say."""
        if self.stall and rng.random() < self.stall:
            log.warning("faults: %s stalls for %.1fs", call, self.stall_seconds)
            await trio.sleep(self.stall_seconds)
        if error and rng.random() < error:
            raise BrokerError(f"faults: injected {call} error", retriable=True, code="INJECTED")


@dataclasses.dataclass(eq=False)
class _Member:
    id: str
    topics: tuple[str, ...]
    last_seen: float
    assigned: set[TopicPartition] = dataclasses.field(default_factory=set)
    # Assigned since the last fetch reported them.
    fresh: set[TopicPartition] = dataclasses.field(default_factory=set)
    # Being taken away: reported once, kept until released.
    revoking: set[TopicPartition] = dataclasses.field(default_factory=set)
    reported: set[TopicPartition] = dataclasses.field(default_factory=set)
    lost: set[TopicPartition] = dataclasses.field(default_factory=set)
    position: dict[TopicPartition, int] = dataclasses.field(default_factory=dict)
    paused: frozenset[TopicPartition] = frozenset()
    cursor: int = 0


@dataclasses.dataclass(eq=False)
class _Group:
    name: str
    members: dict[str, _Member] = dataclasses.field(default_factory=dict)
    owner: dict[TopicPartition, str] = dataclasses.field(default_factory=dict)
    # Partition → member it goes to once its current owner releases it.
    pending: dict[TopicPartition, str] = dataclasses.field(default_factory=dict)
    committed: dict[TopicPartition, int] = dataclasses.field(default_factory=dict)
    # Commit metadata (not persisted: the next commit writes it again).
    metadata: dict[TopicPartition, str] = dataclasses.field(default_factory=dict)


class MemoryBroker:
    """An in-process broker with Kafka's partitioning and group semantics.

    ``partitions`` is the partition count of topics created implicitly (on
    first produce or subscribe). ``session_timeout``: a member that neither
    fetches, commits nor heartbeats for this long is considered dead and its
    partitions are reassigned. ``persist_dir``: keep topics, logs and
    committed offsets in this directory, so a restarted process resumes;
    ``recover="truncate"`` cuts damaged log tails instead of refusing to
    start; ``fsync=True`` makes ``flush`` fsync the logs. ``assignor``:
    how partitions are split among a group's members, ``"round-robin"``
    (partition i to member i mod n) or ``"range"`` (contiguous ranges, as
    Kafka's range assignor: growing a topic then moves old partitions too).
    """

    # Producers place keys by the current partition count at once (see
    # App's repartition_grace).
    metadata_max_age = 0.0

    def __init__(
        self,
        partitions: int = 12,
        *,
        session_timeout: float = 10.0,
        persist_dir: str | os.PathLike[str] | None = None,
        recover: Literal["fail", "truncate"] = "fail",
        fsync: bool = False,
        faults: Faults | None = None,
        assignor: Literal["round-robin", "range"] = "round-robin",
    ) -> None:
        if assignor not in ("round-robin", "range"):
            raise ConfigError(f'assignor must be "round-robin" or "range", got {assignor!r}')
        self.assignor = assignor
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"partitions must be an int >= 1, got {partitions!r}")
        self.default_partitions = partitions
        self.session_timeout = _check_number("session_timeout", session_timeout, low=0.001)
        if recover not in ("fail", "truncate"):
            raise ConfigError(f'recover must be "fail" or "truncate", got {recover!r}')
        if faults is not None and not isinstance(faults, Faults):
            raise ConfigError(
                f"faults must be a keylane.brokers.Faults, not {type(faults).__name__}"
            )
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._logs: dict[str, list[list[Message]]] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._groups: dict[str, _Group] = {}
        self._member_ids = itertools.count(1)
        # Idempotent producers: (producer id, topic, partition) -> next sequence.
        self._sequences: dict[tuple[int, str, int], int] = {}
        # Set (and dropped) on every change; created only when a fetch waits.
        self._changed: trio.Event | None = None
        self._closed = False
        self._store: MemoryStore | None = None
        if persist_dir is not None:
            self._store = MemoryStore(Path(persist_dir), fsync=fsync)
            self._logs, offsets = self._store.load(truncate=recover == "truncate")
            for topic in self._logs:
                self._round_robin[topic] = itertools.count()
            for name, committed in offsets.items():
                self._group(name).committed.update(committed)

    # ---- topics and producing --------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int | None = None) -> None:
        """Creates ``topic`` (no-op if it exists with that many partitions)."""
        n = self.default_partitions if partitions is None else partitions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"partitions must be an int >= 1, got {n!r}")
        self._check_topic(topic)
        existing = self._logs.get(topic)
        if existing is not None:
            if len(existing) != n:
                raise ConfigError(
                    f"topic {topic!r} exists with {len(existing)} partitions; "
                    "use add_partitions() to grow it"
                )
            return
        self._logs[topic] = [[] for _ in range(n)]
        self._round_robin[topic] = itertools.count()
        self._persist_topics()
        self._rebalance_subscribers(topic)

    def add_partitions(self, topic: str, total: int) -> None:
        """Grows ``topic`` to ``total`` partitions, as Kafka allows: existing
        records stay where they are, and keys may now hash elsewhere."""
        logs = self._topic(topic)
        if isinstance(total, bool) or not isinstance(total, int) or total <= len(logs):
            raise ConfigError(f"total must be an int above the current {len(logs)} partitions")
        logs.extend([] for _ in range(total - len(logs)))
        self._persist_topics()
        self._rebalance_subscribers(topic)

    def partitions(self, topic: str) -> int:
        return len(self._topic(topic))

    def topics(self) -> dict[str, int]:
        return {t: len(p) for t, p in self._logs.items()}

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
        timestamp: float | None = None,
    ) -> Message:
        """Appends a record and returns it (with its partition and offset).

        The partition is ``partition`` if given, else Kafka's murmur2 of the
        key, else round-robin for key-less records. str keys, values and
        header values are UTF-8 encoded.
        """
        if self._closed:
            raise InvalidArgument("this MemoryBroker is closed")
        key_bytes = encode_key(key)
        value_bytes = encode_value(value)
        header_bytes = encode_headers(headers)
        if topic not in self._logs:
            self.create_topic(topic)
        logs = self._logs[topic]
        if partition is None:
            if key_bytes is None:
                p = next(self._round_robin[topic]) % len(logs)
            else:
                p = partition_for_key(key_bytes, len(logs))
        elif isinstance(partition, bool) or not isinstance(partition, int):
            raise InvalidType(f"partition must be an int, not {type(partition).__name__}")
        elif not 0 <= partition < len(logs):
            raise InvalidArgument(
                f"partition {partition} does not exist: topic {topic!r} has {len(logs)}"
            )
        else:
            p = partition
        if timestamp is None:
            ts = time.time()
        elif isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
            raise InvalidType(
                f"timestamp must be seconds (a number), not {type(timestamp).__name__}"
            )
        elif not math.isfinite(timestamp):
            raise InvalidArgument(f"timestamp must be finite, got {timestamp!r}")
        else:
            ts = float(timestamp)
        log_ = logs[p]
        message = delivered(topic, p, len(log_), key_bytes, value_bytes, header_bytes, ts)
        if self._store is not None:
            # Encoded before anything changes: a produce that fails leaves
            # neither the log in memory nor the file with a gap.
            self._store.append(TopicPartition(topic, p), _log_file.encode(message))
        log_.append(message)
        self._signal()
        return message

    def produce_batch(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[KeyLike | None, ValueLike]],
        *,
        producer_id: int | None = None,
        sequence: int | None = None,
    ) -> int:
        """Appends ``records`` to one partition as one produce request (all
        or nothing) and returns how many were appended.

        With ``producer_id`` and ``sequence`` (the number of the batch's
        first record, counted per producer and partition from 0) the broker
        applies Kafka's idempotent-producer rules: a batch already appended
        (a retry whose first attempt did land) is acknowledged and not
        appended again (returns 0); a batch that skips ahead of the next
        expected number is refused with a retriable ``BrokerError``
        (``OUT_OF_ORDER_SEQUENCE_NUMBER``): the producer resends the
        earlier batch first. So retries can neither duplicate nor reorder.
        """
        logs = self._topic(topic)
        if not 0 <= partition < len(logs):
            raise InvalidArgument(f"{topic} has no partition {partition}")
        if (producer_id is None) != (sequence is None):
            raise InvalidArgument("producer_id and sequence go together")
        if producer_id is not None and sequence is not None:
            slot = (producer_id, topic, partition)
            expected = self._sequences.get(slot, 0)
            if sequence < expected:
                return 0
            if sequence > expected:
                raise BrokerError(
                    f"{topic}/{partition}: producer {producer_id} sent sequence {sequence}, "
                    f"expected {expected}",
                    retriable=True,
                    code="OUT_OF_ORDER_SEQUENCE_NUMBER",
                )
            self._sequences[slot] = expected + len(records)
        for key, value in records:
            self.produce(topic, key, value, partition=partition)
        return len(records)

    async def flush(self) -> None:
        """Records are stored as soon as ``produce`` returns; with
        persistence, this also writes (and with ``fsync=True`` syncs) them."""
        self._write_logs()

    def records(
        self, topic: str, partition: int, start: int = 0, stop: int | None = None
    ) -> list[Message]:
        """A slice of a partition's log (for tests and tools)."""
        return self._topic(topic)[partition][start:stop]

    def end_offsets(self, topic: str) -> list[int]:
        """Per partition, the offset the next record will get."""
        return [len(p) for p in self._topic(topic)]

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """A group's committed offsets (next offset to read)."""
        g = self._groups.get(group)
        return dict(g.committed) if g is not None else {}

    def assignment(self, group: str) -> dict[str, frozenset[TopicPartition]]:
        """Current member → partitions (revoked ones until released)."""
        g = self._groups.get(group)
        if g is None:
            return {}
        return {m.id: frozenset(m.assigned) for m in g.members.values()}

    def consumer(self, group: str, topics: Sequence[str]) -> MemoryConsumer:
        if not isinstance(group, str) or not group:
            raise ConfigError("group must be a non-empty str")
        if isinstance(topics, str) or not topics:
            raise ConfigError("topics must be a non-empty list of topic names")
        for t in topics:
            self._check_topic(t)
        return MemoryConsumer(self, group, tuple(dict.fromkeys(topics)))

    def close(self) -> None:
        """Closes log files; the broker refuses to produce afterwards."""
        self._closed = True
        if self._store is not None:
            self._store.close()

    async def aclose(self) -> None:
        await self.flush()
        self.close()

    # ---- internals ------------------------------------------------------------------------

    def _check_topic(self, topic: object) -> None:
        if not isinstance(topic, str) or not TOPIC_NAME.fullmatch(topic):
            raise InvalidArgument(
                f"topic name {topic!r} is invalid: use 1-249 characters from [A-Za-z0-9._-]"
            )

    def _topic(self, topic: str) -> list[list[Message]]:
        logs = self._logs.get(topic)
        if logs is None:
            raise InvalidArgument(f"no topic {topic!r}")
        return logs

    def _check_partition(self, tp: TopicPartition) -> list[Message]:
        logs = self._topic(tp.topic)
        if not 0 <= tp.partition < len(logs):
            raise InvalidArgument(f"{tp.topic} has no partition {tp.partition}")
        return logs[tp.partition]

    def _offset_for_time(self, tp: TopicPartition, t: float) -> int:
        # Kafka's lookup: the first record at or after ``t``. Timestamps
        # are assumed to grow along the log (they do unless produce() was
        # given out-of-order ones), as Kafka's time index assumes.
        return bisect.bisect_left(self._check_partition(tp), t, key=_timestamp)

    def _signal(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _change_event(self) -> trio.Event:
        if self._changed is None:
            self._changed = trio.Event()
        return self._changed

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group(name)
        return g

    def _rebalance_subscribers(self, topic: str) -> None:
        for g in self._groups.values():
            if any(topic in m.topics for m in g.members.values()):
                self._rebalance(g)

    def _expire(self, g: _Group) -> None:
        now = _now()
        dead = [m for m in g.members.values() if now - m.last_seen > self.session_timeout]
        for m in dead:
            log.warning(
                "group %s: member %s missed its session timeout (%.1fs); reassigning %s",
                g.name,
                m.id,
                self.session_timeout,
                sorted(m.assigned),
            )
            self._drop(g, m)
        if dead:
            self._rebalance(g)

    def _drop(self, g: _Group, m: _Member) -> None:
        del g.members[m.id]
        for tp, owner in list(g.owner.items()):
            if owner == m.id:
                del g.owner[tp]
        for tp, target in list(g.pending.items()):
            if target == m.id:
                del g.pending[tp]

    def _rebalance(self, g: _Group) -> None:
        """Splits each topic's partitions among the members subscribed to it
        (``assignor``). A partition changing hands is revoked from a live
        owner first and handed over when released; one without a live owner
        is assigned at once."""
        members = list(g.members.values())
        target: dict[TopicPartition, str] = {}
        for topic in sorted({t for m in members for t in m.topics}):
            subscribed = [m.id for m in members if topic in m.topics]
            n, k = len(self._logs.get(topic, ())), len(subscribed)
            for p in range(n):
                if self.assignor == "range":
                    # The first n % k members get one partition more.
                    size, extra = divmod(n, k)
                    cut = extra * (size + 1)
                    i = p // (size + 1) if p < cut else extra + (p - cut) // max(size, 1)
                else:
                    i = p % k
                target[TopicPartition(topic, p)] = subscribed[i]
        for tp in set(target) | set(g.owner):
            current, wanted = g.owner.get(tp), target.get(tp)
            if current is None:
                g.pending.pop(tp, None)
                if wanted is not None:
                    self._give(g, tp, g.members[wanted])
            elif current == wanted and tp not in g.members[current].revoking:
                g.pending.pop(tp, None)
            else:
                owner = g.members[current]
                owner.revoking.add(tp)
                if wanted is None:
                    g.pending.pop(tp, None)
                else:
                    g.pending[tp] = wanted
        self._signal()

    def _give(self, g: _Group, tp: TopicPartition, m: _Member) -> None:
        g.owner[tp] = m.id
        m.assigned.add(tp)
        m.fresh.add(tp)
        m.position[tp] = g.committed.get(tp, 0)

    # ---- persistence ----------------------------------------------------------------------

    def _persist_topics(self) -> None:
        if self._store is not None:
            self._store.write_topics(self.topics())

    def _write_logs(self) -> None:
        if self._store is not None and not self._closed:
            self._store.write_logs({t: [len(p) for p in parts] for t, parts in self._logs.items()})

    def _persist_offsets(self) -> None:
        if self._store is None:
            return
        # The records below a commit are on disk before the commit is.
        self._write_logs()
        self._store.write_offsets({name: g.committed for name, g in self._groups.items()})


class MemoryConsumer:
    """A member of a MemoryBroker consumer group (see ``Consumer``)."""

    def __init__(self, broker: MemoryBroker, group: str, topics: tuple[str, ...]) -> None:
        self._broker = broker
        self._group_name = group
        self._topics = topics
        self._member: _Member | None = None

    @property
    def group(self) -> str:
        return self._group_name

    @property
    def member_id(self) -> str:
        return self._member.id if self._member is not None else ""

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._member.assigned) if self._member is not None else frozenset()

    def _alive(self) -> tuple[_Group, _Member]:
        b = self._broker
        if self._member is None:
            raise InvalidArgument("consumer has not joined its group (call join() first)")
        g = b._group(self._group_name)
        b._expire(g)
        m = self._member
        if g.members.get(m.id) is not m:
            # Declared dead (session timeout) or closed: come back as new.
            log.warning("group %s: member %s rejoins after being removed", g.name, m.id)
            m.lost |= m.assigned
            m.assigned.clear()
            m.revoking.clear()
            m.reported.clear()
            m.fresh.clear()
            g.members[m.id] = m
            b._rebalance(g)
        m.last_seen = _now()
        return g, m

    async def join(self) -> None:
        b = self._broker
        for t in self._topics:
            if t not in b._logs:
                b.create_topic(t)
        m = _Member(f"{self._group_name}-member-{next(b._member_ids)}", self._topics, _now())
        self._member = m
        g = b._group(self._group_name)
        g.members[m.id] = m
        b._rebalance(g)
        await trio.lowlevel.checkpoint()

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        b = self._broker
        deadline = trio.current_time() + max_wait
        faults = b.faults
        if faults.fetch_delay:
            await trio.sleep(faults.fetch_delay)
        if faults.stall or faults.fetch_error:
            await faults.inject(b._rng, "fetch", faults.fetch_error)
        while True:
            g, m = self._alive()
            fetch = self._collect(g, m, max_records)
            if fetch.chunks or fetch.assigned or fetch.revoked or fetch.lost:
                return fetch
            # No await between the collect and here: nothing can change.
            changed = b._change_event()
            with trio.move_on_at(deadline):
                await changed.wait()
            if trio.current_time() >= deadline:
                return self._collect(*self._alive(), max_records)

    def _collect(self, g: _Group, m: _Member, max_records: int) -> Fetch:
        b = self._broker
        assigned, m.fresh = frozenset(m.fresh), set()
        lost, m.lost = frozenset(m.lost), set()
        revoked = frozenset(m.revoking - m.reported)
        m.reported |= revoked
        active = sorted(m.assigned - m.revoking)
        faults, rng = b.faults, b._rng
        if faults.redeliver and active and rng.random() < faults.redeliver:
            tp = rng.choice(active)
            m.position[tp] = min(m.position[tp], g.committed.get(tp, 0))
        chunks: list[tuple[TopicPartition, Sequence[Message]]] = []
        left = max(max_records, 0)
        fetching = [tp for tp in active if tp not in m.paused] if m.paused else active
        if fetching and left:
            # Equal shares first, from a rotating start, then what is left.
            share = max(1, left // len(fetching))
            start = m.cursor % len(fetching)
            m.cursor += 1
            order = fetching[start:] + fetching[:start]
            for budget_pass in (share, None):
                for tp in order:
                    if not left:
                        break
                    log_ = b._logs[tp.topic][tp.partition]
                    pos = m.position[tp]
                    take = min(left, budget_pass or left, len(log_) - pos)
                    if take <= 0:
                        continue
                    chunk = log_[pos : pos + take]
                    m.position[tp] = pos + take
                    left -= take
                    if faults.duplicate and rng.random() < faults.duplicate:
                        chunk = [*chunk, chunk[-1]]
                    chunks.append((tp, chunk))
        ends = {tp: len(b._logs[tp.topic][tp.partition]) for tp in m.assigned}
        at_end = all(m.position[tp] >= ends[tp] for tp in active)
        subscribed = sum(len(b._logs.get(t, ())) for t in m.topics)
        settled = not g.pending and not m.revoking and len(g.owner) >= subscribed
        counts = {t: len(b._logs[t]) for t in m.topics if t in b._logs}
        return Fetch(chunks, assigned, revoked, lost, ends, at_end, settled, counts)

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        b = self._broker
        faults = b.faults
        if faults.stall or faults.commit_error:
            await faults.inject(b._rng, "commit", faults.commit_error)
        g, m = self._alive()
        for tp, offset in offsets.items():
            if g.owner.get(tp) != m.id:
                raise NotAssigned(
                    f"group {g.name}: {m.id} does not own {tp.topic}/{tp.partition}; "
                    "it was reassigned in a rebalance"
                )
            end = len(b._logs[tp.topic][tp.partition])
            if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= end:
                raise InvalidArgument(f"offset {offset!r} for {tp} is outside 0..{end}")
        if not isinstance(metadata, str):
            raise InvalidType(f"metadata must be a str, not {type(metadata).__name__}")
        g.committed.update(offsets)
        g.metadata.update(dict.fromkeys(offsets, metadata))
        b._persist_offsets()
        await trio.lowlevel.checkpoint()

    async def heartbeat(self) -> None:
        self._alive()
        await trio.lowlevel.checkpoint()

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        g, m = self._alive()
        b = self._broker
        for tp in partitions:
            if tp not in m.revoking:
                continue
            m.revoking.discard(tp)
            m.reported.discard(tp)
            m.assigned.discard(tp)
            m.position.pop(tp, None)
            del g.owner[tp]
            target = g.pending.pop(tp, None)
            if target is not None and target in g.members:
                b._give(g, tp, g.members[target])
        b._rebalance(g)
        await trio.lowlevel.checkpoint()

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        if self._member is not None:
            self._member.paused = frozenset(partitions)

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        # A question about the group, not a sign of life: no _alive().
        b = self._broker
        committed = b._group(self._group_name).committed
        out = {}
        for tp in partitions:
            b._check_partition(tp)
            out[tp] = committed.get(tp, 0)
        await trio.lowlevel.checkpoint()
        return out

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        b = self._broker
        metadata = b._group(self._group_name).metadata
        out = {}
        for tp in partitions:
            b._check_partition(tp)
            out[tp] = metadata.get(tp, "")
        await trio.lowlevel.checkpoint()
        return out

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        b = self._broker
        out = {tp: b._offset_for_time(tp, t) for tp, t in times.items()}
        await trio.lowlevel.checkpoint()
        return out

    async def close(self) -> None:
        if self._member is None:
            return
        b = self._broker
        g = b._group(self._group_name)
        if g.members.get(self._member.id) is self._member:
            b._drop(g, self._member)
            b._rebalance(g)
        self._member = None
        await trio.lowlevel.checkpoint()
