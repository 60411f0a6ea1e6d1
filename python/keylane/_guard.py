"""The stale-version and duplicate-id checks an App runs around handlers.

Before a handler runs: a message whose version is not newer than the one
applied for its key is *stale*, one whose id was seen within the window is a
*duplicate*; both are acknowledged without calling the handler. After the
handler succeeds, its version and id are recorded, first in memory, then in
the VersionTable by ``flush`` (one transaction per batch, in a worker
thread), which the runtime calls before every offset commit. Until flushed,
the in-memory records answer the checks, so a duplicate arriving right
after its original is caught too.

The memory lives in Rust (``_native.GuardCore``; keylane-core's ``guard``):
per message the event loop makes one call to check and one to record, and a
batch's names are taken once. The table is read ahead of the handlers, a
batch at a time, in a worker thread (``prefetch``): its lookups wait for the
table's lock, which a writer holds through a whole commit, fold and fsync
included.

At-least-once window: if the process dies after a handler returned and
before the next flush, that message's effect is applied, its version is not
recorded, and its offset is not committed: it is redelivered and handled
again. The window is at most one commit interval of messages. With
``record_versions="each"`` the version is written right after each handler
returns (in a worker thread, shielded from cancellation), which shrinks the
window to the moment between the handler's return and that write.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import trio

from keylane._native import GuardCore, GuardReads, Ticket, VersionTable
from keylane.message import Message

MAX_VERSION = 2**63 - 1
# What the VersionTable holds: keys of 1..511 bytes, ids of 1..503 (LMDB's
# key limit; an id's entry also carries its expiry).
MAX_TABLE_KEY = 511
MAX_TABLE_ID = 503
# Keys and ids the table cannot hold as they are (empty, too long) are
# stored as this prefix + their SHA-256. Anything that already starts with
# the prefix is hashed too, so a crafted key cannot alias another key's
# digest: two keys share a table entry only if SHA-256 collides.
HASHED_PREFIX = b"\x00keylane:sha256:"
# Recorded versions (or ids) held in memory before an early flush is asked
# for: a write's transaction stays small, and so does what a crash between
# two flushes leaves to be handled again.
FLUSH_AT = 32_768
# check()'s answers (GuardCore.check).
RUN, STALE, DUPLICATE, POISON, UNPREPARED = range(5)


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
        *,
        one_per_key: bool = False,
    ) -> None:
        self.table = table
        self.version_of = version_of
        self.id_of = id_of
        self.dedupe_ttl = dedupe_ttl
        self.core = GuardCore(table, one_per_key=one_per_key)
        # What a handler applied may be recorded when its key is released
        # rather than at once: its key's next message cannot run before.
        # Not with ids (another key's message may carry the same id) or
        # when a key may be out twice.
        self.record_on_release = one_per_key and id_of is None
        self.flush_at = FLUSH_AT
        self._limiter = trio.CapacityLimiter(1)
        # One flush at a time (commits and acknowledgements both flush).
        self._flush_lock = trio.Lock()
        # Set once what is recorded in memory reaches FLUSH_AT entries: the
        # runtime flushes then, before the next commit is due.
        self.full = trio.Event()
        self._reader = trio.CapacityLimiter(1)

    def prepare(self, tickets: list[Ticket]) -> GuardReads | None:
        """Takes each ticket's version and id into the native guard
        (``version_of``/``id_of`` run once per message, called from there);
        returns the batch for ``core.read``, or None if no message of it can
        be checked. A message they fail on (or answer unusably) is poison."""
        return self.core.prepare(tickets, self.version_of, self.id_of)

    async def prefetch(self, tickets: list[Ticket]) -> None:
        """``prepare`` on the loop, then in one worker-thread hop the rest:
        what memory does not answer is read from the table and the batch is
        judged. What is not read ahead is still looked up in place."""
        reads = self.prepare(tickets)
        if reads is None:
            return
        try:
            await trio.to_thread.run_sync(self.core.read, reads, limiter=self._reader)
        except Exception:
            # check() looks up in place, and a failure there is that
            # message's (retried, dead-lettered), never the worker's.
            return

    def check(self, ticket: Ticket) -> int:
        """RUN, STALE or DUPLICATE; raises PoisonMessage when version_of or
        id_of failed on the message, and what the table raises when a lookup
        in place fails."""
        verdict = self.core.check(ticket)
        if verdict == UNPREPARED:
            self.prepare([ticket])
            verdict = self.core.check(ticket)
        if verdict == POISON:
            raise PoisonMessage(self.core.problem(ticket))
        return verdict

    def applied(self, ticket: Ticket) -> None:
        """Records what a successful handler applied (its check said RUN)."""
        if self.core.applied(ticket) >= self.flush_at:
            self.full.set()

    async def record(self, ticket: Ticket) -> None:
        """Writes one message's version and id now (``record_versions="each"``)."""
        write = functools.partial(self.core.write_one, ticket, ttl_s=self.dedupe_ttl)
        await trio.to_thread.run_sync(write, limiter=self._limiter)

    async def flush(self) -> None:
        """Writes the recorded versions and ids, in one trip to a worker
        thread without the GIL. Raises what the table raises (``StoreFull``...)
        and keeps them recorded: the runtime must not commit offsets past
        messages whose versions were not written."""
        async with self._flush_lock:
            if self.full.is_set():
                self.full = trio.Event()
            if not self.core.recorded:
                return
            write = functools.partial(self.core.write, ttl_s=self.dedupe_ttl)
            # Not abandoned on cancellation: the write finishes, and until it
            # does what it holds still answers the checks.
            await trio.to_thread.run_sync(write, limiter=self._limiter)
