"""Broker adapters: one protocol (``base``), one adapter per file."""

from keylane.brokers.base import Acknowledging, Broker, Consumer, Fetch, TopicPartition
from keylane.brokers.memory import Faults, MemoryBroker

__all__ = [
    "Acknowledging",
    "Broker",
    "Consumer",
    "Faults",
    "Fetch",
    "MemoryBroker",
    "TopicPartition",
]
