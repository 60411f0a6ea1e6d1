"""One run of an App: the tasks that feed, work, commit and shut down.

Shape of a run (all tasks in one Trio nursery tree):

- the **feeder** (the run's own task) joins the group, fetches batches and
  pushes them into the native ``Dispatcher``, waiting when it is full; it
  also handles rebalances (drain, commit, release): ``feed.py``,
  ``rebalance.py``;
- ``concurrency`` **workers** take ready tickets in batches, run the
  handler, and hand completions back in batches: ``work.py``;
- the **committer** commits ``committable()`` every ``commit_interval``
  (after flushing recorded versions): ``commit.py``;
- **side tasks** wait out retry backoffs and write dead letters, so a
  failing message never holds a worker: ``failures.py``.

Nothing here is per-message Trio machinery: workers park only when nothing
is ready, and handlers that never suspend run back to back. The event loop
is shared with the service, so no runtime task runs longer than a slice
(0.5 ms) without a checkpoint, and while handlers do not suspend only one
worker stays runnable (more would only lengthen every scheduler batch); as
soon as a handler suspends, workers are woken for every ready message.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import trio

from keylane._guard import Guard
from keylane._runtime.commit import Committing
from keylane._runtime.failures import Failures
from keylane._runtime.feed import Feeding
from keylane._runtime.rebalance import Rebalancing
from keylane._runtime.work import Working
from keylane.errors import BrokerError, BrokerTimeout, NotAssigned

log = logging.getLogger("keylane")

# The final commit of a forced stop or a cancelled run gets this long.
_LAST_COMMIT_TIMEOUT = 2.0


class Run(Feeding, Rebalancing, Working, Failures, Committing):
    """One run: the state (``state.py``) and the parts acting on it, one
    file each; this file starts them and shuts them down."""

    # ---- control (called from App) ---------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop fetching, let running handlers finish (up to
        ``shutdown_timeout``), commit, leave."""
        if self.stopping:
            return
        log.info(
            "group %s: stopping (graceful, up to %.1fs)", self.app.group, self.app.shutdown_timeout
        )
        self.stopping = True
        self.feed_scope.cancel()
        self.space.unpark_all()

    def force(self) -> None:
        """Now: cancel running handlers, commit what is done, leave."""
        log.warning("group %s: forced stop; cancelling running handlers", self.app.group)
        self.forced = True
        self.stop()
        self.work_scope.cancel()

    def abort(self) -> None:
        """As if the process died: no final commit, and the member does not
        leave the group (its partitions move after the session timeout)."""
        self.aborted = True
        self.stopping = True
        self.feed_scope.cancel()
        self.work_scope.cancel()

    # ---- the run -------------------------------------------------------------------------

    async def main(self, task_status: trio.TaskStatus[None], *, handle_signals: bool) -> None:
        app = self.app
        if app._versions_table is not None:
            self.guard = Guard(
                app._versions_table,
                app._version_of,
                app._id_of,
                app._dedupe_ttl,
                # One message of a key out at a time: a batch's verdicts can
                # be given when its reads are in (not so by partition, where
                # a key may be out in two partitions at once).
                one_per_key=app.ordering in ("key", "total"),
            )
        detach = (
            app._metrics_sink.attach(self.metrics, app.group)
            if app._metrics_sink is not None
            else None
        )
        self.metrics.gauges = self.gauges
        try:
            async with trio.open_nursery() as top:
                self.side = top
                if handle_signals and threading.current_thread() is threading.main_thread():
                    await top.start(self._signals)
                await top.start(self._join)
                # The committer has a nursery of its own, left (and so fully
                # stopped, even mid-flush in a thread) before the final commit.
                async with trio.open_nursery() as background:
                    background.start_soon(self._committer)
                    if self.acks is not None:
                        background.start_soon(self._acker)
                    if self.rp is not None:
                        background.start_soon(self.rp.watch)
                    with self.work_scope:
                        async with trio.open_nursery() as workers:
                            for _ in range(app.concurrency):
                                workers.start_soon(self._worker)
                            task_status.started()
                            with self.feed_scope:
                                await self._feed()
                            # Fetching is over: running handlers may finish,
                            # nothing new starts.
                            self.closing = True
                            self.work.unpark_all()
                            if not self.until_idle:
                                self.work_scope.deadline = (
                                    trio.current_time() + app.shutdown_timeout
                                )
                    background.cancel_scope.cancel()
                if self.work_scope.cancelled_caught and not (self.forced or self.aborted):
                    log.warning(
                        "group %s: handlers still running after shutdown_timeout=%.1fs "
                        "were cancelled",
                        app.group,
                        app.shutdown_timeout,
                    )
                if not self.aborted:
                    await self._finish(graceful=not self.forced)
                top.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside, or a failure: still leave cleanly
            # unless this is a simulated crash.
            if not self.aborted and not self.finished:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(_LAST_COMMIT_TIMEOUT):
                        await self._finish(graceful=False)
            raise
        finally:
            if detach is not None:
                detach()

    async def _join(self, task_status: trio.TaskStatus[None]) -> None:
        await self.calls.retrying("join", self.consumer.join, give_up_after=self.app.broker_timeout)
        self.joined = True
        task_status.started()

    async def _finish(self, *, graceful: bool) -> None:
        self.finished = True
        if not self.joined:
            return
        try:
            # Retried within the bound: a commit the broker refused once
            # (retriable) would otherwise leave handled work to redo.
            with trio.fail_after(self.app.shutdown_timeout if graceful else _LAST_COMMIT_TIMEOUT):
                await self._commit(give_up_after=None)
        except (trio.TooSlowError, BrokerTimeout):
            log.error(
                "group %s: final commit timed out; uncommitted messages will be redelivered",
                self.app.group,
            )
        except NotAssigned as e:
            log.warning("group %s: final commit refused: %s", self.app.group, e)
        except BrokerError as e:
            log.error(
                "group %s: final commit failed (%s); uncommitted messages will be redelivered",
                self.app.group,
                e,
            )
        finally:
            try:
                await self.calls.call("close", self.consumer.close)
            except BrokerError as e:
                log.warning("group %s: leaving the group failed: %s", self.app.group, e)
        log.info("group %s: stopped; %s", self.app.group, self.metrics.counters)

    async def _signals(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                if not self.stopping:
                    log.info("group %s: %s received", self.app.group, signal.Signals(signum).name)
                    self.stop()
                else:
                    self.force()

    # ---- observing ------------------------------------------------------------------------

    def gauges(self) -> dict[str, Any]:
        marks = self.d.committable()
        lag = {}
        for tp in self.owned:
            end = self.ends.get(tp)
            tpid = self.tp_ids[tp]
            if end is not None:
                lag[f"{tp.topic}/{tp.partition}"] = max(
                    0, end - marks.get(tpid, self.committed.get(tpid, end))
                )
        return {
            "in_flight": self.d.in_flight,
            "queued": self.d.queued,
            "running": self.running,
            "partitions": len(self.owned),
            "member": self.consumer.member_id,
            "lag": lag,
            "blocked": [dict(b) for b in self._blocked_report()],
        }
