"""Running an App inside a program that is not Trio: asyncio services
(FastAPI, aiohttp, Django async) and plain threaded code.

``app.start_in_thread()`` runs the App on a Trio loop of its own in a
dedicated thread and returns an ``AppThread`` to stop, wait for and observe
it from any thread. Handlers are Trio ``async def`` functions; a handler
written for asyncio (using the service's connection pools, which belong to
its loop) is wrapped with ``on_asyncio_loop``: each message's coroutine
runs on that loop, and the App waits for it without holding a thread.
Why a thread and not Trio's guest mode: docs/design.md, "Embedding".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

from keylane.errors import ConfigError, InvalidType
from keylane.message import Message

if TYPE_CHECKING:
    from keylane.app import App

__all__ = ["AppThread", "on_asyncio_loop"]


class AppThread:
    """An App running in a thread of its own (see ``App.start_in_thread``)."""

    def __init__(self, app: App, *, until_idle: bool, name: str) -> None:
        self.app = app
        self._until_idle = until_idle
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        # Set once the App consumes; before that, stop() cancels the start.
        self._consuming = False
        self._abandoned = False
        self._starting: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _start(self, timeout: float) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            # Given up: the App must not go on starting (and consume) behind
            # the caller's back.
            self.stop()
            raise TimeoutError(f"the App did not start consuming within {timeout:.0f}s")
        if self._error is not None and not self._consuming:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:  # handed to join()
            self._error = _sole(e)
        finally:
            self._started.set()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._starting = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            if self._abandoned:  # stopped before the loop even ran
                nursery.cancel_scope.cancel()
            await nursery.start(
                functools.partial(self.app.run, until_idle=self._until_idle, handle_signals=False)
            )
            self._consuming = True
            if self._abandoned:  # stopped while it was starting
                self.app.stop()
            self._started.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, force: bool = False) -> None:
        """Asks the App to stop (gracefully, or at once with ``force``);
        returns without waiting: ``join`` waits. Safe from any thread."""
        if not self._consuming:
            self._abandoned = True
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._stop_here, force)

    def _stop_here(self, force: bool) -> None:
        if not self._consuming and self._starting is not None:
            self._starting.cancel()
            return
        run = self.app._run
        if force and run is not None:
            run.force()
        else:
            self.app.stop()

    def join(self, timeout: float | None = None) -> None:
        """Waits until the App's run is over and re-raises what ended it, if
        it was an error. Raises ``TimeoutError`` if it still runs after
        ``timeout`` seconds."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the App is still running after {timeout}s")
        if self._error is not None:
            raise self._error

    async def wait(self) -> None:
        """``join`` for asyncio code: awaits the end of the run without
        blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.join)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(*args)`` on the App's thread and returns its result:
        for what must happen there, such as producing into a MemoryBroker
        (which is not thread-safe) from asyncio code. Blocks until done;
        from an event loop use ``await asyncio.to_thread(t.call, ...)``."""
        token = self._token
        if token is None or not self._thread.is_alive():
            raise ConfigError("the App's thread is not running")
        return trio.from_thread.run_sync(fn, *args, trio_token=token)

    def stats(self) -> dict[str, Any]:
        """``App.stats()``, read on the App's own thread while it runs."""
        token = self._token
        if token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                return trio.from_thread.run_sync(self.app.stats, trio_token=token)
        return self.app.stats()


def on_asyncio_loop(
    handler: Callable[[Message], Awaitable[None]],
    loop: asyncio.AbstractEventLoop | None = None,
) -> Callable[[Message], Awaitable[None]]:
    """Wraps an asyncio handler for an App started with ``start_in_thread``:
    each message's coroutine is run on ``loop`` (default: the loop running
    where this is called), and the App's Trio task waits for it without a
    thread of its own. An exception it raises is the handler's failure
    (retried, dead-lettered); cancelling the App cancels the asyncio task.
    """
    if not asyncio.iscoroutinefunction(handler) and not (
        callable(handler) and asyncio.iscoroutinefunction(type(handler).__call__)
    ):
        name = getattr(handler, "__name__", repr(handler))
        raise InvalidType(f"on_asyncio_loop needs an async def handler, got {name}")
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "on_asyncio_loop(handler) outside a running asyncio loop: pass loop="
            ) from None
    target = loop

    async def run_there(msg: Message) -> None:
        coro = cast("Coroutine[Any, Any, None]", handler(msg))
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(coro, target)
        await _wait_for(future)

    run_there.__name__ = getattr(handler, "__name__", "handler")
    return run_there


async def _wait_for(future: concurrent.futures.Future[None]) -> None:
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()  # cancels the asyncio task on its loop
        raise
    future.result()


def _sole(error: BaseException) -> BaseException:
    """The one error inside nested single-error groups (the nursery's
    wrapping says nothing to the caller), else the error itself."""
    inner = error
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner
