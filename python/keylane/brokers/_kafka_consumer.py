"""KafkaConsumer: one member of a Kafka consumer group, for the runtime.

librdkafka is driven from worker threads, one hop per batch. The hop that
consumes may outlive the ``fetch`` that started it: rebalance callbacks run
inside ``consume()``, and the revoke callback must not return until the
runtime has drained, committed and released the partitions — which the
runtime does only after ``fetch`` has told it about the revoke. So a fetch
returns as soon as the callback reports a revoke, while the hop (blocked in
the callback) stays in flight; ``release`` lets it go on, and the next fetch
collects its records. That is why the consume hop is started with
``trio.lowlevel.start_thread_soon`` and its outcome kept on the consumer
rather than awaited by one ``to_thread.run_sync`` call; every other call
(join, commit, close) is one ``to_thread.run_sync`` hop under the broker's
``CapacityLimiter``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import confluent_kafka
import outcome
import trio

from keylane.brokers._kafka_common import (
    RateLimitedLog,
    broker_error,
    client_config,
    from_exception,
)
from keylane.brokers._kafka_lookup import Lookup, partition_counts
from keylane.brokers._kafka_records import Batch, convert, watermarks
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import InvalidArgument, InvalidType, NotAssigned, UnknownTopic
from keylane.message import Message

if TYPE_CHECKING:
    from keylane.brokers.kafka import KafkaBroker

log = logging.getLogger("keylane.brokers.kafka")

_KTP = confluent_kafka.TopicPartition
# librdkafka takes at most this many messages per consume call.
_CONSUME_MAX = 100_000
# A consume hop returns what it has after at most this long.
_CONSUME_SLICE = 0.002
# Bound of each metadata or offsets query made from a consume hop.
_QUERY_TIMEOUT = 5.0
# Partition counts are asked this often (seconds), and on every assignment.
_COUNTS_EVERY = 1.0


def consumer_config(broker: KafkaBroker, group: str) -> dict[str, Any]:
    """The librdkafka options of a keylane consumer in ``group`` (the
    benchmark's bare loop runs with the same)."""
    config = client_config(
        broker.bootstrap_servers,
        broker.config,
        consumer=True,
        group_id=group,
        enable_auto_commit=False,
        enable_auto_offset_store=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy="cooperative-sticky",
        # librdkafka's default (1 s) idles a consumer that drains its
        # prefetch queue within a second: a bare loop on 1M records spent
        # ~80% of its time in these pauses (docs/benchmarks.md, Kafka).
        fetch_queue_backoff_ms=100,
    )
    config["group.id"] = group
    # The runtime commits exactly its watermark; nothing else may.
    config["enable.auto.commit"] = False
    return config


class KafkaConsumer:
    """A member of a Kafka consumer group (see ``keylane.brokers.base.Consumer``)."""

    def __init__(self, broker: KafkaBroker, group: str, topics: tuple[str, ...]) -> None:
        self._broker = broker
        self._group = group
        self._topics = topics
        self._config = consumer_config(broker, group)
        self._errors = RateLimitedLog()
        self._config["error_cb"] = self._on_error
        self._c: confluent_kafka.Consumer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Shared with the callbacks (worker threads), under _lock.
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._owned: set[TopicPartition] = set()
        self._revoking: set[TopicPartition] = set()
        self._new_assigned: set[TopicPartition] = set()
        self._new_revoked: set[TopicPartition] = set()
        self._new_lost: set[TopicPartition] = set()
        self._seen_assignment = False
        self._fatal: confluent_kafka.KafkaError | None = None
        self._closing = False
        # Trio side.
        self._wake = trio.Event()
        self._hop: trio.Event | None = None
        self._hop_result: outcome.Outcome[Batch] | None = None
        self._carry: dict[TopicPartition, list[Message]] = {}
        self._paused = False
        # Partitions the runtime asked to pause (set_paused), and those
        # paused on the client for it.
        self._want_paused: frozenset[TopicPartition] = frozenset()
        self._held_paused: frozenset[TopicPartition] = frozenset()
        self._counts: dict[str, int] = {}
        self._counts_at = 0.0
        self._lookup = Lookup(broker, self._config)
        self._ends: dict[TopicPartition, int] = {}
        # Committed offset of each assigned partition nothing was consumed
        # from yet (asked once per assignment).
        self._starts: dict[TopicPartition, int] = {}
        self._ends_at = 0.0
        # Held by whichever thread calls into the client: a consume hop
        # (rebalance callbacks included) or a commit.
        self._client_lock = threading.Lock()
        self._requests: deque[
            tuple[list[confluent_kafka.TopicPartition], concurrent.futures.Future[None]]
        ] = deque()
        # The revoke callback waits at most this long for the runtime to
        # release (below max.poll.interval.ms, which the wait holds up).
        poll_interval = float(self._config.get("max.poll.interval.ms", 300_000)) / 1000
        self.revoke_timeout = 0.8 * poll_interval

    # ---- protocol -------------------------------------------------------------------------

    @property
    def group(self) -> str:
        return self._group

    @property
    def member_id(self) -> str:
        c = self._c
        try:
            return (c.memberid() or "") if c is not None else ""
        except RuntimeError:  # closed
            return ""

    def assignment(self) -> frozenset[TopicPartition]:
        with self._lock:
            return frozenset(self._owned)

    async def join(self) -> None:
        if self._c is not None:
            return
        self._token = trio.lowlevel.current_trio_token()
        self._c = await self._broker._in_thread(self._open)

    def _open(self) -> confluent_kafka.Consumer:
        try:
            c = confluent_kafka.Consumer(self._config)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, "creating the consumer") from None
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"kafka: invalid consumer config: {e}") from None
        try:
            meta = c.list_topics(timeout=min(10.0, self._broker.timeout))
            missing = [t for t in self._topics if t not in meta.topics or meta.topics[t].error]
            if missing:
                raise UnknownTopic(
                    f"kafka: topic(s) {', '.join(map(repr, missing))} do not exist on "
                    f"{self._broker.bootstrap_servers}; create them first "
                    "(KafkaBroker.create_topic or your deployment's tooling)"
                )
            c.subscribe(
                list(self._topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except confluent_kafka.KafkaException as e:
            c.close()
            raise from_exception(
                e, f"reaching {self._broker.bootstrap_servers} to join group {self._group!r}"
            ) from None
        except BaseException:
            c.close()
            raise
        return c

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        if self._c is None:
            raise InvalidArgument("consumer has not joined its group (call join() first)")
        deadline = trio.current_time() + max_wait
        polled = False
        at_end = False
        while True:
            if self._hop is not None and self._hop.is_set():
                at_end = self._collect()
            if self._fatal is not None:
                raise broker_error(self._fatal, "consuming")
            if self._events_pending() or (self._carry and max_records > 0) or at_end:
                return self._fetch_result(self._take(max_records), at_end=at_end)
            if polled and trio.current_time() >= deadline:
                return self._fetch_result({}, at_end=False)
            hop = self._hop
            if hop is None:
                hop = self._start_hop(max_records, max(0.0, deadline - trio.current_time()))
                polled = True
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()
            if not hop.is_set() and trio.current_time() >= deadline:
                return self._fetch_result({}, at_end=False)

    def _collect(self) -> bool:
        """Takes the finished hop's records into the carry; returns whether
        it found every assigned partition consumed to its end."""
        assert self._hop_result is not None
        result, self._hop, self._hop_result = self._hop_result, None, None
        batch = result.unwrap()
        with self._lock:
            active = self._owned - self._revoking
        self._ends.update(batch.ends)
        for tp, records in batch.chunks.items():
            # A revoke may have come in since the hop consumed these.
            if tp in active:
                self._carry.setdefault(tp, []).extend(records)
        return batch.at_end

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        if self._c is None:
            raise InvalidArgument("consumer has not joined its group (call join() first)")
        with self._lock:
            foreign = [tp for tp in offsets if tp not in self._owned]
        if foreign:
            raise NotAssigned(
                f"group {self._group}: this member does not own "
                f"{', '.join(f'{tp.topic}/{tp.partition}' for tp in sorted(foreign))}; "
                "it was reassigned in a rebalance"
            )
        if not isinstance(metadata, str):
            raise InvalidType(f"metadata must be a str, not {type(metadata).__name__}")
        ktps = [_KTP(tp.topic, tp.partition, off, metadata=metadata) for tp, off in offsets.items()]
        request: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._requests.append((ktps, request))
            self._released.notify_all()
        # Abandoned on timeout: the request stays queued and is made in
        # order, so a late commit never lands after a newer one.
        await self._broker._in_thread(self._commit_when_served, request, abandon=True)

    def _commit_when_served(self, request: concurrent.futures.Future[None]) -> None:
        """Waits until ``request`` is made: by this thread if no consume call
        runs, else by the consume hop's thread (after its consume returns,
        or from inside a rebalance callback, where librdkafka expects it)."""
        while not request.done():
            if self._client_lock.acquire(timeout=0.05):
                try:
                    with self._lock:
                        self._serve_requests()
                finally:
                    self._client_lock.release()
        request.result()

    def _serve_requests(self) -> None:
        """Makes the queued commits, in order. Called with ``_lock`` held by
        the thread that holds ``_client_lock``: librdkafka does not answer a
        commit made from one thread while another is inside ``consume()``
        (a rebalance callback in it waits for the release, which waits for
        that commit)."""
        while self._requests:
            ktps, request = self._requests.popleft()
            self._lock.release()
            try:
                self._commit_sync(ktps)
                request.set_result(None)
            except BaseException as e:
                request.set_exception(e)
            finally:
                self._lock.acquire()

    def _commit_sync(self, ktps: list[confluent_kafka.TopicPartition]) -> None:
        c = self._c
        assert c is not None
        try:
            done = c.commit(offsets=ktps, asynchronous=False)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, "commit") from None
        failed = [tp for tp in done or () if tp.error is not None]
        if failed:
            first = failed[0]
            raise broker_error(first.error, f"commit of {first.topic}/{first.partition}")

    async def heartbeat(self) -> None:
        # librdkafka heartbeats from its own thread; liveness towards
        # max.poll.interval.ms is kept by fetch, which the runtime calls
        # even while it is full.
        await trio.lowlevel.checkpoint()

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        with self._lock:
            self._revoking.difference_update(partitions)
            self._owned.difference_update(partitions)
            for tp in partitions:
                self._carry.pop(tp, None)
                self._ends.pop(tp, None)
            self._released.notify_all()
        await trio.lowlevel.checkpoint()

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        # Applied by the next consume hop, the thread that drives the client.
        self._want_paused = frozenset(partitions)

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return await self._lookup.committed(partitions)

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        return await self._lookup.committed_metadata(partitions)

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        return await self._lookup.offsets_for_times(times)

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            await self._broker._in_thread(self._lookup.close, abandon=True)
        c = self._c
        if c is None:
            return
        with self._lock:
            self._closing = True
            self._revoking.clear()
            self._released.notify_all()
        if self._hop is not None:
            # A consume hop returns within its wait; never close under it.
            with trio.move_on_after(self._broker.timeout):
                await self._hop.wait()
            if not self._hop.is_set():
                log.error(
                    "group %s: a consume call did not return; leaving without closing "
                    "(the group notices after session.timeout.ms)",
                    self._group,
                )
                return
        self._c = None
        with contextlib.suppress(RuntimeError):  # already closed
            await self._broker._in_thread(self._close_client, c, abandon=True)

    def _close_client(self, c: confluent_kafka.Consumer) -> None:
        with self._client_lock:
            with self._lock:
                self._serve_requests()
            c.close()

    # ---- internals ------------------------------------------------------------------------

    def _events_pending(self) -> bool:
        with self._lock:
            return bool(self._new_assigned or self._new_revoked or self._new_lost)

    def _take(self, max_records: int) -> dict[TopicPartition, list[Message]]:
        if max_records <= 0 or not self._carry:
            return {}
        taken: dict[TopicPartition, list[Message]] = {}
        left = max_records
        for tp in list(self._carry):
            records = self._carry[tp]
            if len(records) <= left:
                taken[tp] = records
                del self._carry[tp]
                left -= len(records)
            else:
                taken[tp], self._carry[tp] = records[:left], records[left:]
                left = 0
            if not left:
                break
        return taken

    def _fetch_result(self, chunks: dict[TopicPartition, list[Message]], *, at_end: bool) -> Fetch:
        with self._lock:
            assigned, self._new_assigned = frozenset(self._new_assigned), set()
            revoked, self._new_revoked = frozenset(self._new_revoked), set()
            lost, self._new_lost = frozenset(self._new_lost), set()
            owned = frozenset(self._owned)
            settled = self._seen_assignment and not self._revoking
        ends = {tp: e for tp, e in self._ends.items() if tp in owned}
        return Fetch(
            chunks=list(chunks.items()),
            assigned=assigned,
            revoked=revoked,
            lost=lost,
            ends=ends,
            at_end=at_end and not self._carry,
            settled=settled,
            partitions=dict(self._counts),
        )

    def _start_hop(self, max_records: int, wait: float) -> trio.Event:
        done = self._hop = trio.Event()
        token = self._token
        assert token is not None

        def deliver(result: outcome.Outcome[Batch]) -> None:
            def land() -> None:
                self._hop_result = result
                done.set()
                self._wake.set()

            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(land)

        pause = max_records <= 0
        trio.lowlevel.start_thread_soon(
            lambda: self._consume(max(1, min(max_records, _CONSUME_MAX)), wait, pause),
            deliver,
            name=f"keylane kafka consume {self._group}",
        )
        return done

    def _consume(self, n: int, wait: float, pause: bool) -> Batch:
        with self._client_lock:
            try:
                return self._consume_locked(n, wait, pause)
            finally:
                # Commits queued while consume() ran are made now.
                with self._lock:
                    self._serve_requests()

    def _consume_locked(self, n: int, wait: float, pause: bool) -> Batch:
        c = self._c
        assert c is not None
        try:
            if pause != self._paused:
                # Paused, librdkafka stops fetching (and drops what it
                # prefetched) but consume() still serves the group: the
                # member stays in, rebalances still arrive.
                current = c.assignment()
                if current:
                    (c.pause if pause else c.resume)(current)
                self._paused = pause
            elif pause:
                # Partitions assigned while paused start paused too.
                current = c.assignment()
                if current:
                    c.pause(current)
            if not pause:
                self._pause_held(c)
            if time.monotonic() - self._counts_at > _COUNTS_EVERY:
                self._refresh_counts(c)
            # librdkafka's batch consume waits for a full batch or the
            # timeout: in slices, so what has arrived is returned within a
            # few milliseconds instead of after the whole wait.
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                raw = c.consume(n, max(0.0, min(_CONSUME_SLICE, left)))
                if raw or left <= _CONSUME_SLICE:
                    break
            if not self._counts_at:
                self._refresh_counts(c)
            chunks = convert(raw, self._errors)
            if chunks:
                # End offsets only feed the lag gauge while records flow:
                # refreshed twice a second, not per batch.
                now = time.monotonic()
                if now - self._ends_at < 0.5:
                    return Batch(chunks, {}, at_end=False)
                self._ends_at = now
                return Batch(chunks, self._cached_ends(c), at_end=False)
            try:
                ends, at_end = self._query_ends(c)
            except confluent_kafka.KafkaException as e:
                # Only the idle check failed (e.g. a leader moving): not
                # at the end yet, ask again on the next empty fetch.
                err = e.args[0] if e.args else None
                if isinstance(err, confluent_kafka.KafkaError):
                    self._errors(err, f"group {self._group} end offsets")
                return Batch(chunks, {}, at_end=False)
            return Batch(chunks, ends, at_end=at_end and not pause)
        except confluent_kafka.KafkaException as e:
            raise from_exception(e, "consume") from None

    def _pause_held(self, c: confluent_kafka.Consumer) -> None:
        want = self._want_paused
        with self._lock:
            want = frozenset(want & self._owned)
        if want:
            # Again every hop: a partition reassigned meanwhile starts unpaused.
            c.pause([_KTP(tp.topic, tp.partition) for tp in want])
        resume = self._held_paused - want
        if resume:
            with self._lock:
                resume = frozenset(resume & self._owned)
            if resume:
                c.resume([_KTP(tp.topic, tp.partition) for tp in resume])
        self._held_paused = want

    def _refresh_counts(self, c: confluent_kafka.Consumer) -> None:
        self._counts_at = time.monotonic()
        try:
            self._counts.update(partition_counts(c, self._topics, _QUERY_TIMEOUT))
        except confluent_kafka.KafkaException as e:
            err = e.args[0] if e.args else None
            if isinstance(err, confluent_kafka.KafkaError):
                self._errors(err, f"group {self._group} partition counts")

    def _cached_ends(self, c: confluent_kafka.Consumer) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = {}
        for tp in self.assignment():
            _, high = watermarks(c, _KTP(tp.topic, tp.partition), cached=True) or (0, -1)
            if high >= 0:
                ends[tp] = high
        return ends

    def _query_ends(self, c: confluent_kafka.Consumer) -> tuple[dict[TopicPartition, int], bool]:
        """End offsets of the assigned partitions, and whether this member
        has consumed every one of them up to there.

        The end offsets are those of the last fetch responses (librdkafka
        keeps them while it long-polls the partitions); the broker is asked
        only where none is known yet, and the committed start of a
        partition nothing was consumed from once per assignment."""
        with self._lock:
            active = [tp for tp in self._owned if tp not in self._revoking]
        ktps = [_KTP(tp.topic, tp.partition) for tp in active]
        positions = {(p.topic, p.partition): p.offset for p in c.position(ktps)} if ktps else {}
        unknown = [
            k
            for tp, k in zip(active, ktps, strict=True)
            if positions.get((k.topic, k.partition), -1) < 0 and tp not in self._starts
        ]
        if unknown:
            for p in c.committed(unknown, timeout=_QUERY_TIMEOUT):
                self._starts[TopicPartition(p.topic, p.partition)] = p.offset
        ends: dict[TopicPartition, int] = {}
        at_end = True
        for tp, k in zip(active, ktps, strict=True):
            pos = positions.get((tp.topic, tp.partition), -1)
            if pos < 0:
                pos = self._starts.get(tp, -1)
            low, high = watermarks(c, k, cached=True) or (-1, -1)
            if high < 0 or (pos < 0 and low < 0):
                low, high = watermarks(c, k, timeout=_QUERY_TIMEOUT, cached=False) or (0, 0)
            ends[tp] = high
            if pos < 0:
                pos = low  # nothing committed: auto.offset.reset=earliest
            if pos < high:
                at_end = False
        return ends, at_end

    # ---- librdkafka callbacks (run in the consume hop's thread) ----------------------------

    def _poke(self) -> None:
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._wake.set)

    def _on_error(self, err: confluent_kafka.KafkaError) -> None:
        self._errors(err, f"group {self._group}")
        if err.fatal():
            self._fatal = err
            self._poke()

    def _on_assign(self, _c: object, partitions: list[confluent_kafka.TopicPartition]) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        if tps:
            # Asked when consume() returns (a client call made inside a
            # callback corrupts confluent-kafka's per-thread call state), still
            # before the hop hands the partitions' records to the runtime.
            self._counts_at = 0.0
        with self._lock:
            self._seen_assignment = True
            for tp in tps:
                self._starts.pop(tp, None)
            self._owned |= tps
            self._new_assigned |= tps
            self._new_lost -= tps
        if tps:
            log.info("group %s: assigned %s", self._group, sorted(tps))
        self._poke()

    def _on_revoke(self, _c: object, partitions: list[confluent_kafka.TopicPartition]) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        with self._lock:
            if self._closing or not tps:
                self._owned -= tps
                return
            self._revoking |= tps
            self._new_revoked |= tps
        self._poke()
        deadline = time.monotonic() + self.revoke_timeout
        with self._lock:
            while self._revoking & tps and not self._closing:
                self._serve_requests()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._released.wait(left)
            self._serve_requests()
            stuck = self._revoking & tps
            if stuck:
                # Past the bound the group would throw this member out:
                # give the partitions up uncommitted and say so.
                log.error(
                    "group %s: %s not released within %.0fs of their revoke; reporting them "
                    "lost (uncommitted messages will be redelivered to their next owner)",
                    self._group,
                    sorted(stuck),
                    self.revoke_timeout,
                )
                self._revoking -= stuck
                self._owned -= stuck
                self._new_lost |= stuck
                self._new_revoked -= stuck
        self._poke()

    def _on_lost(self, _c: object, partitions: list[confluent_kafka.TopicPartition]) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        with self._lock:
            self._owned -= tps
            self._revoking -= tps
            self._new_lost |= tps
            self._released.notify_all()
        log.warning("group %s: lost %s (session expired or fenced)", self._group, sorted(tps))
        self._poke()
