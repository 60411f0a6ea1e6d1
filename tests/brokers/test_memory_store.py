"""A persisted MemoryBroker after crashes and damage: a commit is never
durable before the records below it, lost records are reported, names read
from disk stay inside the directory."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import trio

import keylane
from keylane import MemoryBroker
from keylane.brokers import TopicPartition, _log_file

T = "orders"


def _on_disk(tmp_path: pathlib.Path, partition: int) -> int:
    path = tmp_path / "log" / f"{T}-{partition}.log"
    return len(_log_file.read(path, T, partition, truncate=False)) if path.exists() else 0


async def test_a_commit_reaches_disk_only_after_its_records(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    for i in range(50):
        b.produce(T, value=str(i))
    c = b.consumer("g", [T])
    await c.join()
    fetch = await c.fetch(50, 0.1)
    assert sum(len(r) for _, r in fetch.chunks) == 50
    assert _on_disk(tmp_path, 0) == 0, "produce alone buffers (flush writes)"
    await c.commit({TopicPartition(T, 0): 50})
    # No flush, no close: the commit itself wrote the records out first.
    assert _on_disk(tmp_path, 0) == 50


def test_a_commit_past_the_log_end_is_reported(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    for i in range(3):
        b.produce(T, value=str(i))
    b.close()
    (tmp_path / "groups.msgpack").write_bytes(msgpack.packb({"wallet": [[T, 0, 7]]}))
    with pytest.raises(
        keylane.CorruptLogError, match=r"group 'wallet' committed offset 7 of orders/0.*ends at 3"
    ):
        MemoryBroker(persist_dir=tmp_path)
    again = MemoryBroker(persist_dir=tmp_path, recover="truncate")
    assert again.committed("wallet") == {TopicPartition(T, 0): 3}


def test_a_log_cut_at_a_frame_boundary_is_reported(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    frames = [b.produce(T, value=str(i) * 5) for i in range(4)]
    b.produce(T, value=b"x")
    trio.run(b.aclose)  # written out, and 5 recorded as the end
    path = tmp_path / "log" / f"{T}-0.log"
    whole = path.read_bytes()
    cut = len(whole) - len(_log_file.encode(b.records(T, 0)[-1]))
    path.write_bytes(whole[:cut])  # exactly four whole frames remain
    with pytest.raises(keylane.CorruptLogError, match=r"holds 4 records but 5 were written"):
        MemoryBroker(persist_dir=tmp_path)
    again = MemoryBroker(persist_dir=tmp_path, recover="truncate")
    assert [m.value for m in again.records(T, 0)] == [m.value for m in frames]


def test_topic_names_read_from_disk_stay_inside_the_directory(tmp_path: pathlib.Path) -> None:
    inside = tmp_path / "state"
    inside.mkdir()
    victim = tmp_path / "outside" / "victim-0.log"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    (inside / "topics.msgpack").write_bytes(msgpack.packb({"../../outside/victim": 1}))
    with pytest.raises(keylane.CorruptLogError, match="invalid topic name"):
        MemoryBroker(persist_dir=inside, recover="truncate")
    assert victim.read_bytes() == b"precious"
    for bad in ({T: 0}, {T: True}, {T: 2**40}, [T]):
        (inside / "topics.msgpack").write_bytes(msgpack.packb(bad))
        with pytest.raises(keylane.CorruptLogError, match=r"topics\.msgpack is damaged"):
            MemoryBroker(persist_dir=inside)


def test_damaged_group_rows_are_refused(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    b.produce(T, value=b"x")
    b.close()
    for rows in ([[T, 5, 0]], [["nope", 0, 0]], [[T, 0, -1]], [[T, 0]], "x"):
        (tmp_path / "groups.msgpack").write_bytes(msgpack.packb({"g": rows}))
        with pytest.raises(keylane.CorruptLogError, match=r"groups\.msgpack is damaged"):
            MemoryBroker(persist_dir=tmp_path)


async def test_a_failed_produce_changes_nothing_on_disk(tmp_path: pathlib.Path) -> None:
    b = MemoryBroker(partitions=1, persist_dir=tmp_path)
    b.produce(T, value=b"a")
    with pytest.raises(keylane.InvalidArgument):
        b.produce(T, value=b"b", headers={"\udc00": b"x"})
    with pytest.raises(keylane.InvalidType):
        b.produce(T, value=b"b", timestamp="soon")  # type: ignore[arg-type]
    with pytest.raises(keylane.InvalidArgument):
        b.produce(T, value=b"b", timestamp=float("nan"))
    b.produce(T, value=b"c")
    await b.aclose()
    again = MemoryBroker(persist_dir=tmp_path)
    assert [(m.offset, m.value) for m in again.records(T, 0)] == [(0, b"a"), (1, b"c")]


# ---- SIGKILL at random moments -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, trio, keylane
    from keylane.brokers import TopicPartition

    async def main():
        b = keylane.MemoryBroker(partitions=2, persist_dir=sys.argv[1], recover="truncate")
        c = b.consumer("g", ["orders"])
        await c.join()
        b.create_topic("orders", 2)
        n = 0
        while True:
            for _ in range(50):
                p = n % 2
                end = b.end_offsets("orders")[p]
                b.produce("orders", value=b"%d" % (2 * end + p), partition=p)
                n += 1
            await b.flush()
            ends = b.end_offsets("orders")
            print("ACK", *ends, flush=True)
            fetch = await c.fetch(10_000, 0.0)
            got = {tp: recs[-1].offset + 1 for tp, recs in fetch.chunks}
            if got:
                await c.commit(got)

    trio.run(main)
    """
)


def test_sigkill_loop_never_commits_past_the_durable_log(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    state = tmp_path / "state"
    rng = random.Random(7)
    acked = [0, 0]
    kills = 0
    while kills < 20:
        child = subprocess.Popen(
            [sys.executable, str(script), str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        # Wait for the first acknowledgement, then kill at a random moment.
        first = child.stdout.readline()
        assert first.startswith("ACK"), child.stderr.read() if child.stderr else first
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        kills += 1
        lines = out.split("\n")[:-1]  # the last is cut short by the kill (or empty)
        for line in [first, *lines]:
            if line.startswith("ACK"):
                acked = [max(a, int(x)) for a, x in zip(acked, line.split()[1:], strict=True)]
        b = MemoryBroker(persist_dir=state, recover="truncate")
        ends = b.end_offsets(T)
        committed = b.committed("g")
        for p in (0, 1):
            assert ends[p] >= acked[p], f"kill {kills}: acknowledged records lost on {p}"
            assert committed.get(TopicPartition(T, p), 0) <= ends[p]
            values = [m.value for m in b.records(T, p)]
            # Every record is there, in order, exactly once.
            assert values == [b"%d" % (2 * i + p) for i in range(len(values))]
        b.close()
    assert kills == 20
