"""The SQS FIFO wire form (no server needed): group ids, bodies, headers,
messages of other producers, damaged attributes, the size limit."""

from __future__ import annotations

import base64

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keylane
from keylane.brokers._sqs_codec import ATTRIBUTE, decode, encode, group_id
from keylane.message import UndecodableRecord

LIMIT = 262_144


def wire(key: bytes | None, value: bytes, headers: dict[str, bytes]) -> dict[str, object]:
    """What a receive returns for a message keylane sent."""
    group, body, attributes = encode(key, value, headers, LIMIT)
    return {
        "Body": body,
        "Attributes": {"SentTimestamp": "1796322211571", "MessageGroupId": group},
        "MessageAttributes": attributes,
    }


@given(
    key=st.none() | st.binary(max_size=200),
    value=st.binary(max_size=300) | st.text(max_size=100).map(str.encode),
    headers=st.dictionaries(st.text(max_size=10), st.binary(max_size=20), max_size=12),
)
def test_every_record_round_trips(
    key: bytes | None, value: bytes, headers: dict[str, bytes]
) -> None:
    m = decode(wire(key, value, headers), "q.fifo", 7)
    assert not isinstance(m, UndecodableRecord)
    assert (m.topic, m.partition, m.offset) == ("q.fifo", 0, 7)
    assert (m.key, m.value, dict(m.headers)) == (key, value, headers)
    assert m.timestamp == pytest.approx(1796322211.571)


def test_group_ids_are_the_key_where_sqs_allows_it() -> None:
    assert group_id(b"account-42") == "account-42"
    assert group_id(b"x" * 128) == "x" * 128
    for odd in (b"x" * 129, b"with space", b"\xff", "é".encode(), b""):
        g = group_id(odd)
        assert g.startswith("keylane.h.")
        assert len(g) <= 128
        assert g == group_id(odd)  # stable: the same key, the same group
    assert group_id(b"a b") != group_id(b"a  b")
    # Key-less records get a group each: no order among them.
    assert group_id(None) != group_id(None)


def test_bodies_are_text_when_sqs_accepts_it_else_base64() -> None:
    assert wire(b"k", b"hello", {})["Body"] == "hello"
    assert wire(b"k", b"\x00\x01", {})["Body"] == base64.b64encode(b"\x00\x01").decode()
    assert wire(b"k", b"\xff", {})["Body"] == base64.b64encode(b"\xff").decode()
    assert wire(b"k", b"", {})["Body"] == "-"


def test_messages_of_other_producers_are_read_plainly() -> None:
    raw = {
        "Body": "plain text",
        "Attributes": {"SentTimestamp": "1000", "MessageGroupId": "acct-1"},
        "MessageAttributes": {
            "trace": {"DataType": "String", "StringValue": "abc"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x01"},
            "n": {"DataType": "Number", "StringValue": "12"},
        },
    }
    m = decode(raw, "q.fifo", 0)
    assert (m.key, m.value, m.timestamp) == (b"acct-1", b"plain text", 1.0)
    assert m.headers == {"trace": b"abc", "blob": b"\x01", "n": b"12"}


@pytest.mark.parametrize(
    "envelope",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([2, b"k", {}, "t"]),  # a future version
        msgpack.packb([1, "str key", {}, "t"]),
        msgpack.packb([1, b"k", {"h": "not bytes"}, "t"]),
        msgpack.packb([1, b"k", {}, "z"]),
        msgpack.packb([1, b"k", {}, "b"]),  # body is not base64
    ],
)
def test_a_damaged_keylane_attribute_makes_an_undecodable_record(envelope: bytes) -> None:
    raw = {
        "Body": "not base64!",
        "Attributes": {"SentTimestamp": "1000", "MessageGroupId": "g"},
        "MessageAttributes": {ATTRIBUTE: {"DataType": "Binary", "BinaryValue": envelope}},
    }
    m = decode(raw, "q.fifo", 3)
    assert isinstance(m, UndecodableRecord)
    assert "damaged keylane attribute" in m.problem
    assert (m.offset, m.key) == (3, b"g")


def test_a_message_over_the_limit_is_refused_with_its_size() -> None:
    encode(b"k", b"x" * 200_000, {}, LIMIT)
    with pytest.raises(keylane.InvalidArgument, match=r"larger than SQS allows \(262,144"):
        encode(b"k", b"x" * 262_000, {"h": b"y" * 1000}, LIMIT)
    # Binary values grow by a third in base64, and count so.
    with pytest.raises(keylane.InvalidArgument):
        encode(b"k", b"\xff" * 200_000, {}, LIMIT)
