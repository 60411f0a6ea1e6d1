"""`keylane bench`: the command. What each preset runs lives beside it
(suite.py, runner.py, load.py, parallel_consumer.py, kafka*.py); this file
turns options into those runs and their results into tables, JSON and
plots."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from keylane.bench.models import MODELS
from keylane.errors import ConfigError

if TYPE_CHECKING:
    _ListType = click.ParamType[tuple[Any, ...]]
else:  # click < 8.3 has no generic ParamType
    _ListType = click.ParamType

PRESETS = ("default", "models", "throughput", "parallel-consumer", "latency", "sqs-fifo")
# The no-op comparison that closes the default run is smaller than the
# throughput preset's, so the whole default run stays under 3 minutes.
DEFAULT_RUN_THROUGHPUT_MESSAGES = 200_000
SQS_GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SQS_LATENCY_MS = 5.0


class CommaList(_ListType):
    """``1,10,100``: a list of values of one type."""

    name = "list"

    def __init__(self, convert: Callable[[str], Any], what: str) -> None:
        self._convert = convert
        self.name = f"{what}[,{what}...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        try:
            items = tuple(self._convert(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)
        if not items:
            self.fail("give at least one value", param, ctx)
        return items


def _positive_int(text: str) -> int:
    n = int(text.replace("_", ""))
    if n < 1:
        raise ValueError(f"{n} is not >= 1")
    return n


def _ms(text: str) -> float:
    v = float(text)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{text} is not a finite number >= 0")
    return v


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text

    return check


@click.command()
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="default",
    show_envvar=True,
    help="default: the ordering-model comparison, then keylane's no-op throughput against "
    "the naive runtime; models: the comparison alone; throughput: the no-op comparison "
    "alone; parallel-consumer: the Confluent Parallel Consumer README table beside its "
    "published seconds; latency: open-loop load at 10/50/90%% of saturation per model; "
    "sqs-fifo: one message group vs many (key order over 1-256 groups).",
)
@click.option(
    "--models",
    type=CommaList(_choice(MODELS), "MODEL"),
    default=None,
    help="Ordering models to run [all four; throughput preset: key].",
)
@click.option(
    "--ordering",
    type=click.Choice(MODELS),
    default=None,
    hidden=True,
    help="Same as --models with one model (kept for older scripts).",
)
@click.option(
    "--keys",
    type=CommaList(_positive_int, "N"),
    default=None,
    help="Key counts [1,10,100,1000,10000; throughput and latency presets: 10000].",
)
@click.option(
    "--latency",
    type=CommaList(_ms, "MS"),
    default=None,
    help="Mean handler work in milliseconds (0: a no-op handler) [1; throughput and "
    "latency presets: 0; sqs-fifo: 5].",
)
@click.option(
    "--distribution",
    type=CommaList(_choice(("fixed", "uniform", "exponential", "longtail")), "NAME"),
    default=None,
    help="How handler work varies around its mean: fixed, uniform (0 to 2x), exponential, "
    "longtail (lognormal, sigma 1.5) [fixed,longtail; other presets: fixed].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=256,
    show_envvar=True,
    help="Handlers running at once.",
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=12,
    show_envvar=True,
    help="Partitions of the generated topic.",
)
@click.option(
    "--skew",
    type=click.FloatRange(min=0),
    default=0.0,
    show_envvar=True,
    help="Key popularity: Zipf exponent s (0: every key equally often).",
)
@click.option(
    "--messages",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Model comparison: most messages per cell (each is sized to last ~1 s at its "
    "ideal throughput) [20000]. Throughput comparison: messages per round [1000000; "
    "200000 in the default run].",
)
@click.option("--seed", type=int, default=1, show_envvar=True, help="Seed of every draw.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_envvar=True,
    help="Model comparison: run every cell this many times, round by round, and report "
    "each cell's median run.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_envvar=True,
    help="Throughput preset: alternating rounds of keylane and the baseline.",
)
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_envvar=True,
    help="Throughput preset: also run the naive pure-Python runtime (same ordering model), "
    "in alternating rounds.",
)
@click.option(
    "--gc-freeze/--no-gc-freeze",
    default=True,
    show_envvar=True,
    help="Throughput preset: move the produced messages out of the cyclic GC's sight first.",
)
@click.option(
    "--broker",
    default="memory",
    show_envvar=True,
    help="memory (the in-process broker), or a real one: kafka://HOST:PORT, "
    "sqs://HOST:PORT (SQS FIFO, e.g. ElasticMQ), redis://HOST:PORT[/DB]; the throughput "
    "preset then compares against a bare loop of the broker's own client.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=None,
    show_envvar=True,
    help="Latency preset on Kafka: messages per second to produce (default: half the "
    "saturation throughput, measured first).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=None,
    show_envvar=True,
    help="Latency preset: seconds of load per level [5; Kafka: 10].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every cell to this file, as a list of JSON objects.",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write PNG plots (matplotlib) into this directory.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 if a target is missed. (An order violation under an ordered model always "
    "exits 1.)",
)
def bench(**options: Any) -> None:
    """Compares ordering models on a generated workload, and measures
    keylane's runtime against baselines. With no options: every model
    (total, partition, key, none) over 1-10,000 keys with 1 ms handlers
    (fixed and long-tail), then keylane's no-op throughput against a naive
    pure-Python runtime; about 2 minutes on 2 cores."""
    try:
        _Run(**options).main()
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


class _Run:
    def __init__(
        self,
        *,
        preset: str,
        models: tuple[str, ...] | None,
        ordering: str | None,
        keys: tuple[int, ...] | None,
        latency: tuple[float, ...] | None,
        distribution: tuple[str, ...] | None,
        concurrency: int,
        partitions: int,
        skew: float,
        messages: int | None,
        seed: int,
        repeat: int,
        rounds: int,
        baseline: bool,
        gc_freeze: bool,
        broker: str,
        rate: float | None,
        duration: float | None,
        json_path: Path | None,
        plot_dir: Path | None,
        check: bool,
    ) -> None:
        from rich.console import Console

        self.preset = preset
        if ordering is not None and models is not None and models != (ordering,):
            raise ConfigError("give --models or --ordering, not both")
        self.models = models or ((ordering,) if ordering else None)
        self.keys = keys
        self.latency = latency
        self.distribution = distribution
        self.concurrency = concurrency
        self.partitions = partitions
        self.skew = skew
        self.messages = messages
        self.seed = seed
        self.repeat = repeat
        self.rounds = rounds
        self.baseline = baseline
        self.gc_freeze = gc_freeze
        self.broker = broker
        self.rate = rate
        self.duration = duration
        self.json_path = json_path
        self.plot_dir = plot_dir
        self.check = check
        self.console = Console(highlight=False)
        if not self.console.is_terminal:
            # Logs and files are read later, on any width: do not squeeze.
            self.console = Console(highlight=False, width=160)
        self.rows: list[dict[str, Any]] = []
        self.failed: list[str] = []

    def main(self) -> None:
        from keylane.bench import report

        self.echo(f"keylane bench --preset {self.preset}; machine: {report.machine()}")
        if self.plot_dir is not None:
            from keylane.bench import plots

            plots.check_available()  # before the run, not after it
        if self.preset in ("default", "models"):
            self.models_preset()
        if self.preset in ("default", "throughput"):
            self.throughput_preset()
        if self.preset == "parallel-consumer":
            self.parallel_consumer_preset()
        if self.preset == "latency":
            self.latency_preset()
        if self.preset == "sqs-fifo":
            self.sqs_fifo_preset()
        if self.json_path is not None:
            self.json_path.write_text(json.dumps(self.rows, indent=2) + "\n")
            self.echo(f"wrote {len(self.rows)} cells to {self.json_path}")
        if self.failed:
            for line in self.failed:
                self.console.print(f"[bold red]{line}[/]")
            sys.exit(1)

    def echo(self, line: str) -> None:
        self.console.print(line, markup=False)

    def target(self) -> Any:
        from keylane.bench import targets

        return targets.parse(self.broker)

    # ---- presets ---------------------------------------------------------------------------

    def grid(self, **defaults: Any) -> Any:
        from keylane.bench import suite

        grid = suite.Grid(
            models=self.models or defaults.get("models", MODELS),
            keys=self.keys or defaults.get("keys", suite.DEFAULT_KEYS),
            latency_ms=self.latency or defaults.get("latency_ms", suite.DEFAULT_LATENCY_MS),
            distributions=self.distribution
            or defaults.get("distributions", suite.DEFAULT_DISTRIBUTIONS),
            concurrency=self.concurrency,
            partitions=self.partitions,
            messages=self.messages or suite.DEFAULT_MESSAGES,
            skew=self.skew,
            seed=self.seed,
        )
        suite.check_grid(grid)
        return grid

    def run_grid(self, grid: Any, preset: str) -> Any:
        from keylane.bench import suite, table

        target = self.target()
        self.echo(f"broker: {target.name}; {len(grid.specs())} cells")
        with table.progress(self.console) as bar:
            comparison = suite.run(
                target, grid, preset=preset, repeat=self.repeat, progress=table.Stepper(bar)
            )
        table.show(self.console, comparison)
        self.rows += [c.as_json() for c in comparison.cells]
        for c in comparison.cells:
            if c.model != "none" and (c.order_violations or c.key_overlaps):
                self.failed.append(
                    f"order violated: {c.model} order, {c.keys} keys: {c.order_violations} "
                    f"messages finished out of order, {c.key_overlaps} ran beside their key"
                )
        return comparison

    def models_preset(self) -> None:
        comparison = self.run_grid(self.grid(), "models")
        if self.plot_dir is not None:
            from keylane.bench import plots

            for path in plots.comparison(
                comparison.cells, self.plot_dir, ceilings=comparison.ceilings
            ):
                self.echo(f"wrote {path}")

    def sqs_fifo_preset(self) -> None:
        grid = self.grid(
            models=("key",),
            keys=SQS_GROUPS,
            latency_ms=(SQS_LATENCY_MS,),
            distributions=("fixed",),
        )
        self.echo(
            "message groups are keys: one group is capped at 1 / latency "
            f"({1e3 / grid.latency_ms[0]:,.0f} msg/s at {grid.latency_ms[0]:g} ms); "
            "more groups scale until concurrency or the runtime bounds them"
            if grid.latency_ms[0]
            else "message groups are keys"
        )
        comparison = self.run_grid(grid, "sqs-fifo")
        cells = comparison.cells
        if cells and cells[0].keys == 1:
            one = cells[0].throughput
            self.echo(
                "scaling over one group: "
                + ", ".join(
                    f"{c.keys} group{'' if c.keys == 1 else 's'} {c.throughput / one:.1f}x"
                    for c in cells
                )
            )
        if self.plot_dir is not None:
            from keylane.bench import plots

            for path in plots.comparison(cells, self.plot_dir, prefix="sqs-fifo"):
                self.echo(f"wrote {path}")

    def throughput_preset(self) -> None:
        from keylane.bench import report, runner
        from keylane.bench.workloads import Workload

        models = self.models if self.preset == "throughput" and self.models else ("key",)
        keys = self.keys or (10_000,)
        if len(keys) > 1:
            raise ConfigError("the throughput preset takes one --keys value")
        latency = self.latency if self.preset == "throughput" and self.latency else (0.0,)
        if len(latency) > 1:
            raise ConfigError("the throughput preset takes one --latency value")
        messages = self.messages or (
            1_000_000 if self.preset == "throughput" else DEFAULT_RUN_THROUGHPUT_MESSAGES
        )
        for model in models:
            workload = Workload(
                messages, keys[0], self.partitions, model, self.concurrency, latency[0] / 1e3
            )
            self.echo(f"throughput: {workload.describe()}")
            if self.broker != "memory":
                self.broker_throughput(workload)
                continue
            result = runner.run(
                workload,
                rounds=self.rounds,
                baseline=self.baseline,
                freeze_gc=self.gc_freeze,
                progress=self.echo,
            )
            for line in report.summary(result):
                self.echo(line)
            self.rows += report.rows(result)
            default = workload.handler_sleep == 0 and model == "key"
            if self.check and default and result.keylane_rate < runner.TARGET_MSG_PER_S:
                self.failed.append("throughput target missed")

    def broker_throughput(self, workload: Any) -> None:
        """keylane against the bare client loop of the broker's own client."""
        from keylane.bench import bare

        result = self.bare_comparison(workload)
        for line in result.summary():
            self.echo(line)
        self.rows.append(
            {"preset": "throughput", "broker": self.broker, **dataclasses.asdict(result)}
        )
        if self.check and result.ratio < bare.TARGET_RATIO:
            self.failed.append(f"{result.label} throughput target missed")

    def bare_comparison(self, workload: Any) -> Any:
        if self.broker.startswith("sqs://"):
            from keylane.bench import sqs_fifo

            return sqs_fifo.run(
                workload, sqs_fifo.parse_url(self.broker), rounds=self.rounds, progress=self.echo
            )
        if self.broker.startswith("redis://"):
            from keylane.bench import redis_streams

            return redis_streams.run(
                workload,
                redis_streams.parse_url(self.broker),
                rounds=self.rounds,
                progress=self.echo,
            )
        from keylane.bench import kafka

        return kafka.run(
            workload, kafka.parse_url(self.broker), rounds=self.rounds, progress=self.echo
        )

    def parallel_consumer_preset(self) -> None:
        from keylane.bench import parallel_consumer as pc
        from keylane.bench import table

        self.echo(f"parallel-consumer: {pc.DESCRIPTION}; broker: {self.broker}")
        rows = pc.run(self.target(), progress=self.echo)
        self.console.print(table.pc_table(rows))
        missed = [r for r in rows if r.verdict == "MISS"]
        fast = [r for r in rows if r.keys >= 100 and r.model == "key"]
        slow = [r for r in fast if r.published_s / r.seconds < pc.TARGET_SPEEDUP]
        self.echo(
            f"target: every row within {pc.TARGET_RATIO}x of its bound: "
            + ("PASS" if not missed else f"MISS ({len(missed)} rows)")
        )
        self.echo(
            f"target: rows with >= 100 keys >= {pc.TARGET_SPEEDUP:g}x faster than published: "
            + ("PASS" if not slow else f"MISS ({len(slow)} of {len(fast)} rows)")
        )
        self.rows += [r.as_json() for r in rows]
        if self.check and (missed or slow):
            self.failed.append("parallel-consumer targets missed")

    def latency_preset(self) -> None:
        if self.broker.startswith("kafka://"):
            self.kafka_latency()
            return
        if self.broker != "memory":
            raise ConfigError("the latency preset runs on memory or kafka://HOST:PORT")
        from keylane.bench import load, plots, table

        keys = self.keys or (10_000,)
        specs = [
            load.LoadSpec(
                model=model,
                keys=keys[0],
                latency_ms=(self.latency or (0.0,))[0],
                distribution=(self.distribution or ("fixed",))[0],
                concurrency=self.concurrency,
                partitions=self.partitions,
                seconds=self.duration or 5.0,
                seed=self.seed,
            )
            for model in (self.models or MODELS)
        ]
        with table.progress(self.console) as bar:
            results = load.run(specs, progress=table.Stepper(bar))
        self.console.print(table.load_table(results))
        for r in results:
            if r.verdict is not None:
                self.echo(
                    f"target: key order, no-op handler, 50% load: dispatch p99 "
                    f"{r.dispatch_p99_ms:.2f} ms (<= {load.TARGET_DISPATCH_P99_MS:g} ms): "
                    f"{r.verdict}"
                )
                if self.check and r.verdict == "MISS":
                    self.failed.append("latency target missed")
        self.rows += [dataclasses.asdict(r) for r in results]
        if self.plot_dir is not None:
            for path in plots.load(results, self.plot_dir):
                self.echo(f"wrote {path}")

    def kafka_latency(self) -> None:
        from keylane.bench import kafka, kafka_latency
        from keylane.bench.workloads import Workload

        bootstrap = kafka.parse_url(self.broker)
        workload = Workload(min(self.messages or 300_000, 300_000), (self.keys or (10_000,))[0])

        def saturation() -> float:
            return kafka.run(workload, bootstrap, rounds=1).keylane_rate

        result = kafka_latency.run(
            bootstrap,
            rate=self.rate,
            seconds=self.duration or 10.0,
            saturation=saturation,
            progress=self.echo,
        )
        for line in result.summary():
            self.echo(line)
        self.rows.append({"preset": "latency", "broker": self.broker, **dataclasses.asdict(result)})
