"""SqsFifoConsumer: one App's member on SQS FIFO queues.

SQS has no partitions, offsets or group membership, so the mapping is:

- Each queue is a topic with one partition, 0, owned by every consumer at
  once: SQS itself hands each message group to one consumer at a time (a
  group whose oldest message is in flight returns nothing more until that
  message is deleted or its visibility lapses).
- Offsets are this consumer's own: received messages are numbered per queue
  in the order they arrive, which keeps each group's order (SQS returns a
  group's messages in order, and none of them while one is out).
- Handled messages are deleted one by one as soon as they are done (the
  ``ack`` path of ``brokers.base.Acknowledging``): deleting is what lets SQS
  hand out the group's next message, so waiting for a watermark would
  throttle every group to one batch per commit interval. A commit deletes
  whatever below its watermark is still undeleted. "Committed" here means
  deleted: never before the handler finished (or the message was
  dead-lettered or skipped).
- Every received message not yet deleted keeps its visibility extended
  (half a visibility timeout ahead, at every fetch, commit and heartbeat),
  so a long handler or a retry waiting out its backoff keeps its group
  blocked instead of letting SQS give the message to another consumer.
- ``close`` makes undeleted messages visible again at once, for others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from keylane.brokers._sqs_codec import decode
from keylane.brokers._sqs_common import broker_error
from keylane.brokers.base import Fetch, TopicPartition
from keylane.errors import BrokerError, NotAssigned
from keylane.message import Message

if TYPE_CHECKING:
    from keylane.brokers.sqs_fifo import SqsFifoBroker

log = logging.getLogger("keylane")
T = TypeVar("T")

_SYSTEM_ATTRIBUTES = ["SentTimestamp", "MessageGroupId", "ApproximateReceiveCount"]
_PER_CALL = 10  # SQS's most messages per receive, delete or change call
# The most receives one receiver makes for one fetch.
_RECEIVES = 8
# How long a fetch waits for handed-out messages to be acknowledged (s).
_SETTLE = 0.01


@dataclasses.dataclass
class _Out:
    """A received message not deleted yet."""

    message_id: str
    receipt: str
    # time.monotonic() when its visibility ends.
    deadline: float


class SqsFifoConsumer:
    def __init__(self, broker: SqsFifoBroker, group: str, topics: Sequence[str]) -> None:
        self._broker = broker
        self._group = group
        self._topics = tuple(topics)
        self._tps = frozenset(TopicPartition(t, 0) for t in self._topics)
        self._member = f"{group}-{uuid.uuid4().hex[:8]}"
        self._o = broker.options
        self._urls: dict[str, str] = {}
        self._joined = False
        self._reported = False
        self._closed = False
        self._lock = threading.Lock()
        self._out: dict[str, dict[int, _Out]] = {t: {} for t in self._topics}
        self._by_id: dict[str, tuple[str, int]] = {}
        self._next: dict[str, int] = dict.fromkeys(self._topics, 0)
        # Received, not yet returned by a fetch (a receive whose fetch was
        # cancelled lands here too: nothing received is dropped).
        self._buffer: deque[Message] = deque()
        self._paused: frozenset[str] = frozenset()
        self._extend_at = 0.0
        # Taken out of _out by an ack or commit, not deleted yet.
        self._to_delete: list[tuple[str, int, _Out]] = []
        # Set when nothing received is left unacknowledged.
        self._settled = trio.Event()
        self._turn = 0
        self.lapsed = 0
        # Every SQS call of this consumer (receive, delete, visibility) takes
        # one of ``receivers`` slots: ElasticMQ slows down under concurrent
        # calls on one FIFO queue, AWS does not (raise ``receivers`` there).
        self._limiter = trio.CapacityLimiter(self._o.receivers)

    @property
    def group(self) -> str:
        return self._group

    @property
    def member_id(self) -> str:
        return self._member

    def assignment(self) -> frozenset[TopicPartition]:
        return self._tps if self._joined and not self._closed else frozenset()

    def outstanding(self) -> int:
        """Messages received and not deleted yet."""
        with self._lock:
            return len(self._by_id)

    async def join(self) -> None:
        for t in self._topics:
            if t not in self._urls:
                self._urls[t] = await self._in_thread(self._broker.queue_url, t)
        self._joined = True

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # ---- receiving ------------------------------------------------------------------------

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        self._check_joined()
        await self._extend_if_due()
        assigned: frozenset[TopicPartition] = frozenset()
        if not self._reported:
            assigned, self._reported = self._tps, True
        with self._lock:
            busy = bool(self._by_id or self._to_delete)
        got = 0
        if max_records > 0 and not self._buffered():
            if busy:
                # Let what was handed out be handled and acknowledged first
                # (briefly): its deletes then go before the receive, which
                # ElasticMQ serves far faster with nothing in flight, and
                # frees its groups for this very receive.
                self._settled = trio.Event()
                with self._lock:
                    waiting = bool(self._by_id)
                if waiting:
                    with trio.move_on_after(_SETTLE):
                        await self._settled.wait()
            got = await self._receive(max_records, max_wait)
        records = self._take(max_records) if max_records > 0 else []
        chunks: dict[str, list[Message]] = {}
        for m in records:
            chunks.setdefault(m.topic, []).append(m)
        return Fetch(
            chunks=[(TopicPartition(t, 0), ms) for t, ms in chunks.items()],
            assigned=assigned,
            ends={TopicPartition(t, 0): n for t, n in self._next.items()},
            # Nothing of ours undeleted when we asked, and nothing came.
            at_end=max_records > 0 and not busy and got == 0 and not records,
        )

    def _buffered(self) -> bool:
        with self._lock:
            return any(m.topic not in self._paused for m in self._buffer)

    def _take(self, n: int) -> list[Message]:
        out: list[Message] = []
        keep: deque[Message] = deque()
        with self._lock:
            while self._buffer and len(out) < n:
                m = self._buffer.popleft()
                (keep if m.topic in self._paused else out).append(m)
            keep.extend(self._buffer)
            self._buffer = keep
        return out

    async def _receive(self, max_records: int, max_wait: float) -> int:
        queues = [t for t in self._topics if t not in self._paused]
        if not queues:
            await trio.sleep(max_wait)
            return 0
        # Long polls (whole seconds) only where the caller may wait that
        # long; an empty short poll waits out max_wait instead of spinning.
        wait = self._o.wait_time if max_wait >= 0.5 else 0
        calls = min(self._o.receivers, math.ceil(max_records / _PER_CALL))
        # Each receiver takes a share of max_records, in receives of 10.
        share = max(1, max_records // calls)
        plan = [(queues[(self._turn + i) % len(queues)], share) for i in range(calls)]
        self._turn += 1
        got: list[int] = []
        errors: list[BrokerError] = []

        async def one(queue: str, count: int) -> None:
            try:
                got.append(
                    await trio.to_thread.run_sync(
                        self._receive_sync,
                        queue,
                        count,
                        wait,
                        limiter=self._limiter,
                        abandon_on_cancel=True,
                    )
                )
            except BrokerError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for queue, count in plan:
                nursery.start_soon(one, queue, count)
        fatal = [e for e in errors if not e.retriable]
        if fatal or (errors and not sum(got)):
            raise (fatal or errors)[0]
        if not sum(got) and wait == 0:
            await trio.sleep(max_wait)
        return sum(got)

    def _receive_sync(self, queue: str, want: int, wait: int) -> int:
        """A receive of 10, and more while each came full from one message
        group (ElasticMQ serves one group per receive, so few busy groups
        need several receives to keep several keys running; AWS mixes
        groups), up to ``want`` messages or ``_RECEIVES`` receives. Returns
        how many came."""
        # Handled messages go first: they free their groups for this very
        # receive, and ElasticMQ serves FIFO receives several times slower
        # while messages are in flight (measured: docs/benchmarks.md).
        self._flush_deletes()
        got = 0
        for i in range(_RECEIVES):
            n, groups = self._receive_once(queue, min(_PER_CALL, want - got), wait if i == 0 else 0)
            got += n
            if n < _PER_CALL or groups > 1 or got >= want:
                break
        return got

    def _receive_once(self, queue: str, count: int, wait: int) -> tuple[int, int]:
        """How many messages came, and from how many groups."""
        try:
            r = self._broker.client.receive_message(
                QueueUrl=self._urls[queue],
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait,
                VisibilityTimeout=self._o.visibility_timeout,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=_SYSTEM_ATTRIBUTES,
            )
        except Exception as e:
            raise broker_error(e, f"receive from {queue}") from e
        raws: list[dict[str, Any]] = r.get("Messages", [])
        deadline = time.monotonic() + self._o.visibility_timeout
        with self._lock:
            if self._closed:
                # A receive that outlived close (its fetch was abandoned).
                raws, late = [], raws
            else:
                late = []
            for raw in raws:
                mid, receipt = raw["MessageId"], raw["ReceiptHandle"]
                known = self._by_id.get(mid)
                if known is not None:
                    # Its visibility lapsed while we held it and SQS gave it
                    # back to us: keep the one we have, with the new handle.
                    out = self._out[known[0]][known[1]]
                    out.receipt, out.deadline = receipt, deadline
                    continue
                offset = self._next[queue]
                self._next[queue] = offset + 1
                self._out[queue][offset] = _Out(mid, receipt, deadline)
                self._by_id[mid] = (queue, offset)
                self._buffer.append(decode(raw, queue, offset))
        if late:
            self._return_sync([(queue, i, raw["ReceiptHandle"]) for i, raw in enumerate(late)])
        return len(raws), len({raw.get("Attributes", {}).get("MessageGroupId") for raw in raws})

    # ---- visibility -----------------------------------------------------------------------

    async def _extend_if_due(self) -> None:
        now = time.monotonic()
        if now < self._extend_at:
            return
        vis = self._o.visibility_timeout
        self._extend_at = now + vis / 4
        with self._lock:
            due = [
                (q, off, out.receipt)
                for q, outs in self._out.items()
                for off, out in outs.items()
                if out.deadline - now < vis / 2
            ]
        if due:
            await self._in_thread(self._extend_sync, due)

    def _extend_sync(self, due: list[tuple[str, int, str]]) -> None:
        vis = self._o.visibility_timeout
        for q, part in _by_queue(due):
            started = time.monotonic()
            entries = [
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": vis}
                for i, (_, _, receipt) in enumerate(part)
            ]
            try:
                r = self._broker.client.change_message_visibility_batch(
                    QueueUrl=self._urls[q], Entries=entries
                )
            except Exception as e:
                raise broker_error(e, f"extend visibility on {q}") from e
            failed = {int(f["Id"]) for f in r.get("Failed", [])}
            with self._lock:
                for i, (_, off, _) in enumerate(part):
                    out = self._out[q].get(off)
                    if out is not None and i not in failed:
                        out.deadline = started + vis
            self._note_failures(q, r.get("Failed", []), "extend the visibility of")

    def _note_failures(self, queue: str, failed: list[dict[str, Any]], what: str) -> None:
        if not failed:
            return
        lapsed = [
            f
            for f in failed
            if f.get("Code") in ("ReceiptHandleIsInvalid", "InvalidParameterValue")
        ]
        self.lapsed += len(lapsed)
        if lapsed:
            log.warning(
                "sqs: could not %s %d message(s) of %s (%s): their visibility had lapsed, so "
                "SQS may hand them out again (at-least-once; a VersionTable drops the repeat)",
                what,
                len(lapsed),
                queue,
                lapsed[0].get("Message", lapsed[0].get("Code")),
            )
        other = [f for f in failed if f not in lapsed]
        if other:
            f = other[0]
            raise BrokerError(
                f"SQS: could not {what} {len(other)} message(s) of {queue}: "
                f"{f.get('Code')}: {f.get('Message')}",
                retriable=not f.get("SenderFault", False),
                code=str(f.get("Code")),
            )

    # ---- deleting -------------------------------------------------------------------------

    async def ack(self, done: Mapping[TopicPartition, Collection[int]]) -> None:
        """Deletes these handled messages (by offset)."""
        self._check_joined()
        picked: list[tuple[str, int, _Out]] = []
        with self._lock:
            for tp, offsets in done.items():
                outs = self._out.get(tp.topic)
                if outs is None or tp.partition != 0:
                    raise NotAssigned(f"{tp.topic}/{tp.partition} is not consumed by this member")
                for off in offsets:
                    out = outs.pop(off, None)
                    if out is not None:
                        picked.append((tp.topic, off, out))
                        del self._by_id[out.message_id]
        if picked:
            await self._delete(picked)

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        # SQS keeps no commit metadata: nothing here needs it (no partitions,
        # so no repartitioning to note).
        self._check_joined()
        picked: list[tuple[str, int, _Out]] = []
        with self._lock:
            for tp, mark in offsets.items():
                outs = self._out.get(tp.topic)
                if outs is None or tp.partition != 0:
                    raise NotAssigned(f"{tp.topic}/{tp.partition} is not consumed by this member")
                for off in [o for o in outs if o < mark]:
                    out = outs.pop(off)
                    picked.append((tp.topic, off, out))
                    del self._by_id[out.message_id]
        if picked:
            await self._delete(picked)
        await self._extend_if_due()

    async def _delete(self, picked: list[tuple[str, int, _Out]]) -> None:
        with self._lock:
            self._to_delete.extend(picked)
            if not self._by_id:
                self._settled.set()
        await self._in_thread(self._flush_deletes)

    def _flush_deletes(self) -> None:
        """Deletes what is queued for deletion (whichever call gets here
        first: an ack, a commit, or the next receive, which deletes before
        it receives)."""
        with self._lock:
            picked, self._to_delete = self._to_delete, []
        if not picked:
            return
        try:
            self._delete_sync(picked)
        except BaseException:
            # Not deleted (or not known to be): keep them, so a later ack,
            # commit or the visibility upkeep still covers them.
            with self._lock:
                for q, off, out in picked:
                    if out.message_id not in self._by_id:
                        self._out[q][off] = out
                        self._by_id[out.message_id] = (q, off)
            raise

    def _delete_sync(self, picked: list[tuple[str, int, _Out]]) -> None:
        for q, part in _by_queue([(q, off, out.receipt) for q, off, out in picked]):
            entries = [{"Id": str(i), "ReceiptHandle": r} for i, (_, _, r) in enumerate(part)]
            try:
                r = self._broker.client.delete_message_batch(
                    QueueUrl=self._urls[q], Entries=entries
                )
            except Exception as e:
                raise broker_error(e, f"delete from {q}") from e
            self._note_failures(q, r.get("Failed", []), "delete")

    async def heartbeat(self) -> None:
        self._check_joined()
        await self._extend_if_due()

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        # Never revoked: every consumer of a queue consumes all of it.
        return

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        self._paused = frozenset(tp.topic for tp in partitions)

    # ---- what SQS does not have -----------------------------------------------------------

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        raise _no_offsets("committed offsets")

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        raise _no_offsets("commit metadata")

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        raise _no_offsets("offsets by time")

    # ---- leaving --------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            back = [
                (q, off, out.receipt) for q, outs in self._out.items() for off, out in outs.items()
            ]
            for outs in self._out.values():
                outs.clear()
            self._by_id.clear()
            self._buffer.clear()
        if back and self._urls:
            await self._in_thread(self._return_sync, back)

    def _return_sync(self, back: list[tuple[str, int, str]]) -> None:
        """Undeleted messages become visible to other consumers now, not
        when their visibility would have lapsed."""
        for q, part in _by_queue(back):
            entries = [
                {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": 0}
                for i, (_, _, r) in enumerate(part)
            ]
            try:
                self._broker.client.change_message_visibility_batch(
                    QueueUrl=self._urls[q], Entries=entries
                )
            except Exception as e:
                # They come back when their visibility lapses instead.
                log.warning("sqs: could not return %d message(s) of %s: %s", len(part), q, e)

    def _check_joined(self) -> None:
        if self._closed:
            raise BrokerError(f"SQS consumer {self._member} is closed")
        if not self._joined:
            raise BrokerError(f"SQS consumer {self._member} has not joined")


def _by_queue(
    items: list[tuple[str, int, str]],
) -> list[tuple[str, list[tuple[str, int, str]]]]:
    """Items split per queue into calls of at most 10, each in offset order."""
    out: list[tuple[str, list[tuple[str, int, str]]]] = []
    per: dict[str, list[tuple[str, int, str]]] = {}
    for item in items:
        per.setdefault(item[0], []).append(item)
    for q, xs in per.items():
        xs.sort(key=lambda x: x[1])
        out.extend((q, xs[i : i + _PER_CALL]) for i in range(0, len(xs), _PER_CALL))
    return out


def _no_offsets(what: str) -> BrokerError:
    return BrokerError(
        f"SQS FIFO has no {what}: its queues have no partitions, so keylane never needs them "
        "(Fetch.partitions is empty and repartitioning cannot happen)"
    )
