"""Benchmark plumbing: per-operation medians, ratios within one run, targets.

Each benchmark records its median time per operation under a group and an
implementation name. At the end of the session the ratios between
implementations of the same group are printed, every declared target is
checked, and a missed target fails the run (exit status 1). The figures go to
``.benchmarks/summary.json`` for docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Faster:
    """``fast`` must take at most 1/``ratio`` of the time per op of ``slow``."""

    group: str
    fast: str
    slow: str
    ratio: float


@dataclass(frozen=True)
class AtMost:
    """``impl`` must take at most ``seconds`` per op."""

    group: str
    impl: str
    seconds: float


@dataclass(frozen=True)
class AtLeast:
    """A figure recorded with ``Perf.figure`` must be at least ``value``."""

    group: str
    name: str
    value: float


@dataclass(frozen=True)
class Below:
    """A figure recorded with ``Perf.figure`` must be at most ``value``."""

    group: str
    name: str
    value: float


@dataclass
class Perf:
    per_op: dict[tuple[str, str], float] = field(default_factory=dict)
    figures: dict[tuple[str, str], float] = field(default_factory=dict)
    targets: list[Faster | AtMost | AtLeast | Below] = field(default_factory=list)

    def record(self, benchmark: Any, group: str, impl: str, ops: int) -> float:
        """Stores the median time per op of a finished ``benchmark`` run."""
        median = float(benchmark.stats.stats.median) / ops
        self.per_op[(group, impl)] = median
        benchmark.extra_info.update(group=group, impl=impl, ops=ops, median_per_op_s=median)
        return median

    def figure(self, group: str, name: str, value: float) -> None:
        """Stores a figure that is not a time per op (a byte count, a rate)."""
        self.figures[(group, name)] = value

    def expect(self, *targets: Faster | AtMost | AtLeast | Below) -> None:
        self.targets.extend(targets)

    def verdicts(self) -> Iterator[tuple[bool, str]]:
        for t in self.targets:
            if isinstance(t, Faster):
                fast = self.per_op.get((t.group, t.fast))
                slow = self.per_op.get((t.group, t.slow))
                if fast is None or slow is None:
                    continue
                got = slow / fast
                yield (
                    got >= t.ratio,
                    f"{t.group}: {t.fast} is {got:.1f}x {t.slow} (target >= {t.ratio:g}x)",
                )
            elif isinstance(t, AtMost):
                got_s = self.per_op.get((t.group, t.impl))
                if got_s is None:
                    continue
                yield (
                    got_s <= t.seconds,
                    f"{t.group}: {t.impl} takes {got_s * 1e9:.0f} ns/op "
                    f"(target <= {t.seconds * 1e9:.0f} ns)",
                )
            else:
                value = self.figures.get((t.group, t.name))
                if value is None:
                    continue
                if isinstance(t, Below):
                    yield (
                        value <= t.value,
                        f"{t.group}: {t.name} = {value:,.3g} (target <= {t.value:,.3g})",
                    )
                    continue
                yield (
                    value >= t.value,
                    f"{t.group}: {t.name} = {value:,.3g} (target >= {t.value:,.3g})",
                )


def alternate(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Times each callable once per round, interleaved, after one warm-up.

    This machine has slow phases that last seconds; running implementations
    in alternation puts both in the same phase, so per-round ratios compare
    like with like.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for warm_up in runs.values():
        warm_up()
    for _ in range(rounds):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


_PERF = Perf()


@pytest.fixture(scope="session")
def perf() -> Perf:
    return _PERF


@pytest.fixture(autouse=True)
def _quiet_gc() -> Iterator[None]:
    # Collections triggered by earlier benchmarks' garbage would land in
    # whichever benchmark happens to run next.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _PERF.per_op and not _PERF.figures:
        return
    tr = terminalreporter
    tr.section("keylane: medians per operation, ratios within this run")
    groups = sorted({g for g, _ in _PERF.per_op})
    for g in groups:
        impls = {i: t for (gg, i), t in _PERF.per_op.items() if gg == g}
        best = min(impls.values())
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            tr.write_line(f"{g:<32} {impl:<28} {t * 1e9:>12.1f} ns/op  {t / best:>8.2f}x")
    for (g, name), value in sorted(_PERF.figures.items()):
        tr.write_line(f"{g:<32} {name:<28} {value:>16,.3f}")
    failed = False
    for ok, text in _PERF.verdicts():
        tr.write_line(("PASS  " if ok else "MISS  ") + text)
        failed |= not ok
    out = Path(config.rootpath) / ".benchmarks" / "summary.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": (
                    f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}"
                ),
                "per_op_s": {f"{g}/{i}": t for (g, i), t in _PERF.per_op.items()},
                "figures": {f"{g}/{n}": v for (g, n), v in _PERF.figures.items()},
                "verdicts": [{"ok": ok, "text": text} for ok, text in _PERF.verdicts()],
            },
            indent=2,
        )
    )
    if failed:
        tr.write_line("a speed target was missed", red=True)
        config._keylane_targets_missed = True


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if getattr(session.config, "_keylane_targets_missed", False) and exitstatus == 0:
        session.exitstatus = 1
