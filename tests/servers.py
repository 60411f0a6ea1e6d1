"""The real servers the tests talk to, each started by its script in
scripts/ (kafka.sh, elasticmq.sh, redis.sh).

``scripts/test`` starts them before pytest and stops them afterwards; a
plain ``pytest`` run starts them here (and stops what it started). They
never skip: a server that cannot start fails its tests with its log's tail.
"""

from __future__ import annotations

import pathlib
import subprocess
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, script: str, what: str) -> None:
        self.script = ROOT / "scripts" / script
        self.what = what

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def _must(self, *args: str) -> str:
        """Runs the script; fails the test with its output if it fails;
        returns the last line it printed (the address)."""
        done = self.run(*args)
        if done.returncode != 0:
            pytest.fail(
                f"{self.script.name} {' '.join(args)} failed ({self.what}):\n"
                + done.stderr[-6000:]
                + done.stdout[-2000:],
                pytrace=False,
            )
        lines = done.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def start(self) -> tuple[str, bool]:
        """The address, and whether this call started the server."""
        already = self.run("status").returncode == 0
        return self._must("start"), not already

    def stop(self) -> None:
        self.run("stop")

    def bounce(self) -> str:
        """Restarts the running server on the same data."""
        return self._must("bounce")

    def halt(self) -> None:
        """Ends the server, keeping its data for ``resume``."""
        self._must("halt")

    def resume(self) -> str:
        return self._must("resume")

    def pause(self) -> None:
        """Freezes the server (calls hang, nothing is lost) until ``unpause``."""
        self._must("pause")

    def unpause(self) -> None:
        self._must("unpause")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
