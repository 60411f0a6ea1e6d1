"""The one protocol every broker adapter implements.

The runtime needs five things from a broker: join a consumer group, fetch
records of the partitions it was assigned (and learn of assignment changes),
commit offsets, produce (for the dead-letter queue and replays), and leave.
Rebalances are reported in band by ``fetch``: partitions being taken away
arrive in ``Fetch.revoked``; the consumer keeps them until the runtime has
drained and committed them and calls ``release``. Only then may another
member of the group start on them, which is what keeps one key from being
processed in two places at once during a rebalance.

What the runtime promises every adapter, and asks of it:

- **Bounded calls.** Every call is made under a timeout (``App``'s
  ``broker_timeout``; a fetch gets its ``max_wait`` on top) and may be
  cancelled there. An adapter must stay usable after a cancelled call: work
  it handed to a thread is kept, not lost (the next call picks it up).
- **Errors.** Raise ``BrokerError`` (or a subclass) with ``retriable=True``
  for what may succeed if tried again: the runtime retries it with a
  backoff. Anything else ends the run. ``NotAssigned`` from ``commit`` means
  a rebalance took the partitions; the runtime waits for the fetch that
  reports it.
- **Backpressure.** While the runtime has no room it does not stop calling
  the consumer: at least every 0.2 s it calls ``fetch(0, 0.0)``. With
  ``max_records == 0`` an adapter returns no records, only assignment
  changes, and may pause fetching from the broker (Kafka pauses its
  partitions); the next fetch with ``max_records > 0`` resumes. So a member
  stays in its group however long handlers take, and still sees rebalances.
- **Commits** are next-offset-to-read per partition, exactly the watermark:
  the runtime never asks to commit past a message that is not done.
- **Acknowledgements** (``Acknowledging``, optional). A broker that
  deletes messages one by one (SQS) also gets every handled message's
  offset through ``ack``, soon after it is done (after the version table
  has stored its version); watermark commits go on as well.
- **Repartitioning.** ``Fetch.partitions`` says how many partitions each
  subscribed topic has now, as the broker sees it; when a count grows the
  runtime holds records of keys that moved until the group has committed
  what came before them on their old partition, which it learns from
  ``committed_offsets`` and ``offsets_for_times`` (any partition, owned by
  any member). ``set_paused`` keeps fetches off partitions whose records
  are held while memory is short (see docs/design.md, "Repartitioning").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from keylane.message import HeaderValue, KeyLike, Message, ValueLike


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """What one ``fetch`` returns.

    ``chunks`` holds records grouped by partition, each chunk in offset
    order (a redelivery may repeat offsets already fetched). ``ends`` gives,
    for each assigned partition, the offset the next produced record will
    get (for lag). ``at_end`` is true when every
    assigned partition has been read to its end.
    """

    chunks: Sequence[tuple[TopicPartition, Sequence[Message]]] = ()
    assigned: frozenset[TopicPartition] = frozenset()
    revoked: frozenset[TopicPartition] = frozenset()
    # Taken away without a chance to commit (this member was declared dead):
    # drop them at once; another member may already be processing them.
    lost: frozenset[TopicPartition] = frozenset()
    ends: Mapping[TopicPartition, int] = dataclasses.field(default_factory=dict)
    at_end: bool = False
    # The group is stable: no partition waits to change hands and each has
    # a live owner. "Idle" means nothing unless the group is settled.
    settled: bool = True
    # Partition count of each subscribed topic as the broker sees it now
    # (empty: the adapter cannot tell, and the runtime cannot defend
    # against repartitioning).
    partitions: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Consumer(Protocol):
    """A member of a consumer group."""

    @property
    def group(self) -> str: ...

    @property
    def member_id(self) -> str: ...

    def assignment(self) -> frozenset[TopicPartition]:
        """Partitions this member owns (revoked ones until released)."""
        ...

    async def join(self) -> None:
        """Joins the group; assignments arrive with the next fetches."""
        ...

    async def fetch(self, max_records: int, max_wait: float) -> Fetch:
        """Records (at most ``max_records``) and assignment changes; waits up
        to ``max_wait`` seconds when there is nothing to return."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int], metadata: str = "") -> None:
        """Commits next-offset-to-read per partition, with ``metadata``
        stored beside each offset (Kafka's commit metadata; the runtime
        notes topic growths still in transition there). Raises
        ``NotAssigned`` for partitions this member does not own."""
        ...

    async def heartbeat(self) -> None:
        """Tells the group this member is alive (fetch and commit do too)."""
        ...

    async def release(self, partitions: Collection[TopicPartition]) -> None:
        """Gives up revoked partitions, after their final commit."""
        ...

    def set_paused(self, partitions: Collection[TopicPartition]) -> None:
        """From the next fetch on, returns no records of ``partitions`` (the
        set replaces the previous one; empty resumes all). Membership and
        rebalances are unaffected."""
        ...

    async def committed_offsets(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The group's committed offset (next to read) of each partition,
        whichever member owns it; the log start where nothing is committed."""
        ...

    async def committed_metadata(
        self, partitions: Collection[TopicPartition]
    ) -> dict[TopicPartition, str]:
        """The metadata committed with each partition's offset, whichever
        member committed it ("" where there is none)."""
        ...

    async def offsets_for_times(
        self, times: Mapping[TopicPartition, float]
    ) -> dict[TopicPartition, int]:
        """Per partition, the earliest offset whose record timestamp (seconds
        since the epoch) is at or after the given time; the end offset where
        no record is that recent."""
        ...

    async def close(self) -> None:
        """Leaves the group at once; its partitions go to the others."""
        ...


class Broker(Protocol):
    """A message broker keylane can consume from and produce to.

    Optionally, ``metadata_max_age`` (seconds): how long after a topic grows
    producers may still place keys by the old partition count (the default
    of App's ``repartition_grace``)."""

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        """A new member of ``group`` subscribed to ``topics`` (not joined yet)."""
        ...

    def produce(
        self,
        topic: str,
        key: KeyLike | None = None,
        value: ValueLike = b"",
        headers: Mapping[str, HeaderValue] | None = None,
        *,
        partition: int | None = None,
    ) -> object:
        """Queues a record for sending; ``flush`` waits until it is sent.
        (What it returns is adapter-specific.)"""
        ...

    async def flush(self) -> None:
        """Waits until everything produced so far is stored by the broker."""
        ...


@runtime_checkable
class Acknowledging(Protocol):
    """A consumer that is told of each handled message, not only of the
    watermark: for brokers where a message holds others back until it is
    acknowledged (an SQS FIFO group gives out nothing more while one of its
    messages is undeleted), so waiting for the watermark would stall them.
    The runtime calls ``ack`` with the offsets of messages that are done
    (handled, dead-lettered or skipped), batched, never one not done."""

    async def ack(self, done: Mapping[TopicPartition, Collection[int]]) -> None: ...
