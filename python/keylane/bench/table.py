"""The ordering-model comparison in the terminal (rich), and its progress
display: redrawn only between cells, never while one is timed (no refresh
thread competes with the run for the GIL)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keylane.bench.cell import CellResult
from keylane.bench.load import LoadResult
from keylane.bench.parallel_consumer import Row
from keylane.bench.suite import Ceiling, Comparison


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _workload(latency_ms: float, distribution: str, skew: float = 0.0) -> str:
    name = f"{latency_ms:g} ms {distribution} handlers" if latency_ms else "no-op handlers"
    return name + (f", key skew {skew:g}" if skew else "")


def cells_tables(cells: Sequence[CellResult], ceilings: Sequence[Ceiling] = ()) -> list[Table]:
    """One table per workload, its cells in run order, with the bare-Trio
    ceiling of that workload as its last row."""
    groups: dict[str, list[CellResult]] = {}
    for c in cells:
        groups.setdefault(_workload(c.latency_ms, c.distribution, c.skew), []).append(c)
    bare = {_workload(b.latency_ms, b.distribution): b for b in ceilings}
    tables = []
    for name, group in groups.items():
        first = group[0]
        t = Table(
            title=f"{name}, concurrency {first.concurrency}, {first.partitions} partitions",
            header_style="bold",
            title_justify="left",
        )
        t.add_column("model")
        for col in (
            "keys",
            "msg/s",
            "ideal",
            "of ideal",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "dispatch p99 ms",
            "max in flight",
            "RSS MB",
            "order violations",
        ):
            t.add_column(col, justify="right")
        for c in group:
            fraction = c.fraction
            violations = f"{c.order_violations:,}"
            if c.model != "none" and c.order_violations:
                violations = f"[bold red]{violations}[/]"
            t.add_row(
                c.model,
                f"{c.keys:,}",
                f"{c.throughput:,.0f}",
                "-" if c.ideal_throughput is None else f"{c.ideal_throughput:,.0f}",
                "-" if fraction is None else f"{fraction:.0%}",
                _ms(c.p50_ms),
                _ms(c.p99_ms),
                _ms(c.p999_ms),
                _ms(c.dispatch_p99_ms),
                f"{c.max_in_flight:,}",
                f"{c.peak_rss_mb:,.0f}",
                violations,
            )
        b = bare.get(_workload(first.latency_ms, first.distribution))
        if b is not None and not first.skew:
            t.add_section()
            t.add_row("[dim]bare Trio[/]", "-", f"{b.throughput:,.0f}", *["-"] * 9)
        tables.append(t)
    return tables


def show(console: Console, comparison: Comparison) -> None:
    for t in cells_tables(comparison.cells, comparison.ceilings):
        console.print(t)
    if comparison.ceilings:
        console.print(
            "[dim]bare Trio: the same sleeps in bare Trio tasks at the same concurrency, no "
            "broker and no ordering: the most any runtime on one Trio loop can do here.[/]"
        )
    for line in comparison.verdict():
        console.print(line)


@contextmanager
def progress(console: Console) -> Iterator[Progress]:
    """A progress bar for ``suite.run``: call ``step(label, done, total)``."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
        transient=True,
    )
    with bar:
        yield bar


class Stepper:
    """Adapts a rich ``Progress`` to ``suite.run``'s callback."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("starting", total=None)

    def __call__(self, label: str, done: int, total: int) -> None:
        self.bar.update(self.task, description=label, completed=done, total=total)
        self.bar.refresh()


def load_table(results: Sequence[LoadResult]) -> Table:
    t = Table(title="latency under open-loop load", header_style="bold")
    for name in (
        "model",
        "load",
        "msg/s",
        "of saturation",
        "dispatch p50 ms",
        "dispatch p99 ms",
        "dispatch p99.9 ms",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
    ):
        t.add_column(name, justify="left" if name == "model" else "right")
    previous = None
    for r in results:
        if previous is not None and r.model != previous:
            t.add_section()
        t.add_row(
            r.model if r.model != previous else "",
            f"{r.load:.0%}",
            f"{r.throughput:,.0f}",
            f"{r.saturation:,.0f}",
            _ms(r.dispatch_p50_ms),
            _ms(r.dispatch_p99_ms),
            _ms(r.dispatch_p999_ms),
            _ms(r.p50_ms),
            _ms(r.p99_ms),
            _ms(r.p999_ms),
        )
        previous = r.model
    return t


def pc_table(rows: Sequence[Row]) -> Table:
    t = Table(title="Confluent Parallel Consumer README workload", header_style="bold")
    for name in (
        "model",
        "keys",
        "seconds",
        "bound s",
        "x bound",
        "bare Trio s",
        "published s",
        "faster than published",
        "order violations",
    ):
        t.add_column(name, justify="left" if name == "model" else "right")
    for r in rows:
        t.add_row(
            r.model,
            f"{r.keys:,}",
            f"{r.seconds:.3f}",
            f"{r.bound_s:.3f}",
            f"{r.ratio:.2f}x" + ("" if r.verdict == "PASS" else " [red]MISS[/]"),
            f"{r.bare_s:.3f}",
            f"{r.published_s:.3f}",
            f"{r.published_s / r.seconds:.2f}x",
            str(r.cell.order_violations),
        )
    return t
