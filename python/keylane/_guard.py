"""The stale-version and duplicate-id checks an App runs around handlers.

Before a handler runs: a message whose version is not newer than the one
applied for its key is *stale*, one whose id was seen within the window is a
*duplicate*; both are acknowledged without calling the handler. After the
handler succeeds, its version and id are recorded, first in memory, then in
the VersionTable by ``flush`` (one transaction per batch, in a worker
thread), which the runtime calls before every offset commit. Until flushed,
the in-memory records answer the checks, so a duplicate arriving right
after its original is caught too.

At-least-once window: if the process dies after a handler returned and
before the next flush, that message's effect is applied, its version is not
recorded, and its offset is not committed: it is redelivered and handled
again. The window is at most one commit interval of messages. With
``record_versions="each"`` the version is written right after each handler
returns (in a worker thread, shielded from cancellation), which shrinks the
window to the moment between the handler's return and that write.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TypeVar

import trio

from keylane._native import VersionBatch, VersionTable
from keylane.message import Message

MAX_VERSION = 2**63 - 1
_T = TypeVar("_T")
# What the VersionTable holds: keys of 1..511 bytes, ids of 1..503 (LMDB's
# key limit; an id's entry also carries its expiry).
MAX_TABLE_KEY = 511
MAX_TABLE_ID = 503
# Keys and ids the table cannot hold as they are (empty, too long) are
# stored as this prefix + their SHA-256. Anything that already starts with
# the prefix is hashed too, so a crafted key cannot alias another key's
# digest: two keys share a table entry only if SHA-256 collides.
HASHED_PREFIX = b"\x00keylane:sha256:"
# Prefetched answers not consumed (their messages were revoked) are dropped
# past this many; a miss only means a lookup in place.
_PREFETCH_BOUND = 1 << 16
# Entries converted or walked on the Trio thread between two checkpoints.
_STEP = 2048
# Recorded versions (or ids) held in memory before an early flush is asked
# for: below the dict size (43,690) whose next resize costs ~2 ms.
_FLUSH_AT = 32_768


def table_name(raw: bytes, limit: int) -> bytes:
    """The VersionTable entry name of a message key or id (see HASHED_PREFIX)."""
    if 0 < len(raw) <= limit and not raw.startswith(HASHED_PREFIX):
        return raw
    return HASHED_PREFIX + hashlib.sha256(raw).digest()


class PoisonMessage(Exception):
    """``version_of``/``id_of`` failed on a message: retrying cannot help."""


def version_header(message: Message) -> int | None:
    """The default ``version_of``: the ``version`` header as a decimal int,
    or None when the message has no such header."""
    raw = message.headers.get("version")
    if raw is None:
        return None
    try:
        version = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"version header {raw!r} is not a decimal integer") from None
    return version


def id_header(message: Message) -> bytes | None:
    """The default ``id_of``: the ``id`` header, or None."""
    return message.headers.get("id")


class Guard:
    def __init__(
        self,
        table: VersionTable,
        version_of: Callable[[Message], int | None] | None,
        id_of: Callable[[Message], bytes | str | None] | None,
        dedupe_ttl: float | None,
    ) -> None:
        self.table = table
        self.version_of = version_of
        self.id_of = id_of
        self.dedupe_ttl = dedupe_ttl
        self.versions: dict[bytes, int] = {}
        self.flushing_versions: dict[bytes, int] = {}
        self.seen: dict[bytes, None] = {}
        self.flushing_seen: dict[bytes, None] = {}
        # What prefetch() read from the table for messages about to run:
        # table key -> stored version (None: none), id -> seen. Consumed by
        # before(); raised by flush()/record() as they write.
        self.prefetched_versions: dict[bytes, int | None] = {}
        self.prefetched_ids: dict[bytes, bool] = {}
        # The id prefetch() computed for each message (by identity, with the
        # message itself, so a reused id() can never answer): id_of runs
        # once per message.
        self.ids_of: dict[int, tuple[Message, bytes]] = {}
        self._limiter = trio.CapacityLimiter(1)
        # One flush at a time (commits and acknowledgements both flush).
        self._flush_lock = trio.Lock()
        # Set once what is recorded in memory reaches _FLUSH_AT entries: the
        # runtime flushes then, before the next commit is due, so that no
        # dict grows to where one resize rehashes 100,000s of entries in a
        # single step of the loop (7.7 ms at 174,763 entries, 16 ms at
        # 349,526 on the 2-core machine).
        self.full = trio.Event()
        self._reader = trio.CapacityLimiter(1)

    def _version(self, message: Message) -> int | None:
        # Stale checks are per key: a key-less record has no version.
        if self.version_of is None or message.key is None:
            return None
        try:
            version = self.version_of(message)
        except Exception as e:
            raise PoisonMessage(f"version_of failed: {e!r}") from e
        if version is None:
            return None
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 0 <= version <= MAX_VERSION
        ):
            raise PoisonMessage(
                f"version_of returned {version!r}; versions are ints from 0 to 2**63-1"
            )
        return version

    def _id(self, message: Message) -> bytes | None:
        if self.id_of is None:
            return None
        try:
            mid = self.id_of(message)
        except Exception as e:
            raise PoisonMessage(f"id_of failed: {e!r}") from e
        if mid is None:
            return None
        if isinstance(mid, str):
            try:
                mid = mid.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PoisonMessage(f"id_of returned a str that is not valid text: {e}") from None
        if isinstance(mid, bytes) and mid:
            return table_name(mid, MAX_TABLE_ID)
        raise PoisonMessage(f"id_of returned {mid!r:.80}; ids are non-empty bytes or str (or None)")

    async def prefetch(self, messages: Sequence[Message]) -> None:
        """Reads, in one worker-thread hop, what ``before`` will need from
        the table for ``messages``. The table's lookups wait for its lock,
        which a writer holds through a whole commit (fold and fsync
        included): asked on the Trio thread, they would hold the event loop
        for that long. What is not prefetched is still looked up in place."""
        keys: list[bytes] = []
        ids: list[bytes] = []
        # What memory knows is the newest this process applied, and it is
        # what a flush writes: it answers even once the flush has forgotten it.
        from_memory: dict[bytes, int] = {}
        for m in messages:
            if self.version_of is not None and m.key is not None:
                key = table_name(m.key, MAX_TABLE_KEY)
                known = self.versions.get(key)
                if known is None:
                    known = self.flushing_versions.get(key)
                if known is None:
                    keys.append(key)
                else:
                    from_memory[key] = known
            if self.id_of is not None:
                try:
                    mid = self._id(m)
                except PoisonMessage:
                    continue  # before() reports it
                if mid is None:
                    continue
                self.ids_of[id(m)] = (m, mid)
                if mid in self.seen or mid in self.flushing_seen:
                    self.prefetched_ids[mid] = True
                else:
                    ids.append(mid)
        for key, known in from_memory.items():
            held = self.prefetched_versions.get(key)
            if held is None or known > held:
                self.prefetched_versions[key] = known
        if not keys and not ids:
            return
        table = self.table

        def read() -> tuple[list[int | None], list[bool]]:
            return (
                table.get_many(keys) if keys else [],
                table.is_seen_many(ids) if ids else [],
            )

        try:
            versions, seen = await trio.to_thread.run_sync(read, limiter=self._reader)
        except Exception:
            # before() looks up in place, and a failure there is that
            # message's (retried, dead-lettered), never the worker's.
            return
        if len(self.prefetched_versions) > _PREFETCH_BOUND:
            self.prefetched_versions.clear()
        if len(self.prefetched_ids) > _PREFETCH_BOUND:
            self.prefetched_ids.clear()
        if len(self.ids_of) > _PREFETCH_BOUND:
            self.ids_of.clear()
        for key, version in zip(keys, versions, strict=True):
            # A flush may have written a newer one meanwhile (it raises
            # what is here, and what it wrote is in memory until then).
            known = self.prefetched_versions.get(key)
            if known is None or (version is not None and version > known):
                self.prefetched_versions[key] = version
        for mid, was_seen in zip(ids, seen, strict=True):
            self.prefetched_ids[mid] = self.prefetched_ids.get(mid, False) or was_seen

    def before(self, message: Message) -> str | None:
        """``"stale"``, ``"duplicate"``, or None (handle it)."""
        return self.check(message)[0]

    def check(self, message: Message) -> tuple[str | None, bytes | None, int | None, bytes | None]:
        """``before``'s verdict, with what ``applied`` needs once the
        handler has succeeded: the table key, the version and the id (the
        runtime's workers keep them, so ``version_of``/``id_of`` and the
        table names run once per message, not twice)."""
        known_id = self.ids_of.pop(id(message), None)
        if known_id is not None and known_id[0] is message:
            mid: bytes | None = known_id[1]
        else:
            mid = self._id(message)
        if mid is not None:
            if mid in self.seen or mid in self.flushing_seen:
                return "duplicate", None, None, None
            was_seen = self.prefetched_ids.pop(mid, None)
            if was_seen is None:
                was_seen = self.table.is_seen(mid)
            if was_seen:
                return "duplicate", None, None, None
        version = self._version(message)
        if version is None:
            return None, None, None, mid
        assert message.key is not None
        key = table_name(message.key, MAX_TABLE_KEY)
        known = self.versions.get(key)
        if known is None:
            known = self.flushing_versions.get(key)
        if known is None:
            if key in self.prefetched_versions:
                known = self.prefetched_versions.pop(key)
            else:
                known = self.table.get(key)
        if known is not None and version <= known:
            return "stale", None, None, None
        return None, key, version, mid

    def applied(self, key: bytes | None, version: int | None, mid: bytes | None) -> None:
        """Records what a successful handler applied, given what ``check``
        returned for its message (a verdict of None, so this cannot fail)."""
        if key is not None and version is not None and version > self.versions.get(key, -1):
            self.versions[key] = version
        if mid is not None:
            self.seen[mid] = None
        if len(self.versions) >= _FLUSH_AT or len(self.seen) >= _FLUSH_AT:
            self.full.set()

    async def record(self, message: Message) -> None:
        """Writes one message's version and id now (``record_versions="each"``)."""
        version = self._version(message)
        mid = self._id(message)
        key = None if message.key is None else table_name(message.key, MAX_TABLE_KEY)

        def write() -> None:
            if version is not None and key is not None:
                self.table.check_and_set(key, version)
            if mid is not None:
                self.table.mark_seen(mid, ttl_s=self.dedupe_ttl)

        await trio.to_thread.run_sync(write, limiter=self._limiter)
        await self._written(
            {key: version} if key is not None and version is not None else {},
            [mid] if mid is not None else [],
        )

    async def flush(self) -> None:
        """Writes the recorded versions and ids: converted here in small
        steps, written in one trip to a worker thread without the GIL. Raises what the table raises
        (``StoreFull``...): the runtime must not commit offsets past
        messages whose versions were not recorded."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if self.full.is_set():
            self.full = trio.Event()
        if not self.versions and not self.seen:
            return
        self.flushing_versions, self.versions = self.versions, {}
        self.flushing_seen, self.seen = self.seen, {}
        try:
            await self._write()
        except BaseException:
            # Not written: keep answering from memory and try again later.
            for key, version in self.flushing_versions.items():
                if version > self.versions.get(key, -1):
                    self.versions[key] = version
            self.seen.update(self.flushing_seen)
            raise
        else:
            try:
                await self._written(self.flushing_versions, self.flushing_seen)
            except BaseException:
                # Cancelled part way: the rest may be stale. Prefetching is
                # only a shortcut; before() reads the table without it.
                self.prefetched_versions.clear()
                self.prefetched_ids.clear()
                raise
        finally:
            self.flushing_versions, self.flushing_seen = {}, {}

    async def _written(self, versions: dict[bytes, int], ids: Collection[bytes]) -> None:
        """Raises the prefetched answers that the write just made stale.

        Walks the smaller side of each pair (prefetched versions or written
        ones, prefetched ids or written ones) with a checkpoint every
        ``_STEP`` entries: a flush can hold 100,000s of keys, and a walk of
        10,000 lookups in dicts that size took 6-8 ms on the Trio thread.
        Between steps a handler's ``before`` still answers right: the
        flush's own dicts stay in place until this returns, and they are
        asked first. A call shorter than a step (``record``) never yields.
        """
        prefetched, seen = self.prefetched_versions, self.prefetched_ids
        # Snapshots to walk: prefetch and before change the dicts meanwhile.
        keys = list(prefetched if len(prefetched) < len(versions) else versions)
        mids = list(seen if len(seen) < len(ids) else ids)
        walked = 0
        for key in keys:
            walked += 1
            if not walked % _STEP:
                await trio.lowlevel.checkpoint()
            version = versions.get(key)
            if version is None or key not in prefetched:
                continue
            known = prefetched[key]
            if known is None or version > known:
                prefetched[key] = version
        for mid in mids:
            walked += 1
            if not walked % _STEP:
                await trio.lowlevel.checkpoint()
            if mid in ids and mid in seen:
                seen[mid] = True

    async def _write(self) -> None:
        # Converted on this thread in small steps, written in a worker
        # thread without the GIL: converting 100,000s of pairs inside the
        # thread's call would hold the GIL, and so the event loop, that long.
        batch = VersionBatch()
        for chunk in _chunks(self.flushing_versions.items()):
            batch.add_versions(chunk)
            await trio.lowlevel.checkpoint()
        for ids in _chunks(self.flushing_seen):
            batch.add_ids(ids)
            await trio.lowlevel.checkpoint()
        ttl = self.dedupe_ttl
        await trio.to_thread.run_sync(
            lambda: self.table.write_batch(batch, ttl_s=ttl), limiter=self._limiter
        )


def _chunks(items: Iterable[_T], size: int = _STEP) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
