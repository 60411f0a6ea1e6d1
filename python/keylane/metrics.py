"""Counters, gauges and latency histograms of a running App.

Counting costs a few integer additions per batch, not per message; latency
histograms sample one message in ``SAMPLE_EVERY``. Nothing talks to
Prometheus on the hot path: a collector reads these numbers when scraped.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from keylane.errors import ConfigError

SAMPLE_EVERY = 16

# Seconds: 50 µs to 60 s, roughly 2.5x apart.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

COUNTERS = (
    ("consumed", "Messages fetched from the broker and queued."),
    ("handled", "Messages whose handler returned."),
    ("failed", "Handler calls that raised."),
    ("retried", "Messages put back for another attempt."),
    ("dead_lettered", "Messages written to the dead-letter topic."),
    ("skipped", "Messages given up after their last attempt (on_exhausted='skip')."),
    (
        "malformed",
        "Messages whose version, id or record could not be read (failures no retry can help).",
    ),
    ("stale_dropped", "Messages not newer than the applied version, acknowledged unhandled."),
    ("duplicates_skipped", "Messages whose id was seen within the dedupe window."),
    ("redelivered_dropped", "Records fetched again while already queued or done."),
    ("commits", "Offset commits sent to the broker."),
    ("acks", "Messages acknowledged one by one (brokers that delete each, such as SQS)."),
    ("broker_retries", "Broker calls (fetch, commit, join) that failed and were retried."),
    (
        "repartition_held",
        "Records of keys that moved to another partition, held until their past was committed.",
    ),
)


class Histogram:
    """Cumulative-bucket histogram of seconds."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q``."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, Prometheus style."""
        out, seen = [], 0
        for bound, c in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            seen += c
            out.append((bound, seen))
        return out


@dataclasses.dataclass
class Metrics:
    """Everything an App counts. ``gauges`` is filled by the running App."""

    counters: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(dict(COUNTERS), 0)
    )
    handler_latency: Histogram = dataclasses.field(default_factory=Histogram)
    dispatch_latency: Histogram = dataclasses.field(default_factory=Histogram)
    # Every held record, not sampled: holds are rare and each one matters.
    repartition_wait: Histogram = dataclasses.field(default_factory=Histogram)
    gauges: Callable[[], dict[str, Any]] = dataclasses.field(default=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out.update(self.gauges())
        out["handler_latency"] = self.handler_latency.summary()
        out["dispatch_latency"] = self.dispatch_latency.summary()
        out["repartition_wait"] = self.repartition_wait.summary()
        return out


class Prometheus:
    """Exposes an App's metrics to Prometheus (needs ``prometheus-client``:
    ``pip install keylane[prometheus]``).

    ``Prometheus(port=9108)`` serves them over HTTP on that port when the App
    starts, on 127.0.0.1 only unless ``addr`` says otherwise (``addr="0.0.0.0"``
    for every interface: metrics name topics and groups, so exposing them is
    a choice); ``Prometheus(registry=r)`` (or passing a ``CollectorRegistry``
    as ``metrics=``) only registers them, for an endpoint you already have.
    Names are prefixed ``keylane_`` and labelled with the App's ``group``.
    """

    def __init__(
        self, port: int | None = None, *, addr: str = "127.0.0.1", registry: Any = None
    ) -> None:
        try:
            import prometheus_client
        except ImportError:  # pragma: no cover - exercised without the extra
            raise ConfigError(
                "metrics=Prometheus(...) needs prometheus-client: pip install 'keylane[prometheus]'"
            ) from None
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536
        ):
            raise ConfigError(f"port must be an int from 0 to 65535, got {port!r}")
        self.port = port
        self.addr = addr
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._prometheus = prometheus_client

    def attach(self, metrics: Metrics, group: str) -> Callable[[], None]:
        """Registers a collector for ``metrics`` (and starts the HTTP server
        if a port was given); returns a function that undoes it."""
        collector = _Collector(metrics, group)
        self.registry.register(collector)
        server = None
        if self.port is not None:
            server, _thread = self._prometheus.start_http_server(
                self.port, self.addr, registry=self.registry
            )

        def detach() -> None:
            self.registry.unregister(collector)
            if server is not None:
                server.shutdown()

        return detach


class _Collector:
    def __init__(self, metrics: Metrics, group: str) -> None:
        self.metrics = metrics
        self.group = group

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m, labels = self.metrics, ["group"]
        for name, doc in COUNTERS:
            c = CounterMetricFamily(f"keylane_{name}", doc, labels=labels)
            c.add_metric([self.group], m.counters[name])
            yield c
        gauges = m.gauges()
        for name in ("in_flight", "queued", "running"):
            g = GaugeMetricFamily(
                f"keylane_{name}", f"Messages {name.replace('_', ' ')}.", labels=labels
            )
            g.add_metric([self.group], gauges.get(name, 0))
            yield g
        lag = GaugeMetricFamily(
            "keylane_lag",
            "Records not yet committed, per partition.",
            labels=[*labels, "topic", "partition"],
        )
        for tp, n in gauges.get("lag", {}).items():
            topic, _, partition = tp.rpartition("/")
            lag.add_metric([self.group, topic, partition], n)
        yield lag
        for name, hist, doc in (
            ("handler_latency_seconds", m.handler_latency, "Handler run time (sampled)."),
            (
                "dispatch_latency_seconds",
                m.dispatch_latency,
                "Queued until the handler started (sampled).",
            ),
            (
                "repartition_wait_seconds",
                m.repartition_wait,
                "How long records of moved keys were held after a topic grew.",
            ),
        ):
            h = HistogramMetricFamily(f"keylane_{name}", doc, labels=labels)
            h.add_metric([self.group], hist.buckets(), sum_value=hist.sum)
            yield h
