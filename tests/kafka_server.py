"""The real Kafka broker for the tests: started by scripts/kafka.sh.

``scripts/test`` starts it before pytest and stops it afterwards; a plain
``pytest`` run starts it here (and stops what it started). It never skips:
if the broker cannot start, every Kafka test errors with the broker log's
tail.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kafka.sh"


def kafka_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start() -> tuple[str, bool]:
    """The bootstrap address, and whether this call started the broker."""
    already = kafka_script("status").returncode == 0
    done = kafka_script("start")
    if done.returncode != 0:
        pytest.fail(
            "the Kafka broker for the real-broker tests did not start:\n"
            + done.stderr[-6000:]
            + done.stdout[-2000:],
            pytrace=False,
        )
    return done.stdout.strip().splitlines()[-1], not already


def stop() -> None:
    kafka_script("stop")


def bounce() -> None:
    """Restarts the running broker on the same data (broker-restart tests)."""
    done = kafka_script("bounce")
    if done.returncode != 0:
        pytest.fail("scripts/kafka.sh bounce failed:\n" + done.stderr[-6000:], pytrace=False)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bootstrap_from_env() -> str | None:
    return os.environ.get("KEYLANE_KAFKA_BOOTSTRAP") or None
