"""The projection runner: newest compatible snapshot, then catch-up, then live.

`restore()` loads the newest snapshot whose format and code hash match the running code
(anything else is discarded: the read models are rebuilt from the log), then folds every event
after it. `follow()` then applies events live as they are appended, and takes a snapshot once
`snapshot_every` events have arrived since the last one, or at the first event after
`snapshot_interval` seconds (the daemon also calls `save_snapshot()` on a timer, so a quiet
log gets its snapshot too), never inside `apply`. `wait_for(position)` lets a reader wait
until the read models have reached a position (an API write's `?after=`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

import structlog

from batchd.events import errors
from batchd.events.store import EventStore, Snapshot
from batchd.events.timeutil import to_iso
from batchd.projections import fold, snapshot
from batchd.projections.model import ReadModels

logger = structlog.get_logger(__name__)

SNAPSHOT_EVERY = 10_000  # events between snapshots (a restart catches up at most this many)
SNAPSHOT_INTERVAL = 300.0  # seconds between snapshots, if any event arrived
SNAPSHOTS_KEPT = 2
PAGE = 5000  # events per read while catching up


@dataclass(slots=True)
class Restored:
    """How `restore` got its state: from which snapshot (0: none), how many events after."""

    snapshot_position: int
    replayed: int
    discarded: str | None  # why a stored snapshot was not used


class Runner:
    def __init__(
        self,
        store: EventStore,
        *,
        snapshot_every: int = SNAPSHOT_EVERY,
        snapshot_interval: float = SNAPSHOT_INTERVAL,
        use_snapshots: bool = True,
        warn_refused: bool = True,
    ) -> None:
        self.store = store
        self.models = ReadModels()
        self.snapshot_every = snapshot_every
        self.snapshot_interval = snapshot_interval
        self.use_snapshots = use_snapshots
        # a refused seal is a warning (the daemon's own keys), or an info line where the keys
        # are a guess (offline tools: they may be another daemon's)
        self.warn_refused = warn_refused
        self._snapshot_position = 0
        self._snapshot_time = time.monotonic()
        self._advanced = asyncio.Condition()
        self._saving = asyncio.Lock()  # one snapshot at a time
        self._encoding: asyncio.Future | None = None  # set while a snapshot is being encoded

    @property
    def position(self) -> int:
        return self.models.position

    async def restore(self, upto: int | None = None) -> Restored:
        """Load the newest usable snapshot (at or before `upto`) and catch up to `upto`
        (default: the head).

        The cyclic garbage collector is paused meanwhile: loading makes millions of objects
        that all live on (the read models) or die by reference count (pages read), and each
        collection would walk every one of them again: a third to a half of the time.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return await self._restore(upto)
        finally:
            if collecting:
                gc.enable()

    async def _restore(self, upto: int | None) -> Restored:
        discarded = None
        if self.use_snapshots:
            try:
                stored = await self.store.load_snapshot(snapshot.NAME, upto)
            except errors.StoreCorrupt as exc:  # a damaged row: rebuild from the log
                stored, discarded = None, f"unreadable ({exc})"
            discarded = discarded or _incompatible(stored)
            if stored is not None and discarded is None:
                try:
                    state = await opened(self.store, stored)
                    self.models = snapshot.decode(state)
                    if self.models.position != stored.position:
                        raise ValueError(f"it holds position {self.models.position}")
                    self._snapshot_position = stored.position
                except Unsealed as exc:  # not what this daemon stored: say so, and rebuild
                    discarded = str(exc)
                    if exc.suspicious and self.warn_refused:  # (not for a reader's guess)
                        logger.warning("projections.snapshot_refused",
                                       position=stored.position, reason=discarded)  # fmt: skip
                except Exception as exc:  # any damage means: rebuild from the log
                    self.models = ReadModels()
                    discarded = f"unreadable ({type(exc).__name__}: {exc})"
            if discarded is not None:
                logger.info("projections.snapshot_discarded", reason=discarded)
        start = self.models.position
        await self._catch_up(upto)
        return Restored(start, self.models.position - start, discarded)

    async def _catch_up(self, upto: int | None) -> None:
        apply_page = fold.apply_page
        async for page in self.store.read_pages(self.models.position, PAGE, full=False):
            if upto is not None and page[-1].position > upto:
                apply_page(self.models, [e for e in page if e.position <= upto])
                return
            apply_page(self.models, page)

    async def follow(self) -> None:
        """Apply events live, for ever (cancel to stop); snapshots as configured.

        A snapshot that cannot be stored is logged and tried again an interval later: the read
        models go on following the log regardless.
        """
        async for event in self.store.subscribe(self.models.position):
            if self._encoding is not None:
                await self._encoding  # the models hold still while a snapshot is encoded
            fold.apply(self.models, event)
            async with self._advanced:
                self._advanced.notify_all()
            if self._snapshot_due():
                await self._try_snapshot()

    async def _try_snapshot(self) -> None:
        try:
            await self.save_snapshot()
        except errors.StoreError as exc:
            self._snapshot_time = time.monotonic()
            logger.warning("projections.snapshot_failed", error=str(exc))

    def _snapshot_due(self) -> bool:
        since = self.models.position - self._snapshot_position
        if since >= self.snapshot_every:
            return True
        return since > 0 and time.monotonic() - self._snapshot_time >= self.snapshot_interval

    async def save_snapshot(self) -> None:
        """Store the read models as they are now (a no-op if nothing changed, or if the store
        is read-only). The encoding runs in a worker thread, so the event loop keeps serving
        readers meanwhile; `follow` applies no event until it is done."""
        keyring = self.store.codec.keyring
        if self.store.readonly or keyring is None:  # (none: it could not be sealed)
            return
        async with self._saving:
            if self.models.position == self._snapshot_position:
                return
            # the models hold still from here: the position sealed is that of the state
            self._encoding = asyncio.get_running_loop().create_future()
            try:
                position = self.models.position
                anchor = await _anchor(self.store, position)
                state = await asyncio.to_thread(snapshot.encode, self.models)
            finally:
                self._encoding.set_result(None)
                self._encoding = None
            state = await asyncio.to_thread(snapshot.seal, state, keyring, position, anchor)
            await self.store.save_snapshot(
                Snapshot(snapshot.NAME, position, snapshot.FORMAT, snapshot.CODE_HASH, state),
                keep=SNAPSHOTS_KEPT,
            )
            self._snapshot_position, self._snapshot_time = position, time.monotonic()
            logger.info("projections.snapshot_saved", position=position, bytes=len(state))

    async def wait_for(self, position: int, timeout: float | None = None) -> None:
        """Return once the read models have applied `position` (TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout), self._advanced:  # not wait_for: in 3.11 it can
            await self._advanced.wait_for(lambda: self.models.position >= position)  # eat a cancel


class Unsealed(ValueError):
    """A stored snapshot that cannot be shown to be what a daemon of these keys stored;
    `suspicious` unless it is for want of keys to check it with."""

    def __init__(self, message: str, suspicious: bool = True) -> None:
        super().__init__(message)
        self.suspicious = suspicious


async def opened(store: EventStore, stored: Snapshot) -> bytes:
    """The state of a stored snapshot, once its seal is shown to be this daemon's (keys) and
    to be bound to the log's event at its position; Unsealed if not."""
    keyring = store.codec.keyring
    if keyring is None:
        raise Unsealed(
            "no secret keys to check its seal with (the daemon's: "
            "$BATCHD_SECRET_KEYS, or --config/--state-dir)",
            suspicious=False,
        )
    try:
        anchor = await _anchor(store, stored.position)
    except LookupError:
        raise Unsealed(f"the log holds no event at its position {stored.position}") from None
    try:
        return await asyncio.to_thread(snapshot.unseal, stored.state, keyring, stored.position,
                                       anchor)  # fmt: skip
    except snapshot.KeyNotLoaded as exc:
        raise Unsealed(str(exc), suspicious=False) from None
    except ValueError as exc:
        raise Unsealed(str(exc)) from None


async def _anchor(store: EventStore, position: int) -> bytes:
    """The hash of the log's event at `position` (LookupError: there is none)."""
    found = await store.read_all(position - 1, 1)
    if not found or found[0].position != position:
        raise LookupError(position)
    return found[0].hash


def usable(stored: Snapshot | None) -> bool:
    """Could the running code use `stored` (its seal aside)?"""
    return stored is not None and _incompatible(stored) is None


def _incompatible(stored: Snapshot | None) -> str | None:
    """Why `stored` cannot be used (None: it can)."""
    if stored is None:
        return None
    if stored.format != snapshot.FORMAT:
        return f"format {stored.format}, this batchd writes {snapshot.FORMAT}"
    if stored.code_hash != snapshot.CODE_HASH:
        return f"made by other projection code ({stored.code_hash})"
    return None


async def moment_note(store: EventStore, at: int | None, position: int) -> str | None:
    """What a replay "as of `at`" (microseconds; None: of a position) that found no event
    should say (None when it found some)."""
    if position > 0:
        return None
    first = await store.read_all(0, 1)
    if not first:
        return "the log is empty: nothing had happened yet"
    if at is None:
        return "position 0 is before the first event: nothing had happened yet"
    return (
        f"{to_iso(at)} is before the first event ({to_iso(first[0].recorded_at)}): "
        "nothing had happened yet"
    )
