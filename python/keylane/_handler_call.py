"""Calling a handler while learning whether it suspended.

The runtime wakes as many workers as there are ready messages only if
handlers suspend (wait on I/O, sleep): then concurrency is what makes them
fast. A handler that returns without ever suspending gains nothing from a
second worker on the same thread, and every extra runnable worker is one
more step in each scheduler batch, so the event loop is held longer for the
service's other tasks. To tell the two apart at no cost, the handler's
coroutine is started by hand (in the worker loop, inlined, with
``_native.first_step``, which sends into it without the StopIteration a
finished ``send`` raises): if that first step finishes it, it never
suspended; otherwise the rest of it is driven by ``resume``, which hands
each trap to Trio and each answer back, exactly as ``await`` would.
(App.handler only accepts ``async def``, so a handler always returns a
coroutine.)
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def resume(coro: Coroutine[Any, Any, object], trap: Any) -> Generator[Any, Any, None]:
    try:
        while True:
            try:
                answer = yield trap
            except BaseException as e:  # noqa: PERF203 - must forward what is thrown in
                # Thrown in (not Trio's way of resuming, but honoured).
                trap = coro.throw(e)
            else:
                trap = coro.send(answer)
    except StopIteration:
        return
    finally:
        # Abandoned mid-way (the task itself was closed): close the handler too.
        coro.close()
