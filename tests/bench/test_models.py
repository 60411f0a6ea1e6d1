"""The comparison's workloads and bounds: arithmetic checked by hand."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

import keylane
from keylane.bench import models
from keylane.bench.models import CellSpec, Work, bound_seconds, draw, ideal_throughput


@pytest.mark.parametrize("distribution", models.DISTRIBUTIONS)
def test_every_distribution_has_the_asked_mean(distribution: str) -> None:
    got = models.durations(distribution, 0.002, 40_000, random.Random(3))
    assert len(got) == 40_000
    assert min(got) >= 0
    # The long tail is capped at 100x the mean, which trims a little of it.
    assert statistics.fmean(got) == pytest.approx(0.002, rel=0.08)


def test_distributions_differ_in_their_tails() -> None:
    rng = random.Random(5)
    p99 = {}
    for d in models.DISTRIBUTIONS:
        xs = sorted(models.durations(d, 1.0, 20_000, rng))
        p99[d] = xs[int(0.99 * len(xs))]
    assert p99["fixed"] == 1.0
    assert p99["uniform"] < 2.0 < p99["exponential"] < p99["longtail"]


def test_a_draw_is_reproducible_from_its_seed() -> None:
    spec = CellSpec("key", 50, 1.0, "exponential", messages=2_000, seed=7)
    assert draw(spec) == draw(spec)
    assert draw(spec) != draw(CellSpec("key", 50, 1.0, "exponential", messages=2_000, seed=8))


def test_sequence_numbers_count_each_key_from_zero() -> None:
    work = draw(CellSpec("key", 7, 1.0, messages=100, skew=1.2))
    seen: Counter[int] = Counter()
    for key, seq in zip(work.keys, work.seqs, strict=True):
        assert seq == seen[key]
        seen[key] += 1


def test_keys_without_skew_are_even_and_with_skew_follow_zipf() -> None:
    even = Counter(draw(CellSpec("key", 10, 1.0, messages=1_000)).keys)
    assert set(even.values()) == {100}
    skewed = Counter(draw(CellSpec("key", 10, 1.0, messages=20_000, skew=1.0)).keys)
    # Zipf s=1 over 10 keys: the top key has 1 / H(10) = 34% of the traffic.
    assert skewed.most_common(1)[0] == (0, pytest.approx(0.341 * 20_000, rel=0.05))


def test_bounds_follow_each_model() -> None:
    # Four messages: keys 0, 1, 0, 1; work 4, 1, 2, 3 ms.
    work = Work([0, 1, 0, 1], [0, 0, 1, 1], [0.004, 0.001, 0.002, 0.003])
    spec = CellSpec("total", 2, 2.5, concurrency=4)
    assert bound_seconds(spec, work) == pytest.approx(0.010)
    assert bound_seconds(CellSpec("key", 2, 2.5, concurrency=4), work) == pytest.approx(0.006)
    assert bound_seconds(CellSpec("none", 2, 2.5, concurrency=4), work) == pytest.approx(0.004)
    # Concurrency 1 makes every model serial.
    assert bound_seconds(CellSpec("none", 2, 2.5, concurrency=1), work) == pytest.approx(0.010)
    # Partition order: both keys' partitions, as the broker places them.
    p = keylane.partitions_for_keys([models.key_name(0), models.key_name(1)], 12)
    same = p[0] == p[1]
    expected = 0.010 if same else 0.006
    assert bound_seconds(CellSpec("partition", 2, 2.5, concurrency=4), work) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("model", "keys", "expected"),
    [("total", 100, 1_000), ("key", 10, 10_000), ("key", 10_000, 256_000), ("none", 1, 256_000)],
)
def test_fixed_work_ideal_matches_the_closed_form(model: str, keys: int, expected: int) -> None:
    # min(concurrency, keys) / latency; 1 / latency for total order.
    spec = CellSpec(model, keys, 1.0, messages=20_000)
    assert ideal_throughput(spec, draw(spec)) == pytest.approx(expected)


def test_a_no_op_cell_has_no_ideal() -> None:
    spec = CellSpec("key", 10, 0.0, messages=100)
    assert ideal_throughput(spec, draw(spec)) is None


def test_cells_are_sized_to_about_a_second() -> None:
    assert models.cell_messages(CellSpec("total", 1, 1.0), 1.0) == 1_000
    assert models.cell_messages(CellSpec("key", 10, 1.0), 1.0) == 10_000
    assert models.cell_messages(CellSpec("key", 10_000, 1.0), 1.0) == 20_000  # the cap
    assert models.cell_messages(CellSpec("total", 1, 10.0), 1.0) == 1_000  # the floor
    assert models.cell_messages(CellSpec("none", 1, 0.0, messages=500), 1.0) == 500


@pytest.mark.parametrize(
    "bad",
    [
        {"model": "sorted"},
        {"distribution": "pareto"},
        {"keys": 0},
        {"latency_ms": -1.0},
        {"latency_ms": float("nan")},
        {"skew": -0.5},
        {"messages": True},
    ],
)
def test_bad_specs_are_config_errors(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"model": "key", "keys": 1, "latency_ms": 1.0, **bad}
    with pytest.raises(keylane.ConfigError):
        CellSpec(**args)  # type: ignore[arg-type]
