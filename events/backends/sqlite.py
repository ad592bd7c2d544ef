"""The SQLite backend: the embedded default.

One file, WAL journal, `synchronous=FULL` (a committed append survives power loss), one writer
connection on its own thread and one reader connection on another, so reads never wait for a
commit. `BEGIN IMMEDIATE` takes the write lock before the head is read, so positions are
assigned in commit order; the writer epoch lives in the same `log_head` row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from batchd.events import errors
from batchd.events.backends import LOG_COLUMNS, lacking
from batchd.events.envelope import Head, uuid_of_bytes
from batchd.events.store import AppendRequest, BatchPlan, Prepare, Snapshot

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 65_536  # page cache per connection: index pages of a large log stay in memory
SCAN_CACHE_KIB = 2_048  # page cache of the connection that reads the log through, page by page
WAL_CHECKPOINT_PAGES = 10_000  # checkpoint every ~40 MB of WAL instead of SQLite's ~4 MB

logger = structlog.get_logger(__name__)

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE events (
        position       INTEGER PRIMARY KEY,
        event_id       BLOB    NOT NULL UNIQUE,
        stream         TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        type           TEXT    NOT NULL,
        schema         INTEGER NOT NULL,
        recorded_at    INTEGER NOT NULL,   -- microseconds since the Unix epoch, UTC
        actor          TEXT    NOT NULL,
        correlation_id BLOB,
        causation_id   BLOB,
        data           BLOB    NOT NULL,   -- msgpack
        hash           BLOB    NOT NULL,
        UNIQUE (stream, version)
    );
    CREATE TABLE log_head (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        position    INTEGER NOT NULL,
        hash        BLOB    NOT NULL,
        recorded_at INTEGER NOT NULL,
        epoch       INTEGER NOT NULL
    );
    INSERT INTO log_head VALUES (1, 0, zeroblob(32), 0, 0);
    CREATE TABLE snapshots (
        projection TEXT    NOT NULL,
        position   INTEGER NOT NULL,
        format     INTEGER NOT NULL,
        code_hash  TEXT    NOT NULL,
        state      BLOB    NOT NULL,
        PRIMARY KEY (projection, position)
    );
    """,
}

_COLUMNS = (
    "position, event_id, stream, version, type, schema, recorded_at, actor, "
    "correlation_id, causation_id, data, hash"
)
_SELECT_COLUMNS = (
    'position, event_id AS "event_id [batchd_uuid]", stream, version, type, schema, '
    'recorded_at, actor, correlation_id AS "correlation_id [batchd_uuid]", '
    'causation_id AS "causation_id [batchd_uuid]", data, hash'
)
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_READ = f"SELECT {_SELECT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
_FOLD_COLUMNS = (  # read_rows(full=False): the ids and the hash left out, as NULLs
    "position, NULL, stream, version, type, schema, recorded_at, actor, NULL, NULL, data, NULL"
)
_READ_FOLD = f"SELECT {_FOLD_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
_RECORDED_AT = "SELECT recorded_at FROM events WHERE position = ?"
_READ_STREAM = (
    f"SELECT {_SELECT_COLUMNS} FROM events WHERE stream = ? AND version > ? ORDER BY version"
)
# A page of one stream after a position, as a range of the (stream, version) index: the version
# of the event at `after` when it is the stream's (every page but a first), else the last one
# at or before it (a scan, once); COALESCE evaluates no more than it needs.
_READ_STREAM_PAGE = (
    f"SELECT {_SELECT_COLUMNS} FROM events WHERE stream = ?1 AND version > coalesce("
    "(SELECT version FROM events WHERE position = ?2 AND stream = ?1), "
    "(SELECT max(version) FROM events WHERE stream = ?1 AND position <= ?2), 0) "
    "AND position <= ?3 ORDER BY version LIMIT ?4"
)
_HEAD = "SELECT position, hash, recorded_at, epoch FROM log_head WHERE id = 1"


_to_bytes = int.to_bytes  # uuid.bytes without the property (big-endian is the default)

# Reads name uuid columns "<column> [batchd_uuid]" so that sqlite3 converts them while it
# builds each row (connections open with PARSE_COLNAMES; NULLs are left as None).
sqlite3.register_converter("batchd_uuid", uuid_of_bytes)  # 16 bytes, as written here


class SqliteBackend:
    name = "sqlite"
    reads_ahead = False  # bulk reads run in the caller's thread (_scan)

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._scanner: sqlite3.Connection | None = None  # bulk reads: see _scan
        self._closed = False
        self._leader: int | None = None  # the leader lock's descriptor, while held
        self._rexec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        self._wexec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")

    def set_wakeup(self, callback: Callable[[], None]) -> None:
        pass  # other processes' appends are seen by polling

    # -- opening ---------------------------------------------------------------------------
    async def open(self, readonly: bool) -> None:
        try:
            if readonly:
                self._reader = await self._run_read(self._connect_readonly)
            else:
                self._writer = await self._run_write(self._connect_writer)
                self._reader = await self._run_read(self._connect, "rw")
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from None

    def _connect(self, mode: str) -> sqlite3.Connection:
        if os.path.isdir(self.path):
            raise errors.StoreError(
                f"cannot open log {self.path}: it is a directory (name a file in it, such as "
                f"{os.path.join(self.path, 'events.db')})"
            )
        path = urllib.parse.quote(Path(self.path).absolute().as_posix())
        uri = f"file:{path}?mode={mode}"
        conn = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            detect_types=sqlite3.PARSE_COLNAMES,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            raise errors.StoreError(f"no batchd log at {self.path}: the file does not exist")
        conn = self._connect("ro")
        version = self._schema_version(conn)
        if version is None:
            raise errors.StoreCorrupt(f"{self.path} is a SQLite file but not a batchd log")
        self._check_version(version)
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        directory = Path(self.path).absolute().parent
        if not directory.is_dir():
            raise errors.StoreError(f"cannot open log {self.path}: {directory} does not exist")
        mode = 0o600
        try:  # a new log is its owner's alone (its WAL too)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:  # one shared on purpose keeps its mode, but is told of
            mode = os.stat(self.path).st_mode & 0o777
        conn = self._connect("rwc")
        try:
            version = self._schema_version(conn)  # reads the header first: nothing written yet
            if version is not None:
                self._check_version(version)
                self._check_integrity(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            self._migrate(conn, version or 0)
        except BaseException:
            conn.close()
            raise
        if mode & 0o077:  # told once the file proved a log: a refusal stays one line
            logger.warning("log.readable_by_others", path=self.path, mode=f"{mode:04o}",
                           fix=f"chmod 600 {self.path}")  # fmt: skip
        return conn

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """Refuse to write to a damaged log (PRAGMA quick_check reads every page once)."""
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            found = "; ".join(" ".join(p.split()) for p in problems)  # one line
            raise errors.StoreCorrupt(f"{self.path} is damaged: {found}")

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "batchd_schema" not in tables:
            if tables:
                raise errors.StoreCorrupt(
                    f"{self.path} holds other tables ({', '.join(sorted(tables)[:3])}) "
                    "and no batchd log"
                )
            return None
        rows = conn.execute("SELECT version FROM batchd_schema").fetchall()
        newest = max((r[0] for r in rows if type(r[0]) is int), default=0)
        if newest > SCHEMA_VERSION:
            return newest  # a newer batchd's: its tables are its own (_check_version says so)
        columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")}
                   for t in LOG_COLUMNS if t in tables}  # fmt: skip
        damage = lacking(self.path, columns)  # (before anything is written, leadership too)
        if damage is not None:
            raise errors.StoreCorrupt(damage)
        if len(rows) != 1 or type(rows[0][0]) is not int or rows[0][0] < 1:
            held = f"{len(rows)} rows, not one version" if len(rows) > 1 else "no schema version"
            raise errors.StoreCorrupt(
                f"{self.path} is damaged: its batchd_schema table holds {held}"
            )
        return rows[0][0]

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise errors.SchemaVersionError(
                f"log {self.path} is at schema version {version}; this batchd knows up to "
                f"{SCHEMA_VERSION}: upgrade batchd"
            )

    def _migrate(self, conn: sqlite3.Connection, current: int) -> None:
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute("CREATE TABLE IF NOT EXISTS batchd_schema (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM batchd_schema")
                conn.execute("INSERT INTO batchd_schema VALUES (?)", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        self._closed = True
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        for conn, executor in ((self._writer, self._wexec), (self._reader, self._rexec)):
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        self._wexec.shutdown(wait=False)
        self._rexec.shutdown(wait=False)
        if self._leader is not None:
            os.close(self._leader)  # the lock frees with it
            self._leader = None

    # -- plumbing --------------------------------------------------------------------------
    async def _run_read(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._rexec, fn, *args)
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    async def _run_write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._wexec, fn, *args)

    def _translate(self, exc: sqlite3.Error) -> errors.StoreError:
        message = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in message or "malformed" in message
        ):
            return errors.StoreCorrupt(f"{self.path} is damaged or not a SQLite file: {message}")
        if isinstance(exc, sqlite3.OperationalError) and "Could not decode" in message:
            return errors.StoreCorrupt(f"log {self.path}: a stored value is not of its "
                                       f"column's type: {message}")  # fmt: skip
        if isinstance(exc, sqlite3.OperationalError):
            return errors.StoreUnavailable(f"log {self.path}: {message}")
        return errors.StoreError(f"log {self.path}: {message}")

    async def _read(self, sql: str, params: tuple) -> list[tuple]:
        def run() -> list[tuple]:
            return self._reader.execute(sql, params).fetchall()

        return await self._run_read(run)

    # -- head and epoch --------------------------------------------------------------------
    async def read_head(self) -> Head:
        def run() -> Head:
            return self._head(self._reader.execute(_HEAD).fetchone())

        return await self._run_read(run)

    def _head(self, row: tuple | None) -> Head:
        if row is None:
            raise errors.StoreCorrupt(f"{self.path} is damaged: its log_head row is missing")
        return Head(*row)

    async def try_lock_leader(self) -> bool:
        """An exclusive flock on `<real path>.leader` (SQLite's own locks are per
        transaction)."""
        if self._leader is not None:
            return True
        # (by the file's real path: a log reached through a link is the same log)
        lock = f"{os.path.realpath(self.path)}.leader"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._leader = fd
        return True

    async def take_epoch(self) -> Head:
        def run() -> Head:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE log_head SET epoch = epoch + 1 WHERE id = 1")
                head = self._head(conn.execute(_HEAD).fetchone())
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return head

        try:
            return await self._run_write(run)
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    # -- appending -------------------------------------------------------------------------
    async def commit(
        self, requests: Sequence[AppendRequest], epoch: int, prepare: Prepare
    ) -> BatchPlan:
        try:
            return await self._run_write(self._commit_sync, requests, epoch, prepare, False)
        except sqlite3.IntegrityError:
            pass  # some event id is stored already (a retried append): decide again knowing it
        except sqlite3.Error as exc:
            raise self._translate(exc) from None
        try:
            return await self._run_write(self._commit_sync, requests, epoch, prepare, True)
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    def _commit_sync(
        self, requests: Sequence[AppendRequest], epoch: int, prepare: Prepare, check_ids: bool
    ) -> BatchPlan:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = Head(*conn.execute(_HEAD).fetchone())
            if head.epoch != epoch:
                raise errors.FencedError(epoch, head.epoch)
            versions = self._versions(conn, requests)
            plan = prepare(head, versions, None)
            if check_ids or plan.conflicted:
                plan = prepare(head, versions, self._existing(conn, requests))
            if plan.rows:
                conn.executemany(_INSERT, [_to_sql_row(r) for r in plan.rows])
                conn.execute(
                    "UPDATE log_head SET position = ?, hash = ?, recorded_at = ? WHERE id = 1",
                    plan.head[:3],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return plan

    def _versions(self, conn: sqlite3.Connection, requests: Sequence[AppendRequest]) -> dict:
        streams = list({r.stream for r in requests})
        versions: dict[str, int] = {}
        for chunk in _chunks(streams):
            marks = ",".join("?" * len(chunk))
            sql = (
                f"SELECT stream, max(version) FROM events WHERE stream IN ({marks}) GROUP BY stream"
            )
            versions.update(conn.execute(sql, chunk).fetchall())
        return versions

    def _existing(self, conn: sqlite3.Connection, requests: Sequence[AppendRequest]) -> dict:
        existing = {}
        for chunk in _chunks([e.event_id.bytes for r in requests for e in r.events]):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, position, stream FROM events WHERE event_id IN ({marks})"
            for eid, position, stream in conn.execute(sql, chunk):
                existing[uuid_of_bytes(eid)] = (position, stream)
        return existing

    # -- reading ---------------------------------------------------------------------------
    async def read_rows(
        self, after: int, limit: int, full: bool = True, bulk: bool = False
    ) -> list[tuple]:
        sql = _READ if full else _READ_FOLD
        if bulk:  # (see EventStore.read_pages)
            return self._scan(sql, (after, limit))
        return await self._read(sql, (after, limit))

    def _scan(self, sql: str, params: tuple) -> list[tuple]:
        """A bulk read in the caller's thread, on a connection of its own (the reader's
        serves other readers in its thread meanwhile), with a small page cache: each page
        of the log is read once."""
        if self._closed:
            raise errors.StoreError(f"log {self.path}: the store has closed")
        try:
            if self._scanner is None:
                self._scanner = self._connect("ro")
                self._scanner.execute(f"PRAGMA cache_size = -{SCAN_CACHE_KIB}")
            return self._scanner.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    async def recorded_at(self, position: int) -> int:
        def run() -> int:
            return self._reader.execute(_RECORDED_AT, (position,)).fetchone()[0]

        return await self._run_read(run)

    async def read_stream_rows(self, stream: str, after_version: int) -> list[tuple]:
        return await self._read(_READ_STREAM, (stream, after_version))

    async def read_stream_page(
        self, stream: str, after: int, through: int, limit: int
    ) -> list[tuple]:
        return await self._read(_READ_STREAM_PAGE, (stream, after, through, limit))

    # -- snapshots -------------------------------------------------------------------------
    async def save_snapshot(self, snapshot: Snapshot, keep: int) -> None:
        def run() -> None:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?,?)", snapshot)
                conn.execute(
                    "DELETE FROM snapshots WHERE projection = ? AND position NOT IN "
                    "(SELECT position FROM snapshots WHERE projection = ? "
                    "ORDER BY position DESC LIMIT ?)",
                    (snapshot.projection, snapshot.projection, keep),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        try:
            await self._run_write(run)
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    async def load_snapshot(self, projection: str, upto: int) -> Snapshot | None:
        def run():
            return self._reader.execute(
                "SELECT projection, position, format, code_hash, state FROM snapshots "
                "WHERE projection = ? AND position <= ? ORDER BY position DESC LIMIT 1",
                (projection, upto),
            ).fetchone()

        row = await self._run_read(run)
        return None if row is None else Snapshot(*row)


def _to_sql_row(row: tuple) -> tuple:
    position, event_id, stream, version, type_, schema, at, actor, corr, caus, data, hash_ = row
    return (
        position, _to_bytes(event_id.int, 16), stream, version, type_, schema, at, actor,
        None if corr is None else corr.bytes, None if caus is None else caus.bytes, data, hash_,
    )  # fmt: skip


def _chunks(items: list, size: int = 500):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
