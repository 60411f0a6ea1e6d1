"""keylane: consume a stream in parallel, keep per-key order.

The public API is re-exported here; ``keylane._native`` is the Rust core.
"""

from __future__ import annotations

from keylane._native import (
    Dispatcher,
    Ticket,
    __version__,
    murmur2,
    partition_for_key,
    partitions_for_keys,
    repartition_moves,
)
from keylane.errors import (
    InvalidArgument,
    InvalidType,
    KeylaneError,
    OffsetOrderError,
    QueueFull,
    TicketError,
)

__all__ = [
    "Dispatcher",
    "InvalidArgument",
    "InvalidType",
    "KeylaneError",
    "OffsetOrderError",
    "QueueFull",
    "Ticket",
    "TicketError",
    "__version__",
    "murmur2",
    "partition_for_key",
    "partitions_for_keys",
    "repartition_moves",
]
