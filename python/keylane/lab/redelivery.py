"""redelivery: at-least-once delivery hands a consumer messages it already
handled — a member crashes after handling and before committing, and the
next one starts from the last commit, so a key sees [5, 6, 5, 6].

Each message adds an amount to its account. Harm: accounts whose final
balance is wrong. Defences: message-id dedupe, an effect that may repeat
(last write wins: the message carries the balance to set, applied only if
its version is newer), and keylane's version check."""

from __future__ import annotations

import random
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from keylane.brokers.memory import MemoryBroker
from keylane.lab.ledger import Ledger, Options, Row, key_name, value
from keylane.lab.members import Group, poll_until
from keylane.lab.target import check_memory_only
from keylane.message import Message

NAME = "redelivery"
DESCRIPTION = "a crash before the commit redelivers [5, 6, 5, 6]: double-applied effects"
MESSAGES, KEYS = 6_000, 300
SETTINGS = ("no defence", "message-id dedupe", "last-write-wins effect", "version check")


def run(opts: Options) -> list[Row]:
    check_memory_only(opts, NAME)
    return [_run(opts, setting) for setting in SETTINGS]


def _run(opts: Options, setting: str) -> Row:
    n = opts.messages or MESSAGES
    keys = opts.keys or KEYS
    rng = random.Random(opts.seed)
    broker = MemoryBroker(6, session_timeout=1.0)
    topic = f"lab-redelivery-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, 6)
    produced: dict[int, int] = {}
    expected: dict[int, int] = defaultdict(int)
    amounts: dict[tuple[int, int], int] = {}
    for i in range(n):
        k = rng.randrange(keys)
        seq = produced.get(k, 0)
        produced[k] = seq + 1
        amount = rng.randrange(1, 100)
        amounts[(k, seq)] = amount
        expected[k] += amount
        headers = {"version": str(seq + 1), "id": f"{k}-{seq}", "balance": str(expected[k])}
        broker.produce(topic, key_name(k), value(k, seq), headers)
        del i
    balance: dict[int, int] = defaultdict(int)
    lww: dict[int, tuple[int, int]] = {}

    def apply(msg: Message, k: int, seq: int) -> None:
        if setting == "last-write-wins effect":
            version = seq + 1
            if lww.get(k, (0, 0))[0] < version:
                lww[k] = (version, int(msg.headers["balance"]))
        else:
            balance[k] += amounts[(k, seq)]

    tmp = tempfile.TemporaryDirectory()
    options: dict[str, Any] = {"concurrency": 16}
    if setting == "message-id dedupe":
        options.update(
            versions=Path(tmp.name) / "ids", dedupe=True, version_of=lambda m: None,
            record_versions="each",
        )  # fmt: skip
    elif setting == "version check":
        options.update(versions=Path(tmp.name) / "versions", record_versions="each")
    ledger = Ledger()
    work = lambda r: r.uniform(0.0005, 0.002)  # noqa: E731
    # The first member never commits before it crashes; the second does.
    first = Group(broker, topic, "lab", 1, work=work, seed=opts.seed, ledger=ledger,
                  apply=apply, commit_interval=30.0, **options)  # fmt: skip
    second = Group(broker, topic, "lab", 1, work=work, seed=opts.seed, ledger=ledger,
                   apply=apply, commit_interval=0.1, **options)  # fmt: skip

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await first.start(nursery)
            # Crash after 40% was handled: nothing of it was committed yet.
            ledger.target = int(0.4 * n)
            await ledger.reached.wait()
            ledger.reached = trio.Event()
            for app in first.apps:
                app.abort()
            await trio.sleep(1.1)  # its session expires
            await second.start(nursery)
            first.started = second.started
            seconds = await second.wait_applied(n, limit=120)
            # The redelivered ones too: wait until the log is committed.
            await poll_until(
                lambda: broker.committed("lab") == _ends(broker, topic),
                limit=30,
                what="the final commit",
            )
            second.stop()
        return seconds

    try:
        seconds = trio.run(main)
    finally:
        broker.close()
        tmp.cleanup()
    final = {k: v for k, (_, v) in lww.items()} if setting == "last-write-wins effect" else balance
    wrong = sum(1 for k in produced if final.get(k, 0) != expected[k])
    return Row(
        scenario=NAME,
        setting=setting,
        protected=setting != "no defence",
        harm=wrong,
        lost=ledger.lost(produced),
        throughput=round(n / seconds, 1),
        extra={
            "wrong_final_states": wrong,
            "double_applied": ledger.duplicates,
            "redelivered": int(second.counter("consumed")) - (n - int(0.4 * n)),
        },
    )


def _ends(broker: MemoryBroker, topic: str) -> dict[Any, int]:
    from keylane.brokers.base import TopicPartition

    return {TopicPartition(topic, p): e for p, e in enumerate(broker.end_offsets(topic)) if e}
