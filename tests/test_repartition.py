"""The repartition defence (``App(repartition="hold")``): a topic grows
while a group of members consumes it with a backlog; no key may run ahead
of its own past, nor in two members at once, and nothing may be lost.

Real time (members sleep in their handlers and the defence polls the
broker); every run is bounded."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

import keylane
from keylane.lab.ledger import Ledger, key_name, value
from keylane.lab.members import Group

T = "grows"


async def grow_mid_stream(
    *,
    mode: str = "hold",
    assignor: str = "round-robin",
    members: int = 3,
    messages: int = 4000,
    keys: int = 300,
    capacity: int = 200,
    seed: int = 1,
    leave_at_growth: bool = False,
    late_producer: float = 0.0,
    join_after_growth: float | None = None,
    only_keys: list[int] | None = None,
    **options: Any,
) -> tuple[Ledger, Group, dict[int, int]]:
    """Produces a third of ``messages`` as a backlog (more than the members'
    ``capacity``), starts the members, produces the rest in steps and grows
    the topic 6 -> 12 half way through, while handlers run. With
    ``leave_at_growth`` one member leaves right before the growth, so it
    lands in the middle of that rebalance (partitions being revoked,
    drained and handed over). With ``late_producer`` seconds, production
    goes on placing keys by the old count that long after the growth (a
    producer whose metadata is stale). With ``join_after_growth`` one more
    member joins that long after the growth (it never saw the old count)."""
    broker = keylane.MemoryBroker(6, assignor=assignor)  # type: ignore[arg-type]
    broker.create_topic(T, 6)
    rng = random.Random(seed)
    pool = only_keys if only_keys is not None else list(range(keys))
    order = [rng.choice(pool) for _ in range(messages)]
    produced: dict[int, int] = {}
    sent = 0
    stale_until = 0.0

    def produce(count: int) -> None:
        nonlocal sent
        stale = trio.current_time() < stale_until
        for k in order[sent : sent + count]:
            seq = produced.get(k, 0)
            produced[k] = seq + 1
            old = keylane.partition_for_key(key_name(k), 6) if stale else None
            broker.produce(T, key_name(k), value(k, seq), partition=old)
        sent += count

    app_options: dict[str, Any] = {
        "repartition": mode,
        "concurrency": 8,
        "capacity": capacity,
        "fetch_max": 100,
        "commit_interval": 0.1,
        "shutdown_timeout": 10,
        **options,
    }
    group = Group(
        broker, T, "g", members, work=lambda r: r.uniform(0.001, 0.004), seed=seed, **app_options
    )
    leaving = Group(
        broker, T, "g", 1, work=group.work, seed=seed, ledger=group.ledger, **app_options
    )
    late = Group(broker, T, "g", 1, work=group.work, seed=seed, ledger=group.ledger, **app_options)
    group.late = late  # type: ignore[attr-defined]

    async def join_later(nursery: trio.Nursery, delay: float) -> None:
        await trio.sleep(delay)
        await late.start(nursery)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            produce(messages // 3)
            await group.start(nursery)
            if leave_at_growth:
                await leaving.start(nursery)
            steps = 20
            for i in range(steps):
                produce((messages - messages // 3) // steps)
                if i == steps // 2:
                    if leave_at_growth:
                        leaving.stop()
                        await trio.lowlevel.checkpoint()
                    broker.add_partitions(T, 12)
                    stale_until = trio.current_time() + late_producer
                    if join_after_growth is not None:
                        nursery.start_soon(join_later, nursery, join_after_growth)
                await trio.sleep(0.03)
            produce(messages - sent)
            await group.wait_applied(messages, limit=100)
            group.stop()
            late.stop()
    return group.ledger, group, produced


def assert_kept_order(ledger: Ledger, produced: dict[int, int]) -> None:
    assert ledger.inversions == 0
    assert ledger.overlaps == 0
    assert ledger.lost(produced) == 0


@pytest.mark.parametrize("assignor", ["round-robin", "range"])
async def test_growth_keeps_every_key_in_order_across_members(assignor: str) -> None:
    ledger, group, produced = await grow_mid_stream(assignor=assignor)
    assert_kept_order(ledger, produced)
    held = group.counter("repartition_held")
    assert held > 0  # keys did move, and waited
    waits = group.histograms("repartition_wait")
    assert sum(h.count for h in waits) == held
    assert all(
        app.stats()["repartition_wait"]["count"] == h.count
        for app, h in zip(group.apps, waits, strict=True)
    )


@pytest.mark.parametrize("assignor", ["round-robin", "range"])
async def test_growth_during_a_rebalance_keeps_order(assignor: str) -> None:
    ledger, _, produced = await grow_mid_stream(leave_at_growth=True, assignor=assignor)
    assert_kept_order(ledger, produced)


async def test_without_the_defence_the_same_growth_breaks_order() -> None:
    # The setup above is one that does harm: off, keys run ahead of their past.
    ledger, group, produced = await grow_mid_stream(mode="off", messages=6000)
    assert ledger.inversions + ledger.overlaps > 0
    assert ledger.lost(produced) == 0
    assert group.counter("repartition_held") == 0


async def test_keys_that_did_not_move_are_never_held() -> None:
    stay = [
        k
        for k in range(2000)
        if keylane.partition_for_key(key_name(k), 6) == keylane.partition_for_key(key_name(k), 12)
    ]
    ledger, group, produced = await grow_mid_stream(only_keys=stay[:200])
    assert_kept_order(ledger, produced)
    assert group.counter("repartition_held") == 0


async def test_a_grace_period_holds_moved_keys_longer_and_still_keeps_order() -> None:
    ledger, group, produced = await grow_mid_stream(repartition_grace=0.5)
    assert_kept_order(ledger, produced)
    assert group.counter("repartition_held") > 0


@pytest.mark.parametrize("delay", [0.0, 0.3])
async def test_a_member_joining_after_the_growth_learns_it_from_commit_metadata(
    delay: float,
) -> None:
    # It never sees the old count: the members that did note the growth in
    # their commits' metadata, and it holds its moved keys as they do. At
    # 0 s nothing is noted yet when it first looks: it learns when the
    # partitions are handed to it (their owners commit, noting, first).
    ledger, group, produced = await grow_mid_stream(join_after_growth=delay, messages=6000)
    assert_kept_order(ledger, produced)
    late: Group = group.late  # type: ignore[attr-defined]
    assert late.counter("repartition_held") > 0


def test_growth_notes_round_trip_and_bad_ones_are_ignored() -> None:
    from keylane._repartition import Repartition

    def fresh() -> Repartition:
        return Repartition(
            None, None, keylane.metrics.Metrics(), grace=0.0, group="g", release=print
        )  # type: ignore[arg-type]

    seen = fresh()
    seen.observe({"t": 6})
    seen.observe({"t": 12})
    note = seen.note()
    assert note.startswith("keylane:repartition:1:")
    joiner = fresh()
    bad = ["", "x", "keylane:repartition:1:{", 'keylane:repartition:1:[["t",12,6,1.0]]',
           'keylane:repartition:1:[["t",true,12,1.0]]', "keylane:repartition:1:5"]  # fmt: skip
    joiner.learn([*bad, note, note], {"t": 12})
    assert [(c.old, c.new) for c in joiner.changes["t"]] == [(6, 12)]
    assert joiner.counts == {"t": 12}
    assert fresh().note() == ""
    ignored = fresh()
    ignored.learn(bad, {"t": 12})
    assert ignored.changes == {}
    # Learned at a later assignment too: this member's first look at the
    # topic already found 12, so it cannot have seen the growth itself.
    later = fresh()
    later.learn([], {"t": 12})
    later.observe({"t": 12})
    later.learn([note], {"t": 12})
    assert [(c.old, c.new) for c in later.changes["t"]] == [(6, 12)]
    # A member that saw 6 itself already has the change (not twice), and a
    # growth past the first count it saw is one it saw, not one to learn.
    assert [(c.old, c.new) for c in seen.changes["t"]] == [(6, 12)]
    seen.learn([note], {"t": 12})
    assert len(seen.changes["t"]) == 1
    eight = fresh()
    eight.observe({"t": 8})
    eight.learn(['keylane:repartition:1:[["t",8,12,1.0]]'], {"t": 12})
    assert eight.changes == {}
    # A transition over here is not opened again by a note that outlived it.
    later.closed.add(("t", 6, 12))
    later.changes.clear()
    later.learn([note], {"t": 12})
    assert later.changes == {}


async def test_a_late_producer_within_the_grace_keeps_order() -> None:
    # Records of moved keys still land on their old partition after the
    # growth, interleaved with their new partition's: those on the old one
    # are the key's past and must never wait (once they did, behind the
    # held ones that waited for them: a deadlock seen on Kafka).
    ledger, group, produced = await grow_mid_stream(
        members=1, late_producer=0.2, repartition_grace=0.6
    )
    assert_kept_order(ledger, produced)
    assert group.counter("repartition_held") > 0


def test_repartition_options_are_checked() -> None:
    b = keylane.MemoryBroker()
    assert keylane.App(b, topics=["t"], group="g").repartition == "hold"
    assert keylane.App(b, topics=["t"], group="g", ordering="none").repartition == "off"
    assert keylane.App(b, topics=["t"], group="g").repartition_grace == 0.0
    with pytest.raises(keylane.ConfigError, match="hold"):
        keylane.App(b, topics=["t"], group="g", repartition="always")  # type: ignore[arg-type]
    with pytest.raises(keylane.ConfigError, match='ordering="none"'):
        keylane.App(b, topics=["t"], group="g", ordering="none", repartition="hold")
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(keylane.ConfigError, match="repartition_grace"):
            keylane.App(b, topics=["t"], group="g", repartition_grace=bad)  # type: ignore[arg-type]
