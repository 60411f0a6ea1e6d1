"""The feeder: fetches, pushes into the dispatcher, holds and releases
records the repartition defence holds back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from keylane._repartition import Held
from keylane._runtime.state import State
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import BrokerError
from keylane.message import Message
from keylane.metrics import SAMPLE_EVERY

log = logging.getLogger("keylane")

# How long a fetch may wait for records before the feeder looks around.
_FETCH_WAIT = 0.5
# While the dispatcher is full the feeder still calls fetch(0, 0) this often,
# so the consumer keeps its group membership and sees rebalances.
_POLL_WHILE_FULL = 0.2
_SAMPLE_MASK = SAMPLE_EVERY - 1
# Fetched records are pushed into the dispatcher this many at a time, the
# slice looked at between steps. A push costs up to ~1 us a record (new keys
# make new lanes): steps of 512 took ~0.5 ms, a slice of their own, and put
# the heartbeat's p99 at 2.2-2.7 ms; steps of 128 overrun a slice by ~0.1 ms.
_PUSH_STEP = 128


class Feeding(State):
    async def _feed(self) -> None:
        d, app = self.d, self.app
        fetch_from = functools.partial(self.calls.retrying, "fetch", self.consumer.fetch)
        seen_end = False
        fetched_at = trio.current_time()
        while not self.stopping:
            # A broker with records ready may answer without suspending.
            await self._yield_if_due()
            if self.overflow:
                self._push_overflow()
            room = self._room()
            if self._short_of(room):
                # Full, or a long backlog and little room: wait for room for
                # a full fetch rather than take the few records each flush
                # frees (a fetch has a fixed cost: a no-op App at full speed
                # fetched ~600 records at a time instead of ~4,000, 15-20% of
                # its time). But talk to the broker at least every
                # _POLL_WHILE_FULL (an empty fetch if still full), so the
                # member stays in its group and a rebalance is still served.
                with trio.move_on_at(fetched_at + _POLL_WHILE_FULL):
                    while self._short_of(room):
                        await self.space.park()
                        room = self._room()
                room = self._room()
                if room == 0 or self.overflow:
                    await self._rebalance(await fetch_from(0, 0.0))
                    fetched_at = trio.current_time()
                    continue
            wait = _FETCH_WAIT
            if self.until_idle:
                # Right after the end was seen and the workers drained, a
                # fetch that does not wait tells whether anything came since
                # (waiting would add its wait to the end of every idle run).
                # Only once: an adapter may answer such a fetch before it
                # knows (Kafka's consume hop still out), and the next one
                # waits for it.
                wait, seen_end = (0.0 if seen_end else 0.05), False
            fetch = await fetch_from(min(room, app.fetch_max), wait)
            fetched_at = trio.current_time()
            await self._rebalance(fetch)
            self.ends.update(fetch.ends)
            pushed = await self._push(fetch)
            if self.debug:
                self._debug_feed(pushed)
            if pushed:
                self.metrics.counters["consumed"] += pushed
            elif self.until_idle and fetch.at_end and fetch.settled:
                if len(d) == 0 and not self.done and not (self.rp and self.rp.holding):
                    log.info("group %s: idle (all assigned partitions handled)", app.group)
                    return
                if self.blocked and self._only_blocked_left():
                    self.idle_blocked = self._blocked_report()
                    log.error(
                        "group %s: idle but for %d blocked key(s) (their messages fail every "
                        "attempt and on_exhausted='block' keeps retrying them): %s",
                        app.group,
                        len(self.idle_blocked),
                        "; ".join(_describe(b) for b in self.idle_blocked[:10]),
                    )
                    return
                # Everything fetched: wait for progress (for the workers to
                # drain, if they hold any), looking at the broker again at
                # least every 50 ms.
                with trio.move_on_after(0.05):
                    await self.progress.park()
                    while len(d) or self.done:
                        await self.progress.park()
                seen_end = True

    def _room(self) -> int:
        """How many records the next fetch may bring."""
        return self._pause_held() if self.rp is not None else self.d.free_capacity

    def _short_of(self, room: int) -> bool:
        """No room, or too little for a full fetch while more than the
        workers need soon is queued (also what _flush wakes the feeder on)."""
        return room == 0 or (room < self.fetch_low and len(self.d) > self.low_water)

    def _debug_feed(self, pushed: int) -> None:
        self.debug_fetches += 1
        self.debug_records += pushed
        now = time.monotonic()
        if now - self.debug_at < 1.0:
            return
        d = self.d
        log.debug(
            "group %s: %d fetches brought %d records in %.1fs; queued %d, in flight %d, "
            "running %d, room %d%s%s",
            self.app.group,
            self.debug_fetches,
            self.debug_records,
            now - self.debug_at if self.debug_at else 0.0,
            d.queued,
            d.in_flight,
            self.running,
            d.free_capacity,
            f", paused {sorted(self.paused)}" if self.paused else "",
            f", {self.rp.holding} held (repartition)" if self.rp and self.rp.holding else "",
        )
        self.debug_at, self.debug_fetches, self.debug_records = now, 0, 0

    def _only_blocked_left(self) -> bool:
        """Whether nothing can run but messages blocked after their last
        attempt (each waiting out its retry) and those queued behind them:
        nothing running, done or ready, no held record, every ticket in
        flight a blocked one waiting, and nothing ready to pop."""
        if self.running or self.done or self.ready or self.overflow:
            return False
        if any(batch for batch, _ in self.ahead):
            return False
        if self.rp is not None and self.rp.holding:
            return False
        waiting = sum(1 for t in self.retrying if (t.partition, t.offset) in self.blocked)
        if self.d.in_flight != waiting:
            return False
        popped = self.d.pop_ready(self.batch)
        if popped:
            # Workers would have taken these: give them to them.
            self.ready.extend(popped)
            self._wake(len(popped))
            return False
        return True

    def _blocked_report(self) -> list[dict[str, Any]]:
        oldest: dict[tuple[str, bytes | None], dict[str, Any]] = {}
        for b in self.blocked.values():
            key = (b["topic"], b["key"])
            if key not in oldest or b["offset"] < oldest[key]["offset"]:
                oldest[key] = b
        return sorted(oldest.values(), key=lambda b: (b["topic"], b["partition"], b["offset"]))

    async def _push(self, fetch: Fetch) -> int:
        dropped = 0
        now = time.perf_counter()
        # Topics in a repartition transition (see _repartition).
        moving = self.rp.changes if self.rp is not None else None
        # Entries are built and pushed in steps of _PUSH_STEP, a checkpoint
        # between them once the slice is spent, so a big fetch does not hold
        # the loop (building a whole 4,096-record fetch before pushing made
        # a third of the feeder's steps last over 2 ms). Only this task
        # pushes or revokes, so nothing changes between steps but the
        # workers' progress.
        self.pushed_by_fetch = 0
        pending: list[tuple[bytes | None, int, int, Message]] = []
        for tp, records in fetch.chunks:
            tpid = self.tp_ids.get(tp)
            if tpid is None or tp not in self.owned or not records:
                continue
            last = self.last_pushed.get(tpid, -1)
            first, final = records[0].offset, records[-1].offset
            if first > last and final - first == len(records) - 1:
                fresh = records
            else:
                # A redelivery or a duplicate: keep only what is new.
                fresh = []
                for m in records:
                    if m.offset > last:
                        fresh.append(m)
                        last = m.offset
                dropped += len(records) - len(fresh)
                if not fresh:
                    continue
            self.last_pushed[tpid] = fresh[-1].offset
            if moving and tp.topic in moving:
                assert self.rp is not None
                divert = self.rp.divert
                fresh = [m for m in fresh if not divert(m, tpid)]
                if not fresh:
                    continue
            # Dispatch latency is sampled on offsets divisible by
            # SAMPLE_EVERY (the workers sample the same ones).
            if fresh is records:
                sampled = fresh[(-fresh[0].offset) & _SAMPLE_MASK :: SAMPLE_EVERY]
            else:
                sampled = [m for m in fresh if not m.offset & _SAMPLE_MASK]
            for m in sampled:
                self.enqueued_at[(tpid, m.offset)] = now
            for start in range(0, len(fresh), _PUSH_STEP):
                if self.pushed_by_fetch:
                    # Before a step's entries are built, not between building
                    # and pushing them, so a step is one turn of the loop and
                    # its entries are pushed while still in the CPU's caches
                    # (docs/benchmarks.md, "Event-loop hold": p99 1.51-1.56
                    # -> 1.35-1.51 ms).
                    await self._yield_if_due()
                pending.extend(
                    [(m.key, tpid, m.offset, m) for m in fresh[start : start + _PUSH_STEP]]
                )
                if len(pending) >= _PUSH_STEP:
                    self._push_step(pending)
                    pending = []
        if pending:
            self._push_step(pending)
        if dropped:
            self.metrics.counters["redelivered_dropped"] += dropped
        return self.pushed_by_fetch

    def _push_step(self, entries: list[tuple[bytes | None, int, int, Message]]) -> None:
        if self.overflow:
            # An earlier step overflowed: keep the order behind it.
            self.overflow.extend(entries)
            return
        accepted = self.d.push_many(entries)
        self.pushed_by_fetch += accepted
        self._wake(accepted)
        if accepted < len(entries):
            # Cannot happen while the feeder is the only pusher and sizes
            # each fetch to the room left; if it does, nothing is lost.
            log.warning(
                "group %s: dispatcher took %d of %d records of a step; holding the rest",
                self.app.group,
                accepted,
                len(entries),
            )
            self.overflow.extend(entries[accepted:])

    def _push_overflow(self) -> None:
        held = list(self.overflow)
        accepted = self.d.push_many(held) if held else 0
        self.overflow = deque(held[accepted:])
        if accepted:
            self.metrics.counters["consumed"] += accepted
            self._wake(accepted)

    async def _learn_growths(self, counts: Mapping[str, int]) -> None:
        """Reads the growths other members noted in their commits (see
        ``Repartition.note``): on the first counts, and whenever partitions
        are assigned (their previous owner committed before releasing)."""
        assert self.rp is not None
        tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
        try:
            notes = await self.calls.retrying(
                "committed_metadata",
                self.consumer.committed_metadata,
                tps,
                give_up_after=self.app.broker_timeout,
            )
        except BrokerError as e:
            log.warning(
                "group %s: cannot read other members' notes of topic growths (%s); going on "
                "with what this member sees",
                self.app.group,
                e,
            )
            notes = {}
        self.rp.learn(notes.values(), counts)

    def _pause_held(self) -> int:
        """Keeps held records from taking all the memory, and returns how
        much room the next fetch may use.

        Held records, and the records queued behind their keys, wait for
        other partitions (the old ones) whose records need room to come in.
        So while partitions with held records are fetched from, the last
        quarter of the capacity is kept free; once half is used they are
        paused (fetches then go to the others), until three quarters are
        free again or nothing is held."""
        rp = self.rp
        assert rp is not None
        d = self.d
        if not rp.held_by_part and not self.paused:
            return d.free_capacity  # every turn of the feeder, nearly always
        free, quarter = max(0, d.free_capacity - rp.holding), d.capacity // 4
        held = {self.tps[i] for i in rp.held_by_part} & self.owned
        wanted = self.paused
        if held and free < 2 * quarter:
            wanted = frozenset(self.paused | held)
        elif self.paused and (not held or free >= 3 * quarter):
            wanted = frozenset()
        if wanted != self.paused:
            self.paused = wanted
            self.consumer.set_paused(wanted)
            if wanted:
                log.info(
                    "group %s: records of moved keys wait and memory is short; pausing %s",
                    self.app.group,
                    sorted(wanted),
                )
        return max(0, free - quarter) if held - self.paused else free

    def _release_held(self, held: list[Held]) -> None:
        """Pushes released records into the dispatcher (or, if it is full,
        ahead of anything fetched later), each under its partition's
        virtual id."""
        entries = []
        for h in held:
            vid = self.virtual.get(h.tpid)
            if vid is None:
                vid = self.virtual[h.tpid] = len(self.tps)
                self.virtual_of[vid] = h.tpid
                self.tps.append(self.tps[h.tpid])
                self.released[vid] = deque()
            n = self.vnext.get(vid, 0)
            self.vnext[vid] = n + 1
            self.released[vid].append((n, h.msg.offset))
            entries.append((h.msg.key, vid, n, h.msg))
        if self.overflow:
            self.overflow.extend(entries)
            return
        accepted = self.d.push_many(entries)
        self.metrics.counters["consumed"] += accepted
        self._wake(accepted)
        self.overflow.extend(entries[accepted:])


def _describe(b: dict[str, Any]) -> str:
    return (
        f"{b['topic']}/{b['partition']}@{b['offset']} key={b['key']!r:.40} "
        f"after {b['attempts']} attempts: {b['error']:.120}"
    )
