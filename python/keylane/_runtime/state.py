"""What a run knows: the state every part of it (feed, rebalance, work,
failures, commit) shares, set up once."""

from __future__ import annotations

import logging
import random
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from keylane._broker_calls import BrokerCalls
from keylane._guard import Guard
from keylane._native import Dispatcher, Ticket
from keylane._repartition import Held, Repartition
from keylane.brokers.base import Acknowledging, Consumer, Fetch, TopicPartition
from keylane.message import Message
from keylane.metrics import Metrics

if TYPE_CHECKING:
    from keylane.app import App

log = logging.getLogger("keylane")


# Batches whose table lookups run while the one before them is handled. One
# left the loop idle for 4-5% of a no-op run (a read behind a write's fold
# on the other core outlasts a batch): two keep it busy.
READ_AHEAD = 2


class State:
    """The run's state; ``Run`` adds the parts that act on it."""

    def __init__(self, app: App, *, until_idle: bool) -> None:
        self.app = app
        self.until_idle = until_idle
        self.metrics: Metrics = app._metrics
        self.batch = max(16, min(1024, 4 * app.concurrency))
        # The feeder waits for room for this many records before fetching,
        # while more than low_water are queued or running (_feed).
        self.fetch_low = min(app.fetch_max, max(1, app.capacity // 4))
        self.low_water = 2 * self.batch
        # With a version table, READ_AHEAD batches after the one being
        # handled are popped early (their table lookups run meanwhile):
        # room for all of them.
        batches = 1 + READ_AHEAD if app._versions_table is not None else 1
        self.d = Dispatcher(
            app.ordering,
            capacity=app.capacity,
            max_in_flight=app.concurrency + batches * self.batch,
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
        # With a guard: the next batches, in order, popped while the one
        # before them is handled, each with an event set once its table
        # lookups (a worker-thread hop) are done; one refill at a time takes
        # the first (_checked_batch).
        self.ahead: deque[tuple[list[Ticket], trio.Event]] = deque()
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
        # With a guard that records on release: the tickets in ``done``
        # whose handler ran, recorded as applied in one call when ``done``
        # is flushed (_flush).
        self.applied: list[Ticket] = []
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

    if TYPE_CHECKING:
        # What the parts of a run ask of one another (each defined in the
        # part named), declared here so each part type-checks on its own.
        async def _commit(  # commit.py
            self, *, only: set[int] | None = None, give_up_after: float | None = 0.0
        ) -> None: ...
        def _failed(self, t: Ticket, msg: Message, error: Exception) -> None: ...  # failures.py
        def _poison(self, t: Ticket, msg: Message, error: Exception) -> None: ...  # failures.py
        def _side(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None: ...  # failures.py
        def _short_of(self, room: int) -> bool: ...  # feed.py
        async def _learn_growths(self, counts: Mapping[str, int]) -> None: ...  # feed.py
        def _release_held(self, held: list[Held]) -> None: ...  # feed.py
        async def _rebalance(self, fetch: Fetch) -> None: ...  # rebalance.py
        def _wake(self, n: int, *, by_worker: bool = False) -> None: ...  # work.py
        async def _yield_if_due(self) -> None: ...  # work.py
        def _flush(self, *, by_worker: bool = False) -> None: ...  # work.py


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
