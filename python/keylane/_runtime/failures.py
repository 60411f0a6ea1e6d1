"""What happens to a message whose handler failed: retry after a
backoff, dead letter, poison, or a blocked key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from keylane._native import Ticket
from keylane._runtime.state import State
from keylane.dlq import DeadLetter
from keylane.message import Message

log = logging.getLogger("keylane")


class Failures(State):
    def _failed(self, t: Ticket, msg: Message, error: Exception) -> None:
        counters = self.metrics.counters
        counters["failed"] += 1
        if t.partition in self.draining:
            # Its partition is being given up: the next owner retries it.
            self.d.retry(t)
            self.d.drop_queued([t.partition])
            self.progress.unpark_all()
            return
        deliveries = t.attempt + 1
        policy = self.app.retry
        log.warning(
            "handler failed on %s/%d@%d (attempt %d of %d): %r",
            msg.topic,
            msg.partition,
            msg.offset,
            deliveries,
            policy.max_attempts,
            error,
            extra={
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "key": msg.key,
            },
        )
        if policy.exhausted(deliveries):
            self._exhausted(t, msg, error, deliveries)
        else:
            counters["retried"] += 1
            self._side(self._retry_later, t, policy.delay(deliveries, self.rng))

    def _poison(self, t: Ticket, msg: Message, error: Exception) -> None:
        """A message no retry can help (its version or id cannot be read,
        its record cannot be decoded): straight to ``on_exhausted``."""
        self.metrics.counters["failed"] += 1
        self.metrics.counters["malformed"] += 1
        log.warning(
            "cannot handle %s/%d@%d: %s",
            msg.topic,
            msg.partition,
            msg.offset,
            error,
            extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
        )
        self._exhausted(t, msg, error, t.attempt + 1)

    def _exhausted(self, t: Ticket, msg: Message, error: Exception, deliveries: int) -> None:
        app = self.app
        where = f"{msg.topic}/{msg.partition}@{msg.offset}"
        if app.dlq is not None:
            self._side(self._dead_letter, t, msg, error, deliveries)
        elif app.on_exhausted == "skip":
            log.error(
                "giving up on %s after %d attempts (on_exhausted='skip'): %r",
                where,
                deliveries,
                error,
            )
            self.metrics.counters["skipped"] += 1
            self.done.append(t)
        else:
            self.blocked[(t.partition, t.offset)] = {
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "key": msg.key,
                "attempts": deliveries,
                "error": repr(error),
            }
            log.error(
                "%s failed %d times; its key stays blocked and it is retried every %.1fs "
                "(on_exhausted='block'; set dlq= or on_exhausted='skip' to move on): %r",
                where,
                deliveries,
                app.retry.backoff_max,
                error,
            )
            self.metrics.counters["retried"] += 1
            self._side(self._retry_later, t, app.retry.backoff_max)

    def _side(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self.side is not None
        self.side.start_soon(fn, *args)

    async def _retry_later(self, t: Ticket, delay: float) -> None:
        with trio.CancelScope() as scope:
            self.retrying[t] = scope
            try:
                await trio.sleep(delay)
            finally:
                del self.retrying[t]
        self.d.retry(t)
        if t.partition in self.draining:
            # Its partition is being given up: leave it to the next owner.
            self.d.drop_queued([t.partition])
            self.progress.unpark_all()
        self._wake(1)

    async def _dead_letter(
        self, t: Ticket, msg: Message, error: Exception, deliveries: int
    ) -> None:
        app = self.app
        assert app.dlq is not None
        record = DeadLetter.of(msg, error, deliveries, app.group).encode()
        delay = app.retry.backoff_base or 0.1
        while True:
            try:
                app.broker.produce(app.dlq, msg.key, record, {"keylane-dlq": "1"})
                await app.broker.flush()
                break
            except Exception as e:
                # Never drop it: the key stays blocked until the dead letter
                # is written.
                log.error(
                    "cannot write %s/%d@%d to %s: %r",
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    app.dlq,
                    e,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, app.retry.backoff_max)
        log.error(
            "dead-lettered %s/%d@%d to %s after %d attempts: %r",
            msg.topic,
            msg.partition,
            msg.offset,
            app.dlq,
            deliveries,
            error,
        )
        self.metrics.counters["dead_lettered"] += 1
        self.done.append(t)
        self._flush()
