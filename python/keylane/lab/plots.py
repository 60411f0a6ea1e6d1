"""``keylane lab --plot DIR``: per scenario, the harm and the throughput of
each defence setting (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from keylane.bench.plots import _pyplot, check_available
from keylane.lab.ledger import Row

__all__ = ["check_available", "draw"]


def draw(rows: Sequence[Row], out: Path) -> list[Path]:
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in dict.fromkeys(r.scenario for r in rows):
        mine = [r for r in rows if r.scenario == scenario]
        fig, (harm, speed) = plt.subplots(1, 2, figsize=(11, 0.6 * len(mine) + 1.8))
        labels = [r.setting for r in mine]
        colors = ["tab:green" if r.protected else "tab:red" for r in mine]
        harm.barh(labels, [r.harm for r in mine], color=colors)
        harm.set_xlabel("harm (count)")
        harm.invert_yaxis()
        speed.barh(labels, [r.throughput for r in mine], color="tab:blue")
        speed.set_xlabel("messages/s")
        speed.set_yticks([])
        speed.invert_yaxis()
        fig.suptitle(f"keylane lab {scenario} (green: defence on)")
        fig.tight_layout()
        path = out / f"lab-{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
