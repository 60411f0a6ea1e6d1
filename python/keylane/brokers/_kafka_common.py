"""What the Kafka adapter's consumer, producer and admin helper share:
client configuration and the mapping of librdkafka errors onto keylane's."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import confluent_kafka

from keylane.errors import BrokerError, BrokerTimeout, ConfigError, NotAssigned, UnknownTopic

log = logging.getLogger("keylane.brokers.kafka")

_ERR = confluent_kafka.KafkaError

# A commit refused because the group moved on: the partitions belong to a
# newer generation (a rebalance), not a broker failure.
_REBALANCED = frozenset(
    {
        _ERR.ILLEGAL_GENERATION,
        _ERR.UNKNOWN_MEMBER_ID,
        _ERR.REBALANCE_IN_PROGRESS,
        _ERR.FENCED_INSTANCE_ID,
        _ERR._ASSIGNMENT_LOST,
        _ERR.STALE_MEMBER_EPOCH,
    }
)
_UNKNOWN_TOPIC = frozenset({_ERR.UNKNOWN_TOPIC_OR_PART, _ERR._UNKNOWN_TOPIC})
_TIMED_OUT = frozenset({_ERR._TIMED_OUT, _ERR.REQUEST_TIMED_OUT, _ERR._MSG_TIMED_OUT})
# Trouble librdkafka or the cluster recovers from by itself (reconnects,
# leader and coordinator moves during a broker restart).
_TRANSIENT = frozenset(
    {
        _ERR._TRANSPORT,
        _ERR._ALL_BROKERS_DOWN,
        _ERR._RESOLVE,
        _ERR._WAIT_COORD,
        _ERR.NOT_LEADER_FOR_PARTITION,
        _ERR.LEADER_NOT_AVAILABLE,
        _ERR.NOT_COORDINATOR,
        _ERR.COORDINATOR_NOT_AVAILABLE,
        _ERR.COORDINATOR_LOAD_IN_PROGRESS,
        _ERR.NETWORK_EXCEPTION,
    }
)
# Options of the consumer only: kept out of the producer's and admin
# client's config (librdkafka would warn about each one).
_CONSUMER_ONLY = (
    "group.",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "auto.offset.reset",
    "enable.auto.",
    "auto.commit.",
    "fetch.",
    "queued.",
    "isolation.level",
    "check.crcs",
    "enable.partition.eof",
)


class _QuietRepeats(logging.Filter):
    """Lets each distinct librdkafka log line through at most once per
    ``every`` seconds: while a broker is down it logs the same failure for
    every reconnect attempt."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        # "FAIL [rdkafka#consumer-3] [thrd:...]: ..." differ only by client.
        key = text.split("]", 2)[-1]
        now = time.monotonic()
        if now - self.last.get(key, -self.every) < self.every:
            return False
        if len(self.last) > 10_000:
            self.last.clear()
        self.last[key] = now
        return True


librdkafka_log = logging.getLogger("keylane.brokers.kafka.librdkafka")
librdkafka_log.addFilter(_QuietRepeats())


def client_config(
    bootstrap_servers: str, config: Mapping[str, Any], *, consumer: bool = False, **defaults: Any
) -> dict[str, Any]:
    """``defaults`` (dots spelled as underscores), then the user's
    ``config`` (consumer options only for a consumer), then what keylane
    needs and cannot give up."""
    conf = {k.replace("_", "."): v for k, v in defaults.items()}
    conf.update((k, v) for k, v in config.items() if consumer or not k.startswith(_CONSUMER_ONLY))
    conf["bootstrap.servers"] = bootstrap_servers
    conf.setdefault("logger", librdkafka_log)
    return conf


def check_config(config: object) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise ConfigError("config must be a mapping of librdkafka option names to values")
    return dict(config)


def broker_error(err: confluent_kafka.KafkaError | None, doing: str) -> BrokerError:
    """A keylane error for a librdkafka error that happened while ``doing``."""
    if err is None:
        return BrokerError(f"kafka: {doing} failed", retriable=True)
    code, name = err.code(), err.name()
    text = f"kafka: {doing} failed: {err.str()} ({name})"
    if code in _REBALANCED:
        return NotAssigned(text, retriable=False, code=name)
    if code in _UNKNOWN_TOPIC:
        return UnknownTopic(f"{text}; create the topic first (KafkaBroker.create_topic)", code=name)
    if code in _TIMED_OUT:
        return BrokerTimeout(text, code=name)
    retriable = not err.fatal() and (err.retriable() or code in _TRANSIENT)
    return BrokerError(text, retriable=retriable, code=name)


def from_exception(e: confluent_kafka.KafkaException, doing: str) -> BrokerError:
    err = e.args[0] if e.args and isinstance(e.args[0], confluent_kafka.KafkaError) else None
    return broker_error(err, doing)


class RateLimitedLog:
    """Logs each error code at most once per ``every`` seconds: a broker that
    is down reports the same error many times a second."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last: dict[int, float] = {}

    def __call__(self, err: confluent_kafka.KafkaError, where: str) -> None:
        now = time.monotonic()
        if now - self.last.get(err.code(), -self.every) >= self.every:
            self.last[err.code()] = now
            level = logging.ERROR if err.fatal() else logging.WARNING
            log.log(level, "kafka %s: %s (%s)", where, err.str(), err.name())
