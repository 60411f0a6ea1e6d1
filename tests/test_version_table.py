"""keylane.VersionTable: semantics against a dict model, windows, bad input."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keylane
from keylane import VersionTable


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table(tmp_path: pathlib.Path) -> Iterator[VersionTable]:
    with VersionTable(tmp_path / "t", durable=False) as t:
        yield t


def test_redelivery_and_replay_are_stale(table: VersionTable) -> None:
    assert table.check_and_set(b"acct-1", 5)
    assert table.check_and_set("acct-1", 6)  # str keys are their UTF-8 bytes
    assert not table.check_and_set(b"acct-1", 5)  # the [5, 6, 5] redelivery
    assert table.get("acct-1") == 6
    assert table.get(b"nope") is None
    assert len(table) == 1


def test_batches_are_judged_in_order(table: VersionTable) -> None:
    table.check_and_set(b"b", 10)
    got = table.check_and_set_many([(b"b", 3), (b"a", 1), (b"a", 1), (b"a", 4), (b"b", 11)])
    assert got == [False, True, False, True, True]
    assert table.get_many([b"a", "b", b"c"]) == [4, 11, None]


def test_items_is_a_consistent_snapshot(table: VersionTable) -> None:
    table.check_and_set_many((f"k{i:05d}", 1) for i in range(3000))
    items = table.items()
    first = next(items)
    table.check_and_set(b"k00001", 2)  # after the snapshot: not visible
    table.check_and_set(b"zzz", 1)
    rest = list(items)
    assert first == (b"k00000", 1)
    assert len(rest) == 2999
    assert all(v == 1 for _, v in rest)
    assert next(table.items(), None) == (b"k00000", 1)


def test_last_write_wins_register(table: VersionTable) -> None:
    assert table.put_if_newer(b"balance", 2, b"100")
    assert not table.put_if_newer(b"balance", 1, b"50")
    assert table.put_if_newer(b"balance", 3, bytearray(b"70"))
    assert table.get_value(b"balance") == (3, b"70")
    assert table.get_value(b"other") is None
    assert table.get(b"balance") is None, "independent of check_and_set"


def test_seen_window_with_injected_clock(tmp_path: pathlib.Path) -> None:
    clock = FakeClock()
    with VersionTable(tmp_path / "t", durable=False, clock=clock) as t:
        assert not t.is_seen(b"m1")
        assert t.mark_seen(b"m1", ttl_s=3600)
        assert t.is_seen(b"m1")
        assert not t.mark_seen(b"m1", ttl_s=3600)
        clock.now += 3599
        assert not t.mark_seen(b"m1", ttl_s=3600)
        clock.now += 1
        assert t.mark_seen(b"m1", ttl_s=86_400 * 30), (
            "a new window, far longer than SQS's 5 minutes"
        )
        clock.now += 86_400 * 29
        assert not t.mark_seen(b"m1")
        assert t.mark_seen_many([b"x", b"y", b"x", b"m1"], ttl_s=10) == [True, True, False, False]
        clock.now += 11
        assert t.purge_expired() == 2  # x and y
        assert t.mark_seen(b"x", ttl_s=10)
        assert t.mark_seen(b"forever")
        clock.now += 10**9
        assert not t.mark_seen(b"forever")
        assert t.info()["seen"] == 3


def test_reopen_keeps_data_and_context_manager_closes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t"
    with VersionTable(path) as t:
        t.check_and_set(b"k", 7)
        assert t.durable
    assert t.closed
    with pytest.raises(keylane.StoreError, match="closed"):
        t.get(b"k")
    with VersionTable(str(path)) as t2:
        assert t2.get(b"k") == 7
        info = t2.info()
        assert info["format"] == 2
        assert info["created_by"].startswith("keylane ")
        assert info["versions"] == 1
    assert repr(t2) == f"VersionTable('{path}', durable=True, closed)"


def test_close_folds_the_journal_and_reopen_replays_an_unfolded_one(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "t"
    with VersionTable(path, durable=False) as t:
        t.check_and_set_many((f"k{i}", 1) for i in range(100))
        t.check_and_set_many((f"k{i}", 2) for i in range(50))
        assert t.info()["journal_records"] == 2
    with VersionTable(path, durable=False) as t:
        assert t.info()["journal_records"] == 0, "close() folded it"
        assert t.get_many(["k0", "k99"]) == [2, 1]
        assert t.check_and_set("k0", 5)
        assert t.info()["journal_records"] == 1
        t.checkpoint()
        assert t.info()["journal_records"] == 0
        assert (t.get("k0"), len(t)) == (5, 100)
        t.check_and_set("k0", 3)  # stale: nothing to journal
        t.checkpoint()
    # A process that dies without close() leaves its journal: it is read
    # again on the next open.
    script = (
        "import os, sys\n"
        "from keylane import VersionTable\n"
        "t = VersionTable(sys.argv[1], durable=False)\n"
        "t.check_and_set_many([('k0', 6), ('new', 1)])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    with VersionTable(path, durable=False) as t:
        assert t.info()["journal_records"] == 1
        assert (t.get("k0"), t.get("new"), len(t)) == (6, 1, 101)
        assert [k for k, _ in t.items()][:3] == [b"k0", b"k1", b"k10"]


def test_full_map_raises_store_full_and_applies_nothing(tmp_path: pathlib.Path) -> None:
    t = VersionTable(tmp_path / "t", map_size=1 << 20, durable=False)
    applied = 0

    def fill() -> None:
        nonlocal applied
        while True:
            t.check_and_set_many(
                (f"key-{i:08d}-padding-padding", 1) for i in range(applied, applied + 1000)
            )
            applied += 1000

    with pytest.raises(keylane.StoreFull, match=r"map_size=2097152") as info:
        fill()
    assert isinstance(info.value, OSError)
    assert len(t) == applied
    assert t.get(f"key-{applied:08d}-padding-padding") is None


def test_a_table_keeps_the_map_it_was_created_with(tmp_path: pathlib.Path) -> None:
    # Reopened without map_size (or with a smaller one), a table keeps its
    # map: shrunk to the default, writes that fitted would fail as full.
    path = tmp_path / "t"
    with VersionTable(path, map_size=3 << 30, durable=False) as t:
        t.check_and_set(b"a", 1)
    with VersionTable(path, durable=False) as t:
        assert t.info()["map_size"] == 3 << 30
    with VersionTable(path, map_size=1 << 24, durable=False) as t:
        assert t.info()["map_size"] == 3 << 30
    with VersionTable(path, map_size=4 << 30, durable=False) as t:
        assert t.info()["map_size"] == 4 << 30  # growing it works


# ---- model-based -----------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("cas"), st.sampled_from(["a", "b", "c"]), st.integers(0, 20)),
        st.tuples(
            st.just("cas_many"),
            st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20)), max_size=6),
        ),
        st.tuples(
            st.just("put"), st.sampled_from(["a", "b"]), st.integers(0, 20), st.binary(max_size=8)
        ),
        st.tuples(
            st.just("seen"), st.sampled_from(["m1", "m2", "m3"]), st.sampled_from([None, 1, 5])
        ),
        st.tuples(st.just("tick"), st.integers(0, 7)),
        st.tuples(st.just("purge")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=ops)
@pytest.mark.parametrize(
    "sizes",
    [{}, {"journal_entries": 2, "cache_keys": 1}, {"journal_entries": 1, "cache_keys": 0}],
    ids=["defaults", "small", "fold-each-commit"],
)
def test_matches_a_dict_model(
    tmp_path_factory: pytest.TempPathFactory, program: list[tuple], sizes: dict[str, int]
) -> None:  # type: ignore[type-arg]
    path = tmp_path_factory.mktemp("model")
    clock = FakeClock(1000.0)
    t = VersionTable(path, durable=False, clock=clock, **sizes)
    versions: dict[str, int] = {}
    values: dict[str, tuple[int, bytes]] = {}
    seen_until: dict[str, float] = {}
    for op in program:
        kind = op[0]
        if kind == "cas":
            _, key, v = op
            expect = key not in versions or v > versions[key]
            if expect:
                versions[key] = v
            assert t.check_and_set(key, v) is expect
        elif kind == "cas_many":
            expected = []
            for key, v in op[1]:
                newer = key not in versions or v > versions[key]
                if newer:
                    versions[key] = v
                expected.append(newer)
            assert t.check_and_set_many(op[1]) == expected
        elif kind == "put":
            _, key, v, value = op
            newer = key not in values or v > values[key][0]
            if newer:
                values[key] = (v, value)
            assert t.put_if_newer(key, v, value) is newer
        elif kind == "seen":
            _, mid, ttl = op
            first = mid not in seen_until or seen_until[mid] <= clock.now
            if first:
                seen_until[mid] = math.inf if ttl is None else clock.now + ttl
            assert t.mark_seen(mid, ttl_s=ttl) is first
        elif kind == "tick":
            clock.now += op[1]
        elif kind == "purge":
            expired = [m for m, until in seen_until.items() if until <= clock.now]
            for m in expired:
                del seen_until[m]
            assert t.purge_expired() == len(expired)
        else:
            t.close()
            t = VersionTable(path, durable=False, clock=clock, **sizes)
        assert len(t) == len(versions)
    assert {k.decode(): v for k, v in t.items()} == versions
    for key, (v, value) in values.items():
        assert t.get_value(key) == (v, value)
    t.close()


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.check_and_set(42, 1), keylane.InvalidType, "key must be bytes"),
        (lambda t: t.check_and_set(None, 1), keylane.InvalidType, "NoneType"),
        (lambda t: t.check_and_set(b"", 1), keylane.InvalidArgument, "1 to 511 bytes"),
        (lambda t: t.check_and_set(b"x" * 512, 1), keylane.InvalidArgument, "1 to 511 bytes"),
        (lambda t: t.check_and_set(b"k", -1), keylane.InvalidArgument, "version must be between"),
        (
            lambda t: t.check_and_set(b"k", 2**63),
            keylane.InvalidArgument,
            "version is out of range",
        ),
        (lambda t: t.check_and_set(b"k", True), keylane.InvalidType, "bool"),
        (lambda t: t.check_and_set(b"k", 1.0), keylane.InvalidType, "version must be an int"),
        (lambda t: t.check_and_set_many([(b"k", 1), b"k"]), keylane.InvalidType, "entry 1"),
        (
            lambda t: t.check_and_set_many([(b"k", 1), (b"j", -3)]),
            keylane.InvalidArgument,
            "entry 1",
        ),
        (lambda t: t.put_if_newer(b"k", 1, "text"), keylane.InvalidType, "value must be bytes"),
        (lambda t: t.mark_seen(b"m", ttl_s=0), keylane.InvalidArgument, "ttl_s must be positive"),
        (lambda t: t.mark_seen(b"m", ttl_s=-5), keylane.InvalidArgument, "ttl_s must be positive"),
        (lambda t: t.mark_seen(b"m", ttl_s=math.nan), keylane.InvalidArgument, "finite"),
        (lambda t: t.mark_seen(b"m", ttl_s=True), keylane.InvalidType, "not bool"),
        (lambda t: t.mark_seen(b"m", ttl_s="1h"), keylane.InvalidType, "seconds"),
        (lambda t: t.mark_seen(b"x" * 504), keylane.InvalidArgument, "1 to 503 bytes"),
    ],
)
def test_bad_arguments(table: VersionTable, call, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call(table)
    assert len(table) == 0, "nothing was written"


def test_bad_constructor_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(keylane.InvalidArgument, match="map_size must be at least"):
        VersionTable(tmp_path / "a", map_size=100)
    with pytest.raises(keylane.InvalidType, match="clock must be a callable"):
        VersionTable(tmp_path / "b", clock=5)  # type: ignore[arg-type]
    with pytest.raises(keylane.InvalidType, match="path must be"):
        VersionTable(42)  # type: ignore[arg-type]
    with pytest.raises(keylane.InvalidArgument, match="journal_entries must be >= 1, got 0"):
        VersionTable(tmp_path / "d", journal_entries=0)
    with pytest.raises(keylane.InvalidType, match="journal_entries must be an int, not bool"):
        VersionTable(tmp_path / "e", journal_entries=True)
    with pytest.raises(keylane.InvalidArgument, match="cache_keys must be >= 0, got -1"):
        VersionTable(tmp_path / "f", cache_keys=-1)
    t = VersionTable(tmp_path / "c", clock=lambda: "noon")  # type: ignore[arg-type,return-value]
    with pytest.raises(keylane.InvalidType, match="clock"):
        t.mark_seen(b"m")


def test_refuses_paths_that_are_not_tables(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "file"
    f.write_text("hello")
    with pytest.raises(keylane.StoreFormatError, match="is a file"):
        VersionTable(f)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(b"\x42" * 65536)
    with pytest.raises(keylane.StoreFormatError, match="not an LMDB"):
        VersionTable(junk)
    with pytest.raises(keylane.StoreFormatError, match="no keylane version table"):
        VersionTable(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_py_lmdb_environment_is_not_a_keylane_table(tmp_path: pathlib.Path) -> None:
    import lmdb  # a dev dependency (requirements-dev.txt), also the bench baseline

    env = lmdb.open(str(tmp_path / "foreign"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"theirs")) as txn:
        txn.put(b"a", b"b")
    env.close()
    with pytest.raises(keylane.StoreFormatError, match="not a keylane table"):
        VersionTable(tmp_path / "foreign")


@pytest.mark.parametrize(
    ("setting", "first", "second"),
    [
        ("map_size", 1 << 24, 1 << 25),
        ("journal_entries", 100, 200),
        ("cache_keys", 10, 20),
        ("durable", True, False),
    ],
)
def test_reopening_in_process_with_other_settings_is_refused(
    tmp_path: pathlib.Path, setting: str, first: object, second: object
) -> None:
    path = tmp_path / "t"
    with keylane.VersionTable(path, **{setting: first}) as a:  # type: ignore[arg-type]
        a.check_and_set(b"k", 1)
        with pytest.raises(
            keylane.StoreError, match=f"already open in this process with {setting}"
        ):
            keylane.VersionTable(path, **{setting: second})  # type: ignore[arg-type]
        with keylane.VersionTable(path, **{setting: first}) as b:  # type: ignore[arg-type]
            assert b.get(b"k") == 1, "the same settings share the open table"
    # Once every handle is closed, the new settings apply.
    with keylane.VersionTable(path, **{setting: second}) as c:  # type: ignore[arg-type]
        assert c.get(b"k") == 1


def test_write_batch_applies_versions_and_ids_without_the_gil(tmp_path: pathlib.Path) -> None:
    with VersionTable(tmp_path / "t") as t:
        t.check_and_set(b"a", 5)
        batch = keylane.VersionBatch()
        batch.add_versions([(b"a", 4), (b"b", 2)])
        batch.add_versions([("c", 9)])
        batch.add_ids([b"m1", "m2"])
        assert len(batch) == 5
        t.write_batch(batch, ttl_s=60)
        assert len(batch) == 0, "the batch is emptied by the write"
        assert t.get_many([b"a", b"b", b"c"]) == [5, 2, 9], "versions never go back"
        assert t.is_seen_many([b"m1", b"m2", b"m3"]) == [True, True, False]
        with pytest.raises(keylane.InvalidType):
            batch.add_versions([b"not a pair"])
        with pytest.raises(keylane.InvalidArgument, match="entry 1"):
            batch.add_versions([(b"x", 1), (b"y", -1)])
        batch.add_versions([(b"", 1)])  # refused by the table when written
        with pytest.raises(keylane.InvalidArgument):
            t.write_batch(batch)
        assert t.get(b"x") is None
