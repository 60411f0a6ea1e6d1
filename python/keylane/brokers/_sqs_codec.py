"""How a keylane record travels as an SQS FIFO message, and back.

- ``MessageGroupId`` is the key: the key itself when it is 1-128 printable
  ASCII characters without spaces (what SQS accepts), else ``keylane.h.`` and
  a BLAKE2b digest of it (two keys sharing a group would only be serialized
  together, never reordered). A key-less record gets a group of its own:
  key-less records have no order, as on every broker.
- The body is the value when it is non-empty text SQS accepts (UTF-8 without
  the control characters XML forbids), else its base64.
- Key, headers and how the body is encoded travel in one binary message
  attribute, ``keylane`` (msgpack), so SQS's limit of 10 attributes per
  message never limits headers.
- Messages from other producers (no ``keylane`` attribute) are read as:
  key = the group id, value = the body, headers = the message attributes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgpack

from keylane.errors import InvalidArgument
from keylane.message import Message, UndecodableRecord, delivered

ATTRIBUTE = "keylane"
_VERSION = 1
# Body encodings.
_TEXT, _BASE64, _EMPTY = "t", "b", "e"
_GROUP_OK = re.compile(rb"[!-~]{1,128}")
# What SQS accepts in a body (XML 1.0 characters).
_BODY_BAD = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# The classic SQS limit on a message (body plus attributes); AWS raised it
# to 1 MiB in 2025, ElasticMQ does not check it at all.
DEFAULT_MAX_BYTES = 262_144


def group_id(key: bytes | None) -> str:
    if key is None:
        return f"keylane.none.{uuid.uuid4().hex}"
    if _GROUP_OK.fullmatch(key):
        return key.decode("ascii")
    return "keylane.h." + hashlib.blake2b(key, digest_size=32).hexdigest()


def encode(
    key: bytes | None, value: bytes, headers: Mapping[str, bytes], max_bytes: int
) -> tuple[str, str, dict[str, Any]]:
    """(group id, body, message attributes) of one record; refuses one
    larger than ``max_bytes`` as SQS counts size."""
    body, how = _body(value)
    envelope = msgpack.packb([_VERSION, key, dict(headers), how], use_bin_type=True)
    attributes = {ATTRIBUTE: {"DataType": "Binary", "BinaryValue": envelope}}
    size = len(body.encode("utf-8")) + len(ATTRIBUTE) + len("Binary") + len(envelope)
    if size > max_bytes:
        raise InvalidArgument(
            f"message of {size:,} bytes (body {len(value):,} bytes before encoding, "
            f"key and headers) is larger than SQS allows ({max_bytes:,} bytes; "
            "the broker's config['max_message_bytes'])"
        )
    return group_id(key), body, attributes


def _body(value: bytes) -> tuple[str, str]:
    if not value:
        return "-", _EMPTY
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(value).decode("ascii"), _BASE64
    if _BODY_BAD.search(text):
        return base64.b64encode(value).decode("ascii"), _BASE64
    return text, _TEXT


def decode(raw: Mapping[str, Any], topic: str, offset: int) -> Message:
    """The Message of one received SQS message (``UndecodableRecord`` where
    its keylane attribute is damaged)."""
    system = raw.get("Attributes", {})
    body: str = raw.get("Body", "")
    timestamp = int(system.get("SentTimestamp", "0")) / 1000.0
    group = system.get("MessageGroupId", "")
    attributes: Mapping[str, Any] = raw.get("MessageAttributes", {})
    envelope = attributes.get(ATTRIBUTE)
    if envelope is None:
        # A message from another producer.
        return delivered(
            topic, 0, offset, group.encode(), body.encode(), _foreign_headers(attributes), timestamp
        )
    try:
        version, key, headers, how = msgpack.unpackb(envelope["BinaryValue"], raw=False)
        if version != _VERSION:
            raise ValueError(f"envelope version {version}")
        if not (key is None or isinstance(key, bytes)) or not isinstance(headers, dict):
            raise ValueError("key or headers of the wrong type")
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers.items()):
            raise ValueError("a header is not str -> bytes")
        if how == _TEXT:
            value = body.encode("utf-8")
        elif how == _BASE64:
            value = base64.b64decode(body, validate=True)
        elif how == _EMPTY:
            value = b""
        else:
            raise ValueError(f"body encoding {how!r}")
    except (ValueError, TypeError, KeyError, binascii.Error, msgpack.UnpackException) as e:
        plain = delivered(topic, 0, offset, group.encode(), body.encode(), {}, timestamp)
        return UndecodableRecord.of(plain, f"damaged keylane attribute: {e}")
    return delivered(topic, 0, offset, key, value, headers, timestamp)


def _foreign_headers(attributes: Mapping[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, a in attributes.items():
        if "BinaryValue" in a:
            out[name] = bytes(a["BinaryValue"])
        else:
            out[name] = str(a.get("StringValue", "")).encode("utf-8")
    return out
