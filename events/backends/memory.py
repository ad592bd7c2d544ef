"""The in-memory backend: the contract over plain Python lists, for tests.

`memory://NAME` opens the same named log from several stores in one process (so tests can have
two writers fence each other); `memory://` opens a fresh, private one.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batchd.events import errors
from batchd.events.envelope import EMPTY_HEAD, Head
from batchd.events.store import AppendRequest, BatchPlan, Prepare, Snapshot


@dataclass
class MemoryLog:
    rows: list[tuple] = field(default_factory=list)
    head: Head = EMPTY_HEAD
    streams: dict[str, list[int]] = field(default_factory=dict)  # stream -> row indices
    ids: dict = field(default_factory=dict)  # event_id -> (position, stream)
    snapshots: dict[str, list[Snapshot]] = field(default_factory=dict)
    listeners: list[Callable[[], None]] = field(default_factory=list)


_NAMED: dict[str, MemoryLog] = {}


def named_log(name: str) -> MemoryLog:
    return _NAMED.setdefault(name, MemoryLog()) if name else MemoryLog()


class MemoryBackend:
    name = "memory"
    reads_ahead = False

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self._wakeup: Callable[[], None] = lambda: None

    async def open(self, readonly: bool) -> None:
        self.log.listeners.append(self._notify)

    async def close(self) -> None:
        if self._notify in self.log.listeners:
            self.log.listeners.remove(self._notify)

    def _notify(self) -> None:
        self._wakeup()

    def set_wakeup(self, callback: Callable[[], None]) -> None:
        self._wakeup = callback

    async def read_head(self) -> Head:
        return self.log.head

    async def try_lock_leader(self) -> bool:
        return True  # a memory log lives in one process

    async def take_epoch(self) -> Head:
        self.log.head = self.log.head._replace(epoch=self.log.head.epoch + 1)
        return self.log.head

    async def commit(
        self, requests: Sequence[AppendRequest], epoch: int, prepare: Prepare
    ) -> BatchPlan:
        log = self.log
        if log.head.epoch != epoch:
            raise errors.FencedError(epoch, log.head.epoch)
        versions = {r.stream: len(log.streams.get(r.stream, ())) for r in requests}
        existing = {
            e.event_id: log.ids[e.event_id]
            for r in requests
            for e in r.events
            if e.event_id in log.ids
        }
        plan = prepare(log.head, versions, existing)
        for row in plan.rows:
            log.streams.setdefault(row[2], []).append(len(log.rows))
            log.ids[row[1]] = (row[0], row[2])
            log.rows.append(row)
        if plan.rows:  # (as the durable logs: a batch that stores nothing leaves the head)
            log.head = plan.head
            for listener in list(log.listeners):
                if listener is not self._notify:
                    listener()
        return plan

    async def read_rows(
        self, after: int, limit: int, full: bool = True, bulk: bool = False
    ) -> list[tuple]:
        return self.log.rows[after : after + limit]  # gapless from 1; whole rows cost nothing

    async def recorded_at(self, position: int) -> int:
        return self.log.rows[position - 1][6]

    async def read_stream_rows(self, stream: str, after_version: int) -> list[tuple]:
        return [self.log.rows[i] for i in self.log.streams.get(stream, [])[after_version:]]

    async def read_stream_page(
        self, stream: str, after: int, through: int, limit: int
    ) -> list[tuple]:
        indices = self.log.streams.get(stream, [])  # row i holds position i + 1
        start = bisect.bisect_left(indices, after)
        return [self.log.rows[i] for i in indices[start : start + limit] if i < through]

    async def save_snapshot(self, snapshot: Snapshot, keep: int) -> None:
        kept = self.log.snapshots.setdefault(snapshot.projection, [])
        kept.append(snapshot)
        kept.sort(key=lambda s: s.position)
        del kept[:-keep]

    async def load_snapshot(self, projection: str, upto: int) -> Snapshot | None:
        kept = [s for s in self.log.snapshots.get(projection, ()) if s.position <= upto]
        return kept[-1] if kept else None
