"""Errors raised by the event log.

Backends translate their driver's exceptions (sqlite3, asyncpg, OS errors) into these, so the
rest of batchd never sees a driver exception and every message says what failed and where.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by the event log."""


class StoreUrlError(StoreError):
    """A store URL that cannot be parsed or names an unsupported backend."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, dropped, timed out).

    An append that fails with this error may or may not have been committed: retry it with the
    same event ids and the log recognises the events instead of writing them twice.
    """


class StoreCorrupt(StoreError):
    """The store's file or tables are not a batchd log (or are damaged)."""


class SchemaVersionError(StoreError):
    """The log's schema is newer than this batchd, or missing where it must exist."""


class ConcurrencyError(StoreError):
    """An append's expected version did not match the stream's current version."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r} is at version {actual}, append expected {expected}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class DuplicateEventError(StoreError):
    """Some, but not all, event ids of an append are already stored (or on another stream)."""


class FencedError(StoreError):
    """This writer's leadership epoch is stale: another writer has taken over the log."""

    def __init__(self, epoch: int | None, current: int) -> None:
        super().__init__(f"writer epoch {epoch} is fenced: the log's writer epoch is now {current}")
        self.epoch = epoch
        self.current = current


class UnknownEventType(StoreError):
    """An append named an event type that is not in the vocabulary."""


class SecretKeyError(StoreError):
    """A secret cannot be sealed or opened: no key configured, unknown key id, bad ciphertext."""


class SecretUnopenable(SecretKeyError):
    """A sealed secret this process's keys cannot open: the key it names is not loaded, or
    the key of that id is not the one that sealed it."""
