"""The event store: one contract over several backends.

`EventStore` holds everything that does not depend on the database: encoding, the group-commit
writer, the pure batch decision (`prepare_batch`), decoding, leadership, and subscriptions.
A backend (events/backends/) only runs its SQL: it reads the head and the facts a batch needs
inside its write transaction, hands them to `prepare_batch`, and stores the rows it returns.

Group commit: `append` queues a request and waits; one writer task takes every request queued
while the previous transaction was in flight (up to MAX_BATCH_EVENTS events) and commits them
in one transaction. A request that fails its version check, or reuses some of another append's
event ids, fails alone; the others in the batch commit. An append retried with the same event
ids after an ambiguous failure is recognised and answered with the original positions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import structlog

from batchd.events import errors
from batchd.events.codec import Codec
from batchd.events.envelope import (
    EncodedEvent,
    Head,
    NewEvent,
    RecordedEvent,
    chain_hash,
)
from batchd.events.timeutil import now_us

logger = structlog.get_logger(__name__)

MAX_BATCH_EVENTS = 500  # events per group-commit transaction
MAX_POSITION = 2**63 - 1  # positions are PostgreSQL bigints
READ_PAGE = 1000  # events per read while catching up
RECENT_ROWS = 10_000  # rows this process committed last, kept for its readers (at least)
RECENT_BYTES = 32 << 20  # ...unless their data holds more bytes than this
POLL_INTERVAL = 1.0  # seconds between subscription polls when no wake-up arrives
CLOSE_GRACE = 10.0  # seconds close() waits for queued appends to commit
RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)  # seconds, for a subscription whose store dropped
_ACTOR = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:<>@+=-]{0,254}$")


@dataclass(slots=True)
class AppendRequest:
    stream: str
    events: list[EncodedEvent]
    expected_version: int | None
    future: asyncio.Future = field(repr=False)


class Snapshot(NamedTuple):
    """A projection's state saved at a log position (see projections/)."""

    projection: str
    position: int
    format: int
    code_hash: str
    state: bytes


class BatchPlan(NamedTuple):
    """What one transaction stores: its rows, the new head, and one outcome per request."""

    rows: list[tuple]
    head: Head
    outcomes: list[list[int] | errors.StoreError]

    @property
    def conflicted(self) -> bool:
        """Some request failed its version check: it may be a retry of a committed append,
        which only a look-up of its event ids can tell."""
        return any(isinstance(o, errors.ConcurrencyError) for o in self.outcomes)


Prepare = Callable[[Head, dict[str, int], dict[Any, tuple[int, str]] | None], BatchPlan]


def prepare_batch(
    requests: Sequence[AppendRequest],
    head: Head,
    versions: dict[str, int],
    existing: dict[Any, tuple[int, str]] | None,
    now: int,
) -> BatchPlan:
    """Decide a batch: which requests commit (with positions, versions and hashes) and which fail.

    `versions` maps each stream of the batch to its current version (absent: 0); `existing` maps
    event ids already stored to their (position, stream). `existing` None means the ids were not
    looked up, because the database's unique index refuses a stored or repeated id anyway (the
    backend then decides again with them): no id is tracked, which is the fast path of every
    ordinary batch. Pure: no I/O, no clock.
    """
    rows: list[tuple] = []
    outcomes: list[list[int] | errors.StoreError] = []
    versions = dict(versions)
    track = existing is not None
    seen = {event_id.int: found for event_id, found in (existing or {}).items()}  # int: hashes in C
    position, previous = head.position, head.hash
    recorded_at = max(now, head.recorded_at)  # never decreasing along positions
    for request in requests:
        stream = request.stream
        if track:
            found = [seen.get(e.event_id.int) for e in request.events]
            if any(found):
                outcomes.append(_retry_outcome(request, found))
                continue
        current = versions.get(stream, 0)
        if request.expected_version is not None and request.expected_version != current:
            outcomes.append(errors.ConcurrencyError(stream, request.expected_version, current))
            continue
        first = position + 1
        for e in request.events:
            position += 1
            current += 1
            row = (position, e.event_id, stream, current, e.type, e.schema, recorded_at,
                   e.actor, e.correlation_id, e.causation_id, e.data)  # fmt: skip
            previous = chain_hash(previous, row)
            rows.append((*row, previous))
            if track:
                seen[e.event_id.int] = (position, stream)
        versions[stream] = current
        outcomes.append(list(range(first, position + 1)))
    return BatchPlan(rows, Head(position, previous, recorded_at, head.epoch), outcomes)


def _retry_outcome(request: AppendRequest, found: list) -> list[int] | errors.StoreError:
    if all(f is not None and f[1] == request.stream for f in found):
        return [f[0] for f in found]  # the same append, already committed: answer it again
    return errors.DuplicateEventError(
        f"append to {request.stream!r} reuses event ids already stored by another append"
    )


class Backend(Protocol):
    """What a database must provide. Rows are 12-tuples in RecordedEvent's field order with
    `data` as the stored msgpack bytes."""

    name: str
    # whether a bulk read of the next page may be under way while the caller works on one
    # (a server reads it meanwhile); False: pages are read when asked for, in the caller's
    # thread (see EventStore.read_pages)
    reads_ahead: bool

    async def open(self, readonly: bool) -> None: ...
    async def close(self) -> None: ...
    async def read_head(self) -> Head: ...
    async def try_lock_leader(self) -> bool:
        """Take the log's leader lock if it is free (held until close); whether it is held.
        One daemon leads a log; others stand by until the lock frees (the epoch still fences
        a writer that lost it unawares)."""

    async def take_epoch(self) -> Head:
        """Increment the writer epoch; later appends of any older epoch fail with FencedError."""

    async def commit(
        self, requests: Sequence[AppendRequest], epoch: int, prepare: Prepare
    ) -> BatchPlan:
        """In one transaction: check `epoch` against the log's, call `prepare(head, versions,
        existing)`, store its rows and head. Raise FencedError if the epoch is stale.
        `existing` may be None (ids not looked up) only where a unique index on event_id
        refuses a repeat: on that refusal, decide again with the stored ids looked up."""

    async def read_rows(
        self, after: int, limit: int, full: bool = True, bulk: bool = False
    ) -> Sequence[Sequence[Any]]:
        """Stored rows after `after` in position order: indexable in envelope order, uuids as
        uuid.UUID, data as the stored bytes (tuples, or the driver's own record type).
        `full=False` may leave event_id, correlation_id, causation_id and hash None. `bulk`:
        one page of a read of many, one after another (catch-up, replay), which a backend
        may serve in the caller's own thread."""

    async def read_stream_rows(
        self, stream: str, after_version: int
    ) -> Sequence[Sequence[Any]]: ...
    async def read_stream_page(
        self, stream: str, after: int, through: int, limit: int
    ) -> Sequence[Sequence[Any]]:
        """At most `limit` of the stream's rows whose position is after `after` and at most
        `through`, in order (a page of one stream, read from the stream's index)."""

    async def recorded_at(self, position: int) -> int:
        """The `recorded_at` of the event at `position` (which exists)."""

    async def save_snapshot(self, snapshot: Snapshot, keep: int) -> None: ...
    async def load_snapshot(self, projection: str, upto: int) -> Snapshot | None: ...
    def set_wakeup(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever another process may have appended (a hint, may be lost)."""


class EventStore:
    """The log: append with optimistic concurrency and fencing, read, subscribe, snapshot."""

    def __init__(
        self,
        backend: Backend,
        codec: Codec | None = None,
        *,
        clock: Callable[[], int] = now_us,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.backend = backend
        self.codec = codec or Codec()
        self.clock = clock
        self.poll_interval = poll_interval
        self.epoch: int | None = None
        self.readonly = False
        self._queue: collections.deque[AppendRequest] = collections.deque()
        self._committing = False  # a batch is being committed
        self._pending = asyncio.Event()
        self._changed = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False
        # set once an append found that another writer has taken the log's leadership
        self.fenced = asyncio.Event()
        self.fenced_by: int | None = None  # that writer's epoch
        # The rows this process committed last, contiguous in position from _recent_first and
        # ending at the head this writer last wrote (emptied when a commit fails or leadership
        # is taken): readers that follow the head (projections, event streams) get them
        # without a query.
        self._recent: list[tuple] = []
        self._recent_first = 0
        self._recent_bytes = 0
        self.backend.set_wakeup(self._pulse)

    async def open(self, readonly: bool = False) -> EventStore:
        self.readonly = readonly
        await self.backend.open(readonly)
        return self

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def drain(self, timeout: float) -> None:
        """Return once every append queued so far is committed (or after `timeout`)."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._committing) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop taking appends, commit the queued ones (for up to `grace` seconds), close."""
        self._closing = True
        self._pending.set()
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=grace)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        _fail(list(self._queue), errors.StoreError("the store closed before this append"))
        self._queue.clear()
        await self.backend.close()

    # -- leadership ------------------------------------------------------------------------
    async def try_lock_leader(self) -> bool:
        """Whether this store now holds the log's leader lock (taken if free; see Backend)."""
        self._check_writable()
        return await self.backend.try_lock_leader()

    async def take_leadership(self) -> int:
        """Become the log's writer: bump the epoch so that any older writer is fenced."""
        self._check_writable()
        self._forget_recent()  # others may have written since this writer's last commit
        head = await self.backend.take_epoch()
        self.epoch = head.epoch
        self.fenced.clear()
        self.fenced_by = None
        logger.info("log.leadership_taken", epoch=head.epoch, position=head.position)
        return head.epoch

    # -- writing ---------------------------------------------------------------------------
    async def append(
        self, stream: str, events: Sequence[NewEvent], expected_version: int | None = None
    ) -> list[int]:
        """Append `events` to `stream` atomically; return their positions.

        `expected_version` is the stream's version the caller saw (0: the stream must be new);
        None skips the check. Raises ConcurrencyError, FencedError, StoreUnavailable (ambiguous:
        retry with the same events), DuplicateEventError.
        """
        return await self._enqueue(stream, events, expected_version)

    async def append_many(
        self, appends: Sequence[tuple[str, Sequence[NewEvent], int | None]]
    ) -> list[list[int] | Exception]:
        """Several appends at once, `(stream, events, expected_version)` each: every one is
        checked and committed as `append` would (group commit puts them in few transactions),
        and its positions, or the error that refused it, come back in the same order.

        A scheduler cycle's decisions go in this way: one call instead of one per event.
        """
        futures = []
        for stream, events, expected_version in appends:
            try:
                futures.append(self._enqueue(stream, events, expected_version))
            except (ValueError, errors.StoreError) as exc:
                done = asyncio.get_running_loop().create_future()
                done.set_exception(exc)
                futures.append(done)
        return await asyncio.gather(*futures, return_exceptions=True)

    def _enqueue(
        self, stream: str, events: Sequence[NewEvent], expected_version: int | None
    ) -> asyncio.Future:
        """Check and encode an append and queue it for the writer; its future gets the result."""
        self._check_writable()
        if not _STREAM_NAME.match(stream):
            raise ValueError(f"invalid stream name {stream!r}")
        if not events:
            raise ValueError("append needs at least one event")
        for event in events:
            _check_envelope(event)
        if len({e.event_id.int for e in events}) != len(events):
            raise ValueError("an append repeats an event_id among its own events")
        encoded = [self.codec.encode(e) for e in events]
        future = asyncio.get_running_loop().create_future()
        self._queue.append(AppendRequest(stream, encoded, expected_version, future))
        self._pending.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="event-store-writer")
        return future

    def _check_writable(self) -> None:
        if self.readonly:
            raise errors.StoreError("this store was opened read-only")
        if self._closing:
            raise errors.StoreError("this store is closing")

    async def _write_loop(self) -> None:
        while self._queue or not self._closing:
            await self._pending.wait()
            batch = self._take_batch()
            if not batch:
                continue
            self._committing = True
            try:
                await self._commit(batch)
            except Exception as exc:  # the batch failed as a whole: every caller hears why
                self._forget_recent()  # it may have landed after all: read from the log
                if isinstance(exc, errors.FencedError):
                    self.fenced_by = exc.current
                    self.fenced.set()
                _fail(batch, exc)
            finally:
                self._committing = False

    def _take_batch(self) -> list[AppendRequest]:
        batch: list[AppendRequest] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].events) <= MAX_BATCH_EVENTS):
            request = self._queue.popleft()
            if request.future.done():  # caller cancelled before commit: drop it
                continue
            batch.append(request)
            size += len(request.events)
        if not self._queue:
            self._pending.clear()
        return batch

    async def _commit(self, batch: list[AppendRequest]) -> None:
        if self.epoch is None:
            await self.take_leadership()
        now = self.clock()
        plan = await self.backend.commit(
            batch, self.epoch, lambda head, v, e: prepare_batch(batch, head, v, e, now)
        )
        for request, outcome in zip(batch, plan.outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, Exception):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)
        if plan.rows:
            self._remember(plan.rows)
            self._pulse()

    def _remember(self, rows: list[tuple]) -> None:
        recent = self._recent
        if not recent or recent[-1][0] + 1 != rows[0][0]:
            self._forget_recent()  # not contiguous (another writer wrote between): start again
            self._recent_first = rows[0][0]
        recent.extend(rows)
        self._recent_bytes += sum(len(r[10]) for r in rows)
        if len(recent) > 2 * RECENT_ROWS or self._recent_bytes > RECENT_BYTES:
            drop = max(0, len(recent) - RECENT_ROWS)
            freed = sum(len(r[10]) for r in recent[:drop])
            while drop < len(recent) - 1 and self._recent_bytes - freed > RECENT_BYTES // 2:
                freed += len(recent[drop][10])
                drop += 1
            del recent[:drop]
            self._recent_first += drop
            self._recent_bytes -= freed

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_bytes = 0

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- reading ---------------------------------------------------------------------------
    async def head(self) -> Head:
        return await self.backend.read_head()

    async def read_all(self, after: int = 0, limit: int = READ_PAGE) -> list[RecordedEvent]:
        """Events with position > after, in position order, at most `limit`."""
        decode = self.codec.decode
        start = after + 1 - self._recent_first
        if 0 <= start < len(self._recent):  # committed here lately: no query
            return [decode(r) for r in self._recent[start : start + limit]]
        return [decode(r) for r in await self.backend.read_rows(after, limit)]

    async def read_pages(
        self, after: int = 0, limit: int = READ_PAGE, full: bool = True
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Every event after `after` up to the head, page by page, for catching up and replay.

        While the caller works on one page the next is already being read by the PostgreSQL
        server, so reading and decoding overlap. (SQLite reads each page in the caller's
        thread, when it is wanted: on a few cores, handing pages to a reader thread and back
        cost more than it overlapped, as both hold the GIL.) With `full` False, events may
        come without their event_id, correlation_id, causation_id and hash (None): what
        folding into read models needs, read at about two thirds of the cost.
        """
        read_rows, decode = self.backend.read_rows, self.codec.decode
        rows = await read_rows(after, limit, full, bulk=True)
        while rows:
            more, last = len(rows) == limit, rows[-1][0]
            ahead = None
            if more and self.backend.reads_ahead:
                ahead = asyncio.ensure_future(read_rows(last, limit, full, bulk=True))
            try:
                yield [decode(r) for r in rows]
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise
            if ahead is not None:
                rows = await ahead
            elif more:
                # the read below holds the event loop: others run between pages (a daemon
                # replaying a past moment for the API still answers its agents meanwhile)
                await asyncio.sleep(0)
                rows = await read_rows(last, limit, full, bulk=True)
            else:
                rows = ()

    async def position_at(self, at: int) -> int:
        """The last position recorded at or before `at` (microseconds; 0 if none): "as of T".

        `recorded_at` never decreases along positions, so a binary search over positions finds
        it with about log2(head) point reads and no index on time.
        """
        low, high = 0, (await self.backend.read_head()).position  # answer is in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if await self.backend.recorded_at(middle) <= at:
                low = middle
            else:
                high = middle - 1
        return low

    async def read_stream(self, stream: str, after_version: int = 0) -> list[RecordedEvent]:
        decode = self.codec.decode
        return [decode(r) for r in await self.backend.read_stream_rows(stream, after_version)]

    async def read_stream_page(
        self, stream: str, after: int, through: int, limit: int
    ) -> list[RecordedEvent]:
        """At most `limit` events of `stream` with positions in (`after`, `through`]."""
        decode = self.codec.decode
        rows = await self.backend.read_stream_page(stream, after, through, limit)
        return [decode(r) for r in rows]

    async def iter_rows(self, after: int = 0, page: int = 5000) -> AsyncIterator[tuple]:
        """Every stored row after `after` as it is in the database (for audit and export)."""
        while rows := await self.backend.read_rows(after, page):
            for row in rows:
                yield tuple(row)
            after = rows[-1][0]

    async def subscribe(
        self, after: int = 0, page: int = READ_PAGE
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after `after`, once each, in order: catch up, then follow live.

        Wake-ups (this process's commits, PostgreSQL NOTIFY) only shorten the wait; the poll
        interval is the fallback. A dropped connection is retried from the last position
        yielded, so nothing is missed or repeated.
        """
        async for events in self.subscribe_pages(after, page):
            for event in events:
                yield event

    async def subscribe_pages(
        self, after: int = 0, page: int = READ_PAGE
    ) -> AsyncIterator[list[RecordedEvent]]:
        """`subscribe`, a page of the events there are at a time (never an empty page)."""
        failures = 0
        while True:
            changed = self._changed  # taken before the read, so no wake-up is lost
            try:
                events = await self.read_all(after, page)
            except errors.StoreUnavailable as exc:
                delay = RETRY_BACKOFF[min(failures, len(RETRY_BACKOFF) - 1)]
                failures += 1
                logger.warning("log.subscription_retry", after=after, error=str(exc), delay=delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if events:
                yield events
                after = events[-1].position
            if len(events) < page:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.poll_interval)

    # -- snapshots -------------------------------------------------------------------------
    async def save_snapshot(self, snapshot: Snapshot, keep: int = 2) -> None:
        await self.backend.save_snapshot(snapshot, keep)

    async def load_snapshot(self, projection: str, upto: int | None = None) -> Snapshot | None:
        """The newest snapshot of `projection` taken at or before position `upto` (any)."""
        return await self.backend.load_snapshot(projection, MAX_POSITION if upto is None else upto)


def _check_envelope(event: NewEvent) -> None:
    """Refuse, before it is queued, what would otherwise fail a whole group commit."""
    if not isinstance(event.event_id, uuid.UUID):
        raise ValueError(f"{event.type}: event_id must be a uuid.UUID")
    if event.correlation_id is not None and not isinstance(event.correlation_id, uuid.UUID):
        raise ValueError(f"{event.type}: correlation_id must be a uuid.UUID or None")
    if event.causation_id is not None and not isinstance(event.causation_id, uuid.UUID):
        raise ValueError(f"{event.type}: causation_id must be a uuid.UUID or None")
    actor = event.actor
    if type(actor) is not str or actor not in _GOOD_ACTORS:
        _check_actor(event.type, actor)


_GOOD_ACTORS: set[str] = set()  # actors already checked (a daemon has few)
_GOOD_ACTORS_MAX = 10_000


def _check_actor(event_type: str, actor: object) -> None:
    if not isinstance(actor, str) or not _ACTOR.match(actor):
        raise ValueError(f"{event_type}: actor {actor!r} is not 1-200 printable characters")
    try:
        actor.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{event_type}: actor {actor!r} is not valid Unicode") from None
    if len(_GOOD_ACTORS) >= _GOOD_ACTORS_MAX:
        _GOOD_ACTORS.clear()
    _GOOD_ACTORS.add(actor)


def _fail(batch: list[AppendRequest], exc: Exception) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(_own(exc))


def _own(exc: Exception) -> Exception:
    """A copy of `exc`, without its traceback, for one caller. Callers that raised one shared
    exception would share its traceback, which holds the frames of the writer loop and of
    each of them; code that clears a traceback's frames (APScheduler does, once a job has
    failed) would then finish those coroutines in mid-flight, the writer loop's among them."""
    clone = type(exc).__new__(type(exc), *exc.args)
    clone.__dict__.update(exc.__dict__)
    return clone
