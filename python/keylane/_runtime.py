"""One run of an App: the tasks that feed, work, commit and shut down.

Shape of a run (all tasks in one Trio nursery tree):

- the **feeder** (the run's own task) joins the group, fetches batches and
  pushes them into the native ``Dispatcher``, waiting when it is full; it
  also handles rebalances (drain, commit, release);
- ``concurrency`` **workers** take ready tickets in batches, run the
  handler, and hand completions back in batches;
- the **committer** commits ``committable()`` every ``commit_interval``
  (after flushing recorded versions);
- **side tasks** wait out retry backoffs and write dead letters, so a
  failing message never holds a worker.

Nothing here is per-message Trio machinery: workers park only when nothing
is ready, and handlers that never suspend run back to back. The event loop
is shared with the service, so no runtime task runs longer than a slice
(0.5 ms) without a checkpoint, and while handlers do not suspend only one
worker stays runnable (more would only lengthen every scheduler batch); as
soon as a handler suspends, workers are woken for every ready message.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from keylane import _handler_call
from keylane._broker_calls import BrokerCalls
from keylane._guard import DUPLICATE, RUN, STALE, Guard, PoisonMessage
from keylane._native import Dispatcher, Ticket
from keylane._repartition import Held, Repartition
from keylane.brokers.base import Acknowledging, Consumer, Fetch, TopicPartition
from keylane.dlq import DeadLetter
from keylane.errors import BrokerError, BrokerTimeout, NotAssigned
from keylane.message import Message
from keylane.metrics import SAMPLE_EVERY, Metrics

if TYPE_CHECKING:
    from keylane.app import App

log = logging.getLogger("keylane")

# Completions are handed back to the dispatcher (releasing their keys) in
# batches of at most this many, and whenever a worker runs dry.
_FLUSH_EVERY = 64
# ... or once the oldest unflushed completion is this old (seconds).
_FLUSH_AFTER = 0.0002
# How long a fetch may wait for records before the feeder looks around.
_FETCH_WAIT = 0.5
# The final commit of a forced stop or a cancelled run gets this long.
_LAST_COMMIT_TIMEOUT = 2.0
# While the dispatcher is full the feeder still calls fetch(0, 0) this often,
# so the consumer keeps its group membership and sees rebalances.
_POLL_WHILE_FULL = 0.2
_SAMPLE_MASK = SAMPLE_EVERY - 1
# The most the runtime's tasks run without letting the event loop look
# around (timers, I/O, the service's other tasks), in seconds.
_SLICE = 0.0005
# Fetched records are pushed into the dispatcher this many at a time, the
# slice looked at between steps. A push costs up to ~1 us a record (new keys
# make new lanes): steps of 512 took ~0.5 ms, a slice of their own, and put
# the heartbeat's p99 at 2.2-2.7 ms; steps of 128 overrun a slice by ~0.1 ms.
_PUSH_STEP = 128
# Handlers count as suspending for this long after one did (seconds).
_SUSPENDING_FOR = 0.1


class Run:
    def __init__(self, app: App, *, until_idle: bool) -> None:
        self.app = app
        self.until_idle = until_idle
        self.metrics: Metrics = app._metrics
        self.batch = max(16, min(1024, 4 * app.concurrency))
        # The feeder waits for room for this many records before fetching,
        # while more than low_water are queued or running (_feed).
        self.fetch_low = min(app.fetch_max, max(1, app.capacity // 4))
        self.low_water = 2 * self.batch
        # With a version table, the batch after the one being handled is
        # popped early (its table lookups run meanwhile): room for both.
        ahead = 2 if app._versions_table is not None else 1
        self.d = Dispatcher(
            app.ordering,
            capacity=app.capacity,
            max_in_flight=app.concurrency + ahead * self.batch,
        )
        self.consumer: Consumer = app.broker.consumer(app.group, app.topics)
        self.calls = BrokerCalls(app.group, app.broker_timeout, self.metrics)
        # Brokers that take acknowledgements of single messages get each
        # done message's (partition id, offset) through ``to_ack``.
        self.acks = self.consumer if isinstance(self.consumer, Acknowledging) else None
        self.to_ack: list[tuple[int, int]] = []
        self.ack_due = trio.lowlevel.ParkingLot()
        self.rp: Repartition | None = None
        if app.repartition == "hold":
            self.rp = Repartition(
                self.consumer,
                self.calls,
                self.metrics,
                grace=app.repartition_grace,
                group=app.group,
                release=_weakly(self._release_held),
            )
        self.paused: frozenset[TopicPartition] = frozenset()
        # Released held records enter the dispatcher under a partition id of
        # their own per partition (``virtual``: id -> real id), numbered by
        # ``vnext`` in release order; ``released`` keeps (number, offset)
        # until done, so commits of the real partition stay below them.
        self.virtual: dict[int, int] = {}
        self.virtual_of: dict[int, int] = {}
        self.vnext: dict[int, int] = {}
        self.released: dict[int, deque[tuple[int, int]]] = {}
        self.guard: Guard | None = None
        # Partition ids: the dispatcher numbers partitions densely; several
        # topics share one numbering.
        self.tp_ids: dict[TopicPartition, int] = {}
        self.tps: list[TopicPartition] = []
        self.owned: set[TopicPartition] = set()
        self.last_pushed: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.ends: dict[TopicPartition, int] = {}
        self.enqueued_at: dict[tuple[int, int], float] = {}
        # Fetched records the dispatcher did not take (it never should: the
        # fetch is sized to the room left); pushed before the next fetch.
        self.overflow: deque[tuple[bytes | None, int, int, Message]] = deque()
        # Records the current fetch has pushed so far (_push, _push_step).
        self.pushed_by_fetch = 0
        # Worker state.
        self.ready: deque[Ticket] = deque()
        # With a guard: the next batch, popped while the one before it is
        # handled, and set once its table lookups (a worker-thread hop) are
        # done; one refill at a time takes it (_checked_batch).
        self.next_batch: list[Ticket] | None = None
        self.next_checked = trio.Event()
        self.refill_lock = trio.Lock()
        # Partitions being revoked, and retry backoffs in progress.
        self.draining: set[int] = set()
        self.retrying: dict[Ticket, trio.CancelScope] = {}
        # Messages that failed every attempt and block their key
        # (on_exhausted="block"), by (partition id, offset); and what
        # until_idle found blocked when everything else was done.
        self.blocked: dict[tuple[int, int], dict[str, Any]] = {}
        self.idle_blocked: list[dict[str, Any]] = []
        self.done: list[Ticket] = []
        # When the oldest ticket in ``done`` completed (perf_counter).
        self.done_since = 0.0
        self.running = 0
        # Workers not parked, and until when handlers count as suspending
        # (perf_counter); see _wake.
        self.runners = app.concurrency
        self.suspending_until = 0.0
        # When the current slice of the loop ends; a shared deadline, started
        # again by the first task back from the checkpoint that ended it.
        self.yield_at = 0.0
        self.slice_no = 0
        self.closing = False
        # --log-level debug: what the feeder did, summed once a second.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.debug_at = 0.0
        self.debug_fetches = 0
        self.debug_records = 0
        self.rng = random.Random()
        self.work = trio.lowlevel.ParkingLot()
        self.space = trio.lowlevel.ParkingLot()
        self.progress = trio.lowlevel.ParkingLot()
        self.commit_lock = trio.Lock()
        self.ack_lock = trio.Lock()
        # Control.
        self.side: trio.Nursery | None = None
        self.feed_scope = trio.CancelScope()
        self.work_scope = trio.CancelScope()
        self.stopping = False
        self.joined = False
        self.finished = False
        self.forced = False
        self.aborted = False

    # ---- control (called from App) ---------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop fetching, let running handlers finish (up to
        ``shutdown_timeout``), commit, leave."""
        if self.stopping:
            return
        log.info(
            "group %s: stopping (graceful, up to %.1fs)", self.app.group, self.app.shutdown_timeout
        )
        self.stopping = True
        self.feed_scope.cancel()
        self.space.unpark_all()

    def force(self) -> None:
        """Now: cancel running handlers, commit what is done, leave."""
        log.warning("group %s: forced stop; cancelling running handlers", self.app.group)
        self.forced = True
        self.stop()
        self.work_scope.cancel()

    def abort(self) -> None:
        """As if the process died: no final commit, and the member does not
        leave the group (its partitions move after the session timeout)."""
        self.aborted = True
        self.stopping = True
        self.feed_scope.cancel()
        self.work_scope.cancel()

    # ---- the run -------------------------------------------------------------------------

    async def main(self, task_status: trio.TaskStatus[None], *, handle_signals: bool) -> None:
        app = self.app
        if app._versions_table is not None:
            self.guard = Guard(app._versions_table, app._version_of, app._id_of, app._dedupe_ttl)
        detach = (
            app._metrics_sink.attach(self.metrics, app.group)
            if app._metrics_sink is not None
            else None
        )
        self.metrics.gauges = self.gauges
        try:
            async with trio.open_nursery() as top:
                self.side = top
                if handle_signals and threading.current_thread() is threading.main_thread():
                    await top.start(self._signals)
                await top.start(self._join)
                # The committer has a nursery of its own, left (and so fully
                # stopped, even mid-flush in a thread) before the final commit.
                async with trio.open_nursery() as background:
                    background.start_soon(self._committer)
                    if self.acks is not None:
                        background.start_soon(self._acker)
                    if self.rp is not None:
                        background.start_soon(self.rp.watch)
                    with self.work_scope:
                        async with trio.open_nursery() as workers:
                            for _ in range(app.concurrency):
                                workers.start_soon(self._worker)
                            task_status.started()
                            with self.feed_scope:
                                await self._feed()
                            # Fetching is over: running handlers may finish,
                            # nothing new starts.
                            self.closing = True
                            self.work.unpark_all()
                            if not self.until_idle:
                                self.work_scope.deadline = (
                                    trio.current_time() + app.shutdown_timeout
                                )
                    background.cancel_scope.cancel()
                if self.work_scope.cancelled_caught and not (self.forced or self.aborted):
                    log.warning(
                        "group %s: handlers still running after shutdown_timeout=%.1fs "
                        "were cancelled",
                        app.group,
                        app.shutdown_timeout,
                    )
                if not self.aborted:
                    await self._finish(graceful=not self.forced)
                top.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside, or a failure: still leave cleanly
            # unless this is a simulated crash.
            if not self.aborted and not self.finished:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(_LAST_COMMIT_TIMEOUT):
                        await self._finish(graceful=False)
            raise
        finally:
            if detach is not None:
                detach()

    async def _join(self, task_status: trio.TaskStatus[None]) -> None:
        await self.calls.retrying("join", self.consumer.join, give_up_after=self.app.broker_timeout)
        self.joined = True
        task_status.started()

    async def _finish(self, *, graceful: bool) -> None:
        self.finished = True
        if not self.joined:
            return
        try:
            # Retried within the bound: a commit the broker refused once
            # (retriable) would otherwise leave handled work to redo.
            with trio.fail_after(self.app.shutdown_timeout if graceful else _LAST_COMMIT_TIMEOUT):
                await self._commit(give_up_after=None)
        except (trio.TooSlowError, BrokerTimeout):
            log.error(
                "group %s: final commit timed out; uncommitted messages will be redelivered",
                self.app.group,
            )
        except NotAssigned as e:
            log.warning("group %s: final commit refused: %s", self.app.group, e)
        except BrokerError as e:
            log.error(
                "group %s: final commit failed (%s); uncommitted messages will be redelivered",
                self.app.group,
                e,
            )
        finally:
            try:
                await self.calls.call("close", self.consumer.close)
            except BrokerError as e:
                log.warning("group %s: leaving the group failed: %s", self.app.group, e)
        log.info("group %s: stopped; %s", self.app.group, self.metrics.counters)

    async def _signals(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                if not self.stopping:
                    log.info("group %s: %s received", self.app.group, signal.Signals(signum).name)
                    self.stop()
                else:
                    self.force()

    # ---- feeding --------------------------------------------------------------------------

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
        if self.running or self.done or self.ready or self.next_batch or self.overflow:
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
                pending.extend(
                    [(m.key, tpid, m.offset, m) for m in fresh[start : start + _PUSH_STEP]]
                )
                if len(pending) >= _PUSH_STEP:
                    await self._push_step(pending)
                    pending = []
        if pending:
            await self._push_step(pending)
        if dropped:
            self.metrics.counters["redelivered_dropped"] += dropped
        return self.pushed_by_fetch

    async def _push_step(self, entries: list[tuple[bytes | None, int, int, Message]]) -> None:
        if self.pushed_by_fetch:
            await self._yield_if_due()
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

    async def _rebalance(self, fetch: Fetch) -> None:
        if self.guard is not None and (fetch.assigned or fetch.revoked or fetch.lost):
            # Other members may have written the keys of partitions that
            # move: what the guard knows of them is no longer sure.
            self.guard.core.forget()
        if self.rp is not None and fetch.partitions:
            if fetch.assigned or any(t not in self.rp.counts for t in fetch.partitions):
                await self._learn_growths(fetch.partitions)
            self.rp.observe(fetch.partitions)
        if fetch.lost:
            ids = [self.tp_ids[tp] for tp in fetch.lost if tp in self.tp_ids]
            if self.rp is not None:
                self.rp.take(ids)
            ids += [self.virtual[i] for i in ids if i in self.virtual]
            dropped = self.d.revoke(ids)
            log.warning(
                "group %s: lost %s (this member was presumed dead); dropped %d queued messages",
                self.app.group,
                sorted(fetch.lost),
                dropped,
            )
            self._forget(fetch.lost, ids)
        if fetch.revoked:
            await self._revoke(fetch.revoked)
        for tp in fetch.assigned:
            if tp not in self.tp_ids:
                self.tp_ids[tp] = len(self.tps)
                self.tps.append(tp)
            self.owned.add(tp)
        if fetch.assigned:
            log.info("group %s: assigned %s", self.app.group, sorted(fetch.assigned))

    async def _revoke(self, tps: frozenset[TopicPartition]) -> None:
        """Gives up ``tps`` without handling their backlog: queued messages
        are dropped (the watermark stays below them), handlers already
        running finish (up to shutdown_timeout), what is done is committed,
        and only then are the partitions released, so the next owner never
        runs a key that is still running here."""
        ids = sorted({self.tp_ids[tp] for tp in tps if tp in self.tp_ids})
        held = self.rp.take(ids) if self.rp is not None else 0
        ids += [self.virtual[i] for i in ids if i in self.virtual]
        self.draining.update(ids)
        dropped = self.d.drop_queued(ids)
        if self.overflow:
            gone = set(ids)
            self.overflow = deque(e for e in self.overflow if e[1] not in gone)
        # Popped but not started: put back and drop too.
        self.ready = self._put_back_draining(self.ready)
        if self.next_batch is not None:
            self.next_batch = list(self._put_back_draining(self.next_batch))
        dropped += self.d.drop_queued(ids) + held
        # Waiting out a retry backoff is not running: cut it short.
        for t, scope in list(self.retrying.items()):
            if t.partition in self.draining:
                scope.cancel()
        with trio.move_on_after(self.app.shutdown_timeout) as cs:
            while self.d.in_flight_of(ids):
                with trio.move_on_after(0.1):
                    await self.progress.park()
        if cs.cancelled_caught:
            log.warning(
                "group %s: handlers of %s still running after shutdown_timeout; releasing "
                "anyway, so their keys may run on the next owner at the same time",
                self.app.group,
                sorted(tps),
            )
        try:
            await self._commit(only=set(ids), give_up_after=self.app.broker_timeout)
        except BrokerError as e:
            # Not committing is safe (the next owner redelivers from the last
            # commit); committing past an unhandled message would not be.
            log.error(
                "group %s: commit before giving up %s failed (%s); the next owner "
                "redelivers from the last committed offsets",
                self.app.group,
                sorted(tps),
                e,
            )
        self.d.revoke(ids)
        self._forget(tps, ids)
        self.draining.difference_update(ids)
        log.info(
            "group %s: revoked %s (%d queued messages left to the next owner)",
            self.app.group,
            sorted(tps),
            dropped,
        )
        try:
            await self.calls.call("release", self.consumer.release, tps)
        except BrokerError as e:
            log.warning("group %s: release of %s failed: %s", self.app.group, sorted(tps), e)

    def _put_back_draining(self, tickets: Iterable[Ticket]) -> deque[Ticket]:
        """Tickets not of a draining partition; the others go back to the
        dispatcher (and are dropped with their partition)."""
        keep: deque[Ticket] = deque()
        for t in tickets:
            if t.partition in self.draining:
                self.d.retry(t)
            else:
                keep.append(t)
        return keep

    def _forget(self, tps: frozenset[TopicPartition], ids: Any) -> None:
        self.owned.difference_update(tps)
        for tp in tps:
            self.ends.pop(tp, None)
        if self.blocked:
            gone = set(ids)
            self.blocked = {k: b for k, b in self.blocked.items() if k[0] not in gone}
        for i in ids:
            self.last_pushed.pop(i, None)
            self.committed.pop(i, None)
            real = self.virtual_of.pop(i, None)
            if real is not None:
                del self.virtual[real]
                self.vnext.pop(i, None)
                self.released.pop(i, None)
        if self.enqueued_at:
            gone = set(ids)
            self.enqueued_at = {k: v for k, v in self.enqueued_at.items() if k[0] not in gone}

    # ---- working --------------------------------------------------------------------------

    async def _refill(self) -> bool:
        """Fills the shared ready queue; False when the worker should exit."""
        self._flush(by_worker=True)
        while not self.closing:
            if self.guard is None:
                tickets = self.d.pop_ready(self.batch)
            else:
                async with self.refill_lock:
                    if self.ready:
                        # Refilled by the worker this one waited for.
                        return True
                    tickets = await self._checked_batch()
            if tickets:
                self.ready.extend(tickets)
                # This worker takes one; parked ones take the rest now, not
                # when this worker's handler is done (with few keys they
                # would otherwise wait behind it).
                self._wake(len(tickets) - 1, by_worker=True)
                # One checkpoint per batch keeps the feeder and committer
                # running while handlers that never suspend run back to back.
                await trio.lowlevel.checkpoint()
                return True
            if self.ready:
                # Another worker's batch (popping found the in-flight
                # bound): take from it rather than sleep beside it.
                return True
            await self._park()
        return False

    async def _checked_batch(self) -> list[Ticket]:
        """The next batch to handle, with the guard's table lookups done,
        and the lookups of the batch after it started in the background: the
        loop runs this batch's handlers while a worker thread reads for the
        next, instead of waiting idle for every batch's read. Safe for
        per-key order: both batches are popped, so no key is in both."""
        assert self.guard is not None
        tickets: list[Ticket] = []
        if self.next_batch is not None:
            await self.next_checked.wait()
            tickets, self.next_batch = self._still_owned(self.next_batch), None
        if not tickets:
            # None read ahead, or a revoke took all of it: read now.
            tickets = self.d.pop_ready(self.batch)
            if not tickets:
                return tickets
            await self.guard.prefetch(tickets)
            tickets = self._still_owned(tickets)
        if tickets:
            after = self.d.pop_ready(self.batch)
            if after:
                self.next_batch, self.next_checked = after, trio.Event()
                self._side(self._prefetch_after, after, self.next_checked)
        return tickets

    async def _prefetch_after(self, tickets: list[Ticket], checked: trio.Event) -> None:
        assert self.guard is not None
        try:
            await self.guard.prefetch(tickets)
        finally:
            checked.set()

    def _still_owned(self, tickets: list[Ticket]) -> list[Ticket]:
        """Tickets whose partition was not revoked while they were held
        (during a prefetch); the others go back (and are dropped with their
        partition), as a revoke does with the ready queue."""
        if not self.draining and len(self.owned) == len(self.tp_ids):
            return tickets
        keep = []
        for t in tickets:
            if t.partition in self.draining or self.tps[t.partition] not in self.owned:
                self.d.retry(t)
                if t.partition in self.draining:
                    self.d.drop_queued([t.partition])
                    self.progress.unpark_all()
            else:
                keep.append(t)
        return keep

    async def _park(self) -> None:
        if self.closing:
            # Closing began while this worker waited (for the refill lock, a
            # prefetch): the wake-up that told the others is past.
            return
        self.runners -= 1
        try:
            await self.work.park()
        finally:
            self.runners += 1

    def _wake(self, n: int, *, by_worker: bool = False) -> None:
        """Wakes workers for ``n`` newly ready messages: all of them while
        handlers suspend, otherwise one, and only if none is awake (one
        worker runs handlers that never suspend as fast as many, and holds
        the loop for less). An awake worker always comes back for more
        without waiting on anything but the loop: waking a second one, which
        found the first awake and parked again, cost two steps of the loop at
        every flush and every push step (~6,000 a second)."""
        if n > 0:
            if time.perf_counter() >= self.suspending_until:
                if by_worker or self.runners > 0:
                    return
                n = 1
            self.work.unpark(count=n)

    async def _yield_if_due(self) -> None:
        """Checkpoints if the current slice of the loop is spent."""
        if time.perf_counter() > self.yield_at:
            slice_no = self.slice_no
            await trio.lowlevel.checkpoint()
            if self.slice_no == slice_no:
                self.slice_no += 1
                self.yield_at = time.perf_counter() + _SLICE

    def _flush(self, *, by_worker: bool = False) -> None:
        done = self.done
        if done:
            n = len(done)
            if self.acks is not None:
                self.to_ack.extend([(t.partition, t.offset) for t in done])
                self.ack_due.unpark_all()
            self.d.complete_many(done)
            done.clear()
            self._wake(n, by_worker=by_worker)
            # The feeder waits while short of room (_feed); waking it before
            # that is over is a step of the loop for nothing.
            if not self._short_of(self.d.free_capacity):
                self.space.unpark_all()
            self.progress.unpark_all()

    async def _worker(self) -> None:
        done, metrics = self.done, self.metrics
        counters, guard = metrics.counters, self.guard
        if guard is not None:
            gcheck, gapplied, flush_at = guard.core.check, guard.core.applied, guard.flush_at
        record_each = self.app.record_versions == "each"
        handler = self.app._handler
        assert handler is not None
        concurrency = self.app.concurrency
        perf_counter = time.perf_counter
        while True:
            if self.closing:
                return
            if perf_counter() > self.yield_at:
                if self.runners > 1 and perf_counter() >= self.suspending_until:
                    # Handlers are not suspending: one worker is enough.
                    await self._park()
                    continue
                await self._yield_if_due()
            ready = self.ready  # replaced when a revoke filters it
            if not ready:
                if not await self._refill():
                    return
                continue
            t = ready.popleft()
            msg = t.item
            sampled = not (t.offset & _SAMPLE_MASK)
            if sampled:
                queued_at = self.enqueued_at.pop((t.partition, t.offset), None)
            if t.attempt:
                msg = dataclasses.replace(msg, attempt=t.attempt)
            if msg.__class__ is not Message:
                # An UndecodableRecord: no handler can be given it.
                self._poison(t, msg, PoisonMessage(getattr(msg, "problem", "undecodable")))
                continue
            if guard is not None:
                try:
                    verdict = gcheck(t)
                    if verdict > DUPLICATE:
                        # Not prepared, or poison (which this raises).
                        verdict = guard.check(t)
                except PoisonMessage as e:
                    self._poison(t, msg, e)
                    continue
                except Exception as e:
                    # The table failed (closed, I/O): retried like a handler
                    # failure, never the end of the run.
                    self._failed(t, msg, e)
                    continue
                if verdict != RUN:
                    counters["stale_dropped" if verdict == STALE else "duplicates_skipped"] += 1
                    done.append(t)
                    continue
            if sampled:
                started = perf_counter()
                if queued_at is not None:
                    metrics.dispatch_latency.observe(started - queued_at)
            self.running += 1
            try:
                # Started by hand to learn whether it suspends (see
                # _handler_call): inlined, as it runs once per message.
                coro = handler(msg)
                try:
                    trap = coro.send(None)  # type: ignore[attr-defined]
                except StopIteration:
                    pass
                else:
                    # It suspends: every ready message gets a worker while
                    # handlers do (and for _SUSPENDING_FOR after). Asked at
                    # every suspension, not the first only: a worker may
                    # have parked since.
                    if self.ready and self.runners < concurrency:
                        self.work.unpark(count=len(self.ready))
                    self.suspending_until = perf_counter() + _SUSPENDING_FOR
                    await _handler_call.resume(coro, trap)  # type: ignore[arg-type]
                    self.suspending_until = perf_counter() + _SUSPENDING_FOR
            except Exception as e:
                self.running -= 1
                self._failed(t, msg, e)
                continue
            self.running -= 1
            if sampled:
                metrics.handler_latency.observe(perf_counter() - started)
            counters["handled"] += 1
            if t.attempt and self.blocked:
                self.blocked.pop((t.partition, t.offset), None)
            if guard is not None:
                if record_each:
                    # The write suspends this worker, as a suspending
                    # handler would: other workers must take what is ready
                    # meanwhile (see _wake).
                    self.suspending_until = perf_counter() + _SUSPENDING_FOR
                    # The effect is applied: nothing may stop its version
                    # from being written now.
                    with trio.CancelScope(shield=True):
                        try:
                            await guard.record(t)
                        except Exception as e:
                            # Not recorded, so not done: handled again later
                            # (at least once), never committed past.
                            self._failed(t, msg, e)
                            continue
                elif gapplied(t) >= flush_at:
                    guard.full.set()
            if not done:
                self.done_since = perf_counter()
            done.append(t)
            # Batched for throughput, but a completion never waits long: the
            # key's next message is blocked until it is flushed.
            if len(done) >= _FLUSH_EVERY or perf_counter() - self.done_since > _FLUSH_AFTER:
                self._flush(by_worker=True)

    def _failed(self, t: Ticket, msg: Message, error: Exception) -> None:
        counters = self.metrics.counters
        counters["failed"] += 1
        if t.partition in self.draining:
            # Its partition is being given up: the next owner retries it.
            self.d.retry(t)
            self.d.drop_queued([t.partition])
            self.progress.unpark_all()
            return
        deliveries = t.attempt + 1
        policy = self.app.retry
        log.warning(
            "handler failed on %s/%d@%d (attempt %d of %d): %r",
            msg.topic,
            msg.partition,
            msg.offset,
            deliveries,
            policy.max_attempts,
            error,
            extra={
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "key": msg.key,
            },
        )
        if policy.exhausted(deliveries):
            self._exhausted(t, msg, error, deliveries)
        else:
            counters["retried"] += 1
            self._side(self._retry_later, t, policy.delay(deliveries, self.rng))

    def _poison(self, t: Ticket, msg: Message, error: Exception) -> None:
        """A message no retry can help (its version or id cannot be read,
        its record cannot be decoded): straight to ``on_exhausted``."""
        self.metrics.counters["failed"] += 1
        self.metrics.counters["malformed"] += 1
        log.warning(
            "cannot handle %s/%d@%d: %s",
            msg.topic,
            msg.partition,
            msg.offset,
            error,
            extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
        )
        self._exhausted(t, msg, error, t.attempt + 1)

    def _exhausted(self, t: Ticket, msg: Message, error: Exception, deliveries: int) -> None:
        app = self.app
        where = f"{msg.topic}/{msg.partition}@{msg.offset}"
        if app.dlq is not None:
            self._side(self._dead_letter, t, msg, error, deliveries)
        elif app.on_exhausted == "skip":
            log.error(
                "giving up on %s after %d attempts (on_exhausted='skip'): %r",
                where,
                deliveries,
                error,
            )
            self.metrics.counters["skipped"] += 1
            self.done.append(t)
        else:
            self.blocked[(t.partition, t.offset)] = {
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "key": msg.key,
                "attempts": deliveries,
                "error": repr(error),
            }
            log.error(
                "%s failed %d times; its key stays blocked and it is retried every %.1fs "
                "(on_exhausted='block'; set dlq= or on_exhausted='skip' to move on): %r",
                where,
                deliveries,
                app.retry.backoff_max,
                error,
            )
            self.metrics.counters["retried"] += 1
            self._side(self._retry_later, t, app.retry.backoff_max)

    def _side(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self.side is not None
        self.side.start_soon(fn, *args)

    async def _retry_later(self, t: Ticket, delay: float) -> None:
        with trio.CancelScope() as scope:
            self.retrying[t] = scope
            try:
                await trio.sleep(delay)
            finally:
                del self.retrying[t]
        self.d.retry(t)
        if t.partition in self.draining:
            # Its partition is being given up: leave it to the next owner.
            self.d.drop_queued([t.partition])
            self.progress.unpark_all()
        self._wake(1)

    async def _dead_letter(
        self, t: Ticket, msg: Message, error: Exception, deliveries: int
    ) -> None:
        app = self.app
        assert app.dlq is not None
        record = DeadLetter.of(msg, error, deliveries, app.group).encode()
        delay = app.retry.backoff_base or 0.1
        while True:
            try:
                app.broker.produce(app.dlq, msg.key, record, {"keylane-dlq": "1"})
                await app.broker.flush()
                break
            except Exception as e:
                # Never drop it: the key stays blocked until the dead letter
                # is written.
                log.error(
                    "cannot write %s/%d@%d to %s: %r",
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    app.dlq,
                    e,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, app.retry.backoff_max)
        log.error(
            "dead-lettered %s/%d@%d to %s after %d attempts: %r",
            msg.topic,
            msg.partition,
            msg.offset,
            app.dlq,
            deliveries,
            error,
        )
        self.metrics.counters["dead_lettered"] += 1
        self.done.append(t)
        self._flush()

    # ---- committing -----------------------------------------------------------------------

    async def _committer(self) -> None:
        while True:
            due = trio.current_time() + self.app.commit_interval
            guard = self.guard
            while guard is not None and trio.current_time() < due:
                # Versions and ids recorded faster than one commit interval
                # holds are written early (offsets still wait for the
                # interval): see Guard.full.
                # The guard serializes flushes, so a commit's own flush
                # waits for this one and then writes the rest.
                with trio.move_on_at(due):
                    await guard.full.wait()
                    await guard.flush()
            await trio.sleep_until(due)
            try:
                await self._commit()
            except NotAssigned as e:
                log.info(
                    "group %s: commit refused (%s); the next fetch brings the rebalance",
                    self.app.group,
                    e,
                )
            except BrokerError as e:
                if not e.retriable:
                    raise
                # The next interval commits the (then larger) watermark.
                self.metrics.counters["broker_retries"] += 1
                log.warning("group %s: commit failed (%s); retrying", self.app.group, e)

    async def _acker(self) -> None:
        while True:
            if not self.to_ack:
                await self.ack_due.park()
                continue
            try:
                await self._ack(give_up_after=self.app.broker_timeout)
            except BrokerError as e:
                if not e.retriable:
                    raise
                # Still undeleted: the next ack, or the commit of the
                # watermark past them, covers them.
                self.metrics.counters["broker_retries"] += 1
                log.warning("group %s: ack failed (%s); retrying", self.app.group, e)
                await trio.sleep(0.1)

    async def _ack(self, *, give_up_after: float | None) -> None:
        """Acknowledges the done messages not acknowledged yet (their
        versions stored first, as for a commit)."""
        assert self.acks is not None
        async with self.ack_lock:
            self._flush()
            batch, self.to_ack = self.to_ack, []
            if not batch:
                return
            try:
                if self.guard is not None:
                    await self.guard.flush()
                done: dict[TopicPartition, list[int]] = {}
                for tpid, offset in batch:
                    tp = self.tps[self.virtual.get(tpid, tpid)]
                    if tp in self.owned:
                        done.setdefault(tp, []).append(offset)
                if done:
                    await self.calls.retrying(
                        "ack", self.acks.ack, done, give_up_after=give_up_after
                    )
            except BaseException:
                self.to_ack[:0] = batch
                raise
            self.metrics.counters["acks"] += len(batch)

    async def _commit(
        self, *, only: set[int] | None = None, give_up_after: float | None = 0.0
    ) -> None:
        if self.acks is not None and self.to_ack and only is None:
            await self._ack(give_up_after=give_up_after)
        async with self.commit_lock:
            self._flush()
            # Offsets first, versions second, commit third: every message
            # below these offsets has its version in the flush.
            marks = self.d.committable()
            if self.guard is not None:
                await self.guard.flush()
            offsets: dict[TopicPartition, int] = {}
            for tpid, offset in marks.items():
                if (only is not None and tpid not in only) or tpid in self.virtual_of:
                    continue
                if self.rp is not None:
                    offset = self._below_held(tpid, offset, marks)
                tp = self.tps[tpid]
                if tp in self.owned and self.committed.get(tpid) != offset:
                    offsets[tp] = offset
            if not offsets:
                await self.calls.call("heartbeat", self.consumer.heartbeat)
                return
            note = self.rp.note() if self.rp is not None else ""
            await self.calls.retrying(
                "commit", self.consumer.commit, offsets, note, give_up_after=give_up_after
            )
            for tp, offset in offsets.items():
                self.committed[self.tp_ids[tp]] = offset
            self.metrics.counters["commits"] += 1
            if self.debug:
                log.debug(
                    "group %s: committed %s",
                    self.app.group,
                    ", ".join(
                        f"{tp.topic}/{tp.partition}@{o}" for tp, o in sorted(offsets.items())
                    ),
                )

    def _below_held(self, tpid: int, offset: int, marks: dict[int, int]) -> int:
        """``offset``, or less: never past a record of the partition that is
        held, or released and not done yet."""
        assert self.rp is not None
        lowest = self.rp.lowest_held(tpid)
        vid = self.virtual.get(tpid)
        if vid is not None:
            released = self.released[vid]
            done_below = marks.get(vid, 0)
            while released and released[0][0] < done_below:
                released.popleft()
            if released:
                first = min(off for _, off in released)
                lowest = first if lowest is None else min(lowest, first)
        return offset if lowest is None else min(offset, lowest)

    # ---- observing ------------------------------------------------------------------------

    def gauges(self) -> dict[str, Any]:
        marks = self.d.committable()
        lag = {}
        for tp in self.owned:
            end = self.ends.get(tp)
            tpid = self.tp_ids[tp]
            if end is not None:
                lag[f"{tp.topic}/{tp.partition}"] = max(
                    0, end - marks.get(tpid, self.committed.get(tpid, end))
                )
        return {
            "in_flight": self.d.in_flight,
            "queued": self.d.queued,
            "running": self.running,
            "partitions": len(self.owned),
            "member": self.consumer.member_id,
            "lag": lag,
            "blocked": [dict(b) for b in self._blocked_report()],
        }


def _weakly(method: Callable[[list[Held]], None]) -> Callable[[list[Held]], None]:
    """``method`` called through a weak reference to its object. The Run
    owns what it hands callbacks to; a bound method there would close a
    cycle that keeps the Run's whole state (dispatcher, per-key maps) alive
    after it ends, until a full collection frees it in one pause of tens of
    milliseconds on whatever loop is running then."""
    ref = weakref.WeakMethod(method)

    def call(held: list[Held]) -> None:
        bound = ref()
        if bound is not None:
            bound(held)

    return call


def _describe(b: dict[str, Any]) -> str:
    return (
        f"{b['topic']}/{b['partition']}@{b['offset']} key={b['key']!r:.40} "
        f"after {b['attempts']} attempts: {b['error']:.120}"
    )
