"""keylane.Dispatcher through the binding: behaviour, bad input, threads."""

from __future__ import annotations

import functools
import random
import textwrap
import threading
import time
from collections import defaultdict

import pytest
import trio

import keylane
from keylane import Dispatcher, Ticket

from .conftest import run_isolated


def drain(d: Dispatcher, n: int = 1000) -> list[Ticket]:
    out: list[Ticket] = []
    while batch := d.pop_ready(n):
        out.extend(batch)
        d.complete_many(batch)
    return out


def test_defaults_and_repr() -> None:
    d = Dispatcher()
    assert (d.ordering, d.capacity, d.max_in_flight) == ("key", 100_000, 1024)
    assert repr(d) == (
        "Dispatcher(ordering='key', capacity=100000, max_in_flight=1024, queued=0, in_flight=0)"
    )
    assert len(d) == 0


def test_key_order_one_in_flight_per_key() -> None:
    d = Dispatcher("key")
    d.push(b"a", 0, 0, "a0")
    d.push("a", 0, 1, "a1")  # str and bytes of the same text are the same key
    d.push(b"b", 1, 0, "b0")
    first = d.pop_ready(10)
    assert sorted(t.item for t in first) == ["a0", "b0"]
    assert d.pop_ready(10) == []
    a0 = next(t for t in first if t.item == "a0")
    assert d.complete(a0) is True
    (a1,) = d.pop_ready(10)
    assert (a1.item, a1.key, a1.partition, a1.offset, a1.attempt) == ("a1", "a", 0, 1, 0)
    assert (d.queued, d.in_flight, len(d)) == (0, 2, 2)


@pytest.mark.parametrize(
    ("ordering", "expected_in_flight"), [("total", 1), ("partition", 2), ("key", 3), ("none", 4)]
)
def test_each_ordering_model_limits_concurrency(ordering: str, expected_in_flight: int) -> None:
    d = Dispatcher(ordering)  # type: ignore[arg-type]
    # Keys a, a, b, c over partitions 0, 0, 1, 1.
    for key, p, o in [(b"a", 0, 0), (b"a", 0, 1), (b"b", 1, 0), (b"c", 1, 1)]:
        d.push(key, p, o, (key, p, o))
    assert len(d.pop_ready(10)) == expected_in_flight


def test_none_keys_are_unordered_under_key() -> None:
    d = Dispatcher("key")
    for o in range(5):
        d.push(None, 0, o, o)
    assert [t.item for t in d.pop_ready(10)] == [0, 1, 2, 3, 4]


def test_unordered_keeps_push_order() -> None:
    d = Dispatcher("none")
    for o in range(50):
        d.push(b"same", o % 3, o, o)
    assert [t.item for t in d.pop_ready(100)] == list(range(50))


def test_watermark_and_gaps() -> None:
    d = Dispatcher("key")
    for key, o in [(b"a", 10), (b"b", 11), (b"c", 500)]:
        d.push(key, 0, o, o)
    assert d.committable() == {0: 10}
    tickets = {t.offset: t for t in d.pop_ready(10)}
    d.complete(tickets[500])
    d.complete(tickets[11])
    assert d.committable() == {0: 10}
    d.complete(tickets[10])
    assert d.committable() == {0: 501}


def test_retry_goes_back_to_the_head() -> None:
    d = Dispatcher("key")
    d.push(b"a", 0, 0, "first")
    d.push(b"a", 0, 1, "second")
    (t,) = d.pop_ready(10)
    d.retry(t)
    assert not t.pending
    (again,) = d.pop_ready(10)
    assert (again.item, again.attempt) == ("first", 1)
    assert d.committable() == {0: 0}
    d.complete(again)
    (nxt,) = d.pop_ready(10)
    assert nxt.item == "second"
    assert d.stats()["retried"] == 1


def test_revoke_drops_queued_and_stales_in_flight() -> None:
    d = Dispatcher("key")
    d.push(b"a", 0, 0, None)
    d.push(b"a", 0, 1, None)
    d.push(b"b", 1, 0, None)
    tickets = d.pop_ready(10)
    assert d.revoke([0, 7]) == 1
    assert d.committable() == {1: 0}
    results = {t.partition: d.complete(t) for t in tickets}
    assert results == {0: False, 1: True}
    d.push(b"a", 0, 0, None)  # a revoked partition starts over at any offset
    s = d.stats()
    assert (s["pushed"], s["completed"], s["stale"], s["revoked"]) == (4, 1, 1, 1)


def test_drop_queued_then_revoke_drains_a_partition() -> None:
    d = Dispatcher("key")
    for key, o in [(b"a", 0), (b"b", 1), (b"a", 2)]:
        d.push(key, 0, o, o)
    running = d.pop_ready(10)
    assert d.in_flight_of([0]) == 2
    assert d.drop_queued([0]) == 1  # a@2 will not be handed out
    assert d.pop_ready(10) == []
    d.complete_many(running)
    assert d.in_flight_of([0, 5]) == 0
    assert d.committable() == {0: 2}, "stops below the dropped message"
    assert d.revoke([0]) == 0
    assert d.committable() == {}
    with pytest.raises(keylane.InvalidArgument, match="partition"):
        d.in_flight_of([-1])


def test_capacity_and_queue_full() -> None:
    d = Dispatcher("key", capacity=3)
    assert d.push_many((b"k", 0, o, o) for o in range(5)) == 3
    assert d.free_capacity == 0
    with pytest.raises(keylane.QueueFull, match="capacity"):
        d.push(b"k", 0, 10, None)
    assert d.push_many([(b"k", 0, 10, None)]) == 0


def test_push_many_does_not_consume_past_capacity() -> None:
    d = Dispatcher("key", capacity=2)
    it = iter([(b"k", 0, o, o) for o in range(5)])
    assert d.push_many(it) == 2
    assert next(it) == (b"k", 0, 2, 2), "the third entry must still be in the iterator"


def test_max_in_flight() -> None:
    d = Dispatcher("none", max_in_flight=2)
    d.push_many((None, 0, o, o) for o in range(10))
    assert len(d.pop_ready(10)) == 2
    assert d.pop_ready(10) == []


def test_stats_keys() -> None:
    d = Dispatcher()
    d.push(b"a", 0, 0, None)
    assert set(d.stats()) == {
        "pushed",
        "completed",
        "retried",
        "stale",
        "revoked",
        "queued",
        "in_flight",
        "lanes",
        "max_lane_depth",
    }


# ---- bad input -------------------------------------------------------------------------------


def test_constructor_validation() -> None:
    with pytest.raises(keylane.InvalidArgument, match="ordering must be one of"):
        Dispatcher("sideways")  # type: ignore[arg-type]
    with pytest.raises(keylane.InvalidType, match="ordering must be a str"):
        Dispatcher(3)  # type: ignore[arg-type]
    for bad in (0, -5):
        with pytest.raises(ValueError, match="capacity"):
            Dispatcher(capacity=bad)
        with pytest.raises(ValueError, match="max_in_flight"):
            Dispatcher(max_in_flight=bad)
    with pytest.raises(TypeError, match="capacity must be an int"):
        Dispatcher(capacity=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        Dispatcher(max_in_flight=True)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((42, 0, 0, None), keylane.InvalidType, "key must be bytes"),
        ((b"k", -1, 0, None), keylane.InvalidArgument, "partition must be between"),
        ((b"k", 2**31, 0, None), keylane.InvalidArgument, "partition must be between"),
        ((b"k", 0, -1, None), keylane.InvalidArgument, "offset must be between"),
        ((b"k", 0, 2**63, None), keylane.InvalidArgument, "offset"),
        ((b"k", "0", 0, None), keylane.InvalidType, "partition must be an int"),
        ((b"k", 0, 1.0, None), keylane.InvalidType, "offset must be an int"),
    ],
)
def test_push_rejects_bad_fields(args: tuple[object, ...], error: type, match: str) -> None:
    d = Dispatcher()
    with pytest.raises(error, match=match):
        d.push(*args)  # type: ignore[arg-type]
    assert len(d) == 0


def test_offsets_must_increase_per_partition() -> None:
    d = Dispatcher()
    d.push(b"a", 0, 5, None)
    with pytest.raises(keylane.OffsetOrderError, match="not greater than"):
        d.push(b"b", 0, 5, None)
    d.push(b"b", 1, 0, None)  # other partitions are independent


def test_push_many_is_all_or_nothing() -> None:
    d = Dispatcher()
    batch = [(b"a", 0, 0, None), (b"b", 0, 1, None), (b"c", 0, 1, None)]
    with pytest.raises(keylane.OffsetOrderError, match="batch entry 2"):
        d.push_many(batch)
    assert len(d) == 0
    assert d.committable() == {}
    with pytest.raises(keylane.InvalidType, match="batch entry 1: key must be"):
        d.push_many([(b"a", 0, 0, None), (1, 0, 1, None)])
    with pytest.raises(keylane.InvalidType, match=r"entry 0 must be a .* tuple, not list"):
        d.push_many([[b"a", 0, 0, None]])  # type: ignore[list-item]
    with pytest.raises(keylane.InvalidArgument, match="must have 4 fields"):
        d.push_many([(b"a", 0, 0)])  # type: ignore[list-item]
    assert len(d) == 0


def test_ticket_misuse() -> None:
    d = Dispatcher()
    d.push(b"a", 0, 0, None)
    (t,) = d.pop_ready(1)
    assert d.complete(t)
    with pytest.raises(keylane.TicketError, match="already completed"):
        d.complete(t)
    with pytest.raises(keylane.TicketError, match="already completed"):
        d.retry(t)
    with pytest.raises(keylane.InvalidType, match=r"expected a keylane\.Ticket"):
        d.complete("ticket")  # type: ignore[arg-type]


def test_foreign_ticket_is_refused_and_left_usable() -> None:
    d1, d2 = Dispatcher(), Dispatcher()
    d1.push(b"a", 0, 0, None)
    (t,) = d1.pop_ready(1)
    with pytest.raises(keylane.TicketError, match="another dispatcher"):
        d2.complete(t)
    assert t.pending
    assert d1.complete(t)


def test_complete_many_is_all_or_nothing() -> None:
    d = Dispatcher("none")
    d.push_many((None, 0, o, o) for o in range(3))
    a, b, c = d.pop_ready(3)
    with pytest.raises(keylane.TicketError, match="batch entry 2"):
        d.complete_many([a, b, b])
    assert a.pending
    assert b.pending
    with pytest.raises(keylane.InvalidType, match="batch entry 1"):
        d.complete_many([a, None])  # type: ignore[list-item]
    assert a.pending
    assert d.complete_many([a, b, c]) == 3
    assert d.committable() == {0: 3}


def test_pop_ready_bad_count() -> None:
    d = Dispatcher()
    with pytest.raises(keylane.InvalidArgument, match="max_items"):
        d.pop_ready(-1)
    assert d.pop_ready(0) == []


def test_huge_counts_never_abort_the_process() -> None:
    """Allocations follow what is queued, not what is asked for; bounds past
    2**32 and offsets past 2**63-2 are refused (a panic or an abort would be
    a defect: run in a child so that it would fail, not kill, the suite)."""
    result = run_isolated(
        textwrap.dedent(
            """
            import keylane
            d = keylane.Dispatcher(max_in_flight=2**32, capacity=2**32)
            d.push(b"a", 0, 0, "x")
            assert len(d.pop_ready(10**9)) == 1 and d.in_flight == 1
            d.push(b"b", 0, 1, "y")
            assert len(d.pop_ready(2**63 - 1)) == 1 and d.in_flight == 2
            assert d.pop_ready(2**63 - 1) == [] and d.in_flight == 2
            for bad in (2**32 + 1, 2**63 - 1):
                for name in ("capacity", "max_in_flight"):
                    try:
                        keylane.Dispatcher(**{name: bad})
                    except keylane.InvalidArgument as e:
                        assert name in str(e)
                    else:
                        raise SystemExit(f"{name}={bad} accepted")
            e = keylane.Dispatcher()
            e.push(b"k", 0, 2**63 - 2, "last")
            (t,) = e.pop_ready(1)
            e.complete(t)
            assert e.committable() == {0: 2**63 - 1}
            try:
                e.push(b"k", 1, 2**63 - 1, "past")
            except keylane.InvalidArgument as err:
                assert "offset" in str(err)
            else:
                raise SystemExit("offset 2**63-1 accepted")
            print("ok")
            """
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- threads ---------------------------------------------------------------------------------


def test_python_threads_keep_per_key_order() -> None:
    """One feeder thread, four worker threads; the GIL is released inside."""
    d = Dispatcher("key", capacity=2_000, max_in_flight=64)
    n, keys, partitions = 20_000, 97, 4
    done = threading.Event()
    lock = threading.Lock()
    busy: set[bytes] = set()
    seen: dict[bytes, list[int]] = defaultdict(list)
    errors: list[str] = []

    def feed() -> None:
        offsets = [0] * partitions
        i = 0
        while i < n:
            batch = []
            for _ in range(min(50, n - i)):
                key = f"k{(i * 31) % keys}".encode()
                p = i % partitions
                batch.append((key, p, offsets[p], i))
                offsets[p] += 1
                i += 1
            pushed = 0
            while pushed < len(batch):
                pushed += d.push_many(batch[pushed:])
        done.set()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            tickets = d.pop_ready(16)
            if not tickets:
                if done.is_set() and len(d) == 0:
                    return
                continue
            with lock:
                for t in tickets:
                    assert isinstance(t.key, bytes)
                    if t.key in busy:
                        errors.append(f"{t.key!r} twice in flight")
                    busy.add(t.key)
                    seen[t.key].append(t.item)
            if rng.random() < 0.3:
                threading.Event().wait(0.0001)
            with lock:
                for t in tickets:
                    busy.discard(t.key)  # type: ignore[arg-type]
                d.complete_many(tickets)

    threads = [threading.Thread(target=feed)] + [
        threading.Thread(target=work, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert errors == []
    assert sum(len(v) for v in seen.values()) == n
    for key, items in seen.items():
        assert items == sorted(items), f"{key!r} out of order"
    assert d.stats()["completed"] == n


async def test_an_adapter_thread_may_push_while_the_trio_thread_pops() -> None:
    # The path a broker adapter may take: push a fetched batch from its own
    # worker thread (the GIL is released inside), while the runtime's
    # thread pops and completes. One thread per partition at a time.
    d = Dispatcher("key", capacity=5_000)
    total = 20_000

    def feed() -> None:
        for start in range(0, total, 500):
            batch = [(f"k{i % 97}".encode(), i % 4, i // 4, i) for i in range(start, start + 500)]
            while batch:
                room = d.free_capacity
                if room == 0:
                    time.sleep(0.0005)
                    continue
                batch = batch[d.push_many(batch[:room]) :]

    seen: dict[bytes, int] = {}
    handled = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(trio.to_thread.run_sync, feed))
            while handled < total:
                tickets = d.pop_ready(256)
                if not tickets:
                    await trio.sleep(0.0005)
                    continue
                for t in tickets:
                    assert seen.get(t.key, -1) < t.item, "per-key order"
                    seen[t.key] = t.item
                d.complete_many(tickets)
                handled += len(tickets)
    assert d.queued == d.in_flight == 0
    assert d.committable() == dict.fromkeys(range(4), total // 4)


def test_dropping_a_dispatcher_releases_what_it_still_holds() -> None:
    """The queue is freed with the GIL released; the items still queued in
    it are released all the same, by the time ``del`` returns."""
    import gc
    import weakref

    class Item:
        pass

    items = [Item() for _ in range(1000)]
    refs = [weakref.ref(i) for i in items]
    d = Dispatcher(ordering="key", capacity=2000)
    d.push_many([(f"k{n % 50}".encode(), n % 3, n // 3, item) for n, item in enumerate(items)])
    popped = d.pop_ready(10)  # some in flight: their tickets keep their items
    del items
    gc.disable()
    try:
        del d
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == len(popped), f"{alive} items outlived it; {len(popped)} are in flight"
    del popped
    assert all(r() is None for r in refs)
