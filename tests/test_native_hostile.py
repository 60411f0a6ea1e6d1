"""Hostile use of the native types, from several threads at once: a
hypothesis state machine mixes valid and invalid operations on one
``Dispatcher`` and one ``VersionTable``, each step run by a few threads
together. Whatever it does, every failure is a ``KeylaneError`` of the right
kind (never a ``PanicException``, never a crash), nothing deadlocks (every
join is bounded), and the invariants hold afterwards: at most one ticket per
key in flight, the watermark never moves back, versions never go back."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import keylane
from keylane import Dispatcher, Ticket, VersionTable

THREADS = 3
JOIN_BOUND = 30.0

GOOD_KEYS = st.sampled_from([b"a", b"b", b"c", "d", None])
BAD_KEYS = st.one_of(st.integers(), st.floats(), st.lists(st.integers(), max_size=2))
TABLE_KEYS = st.one_of(
    st.sampled_from([b"a", b"b", "c"]),
    st.just(b""),  # refused: empty
    st.just(b"x" * 600),  # refused: over 511 bytes
    st.just("\ud800"),  # refused: not UTF-8
    BAD_KEYS,
)
INTS = st.one_of(
    st.integers(min_value=-3, max_value=50),
    st.sampled_from([2**31, 2**32 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
)


def together(calls: list[Callable[[], None]]) -> list[BaseException]:
    """Runs the calls in threads started at once; returns what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], None]) -> None:
        barrier.wait(JOIN_BOUND)
        try:
            call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_BOUND)
    assert not any(t.is_alive() for t in threads), "a native call deadlocked"
    return errors


def expected(e: BaseException) -> bool:
    """A typed keylane error: bad input (ValueError/TypeError), a full
    dispatcher (QueueFull), a store error (OSError). A PanicException (a
    BaseException from Rust) or any other exception is a defect."""
    return isinstance(e, keylane.KeylaneError)


class Hostile(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Dispatcher("key", capacity=64, max_in_flight=8)
        self.held: list[Ticket] = []
        self.lock = threading.Lock()
        self.next_offset = {0: 0, 1: 0}
        self.marks: dict[int, int] = {}
        path = os.path.join(self.tmp, f"t{id(self)}")
        self.table = VersionTable(path, durable=False)
        self.versions: dict[bytes, int] = {}

    tmp = ""  # set by the test below

    def _offsets(self, partition: int, n: int) -> list[int]:
        start = self.next_offset[partition]
        self.next_offset[partition] = start + n
        return list(range(start, start + n))

    @rule(keys=st.lists(GOOD_KEYS, min_size=1, max_size=6), partition=st.sampled_from([0, 1]))
    def push_valid(self, keys: list[bytes | str | None], partition: int) -> None:
        def push() -> None:
            with self.lock:
                offsets = self._offsets(partition, len(keys))
                self.d.push_many([(k, partition, o, o) for k, o in zip(keys, offsets, strict=True)])

        errors = together([push for _ in range(THREADS)])
        assert all(isinstance(e, keylane.QueueFull) for e in errors), errors

    @rule(key=st.one_of(GOOD_KEYS, BAD_KEYS), partition=INTS, offset=INTS, count=INTS)
    def push_and_pop_hostile(
        self, key: object, partition: object, offset: object, count: object
    ) -> None:
        if type(partition) is int and partition in (0, 1):
            partition += 2  # the valid pushes own partitions 0 and 1
        calls = [
            lambda: self.d.push(key, partition, offset, "bad"),  # type: ignore[arg-type]
            lambda: self._keep(self.d.pop_ready(count)),  # type: ignore[arg-type]
            lambda: self.d.push_many([(key, partition, offset)]),  # type: ignore[list-item]
        ]
        for e in together(calls):
            assert expected(e), repr(e)

    def _keep(self, tickets: list[Ticket]) -> None:
        with self.lock:
            self.held.extend(tickets)

    @rule(n=st.integers(min_value=0, max_value=20))
    def pop(self, n: int) -> None:
        errors = together([lambda: self._keep(self.d.pop_ready(n)) for _ in range(THREADS)])
        assert errors == [], errors

    @rule(percent=st.integers(min_value=0, max_value=100))
    def complete_retry_and_misuse(self, percent: int) -> None:
        # How many tickets are held depends on thread timing: draw a share.
        with self.lock:
            mine, self.held = self.held, []
        if not mine:
            return
        cut = len(mine) * percent // 100
        done, again = mine[:cut], mine[cut:]
        calls = [
            lambda: self.d.complete_many(done),
            lambda: [self.d.retry(t) for t in again],
            # Reusing a ticket, or passing junk, is a TicketError/InvalidType.
            lambda: self.d.complete_many(done[:1]),
            lambda: self.d.complete(object()),  # type: ignore[arg-type]
        ]
        for e in together(calls):
            assert expected(e), repr(e)

    @rule(key=TABLE_KEYS, version=INTS)
    def table_ops(self, key: object, version: object) -> None:
        calls = [
            lambda: self.table.check_and_set(key, version),  # type: ignore[arg-type]
            lambda: self.table.get(key),  # type: ignore[arg-type]
            lambda: sum(1 for _ in self.table.items()),
            lambda: self.table.check_and_set_many([(key, version)]),  # type: ignore[list-item]
            lambda: self.table.mark_seen(key),  # type: ignore[arg-type]
        ]
        for e in together(calls):
            assert expected(e), repr(e)
        if isinstance(key, (bytes, str)):
            raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
            valid = isinstance(version, int) and not isinstance(version, bool)
            in_range = valid and 0 <= version <= 2**63 - 1  # type: ignore[operator]
            if in_range and 0 < len(raw) <= 511 and key != "\ud800":
                self.versions[raw] = max(self.versions.get(raw, -1), version)  # type: ignore[arg-type]

    @invariant()
    def one_ticket_per_key_and_monotonic_watermark(self) -> None:
        with self.lock:
            keys = [t.key for t in self.held if t.key is not None]
        assert len(keys) == len(set(keys)), f"a key is in flight twice: {keys}"
        marks = self.d.committable()
        for p, mark in marks.items():
            assert mark >= self.marks.get(p, 0), "the watermark moved back"
            self.marks[p] = mark
        assert self.d.in_flight <= self.d.max_in_flight

    @invariant()
    def versions_never_go_back(self) -> None:
        for key, version in self.versions.items():
            assert self.table.get(key) == version

    def teardown(self) -> None:
        self.table.close()


def test_hostile_threads(tmp_path: object) -> None:
    Hostile.tmp = str(tmp_path)
    run = Hostile.TestCase
    run.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)
    run().runTest()
