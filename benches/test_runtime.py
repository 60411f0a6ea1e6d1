"""The runtime's throughput target, through the same runner as `keylane bench`.

No-op async handler, MemoryBroker, 12 partitions, 10,000 keys, 1,000,000
messages, ordering "key", concurrency 256: messages per second from the
first fetch to the last commit, median of three rounds. The naive baseline
is left to `keylane bench` (it takes minutes at this size).
"""

from __future__ import annotations

from keylane.bench import runner
from keylane.bench.workloads import Workload

from .conftest import AtLeast, Perf


def test_runtime_throughput(perf: Perf) -> None:
    perf.expect(AtLeast("runtime", "msg/s, no-op handler (median of 3)", runner.TARGET_MSG_PER_S))
    result = runner.run(Workload(), rounds=3, baseline=False)
    perf.figure("runtime", "msg/s, no-op handler (median of 3)", result.keylane_rate)
    for i, seconds in enumerate(result.keylane, 1):
        perf.figure("runtime", f"round {i} msg/s", result.rate(seconds))
    assert len(result.keylane) == 3
