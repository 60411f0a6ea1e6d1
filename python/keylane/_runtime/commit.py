"""The committer and the acker: versions flushed first, then offsets
(or acknowledgements), never past an unhandled message.
"""

from __future__ import annotations

import logging

import trio

from keylane._runtime.state import State
from keylane.brokers.base import TopicPartition
from keylane.errors import BrokerError, NotAssigned

log = logging.getLogger("keylane")


class Committing(State):
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
