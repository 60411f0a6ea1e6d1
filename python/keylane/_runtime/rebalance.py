"""Rebalances: a revoked partition is drained, committed and released
before the consumer lets it go.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

import trio

from keylane._native import Ticket
from keylane._runtime.state import State
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import BrokerError

log = logging.getLogger("keylane")


class Rebalancing(State):
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
        self.ahead = deque(
            (list(self._put_back_draining(batch)), checked) for batch, checked in self.ahead
        )
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
