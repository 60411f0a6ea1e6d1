"""murmur2 over 1M keys: native batch vs native one-by-one vs pure Python."""

from __future__ import annotations

import pytest

import keylane
from keylane.bench.baselines import murmur2_py

from .conftest import AtMost, Faster, Perf

N_KEYS = 1_000_000
PARTITIONS = 12


def _keys(length: int) -> list[bytes]:
    return [f"key-{i:012d}".encode().ljust(length, b"x")[:length] for i in range(N_KEYS)]


@pytest.fixture(scope="module", params=[16, 100], ids=lambda n: f"{n}B")
def keys(request: pytest.FixtureRequest) -> list[bytes]:
    return _keys(request.param)


def _group(keys: list[bytes]) -> str:
    return f"murmur2-{len(keys[0])}B"


@pytest.fixture(scope="module", autouse=True)
def _targets(perf: Perf) -> None:
    for length in (16, 100):
        g = f"murmur2-{length}B"
        perf.expect(Faster(g, "native-batch", "pure-python", 50.0))
    perf.expect(AtMost("murmur2-call", "native-single-call", 200e-9))


def test_native_batch(benchmark, perf: Perf, keys: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    result = benchmark.pedantic(
        keylane.partitions_for_keys, args=(keys, PARTITIONS), rounds=7, warmup_rounds=1
    )
    assert len(result) == N_KEYS
    perf.record(benchmark, _group(keys), "native-batch", N_KEYS)


def test_native_one_by_one(benchmark, perf: Perf, keys: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[int]:
        m = keylane.murmur2
        return [(m(k) & 0x7FFFFFFF) % PARTITIONS for k in keys]

    result = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert result[:1000] == keylane.partitions_for_keys(keys[:1000], PARTITIONS)
    perf.record(benchmark, _group(keys), "native-one-by-one", N_KEYS)


def test_pure_python(benchmark, perf: Perf, keys: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    def run() -> list[int]:
        return [(murmur2_py(k) & 0x7FFFFFFF) % PARTITIONS for k in keys]

    result = benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    assert result[:1000] == keylane.partitions_for_keys(keys[:1000], PARTITIONS)
    perf.record(benchmark, _group(keys), "pure-python", N_KEYS)


def test_single_call_overhead(benchmark, perf: Perf) -> None:  # type: ignore[no-untyped-def]
    key = b"account-00000042"
    # The timed loop calls murmur2 1,000 times per round, so the Python loop
    # overhead is counted too (a conservative figure).
    calls = range(1000)

    def run() -> int:
        m = keylane.murmur2
        h = 0
        for _ in calls:
            h = m(key)
        return h

    assert benchmark.pedantic(run, rounds=200, warmup_rounds=5) == keylane.murmur2(key)
    perf.record(benchmark, "murmur2-call", "native-single-call", 1000)
