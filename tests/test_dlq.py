"""DLQ replay past malformed records: it names them, commits what came
before, and parks them on request, so a rerun never duplicates."""

from __future__ import annotations

import base64
import json
import pathlib

import msgpack
import pytest
import trio

import keylane
from keylane import MemoryBroker
from keylane.dlq import (
    PARKED_HEADER,
    REPLAY_HEADER,
    DeadLetter,
    DeadLetterFormatError,
    ReplayStopped,
    replay,
)
from keylane.message import Message

DLQ = "payments.dlq"


def dead_letters(broker: MemoryBroker, values: list[bytes | None]) -> None:
    """A one-partition DLQ: a good dead letter for each None, the raw bytes
    otherwise (malformed)."""
    broker.create_topic(DLQ, 1)
    broker.create_topic("payments", 1)
    for i, raw in enumerate(values):
        if raw is None:
            msg = Message("payments", 0, i, b"k", f"v{i}".encode(), {"version": b"1"}, 0.0)
            raw = DeadLetter.of(msg, RuntimeError("x"), 3, "wallet").encode()
        broker.produce(DLQ, key="k", value=raw)


def replayed_values(broker: MemoryBroker) -> list[bytes]:
    return [m.value for m in broker.records("payments", 0) if REPLAY_HEADER in m.headers]


async def test_replay_stops_at_a_malformed_record_naming_it_and_keeps_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=1)
    dead_letters(broker, [None, None, b"\xc1not msgpack", None])
    with pytest.raises(ReplayStopped, match=r"payments\.dlq/0/2 is malformed") as info:
        await replay(broker, DLQ, group="wallet", rate=1000)
    assert (info.value.topic, info.value.partition, info.value.offset) == (DLQ, 0, 2)
    assert isinstance(info.value, DeadLetterFormatError)
    assert replayed_values(broker) == [b"v0", b"v1"]
    # The good records before it were committed: a rerun does not repeat them.
    with pytest.raises(ReplayStopped):
        await replay(broker, DLQ, group="wallet", rate=1000)
    assert replayed_values(broker) == [b"v0", b"v1"]


async def test_skip_malformed_parks_in_a_topic_and_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    broker = MemoryBroker(partitions=1)
    # A msgpack map that is not a dead letter, and one with a wrong type.
    good = DeadLetter.of(Message("payments", 0, 0, b"k", b"v", {}, 0.0), RuntimeError("x"), 1, "g")
    record = msgpack.unpackb(good.encode())
    record["value"] = 42
    wrong_type = msgpack.packb(record)
    dead_letters(broker, [None, b"\x81\xa1a\x01", None, wrong_type])
    with pytest.raises(ReplayStopped):
        await replay(broker, DLQ, group="wallet", rate=1000)
    assert (
        await replay(
            broker, DLQ, group="wallet", rate=1000, skip_malformed=True, park_topic="parked"
        )
        == 1
    )
    assert replayed_values(broker) == [b"v0", b"v2"]
    parked = broker.records("parked", 0)
    assert parked[0].value == b"\x81\xa1a\x01"
    assert parked[0].headers[PARKED_HEADER] == f"{DLQ}/0/1".encode()
    assert len(parked) == 2
    assert broker.committed("wallet.dlq-replay") == {keylane.TopicPartition(DLQ, 0): 4}


async def test_skip_malformed_parks_in_a_file(
    autojump_clock: trio.abc.Clock, tmp_path: pathlib.Path
) -> None:
    broker = MemoryBroker(partitions=1)
    dead_letters(broker, [b"\x00junk", None])
    out = tmp_path / "parked.jsonl"
    assert (
        await replay(broker, DLQ, group="wallet", rate=1000, skip_malformed=True, park_file=out)
        == 1
    )
    (line,) = out.read_text().splitlines()
    row = json.loads(line)
    assert row["origin"] == f"{DLQ}/0/0"
    assert base64.b64decode(row["value"]) == b"\x00junk"
    assert "msgpack" in row["problem"] or "dead-letter" in row["problem"]


@pytest.mark.parametrize(
    "kw",
    [
        {"skip_malformed": True},
        {"skip_malformed": True, "park_topic": "p", "park_file": "f"},
        {"park_topic": "p"},
    ],
)
async def test_parking_needs_exactly_one_place(kw: dict[str, object]) -> None:
    broker = MemoryBroker(partitions=1)
    with pytest.raises(keylane.ConfigError):
        await replay(broker, DLQ, group="wallet", **kw)  # type: ignore[arg-type]
