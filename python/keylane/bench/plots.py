"""`keylane bench --plot DIR`: PNGs drawn with matplotlib (the ``plot``
extra: ``pip install 'keylane[plot]'``), without a display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keylane.bench.cell import CellResult
from keylane.bench.load import LoadResult
from keylane.bench.suite import Ceiling
from keylane.errors import ConfigError

_COLORS = {"total": "tab:red", "partition": "tab:orange", "key": "tab:blue", "none": "tab:gray"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'keylane[plot]' (scripts/setup installs it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_available() -> None:
    """Raises ``ConfigError`` now if matplotlib is missing."""
    _pyplot()


def _slug(latency_ms: float, distribution: str) -> str:
    return f"{latency_ms:g}ms-{distribution}".replace(".", "_")


def comparison(
    cells: Sequence[CellResult],
    out: Path,
    prefix: str = "models",
    ceilings: Sequence[Ceiling] = (),
) -> list[Path]:
    """Per workload: throughput against key count per model, on log axes,
    with each model's ideal as a dashed line and the bare-Trio ceiling as a
    dotted one; and the latency CDF of each model at the largest key
    count."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    workloads: dict[tuple[float, str], list[CellResult]] = {}
    for c in cells:
        workloads.setdefault((c.latency_ms, c.distribution), []).append(c)
    for (latency, dist), group in workloads.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in dict.fromkeys(c.model for c in group):
            mine = sorted((c for c in group if c.model == model), key=lambda c: c.keys)
            xs = [c.keys for c in mine]
            color = _COLORS.get(model)
            ax.plot(xs, [c.throughput for c in mine], "o-", color=color, label=model)
            ideal = [c.ideal_throughput for c in mine]
            if all(v is not None for v in ideal):
                ax.plot(xs, ideal, "--", color=color, alpha=0.6, label=f"{model} ideal")
        for b in ceilings:
            if (b.latency_ms, b.distribution) == (latency, dist):
                ax.axhline(b.throughput, color="black", linestyle=":", label="bare Trio tasks")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("keys")
        ax.set_ylabel("messages per second")
        ax.set_title(f"throughput by ordering model, {latency:g} ms {dist} handlers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
        path = out / f"{prefix}-throughput-{_slug(latency, dist)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        most = max(c.keys for c in group)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in group:
            if c.keys != most or not c.cdf_ms:
                continue
            qs = [i / (len(c.cdf_ms) - 1) for i in range(len(c.cdf_ms))]
            ax.plot(c.cdf_ms, qs, color=_COLORS.get(c.model), label=c.model)
        ax.set_xscale("log")
        ax.set_xlabel("produce → handled, ms")
        ax.set_ylabel("share of messages")
        ax.set_title(f"latency CDF, {most:,} keys, {latency:g} ms {dist} handlers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        path = out / f"{prefix}-latency-cdf-{_slug(latency, dist)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def load(results: Sequence[LoadResult], out: Path) -> list[Path]:
    """Dispatch and end-to-end p99 against offered load, per model."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        xs = [r.load * 100 for r in mine]
        color = _COLORS.get(model)
        left.plot(xs, [r.dispatch_p99_ms for r in mine], "o-", color=color, label=model)
        right.plot(xs, [r.p99_ms for r in mine], "o-", color=color, label=model)
    for ax, what in (
        (left, "dispatch p99 (fetched → start), ms"),
        (right, "p99 produce → handled, ms"),
    ):
        ax.set_yscale("log")
        ax.set_xlabel("load, % of saturation")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("latency against load (open loop, Poisson arrivals)")
    path = out / "latency-vs-load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
