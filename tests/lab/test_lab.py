"""``keylane lab``: every scenario really harms without its defence and
not with it, loses nothing, and reports what docs/lab.md promises."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from keylane.cli import main
from keylane.lab.ledger import Options, Row
from keylane.lab.scenarios import SCENARIOS

FIELDS = {"scenario", "setting", "protected", "harm", "lost", "throughput"}


def check_rows(rows: list[Row] | list[dict[str, object]]) -> None:
    as_dicts = [r.as_json() if isinstance(r, Row) else r for r in rows]
    for scenario in {r["scenario"] for r in as_dicts}:
        mine = [r for r in as_dicts if r["scenario"] == scenario]
        assert any(r["protected"] for r in mine), scenario
        assert any(not r["protected"] for r in mine), scenario
        for r in mine:
            assert set(r) >= FIELDS, r
            assert r["lost"] == 0, r
            if r["protected"]:
                assert r["harm"] == 0, r
            else:
                assert isinstance(r["harm"], int), r
                assert r["harm"] > 0, r


def test_lab_all_with_its_defaults_json_and_plots(tmp_path: Path) -> None:
    out, plots = tmp_path / "lab.json", tmp_path / "plots"
    level = logging.getLogger("keylane").level
    result = CliRunner().invoke(
        main, ["lab", "all", "--json", str(out), "--plot", str(plots)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    # It quiets keylane's logger while it runs, and only then.
    assert logging.getLogger("keylane").level == level
    rows = json.loads(out.read_text())
    assert {r["scenario"] for r in rows} == set(SCENARIOS)
    check_rows(rows)
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"lab-{s}.png" for s in SCENARIOS)
    for name in SCENARIOS:
        assert f"{name}:" in result.output  # each verdict line
    assert "defence held" in result.output
    assert "FAILED" not in result.output


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_other_seeds_keep_the_verdicts(scenario: str, seed: int) -> None:
    check_rows(SCENARIOS[scenario](Options(seed=seed)))


def test_scenario_options_reach_the_rows() -> None:
    rows = SCENARIOS["scale-out"](Options(seed=3, keys=500, consumers=4))
    check_rows(rows)
    assert [r.extra["consumers"] for r in rows] == [1, 4, 4]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lab", "dlq-replay", "--broker", "kafka://127.0.0.1:1"], "memory broker only"),
        (["lab", "all", "--broker", "rabbit://x"], "--broker must be"),
        (["lab", "nope"], "Invalid value"),
        (["lab", "scale-out", "--consumers", "0"], "Invalid value"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.redis
def test_scale_out_and_repartition_on_redis(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "lab.json"
    address = redis_url.split("://", 1)[1]
    result = CliRunner().invoke(
        main,
        ["lab", "all", "--broker", f"redis://{address}", "--json", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {r["scenario"] for r in rows} == {"scale-out", "repartition"}
    check_rows(rows)


@pytest.mark.kafka
def test_scale_out_and_repartition_on_kafka(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "lab.json"
    result = CliRunner().invoke(
        main,
        ["lab", "all", "--broker", f"kafka://{kafka_bootstrap}", "--json", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {r["scenario"] for r in rows} == {"scale-out", "repartition"}
    check_rows(rows)
