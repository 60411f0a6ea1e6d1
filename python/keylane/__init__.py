"""keylane: consume a stream in parallel, keep per-key order.

The public API is re-exported here; ``keylane._native`` is the Rust core.
"""

from __future__ import annotations

from keylane._native import (
    Dispatcher,
    Ticket,
    VersionItems,
    VersionTable,
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
    StoreError,
    StoreFormatError,
    StoreFull,
    TicketError,
)

__all__ = [
    "Dispatcher",
    "InvalidArgument",
    "InvalidType",
    "KeylaneError",
    "OffsetOrderError",
    "QueueFull",
    "StoreError",
    "StoreFormatError",
    "StoreFull",
    "Ticket",
    "TicketError",
    "VersionItems",
    "VersionTable",
    "__version__",
    "murmur2",
    "partition_for_key",
    "partitions_for_keys",
    "repartition_moves",
]
