"""Every broker call the runtime makes: bounded, and retried when the broker
says it may succeed next time (see "Bounds, retries and backpressure" in
docs/design.md)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from keylane.errors import BrokerError, BrokerTimeout, NotAssigned
from keylane.metrics import Metrics

log = logging.getLogger("keylane")

# Backoff between retries of a retriable broker error.
_RETRY_FIRST, _RETRY_MAX = 0.1, 5.0


class BrokerCalls:
    def __init__(self, group: str, timeout: float, metrics: Metrics) -> None:
        self.group = group
        self.timeout = timeout
        self.metrics = metrics

    async def call(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``fn(*args)`` bounded by the timeout (plus a fetch's own wait,
        its second argument); a call past its bound is a retriable
        ``BrokerTimeout``."""
        bound = self.timeout + (args[1] if what == "fetch" else 0.0)
        try:
            with trio.fail_after(bound):
                return await fn(*args)
        except trio.TooSlowError:
            raise BrokerTimeout(
                f"group {self.group}: {what} did not finish within {bound:.1f}s"
            ) from None

    async def retrying(
        self,
        what: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        give_up_after: float | None = None,
    ) -> Any:
        """``call``, retrying retriable broker errors with a doubling
        backoff; gives up (re-raises) after ``give_up_after`` seconds, or
        never. ``NotAssigned`` and fatal errors are raised at once."""
        start = trio.current_time()
        delay = _RETRY_FIRST
        while True:
            try:
                return await self.call(what, fn, *args)
            except NotAssigned:  # noqa: PERF203
                raise
            except BrokerError as e:
                waited = trio.current_time() - start
                if not e.retriable or (give_up_after is not None and waited >= give_up_after):
                    raise
                self.metrics.counters["broker_retries"] += 1
                log.warning(
                    "group %s: %s failed (%s); retrying in %.1fs", self.group, what, e, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
