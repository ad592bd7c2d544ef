"""The write path: run a command against the read models and append what it decides.

`Control.run(decide, ...)` holds the locks the command needs, calls `decide(models)` (the
pure command function, or a closure over one), appends the returned events and waits until
the read models have folded them, so the next command sees them and the caller can read its
own write. Commands that change the structure (workspaces, experiments, clusters, tokens)
run alone; job commands and the planner's cycles share the structure and run side by side,
one at a time per job name, so their appends share group commits.

Events appended while serving a request (the API's, or an agent's message) carry the
request's id as their correlation id (`REQUEST`, set by the API for each request).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from batchd.events.envelope import NewEvent
from batchd.events.store import EventStore
from batchd.projections.model import ReadModels
from batchd.projections.runner import Runner
from batchd.scheduler.planner import Decision

Decide = Callable[[ReadModels], list[Decision] | Awaitable[list[Decision]]]
# the request being served, if any: the correlation id of the events it leads to
REQUEST: contextvars.ContextVar[uuid.UUID | None] = contextvars.ContextVar(
    "batchd_request", default=None
)
FOLD_TIMEOUT = 30.0  # seconds an appended command waits for the read models


class SharedLock:
    """Many shared holders or one exclusive holder; a waiting exclusive holder goes first."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._exclusive and not self._waiting_exclusive
            )
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_exclusive += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class Control:
    def __init__(self, store: EventStore, runner: Runner) -> None:
        self.store = store
        self.runner = runner
        self._structure = SharedLock()
        self._keys: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders)

    @property
    def models(self) -> ReadModels:
        return self.runner.models

    async def run(self, decide: Decide, *, structural: bool = False, key: str = "") -> int | None:
        """Decide and append; the position of the last event appended, or None if the
        command decided nothing (a repeated request)."""
        hold = self._structure.exclusive() if structural else self._structure.shared()
        async with hold, self._key(key):
            decisions = decide(self.models)
            if not isinstance(decisions, list):
                decisions = await decisions
            if not decisions:
                return None
            position = await self.append(decisions)
            await self.runner.wait_for(position, FOLD_TIMEOUT)
            return position

    async def append(self, decisions: list[Decision]) -> int:
        """Append the decisions, consecutive events of one stream together; the last position."""
        appends: list[tuple[str, list[NewEvent], None]] = []
        request = REQUEST.get()
        for stream, event in decisions:
            if event.correlation_id is None:
                event.correlation_id = request
            if appends and appends[-1][0] == stream:
                appends[-1][1].append(event)
            else:
                appends.append((stream, [event], None))
        results = await self.store.append_many(appends)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return max(positions[-1] for positions in results)

    @contextlib.asynccontextmanager
    async def _key(self, key: str) -> AsyncIterator[None]:
        if not key:
            yield
            return
        lock, holders = self._keys.get(key) or (asyncio.Lock(), 0)
        self._keys[key] = (lock, holders + 1)
        try:
            async with lock:
                yield
        finally:
            lock, holders = self._keys[key]
            if holders == 1:
                del self._keys[key]
            else:
                self._keys[key] = (lock, holders - 1)


async def token_file(control: Control, path: Path, role: str, name: str, actor: str,
                     node: str | None = None) -> str:  # fmt: skip
    """The token kept in `path` (mode 0600): the one there if the log knows it, else a new
    one of `role` (bound to `node`, if given), named `name` (or `name-N` if that is taken),
    logged by its hash only."""
    from batchd.scheduler import auth

    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if auth.digest(token) in control.models.token_hashes:
            return token
    token = auth.new_token()

    def decide(m: ReadModels) -> list[Decision]:
        taken = {t.name for t in m.tokens.values()}
        free = next(n for n in (f"{name}-{i}" if i else name for i in range(len(taken) + 1))
                    if n not in taken)  # fmt: skip
        return auth.create_token(m, free, role, [], token, actor, node)

    await control.run(decide, structural=True)
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.replace(partial, path)
    return token
