"""What the real-broker tests of every adapter share: producing versioned
records, bounded polling, and the two-process crash test's parts."""

from __future__ import annotations

import collections
import contextlib
import pathlib
import signal
import subprocess
import sys

import trio

import keylane
from keylane.brokers import Broker
from tests.servers import ROOT


def bench_both_sides(broker_url: str, tmp: pathlib.Path, *extra: str) -> dict[str, object]:
    """``keylane bench --preset throughput`` on a real broker, one round:
    its JSON row, after checking both sides ran."""
    import json

    from click.testing import CliRunner

    from keylane.cli import ENV_PREFIX, main

    out = tmp / "bench.json"
    args = ["bench", "--preset", "throughput", "--broker", broker_url, "--rounds", "1"]
    args += [*extra, "--json", str(out)]
    result = CliRunner().invoke(main, args, auto_envvar_prefix=ENV_PREFIX)
    assert result.exit_code == 0, result.output
    assert "the bare loop" in result.output
    (data,) = json.loads(out.read_text())
    assert data["preset"] == "throughput"
    assert len(data["keylane"]) == len(data["bare"]) == 1
    assert data["keylane"][0] > 0
    assert data["bare"][0] > 0
    return dict(data)


def produce_versions(broker: Broker, topic: str, n: int, keys: int, *, start: int = 0) -> None:
    """Records ``start..start+n`` over ``keys`` keys, each with its number as
    its ``version`` header; waits until stored."""
    for i in range(start, start + n):
        broker.produce(topic, key=f"k{i % keys}", value=b"", headers={"version": str(i)})
    broker.flush_sync()  # type: ignore[attr-defined]  (every real adapter has it)


async def wait_for(condition: object, bound: float, what: str) -> None:
    """Polls ``condition`` (in a thread: it may ask the broker) every 0.2 s;
    a retriable broker error (a broker restarting) counts as not yet."""
    assert callable(condition)

    def check() -> bool:
        try:
            return bool(condition())
        except keylane.BrokerError as e:
            if not e.retriable:
                raise
            return False

    deadline = trio.current_time() + bound
    while not await trio.to_thread.run_sync(check):
        if trio.current_time() > deadline:
            raise AssertionError(f"{what}: not within {bound}s")
        await trio.sleep(0.2)


def spawn_member(
    spec: str, topic: str, group: str, table: str, effects: str
) -> subprocess.Popen[str]:
    """A consumer process (tests/brokers/member.py), once it is ready."""
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.brokers.member", spec, topic, group, table, effects],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def stop_members(*members: subprocess.Popen[str]) -> None:
    for p in members:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in members:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=30)
        if p.poll() is None:
            p.kill()


def check_effects(effects: str, table: str, n: int, keys: int, in_flight: int) -> None:
    """No effect applied twice or out of order; every key's last version in
    the table; lines lost with a killed process at most its handlers in flight."""
    applied: dict[bytes, list[int]] = collections.defaultdict(list)
    for line in pathlib.Path(effects).read_bytes().splitlines():
        key, version = line.split()
        applied[key].append(int(version))
    for key, versions in applied.items():
        assert versions == sorted(set(versions)), f"{key!r}: {versions}"
    with keylane.VersionTable(table) as t:
        for k in range(keys):
            last = max(v for v in range(n) if v % keys == k)
            assert t.get_value(f"k{k}")[0] == last  # type: ignore[index]
    written = sum(len(v) for v in applied.values())
    assert written >= n - in_flight
