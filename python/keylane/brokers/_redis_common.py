"""What the Redis Streams broker and its consumers share: options, key
names, stream ids as offsets, the entry format, and redis-py's errors as
keylane's."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import msgpack
import redis
import redis.exceptions

from keylane.brokers._checks import number, options_of
from keylane.errors import BrokerError, BrokerTimeout, ConfigError, InvalidArgument
from keylane.message import Message, UndecodableRecord, delivered

# A stream id "ms-seq" is the offset ms << 20 | seq: offsets keep the ids'
# order, and 2^20 entries in one millisecond is more than a server writes.
SEQ_BITS = 20
_SEQ_MASK = (1 << SEQ_BITS) - 1


@dataclasses.dataclass(frozen=True)
class Options:
    """``RedisStreamsBroker``'s ``config``, checked."""

    # Key names: streams are {prefix}{topic}:{partition}.
    prefix: str = "keylane:"
    # A member (and each partition it owns) is presumed dead this long after
    # its last renewal; renewed every third of it.
    lease_ms: int = 10_000
    # Producers re-read a topic's partition count this often (seconds).
    metadata_max_age: float = 5.0
    max_message_bytes: int = 1_048_576
    socket_timeout: float = 10.0
    connect_timeout: float = 5.0

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> Options:
        return options_of(cls, config, "RedisStreamsBroker")

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or "\n" in self.prefix:
            raise ConfigError(f"config['prefix'] must be a str, got {self.prefix!r}")
        number(self, "lease_ms", 1000, 600_000, whole=True)
        number(self, "metadata_max_age", 0, 3600)
        number(self, "max_message_bytes", 1024, 512 * 1024 * 1024, whole=True)
        number(self, "socket_timeout", 0.5, 300)
        number(self, "connect_timeout", 0.1, 300)


class Keys:
    """Every Redis key keylane uses, in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, topic: str, partition: int) -> str:
        return f"{self.prefix}{topic}:{partition}"

    def partitions(self, topic: str) -> str:
        return f"{self.prefix}{topic}:partitions"

    def members(self, group: str) -> str:
        return f"{self.prefix}group:{group}:members"

    def subscriptions(self, group: str) -> str:
        return f"{self.prefix}group:{group}:subscriptions"

    def owner(self, group: str, topic: str, partition: int) -> str:
        return f"{self.prefix}group:{group}:owner:{topic}:{partition}"

    def freed(self, group: str, topic: str, partition: int) -> str:
        return f"{self.prefix}group:{group}:freed:{topic}:{partition}"

    def metadata(self, group: str) -> str:
        return f"{self.prefix}group:{group}:metadata"


def offset_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    s = int(seq or 0)
    if s > _SEQ_MASK:
        raise BrokerError(
            f"stream id {text} has a sequence number past {_SEQ_MASK}: keylane maps ids to "
            "offsets as ms << 20 | seq (ids from XADD * never get there)"
        )
    return int(ms) << SEQ_BITS | s


def id_of(offset: int) -> str:
    return f"{offset >> SEQ_BITS}-{offset & _SEQ_MASK}"


def timestamp_of(offset: int) -> float:
    return (offset >> SEQ_BITS) / 1000.0


def encode(
    key: bytes | None, value: bytes, headers: Mapping[str, bytes], limit: int
) -> dict[bytes, bytes]:
    """An entry's fields: ``v`` the value, ``k`` the key (absent for none),
    ``h`` the headers (msgpack, absent when empty)."""
    fields = {b"v": value}
    if key is not None:
        fields[b"k"] = key
    if headers:
        fields[b"h"] = msgpack.packb(dict(headers), use_bin_type=True)
    size = sum(len(k) + len(v) for k, v in fields.items())
    if size > limit:
        raise InvalidArgument(
            f"entry of {size:,} bytes (value, key and headers) is larger than "
            f"config['max_message_bytes'] ({limit:,})"
        )
    return fields


def decode(topic: str, partition: int, stream_id: bytes, fields: Mapping[bytes, bytes]) -> Message:
    offset = offset_of(stream_id)
    key = fields.get(b"k")
    value = fields.get(b"v")
    ts = timestamp_of(offset)
    if value is None:
        plain = delivered(topic, partition, offset, key, b"", {}, ts)
        return UndecodableRecord.of(
            plain,
            f"not a keylane entry (fields {sorted(f.decode(errors='replace') for f in fields)})",
        )
    headers: dict[str, bytes] = {}
    raw = fields.get(b"h")
    if raw is not None:
        try:
            loaded = msgpack.unpackb(raw, raw=False)
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in loaded.items()
            ):
                raise ValueError("headers are not a map of str to bytes")
            headers = loaded
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            plain = delivered(topic, partition, offset, key, value, {}, ts)
            return UndecodableRecord.of(plain, f"damaged headers: {e}")
    return delivered(topic, partition, offset, key, value, headers, ts)


def broker_error(e: Exception, what: str) -> BrokerError:
    """keylane's error for a redis-py failure of ``what``."""
    if isinstance(e, BrokerError):
        return e
    if isinstance(e, redis.exceptions.TimeoutError):
        return BrokerTimeout(f"Redis {what}: {e}", code="Timeout")
    if isinstance(e, redis.exceptions.ConnectionError):
        return BrokerError(f"Redis {what}: {e}", retriable=True, code="ConnectionError")
    if isinstance(e, redis.exceptions.ResponseError):
        text = str(e)
        code = text.split(" ", 1)[0] if text else None
        # LOADING: the server is reading its data after a restart.
        retriable = code in ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN")
        return BrokerError(f"Redis {what}: {text}", retriable=retriable, code=code)
    if isinstance(e, redis.exceptions.RedisError):
        return BrokerError(f"Redis {what}: {e}", code=type(e).__name__)
    return BrokerError(f"Redis {what}: {type(e).__name__}: {e}")


def connect(url: str, o: Options) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=o.socket_timeout,
            socket_connect_timeout=o.connect_timeout,
            health_check_interval=30,
        )
    except ValueError as e:
        raise ConfigError(f"url {url!r}: {e}") from None
