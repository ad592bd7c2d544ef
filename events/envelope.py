"""The event envelope and the hash chain.

A stored event is a row of twelve fields (see `RecordedEvent`). Every row's `hash` is

    hash[n] = SHA-256( hash[n-1] || msgpack([position, event_id, stream, version, type, schema,
                                            recorded_at, actor, correlation_id, causation_id,
                                            data]) )

with `hash[0]` = 32 zero bytes. The msgpack array uses the smallest encoding of each value (as
the msgpack spec asks, and every mainstream library does): integers as integers, strings as
str, `event_id`/`correlation_id`/`causation_id` as bin of their 16 uuid bytes (nil when
absent), `recorded_at` as integer microseconds since the Unix epoch (UTC), and `data` as bin
holding the stored msgpack bytes of the payload exactly as they are in the log. An auditor can
recompute the chain with any msgpack library from the rows alone (docs/event-log.md shows how).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

GENESIS_HASH = bytes(32)
ANY: None = None  # expected_version that skips the optimistic-concurrency check
NO_STREAM = 0  # expected_version of a stream that must not exist yet

_packb = msgpack.Packer(use_bin_type=True).pack
_sha256 = hashlib.sha256


def new_event_id() -> uuid.UUID:
    """A time-ordered uuid (RFC 9562 version 7: 48-bit Unix milliseconds, then random bits).

    Ids that grow with time land at the end of the unique index instead of at random places
    in it, which makes appends to both databases markedly cheaper than with uuid4.
    """
    return uuid7(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10)))


def uuid7(unix_ms: int, random80: int) -> uuid.UUID:
    """The version-7 uuid of a time in Unix milliseconds and 80 random bits."""
    return uuid_of_int((unix_ms << 80 | random80) & _V7_CLEAR | _V7_SET)


_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_new_object = object.__new__
_set_slot = object.__setattr__
_from_bytes = int.from_bytes


def uuid_of_int(value: int) -> uuid.UUID:
    """The uuid.UUID of a 128-bit integer, without the checks of UUID(int=...).

    For values that are 128-bit by construction (a new id, 16 stored bytes): the same object
    as UUID(int=value) in about a third of the time (every appended and every read event
    makes one).
    """
    made = _new_object(_UUID)
    _set_slot(made, "int", value)
    _set_slot(made, "is_safe", _SAFE_UNKNOWN)
    return made


def uuid_of_bytes(raw: bytes) -> uuid.UUID:
    """uuid_of_int of 16 big-endian bytes (a stored id), in one call: replay reads one per
    event."""
    made = _new_object(_UUID)
    _set_slot(made, "int", _from_bytes(raw))
    _set_slot(made, "is_safe", _SAFE_UNKNOWN)
    return made


_V7_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)  # version and variant bits
_V7_SET = (0x7 << 76) | (0x2 << 62)


@dataclass(slots=True)
class NewEvent:
    """An event a writer wants to append. `event_id` makes a retried append idempotent."""

    type: str
    data: dict[str, Any]
    actor: str = "scheduler"
    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None
    event_id: uuid.UUID = field(default_factory=new_event_id)


class EncodedEvent(NamedTuple):
    """A NewEvent after the codec: data packed (secrets sealed) and its schema chosen."""

    event_id: uuid.UUID
    type: str
    schema: int
    actor: str
    correlation_id: uuid.UUID | None
    causation_id: uuid.UUID | None
    data: bytes


class RecordedEvent(NamedTuple):
    """An event as stored in the log (with `data` decoded and upcast when read through a store)."""

    position: int
    event_id: uuid.UUID
    stream: str
    version: int
    type: str
    schema: int
    recorded_at: int  # microseconds since the Unix epoch, UTC
    actor: str
    correlation_id: uuid.UUID | None
    causation_id: uuid.UUID | None
    data: Any
    hash: bytes


class Head(NamedTuple):
    """The log's head: last position and hash, last recorded_at, and the writer epoch."""

    position: int
    hash: bytes
    recorded_at: int
    epoch: int


EMPTY_HEAD = Head(0, GENESIS_HASH, 0, 0)


def canonical_bytes(row: tuple) -> bytes:
    """The msgpack bytes hashed for one row (all fields but `hash`, data as stored bytes)."""
    corr, caus = row[8], row[9]
    return _packb((
        row[0], row[1].bytes, row[2], row[3], row[4], row[5], row[6], row[7],
        None if corr is None else corr.bytes, None if caus is None else caus.bytes, row[10],
    ))  # fmt: skip


def chain_hash(previous: bytes, row: tuple) -> bytes:
    """The hash of `row` given the hash of the row before it."""
    return _sha256(previous + canonical_bytes(row)).digest()
