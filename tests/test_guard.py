"""One message never stops an App: keys and ids the version table cannot
hold, a failing table, undecodable records, dead letters that are hard to
encode."""

from __future__ import annotations

import hashlib
import pathlib
import re
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


def _msg(key: bytes, version: int, mid: str) -> Message:
    return Message(
        "t", 0, version, key, b"", {"version": str(version).encode(), "id": mid.encode()}, 0.0
    )


def _tickets(*messages: Message) -> list[keylane.Ticket]:
    d = keylane.Dispatcher("key")
    d.push_many([(m.key, 0, i, m) for i, m in enumerate(messages)])
    tickets = d.pop_ready(len(messages))
    assert len(tickets) == len(messages)
    return tickets


async def test_prefetched_lookups_keep_the_table_off_the_trio_thread(
    tmp_path: pathlib.Path,
) -> None:
    from keylane._guard import DUPLICATE, RUN, STALE, Guard, id_header, version_header

    with keylane.VersionTable(tmp_path / "v") as table:
        table.check_and_set(b"a", 5)
        table.mark_seen(b"old")
        guard = Guard(table, version_header, id_header, None)
        batch = _tickets(_msg(b"a", 5, "m1"), _msg(b"b", 1, "old"), _msg(b"c", 1, "new"))
        await guard.prefetch(batch)
        assert [guard.check(t) for t in batch] == [STALE, DUPLICATE, RUN]
        assert guard.core.looked_up_in_place == 0, "a check read the table on the Trio thread"
        # Nothing read ahead for this one: looked up where it is checked.
        (late,) = _tickets(Message("t", 1, 9, b"a", b"", {"version": b"6"}, 0.0))
        assert guard.check(late) == RUN
        assert guard.core.looked_up_in_place == 1


async def test_a_prefetch_read_before_a_flush_never_answers_for_it(
    tmp_path: pathlib.Path,
) -> None:
    """An answer read ahead before a flush wrote a newer version must not
    outlive the in-memory record the flush forgets."""
    from keylane._guard import RUN, STALE, Guard, version_header

    with keylane.VersionTable(tmp_path / "v") as table:
        table.check_and_set(b"a", 4)
        guard = Guard(table, version_header, None, None)
        first, again = _tickets(_msg(b"a", 5, "x"), _msg(b"b", 0, "y"))
        (redelivered,) = _tickets(_msg(b"a", 5, "x"))
        await guard.prefetch([first, redelivered])  # both read "4"
        assert guard.check(first) == RUN
        guard.applied(first)  # handled, in memory only
        await guard.flush()  # written, and forgotten from memory
        assert table.get(b"a") == 5
        assert guard.core.recorded == 0
        assert guard.check(redelivered) == STALE
        assert guard.check(again) == RUN


async def test_a_failed_flush_keeps_what_it_held(tmp_path: pathlib.Path) -> None:
    """A flush the table refuses raises, and what it held stays recorded:
    it still answers the checks and is written by the next flush."""
    from keylane._guard import STALE, Guard, version_header

    table = keylane.VersionTable(tmp_path / "v")
    guard = Guard(table, version_header, None, None)
    (t,) = _tickets(_msg(b"a", 3, "x"))
    guard.prepare([t])
    guard.applied(t)
    table.close()
    with pytest.raises(keylane.StoreError, match="closed"):
        await guard.flush()
    assert guard.core.recorded == 1
    with keylane.VersionTable(tmp_path / "v") as reopened:
        guard = Guard(reopened, version_header, None, None)
        (same,) = _tickets(_msg(b"a", 3, "x"))
        guard.prepare([same])
        guard.applied(same)
        await guard.flush()
        (redelivered,) = _tickets(_msg(b"a", 3, "x"))
        assert guard.check(redelivered) == STALE
        assert reopened.get(b"a") == 3


async def test_what_version_of_and_id_of_return_is_checked(tmp_path: pathlib.Path) -> None:
    """Every value version_of or id_of can give: usable ones are used, the
    others make the message poison, with what was wrong."""
    from keylane._guard import RUN, Guard, PoisonMessage

    def boom(m: Message) -> int:
        raise KeyError("nope")

    cases: list[tuple[Any, Any, str | None]] = [
        (lambda m: 7, lambda m: "id-1", None),
        (lambda m: None, lambda m: None, None),
        (lambda m: 2**63 - 1, lambda m: b"\x00", None),
        (lambda m: True, None, "version_of returned True"),
        (lambda m: -1, None, "version_of returned -1"),
        (lambda m: 2**63, None, "versions are ints from 0 to 2**63-1"),
        (lambda m: "5", None, "version_of returned '5'"),
        (boom, None, "version_of failed: KeyError('nope')"),
        (None, lambda m: b"", "ids are non-empty bytes or str"),
        (None, lambda m: "", "ids are non-empty bytes or str"),
        (None, lambda m: 5, "id_of returned 5"),
        (None, lambda m: "\ud800", "not valid text"),
        (None, boom, "id_of failed"),
    ]
    with keylane.VersionTable(tmp_path / "v") as table:
        for version_of, id_of, problem in cases:
            guard = Guard(table, version_of, id_of, None)
            (t,) = _tickets(_msg(b"k", 1, "i"))
            await guard.prefetch([t])
            if problem is None:
                assert guard.check(t) == RUN
            else:
                with pytest.raises(PoisonMessage, match=re.escape(problem)):
                    guard.check(t)
