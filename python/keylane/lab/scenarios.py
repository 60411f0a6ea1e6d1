"""The lab's scenarios by name, in the order ``keylane lab all`` runs them."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from keylane.lab import (
    dlq_replay,
    producer_retry,
    redelivery,
    repartition,
    scale_out,
    total_vs_partial,
)
from keylane.lab.ledger import Options, Row

MODULES: tuple[ModuleType, ...] = (
    scale_out,
    repartition,
    dlq_replay,
    producer_retry,
    redelivery,
    total_vs_partial,
)
SCENARIOS: dict[str, Callable[[Options], list[Row]]] = {m.NAME: m.run for m in MODULES}
DESCRIPTIONS: dict[str, str] = {m.NAME: m.DESCRIPTION for m in MODULES}
# Scenarios that run on a real Kafka broker too (--broker kafka://...).
ON_KAFKA = frozenset({scale_out.NAME, repartition.NAME})


def verdict(rows: list[Row]) -> str:
    """One line read from a scenario's rows: the harm without the aimed
    defence, with it, and what the defence cost in throughput."""
    off = [r for r in rows if not r.protected]
    on = [r for r in rows if r.protected]
    name = rows[0].scenario
    worst_off = max(off, key=lambda r: r.harm) if off else None
    worst_on = max(on, key=lambda r: r.harm) if on else None
    parts = [f"{name}:"]
    if worst_off is not None:
        parts.append(f"unprotected, {worst_off.harm} harmed ({worst_off.setting});")
    if worst_on is not None:
        held = "held" if worst_on.harm == 0 else "FAILED"
        parts.append(f"protected, {worst_on.harm} harmed in the worst row: defence {held}")
        if worst_off is not None and worst_off.throughput:
            fastest = max(on, key=lambda r: r.throughput)
            ratio = fastest.throughput / worst_off.throughput
            parts.append(f"(fastest protected row: {ratio:.2f}x the unprotected throughput)")
    lost = sum(r.lost for r in rows)
    parts.append(f"; lost {lost}")
    return " ".join(parts).replace(" ;", ";")
