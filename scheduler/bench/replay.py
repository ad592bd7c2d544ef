"""`batchd bench replay`: how fast the log can be read back and folded into read models.

If the log is empty, a synthetic one of about `--events` events (workload.py) is appended first,
untimed: one event per append, as a daemon makes them, with up to 500 appends in flight at once
so that group commit batches them. A non-empty log is replayed as it is.

The timed part reads every event with `read_all(after, limit=5000)` (decoding and upcasting
included) and folds it: `--projections none` counts events per type; `--projections all` feeds
every projection the project defines (`load_projections`), or falls back to counting (and says
so) while none is defined.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from batchd.events import urls
from batchd.events.envelope import RecordedEvent
from batchd.events.store import EventStore
from batchd.scheduler.bench import append, workload

PAGE = 5000  # events per read_all
APPENDS_IN_FLIGHT = 500  # events appended concurrently while generating
REGISTRY = "batchd.projections.registry"  # module whose PROJECTIONS replay --projections all runs
NO_PROJECTIONS = "none (no projections defined yet)"

Fold = Callable[[list[RecordedEvent]], None]


async def main(args: argparse.Namespace) -> int:
    """Run the replay benchmark and print its result (one JSON line with --json)."""
    async with append.bench_store(args.store) as url:
        result, generated = await run(url, args.events, args.projections)
    print(json.dumps(result) if args.json else _summary(result, generated, url))
    return 0


async def run(url: str, events: int, projections: str) -> tuple[dict, int]:
    """Replay the log at `url`, after generating about `events` events if it is empty.

    Returns the result and how many events were generated (0: the log was replayed as found).
    """
    store = await urls.open_store(url, codec=append.bench_codec())
    try:
        generated = 0
        if (await store.head()).position == 0:
            generated = await generate(store, events)
            gc.collect()  # the generator's garbage is not the replay's
        fold, label = _fold(projections)
        count, seconds = await replay(store, fold)
    finally:
        await store.close()
    result = {
        "bench": "replay", "store": store.backend.name, "events": count,
        "seconds": round(seconds, 4), "events_per_s": round(count / seconds, 1),
        "projections": label,
    }  # fmt: skip
    return result, generated


async def generate(store: EventStore, events: int, seed: int = 7) -> int:
    """Append `workload.cluster_log(events, seed)` to `store`; return the events appended."""
    versions: dict[str, int] = {}
    pending: list = []
    in_flight = total = 0
    for stream, batch in workload.cluster_log(events, seed):
        if in_flight + len(batch) > APPENDS_IN_FLIGHT:
            await asyncio.gather(*pending)
            pending, in_flight = [], 0
        expected = versions.get(stream, 0)
        versions[stream] = expected + len(batch)
        pending.append(store.append(stream, batch, expected))
        in_flight += len(batch)
        total += len(batch)
    await asyncio.gather(*pending)
    return total


async def replay(store: EventStore, fold: Fold) -> tuple[int, float]:
    """Read every event page by page and fold it; return (events, seconds)."""
    count = 0
    started = time.perf_counter()
    async for page in store.read_pages(0, limit=PAGE):
        fold(page)
        count += len(page)
    return count, time.perf_counter() - started


def _fold(projections: str) -> tuple[Fold, str]:
    if projections == "all":
        found = load_projections()
        if found:
            return _projection_fold(found), f"all ({', '.join(_name(p) for p in found)})"
        return _count_fold(), NO_PROJECTIONS
    return _count_fold(), "none"


def load_projections() -> Sequence[Any]:
    """The hook: `batchd.projections.registry.PROJECTIONS`, or () while it is not defined.

    Each projection has `initial()` (a fresh state) and `apply(state, event)` returning the new
    state, or None when it changed the state in place (see DESIGN.md, "Read models").
    """
    try:
        registry = importlib.import_module(REGISTRY)
    except ModuleNotFoundError as exc:
        if exc.name is not None and REGISTRY.startswith(exc.name):
            return ()
        raise
    return tuple(getattr(registry, "PROJECTIONS", ()))


def _count_fold() -> Fold:
    counts: collections.Counter[str] = collections.Counter()

    def fold(page: list[RecordedEvent]) -> None:
        for event in page:
            counts[event.type] += 1

    return fold


def _projection_fold(projections: Sequence[Any]) -> Fold:
    states = [p.initial() for p in projections]
    steps = list(enumerate(p.apply for p in projections))

    def fold(page: list[RecordedEvent]) -> None:
        for event in page:
            for i, apply in steps:
                state = apply(states[i], event)
                if state is not None:
                    states[i] = state

    return fold


def _name(projection: Any) -> str:
    return str(getattr(projection, "name", None) or getattr(projection, "__name__", projection))


def _summary(result: dict, generated: int, url: str) -> str:
    lines = []
    if generated:
        lines.append(f"generated {generated:,} events (not timed)")
    lines.append(
        f"bench replay: {result['events']:,} events in {result['seconds']:.3f} s = "
        f"{result['events_per_s']:,.0f} events/s, projections {result['projections']}, "
        f"store {urls.parse(url)}"
    )
    return "\n".join(lines)
