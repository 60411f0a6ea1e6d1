"""The message a handler receives, and the rules for what producers may send."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeAlias

from keylane._native import gc_untrack
from keylane.errors import InvalidArgument, InvalidType

KeyLike: TypeAlias = bytes | bytearray | memoryview | str
ValueLike: TypeAlias = bytes | bytearray | memoryview | str
HeaderValue: TypeAlias = bytes | bytearray | memoryview | str


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One record of a topic, as delivered to a handler.

    ``attempt`` is 0 on first delivery and grows with each retry;
    ``timestamp`` is when it was produced, in seconds since the Unix epoch.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Mapping[str, bytes]
    timestamp: float
    attempt: int = 0

    def header(self, name: str, default: bytes | None = None) -> bytes | None:
        """A header's value, or ``default``."""
        return self.headers.get(name, default)


@dataclasses.dataclass(frozen=True, slots=True)
class UndecodableRecord(Message):
    """A record an adapter could not turn into a ``Message`` faithfully (a
    header name that is not UTF-8...). It keeps what could be read; the
    runtime never hands it to a handler but treats it as a message that
    failed for good (dead-lettered, skipped or blocked per ``on_exhausted``)."""

    problem: str = ""

    @classmethod
    def of(cls, message: Message, problem: str) -> UndecodableRecord:
        """``message`` (what could be read of the record), marked undecodable."""
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(Message)}
        return cls(**fields, problem=problem)


# A twin of Message without the frozen guard, whose generated __init__ sets
# slots directly instead of through object.__setattr__ once per field (3x
# slower: measured 1.2 against 0.36 µs a message). Adapters build one
# Message per record, so ``delivered`` builds the twin and turns it into a
# Message: same slots, same layout, so the class can be swapped.
_Unguarded = dataclasses.make_dataclass(
    "_Unguarded", [f.name for f in dataclasses.fields(Message)], slots=True
)


def delivered(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    headers: Mapping[str, bytes],
    timestamp: float,
) -> Message:
    """A first delivery (``attempt`` 0) of a record, as ``Message(...)``
    would build it, faster, and out of the cyclic GC's sight.

    Up to ``capacity`` messages are alive at once; tracked, every full
    collection walked them all (87-114 ms each, a fifth of a Kafka run). A
    delivered message refers to str, int, float, bytes and a mapping of str
    to bytes built by the adapter: it cannot be in a cycle, so reference
    counting frees it."""
    m = _Unguarded(topic, partition, offset, key, value, headers, timestamp, 0)
    m.__class__ = Message
    gc_untrack(m)
    return m  # type: ignore[no-any-return]


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"{what} str cannot be encoded as UTF-8 ({e})") from None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidType(
        f"{what} must be bytes, bytearray, memoryview or str, not {type(value).__name__}"
    )


def encode_key(key: object) -> bytes | None:
    """A produce key as bytes (str is UTF-8), or None for a key-less record."""
    return None if key is None else _as_bytes(key, "key")


def encode_value(value: object) -> bytes:
    """A produce value as bytes (str is UTF-8). None is refused: a record
    always has a value, possibly empty."""
    if value is None:
        raise InvalidType("value must be bytes or str (use b'' for an empty value), not None")
    return _as_bytes(value, "value")


def encode_headers(headers: Mapping[str, HeaderValue] | None) -> dict[str, bytes]:
    """Headers as ``dict[str, bytes]``; str values are UTF-8 encoded."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidType(
            f"headers must be a mapping of str to bytes/str, not {type(headers).__name__}"
        )
    out: dict[str, bytes] = {}
    for name, value in headers.items():
        if not isinstance(name, str):
            raise InvalidType(f"header names must be str, not {type(name).__name__}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"header name {name!r} is not valid text ({e})") from None
        out[name] = _as_bytes(value, f"header {name!r}")
    return out
