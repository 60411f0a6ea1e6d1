"""One consumer process of the crash tests (run as a script).

``python -m tests.brokers.member BROKER TOPIC GROUP TABLE EFFECTS``

BROKER is ``kafka:HOST:PORT``, ``sqs:http://HOST:PORT`` or
``redis:redis://HOST:PORT/DB``. The handler's effect is ``put_if_newer``
into a shared VersionTable (an idempotent, ordered write); each applied
effect is also appended as ``key version`` to EFFECTS, a file shared with
the other member (O_APPEND keeps lines whole and in time order). It runs
until SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

import keylane
from keylane.brokers import Broker


def broker_of(spec: str) -> Broker:
    kind, _, address = spec.partition(":")
    if kind == "kafka":
        return keylane.KafkaBroker(
            address, config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
        )
    if kind == "sqs":
        return keylane.SqsFifoBroker(address, config={"visibility_timeout": 6})
    if kind == "redis":
        return keylane.RedisStreamsBroker(address, config={"lease_ms": 3000})
    raise SystemExit(f"unknown broker {spec!r}")


def main() -> None:
    spec, topic, group, table_path, effects_path = sys.argv[1:6]
    logging.basicConfig(level=logging.WARNING, format=f"[{os.getpid()}] %(message)s")
    broker = broker_of(spec)
    table = keylane.VersionTable(table_path)
    effects = os.open(effects_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    app = keylane.App(broker, topics=[topic], group=group, concurrency=16, commit_interval=0.2)

    @app.handler
    async def handle(msg: keylane.Message) -> None:
        await trio.sleep(0.002)
        assert msg.key is not None
        version = int(msg.headers["version"])
        if table.put_if_newer(msg.key, version, msg.value):
            os.write(effects, b"%s %d\n" % (msg.key, version))

    print("ready", flush=True)
    trio.run(app.run)
    table.close()


if __name__ == "__main__":
    main()
