"""VersionTable.check_and_set_many against the same logic on py-lmdb.

100,000 keys, 1,000 pairs per transaction, three passes: insert (version 1),
redelivery (version 1 again: all stale), update (version 2); with keys in
key order (ids that grow, like the ones that reproduce the ~0.6 M ops/s
py-lmdb baseline quoted in the issue) and in a fixed random order (entity
keys arriving in no order, where an in-place B-tree update copies a page per
key). Both run with fsync off (durable=False / sync=False) in alternating
rounds on fresh directories; figures are medians of per-round ratios. The
timed part opens the table, runs the batches and closes it: keylane's
close() folds its journal into the B-tree, so that cost is in the figure.
A second keylane configuration folds every 16,384 entries (twelve folds
per run instead of one at close) to show what frequent folds cost.
Durable commits (fsync per commit) are measured separately.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any

import pytest

from keylane import VersionTable
from keylane.bench.baselines import PyLmdbVersions

from .conftest import AtLeast, Perf, alternate, median

KEYS = [f"entity-{i:08d}".encode() for i in range(100_000)]
BATCH = 1_000
PASSES = (1, 1, 2)
OPS = len(KEYS) * len(PASSES)
SMALL_JOURNAL = 16_384


def _batches(order: list[int]) -> list[list[tuple[bytes, int]]]:
    return [
        [(KEYS[i], version) for i in order[start : start + BATCH]]
        for version in PASSES
        for start in range(0, len(order), BATCH)
    ]


ORDERS = {
    "key-order": list(range(len(KEYS))),
    # A fixed shuffle: neither implementation gets sorted input.
    "random-order": sorted(range(len(KEYS)), key=lambda i: (i * 2654435761) % 2**32),
}


def run(table: Any, batches: list[list[tuple[bytes, int]]]) -> int:
    accepted = 0
    for batch in batches:
        accepted += sum(table.check_and_set_many(batch))
    return accepted


def _native(batches: list[list[tuple[bytes, int]]], journal_entries: int | None = None) -> int:
    with (
        tempfile.TemporaryDirectory() as d,
        VersionTable(d, durable=False, journal_entries=journal_entries) as t,
    ):
        return run(t, batches)


def _py_lmdb(batches: list[list[tuple[bytes, int]]]) -> int:
    with tempfile.TemporaryDirectory() as d:
        t = PyLmdbVersions(d, durable=False)
        try:
            return run(t, batches)
        finally:
            t.close()


@pytest.fixture(scope="module", autouse=True)
def _targets(perf: Perf) -> None:
    perf.expect(AtLeast("version-table key-order", "speedup over py-lmdb (median of rounds)", 3.0))


@pytest.mark.parametrize("order", list(ORDERS))
def test_check_and_set_many_vs_py_lmdb(perf: Perf, order: str) -> None:
    batches = _batches(ORDERS[order])
    expected = 2 * len(KEYS)  # inserts and updates; the redelivery pass is all stale
    assert _native(batches) == expected
    assert _native(batches, SMALL_JOURNAL) == expected
    assert _py_lmdb(batches) == expected
    times = alternate(
        {
            "native": lambda: _native(batches),
            "native-small-journal": lambda: _native(batches, SMALL_JOURNAL),
            "py-lmdb": lambda: _py_lmdb(batches),
        },
        rounds=7,
    )
    group = f"version-table {order}"
    for name, label in (("native", ""), ("native-small-journal", ", folds every 16,384")):
        ratios = [p / n for p, n in zip(times["py-lmdb"], times[name], strict=True)]
        perf.figure(group, f"speedup over py-lmdb{label} (median of rounds)", median(ratios))
        perf.figure(group, f"keylane{label} M ops/s (median)", OPS / median(times[name]) / 1e6)
    perf.figure(group, "py-lmdb M ops/s (median)", OPS / median(times["py-lmdb"]) / 1e6)


def test_durable_commits(perf: Perf, tmp_path: pathlib.Path) -> None:
    """One check_and_set per commit with fsync: what a handler pays to record
    a version durably before acknowledging."""
    n = 300
    latencies = []
    with VersionTable(tmp_path / "t", durable=True) as t:
        for i in range(n):
            start = time.perf_counter()
            assert t.check_and_set(KEYS[i], 1)
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    perf.figure("version-table-durable", "commits/s", n / sum(latencies))
    perf.figure("version-table-durable", "p50 commit latency ms", latencies[n // 2] * 1e3)
    perf.figure("version-table-durable", "p99 commit latency ms", latencies[int(n * 0.99)] * 1e3)
    with VersionTable(tmp_path / "batched", durable=True) as t:
        start = time.perf_counter()
        for batch in _batches(ORDERS["random-order"])[:50]:
            t.check_and_set_many(batch)
        elapsed = time.perf_counter() - start
    perf.figure(
        "version-table-durable", "batched (1,000/commit) M ops/s", 50 * BATCH / elapsed / 1e6
    )


def test_fold_pause(perf: Perf, tmp_path: pathlib.Path) -> None:
    """How long the commit that folds the journal takes: a journal of
    `journal_entries` random keys folded into a 1,000,000-key table (bigger than
    the default cache, so the index is not complete). This is the pause a
    latency-sensitive caller sees once per `journal_entries` raised versions."""
    import random

    n = 1_000_000
    keys = [f"entity-{i:08d}".encode() for i in range(n)]
    path = tmp_path / "big"
    with VersionTable(path, durable=False) as t:
        for start in range(0, n, BATCH):
            t.check_and_set_many([(k, 1) for k in keys[start : start + BATCH]])
    version = 1
    for journal_entries in (65_536, 16_384):
        pauses = []
        for round_ in range(3):
            sample = random.Random(round_).sample(keys, journal_entries)
            version += 1
            # One more than the journal holds: the fold is ours to time.
            with VersionTable(path, durable=False, journal_entries=journal_entries + 1) as t:
                for start in range(0, journal_entries, BATCH):
                    t.check_and_set_many([(k, version) for k in sample[start : start + BATCH]])
                assert t.info()["journal_records"] == journal_entries // BATCH + 1
                start_time = time.perf_counter()
                t.checkpoint()
                pauses.append(time.perf_counter() - start_time)
        perf.figure(
            "version-table fold pause",
            f"{journal_entries:,} random keys into 1M keys, ms (median of 3)",
            median(pauses) * 1e3,
        )


REPLAY_WRITER = """
import os, sys
from keylane import VersionTable
t = VersionTable(sys.argv[1], durable=False, journal_entries=1 << 30)
keys = [f"entity-{i:08d}".encode() for i in range(int(sys.argv[2]))]
for start in range(0, len(keys), 1000):
    t.check_and_set_many([(k, 1) for k in keys[start : start + 1000]])
os._exit(0)  # no close(): the journal is left for the next open
"""


def test_journal_replay(perf: Perf, tmp_path: pathlib.Path) -> None:
    """What the first call after opening costs when the last writer died
    without close(): reading its journal (65,536 entries) into the index."""
    import subprocess
    import sys

    n = 65_536
    times = []
    for round_ in range(3):
        path = tmp_path / f"t{round_}"
        subprocess.run([sys.executable, "-c", REPLAY_WRITER, str(path), str(n)], check=True)
        start = time.perf_counter()
        # cache_keys=0: the B-tree is empty anyway; only the journal is read.
        with VersionTable(path, durable=False, cache_keys=0) as t:
            assert t.get(b"entity-00000000") == 1
            times.append(time.perf_counter() - start)
            assert t.info()["journal_records"] == -(-n // 1000)
    perf.figure(
        "version-table replay", "65,536 journal entries, ms (median of 3)", median(times) * 1e3
    )
