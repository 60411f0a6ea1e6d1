"""A persisted MemoryBroker's directory: what is written when, and what is
checked when it is opened again.

Layout: ``topics.msgpack`` (topic -> partition count), ``log/<topic>-<p>.log``
(framed records, see ``_log_file``), ``ends.msgpack`` (topic -> per partition
the record count known to be written) and ``groups.msgpack`` (group ->
committed offsets). Small files are replaced atomically (write, rename).

Write order is the durability rule: a commit first writes the logs out,
then records their ends, then the offsets. So after a crash at any moment a
committed offset is never past what is on disk, and a log shorter than its
recorded end was damaged afterwards (cut at a frame boundary, say), which
opening reports instead of silently serving fewer records. With
``fsync=True`` each step is fsynced (power loss); without, the steps reach
the OS (a killed process loses nothing written).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import msgpack

from keylane.brokers import _log_file
from keylane.brokers.base import TopicPartition
from keylane.errors import CorruptLogError
from keylane.message import Message

log = logging.getLogger("keylane.brokers.memory")

# Kafka's rule for topic names; it also keeps them safe as file names (no
# separator), which is checked again on load: names read back from disk are
# as untrusted as names given to produce.
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# More partitions than any Kafka topic has is damage, not a topic.
_MAX_PARTITIONS = 1 << 20

Logs = dict[str, list[list[Message]]]
Offsets = dict[str, dict[TopicPartition, int]]


class MemoryStore:
    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self.dir = directory
        self.fsync = fsync
        self._appenders: dict[TopicPartition, _log_file.Appender] = {}
        (directory / "log").mkdir(parents=True, exist_ok=True)

    # ---- writing ------------------------------------------------------------------------

    def append(self, tp: TopicPartition, frame: bytes) -> None:
        appender = self._appenders.get(tp)
        if appender is None:
            appender = _log_file.Appender(self._log_path(tp.topic, tp.partition))
            self._appenders[tp] = appender
        appender.append(frame)

    def write_logs(self, ends: dict[str, list[int]]) -> None:
        """Writes every log out (fsynced with ``fsync``), then records
        ``ends`` as the record counts now on disk."""
        for appender in self._appenders.values():
            if self.fsync:
                appender.sync()
            else:
                appender.flush()
        self._replace("ends.msgpack", msgpack.packb(ends))

    def write_topics(self, topics: dict[str, int]) -> None:
        self._replace("topics.msgpack", msgpack.packb(topics))

    def write_offsets(self, groups: Offsets) -> None:
        data = {
            name: [[tp.topic, tp.partition, off] for tp, off in committed.items()]
            for name, committed in groups.items()
        }
        self._replace("groups.msgpack", msgpack.packb(data))

    def close(self) -> None:
        for appender in self._appenders.values():
            appender.close()
        self._appenders.clear()

    def _replace(self, name: str, data: bytes) -> None:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _log_path(self, topic: str, partition: int) -> Path:
        return self.dir / "log" / f"{topic}-{partition}.log"

    # ---- reading ------------------------------------------------------------------------

    def load(self, *, truncate: bool) -> tuple[Logs, Offsets]:
        """The logs and committed offsets, checked. A damaged file raises
        ``CorruptLogError``; with ``truncate`` what can be cut back to a
        consistent state is (and logged), what cannot still raises."""
        logs: Logs = {}
        for topic, n in self._read_topics().items():
            logs[topic] = [
                _log_file.read(path, topic, p, truncate=truncate)
                if (path := self._log_path(topic, p)).exists()
                else []
                for p in range(n)
            ]
        self._check_ends(logs, truncate=truncate)
        return logs, self._read_offsets(logs, truncate=truncate)

    def _read_topics(self) -> dict[str, int]:
        path = self.dir / "topics.msgpack"
        if not path.exists():
            return {}
        topics = _unpack(path)
        if not isinstance(topics, dict):
            raise _damaged(path, "not a map of topics")
        for topic, n in topics.items():
            if not isinstance(topic, str) or not TOPIC_NAME.fullmatch(topic):
                raise _damaged(path, f"invalid topic name {topic!r:.80}")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_PARTITIONS:
                raise _damaged(path, f"topic {topic!r} has {n!r:.40} partitions")
        return topics

    def _check_ends(self, logs: Logs, *, truncate: bool) -> None:
        path = self.dir / "ends.msgpack"
        if not path.exists():
            return
        ends = _unpack(path)
        if not isinstance(ends, dict):
            raise _damaged(path, "not a map of topics")
        for topic, counts in ends.items():
            parts = logs.get(topic)
            if parts is None or not isinstance(counts, list):
                raise _damaged(path, f"unknown topic {topic!r:.80}")
            for p, written in enumerate(counts[: len(parts)]):
                have = len(parts[p])
                if isinstance(written, bool) or not isinstance(written, int):
                    raise _damaged(path, f"{topic}/{p} has end {written!r:.40}")
                if have >= written:
                    continue
                where = self._log_path(topic, p)
                if not truncate:
                    raise CorruptLogError(
                        f"{where} holds {have} records but {written} were written to it: "
                        f"offsets {have}..{written - 1} are missing (the file was cut or "
                        "replaced). Reopen with recover='truncate' to accept the loss."
                    )
                log.warning(
                    "%s holds %d records but %d were written; accepting the loss of "
                    "offsets %d..%d (recover='truncate')",
                    where,
                    have,
                    written,
                    have,
                    written - 1,
                )

    def _read_offsets(self, logs: Logs, *, truncate: bool) -> Offsets:
        path = self.dir / "groups.msgpack"
        if not path.exists():
            return {}
        data = _unpack(path)
        if not isinstance(data, dict):
            raise _damaged(path, "not a map of groups")
        groups: Offsets = {}
        for name, rows in data.items():
            if not isinstance(name, str) or not isinstance(rows, list):
                raise _damaged(path, f"group {name!r:.80}")
            committed = groups.setdefault(name, {})
            for row in rows:
                if not (isinstance(row, list) and len(row) == 3):
                    raise _damaged(path, f"group {name!r}: row {row!r:.80}")
                topic, partition, offset = row
                parts = logs.get(topic) if isinstance(topic, str) else None
                if (
                    parts is None
                    or isinstance(partition, bool)
                    or not isinstance(partition, int)
                    or not 0 <= partition < len(parts)
                    or isinstance(offset, bool)
                    or not isinstance(offset, int)
                    or offset < 0
                ):
                    raise _damaged(path, f"group {name!r}: row {row!r:.80}")
                end = len(parts[partition])
                if offset > end:
                    if not truncate:
                        raise CorruptLogError(
                            f"group {name!r} committed offset {offset} of {topic}/{partition}, "
                            f"but its log ends at {end}: records below the commit are missing. "
                            "Reopen with recover='truncate' to move the commit back to the "
                            "log end."
                        )
                    log.warning(
                        "group %r: committed offset %d of %s/%d is past the log end %d; "
                        "moved back to %d (recover='truncate')",
                        name,
                        offset,
                        topic,
                        partition,
                        end,
                        end,
                    )
                    offset = end
                committed[TopicPartition(topic, partition)] = offset
        return groups


def _unpack(path: Path) -> Any:
    try:
        return msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise _damaged(path, str(e)) from None


def _damaged(path: Path, problem: str) -> CorruptLogError:
    return CorruptLogError(f"{path} is damaged ({problem}); nothing was loaded")
