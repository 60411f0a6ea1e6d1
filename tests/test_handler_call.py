"""Starting a handler's coroutine by hand: ``_native.first_step`` and
``_handler_call.resume``."""

from __future__ import annotations

import types
from collections.abc import Generator
from typing import Any

import pytest
import trio
import trio.lowlevel

from keylane import _handler_call
from keylane._native import first_step

DONE = object()


async def returns(out: list[str]) -> str:
    out.append("ran")
    return "ignored"


@types.coroutine
def trap(value: object) -> Generator[object, object, object]:
    return (yield value)


async def suspends(out: list[object]) -> None:
    out.append(await trap("the trap"))


def test_a_handler_that_returns_is_done_in_one_step() -> None:
    out: list[str] = []
    coro = returns(out)
    assert first_step(coro, DONE) is DONE
    assert out == ["ran"]
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        coro.send(None)


def test_a_handler_that_suspends_hands_back_its_trap() -> None:
    out: list[object] = []
    coro = suspends(out)
    assert first_step(coro, DONE) == "the trap"
    with pytest.raises(StopIteration):
        coro.send("the answer")
    assert out == ["the answer"]


def test_what_a_handler_raises_goes_up_with_its_traceback() -> None:
    async def fails() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom") as caught:
        first_step(fails(), DONE)
    assert caught.traceback[-1].name == "fails"
    # Not a coroutine (App.handler only takes async functions): an error.
    with pytest.raises(AttributeError):
        first_step(42, DONE)


async def test_resume_drives_a_suspending_handler_on_trio() -> None:
    out: list[Any] = []

    async def handler() -> None:
        await trio.lowlevel.checkpoint()
        out.append("after the sleep")

    coro = handler()
    step = first_step(coro, DONE)
    assert step is not DONE
    await _handler_call.resume(coro, step)
    assert out == ["after the sleep"]
