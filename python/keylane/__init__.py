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
from keylane.app import App
from keylane.brokers import Faults, MemoryBroker, TopicPartition
from keylane.errors import (
    BrokerError,
    ConfigError,
    CorruptLogError,
    InvalidArgument,
    InvalidType,
    KeylaneError,
    NotAssigned,
    OffsetOrderError,
    QueueFull,
    StoreError,
    StoreFormatError,
    StoreFull,
    TicketError,
)
from keylane.message import Message
from keylane.metrics import Prometheus
from keylane.retry import RetryPolicy

__all__ = [
    "App",
    "BrokerError",
    "ConfigError",
    "CorruptLogError",
    "Dispatcher",
    "Faults",
    "InvalidArgument",
    "InvalidType",
    "KeylaneError",
    "MemoryBroker",
    "Message",
    "NotAssigned",
    "OffsetOrderError",
    "Prometheus",
    "QueueFull",
    "RetryPolicy",
    "StoreError",
    "StoreFormatError",
    "StoreFull",
    "Ticket",
    "TicketError",
    "TopicPartition",
    "VersionItems",
    "VersionTable",
    "__version__",
    "murmur2",
    "partition_for_key",
    "partitions_for_keys",
    "repartition_moves",
]
