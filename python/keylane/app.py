"""keylane.App: what a service embeds.

```python
app = keylane.App(broker, topics=["payments"], group="wallet", ordering="key", concurrency=256)

@app.handler
async def handle(msg: keylane.Message) -> None: ...

trio.run(app.run)
```
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

from keylane import _guard
from keylane._native import VersionTable
from keylane._runtime import Run
from keylane.brokers.base import Broker
from keylane.dlq import replay
from keylane.embed import AppThread
from keylane.errors import BlockedKeys, ConfigError, InvalidType, KeylaneError
from keylane.message import Message
from keylane.metrics import Metrics, Prometheus
from keylane.retry import RetryPolicy

Handler = Callable[[Message], Awaitable[None]]


class UnorderedVersionsWarning(UserWarning):
    """An App runs unordered with a version table (see ``App``)."""


ORDERINGS = ("total", "partition", "key", "none")
DEFAULT_DEDUPE_WINDOW = 7 * 24 * 3600.0
# Kafka clients refresh topic metadata every 5 minutes by default; a broker
# that does not say how stale its producers' view can be gets that.
_DEFAULT_GRACE = 300.0


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


def _positive_seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_table_path(path: str | os.PathLike[str]) -> None:
    """A version table path is a directory, made on first use: refuse now
    what would only fail when the App runs."""
    p = Path(path)
    if str(path) == "":
        raise ConfigError("versions must be a directory path, not an empty string")
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"versions={str(path)!r} is a file; a version table is a directory "
            "(created on first use)"
        )
    parent = next((a for a in (p.absolute(), *p.absolute().parents) if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"versions={str(path)!r}: {parent} is a file, not a directory")


def _sole_keylane_error(group: BaseExceptionGroup[BaseException]) -> KeylaneError | None:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner if isinstance(inner, KeylaneError) else None


class App:
    """Consumes ``topics`` as consumer group ``group`` and runs the handler,
    in parallel but in order per key (or per partition, or globally, or not
    at all: ``ordering``).

    Options (keyword-only):

    - ``ordering``: ``"key"`` (default), ``"partition"``, ``"total"``, ``"none"``.
    - ``concurrency``: handlers running at once (default 64).
    - ``capacity``: messages fetched and not yet done, at most (default 100,000).
    - ``retry``: a ``RetryPolicy`` (default: 5 attempts, 0.1 s doubling to 30 s).
    - ``dlq``: a topic on the same broker for messages that fail every attempt.
    - ``on_exhausted``: without a ``dlq``, what happens after the last attempt:
      ``"block"`` (default: keep retrying every ``backoff_max``; the key and
      its partition's commits wait, nothing is lost) or ``"skip"``
      (acknowledge it, log an error, count it).
    - ``versions``: a ``VersionTable`` or a path to one. With it, a message
      whose version is not newer than the applied one for its key is
      acknowledged without running the handler. With ``ordering="none"``
      this warns (``UnorderedVersionsWarning``): a later version may be
      applied first and the earlier one then dropped as stale — right for
      handlers that store a whole state, wrong for ones that apply changes.
    - ``version_of``: message → int or None (default: the ``version``
      header; None means "no version, always handle").
    - ``record_versions``: ``"batched"`` (default) writes versions and ids
      in one transaction before each offset commit; ``"each"`` writes them
      right after each handler returns, for handlers whose effects must not
      repeat after a crash (slower: a write, and with a durable table an
      fsync, per message). See docs/design.md for the exact windows.
    - ``dedupe``: skip messages whose id was seen within a window (needs
      ``versions``): True (7 days) or a window in seconds.
    - ``id_of``: message → bytes/str or None (default: the ``id`` header).
    - ``shutdown_timeout``: how long running handlers get on stop and how
      long a rebalance waits to drain (default 30 s).
    - ``commit_interval``: seconds between offset commits (default 1).
    - ``broker_timeout``: the bound on every broker call (join, commit,
      release, close; a fetch gets its own wait on top), default 30 s. A
      call past it is a retriable ``BrokerTimeout``; retriable errors are
      retried with a backoff (fetches forever, a join for
      ``broker_timeout``), fatal ones end ``run``.
    - ``fetch_max``: records per fetch at most (default 4,096).
    - ``repartition``: ``"hold"`` (default, except with ``ordering="none"``)
      or ``"off"``. When a topic grows, records of keys that moved to
      another partition wait until the group has committed every earlier
      record of their old partition, so a key never runs ahead of its own
      past (docs/design.md, "Repartitioning"). ``"off"`` shows the harm.
    - ``repartition_grace``: seconds after a growth during which producers
      may still place keys by the old partition count (default: the
      broker's ``metadata_max_age``: 0 for MemoryBroker, 300 for Kafka,
      whose clients refresh topic metadata every 5 minutes).
    - ``metrics``: ``keylane.Prometheus(port=...)``, or a prometheus-client
      ``CollectorRegistry``; ``app.stats()`` works without either.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        topics: Sequence[str],
        group: str,
        ordering: Literal["total", "partition", "key", "none"] = "key",
        concurrency: int = 64,
        capacity: int = 100_000,
        retry: RetryPolicy | None = None,
        dlq: str | None = None,
        on_exhausted: Literal["block", "skip"] = "block",
        versions: VersionTable | str | os.PathLike[str] | None = None,
        version_of: Callable[[Message], int | None] | None = None,
        record_versions: Literal["batched", "each"] = "batched",
        dedupe: bool | float | None = None,
        id_of: Callable[[Message], bytes | str | None] | None = None,
        shutdown_timeout: float = 30.0,
        commit_interval: float = 1.0,
        broker_timeout: float = 30.0,
        fetch_max: int = 4096,
        repartition: Literal["hold", "off"] | None = None,
        repartition_grace: float | None = None,
        metrics: Any = None,
    ) -> None:
        for method in ("consumer", "produce", "flush"):
            if not callable(getattr(broker, method, None)):
                raise ConfigError(f"broker must implement keylane.brokers.Broker (no {method}())")
        self.broker = broker
        if isinstance(topics, str) or not isinstance(topics, Sequence) or not topics:
            raise ConfigError("topics must be a non-empty list of topic names")
        if not all(isinstance(t, str) and t for t in topics):
            raise ConfigError("topics must be non-empty strings")
        self.topics = list(dict.fromkeys(topics))
        if not isinstance(group, str) or not group:
            raise ConfigError("group must be a non-empty str")
        self.group = group
        if ordering not in ORDERINGS:
            raise ConfigError(
                f"ordering must be one of {', '.join(map(repr, ORDERINGS))}; got {ordering!r}"
            )
        self.ordering = ordering
        if repartition is None:
            repartition = "off" if ordering == "none" else "hold"
        elif repartition not in ("hold", "off"):
            raise ConfigError(f'repartition must be "hold" or "off", got {repartition!r}')
        elif repartition == "hold" and ordering == "none":
            raise ConfigError(
                'repartition="hold" keeps per-key order across a topic growth; '
                'ordering="none" promises no order to keep'
            )
        self.repartition = repartition
        if repartition_grace is None:
            grace = getattr(broker, "metadata_max_age", _DEFAULT_GRACE)
            repartition_grace = grace if isinstance(grace, (int, float)) else _DEFAULT_GRACE
        if (
            isinstance(repartition_grace, bool)
            or not isinstance(repartition_grace, (int, float))
            or not math.isfinite(repartition_grace)
            or repartition_grace < 0
        ):
            raise ConfigError(
                f"repartition_grace must be a number of seconds >= 0, got {repartition_grace!r}"
            )
        self.repartition_grace = float(repartition_grace)
        self.concurrency = _positive_int("concurrency", concurrency)
        self.capacity = _positive_int("capacity", capacity)
        if self.capacity < self.concurrency:
            warnings.warn(
                f"capacity={self.capacity} is below concurrency={self.concurrency}: at most "
                f"{self.capacity} messages are fetched and not done, so at most that many "
                "handlers run at once",
                stacklevel=2,
            )
        self.fetch_max = _positive_int("fetch_max", fetch_max)
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a keylane.RetryPolicy, not {type(retry).__name__}")
        self.retry = retry
        if dlq is not None and (not isinstance(dlq, str) or not dlq):
            raise ConfigError("dlq must be a topic name or None")
        if dlq is not None and dlq in self.topics:
            raise ConfigError(
                f"dlq {dlq!r} is one of the consumed topics; failures would loop back in"
            )
        self.dlq = dlq
        if on_exhausted not in ("block", "skip"):
            raise ConfigError(f'on_exhausted must be "block" or "skip", got {on_exhausted!r}')
        self.on_exhausted = on_exhausted
        self.shutdown_timeout = _positive_seconds("shutdown_timeout", shutdown_timeout)
        self.commit_interval = _positive_seconds("commit_interval", commit_interval)
        self.broker_timeout = _positive_seconds("broker_timeout", broker_timeout)
        self._versions_arg = versions
        self._versions_table: VersionTable | None = None
        if versions is not None and not isinstance(versions, (VersionTable, str, os.PathLike)):
            raise ConfigError(
                f"versions must be a VersionTable or a path, not {type(versions).__name__}"
            )
        if isinstance(versions, (str, os.PathLike)):
            _check_table_path(versions)
        if version_of is not None and not callable(version_of):
            raise ConfigError("version_of must be a callable taking a Message")
        if id_of is not None and not callable(id_of):
            raise ConfigError("id_of must be a callable taking a Message")
        if record_versions not in ("batched", "each"):
            raise ConfigError(
                f'record_versions must be "batched" or "each", got {record_versions!r}'
            )
        self.record_versions = record_versions
        if dedupe is None or dedupe is False:
            self._dedupe_ttl: float | None = None
            dedupe_on = False
        elif dedupe is True:
            self._dedupe_ttl, dedupe_on = DEFAULT_DEDUPE_WINDOW, True
        else:
            self._dedupe_ttl, dedupe_on = _positive_seconds("dedupe", dedupe), True
        if dedupe_on and versions is None:
            raise ConfigError("dedupe needs versions= (the seen ids live in the VersionTable)")
        if (version_of is not None or id_of is not None) and versions is None:
            raise ConfigError("version_of/id_of need versions= (a VersionTable or a path)")
        self._version_of = (version_of or _guard.version_header) if versions is not None else None
        if ordering == "none" and versions is not None:
            # Not refused: with whole-state handlers (last writer wins) a
            # later version applied first and the earlier one then dropped as
            # stale is the right end state. With handlers that apply deltas
            # it is not, and nothing else would say so.
            warnings.warn(
                'ordering="none" with versions=: messages of one key run concurrently, so a '
                "later version can be applied before an earlier one, which is then dropped as "
                "stale. Right for handlers that store a whole state (last writer wins); wrong "
                'for handlers that apply changes, which need ordering="key".',
                UnorderedVersionsWarning,
                stacklevel=2,
            )
        self._id_of = (id_of or _guard.id_header) if dedupe_on else None
        if metrics is None or isinstance(metrics, Prometheus):
            self._metrics_sink = metrics
        elif type(metrics).__name__ == "CollectorRegistry":
            self._metrics_sink = Prometheus(registry=metrics)
        else:
            raise ConfigError(
                "metrics must be keylane.Prometheus(...), a prometheus_client.CollectorRegistry, "
                "or None"
            )
        self._metrics = Metrics()
        self._handler: Handler | None = None
        self._run: Run | None = None

    def handler(self, fn: Handler) -> Handler:
        """Registers the message handler, an ``async def`` taking a Message
        (or a ``functools.partial`` of one, or an object whose ``__call__``
        is one)."""
        if self._handler is not None:
            raise ConfigError("this App already has a handler")
        # An async def (a functools.partial of one too: inspect unwraps
        # partials), or an object whose __call__ is one.
        if not (
            inspect.iscoroutinefunction(fn)
            or (callable(fn) and inspect.iscoroutinefunction(type(fn).__call__))
        ):
            name = getattr(fn, "__name__", repr(fn))
            raise InvalidType(f"the handler must be an async function (async def), got {name}")
        self._handler = fn
        return fn

    async def run(
        self,
        *,
        until_idle: bool = False,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consumes until cancelled, ``stop()``ped, or SIGINT/SIGTERM (in the
        main thread; a second signal forces the stop). With
        ``until_idle=True``, returns once every record produced so far to its
        partitions is handled and committed; if what is left is only keys
        blocked by messages that fail every attempt (``on_exhausted="block"``),
        it stops (everything else committed) and raises ``BlockedKeys``
        naming them. ``task_status.started()`` is
        called once the App has joined its group and is consuming."""
        if self._handler is None:
            raise ConfigError("no handler: decorate an async function with @app.handler first")
        if self._run is not None:
            raise ConfigError("this App is already running")
        opened = None
        if self._versions_arg is not None:
            if isinstance(self._versions_arg, VersionTable):
                self._versions_table = self._versions_arg
            else:
                # Opening may replay a journal, and closing folds it with an
                # fsync: neither on the loop's thread.
                opened = self._versions_table = await trio.to_thread.run_sync(
                    VersionTable, self._versions_arg
                )
        self._run = Run(self, until_idle=until_idle)
        try:
            await self._run.main(task_status, handle_signals=handle_signals)
            blocked = self._run.idle_blocked
            if blocked:
                first = blocked[0]
                raise BlockedKeys(
                    f"group {self.group}: everything else is handled and committed, but "
                    f"{len(blocked)} key(s) are blocked by messages that fail every attempt "
                    f"(on_exhausted='block'), the first at {first['topic']}/"
                    f"{first['partition']}@{first['offset']}: {first['error']:.200}. "
                    "Fix the cause and run again, or set dlq= (or on_exhausted='skip') to move on",
                    blocked,
                )
        except BaseExceptionGroup as group:
            # One keylane error (a broker that cannot be reached, a topic
            # that does not exist) is raised as itself, not inside the
            # groups of the run's nurseries.
            leaf = _sole_keylane_error(group)
            if leaf is None:
                raise
            raise leaf from None
        finally:
            # stats() after the run reports its last state, not a live view.
            final = self._run.gauges()
            self._metrics.gauges = lambda: final
            # The run's last reference goes in a worker thread: freeing its
            # lanes (one per key it saw, up to capacity) takes milliseconds,
            # which the dispatcher spends with the GIL released.
            last = [self._run]
            self._run = None

            def release() -> None:
                last.clear()
                if opened is not None:
                    opened.close()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release)

    def start_in_thread(self, *, until_idle: bool = False, timeout: float = 30.0) -> AppThread:
        """Runs this App on a Trio loop of its own in a new thread, for
        programs that are not Trio (asyncio services, threaded code), and
        returns once it has joined its group and consumes (``TimeoutError``
        after ``timeout`` seconds). The returned ``AppThread`` has ``stop()``,
        ``join(timeout)``, ``wait()`` (for asyncio) and ``stats()``, all safe
        from any thread. Handlers run on the App's thread; wrap an asyncio
        handler with ``keylane.on_asyncio_loop`` to run it on your loop."""
        if self._handler is None:
            raise ConfigError("no handler: decorate an async function with @app.handler first")
        if self._run is not None:
            raise ConfigError("this App is already running")
        thread = AppThread(self, until_idle=until_idle, name=f"keylane {self.group}")
        thread._start(timeout)
        return thread

    def stop(self) -> None:
        """Stops a running App gracefully (as the first SIGINT does)."""
        if self._run is not None:
            self._run.stop()

    def abort(self) -> None:
        """Stops a running App as if its process had died: no final commit,
        and it does not leave its group, so its partitions move to the other
        members only after the broker's session timeout. For tests and
        chaos experiments."""
        if self._run is not None:
            self._run.abort()

    def stats(self) -> dict[str, Any]:
        """Counters (consumed, handled, failed, retried, dead_lettered,
        skipped, malformed, stale_dropped, duplicates_skipped,
        redelivered_dropped, commits, broker_retries, repartition_held),
        gauges while running (in_flight, queued, running, partitions, member,
        lag per partition, blocked keys) and latency summaries."""
        return self._metrics.snapshot()

    async def replay_dlq(
        self,
        *,
        rate: float = 100.0,
        burst: int | None = None,
        limit: int | None = None,
        skip_malformed: bool = False,
        park_topic: str | None = None,
        park_file: str | os.PathLike[str] | None = None,
    ) -> int:
        """Re-produces this App's dead letters to their original topics at
        ``rate`` messages per second and returns how many. Each keeps its
        original key, value and headers (version included), so the version
        check drops what has become stale. A malformed record stops it with
        ``keylane.dlq.ReplayStopped`` unless ``skip_malformed`` parks it in
        ``park_topic`` or ``park_file`` (see ``keylane.dlq.replay``)."""
        if self.dlq is None:
            raise ConfigError("this App has no dlq topic to replay")
        return await replay(
            self.broker,
            self.dlq,
            group=self.group,
            rate=rate,
            burst=burst,
            limit=limit,
            skip_malformed=skip_malformed,
            park_topic=park_topic,
            park_file=park_file,
        )
