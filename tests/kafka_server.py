"""The real Kafka broker for the tests: started by scripts/kafka.sh (see
tests/servers.py)."""

from __future__ import annotations

import os

from tests.servers import ROOT, Server, unique

KAFKA = Server("kafka.sh", "the Kafka broker for the real-broker tests")

__all__ = ["ROOT", "bootstrap_from_env", "bounce", "start", "stop", "unique"]


def start() -> tuple[str, bool]:
    """The bootstrap address, and whether this call started the broker."""
    return KAFKA.start()


def stop() -> None:
    KAFKA.stop()


def bounce() -> None:
    """Restarts the running broker on the same data (broker-restart tests)."""
    KAFKA.bounce()


def bootstrap_from_env() -> str | None:
    return os.environ.get("KEYLANE_KAFKA_BOOTSTRAP") or None
