"""total-vs-partial: the throughput tax of order. The same workload (1 ms
handlers over many keys) under total, partition and key order, and with
none, run by the benchmark's cell runner; throughput as a ratio of total
order's. Harm: messages of one key handled out of order or at once (only
``none`` has any)."""

from __future__ import annotations

from keylane.bench.cell import run_cell
from keylane.bench.models import CellSpec
from keylane.bench.targets import memory
from keylane.lab.ledger import Options, Row
from keylane.lab.target import check_memory_only

NAME = "total-vs-partial"
DESCRIPTION = "the same work under total, partition, key and no order: the tax, as ratios"
MESSAGES, KEYS = 3_000, 50


def run(opts: Options) -> list[Row]:
    check_memory_only(opts, NAME)
    rows = []
    base = None
    for model in ("total", "partition", "key", "none"):
        spec = CellSpec(
            model=model,
            keys=opts.keys or KEYS,
            latency_ms=1.0,
            concurrency=64,
            partitions=12,
            messages=opts.messages or MESSAGES,
            seed=opts.seed,
        )
        cell = run_cell(memory(), spec, preset="lab")
        base = base or cell.throughput
        harm = cell.order_violations + cell.key_overlaps
        rows.append(
            Row(
                scenario=NAME,
                setting=f"ordering={model}",
                protected=model != "none",
                harm=harm,
                lost=0,  # run_cell raises unless every message was handled
                throughput=round(cell.throughput, 1),
                extra={
                    "vs_total": round(cell.throughput / base, 2),
                    "ideal_throughput": round(cell.ideal_throughput or 0.0, 1),
                    "order_violations": cell.order_violations,
                    "key_overlaps": cell.key_overlaps,
                    "p99_ms": round(cell.p99_ms, 1),
                },
            )
        )
    return rows
