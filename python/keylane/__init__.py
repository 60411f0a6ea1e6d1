"""keylane: consume a stream in parallel, keep per-key order.

The public API is re-exported here; ``keylane._native`` is the Rust core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keylane._native import (
    Dispatcher,
    Ticket,
    VersionBatch,
    VersionItems,
    VersionTable,
    __version__,
    murmur2,
    partition_for_key,
    partitions_for_keys,
    repartition_moves,
)
from keylane.app import App, UnorderedVersionsWarning
from keylane.brokers import Faults, MemoryBroker, TopicPartition
from keylane.embed import AppThread, on_asyncio_loop
from keylane.errors import (
    BlockedKeys,
    BrokerError,
    BrokerTimeout,
    ConcurrentPushError,
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
    UnknownTopic,
)
from keylane.message import Message
from keylane.metrics import Prometheus
from keylane.retry import RetryPolicy

__all__ = [
    "App",
    "AppThread",
    "BlockedKeys",
    "BrokerError",
    "BrokerTimeout",
    "ConcurrentPushError",
    "ConfigError",
    "CorruptLogError",
    "Dispatcher",
    "Faults",
    "InvalidArgument",
    "InvalidType",
    "KafkaBroker",
    "KeylaneError",
    "MemoryBroker",
    "Message",
    "NotAssigned",
    "OffsetOrderError",
    "Prometheus",
    "QueueFull",
    "RedisStreamsBroker",
    "RetryPolicy",
    "SqsFifoBroker",
    "StoreError",
    "StoreFormatError",
    "StoreFull",
    "Ticket",
    "TicketError",
    "TopicPartition",
    "UnknownTopic",
    "UnorderedVersionsWarning",
    "VersionBatch",
    "VersionItems",
    "VersionTable",
    "__version__",
    "murmur2",
    "on_asyncio_loop",
    "partition_for_key",
    "partitions_for_keys",
    "repartition_moves",
]

if TYPE_CHECKING:
    from keylane.brokers.kafka import KafkaBroker
    from keylane.brokers.redis_streams import RedisStreamsBroker
    from keylane.brokers.sqs_fifo import SqsFifoBroker

# Adapters whose client library is an extra: importing keylane does not
# import them. name -> (module, pip extra, client library).
_ADAPTERS = {
    "KafkaBroker": ("keylane.brokers.kafka", "kafka", "confluent-kafka"),
    "SqsFifoBroker": ("keylane.brokers.sqs_fifo", "sqs", "boto3"),
    "RedisStreamsBroker": ("keylane.brokers.redis_streams", "redis", "redis"),
}


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        module, extra, library = _ADAPTERS[name]
        try:
            loaded = importlib.import_module(module)
        except ImportError as e:
            raise ImportError(
                f"keylane.{name} needs {library} ({e}); install it with: "
                f"pip install 'keylane[{extra}]'"
            ) from e
        return getattr(loaded, name)
    raise AttributeError(f"module 'keylane' has no attribute {name!r}")
