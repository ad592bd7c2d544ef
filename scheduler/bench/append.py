"""`batchd bench append`: append throughput through batchd, against the bare database driver.

The batchd path: `writers` tasks, each making sequential `store.append(stream, events, 0)`
calls of `batch` events on a fresh stream per call, with the payload mix of a real cluster
(workload.py) and a codec that seals secrets. Everything is built before the clock starts, so
the time covers encoding, sealing, group commit, hashing and the database.

The bare-driver baseline inserts the very rows batchd stored (read back with `iter_rows`, so
the bytes are identical) into a scratch table of the same shape and indexes, one connection,
sequential transactions of `batch` rows, with the column arrays prepared beforehand:

- sqlite: `sqlite3`, the same pragmas (WAL, synchronous=FULL), BEGIN / executemany / COMMIT;
- postgres: asyncpg, one `INSERT ... SELECT * FROM unnest(...)` per batch, each statement its
  own (implicit) transaction, into a regular logged table created `LIKE events INCLUDING ALL`;
- memory: appends to a Python list.

The scratch table is dropped afterwards. Without `--store` the log is a temporary SQLite file;
a `--store` log must be empty (checked before anything is built). Every event is held in memory
(the plan, then the rows read back): about 3 KB each, hence the CLI's cap on `--events`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg

from batchd.events import codec, secrets, urls
from batchd.events.envelope import NewEvent
from batchd.events.store import EventStore
from batchd.scheduler.bench import workload
from batchd.scheduler.bench.api import BenchError

Plan = list[list[tuple[str, list[NewEvent]]]]  # per writer: its (stream, events) appends

_COLUMNS = (
    "position, event_id, stream, version, type, schema, recorded_at, actor, "
    "correlation_id, causation_id, data, hash"
)
_UNNEST = (
    "$1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::integer[], "
    "$7::bigint[], $8::text[], $9::uuid[], $10::uuid[], $11::bytea[], $12::bytea[]"
)


async def main(args: argparse.Namespace) -> int:
    """Run the append benchmark and print its result (one JSON line with --json)."""
    async with bench_store(args.store) as url:
        result = await run(url, args.events, args.batch, args.writers)
    print(json.dumps(result) if args.json else _summary(result, url))
    return 0


@contextlib.asynccontextmanager
async def bench_store(url: str | None) -> AsyncIterator[str]:
    """`url` (checked), or the URL of a fresh temporary SQLite file removed afterwards."""
    if url:
        urls.parse(url)
        yield url
        return
    directory = tempfile.mkdtemp(prefix="batchd-bench-")
    try:
        yield f"sqlite:///{directory}/bench.db"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


BENCH_KEY = hashlib.sha256(b"batchd bench: a key for made-up logs only").digest()


def bench_codec() -> codec.Codec:
    """A codec with a key, so that secret fields and snapshots are sealed as in production
    (the same key in every run: a log generated once keeps a snapshot later runs can open)."""
    return codec.Codec(secrets.Keyring({"bench": BENCH_KEY}, "bench"))


async def run(url: str, events: int, batch: int, writers: int) -> dict:
    """Time `events` appends through batchd at `url`, then the same rows through the driver."""
    store = await urls.open_store(url, codec=bench_codec())
    try:
        start = (await store.head()).position
        if start:  # the made-up events would stay, and taking leadership fences its daemon
            raise BenchError(f"{urls.parse(url)} holds {start} events: bench append writes "
                             "made-up ones and takes the log's leadership; give it an empty "
                             "scratch log (or no --store: a temporary one)")  # fmt: skip
        plan = build_plan(events, batch, writers)  # (only once the log is known to be usable)
        await store.take_leadership()
        seconds = await _time_appends(store, plan)
        rows = [row async for row in store.iter_rows(after=start)]
    finally:
        await store.close()
    if len(rows) != events:
        raise ValueError(f"expected {events} new events in the log, found {len(rows)}")
    raw_seconds = await _time_raw(store, rows, batch)
    events_per_s = round(events / seconds, 1)
    raw_events_per_s = round(events / raw_seconds, 1)
    return {  # the ratio is of the figures printed, so a reader's division agrees with it
        "bench": "append", "store": store.backend.name, "events": events, "batch": batch,
        "writers": writers, "seconds": round(seconds, 4), "events_per_s": events_per_s,
        "raw_seconds": round(raw_seconds, 4), "raw_events_per_s": raw_events_per_s,
        "ratio": round(events_per_s / raw_events_per_s, 4),
    }  # fmt: skip


def build_plan(events: int, batch: int, writers: int) -> Plan:
    """The appends of each writer: `batch` events per append, each on a new stream."""
    mix = workload.payload_mix(events)
    run_id = uuid.uuid4().hex[:8]
    plan: Plan = [[] for _ in range(writers)]
    for n, offset in enumerate(range(0, events, batch)):
        writer = n % writers
        plan[writer].append((f"bench-{run_id}-{writer}-{n}", mix[offset : offset + batch]))
    return plan


async def _time_appends(store: EventStore, plan: Plan) -> float:
    gc.collect()
    gc.freeze()  # the prepared inputs are the benchmark's, not batchd's: keep them out of GC scans
    try:
        started = time.perf_counter()
        await asyncio.gather(*(_write(store, appends) for appends in plan))
        return time.perf_counter() - started
    finally:
        gc.unfreeze()


async def _write(store: EventStore, appends: list[tuple[str, list[NewEvent]]]) -> None:
    for stream, events in appends:
        await store.append(stream, events, 0)


# -- the bare driver ---------------------------------------------------------------------------
async def _time_raw(store: EventStore, rows: list[tuple], batch: int) -> float:
    backend = store.backend
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    try:
        if backend.name == "sqlite":
            return _raw_sqlite(backend.path, chunks)
        if backend.name == "postgres":
            return await _raw_postgres(backend.dsn, chunks)
    except (sqlite3.Error, asyncpg.PostgresError, OSError) as exc:
        raise ValueError(f"the bare-driver baseline failed: {exc}") from None
    return _raw_memory(chunks)


def _scratch_name() -> str:
    return f"bench_raw_{uuid.uuid4().hex[:12]}"


def _raw_sqlite(path: str, chunks: Sequence[list[tuple]]) -> float:
    table = _scratch_name()
    sql_chunks = [[_sqlite_row(r) for r in chunk] for chunk in chunks]
    insert = f"INSERT INTO {table} ({_COLUMNS}) VALUES ({','.join('?' * 12)})"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for statement in _sqlite_ddl(conn, table):
            conn.execute(statement)
        started = time.perf_counter()
        for chunk in sql_chunks:
            conn.execute("BEGIN")
            conn.executemany(insert, chunk)
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()


def _sqlite_ddl(conn: sqlite3.Connection, table: str) -> list[str]:
    """The events table's own CREATE statements (table, then indexes), renamed to `table`."""
    found = conn.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' AND sql IS NOT NULL "
        "ORDER BY type = 'index'"
    ).fetchall()
    if not found:
        raise ValueError("the SQLite file holds no events table")
    return [re.sub(r"\bevents(?=\b|_)", table, sql) for (sql,) in found]


def _sqlite_row(row: tuple) -> tuple:
    """A row as sqlite3 stores it: uuids as their 16 bytes."""
    corr, caus = row[8], row[9]
    return (
        row[0], row[1].bytes, *row[2:8],
        None if corr is None else corr.bytes, None if caus is None else caus.bytes,
        row[10], row[11],
    )  # fmt: skip


async def _raw_postgres(dsn: str, chunks: Sequence[list[tuple]]) -> float:
    table = _scratch_name()
    columns = [list(zip(*chunk, strict=True)) for chunk in chunks]
    insert = f"INSERT INTO {table} ({_COLUMNS}) SELECT * FROM unnest({_UNNEST})"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (LIKE events INCLUDING ALL)")
        started = time.perf_counter()
        for arrays in columns:
            await conn.execute(insert, *arrays)
        return time.perf_counter() - started
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def _raw_memory(chunks: Sequence[list[tuple]]) -> float:
    table: list[tuple] = []
    started = time.perf_counter()
    for chunk in chunks:
        for row in chunk:
            table.append(row)
    return time.perf_counter() - started


def _summary(result: dict, url: str) -> str:
    writers = result["writers"]
    return "\n".join(
        [
            f"bench append: {result['events']:,} events, {result['batch']} per append, "
            f"{writers} writer{'s' if writers > 1 else ''}, store {urls.parse(url)}",
            f"  batchd       {result['seconds']:9.3f} s  {result['events_per_s']:>12,.0f} events/s",
            f"  bare driver  {result['raw_seconds']:9.3f} s  "
            f"{result['raw_events_per_s']:>12,.0f} events/s  (same rows, same table shape)",
            f"  batchd / bare driver: {result['ratio']:.2f}",
        ]
    )
