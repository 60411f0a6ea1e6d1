"""How `keylane bench` results are printed and saved."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from keylane.bench.runner import (
    TARGET_LATE_MAX_S,
    TARGET_LATE_P99_S,
    TARGET_MSG_PER_S,
    Result,
)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def summary(result: Result) -> list[str]:
    lines = [f"keylane: {result.keylane_rate:,.0f} msg/s (median of {len(result.keylane)} rounds)"]
    if result.naive_rate is not None and result.speedup is not None:
        lines.append(
            f"naive pure-Python runtime: {result.naive_rate:,.0f} msg/s; "
            f"keylane is {result.speedup:.2f}x (median of per-round ratios)"
        )
    default = result.workload.handler_sleep == 0 and result.workload.ordering == "key"
    if default:
        verdict = "PASS" if result.keylane_rate >= TARGET_MSG_PER_S else "MISS"
        lines.append(f"target: >= {TARGET_MSG_PER_S:,} msg/s with a no-op handler: {verdict}")
    p50, p99, worst = (result.lateness(q) for q in (0.5, 0.99, 1.0))
    if p50 is not None and p99 is not None and worst is not None:
        line = (
            f"event loop: a 1 ms heartbeat beside the App woke late by p50 {p50 * 1e3:.2f} ms, "
            f"p99 {p99 * 1e3:.2f} ms, max {worst * 1e3:.1f} ms"
        )
        if result.workload.handler_sleep == 0:
            held = "PASS" if p99 <= TARGET_LATE_P99_S and worst <= TARGET_LATE_MAX_S else "MISS"
            line += (
                f" (target with a no-op handler: p99 <= {TARGET_LATE_P99_S * 1e3:.0f} ms, "
                f"max <= {TARGET_LATE_MAX_S * 1e3:.0f} ms: {held})"
            )
        lines.append(line)
    return lines


def as_json(result: Result) -> dict[str, Any]:
    w = result.workload
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "workload": {
            "messages": w.messages,
            "keys": w.keys,
            "partitions": w.partitions,
            "ordering": w.ordering,
            "concurrency": w.concurrency,
            "handler_sleep_s": w.handler_sleep,
        },
        "keylane_seconds": result.keylane,
        "naive_seconds": result.naive,
        "keylane_msg_per_s": result.keylane_rate,
        "naive_msg_per_s": result.naive_rate,
        "speedup": result.speedup,
        "heartbeat_late_ms": {
            name: None if (v := result.lateness(q)) is None else v * 1e3
            for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        },
        "target_msg_per_s": TARGET_MSG_PER_S,
    }


def save(result: Result, path: Path) -> None:
    path.write_text(json.dumps(as_json(result), indent=2) + "\n")


def rows(result: Result) -> list[dict[str, Any]]:
    """The throughput comparison as ``--json`` cells: one per runtime, with
    the same fields as the model comparison's (those that do not apply are
    null)."""
    w = result.workload
    common = {
        "preset": "throughput",
        "broker": "memory",
        "model": w.ordering,
        "keys": w.keys,
        "latency_ms": w.handler_sleep * 1e3,
        "distribution": "fixed",
        "concurrency": w.concurrency,
        "partitions": w.partitions,
        "messages": w.messages,
        "ideal_throughput": None,
        "p50_ms": None,
        "p99_ms": None,
        "p999_ms": None,
        "dispatch_p99_ms": None,
        "max_in_flight": None,
        "peak_rss_mb": None,
        "order_violations": None,
    }
    out = []
    for runtime, seconds in (("keylane", result.keylane), ("naive", result.naive)):
        if not seconds:
            continue
        median = statistics.median(seconds)
        row = {
            **common,
            "runtime": runtime,
            "seconds": median,
            "throughput": w.messages / median,
            "rounds_seconds": seconds,
        }
        if runtime == "keylane":
            row["speedup_over_naive"] = result.speedup
            row["heartbeat_late_ms"] = as_json(result)["heartbeat_late_ms"]
        out.append(row)
    return out
