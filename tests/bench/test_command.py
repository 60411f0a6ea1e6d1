"""`keylane bench` end to end, small: every preset and flag, the JSON's
shape, plots written, bad options refused with usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from keylane.cli import ENV_PREFIX, main

# Every model-comparison cell carries at least these (issue #10).
CELL_FIELDS = {
    "model",
    "keys",
    "latency_ms",
    "distribution",
    "concurrency",
    "partitions",
    "messages",
    "seconds",
    "throughput",
    "ideal_throughput",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "dispatch_p99_ms",
    "max_in_flight",
    "peak_rss_mb",
    "order_violations",
    "preset",
    "broker",
}


def bench(*args: str) -> Result:
    return CliRunner().invoke(main, ["bench", *args], auto_envvar_prefix=ENV_PREFIX)


def cells(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    assert isinstance(data, list)
    return data


def _png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_preset_writes_every_cell_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    result = bench(
        "--preset", "models", "--models", "total,key,none", "--keys", "1,20",
        "--latency", "1", "--distribution", "fixed,exponential", "-n", "300",
        "--concurrency", "32", "--partitions", "4", "--seed", "3",
        "--json", str(out), "--plot", str(tmp_path / "plots"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = cells(out)
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row.keys() >= CELL_FIELDS
        assert row["preset"] == "models"
        assert row["broker"] == "memory"
        assert (row["concurrency"], row["partitions"], row["latency_ms"]) == (32, 4, 1.0)
        if row["model"] != "none":
            assert row["order_violations"] == 0
        assert row["throughput"] <= row["ideal_throughput"] * 1.02
        assert row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]
    total = [r for r in rows if r["model"] == "total"]
    assert {r["max_in_flight"] for r in total} == {1}
    for name in ("throughput", "latency-cdf"):
        for dist in ("fixed", "exponential"):
            _png(tmp_path / "plots" / f"models-{name}-1ms-{dist}.png")
    assert "1 ms fixed handlers, concurrency 32, 4 partitions" in result.output
    assert "bare Trio" in result.output
    assert "throughput kept relative to no order: with 20 keys: key order" in result.output


def test_skewed_keys_are_a_flag(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    result = bench(
        "--preset", "models", "--models", "key", "--keys", "50", "--latency", "0.5",
        "--distribution", "uniform", "--skew", "1.1", "-n", "400", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = cells(out)
    assert row["skew"] == 1.1
    assert row["distribution"] == "uniform"
    assert row["order_violations"] == 0
    assert "key skew 1.1" in result.output


def test_the_throughput_preset_compares_the_same_model(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    result = bench(
        "--preset", "throughput", "--models", "total", "-n", "2000", "--keys", "100",
        "--rounds", "1", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ordering=total" in result.output
    assert "naive pure-Python runtime: " in result.output
    rows = cells(out)
    assert [r["runtime"] for r in rows] == ["keylane", "naive"]
    assert {r["model"] for r in rows} == {"total"}
    assert rows[0]["speedup_over_naive"] > 0
    late = rows[0]["heartbeat_late_ms"]
    assert 0 <= late["p50"] <= late["p99"] <= late["max"]


def test_the_default_preset_runs_the_comparison_then_the_throughput(tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    result = bench(
        "--models", "key,none", "--keys", "10", "--latency", "1", "--distribution", "fixed",
        "-n", "500", "--rounds", "1", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = cells(out)
    assert [r["preset"] for r in rows] == ["models", "models", "throughput", "throughput"]
    assert "target: >= 300,000 msg/s with a no-op handler" in result.output


def test_the_latency_preset_runs_open_loop_loads(tmp_path: Path) -> None:
    out = tmp_path / "l.json"
    result = bench(
        "--preset", "latency", "--models", "key", "--duration", "1", "--keys", "100",
        "--json", str(out), "--plot", str(tmp_path / "plots"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = cells(out)
    assert [r["load"] for r in rows] == [0.1, 0.5, 0.9]
    for r in rows:
        assert r["rate"] == pytest.approx(r["load"] * r["saturation"])
        # Poisson arrivals over one second: the count is near the rate.
        assert r["messages"] == pytest.approx(r["rate"], rel=0.25)
        assert r["dispatch_p50_ms"] <= r["dispatch_p99_ms"] <= r["dispatch_p999_ms"]
    assert "target: key order, no-op handler, 50% load: dispatch p99" in result.output
    _png(tmp_path / "plots" / "latency-vs-load.png")


def test_the_sqs_fifo_preset_shows_one_group_against_many(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = bench(
        "--preset", "sqs-fifo", "--keys", "1,8", "--latency", "2", "-n", "400",
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    one, eight = cells(out)
    assert (one["keys"], eight["keys"]) == (1, 8)
    assert one["throughput"] <= 1000 / 2 * 1.02  # one group: one message at a time
    assert eight["throughput"] > 3 * one["throughput"]
    assert "scaling over one group: 1 group 1.0x, 8 groups" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "sorted"], "'sorted' is not one of"),
        (["--keys", "0"], "0 is not >= 1"),
        (["--keys", "ten"], "invalid literal"),
        (["--latency", "-1"], "-1 is not a finite number >= 0"),
        (["--distribution", "pareto"], "'pareto' is not one of"),
        (["--preset", "throughput", "--keys", "1,2"], "takes one --keys value"),
        (
            ["--broker", "nats://x"],
            "broker must be memory, kafka://HOST:PORT, sqs://HOST:PORT or redis://",
        ),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = bench(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_every_option_has_help() -> None:
    from keylane.bench.command import bench as command

    undocumented = [p.name for p in command.params if not getattr(p, "help", None)]
    assert undocumented == []


@pytest.mark.kafka
def test_the_comparison_runs_on_a_real_kafka_broker(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    result = bench(
        "--preset", "models", "--broker", f"kafka://{kafka_bootstrap}", "--models", "key,none",
        "--keys", "10", "--latency", "1", "--distribution", "fixed", "-n", "600",
        "--concurrency", "64", "--partitions", "4", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    key, none = cells(out)
    assert key["broker"] == none["broker"] == f"kafka://{kafka_bootstrap}"
    assert key["order_violations"] == 0
    assert key["messages"] == none["messages"] == 600
    assert key["throughput"] <= key["ideal_throughput"] * 1.02


def test_repeat_reports_each_cells_median_run(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = bench(
        "--preset", "models", "--models", "key", "--keys", "4", "--latency", "0.5",
        "--distribution", "fixed", "-n", "200", "--repeat", "3", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = cells(out)
    runs = row["round_throughputs"]
    assert len(runs) == 3
    assert row["throughput"] == sorted(runs)[1]


def test_the_old_ordering_flag_compares_like_with_like(tmp_path: Path) -> None:
    # `keylane bench --ordering total` once compared total order with a
    # per-key naive runtime ("0.04x"); the baseline now runs total order too.
    out = tmp_path / "o.json"
    result = bench(
        "--preset", "throughput", "--ordering", "total", "-n", "1500", "--rounds", "1",
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    keylane_row, naive_row = cells(out)
    assert keylane_row["model"] == naive_row["model"] == "total"
    # Both hand out one message at a time: neither is 20x the other.
    assert 0.05 < keylane_row["speedup_over_naive"] < 20
