"""keylane's exceptions.

Every exception keylane raises derives from :class:`KeylaneError`, and also
from the built-in a caller would naturally catch (``ValueError`` for a bad
value, ``TypeError`` for a bad type, ``OSError`` for storage,
``ConnectionError`` for brokers), so ``except ValueError`` keeps working.

The native module raises these same classes (it imports them from here), so
there is exactly one hierarchy.
"""

from __future__ import annotations

__all__ = [
    "BlockedKeys",
    "BrokerError",
    "BrokerTimeout",
    "ConcurrentPushError",
    "ConfigError",
    "CorruptLogError",
    "InvalidArgument",
    "InvalidType",
    "KeylaneError",
    "NotAssigned",
    "OffsetOrderError",
    "QueueFull",
    "StoreError",
    "StoreFormatError",
    "StoreFull",
    "TicketError",
    "UnknownTopic",
]


class KeylaneError(Exception):
    """Base class of every keylane error."""


class InvalidArgument(KeylaneError, ValueError):
    """An argument has the right type but a value keylane cannot accept."""


class InvalidType(KeylaneError, TypeError):
    """An argument has a type keylane does not accept (the message names it)."""


class OffsetOrderError(InvalidArgument):
    """An offset was not greater than the last one pushed for its partition."""


class TicketError(InvalidArgument):
    """A ticket was completed or retried twice, or given to the wrong dispatcher."""


class QueueFull(KeylaneError):
    """The dispatcher holds ``capacity`` messages; complete some before pushing more."""


class ConcurrentPushError(KeylaneError, RuntimeError):
    """Two threads pushed to one partition at once; the later push changed
    nothing. Push each partition from one thread (it never waits for another)."""


class StoreError(KeylaneError, OSError):
    """The version table could not be read or written (I/O, LMDB, closed)."""


class StoreFull(StoreError):
    """The version table's map is full; the call was rolled back.

    Reopen the table with a larger ``map_size`` (the message suggests one).
    """


class StoreFormatError(StoreError):
    """The path is not a keylane version table, or one in a format this
    version cannot read."""


class ConfigError(InvalidArgument):
    """An option of an App, a policy or a broker is invalid (the message says
    which and what is allowed)."""


class BrokerError(KeylaneError, ConnectionError):
    """A broker could not do what was asked (join, fetch, commit, produce).

    ``retriable`` says whether the same call may succeed if tried again (the
    runtime retries those with a backoff); ``code`` is the broker client's
    own error name where it has one (e.g. librdkafka's ``_TRANSPORT``).
    """

    def __init__(self, message: str, *, retriable: bool = False, code: str | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.code = code


class BrokerTimeout(BrokerError, TimeoutError):
    """A broker call did not finish within its bound. Retriable: nothing was
    lost, and the runtime tries again after a backoff."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, retriable=True, code=code)


class UnknownTopic(BrokerError):
    """A topic the App consumes or produces to does not exist on the broker
    (create it first: the Kafka adapter never creates topics implicitly)."""


class NotAssigned(BrokerError):
    """A commit or release named partitions this consumer does not own (any
    more): after a rebalance, another member owns them."""


class CorruptLogError(StoreError):
    """A persisted MemoryBroker log is damaged or truncated. Nothing was
    dropped: open it with ``recover="truncate"`` to cut it at the last whole
    record, or move the file away."""


class BlockedKeys(KeylaneError, RuntimeError):
    """``App.run(until_idle=True)`` found nothing left to do but messages
    that keep failing with ``on_exhausted="block"``: everything else was
    handled and committed. ``blocked`` lists them (topic, partition,
    offset, key, attempts, error), one per blocked key, the oldest offset
    of each; their keys' later messages wait behind them, uncommitted."""

    def __init__(self, message: str, blocked: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.blocked = blocked
