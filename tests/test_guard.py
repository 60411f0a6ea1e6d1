"""One message never stops an App: keys and ids the version table cannot
hold, a failing table, undecodable records, dead letters that are hard to
encode."""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import pytest
import trio

import keylane
from keylane import MemoryBroker, Message, RetryPolicy
from keylane._guard import HASHED_PREFIX, MAX_TABLE_ID, MAX_TABLE_KEY, table_name
from keylane.dlq import DeadLetter
from keylane.message import UndecodableRecord

from .conftest import FAST_RETRY, make_app


def test_table_names_keep_valid_keys_and_hash_the_rest() -> None:
    assert table_name(b"acct-1", MAX_TABLE_KEY) == b"acct-1"
    assert table_name(b"x" * MAX_TABLE_KEY, MAX_TABLE_KEY) == b"x" * MAX_TABLE_KEY
    for raw in (b"", b"x" * (MAX_TABLE_KEY + 1), b"x" * 100_000):
        name = table_name(raw, MAX_TABLE_KEY)
        assert name == HASHED_PREFIX + hashlib.sha256(raw).digest()
        assert 0 < len(name) <= MAX_TABLE_ID
    # A key crafted to look like another key's hashed name is hashed itself,
    # so it cannot share that key's version.
    long_key = b"k" * 600
    forged = table_name(long_key, MAX_TABLE_KEY)
    assert table_name(forged, MAX_TABLE_KEY) != forged


async def test_keys_and_ids_the_table_cannot_hold_are_handled_and_versioned(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=1)
    long_key = b"k" * 600
    long_id = "i" * 2000
    sent = [
        (b"", b"1", "e1"),
        (b"", b"0", "e0"),  # stale for the empty key
        (long_key, b"5", long_id),
        (long_key, b"4", "other"),  # stale for the long key
        (b"plain", b"1", long_id),  # a duplicate id (the long one)
    ]
    for key, version, mid in sent:
        broker.produce("payments", key=key, value=version, headers={"version": version, "id": mid})
    # Total order: the duplicate id is on another key, and must be seen
    # after its original.
    app = make_app(broker, versions=tmp_path / "v", dedupe=3600, ordering="total")
    handled: list[tuple[bytes | None, bytes]] = []

    @app.handler
    async def handle(msg: Message) -> None:
        handled.append((msg.key, msg.value))

    await app.run(until_idle=True)
    assert handled == [(b"", b"1"), (long_key, b"5")]
    stats = app.stats()
    assert (stats["stale_dropped"], stats["duplicates_skipped"], stats["failed"]) == (2, 1, 0)
    assert broker.committed("wallet") == {keylane.TopicPartition("payments", 0): 5}
    with keylane.VersionTable(tmp_path / "v") as table:
        assert table.get(table_name(long_key, MAX_TABLE_KEY)) == 5
        assert table.get(table_name(b"", MAX_TABLE_KEY)) == 1


async def test_a_failing_version_table_fails_messages_not_the_app(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    table = keylane.VersionTable(tmp_path / "v")
    table.close()  # every lookup now raises StoreError
    broker = MemoryBroker(partitions=1)
    for v in range(3):
        broker.produce("payments", key="acct", value=str(v), headers={"version": str(v)})
    app = make_app(broker, versions=table, dlq="dlq", retry=FAST_RETRY)

    @app.handler
    async def handle(msg: Message) -> None:
        raise AssertionError("the guard failed: the handler must not run")

    await app.run(until_idle=True)
    dead = [DeadLetter.decode(m.value) for m in broker.records("dlq", 0)]
    assert [d.offset for d in dead] == [0, 1, 2]
    assert {d.error_type for d in dead} == {"keylane.errors.StoreError"}
    assert all(d.attempts == FAST_RETRY.max_attempts for d in dead)
    assert broker.committed("wallet") == {keylane.TopicPartition("payments", 0): 3}


async def test_an_undecodable_record_is_dead_lettered(autojump_clock: trio.abc.Clock) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="good")
    # What an adapter hands over for a record it cannot decode.
    log = broker._logs["payments"][0]
    log.append(
        UndecodableRecord(
            "payments", 0, 1, b"a", b"bad", {}, 0.0, problem="its headers cannot be decoded"
        )
    )
    broker.produce("payments", key="a", value="after")
    app = make_app(broker, dlq="dlq")
    handled: list[bytes] = []

    @app.handler
    async def handle(msg: Message) -> None:
        handled.append(msg.value)

    await app.run(until_idle=True)
    assert handled == [b"good", b"after"]
    (dead,) = [DeadLetter.decode(m.value) for m in broker.records("dlq", 0)]
    assert (dead.offset, dead.value, dead.attempts) == (1, b"bad", 1)
    assert "headers cannot be decoded" in dead.error


async def test_record_versions_each_failure_is_retried_not_fatal(
    thread_safe_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    table = keylane.VersionTable(tmp_path / "v")
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="acct", value="x", headers={"version": "1"})
    app = make_app(broker, versions=table, record_versions="each", dlq="dlq", retry=FAST_RETRY)
    calls: list[int] = []

    @app.handler
    async def handle(msg: Message) -> None:
        calls.append(msg.attempt)
        table.close()  # the write after this handler fails

    await app.run(until_idle=True)
    # Handled once; the lookup of the retry then fails too (closed table):
    # dead-lettered, never committed past unrecorded.
    assert calls == [0]
    (dead,) = [DeadLetter.decode(m.value) for m in broker.records("dlq", 0)]
    assert dead.error_type == "keylane.errors.StoreError"


def test_dead_letters_encode_anything_a_message_can_hold() -> None:
    msg = Message("t", 0, 7, None, b"v", {"\ud800bad": b"1", "ok": b"2"}, 1.5)
    error = ValueError("text with a lone surrogate \udc80")
    dead = DeadLetter.of(msg, error, 3, "g")
    back = DeadLetter.decode(dead.encode())
    assert back.headers == {"\ud800bad": b"1", "ok": b"2"}
    assert "\\udc80" in back.error
    assert (back.topic, back.offset, back.key, back.value) == ("t", 7, None, b"v")


async def test_a_hard_to_encode_failure_is_still_dead_lettered(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=1)
    broker.produce("payments", key="a", value="x")
    app = make_app(broker, dlq="dlq", retry=RetryPolicy(max_attempts=1))

    @app.handler
    async def handle(msg: Message) -> None:
        raise ValueError("\ud800")

    await app.run(until_idle=True)
    (dead,) = [DeadLetter.decode(m.value) for m in broker.records("dlq", 0)]
    assert dead.error_type == "builtins.ValueError"


def test_producing_a_header_name_that_is_not_text_is_refused() -> None:
    broker = MemoryBroker(partitions=1)
    with pytest.raises(keylane.InvalidArgument, match="header name"):
        broker.produce("payments", key="a", value="x", headers={"\ud800": "v"})
    assert broker.topics() == {}, "a failed produce changes nothing"


class _RecordingTable:
    """A VersionTable stand-in that records which thread asks what."""

    def __init__(self, versions: dict[bytes, int], seen: set[bytes]) -> None:
        self.versions, self.seen_ids = versions, seen
        self.calls: list[tuple[str, bool]] = []

    def _note(self, name: str) -> None:
        import threading

        self.calls.append((name, threading.current_thread() is threading.main_thread()))

    def get(self, key: bytes) -> int | None:
        self._note("get")
        return self.versions.get(key)

    def get_many(self, keys: list[bytes]) -> list[int | None]:
        self._note("get_many")
        return [self.versions.get(k) for k in keys]

    def is_seen(self, mid: bytes) -> bool:
        self._note("is_seen")
        return mid in self.seen_ids

    def is_seen_many(self, mids: list[bytes]) -> list[bool]:
        self._note("is_seen_many")
        return [m in self.seen_ids for m in mids]

    def check_and_set_many(self, pairs: Any) -> None:
        self._note("check_and_set_many")
        for k, v in pairs:
            self.versions[k] = max(v, self.versions.get(k, -1))

    def mark_seen_many(self, ids: Any, ttl_s: float | None = None) -> None:
        self._note("mark_seen_many")
        self.seen_ids.update(ids)


def _msg(key: bytes, version: int, mid: str) -> Message:
    return Message(
        "t", 0, version, key, b"", {"version": str(version).encode(), "id": mid.encode()}, 0.0
    )


async def test_prefetched_lookups_keep_the_table_off_the_trio_thread() -> None:
    from keylane._guard import Guard, id_header, version_header

    table = _RecordingTable({b"a": 5}, {b"old"})
    guard = Guard(table, version_header, id_header, None)  # type: ignore[arg-type]
    batch = [_msg(b"a", 5, "m1"), _msg(b"b", 1, "old"), _msg(b"c", 1, "new")]
    await guard.prefetch(batch)
    assert [guard.before(m) for m in batch] == ["stale", "duplicate", None]
    on_trio_thread = [name for name, main in table.calls if main]
    assert on_trio_thread == [], f"looked up on the Trio thread: {on_trio_thread}"


async def test_a_prefetch_read_before_a_flush_never_answers_for_it(
    tmp_path: pathlib.Path,
) -> None:
    """An answer prefetched before a flush wrote a newer version must not
    outlive the in-memory record the flush forgets."""
    from keylane._guard import Guard, version_header

    with keylane.VersionTable(tmp_path / "v") as table:
        table.check_and_set(b"a", 4)
        guard = Guard(table, version_header, None, None)
        guard.prefetched_versions[b"a"] = 4  # read before the write below
        guard.versions[b"a"] = 5  # handled, in memory only
        await guard.flush()  # written, and forgotten from memory
        assert table.get(b"a") == 5
        assert guard.before(_msg(b"a", 5, "x")) == "stale"


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_large_flush_raises_prefetched_answers_in_steps(
    tmp_path: pathlib.Path, cancel: bool
) -> None:
    """The walk that raises prefetched answers after a big flush yields
    between steps; meanwhile before() still answers from the flush's own
    record, and a walk cancelled part way drops every prefetched answer."""
    from keylane._guard import Guard, version_header

    keys = [b"k%05d" % i for i in range(10_000)]
    with keylane.VersionTable(tmp_path / "v") as table:
        guard = Guard(table, version_header, None, None)
        for k in keys:
            guard.prefetched_versions[k] = 1  # read before the write below
            guard.versions[k] = 2
        mid_walk: list[str | None] = []

        async def probe(scope: trio.CancelScope) -> None:
            while True:
                walking = guard.flushing_versions and guard.prefetched_versions[keys[0]] == 2
                if walking and guard.prefetched_versions[keys[-1]] == 1:
                    mid_walk.append(guard.before(_msg(keys[-1], 2, "x")))
                    if cancel:
                        scope.cancel()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            with trio.CancelScope() as flushing:
                n.start_soon(probe, flushing)
                await guard.flush()
            n.cancel_scope.cancel()
        assert mid_walk, "the walk never yielded part way"
        assert set(mid_walk) == {"stale"}, mid_walk
        assert table.get(keys[-1]) == 2
        if cancel:
            assert guard.prefetched_versions == {}
        else:
            assert set(guard.prefetched_versions.values()) == {2}
        assert guard.before(_msg(keys[-1], 2, "x")) == "stale"
