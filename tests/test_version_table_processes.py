"""VersionTable across processes: concurrent writers and readers, and SIGKILL.

Each test starts real Python processes on one table (LMDB's one writer, many
readers, with its lock file shared between processes).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from keylane import VersionTable

WRITER = textwrap.dedent(
    """
    import json, sys
    from keylane import VersionTable
    path, n, jk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    accepted = []
    with VersionTable(path, durable=False, journal_entries=jk) as t:
        for v in range(1, n + 1):
            if t.check_and_set(b"shared", v):
                accepted.append(v)
    print(json.dumps(accepted))
    """
)

READER = textwrap.dedent(
    """
    import json, sys
    from keylane import VersionTable
    path, n, jk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    last, reads = -1, 0
    with VersionTable(path, durable=False, journal_entries=jk) as t:
        while last < n:
            v = t.get(b"shared")
            v = -1 if v is None else v
            assert v >= last, f"went back from {last} to {v}"
            last, reads = v, reads + 1
    print(json.dumps(reads))
    """
)


def _run(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Journal sizes: the default (no fold during the test) and folds every few
# commits, so that each process keeps meeting records, and folds of records,
# written by the others.
JOURNALS = pytest.mark.parametrize("journal_entries", [262_144, 3], ids=["no-folds", "folds"])


@JOURNALS
def test_concurrent_processes_never_accept_a_version_twice(
    tmp_path: pathlib.Path, journal_entries: int
) -> None:
    path = tmp_path / "t"
    VersionTable(path, durable=False).close()
    n = 3000
    procs = [_run(s, path, n, journal_entries) for s in (WRITER, WRITER, READER)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    a, b, reads = outs
    assert not set(a) & set(b), "a version was accepted by both writers"
    # Each writer's accepted versions increase; together they end at n.
    assert a == sorted(a)
    assert b == sorted(b)
    assert max(a + b) == n
    assert reads > 0
    with VersionTable(path) as t:
        assert t.get(b"shared") == n


CRASHER = textwrap.dedent(
    """
    import sys
    from keylane import VersionTable
    path, durable, keys, start = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    # A fold every third batch: kills land in folds too.
    with VersionTable(path, durable=durable, journal_entries=3 * keys) as t:
        b = start
        while True:
            b += 1
            results = t.check_and_set_many((f"k{i:04d}", b) for i in range(keys))
            # A version going backwards would show up here as False.
            if not all(results):
                print("BACKWARDS", b, flush=True)
                sys.exit(3)
            print(b, flush=True)  # acknowledged: committed before this line
    """
)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "nosync"])
def test_sigkill_mid_stream_loses_no_acknowledged_batch(
    tmp_path: pathlib.Path, durable: bool
) -> None:
    """Kill a writer mid-stream, reopen, check: every acknowledged batch is
    there, no batch is half applied, no version went backwards. Three kills
    in a row on the same table, each run resuming where the last left off.

    durable=False (MDB_NOSYNC) also survives a *process* crash: commits are in
    the OS page cache. Only an OS crash or power loss can lose them.
    """
    path = tmp_path / "t"
    # Big enough that a batch takes milliseconds: the kill lands inside one.
    keys = 2000
    start = 0
    for round_ in range(3):
        proc = _run(CRASHER, path, int(durable), keys, start)
        assert proc.stdout is not None
        acked = start
        # Let it commit a varying number of batches, then kill it without
        # warning, most likely in the middle of one.
        target = start + 5 + 7 * round_
        for line in proc.stdout:
            assert not line.startswith("BACKWARDS"), line
            acked = int(line)
            if acked >= target:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # Batches acknowledged between our read and the kill are still in
        # the pipe: they count too. A torn last line was never acknowledged.
        for line in proc.stdout.read().splitlines(keepends=True):
            assert not line.startswith("BACKWARDS"), line
            if line.endswith("\n"):
                acked = int(line)
        with VersionTable(path, durable=durable) as t:
            got = t.get_many(f"k{i:04d}" for i in range(keys))
        stored = set(got)
        assert len(stored) == 1, f"a batch was half applied: versions {sorted(stored, key=str)}"
        (version,) = stored
        assert version is not None
        # Everything acknowledged is there; at most the batch in flight when
        # the kill came made it too.
        assert acked <= version <= acked + 1, (acked, version)
        start = version


STEPPER = textwrap.dedent(
    """
    import sys
    from keylane import VersionTable
    with VersionTable(sys.argv[1], durable=False, journal_entries=int(sys.argv[2])) as t:
        for line in sys.stdin:
            key, version = line.split()
            print(t.check_and_set(key, int(version)), flush=True)
    """
)


@pytest.mark.parametrize("journal_entries", [262_144, 1], ids=["no-folds", "fold-each-commit"])
def test_what_a_process_remembers_never_overrules_another_writer(
    tmp_path: pathlib.Path, journal_entries: int
) -> None:
    """Each process remembers versions it saw stored and answers "stale" from
    memory when it can. Another process's newer write must still be seen."""
    path = tmp_path / "t"
    VersionTable(path, durable=False).close()
    a = subprocess.Popen(
        [sys.executable, "-c", STEPPER, str(path), str(journal_entries)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    b = subprocess.Popen(
        [sys.executable, "-c", STEPPER, str(path), str(journal_entries)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def ask(p: subprocess.Popen[str], key: str, version: int) -> bool:
        assert p.stdin is not None
        assert p.stdout is not None
        p.stdin.write(f"{key} {version}\n")
        p.stdin.flush()
        return p.stdout.readline().strip() == "True"

    try:
        assert ask(a, "k", 5)
        assert not ask(a, "k", 5)  # a now remembers 5
        assert ask(b, "k", 9)
        assert not ask(a, "k", 7), "a remembers 5, LMDB has 9: must read LMDB"
        assert not ask(a, "k", 9)
        assert ask(a, "k", 10)
        assert not ask(b, "k", 10), "b remembers 9, LMDB has 10"
    finally:
        for p in (a, b):
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)
    with VersionTable(path) as t:
        assert t.get(b"k") == 10
