"""``keylane.message.delivered``: the adapters' fast way to build a Message."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest

from keylane._native import gc_untrack
from keylane.message import Message, delivered


def _fields() -> tuple[str, int, int, bytes, bytes, dict[str, bytes], float]:
    return ("orders", 3, 41, b"acct-7", b"payload", {"trace": b"x"}, 1700000000.5)


def test_delivered_is_the_message_the_constructor_builds() -> None:
    m = delivered(*_fields())
    expected = Message(*_fields())
    assert type(m) is Message
    assert m == expected
    assert repr(m) == repr(expected)
    assert m.attempt == 0
    assert m.header("trace") == b"x"
    assert dataclasses.replace(m, attempt=2) == Message(*_fields(), attempt=2)


def test_delivered_is_frozen() -> None:
    m = delivered(*_fields())
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.offset = 42  # type: ignore[misc]


def test_delivered_is_out_of_the_cyclic_gc_and_still_freed() -> None:
    m = delivered(*_fields())
    assert gc.is_tracked(Message(*_fields()))
    assert not gc.is_tracked(m)

    # Reference counting alone frees it (a slotted dataclass takes no weak
    # references, so watch its headers dict instead).
    class Headers(dict[str, bytes]):
        pass

    headers = Headers(trace=b"x")
    gone = weakref.ref(headers)
    m = delivered("t", 0, 0, None, b"", headers, 0.0)
    del headers
    assert gone() is not None
    del m
    assert gone() is None


def test_gc_untrack_leaves_objects_the_gc_never_tracks() -> None:
    for obj in (5, "text", b"bytes", 1.5, None):
        gc_untrack(obj)
        assert not gc.is_tracked(obj)
    items = [1, [2]]
    gc_untrack(items)
    assert not gc.is_tracked(items)
