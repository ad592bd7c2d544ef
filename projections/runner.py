"""The projection runner: newest compatible snapshot, then catch-up, then live.

`restore()` loads the newest snapshot whose format and code hash match the running code
(anything else is discarded: the read models are rebuilt from the log), then folds every event
after it. `follow()` then applies events live as they are appended, and takes a snapshot every
`snapshot_every` events or `snapshot_interval` seconds, whichever comes first, between pages,
never inside `apply`. `wait_for(position)` lets a reader wait until the read models have
reached a position (an API write's `?after=`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from batchd.events.store import EventStore, Snapshot
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
    ) -> None:
        self.store = store
        self.models = ReadModels()
        self.snapshot_every = snapshot_every
        self.snapshot_interval = snapshot_interval
        self.use_snapshots = use_snapshots
        self._snapshot_position = 0
        self._snapshot_time = time.monotonic()
        self._advanced = asyncio.Condition()

    @property
    def position(self) -> int:
        return self.models.position

    async def restore(self, upto: int | None = None) -> Restored:
        """Load the newest usable snapshot (at or before `upto`) and catch up to `upto`
        (default: the head)."""
        discarded = None
        if self.use_snapshots:
            stored = await self.store.load_snapshot(snapshot.NAME, upto)
            discarded = _incompatible(stored)
            if stored is not None and discarded is None:
                self.models = snapshot.decode(stored.state)
                self._snapshot_position = stored.position
            elif stored is not None:
                logger.info("projections.snapshot_discarded", reason=discarded)
        start = self.models.position
        await self._catch_up(upto)
        return Restored(start, self.models.position - start, discarded)

    async def _catch_up(self, upto: int | None) -> None:
        apply_page = fold.apply_page
        async for page in self.store.read_pages(self.models.position, PAGE):
            if upto is not None and page[-1].position > upto:
                apply_page(self.models, [e for e in page if e.position <= upto])
                return
            apply_page(self.models, page)

    async def follow(self) -> None:
        """Apply events live, for ever (cancel to stop); snapshots as configured."""
        async for event in self.store.subscribe(self.models.position):
            fold.apply(self.models, event)
            async with self._advanced:
                self._advanced.notify_all()
            if self._snapshot_due():
                await self.save_snapshot()

    def _snapshot_due(self) -> bool:
        since = self.models.position - self._snapshot_position
        if since >= self.snapshot_every:
            return True
        return since > 0 and time.monotonic() - self._snapshot_time >= self.snapshot_interval

    async def save_snapshot(self) -> None:
        """Store the read models as they are now (a no-op if nothing changed)."""
        position = self.models.position
        if position == self._snapshot_position:
            return
        state = snapshot.encode(self.models)
        await self.store.save_snapshot(
            Snapshot(snapshot.NAME, position, snapshot.FORMAT, snapshot.CODE_HASH, state),
            keep=SNAPSHOTS_KEPT,
        )
        self._snapshot_position, self._snapshot_time = position, time.monotonic()
        logger.info("projections.snapshot_saved", position=position, bytes=len(state))

    async def wait_for(self, position: int, timeout: float | None = None) -> None:
        """Return once the read models have applied `position` (TimeoutError after `timeout`)."""
        async with self._advanced:
            await asyncio.wait_for(
                self._advanced.wait_for(lambda: self.models.position >= position), timeout
            )


def _incompatible(stored: Snapshot | None) -> str | None:
    """Why `stored` cannot be used (None: it can)."""
    if stored is None:
        return None
    if stored.format != snapshot.FORMAT:
        return f"format {stored.format}, this batchd writes {snapshot.FORMAT}"
    if stored.code_hash != snapshot.CODE_HASH:
        return f"made by other projection code ({stored.code_hash})"
    return None
