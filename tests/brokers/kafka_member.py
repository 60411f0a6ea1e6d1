"""One consumer process of the Kafka crash test (run as a script).

``python -m tests.brokers.kafka_member BOOTSTRAP TOPIC GROUP TABLE EFFECTS``

Its handler's effect is ``put_if_newer`` into a shared VersionTable (an
idempotent, ordered write); each applied effect is also appended as
``key version`` to EFFECTS, a file shared with the other member (O_APPEND
keeps lines whole and in time order). It runs until SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

import keylane


def main() -> None:
    bootstrap, topic, group, table_path, effects_path = sys.argv[1:6]
    logging.basicConfig(level=logging.WARNING, format=f"[{os.getpid()}] %(message)s")
    broker = keylane.KafkaBroker(
        bootstrap, config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
    )
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
