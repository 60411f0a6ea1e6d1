"""The ordering-model comparison's workloads: which key each message has, how
long its handler works, and what the best any runtime could do with them.

A workload is drawn once from a seed and carried in the messages (key index,
sequence number within the key, work seconds), so the run, its order check
and its bound all see the same work.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from collections.abc import Sequence

from keylane._native import partitions_for_keys
from keylane.errors import ConfigError

MODELS = ("total", "partition", "key", "none")
DISTRIBUTIONS = ("fixed", "uniform", "exponential", "longtail")
# The long tail is lognormal with this sigma, scaled to the asked mean:
# p50 is 0.32x the mean, p99 10.6x, and a draw is capped at 100x.
LONGTAIL_SIGMA = 1.5
LONGTAIL_CAP = 100.0


@dataclasses.dataclass(frozen=True, slots=True)
class CellSpec:
    """One cell of the comparison: an ordering model on one workload."""

    model: str
    keys: int
    latency_ms: float
    distribution: str = "fixed"
    concurrency: int = 256
    partitions: int = 12
    messages: int = 20_000
    skew: float = 0.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {self.distribution!r}"
            )
        for name in ("keys", "concurrency", "partitions", "messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("latency_ms", "skew"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """What a cell's messages carry, and the bound that follows from it."""

    keys: list[int]  # key index of each message
    seqs: list[int]  # its sequence number within its key
    seconds: list[float]  # handler work of each message

    def __len__(self) -> int:
        return len(self.keys)


def key_name(index: int) -> bytes:
    return f"key-{index:06d}".encode()


def durations(distribution: str, mean: float, n: int, rng: random.Random) -> list[float]:
    """``n`` handler durations with mean ``mean`` seconds."""
    if mean == 0 or distribution == "fixed":
        return [mean] * n
    if distribution == "uniform":
        return [rng.uniform(0, 2 * mean) for _ in range(n)]
    if distribution == "exponential":
        return [rng.expovariate(1 / mean) for _ in range(n)]
    mu = math.log(mean) - LONGTAIL_SIGMA**2 / 2
    cap = mean * LONGTAIL_CAP
    return [min(cap, rng.lognormvariate(mu, LONGTAIL_SIGMA)) for _ in range(n)]


def draw(spec: CellSpec) -> Work:
    """The cell's messages, reproducible from ``spec.seed``. Keys without
    skew take turns (every key gets the same share, spread by a stride);
    with skew ``s`` a key of popularity rank ``r`` is drawn with weight
    ``1 / r**s`` (Zipf)."""
    rng = random.Random(spec.seed)
    n, k = spec.messages, spec.keys
    if spec.skew == 0:
        stride = 7919 if math.gcd(7919, k) == 1 else 1
        keys = [(i * stride) % k for i in range(n)]
    else:
        weights = [1 / (r + 1) ** spec.skew for r in range(k)]
        keys = rng.choices(range(k), weights=weights, k=n)
    seen: dict[int, int] = defaultdict(int)
    seqs = []
    for key in keys:
        seqs.append(seen[key])
        seen[key] += 1
    return Work(keys, seqs, durations(spec.distribution, spec.latency_s, n, rng))


def bound_seconds(spec: CellSpec, work: Work) -> float:
    """The least time any runtime needs for ``work`` under the cell's model:
    the larger of the total work spread over ``concurrency`` and the longest
    chain the model makes serial (everything, for total order; the busiest
    partition; the busiest key; the longest single message)."""
    total = sum(work.seconds)
    if spec.model == "total":
        return total
    spread = total / spec.concurrency
    if spec.model == "none":
        return max(spread, max(work.seconds, default=0.0))
    lanes: Sequence[int] = work.keys
    if spec.model == "partition":
        lanes = lane_partitions(work.keys, spec.partitions)
    chains: dict[int, float] = defaultdict(float)
    for lane, seconds in zip(lanes, work.seconds, strict=True):
        chains[lane] += seconds
    return max(spread, max(chains.values(), default=0.0))


def lane_partitions(keys: Sequence[int], partitions: int) -> list[int]:
    """The partition of each message's key, as the broker will place it
    (Kafka's murmur2 partitioner)."""
    distinct = sorted(set(keys))
    where = dict(
        zip(distinct, partitions_for_keys([key_name(k) for k in distinct], partitions), strict=True)
    )
    return [where[k] for k in keys]


def ideal_throughput(spec: CellSpec, work: Work) -> float | None:
    """Messages per second at the bound; ``None`` for a no-op handler (no
    bound from the work: only the runtime's own cost limits it)."""
    seconds = bound_seconds(spec, work)
    return len(work) / seconds if seconds > 0 else None


def cell_messages(spec: CellSpec, target_seconds: float, floor: int = 1_000) -> int:
    """How many messages make a cell last about ``target_seconds`` at its
    ideal throughput (for fixed work and even keys), between ``floor`` and
    ``spec.messages``: a total-order cell at 1 ms gets 1,000 messages, an
    unordered one the cap."""
    if spec.latency_ms == 0:
        return spec.messages
    parallel = {
        "total": 1,
        "partition": min(spec.concurrency, spec.partitions, spec.keys),
        "key": min(spec.concurrency, spec.keys),
        "none": spec.concurrency,
    }[spec.model]
    wanted = round(parallel / spec.latency_s * target_seconds)
    return max(min(floor, spec.messages), min(spec.messages, wanted))
