"""A consumer group of several ``App`` members in one Trio run, each with a
handler that records into one shared ``Ledger``: the lab's way of running
the real runtime (fetching, dispatching, rebalancing, committing) at scale
while seeing every key's order across members."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from keylane.app import App
from keylane.brokers.base import Broker
from keylane.lab.ledger import VALUE, Ledger
from keylane.message import Message
from keylane.metrics import Histogram


async def poll_until(done: Callable[[], bool], *, limit: float, what: str) -> None:
    """Waits until ``done()``, looking every 20 ms; ``TimeoutError`` past
    ``limit`` seconds. For states no event announces (a broker's committed
    offsets, an App's counters)."""
    with trio.move_on_after(limit) as scope:
        while not done():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.02)
    if scope.cancelled_caught:
        raise TimeoutError(f"{what} did not happen within {limit:.0f}s")


class Group:
    """``members`` Apps of group ``group`` on ``topic``; ``app_options`` go
    to every App. Each handler waits ``work`` seconds (drawn per message,
    suspending, so keys really run concurrently) between recording its
    start and its application."""

    def __init__(
        self,
        broker: Broker,
        topic: str,
        group: str,
        members: int,
        *,
        work: Callable[[random.Random], float],
        seed: int,
        ledger: Ledger | None = None,
        apply: Callable[[Message, int, int], Awaitable[None] | None] | None = None,
        **app_options: Any,
    ) -> None:
        self.ledger = ledger or Ledger()
        self.rng = random.Random(seed)
        self.work = work
        self.apply = apply
        self.apps = [
            App(broker, topics=[topic], group=group, **app_options) for _ in range(members)
        ]
        for app in self.apps:
            app.handler(self.handle)
        self.started = 0.0

    async def handle(self, msg: Message) -> None:
        key, seq = VALUE.unpack_from(msg.value)
        ledger = self.ledger
        ledger.start(key)
        try:
            await trio.sleep(self.work(self.rng))
            if self.apply is not None:
                done = self.apply(msg, key, seq)
                if done is not None:
                    await done
            ledger.apply(key, seq)
        finally:
            ledger.end(key)

    async def start(self, nursery: trio.Nursery) -> None:
        """Starts every member; returns once all have joined."""
        self.started = time.perf_counter()
        for app in self.apps:
            await nursery.start(lambda app=app, **kw: app.run(handle_signals=False, **kw))

    async def wait_applied(self, total: int, *, limit: float) -> float:
        """Waits until ``total`` distinct messages were applied; returns
        the seconds since ``start``. Raises ``TimeoutError`` past ``limit``
        seconds (a defence that deadlocked must not hang the lab)."""
        ledger = self.ledger
        ledger.target = total
        if ledger.distinct < total:
            with trio.move_on_after(limit) as scope:
                await ledger.reached.wait()
            if scope.cancelled_caught:
                raise TimeoutError(
                    f"only {self.ledger.distinct} of {total} messages applied after {limit:.0f}s"
                )
        return time.perf_counter() - self.started

    def stop(self) -> None:
        for app in self.apps:
            app.stop()

    def counter(self, name: str) -> int:
        return sum(int(app.stats()[name]) for app in self.apps)

    def histograms(self, name: str) -> list[Histogram]:
        return [getattr(app._metrics, name) for app in self.apps]
