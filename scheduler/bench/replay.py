"""`batchd bench replay`: how fast the log can be read back and folded into read models.

If the log is empty, a synthetic one of about `--events` events (workload.py) is appended first,
untimed: one event per append, as a daemon makes them, with up to 500 appends in flight at once
so that group commit batches them. A non-empty log is opened read-only and replayed as it is.

`--projections none` times reading every event (`read_pages`, decoding and upcasting
included) and counting events per type. `--projections all` does that too (reported as
`none_events_per_s`, and `ratio` = all / none), then times the daemon's own start-up work with
the projection runner:

- `rebuild_s`: every read model from scratch (snapshots ignored); `events_per_s` is based on it;
- `restore_s`: the newest snapshot, then catch-up to the head. A log this run generated gets
  one first, saved into it untimed (`snapshot_saved`: its position) `SNAPSHOT_EVERY` events
  before the head (or at 90 % of a shorter log), where a daemon taking one every
  `SNAPSHOT_EVERY` events would have it at worst. A log found non-empty is never written to:
  without a snapshot this batchd can use (a daemon saves one every `SNAPSHOT_EVERY` events),
  `restore_s`, `snapshot_position` and `caught_up` are null and `note` says why.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import time

from batchd.events import errors, urls
from batchd.events.store import EventStore
from batchd.projections import snapshot
from batchd.projections.runner import SNAPSHOT_EVERY, Runner, Unsealed, opened, usable
from batchd.scheduler.bench import append, workload

PAGE = 5000  # events per read_all
APPENDS_IN_FLIGHT = 500  # events appended concurrently while generating


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
    store = await _open(url)
    try:
        generated = 0
        if not store.readonly:  # (an empty log, or none yet)
            generated = await generate(store, events)
        gc.collect()  # the generator's garbage is not the replay's
        result = {"bench": "replay", "store": store.backend.name}
        if projections == "all":
            result.update(await fold_all(store, save_snapshot=generated > 0))
        else:
            count, seconds = await read_and_count(store)
            result.update(events=count, seconds=round(seconds, 4), projections="none")
            result["events_per_s"] = round(count / seconds, 1)
    finally:
        await store.close()
    return result, generated


async def _open(url: str) -> EventStore:
    """The log at `url` read-only (a log that holds events is never written to); opened for
    writing (created if need be) only when there is none there yet, or it is empty, so that
    one can be generated into it."""
    try:
        store = await urls.open_store(url, readonly=True, codec=append.bench_codec())
    except errors.StoreError as exc:
        if type(exc) is not errors.StoreError and not _empty_file(url):  # (unreachable,
            raise  # damaged, newer schema ...; an empty file, made by touch, is no log yet)
    else:
        if (await store.head()).position:
            return store
        await store.close()
    return await urls.open_store(url, codec=append.bench_codec())


def _empty_file(url: str) -> bool:
    """Is the SQLite log at `url` a file of 0 bytes (no log in it yet)?"""
    where = urls.parse(url)
    return (
        where.scheme == "sqlite"
        and os.path.isfile(where.target)
        and (os.path.getsize(where.target) == 0)
    )


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


async def read_and_count(store: EventStore) -> tuple[int, float]:
    """Read every event page by page and count them by type; return (events, seconds)."""
    counts: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    async for page in store.read_pages(0, limit=PAGE):
        for event in page:
            counts[event.type] += 1
    return sum(counts.values()), time.perf_counter() - started


async def fold_all(store: EventStore, save_snapshot: bool) -> dict:
    """Read the log (as `none` does), rebuild every read model from scratch, then restore
    from a snapshot; time all three. Without a usable snapshot, one is saved first if
    `save_snapshot` (the log is the benchmark's own), else restore is not timed."""
    head = (await store.head()).position
    _count, read_s = await read_and_count(store)
    gc.collect()
    started = time.perf_counter()
    rebuilt = Runner(store, use_snapshots=False)
    await rebuilt.restore()
    rebuild_s = time.perf_counter() - started
    models = rebuilt.models
    del rebuilt
    gc.collect()
    result = {
        "events": head, "seconds": round(rebuild_s, 4),
        "events_per_s": round(head / rebuild_s, 1) if rebuild_s else 0.0,
        "none_events_per_s": round(head / read_s, 1) if read_s else 0.0,
        "ratio": round(read_s / rebuild_s, 4) if rebuild_s else 0.0,
        "rebuild_s": round(rebuild_s, 4), "restore_s": None, "snapshot_position": None,
        "caught_up": None, "snapshot_saved": None,
        "jobs": len(models.jobs), "nodes": len(models.nodes), "projections": "all",
    }  # fmt: skip
    del models
    if not await _usable_snapshot(store):
        if not save_snapshot:
            result["note"] = NO_SNAPSHOT
            return result
        base = Runner(store, use_snapshots=False)
        await base.restore(upto=max(0, head - min(SNAPSHOT_EVERY, head // 10)))
        await base.save_snapshot()
        result["snapshot_saved"] = base.models.position
        del base
        gc.collect()
    started = time.perf_counter()
    restored = Runner(store)
    info = await restored.restore()
    restore_s = time.perf_counter() - started
    result.update(restore_s=round(restore_s, 4), snapshot_position=info.snapshot_position,
                  caught_up=info.replayed)  # fmt: skip
    return result


NO_SNAPSHOT = (
    "restore not timed: the log holds no snapshot this batchd can use, and bench replay saves "
    "one only into a log it generated (a daemon saves one every "
    f"{SNAPSHOT_EVERY:,} events)"
)


async def _usable_snapshot(store: EventStore) -> bool:
    stored = await store.load_snapshot(snapshot.NAME)
    if not usable(stored):
        return False
    try:
        await opened(store, stored)
    except Unsealed:
        return False
    return True


def _summary(result: dict, generated: int, url: str) -> str:
    lines = []
    if generated:
        lines.append(f"generated {generated:,} events (not timed)")
    lines.append(
        f"bench replay: {result['events']:,} events in {result['seconds']:.3f} s = "
        f"{result['events_per_s']:,.0f} events/s, projections {result['projections']}, "
        f"store {urls.parse(url)}"
    )
    if result.get("snapshot_saved") is not None:
        lines.append(
            f"saved a read-models snapshot at position {result['snapshot_saved']:,} into the "
            "generated log (not timed)"
        )
    if "rebuild_s" in result:
        restore = result.get("note") or (
            f"restore from the snapshot at {result['snapshot_position']:,} and catch up "
            f"{result['caught_up']:,} events {result['restore_s']:.3f} s"
        )
        lines.append(f"rebuild from scratch {result['rebuild_s']:.3f} s; {restore}")
    return "\n".join(lines)
