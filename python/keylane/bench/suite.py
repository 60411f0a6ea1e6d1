"""The ordering-model comparison: every model on every workload of a grid,
in one run, plus the Trio ceiling for the same work, and the verdict.

Cells run one after another in a fixed order (by workload, then model), so
a run's shape is reproducible; each cell's message count is chosen to last
about ``CELL_SECONDS`` at its ideal throughput (see ``models.cell_messages``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from keylane.bench.cell import CellResult, run_cell
from keylane.bench.models import DISTRIBUTIONS, MODELS, CellSpec, cell_messages, draw
from keylane.bench.sleep import sleep
from keylane.bench.targets import Target

CELL_SECONDS = 1.0
DEFAULT_KEYS = (1, 10, 100, 1_000, 10_000)
DEFAULT_LATENCY_MS = (1.0,)
DEFAULT_DISTRIBUTIONS = ("fixed", "longtail")
DEFAULT_MESSAGES = 20_000


@dataclasses.dataclass(frozen=True)
class Grid:
    models: Sequence[str] = MODELS
    keys: Sequence[int] = DEFAULT_KEYS
    latency_ms: Sequence[float] = DEFAULT_LATENCY_MS
    distributions: Sequence[str] = DEFAULT_DISTRIBUTIONS
    concurrency: int = 256
    partitions: int = 12
    messages: int = DEFAULT_MESSAGES
    skew: float = 0.0
    seed: int = 1

    def specs(self) -> list[CellSpec]:
        out = []
        for latency, dist, keys, model in itertools.product(
            self.latency_ms, self.distributions, self.keys, self.models
        ):
            spec = CellSpec(
                model,
                keys,
                latency,
                dist,
                self.concurrency,
                self.partitions,
                self.messages,
                self.skew,
                self.seed,
            )
            out.append(dataclasses.replace(spec, messages=cell_messages(spec, CELL_SECONDS)))
        return out


@dataclasses.dataclass
class Ceiling:
    """The same work run by bare Trio tasks: no broker, no ordering, only
    ``concurrency`` tasks sleeping each message's time. No runtime on Trio
    can beat it; it shows what the event loop itself allows."""

    latency_ms: float
    distribution: str
    concurrency: int
    messages: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.messages / self.seconds


def trio_ceiling(spec: CellSpec) -> Ceiling:
    work = draw(spec).seconds
    seconds = trio.run(functools.partial(_bare, work, spec.concurrency))
    return Ceiling(spec.latency_ms, spec.distribution, spec.concurrency, len(work), seconds)


async def _bare(work: list[float], concurrency: int) -> float:
    it = iter(work)

    async def worker() -> None:
        for seconds in it:
            if seconds:
                await sleep(seconds)

    started = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(concurrency):
            n.start_soon(worker)
    return time.perf_counter() - started


@dataclasses.dataclass
class Comparison:
    cells: list[CellResult]
    ceilings: list[Ceiling]

    def verdict(self) -> list[str]:
        lines = verdict(self.cells)
        for b in self.ceilings:
            unordered = [
                c.throughput
                for c in self.cells
                if (c.model, c.latency_ms, c.distribution) == ("none", b.latency_ms, b.distribution)
            ]
            if unordered:
                lines.append(
                    f"{b.latency_ms:g} ms {b.distribution}: the event loop alone (bare Trio "
                    f"tasks, same sleeps) caps this at {b.throughput:,.0f} msg/s; keylane "
                    f"without order reaches {max(unordered) / b.throughput:.0%} of that."
                )
        return lines


def run(
    target: Target,
    grid: Grid,
    *,
    preset: str = "models",
    repeat: int = 1,
    progress: Callable[[str, int, int], None] = lambda label, done, total: None,
    ceiling: bool = True,
) -> Comparison:
    """Runs every cell of ``grid`` on ``target``, ``repeat`` times (round by
    round, so every cell sees the machine's slow and fast phases alike);
    each cell reported is its run of median throughput. ``progress(label,
    done, total)`` is called between runs, never while one is timed."""
    specs = grid.specs()
    workloads = list(dict.fromkeys((s.latency_ms, s.distribution) for s in specs))
    bare_specs = [
        CellSpec(
            "none",
            max(grid.keys),
            latency,
            dist,
            grid.concurrency,
            grid.partitions,
            grid.messages,
            grid.skew,
            grid.seed,
        )
        for latency, dist in workloads
        if ceiling and latency > 0
    ]
    total = (len(specs) + len(bare_specs)) * repeat
    runs: list[list[CellResult]] = [[] for _ in specs]
    bare_runs: list[list[Ceiling]] = [[] for _ in bare_specs]
    done = 0
    for r in range(repeat):
        note = f" (round {r + 1} of {repeat})" if repeat > 1 else ""
        for i, spec in enumerate(specs):
            progress(_label(spec) + note, done, total)
            runs[i].append(run_cell(target, spec, preset=preset))
            done += 1
        for i, spec in enumerate(bare_specs):
            progress(
                f"bare Trio tasks, {spec.latency_ms:g} ms {spec.distribution}{note}", done, total
            )
            bare_runs[i].append(trio_ceiling(spec))
            done += 1
    progress("done", total, total)
    cells = []
    for results in runs:
        cell = _median(results, lambda c: c.throughput)
        cell.round_throughputs = [c.throughput for c in results]
        cells.append(cell)
    return Comparison(cells, [_median(b, lambda c: c.throughput) for b in bare_runs])


_T = TypeVar("_T")


def _median(results: Sequence[_T], by: Callable[[_T], float]) -> _T:
    """The result of median ``by`` (the lower middle one for an even count)."""
    ordered = sorted(results, key=by)
    return ordered[(len(ordered) - 1) // 2]


def _label(spec: CellSpec) -> str:
    return f"{spec.model} order, {spec.keys:,} keys, {spec.latency_ms:g} ms {spec.distribution}"


def verdict(cells: Sequence[CellResult]) -> list[str]:
    """Per workload: what each model keeps of unordered throughput, at the
    most keys and at the fewest, computed from the cells."""
    lines = []
    groups: dict[tuple[float, str], list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.latency_ms, c.distribution), []).append(c)
    for (latency, dist), group in groups.items():
        by = {(c.model, c.keys): c for c in group}
        keys = sorted({c.keys for c in group})
        parts = []
        for k in dict.fromkeys([keys[-1], keys[0]]):
            base = by.get(("none", k))
            if base is None:
                continue
            kept = [
                f"{model} order {by[(model, k)].throughput / base.throughput:.0%}"
                for model in ("key", "partition", "total")
                if (model, k) in by
            ]
            if kept:
                parts.append(f"with {k:,} {'key' if k == 1 else 'keys'}: " + ", ".join(kept))
        if parts:
            lines.append(
                f"{latency:g} ms {dist} handlers, throughput kept relative to no order: "
                + "; ".join(parts)
                + "."
            )
        broken = [c for c in group if c.model != "none" and c.order_violations]
        unordered = [c for c in group if c.model == "none"]
        if broken:
            lines.append(
                "ORDER BROKEN: "
                + ", ".join(f"{c.model}/{c.keys} keys: {c.order_violations}" for c in broken)
            )
        elif unordered:
            worst = max(unordered, key=lambda c: c.order_violations)
            lines.append(
                f"  order held in every ordered cell; without order, up to "
                f"{worst.order_violations:,} of {worst.messages:,} messages finished after a "
                f"later message of their key ({worst.keys:,} "
                f"{'key' if worst.keys == 1 else 'keys'})."
            )
    return lines


def check_grid(grid: Grid) -> None:
    """Raises ``ConfigError`` for a grid that names an unknown model or
    distribution (each spec validates itself)."""
    for model in grid.models:
        if model not in MODELS:
            CellSpec(model, 1, 0.0)
    for dist in grid.distributions:
        if dist not in DISTRIBUTIONS:
            CellSpec("key", 1, 0.0, dist)
