"""The workers: ready tickets taken in batches, checked against the
version table, handled, and handed back in batches; the time slice.
"""

from __future__ import annotations

import dataclasses
import time

import trio

from keylane import _handler_call
from keylane._guard import DUPLICATE, RUN, STALE, PoisonMessage
from keylane._native import Ticket, first_step
from keylane._runtime.state import READ_AHEAD, State
from keylane.message import Message
from keylane.metrics import SAMPLE_EVERY

# Completions are handed back to the dispatcher (releasing their keys) in
# batches of at most this many, and whenever a worker runs dry.
_FLUSH_EVERY = 64
# ... or once the oldest unflushed completion is this old (seconds).
_FLUSH_AFTER = 0.0002
_SAMPLE_MASK = SAMPLE_EVERY - 1
# The most the runtime's tasks run without letting the event loop look
# around (timers, I/O, the service's other tasks), in seconds.
_SLICE = 0.0005
# first_step's answer for a handler that returned without suspending.
_DONE = object()
# Handlers count as suspending for this long after one did (seconds).
_SUSPENDING_FOR = 0.1


class Working(State):
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
        and the lookups of the READ_AHEAD batches after it started in the
        background: the loop runs this batch's handlers while a worker
        thread reads for the next ones, instead of waiting idle for every
        batch's read. Safe for per-key order: every one of these batches is
        popped, so no key is in two of them."""
        assert self.guard is not None
        tickets: list[Ticket] = []
        while self.ahead and not tickets:
            await self.ahead[0][1].wait()
            # A revoke meanwhile may have filtered the batches (same order).
            tickets = self._still_owned(self.ahead.popleft()[0])
        if not tickets:
            # None read ahead, or a revoke took all of it: read now.
            tickets = self.d.pop_ready(self.batch)
            if not tickets:
                return tickets
            await self.guard.prefetch(tickets)
            tickets = self._still_owned(tickets)
        while tickets and len(self.ahead) < READ_AHEAD:
            after = self.d.pop_ready(self.batch)
            if not after:
                break
            checked = trio.Event()
            self.ahead.append((after, checked))
            self._side(self._prefetch_after, after, checked)
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
            if self.applied:
                # Recorded before their keys are released: a key's next
                # message is checked against what this one applied.
                assert self.guard is not None
                if self.guard.core.applied_many(self.applied) >= self.guard.flush_at:
                    self.guard.full.set()
                self.applied.clear()
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
            applied = self.applied if guard.record_on_release else None
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
            # The message's own int: the ticket's getter makes a new one.
            sampled = not (msg.offset & _SAMPLE_MASK)
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
                trap = first_step(coro, _DONE)
                if trap is not _DONE:
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
                elif applied is not None:
                    applied.append(t)
                elif gapplied(t) >= flush_at:
                    guard.full.set()
            if not done:
                self.done_since = perf_counter()
            done.append(t)
            # Batched for throughput, but a completion never waits long: the
            # key's next message is blocked until it is flushed.
            if len(done) >= _FLUSH_EVERY or perf_counter() - self.done_since > _FLUSH_AFTER:
                self._flush(by_worker=True)
