"""`keylane bench --broker sqs://HOST:PORT`: keylane on an SQS FIFO server
(ElasticMQ here) against a bare boto3 loop that only receives and deletes.

SQS keeps no messages once deleted, so every round of each side gets a
fresh queue holding the same workload, produced before the clock starts.
The bare loop runs as many receivers as keylane's adapter (4 threads, each
receiving 10 with long polling and deleting them in one batch call); both
are timed until the last message is deleted.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable

from keylane.bench.bare import BareComparison
from keylane.bench.runner import keylane_round
from keylane.bench.workloads import Workload
from keylane.brokers.sqs_fifo import SqsFifoBroker
from keylane.errors import ConfigError


def parse_url(url: str) -> str:
    """``sqs://HOST:PORT`` → the endpoint URL ``http://HOST:PORT``."""
    rest = url[len("sqs://") :].strip("/") if url.startswith("sqs://") else ""
    if not rest:
        raise ConfigError(f"an SQS endpoint URL looks like sqs://127.0.0.1:9324, got {url!r}")
    return f"http://{rest}"


def prepare(broker: SqsFifoBroker, w: Workload) -> tuple[str, float]:
    """A new queue holding the workload, and how long producing took."""
    queue = f"keylane-bench-{uuid.uuid4().hex[:10]}.fifo"
    broker.create_topic(queue)
    started = time.perf_counter()
    keys = [f"key-{i:06d}".encode() for i in range(w.keys)]
    value = b"x" * 64
    for i in range(w.messages):
        broker.produce(queue, keys[(i * 7919) % w.keys], value)
    broker.flush_sync(timeout=600)
    return queue, time.perf_counter() - started


def _bare_round(broker: SqsFifoBroker, queue: str, w: Workload) -> float:
    client = broker.client
    url = broker.queue_url(queue)
    seen = 0
    lock = threading.Lock()
    deadline = time.monotonic() + 600

    def receiver() -> None:
        nonlocal seen
        while True:
            with lock:
                if seen >= w.messages:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bare loop saw {seen} of {w.messages} messages in 600 s")
            got = client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            ).get("Messages", [])
            if got:
                client.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(got)
                    ],
                )
                with lock:
                    seen += len(got)

    started = time.perf_counter()
    n = broker.options.receivers
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(receiver) for _ in range(n)]:
            f.result()
    return time.perf_counter() - started


def run(
    w: Workload,
    endpoint: str,
    *,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda line: None,
) -> BareComparison:
    broker = SqsFifoBroker(endpoint)
    result = BareComparison(w, "SQS FIFO", "bare boto3 receive/delete loop", None)
    for r in range(1, rounds + 1):
        queue, produce_s = prepare(broker, w)
        if result.produce_s is None:
            result.produce_s = produce_s
            progress(f"produced {w.messages:,} messages to {queue} in {produce_s:.1f} s")
        result.keylane.append(
            keylane_round(broker, w, f"bench-keylane-{uuid.uuid4().hex[:8]}", queue)
        )
        broker.delete_topic(queue)
        queue, _ = prepare(broker, w)
        result.bare.append(_bare_round(broker, queue, w))
        broker.delete_topic(queue)
        progress(result.round_line(r))
    return result
