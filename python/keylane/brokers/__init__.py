"""Broker adapters: one protocol (``base``), one adapter per file."""

from keylane.brokers.base import Broker, Consumer, Fetch, TopicPartition
from keylane.brokers.memory import Faults, MemoryBroker

__all__ = ["Broker", "Consumer", "Faults", "Fetch", "MemoryBroker", "TopicPartition"]
