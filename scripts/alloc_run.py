"""The workload of scripts/alloc-count: a no-op App over N messages, with
perf told (through its control fifos) to count only while the App runs, so
producing the messages is left out."""

from __future__ import annotations

import gc
import sys
import tempfile

from keylane.bench import runner
from keylane.bench.workloads import Workload


def main() -> None:
    n, keys, ctl, ack = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    versions = len(sys.argv) > 5 and sys.argv[5] == "versions"
    w = Workload(messages=n, keys=keys)
    broker = w.broker()
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp, open(ctl, "w") as c, open(ack) as a:

        def tell(command: str) -> None:
            c.write(command + "\n")
            c.flush()
            a.readline()

        tell("enable")
        runner.keylane_round(broker, w, "alloc", versions=f"{tmp}/v" if versions else None)
        tell("disable")


if __name__ == "__main__":
    main()
