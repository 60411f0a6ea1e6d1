"""``keylane lab``: run the scenarios, show a table per scenario with its
verdict, and write JSON and plots on request."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from keylane.errors import ConfigError
from keylane.lab.ledger import Options, Row
from keylane.lab.scenarios import DESCRIPTIONS, ON_KAFKA, SCENARIOS, verdict

_CHOICES = [*SCENARIOS, "all"]


@click.command()
@click.argument("scenario", type=click.Choice(_CHOICES))
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of every draw.")
@click.option("-n", "--messages", type=click.IntRange(min=10), help="Messages per row.")
@click.option("--keys", type=click.IntRange(min=2), help="Distinct keys (accounts).")
@click.option(
    "--consumers", type=click.IntRange(min=1, max=64), help="Group members, where it applies."
)
@click.option(
    "--broker",
    default="memory",
    show_default=True,
    help="memory, or kafka://HOST:PORT or redis://HOST:PORT (scale-out and repartition; "
    "on Redis the assignor column is keylane's lease protocol, whatever it says).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every row (scenario, setting, protected, harm, lost, ...) to this file.",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one PNG per scenario into this directory (needs matplotlib).",
)
def lab(
    scenario: str,
    seed: int,
    messages: int | None,
    keys: int | None,
    consumers: int | None,
    broker: str,
    json_path: Path | None,
    plot_dir: Path | None,
) -> None:
    """Reproduces a way per-key order breaks in production (SCENARIO, or
    all), with each defence off and on, and measures the harm.

    Scenarios: scale-out, repartition, dlq-replay, producer-retry,
    redelivery, total-vs-partial (docs/lab.md explains each)."""
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    if broker != "memory":
        if not broker.startswith(("kafka://", "redis://")):
            raise click.UsageError(
                f"--broker must be memory, kafka://HOST:PORT or redis://HOST:PORT, got {broker!r}"
            )
        names = [n for n in names if n in ON_KAFKA]
        if not names:
            raise click.UsageError(
                f"{scenario} runs on the memory broker only; on Kafka and Redis: "
                f"{', '.join(ON_KAFKA)}"
            )
    if plot_dir is not None:
        from keylane.lab import plots

        plots.check_available()
    opts = Options(seed=seed, messages=messages, keys=keys, consumers=consumers, broker=broker)
    # Wide enough for the tables when piped to a file, too.
    console = Console(width=max(Console().width, 150))
    # The scenarios crash members, fail handlers and rebalance on purpose:
    # their log lines are the experiment, not news.
    keylane_log = logging.getLogger("keylane")
    level = keylane_log.level
    keylane_log.setLevel(logging.CRITICAL)
    try:
        _run_all(console, names, opts, json_path, plot_dir)
    finally:
        keylane_log.setLevel(level)


def _run_all(
    console: Console,
    names: list[str],
    opts: Options,
    json_path: Path | None,
    plot_dir: Path | None,
) -> None:
    every: list[Row] = []
    started = time.perf_counter()
    for i, name in enumerate(names, 1):
        with console.status(f"[{i}/{len(names)}] {name}: {DESCRIPTIONS[name]}"):
            t0 = time.perf_counter()
            try:
                rows = SCENARIOS[name](opts)
            except ConfigError as e:
                raise click.UsageError(str(e)) from None
        console.print(_table(name, rows, time.perf_counter() - t0))
        console.print(verdict(rows))
        console.print()
        every.extend(rows)
    console.print(f"{len(names)} scenario(s) in {time.perf_counter() - started:.0f}s")
    if json_path is not None:
        json_path.write_text(json.dumps([r.as_json() for r in every], indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if plot_dir is not None:
        from keylane.lab import plots

        for path in plots.draw(every, plot_dir):
            console.print(f"wrote {path}")


def _table(name: str, rows: list[Row], seconds: float) -> Table:
    extras = list(dict.fromkeys(k for r in rows for k in r.extra))
    t = Table(title=f"{name} — {DESCRIPTIONS[name]} ({seconds:.0f}s)", header_style="bold")
    for col in ("setting", "protected", "harm", "lost", "msg/s", *extras):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        t.add_row(
            r.setting,
            "yes" if r.protected else "no",
            str(r.harm),
            str(r.lost),
            f"{r.throughput:,.0f}",
            *(str(r.extra.get(k, "")) for k in extras),
        )
    return t
