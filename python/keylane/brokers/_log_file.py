"""On-disk log of one MemoryBroker partition: framed msgpack records.

Each frame is a 4-byte big-endian length, a 4-byte CRC-32 of the payload,
and the payload: msgpack ``[offset, key, value, headers, timestamp]``. A
frame whose CRC or offset is wrong is corruption; a partial frame at the end
of the file is a truncation (a crash in mid-write). Either raises
``CorruptLogError`` naming the file and byte offset, unless the caller asked
to cut the log at its last whole record.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import msgpack

from keylane.errors import CorruptLogError
from keylane.message import Message, delivered

log = logging.getLogger("keylane.brokers.memory")

_HEADER = struct.Struct(">II")


def encode(message: Message) -> bytes:
    payload = msgpack.packb(
        [message.offset, message.key, message.value, dict(message.headers), message.timestamp],
        use_bin_type=True,
    )
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read(path: Path, topic: str, partition: int, *, truncate: bool) -> list[Message]:
    """All records of a log file, checked. With ``truncate``, a damaged or
    partial tail is cut off (and logged) instead of raising."""
    data = path.read_bytes()
    records: list[Message] = []
    pos = 0
    while pos < len(data):
        problem = None
        if pos + _HEADER.size > len(data):
            problem = "truncated frame header"
        else:
            length, crc = _HEADER.unpack_from(data, pos)
            start, end = pos + _HEADER.size, pos + _HEADER.size + length
            if end > len(data):
                problem = f"truncated record ({len(data) - start} of {length} bytes)"
            elif zlib.crc32(data[start:end]) != crc:
                problem = "checksum mismatch"
            else:
                try:
                    offset, key, value, headers, ts = msgpack.unpackb(data[start:end], raw=False)
                except (ValueError, TypeError, msgpack.UnpackException) as e:
                    problem = f"undecodable record ({e})"
                else:
                    if offset != len(records):
                        problem = f"record has offset {offset}, expected {len(records)}"
                    else:
                        records.append(delivered(topic, partition, offset, key, value, headers, ts))
                        pos = end
                        continue
        if not truncate:
            raise CorruptLogError(
                f"{path}: {problem} at byte {pos} after {len(records)} good records; nothing "
                "was dropped. Reopen with recover='truncate' to cut the log there, or move the "
                "file away."
            )
        log.warning(
            "cutting %s at byte %d (%s): %d bytes after %d good records dropped",
            path,
            pos,
            problem,
            len(data) - pos,
            len(records),
        )
        with path.open("r+b") as f:
            f.truncate(pos)
        break
    return records


class Appender:
    """Appends frames to one log file (buffered; ``sync`` flushes to disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = path.open("ab")

    def append(self, frame: bytes) -> None:
        self._file.write(frame)

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
