"""Verifying the hash chain: is every stored row the one that was written?

`verify` walks the stored rows in position order and checks that positions run 1, 2, 3 ...
without a gap, that `recorded_at` never decreases, that each row's hash is the chain hash of
its fields and the previous hash, and that the `log_head` row agrees with the last row: its
position, hash and `recorded_at`, which are 0, the genesis hash and 0 in an empty log. A
chain cannot show that its tail was cut (with the head row rewritten to match), so an anchor
`POSITION:HASH` kept elsewhere can be checked too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import NamedTuple

from batchd.events import errors
from batchd.events.envelope import GENESIS_HASH, Head, chain_hash
from batchd.events.store import EventStore

_ANCHOR = re.compile(r"([0-9]+):([0-9a-fA-F]{64})")  # (int() and fromhex() take more: 4_9, "a b")


class Anchor(NamedTuple):
    position: int
    hash: bytes

    @classmethod
    def parse(cls, text: str) -> Anchor:
        match = _ANCHOR.fullmatch(text.strip())
        anchor = cls(int(match[1]), bytes.fromhex(match[2])) if match else None
        if anchor is None or anchor.position < 1:
            raise ValueError(
                f"anchor {text!r} must be POSITION:HASH (a position >= 1, 64 hex digits)"
            )
        return anchor

    def __str__(self) -> str:
        return f"{self.position}:{self.hash.hex()}"


class AuditResult(NamedTuple):
    count: int  # rows checked
    head: Anchor | None  # last good row (None for an empty log)
    bad_position: int | None  # first position that fails, None when intact
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


async def verify(store: EventStore, expect: Anchor | None = None) -> AuditResult:
    state = _Walk()
    # The head is read first: every row up to it was committed with it, and rows a live
    # writer appends meanwhile are left for the next audit.
    stored = await store.head()
    head_typed = _typed(stored, (0, 2), 1)
    if not head_typed:  # (SQLite keeps any value in any column) the rows first, then it
        stored = stored._replace(position=float("inf"))
    async for row in _stored_rows(store):
        if isinstance(row, str):  # the next row cannot be read, or holds another type
            return AuditResult(state.count, state.anchor(), state.position + 1, row)
        if row[0] > stored.position:
            now = await store.head()
            if row[0] > now.position:  # no writer's head reaches it: put there by hand
                return AuditResult(
                    state.count, state.anchor(), row[0],
                    f"a row at position {row[0]} lies beyond the log head ({now.position})",
                )  # fmt: skip
            break  # appended since the head was read: left for the next audit
        problem = state.step(row, expect)
        if problem is not None and state.anchor_failed:  # no row up to it can be vouched for
            return AuditResult(0, None, row[0], problem)
        if problem is not None:
            return AuditResult(state.count, state.anchor(), state.position + 1, problem)
    if not head_typed:
        return AuditResult(
            state.count, state.anchor(), state.position,
            "the log_head row holds a value not of its column's type: it was altered",
        )  # fmt: skip
    return _end_problem(stored, state, expect) or AuditResult(
        state.count, state.anchor(), None, None
    )


def _end_problem(stored: Head, state: _Walk, expect: Anchor | None) -> AuditResult | None:
    """What is wrong at the end of an intact walk: the log head disagrees with the last row,
    or the log ends before the anchor (its tail was cut)."""
    if stored.position != state.position:
        return AuditResult(
            state.count, state.anchor(), min(stored.position, state.position + 1),
            f"the log head says position {stored.position}, but the rows end at {state.position}",
        )  # fmt: skip
    if stored.hash != state.previous:
        return AuditResult(
            state.count, state.anchor(), stored.position,
            f"the log head's hash does not match the chain's at position {stored.position}",
        )  # fmt: skip
    # A head later than its last row would stamp every new event with that forged time
    # (recorded_at never decreases), hiding them from "as of now" reads.
    if stored.recorded_at != state.last_time:
        last = f"the last event's ({state.last_time})" if state.position else "0: the log is empty"
        return AuditResult(
            state.count, state.anchor(), stored.position,
            f"the log head's recorded_at ({stored.recorded_at}) is not {last}",
        )  # fmt: skip
    if expect is not None and not state.anchor_seen:
        return AuditResult(
            state.count, state.anchor(), state.position + 1,
            f"the log ends at position {state.position}, before the anchor's position "
            f"{expect.position}: its tail was cut",
        )  # fmt: skip
    return None


def _typed(row: tuple, whole: tuple[int, ...], hashed: int) -> bool:
    """Are the row's whole numbers (its position, times...) and its hash what was written?"""
    return all(type(row[i]) is int for i in whole) and isinstance(row[hashed], bytes)


async def _stored_rows(store: EventStore) -> AsyncIterator[tuple | str]:
    """Every stored row in position order; where the next row cannot be read (a stored
    value is not of its column's type: text where bytes were written), a problem saying so
    instead, and no more rows. The rows before it are read one at a time then, so that
    they are checked up to it."""
    after, page = 0, 5000
    while True:
        try:
            async for row in store.iter_rows(after, page):
                if not _typed(row, (0, 3, 5, 6), 11):  # position, version, schema, time; hash
                    yield (f"the row after position {after} holds a value not of its "
                           "column's type: it was altered")  # fmt: skip
                    return
                after = row[0]
                yield row
            return
        except errors.StoreCorrupt as exc:
            if page == 1:
                yield f"the row after position {after} cannot be read ({exc}): it was altered"
                return
            page = 1


class _Walk:
    """The chain walked so far: the last good position, its hash and time."""

    def __init__(self) -> None:
        self.count, self.position, self.previous, self.last_time = 0, 0, GENESIS_HASH, 0
        self.anchor_seen = self.anchor_failed = False

    def step(self, row: tuple, expect: Anchor | None) -> str | None:
        problem = _check_row(row, self.position + 1, self.previous, self.last_time)
        if problem is None and expect is not None and row[0] == expect.position:
            if row[11] != expect.hash:
                self.anchor_failed = True
                stored, said = row[11].hex(), expect.hash.hex()
                return (
                    f"position {row[0]} has hash {stored}, the anchor says {said}: "
                    "a row at or before it was changed, the chain rewritten to match"
                )
            self.anchor_seen = True
        if problem is None:
            self.count, self.position, self.previous, self.last_time = (
                self.count + 1, row[0], row[11], row[6]
            )  # fmt: skip
        return problem

    def anchor(self) -> Anchor | None:
        return Anchor(self.position, self.previous) if self.position > 0 else None


def _check_row(row: tuple, position: int, previous: bytes, last_time: int) -> str | None:
    if row[0] != position:
        return f"position {position} is missing (the next stored row is {row[0]})"
    if row[6] < last_time:
        return f"position {position} was recorded before position {position - 1}"
    try:
        hashed = chain_hash(previous, row)
    except (AttributeError, OverflowError, TypeError, ValueError):  # an id that is none
        return f"position {position} holds a value not of its column's type: it was altered"
    if hashed != row[11]:
        return f"position {position} does not match its hash: the row was altered or moved"
    return None
