"""scale-out: a wallet emits credit then debit per account; one consumer
keeps up poorly, eight consumers keep up, but only with per-key order do
the eight keep each account's credit before its debit.

Harm: debits applied before their account's credit (the account goes
negative). Defence: ``ordering="key"``."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict

import trio

from keylane.lab.ledger import Ledger, Options, Row, key_name, value
from keylane.lab.members import Group
from keylane.lab.target import open_broker
from keylane.message import Message

NAME = "scale-out"
DESCRIPTION = "credit then debit per account: 1 vs 8 consumers, ordering none vs key"
ACCOUNTS, PARTITIONS = 3_000, 12


def run(opts: Options) -> list[Row]:
    return [
        _run(opts, members=1, ordering="key"),
        _run(opts, members=opts.consumers or 8, ordering="none"),
        _run(opts, members=opts.consumers or 8, ordering="key"),
    ]


def _run(opts: Options, *, members: int, ordering: str) -> Row:
    accounts = opts.keys or (opts.messages // 2 if opts.messages else ACCOUNTS)
    n = 2 * accounts
    broker = open_broker(opts, partitions=PARTITIONS)
    topic = f"lab-wallet-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, PARTITIONS)
    amounts = random.Random(opts.seed).choices(range(1, 100), k=accounts)
    balance: dict[int, int] = defaultdict(int)
    early_debits = 0
    negative: set[int] = set()

    def apply(msg: Message, account: int, seq: int) -> None:
        nonlocal early_debits
        if seq == 0:
            balance[account] += amounts[account]
        else:
            if balance[account] < amounts[account]:
                early_debits += 1
            balance[account] -= amounts[account]
            if balance[account] < 0:
                negative.add(account)

    ledger = Ledger()
    group = Group(
        broker.broker,
        topic,
        f"lab-{uuid.uuid4().hex[:8]}",
        members,
        work=lambda r: r.uniform(0.001, 0.004),
        seed=opts.seed,
        ledger=ledger,
        apply=apply,
        ordering=ordering,
        concurrency=16,
        commit_interval=0.2,
    )

    async def main() -> float:
        # Each account's credit, then (a few records later) its debit.
        for a in range(accounts):
            broker.produce(topic, key_name(a), value(a, 0))
            if a >= 2:
                broker.produce(topic, key_name(a - 2), value(a - 2, 1))
        for a in range(max(0, accounts - 2), accounts):
            broker.produce(topic, key_name(a), value(a, 1))
        await broker.flush()
        async with trio.open_nursery() as nursery:
            await group.start(nursery)
            seconds = await group.wait_applied(n, limit=120)
            group.stop()
        return seconds

    try:
        seconds = trio.run(main)
    finally:
        broker.close()
    return Row(
        scenario=NAME,
        setting=f"{members} consumer{'s' if members > 1 else ''}, ordering={ordering}",
        protected=ordering == "key",
        harm=early_debits,
        lost=ledger.lost(dict.fromkeys(range(accounts), 2)),
        throughput=round(n / seconds, 1),
        extra={
            "consumers": members,
            "debits_before_credit": early_debits,
            "accounts_negative": len(negative),
            "inversions": ledger.inversions,
            "concurrent_runs": ledger.overlaps,
            "seconds": round(seconds, 2),
        },
    )
