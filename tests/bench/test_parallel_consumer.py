"""The Parallel Consumer preset: its published table, its bounds, and small
real rows."""

from __future__ import annotations

import statistics

import pytest

from keylane.bench import parallel_consumer as pc
from keylane.bench import targets
from keylane.bench.models import bound_seconds, draw


def test_the_published_table_is_complete() -> None:
    assert [k for m, k in pc.ROWS if m == "key"] == [1, 2, 5, 10, 20, 100, 1000, 10_000]
    assert pc.PUBLISHED[("partition", pc.MESSAGES)] == 22.221
    assert pc.PUBLISHED[("none", pc.MESSAGES)] == 2.829
    assert pc.PUBLISHED[("key", 1)] == 26.743


def test_the_work_is_uniform_zero_to_five_ms_and_the_same_for_every_row() -> None:
    work = draw(pc.spec("key", 10)).seconds
    assert work == draw(pc.spec("partition", pc.MESSAGES)).seconds
    assert len(work) == pc.MESSAGES
    assert min(work) >= 0
    assert max(work) <= 0.005
    assert statistics.fmean(work) == pytest.approx(0.0025, rel=0.03)


def test_bounds_follow_the_ordering_model() -> None:
    s = pc.spec("partition", pc.MESSAGES)
    total = sum(draw(s).seconds)
    assert bound_seconds(s, draw(s)) == pytest.approx(total)  # one partition: serial
    one_key = pc.spec("key", 1)
    assert bound_seconds(one_key, draw(one_key)) == pytest.approx(total)
    many = pc.spec("key", 10_000)
    assert bound_seconds(many, draw(many)) == pytest.approx(total / pc.CONCURRENCY)


@pytest.mark.parametrize(("model", "keys"), [("key", 4), ("partition", 300)])
def test_a_small_row_runs_near_its_bound_on_the_memory_broker(model: str, keys: int) -> None:
    row = pc.run_row(targets.memory(), model, keys, bare_s=0.0, seed=2, messages=300)
    # A run can never beat its bound (its sleeps never end early); the 2x
    # is only a sanity bound, the target itself is checked by the preset.
    assert row.seconds >= row.bound_s * 0.98
    assert row.ratio < 2.0
    assert row.cell.order_violations == 0
    assert row.as_json()["ratio_to_bound"] == row.ratio
    # A short row reports the median of its runs.
    assert len(row.runs) == pc.SHORT_ROW_RUNS
    assert row.runs == sorted(row.runs)
    assert row.seconds == row.runs[pc.SHORT_ROW_RUNS // 2]
