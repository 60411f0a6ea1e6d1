"""What the lab's handlers record, and the harms read from it."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import trio

# Key index and sequence number within the key, carried in every value.
VALUE = struct.Struct("<II")


def value(key: int, seq: int, pad: bytes = b"") -> bytes:
    return VALUE.pack(key, seq) + pad


def key_name(i: int) -> str:
    return f"k{i:06d}"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """What ``keylane lab`` passes to every scenario."""

    seed: int = 7
    messages: int | None = None
    keys: int | None = None
    consumers: int | None = None
    broker: str = "memory"


@dataclasses.dataclass
class Row:
    """One defence setting of one scenario, measured.

    ``harm`` counts the harm the scenario is about; ``protected`` says the
    row applies the defence aimed at it; ``lost`` counts messages produced
    and never applied. ``extra`` holds the scenario's other columns."""

    scenario: str
    setting: str
    protected: bool
    harm: int
    lost: int
    throughput: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


class Ledger:
    """Per key, which sequence numbers were applied and in what order, and
    whether two handlers ever ran one key at once.

    ``inversions``: first applications of a sequence number below one
    already applied for its key (a later message ran first). Applying a
    number again (a redelivery) is a ``duplicate``, not an inversion.
    ``overlaps``: handler starts while another of the same key ran."""

    def __init__(self) -> None:
        self.applied: dict[int, set[int]] = {}
        self.top: dict[int, int] = {}
        self.running: dict[int, int] = {}
        self.inversions = 0
        self.duplicates = 0
        self.overlaps = 0
        self.count = 0
        self.distinct = 0
        # Set once ``distinct`` reaches ``target`` (whichever member applied).
        self.target = 0
        self.reached = trio.Event()

    def start(self, key: int) -> None:
        n = self.running.get(key, 0)
        if n:
            self.overlaps += 1
        self.running[key] = n + 1

    def end(self, key: int) -> None:
        self.running[key] -= 1

    def apply(self, key: int, seq: int) -> None:
        self.count += 1
        seen = self.applied.setdefault(key, set())
        if seq in seen:
            self.duplicates += 1
            return
        seen.add(seq)
        self.distinct += 1
        if self.target and self.distinct >= self.target:
            self.reached.set()
        if seq < self.top.get(key, -1):
            self.inversions += 1
        else:
            self.top[key] = seq

    def lost(self, produced: dict[int, int]) -> int:
        """Messages produced (``produced``: key -> how many) never applied."""
        return sum(n - len(self.applied.get(k, ())) for k, n in produced.items())
