"""producer-retry: a producer with several batches in flight, where some
sends fail and are retried.

The network is simulated (which send fails, and whether the broker had
appended it before the failure: a lost request or a lost acknowledgement);
the broker side is MemoryBroker's real produce path, with and without its
idempotent-producer sequence check. Harm: pairs of one key's records that
land in the log in swapped order, and records in the log twice. Defence:
an idempotent producer (per producer and partition sequence numbers)."""

from __future__ import annotations

import random
import uuid
from collections import deque

import trio

from keylane._native import partition_for_key
from keylane.brokers.memory import MemoryBroker
from keylane.errors import BrokerError
from keylane.lab.ledger import VALUE, Ledger, Options, Row, key_name, value
from keylane.lab.members import Group
from keylane.lab.target import check_memory_only

NAME = "producer-retry"
DESCRIPTION = "batches in flight, one fails and is retried: swaps and duplicates in the log"
MESSAGES, KEYS, PARTITIONS, BATCH = 6_000, 200, 4, 10
# Per send: the request is lost (nothing appended), or the acknowledgement
# is (appended, but the producer does not know and sends it again).
LOST_REQUEST, LOST_ACK = 0.03, 0.03


def run(opts: Options) -> list[Row]:
    check_memory_only(opts, NAME)
    return [
        _run(opts, idempotent=False, in_flight=5),
        _run(opts, idempotent=False, in_flight=1),
        _run(opts, idempotent=True, in_flight=5),
    ]


def _run(opts: Options, *, idempotent: bool, in_flight: int) -> Row:
    n = opts.messages or MESSAGES
    keys = opts.keys or KEYS
    rng = random.Random(opts.seed)
    broker = MemoryBroker(PARTITIONS)
    topic = f"lab-producer-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, PARTITIONS)
    produced: dict[int, int] = {}
    # The producer's batches: per partition in order, records numbered.
    batches: list[tuple[int, int, list[tuple[str, bytes]]]] = []
    pending: dict[int, list[tuple[str, bytes]]] = {p: [] for p in range(PARTITIONS)}
    seqs = dict.fromkeys(range(PARTITIONS), 0)
    for _ in range(n):
        k = rng.randrange(keys)
        seq = produced.get(k, 0)
        produced[k] = seq + 1
        p = partition_for_key(key_name(k), PARTITIONS)
        pending[p].append((key_name(k), value(k, seq)))
        if len(pending[p]) == BATCH:
            batches.append((p, seqs[p], pending[p]))
            seqs[p] += BATCH
            pending[p] = []
    for p, records in pending.items():
        if records:
            batches.append((p, seqs[p], records))
    round_trips = _send(broker, topic, batches, rng, idempotent=idempotent, in_flight=in_flight)
    swaps, duplicates = _log_harm(broker, topic)
    ledger = Ledger()
    group = Group(
        broker, topic, "lab", 1, work=lambda r: 0.0, seed=opts.seed, ledger=ledger, concurrency=32
    )

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await group.start(nursery)
            seconds = await group.wait_applied(n, limit=120)
            group.stop()
        return seconds

    seconds = trio.run(main)
    broker.close()
    name = "idempotent" if idempotent else "non-idempotent"
    return Row(
        scenario=NAME,
        setting=f"{name} producer, {in_flight} in flight",
        protected=idempotent,
        harm=swaps + duplicates,
        lost=ledger.lost(produced),
        throughput=round(n / seconds, 1),
        extra={
            "swapped_pairs": swaps,
            "duplicates_in_log": duplicates,
            "applied_inversions": ledger.inversions,
            "round_trips": round_trips,
        },
    )


def _send(
    broker: MemoryBroker,
    topic: str,
    batches: list[tuple[int, int, list[tuple[str, bytes]]]],
    rng: random.Random,
    *,
    idempotent: bool,
    in_flight: int,
) -> int:
    """Sends every batch, ``in_flight`` at a time per round trip, retrying
    failures after the sends already in flight; returns the round trips."""
    queue = deque(batches)
    trips = 0
    while queue:
        trips += 1
        window = [queue.popleft() for _ in range(min(in_flight, len(queue)))]
        retry = []
        for batch in window:
            p, seq, records = batch
            roll = rng.random()
            if roll < LOST_REQUEST:
                retry.append(batch)
                continue
            try:
                if idempotent:
                    broker.produce_batch(topic, p, records, producer_id=1, sequence=seq)
                else:
                    broker.produce_batch(topic, p, records)
            except BrokerError:
                # Out of sequence: an earlier batch of this partition is
                # missing; sent again after it.
                retry.append(batch)
                continue
            if roll < LOST_REQUEST + LOST_ACK:
                retry.append(batch)
        # Retries go out in their original order, before anything newer.
        queue.extendleft(sorted(retry, key=lambda b: (b[0], b[1]), reverse=True))
    return trips


def _log_harm(broker: MemoryBroker, topic: str) -> tuple[int, int]:
    """Per key, records whose sequence number is below one earlier in the
    log (swaps) and records already in the log (duplicates)."""
    swaps = duplicates = 0
    for p in range(broker.partitions(topic)):
        top: dict[int, int] = {}
        seen: set[tuple[int, int]] = set()
        for m in broker.records(topic, p):
            k, seq = VALUE.unpack_from(m.value)
            if (k, seq) in seen:
                duplicates += 1
                continue
            seen.add((k, seq))
            if seq < top.get(k, -1):
                swaps += 1
            else:
                top[k] = seq
    return swaps, duplicates
