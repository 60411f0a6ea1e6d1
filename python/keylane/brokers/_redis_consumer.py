"""RedisStreamsConsumer: one App's member of a keylane group on Redis Streams.

Each topic-partition is a stream; the member owns streams by lease (see
``_redis_membership``) and reads them with ``XREADGROUP``: first the
pending entries it claimed from a previous owner, in id order, then new
ones (``>``). Offsets are stream ids (``ms << 20 | seq``), so they increase
with the stream but are not dense. A commit ``XACK``s every entry this
member handed out below the watermark and stores the watermark (and its
metadata) in the group's hashes, in one MULTI: ``committed_offsets`` reads
the watermark, whoever owns the partition.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions

from keylane.brokers._redis_common import broker_error, decode, id_of, offset_of
from keylane.brokers._redis_membership import Membership
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import BrokerError, NotAssigned, UnknownTopic
from keylane.message import Message

if TYPE_CHECKING:
    from keylane.brokers.redis_streams import RedisStreamsBroker

log = logging.getLogger("keylane")

_CLAIM_BATCH = 500
_ACK_BATCH = 1000
_COMMIT_TRIES = 5


class RedisStreamsConsumer:
    def __init__(self, broker: RedisStreamsBroker, group: str, topics: Sequence[str]) -> None:
        self._broker = broker
        self._r = broker.client
        self._keys = broker.keys
        self._o = broker.options
        self._group = group
        self._topics = tuple(topics)
        self._member = f"{group}-{uuid.uuid4().hex[:12]}"
        self._m = Membership(self._r, self._keys, self._o, group, self._member)
        self._joined = False
        self._closed = False
        # The member's state is changed by the thread of whichever call runs
        # (fetch, commit, heartbeat, release): one at a time. A fetch holds
        # it for its blocking read, at most its max_wait.
        self._state = threading.Lock()
        self._owned: set[TopicPartition] = set()
        self._revoking: set[TopicPartition] = set()
        # Partitions being taken over: min idle (ms) of their claim.
        self._claiming: dict[TopicPartition, int] = {}
        # Partitions reading their own pending entries: from this id on.
        self._history: dict[TopicPartition, str] = {}
        self._delivered: dict[TopicPartition, list[int]] = {}
        self._paused: frozenset[TopicPartition] = frozenset()
        self._counts: dict[str, int] = {}
        self._ends: dict[TopicPartition, int] = {}
        self._settled = False
        self._next_tick = 0.0
        # Changes a look at the group found (in any call), for the next fetch.
        self._assigned: set[TopicPartition] = set()
        self._revoked: set[TopicPartition] = set()
        self._lost: set[TopicPartition] = set()

    @property
    def group(self) -> str:
        return self._group

    @property
    def member_id(self) -> str:
        return self._member

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._owned)

    async def join(self) -> None:
        await self._broker._in_thread(self._join_sync)

    def _join_sync(self) -> None:
        try:
            counts = self._r.mget([self._keys.partitions(t) for t in self._topics])
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "join") from e
        missing = [t for t, c in zip(self._topics, counts, strict=True) if c is None]
        if missing:
            raise UnknownTopic(
                f"Redis: no such topic {missing} (create it first with create_topic: keylane "
                "never creates topics implicitly)"
            )
        self._joined = True
        self._next_tick = 0.0

    # ---- fetching -------------------------------------------------------------------------

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        self._check_joined()
        return await self._broker._in_thread(self._fetch_sync, max_records, max_wait)

    def _fetch_sync(self, max_records: int, max_wait: float) -> Fetch:
        with self._state:
            return self._fetch_locked(max_records, max_wait)

    def _fetch_locked(self, max_records: int, max_wait: float) -> Fetch:
        try:
            self._tick_if_due()
            assigned, revoked, lost = self._assigned, self._revoked, self._lost
            self._assigned, self._revoked, self._lost = set(), set(), set()
            chunks: list[tuple[TopicPartition, list[Message]]] = []
            at_end = False
            if max_records > 0:
                chunks, at_end = self._read(max_records, max_wait)
            elif max_wait > 0:
                time.sleep(min(max_wait, 0.05))
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "fetch") from e
        return Fetch(
            chunks=chunks,
            assigned=frozenset(assigned),
            revoked=frozenset(revoked),
            lost=frozenset(lost),
            at_end=at_end and not self._claiming and not self._history and self._settled,
            settled=self._settled,
            partitions=dict(self._counts),
            ends=dict(self._ends),
        )

    def _tick_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self._o.lease_ms / 3000
        t = self._m.tick(self._topics, self._owned, self._revoking)
        self._counts = t.counts
        self._settled = t.settled
        for tp in t.lost:
            self._forget(tp)
            self._assigned.discard(tp)
            self._revoked.discard(tp)
        self._lost |= t.lost
        if t.lost:
            log.warning(
                "redis: group %s member %s lost %s (its lease lapsed: presumed dead by the others)",
                self._group,
                self._member,
                sorted(t.lost),
            )
        self._revoking |= t.to_revoke
        for tp, idle in t.claimed.items():
            self._ensure_group(tp)
            self._owned.add(tp)
            self._claiming[tp] = idle
            self._delivered.setdefault(tp, [])
        self._assigned |= set(t.claimed)
        self._revoked |= t.to_revoke
        self._ends = self._read_ends()

    def _read_ends(self) -> dict[TopicPartition, int]:
        """Per owned partition, the offset after its last entry (for lag)."""
        owned = sorted(self._owned)
        if not owned:
            return {}
        p = self._r.pipeline(transaction=False)
        for tp in owned:
            p.xinfo_stream(self._keys.stream(*tp))
        infos: list[Any] = p.execute(raise_on_error=False)
        ends = {}
        for tp, info in zip(owned, infos, strict=True):
            if isinstance(info, dict):
                last = offset_of(info.get("last-generated-id", b"0-0"))
                ends[tp] = last + 1 if last else 0
        return ends

    def _ensure_group(self, tp: TopicPartition) -> None:
        try:
            self._r.xgroup_create(self._keys.stream(*tp), self._group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _forget(self, tp: TopicPartition) -> None:
        self._owned.discard(tp)
        self._revoking.discard(tp)
        self._claiming.pop(tp, None)
        self._history.pop(tp, None)
        self._delivered.pop(tp, None)

    def _read(
        self, max_records: int, max_wait: float
    ) -> tuple[list[tuple[TopicPartition, list[Message]]], bool]:
        readable = [tp for tp in sorted(self._owned - self._revoking) if tp not in self._paused]
        for tp in [tp for tp in readable if tp in self._claiming]:
            self._claim(tp)
        out: list[tuple[TopicPartition, list[Message]]] = []
        room = max_records
        for tp in [tp for tp in readable if tp in self._history]:
            if room <= 0:
                break
            got = self._xread({tp: self._history[tp]}, room, None)
            if got.get(tp):
                self._history[tp] = id_of(got[tp][-1].offset)
                out.append((tp, got[tp]))
                room -= len(got[tp])
            else:
                del self._history[tp]
        live = [tp for tp in readable if tp not in self._claiming and tp not in self._history]
        if not live or room <= 0:
            if not out and max_wait > 0:
                time.sleep(min(max_wait, 0.05))
            return out, False
        block = None if out else max(1, int(max_wait * 1000))
        per = max(1, room // len(live))
        got = self._xread(dict.fromkeys(live, ">"), per, block)
        out.extend((tp, got[tp]) for tp in live if got.get(tp))
        return out, not out

    def _xread(
        self, streams: Mapping[TopicPartition, str], count: int, block: int | None
    ) -> dict[TopicPartition, list[Message]]:
        by_name = {self._keys.stream(*tp): tp for tp in streams}
        reply: Any = self._r.xreadgroup(
            self._group,
            self._member,
            {name: streams[tp] for name, tp in by_name.items()},
            count=count,
            block=block,
        )
        out: dict[TopicPartition, list[Message]] = {}
        for name, entries in reply or []:
            tp = by_name[_text(name)]
            msgs = [
                decode(tp.topic, tp.partition, sid, fields) for sid, fields in entries if fields
            ]
            if msgs:
                out[tp] = msgs
                self._delivered.setdefault(tp, []).extend(m.offset for m in msgs)
        return out

    def _claim(self, tp: TopicPartition) -> None:
        """Takes the stream's pending entries over; once none belongs to
        another consumer, the partition reads its (now own) pending entries."""
        stream, idle = self._keys.stream(*tp), self._claiming[tp]
        start = "0-0"
        while True:
            # Whole entries: redis-py's JUSTID form drops the cursor.
            reply: Any = self._r.xautoclaim(
                stream, self._group, self._member, idle, start_id=start, count=_CLAIM_BATCH
            )
            start = _text(reply[0])
            if start == "0-0":
                break
        summary: Any = self._r.xpending(stream, self._group)
        others = [c for c in summary.get("consumers", []) if _text(c["name"]) != self._member]
        if any(int(c["pending"]) for c in others):
            return
        del self._claiming[tp]
        self._history[tp] = "0"

    # ---- committing -----------------------------------------------------------------------

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        self._check_joined()
        not_owned = [tp for tp in offsets if tp not in self._owned]
        if not_owned:
            raise NotAssigned(
                "not owned by this member: "
                + ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(not_owned))
            )
        await self._broker._in_thread(self._commit_sync, dict(offsets), metadata)

    def _commit_sync(self, offsets: dict[TopicPartition, int], metadata: str) -> None:
        with self._state:
            self._commit_locked(offsets, metadata)

    def _commit_locked(self, offsets: dict[TopicPartition, int], metadata: str) -> None:
        acks: dict[TopicPartition, list[int]] = {}
        for tp, mark in offsets.items():
            delivered = self._delivered.get(tp, [])
            acks[tp] = [o for o in delivered if o < mark]
        try:
            self._tick_if_due()
            # Fenced: the commit happens only while this member holds every
            # partition's lock (a member whose lease lapsed, its partitions
            # taken over, must not acknowledge or move the watermark).
            for attempt in range(_COMMIT_TRIES):
                try:
                    self._commit_fenced(offsets, acks, metadata)
                    break
                except redis.exceptions.WatchError:
                    # A lock was touched (renewed, most often) meanwhile.
                    if attempt == _COMMIT_TRIES - 1:
                        raise BrokerError(
                            "Redis commit: partition locks kept changing", retriable=True
                        ) from None
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "commit") from e
        for tp, mark in offsets.items():
            if tp in self._delivered:
                self._delivered[tp] = [o for o in self._delivered[tp] if o >= mark]

    def _commit_fenced(
        self,
        offsets: dict[TopicPartition, int],
        acks: dict[TopicPartition, list[int]],
        metadata: str,
    ) -> None:
        k = self._keys
        tps = sorted(offsets)
        locks = [k.owner(self._group, *tp) for tp in tps]
        with self._r.pipeline(transaction=True) as p:
            p.watch(*locks)  # type: ignore[no-untyped-call]
            holders: list[Any] = p.mget(locks)
            taken = [
                tp for tp, h in zip(tps, holders, strict=True) if _text(h or b"") != self._member
            ]
            if taken:
                for tp in taken:
                    self._forget(tp)
                    self._lost.add(tp)
                raise NotAssigned(
                    "no longer owned by this member (its lease lapsed): "
                    + ", ".join(f"{tp.topic}/{tp.partition}" for tp in taken)
                )
            p.multi()
            for tp in tps:
                done = acks[tp]
                for i in range(0, len(done), _ACK_BATCH):
                    p.xack(
                        k.stream(*tp), self._group, *[id_of(o) for o in done[i : i + _ACK_BATCH]]
                    )
                field = f"{tp.topic}:{tp.partition}"
                p.hset(k.metadata(self._group) + ":offsets", field, offsets[tp])
                if metadata:
                    p.hset(k.metadata(self._group), field, metadata)
                else:
                    p.hdel(k.metadata(self._group), field)
            p.execute()

    async def heartbeat(self) -> None:
        self._check_joined()
        await self._broker._in_thread(self._heartbeat_sync)

    def _heartbeat_sync(self) -> None:
        with self._state:
            self._heartbeat_locked()

    def _heartbeat_locked(self) -> None:
        try:
            self._tick_if_due()
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "heartbeat") from e

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        tps = [tp for tp in partitions if tp in self._owned]
        await self._broker._in_thread(self._release_sync, tps)

    def _release_sync(self, tps: list[TopicPartition]) -> None:
        with self._state:
            self._release_locked(tps)

    def _release_locked(self, tps: list[TopicPartition]) -> None:
        try:
            self._m.release(tps)
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "release") from e
        for tp in tps:
            self._forget(tp)
        # The new owners look at their next tick; so does this member.
        self._next_tick = 0.0

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        self._paused = frozenset(partitions)

    # ---- looking at any partition ---------------------------------------------------------

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return await self._broker._in_thread(
            self._broker.committed_of, self._group, list(partitions)
        )

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        tps = list(partitions)
        return await self._broker._in_thread(self._metadata_sync, tps)

    def _metadata_sync(self, tps: list[TopicPartition]) -> dict[TopicPartition, str]:
        if not tps:
            return {}
        try:
            values: list[Any] = self._r.hmget(
                self._keys.metadata(self._group), [f"{tp.topic}:{tp.partition}" for tp in tps]
            )
        except redis.exceptions.RedisError as e:
            raise broker_error(e, "read commit metadata") from e
        return {tp: (v.decode() if v else "") for tp, v in zip(tps, values, strict=True)}

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        return await self._broker._in_thread(self._broker.offsets_for_times_sync, dict(times))

    # ---- leaving --------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._joined:
            owned = sorted(self._owned)
            self._owned.clear()
            try:
                await self._broker._in_thread(self._m.leave, owned)
            except redis.exceptions.RedisError as e:
                raise broker_error(e, "leave") from e

    def _check_joined(self) -> None:
        if self._closed:
            raise BrokerError(f"Redis consumer {self._member} is closed")
        if not self._joined:
            raise BrokerError(f"Redis consumer {self._member} has not joined")


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


__all__ = ["RedisStreamsConsumer"]
