"""The PostgreSQL backend (asyncpg): production and high availability.

Ordering. Every append updates the one-row `log_head` (position, hash, recorded_at, epoch) in
the same statement that inserts its events. The row lock that UPDATE takes is held until
commit, so appends commit one after another in position order: positions are gapless and in
commit order, and a reader that has seen position N has seen everything before it. Readers
therefore never need gap detection or a high-water mark (see docs/event-log.md).

Writing. The writer caches the head it last wrote and sends one statement per batch:

    WITH h AS (UPDATE log_head SET ... WHERE epoch = $mine AND position = $cached RETURNING 1)
    INSERT INTO events SELECT ... WHERE EXISTS (SELECT 1 FROM h)

A batch of COPY_ROWS events or more runs the same check as an UPDATE of the head, then COPYs
its rows, in one transaction (COPY costs the server far less than INSERT of arrays).
If another writer took over (epoch changed) or wrote (position changed), nothing is inserted:
the backend rereads the head and raises FencedError, or retries with fresh facts. The facts a
batch needs (stream versions, already-stored event ids) are read just before, and are still
true when the statement succeeds, because every write moves the head. For the same reason the
writer also caches the stream versions it read or wrote while its cached head stands: nobody
else can have written meanwhile. A stream it does not know, appended with NO_STREAM, is
assumed new (UNIQUE(stream, version) refuses version 1 if it is not, and the batch is then
decided again from the tables). So a one-event append is usually one statement. A version
conflict found against cached or assumed versions is rechecked against the table before it
is reported; the cache is dropped whenever the cached head is.

Waking. Each batch sends `NOTIFY batchd_events, '<head position>'` in its transaction. The
notification is only a hint: a listener connection (reconnecting in a loop) pokes
subscribers, which then read from their own position; they also poll as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence

import asyncpg
import structlog

from batchd.events import errors
from batchd.events.backends import LOG_COLUMNS, lacking
from batchd.events.envelope import NO_STREAM, Head
from batchd.events.store import AppendRequest, BatchPlan, Prepare, Snapshot

logger = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
CHANNEL = "batchd_events"
LEADER_LOCK = 0x6261_7463_6864_0001  # the advisory lock key of a log's leader ("batchd", 1)
# The server probes the leader's lock connection, so that the lock of a leader whose machine
# died or was cut off frees within about 30 s (a standby takes over), not after the system's
# default of two hours.
LEADER_KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                    "tcp_keepalives_count": "4"}  # fmt: skip
MIGRATION_LOCK = 0x62617463  # advisory lock key held while migrating ("batc")
WRITE_ATTEMPTS = 3
LISTEN_BACKOFF = 0.5  # seconds between listener reconnects
CONNECT_TIMEOUT = 10.0  # seconds
UNLOCK_TIMEOUT = 2.0  # seconds a stopping leader's lock connection has to free its lock
VERSION_CACHE = 100_000  # streams whose version the writer remembers
COPY_ROWS = 64  # a batch of at least this many events is stored with COPY
WRITER_IDLE = 60.0  # seconds: the writer's connection is opened again after this long unused
WRITE_TIMEOUT = 60.0  # seconds a write statement may take before its connection is dropped

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE events (
        position       bigint  PRIMARY KEY,
        event_id       uuid    NOT NULL UNIQUE,
        stream         text    NOT NULL,
        version        bigint  NOT NULL,
        type           text    NOT NULL,
        schema         integer NOT NULL,
        recorded_at    bigint  NOT NULL,   -- microseconds since the Unix epoch, UTC
        actor          text    NOT NULL,
        correlation_id uuid,
        causation_id   uuid,
        data           bytea   NOT NULL,   -- msgpack
        hash           bytea   NOT NULL,
        UNIQUE (stream, version)
    );
    CREATE TABLE log_head (
        id          smallint PRIMARY KEY CHECK (id = 1),
        position    bigint   NOT NULL,
        hash        bytea    NOT NULL,
        recorded_at bigint   NOT NULL,
        epoch       bigint   NOT NULL
    );
    INSERT INTO log_head VALUES (1, 0, decode(repeat('00', 32), 'hex'), 0, 0);
    CREATE TABLE snapshots (
        projection text    NOT NULL,
        position   bigint  NOT NULL,
        format     integer NOT NULL,
        code_hash  text    NOT NULL,
        state      bytea   NOT NULL,
        PRIMARY KEY (projection, position)
    );
    """,
}

_COLUMNS = (
    "position, event_id, stream, version, type, schema, recorded_at, actor, "
    "correlation_id, causation_id, data, hash"
)
_HEAD = "SELECT position, hash, recorded_at, epoch FROM log_head WHERE id = 1"
_TAKE_EPOCH = (
    "UPDATE log_head SET epoch = epoch + 1 WHERE id = 1 "
    "RETURNING position, hash, recorded_at, epoch"
)
_VERSIONS = "SELECT stream, max(version) FROM events WHERE stream = ANY($1::text[]) GROUP BY stream"
_EXISTING = (
    "SELECT e.event_id, e.position, e.stream "
    "FROM unnest($1::uuid[]) AS i(id) JOIN events e ON e.event_id = i.id"
)
_TYPES = ("bigint", "uuid", "text", "bigint", "text", "integer", "bigint", "text", "uuid", "uuid",
          "bytea", "bytea")  # fmt: skip


# moves the head to ($3, $4, $5) only if it is still where this writer left it ($1, $2)
_MOVE = """
WITH h AS (
    UPDATE log_head SET position = $3, hash = $4, recorded_at = $5
    WHERE id = 1 AND epoch = $1 AND position = $2
    RETURNING position
)"""


def _write(rows: str) -> str:
    """The one statement of a batch: move the head if it is still where this writer left it,
    insert `rows` (a SELECT over $6...$17) only then, and NOTIFY."""
    return f"""{_MOVE}, ins AS (
    INSERT INTO events ({_COLUMNS})
    {rows}
    WHERE EXISTS (SELECT 1 FROM h)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT pg_notify('{CHANNEL}', position::text) FROM h) IS NULL AS notified
"""


_PARAMS = list(enumerate(_TYPES, start=6))
_WRITE = _write(f"SELECT * FROM unnest({', '.join(f'${n}::{t}[]' for n, t in _PARAMS)})")
_WRITE_ONE = _write(f"SELECT {', '.join(f'${n}::{t}' for n, t in _PARAMS)}")  # scalars: cheaper
_MOVE_HEAD = f"{_MOVE}\nSELECT pg_notify('{CHANNEL}', position::text) FROM h"
_COPY_COLUMNS = tuple(_COLUMNS.split(", "))
_READ = f"SELECT {_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
_FOLD_COLUMNS = (  # read_rows(full=False): the ids and the hash left out, as NULLs
    "position, NULL::uuid, stream, version, type, schema, recorded_at, actor, NULL::uuid, "
    "NULL::uuid, data, NULL::bytea"
)
_READ_FOLD = f"SELECT {_FOLD_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
_READ_STREAM = f"SELECT {_COLUMNS} FROM events WHERE stream = $1 AND version > $2 ORDER BY version"
# A page of one stream after a position, as a range of the (stream, version) index: the version
# of the event at `after` when it is the stream's (every page but a first), else the last one
# at or before it (a scan, once); COALESCE evaluates no more than it needs.
_READ_STREAM_PAGE = (
    f"SELECT {_COLUMNS} FROM events WHERE stream = $1 AND version > coalesce("
    "(SELECT version FROM events WHERE position = $2 AND stream = $1), "
    "(SELECT max(version) FROM events WHERE stream = $1 AND position <= $2), 0) "
    "AND position <= $3 ORDER BY version LIMIT $4"
)
_RECORDED_AT = "SELECT recorded_at FROM events WHERE position = $1"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: pooled connections keep no session state (no LISTEN, no session locks or
    settings; the listener has its own connection), so nothing is reset on release and a
    one-event append costs no extra round trip. asyncpg still rolls back an open transaction.
    """


def _quotes_userinfo(message: str, dsn: str) -> bool:
    """Does a driver's message quote a piece of the URL's user name or password (everything
    before its host's @)?"""
    userinfo = dsn.partition("//")[2].rpartition("@")[0]
    quoted = message.split("'")[1::2]
    return bool(userinfo) and any(piece and piece in userinfo for piece in quoted)


_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    # too many connections, disk full, out of memory: the server's limits, for now
    asyncpg.exceptions.InsufficientResourcesError,
    # asyncpg's protocol state can be left inconsistent when the server ends a connection
    # in the middle of an operation (pg_terminate_backend, failover)
    asyncpg.exceptions._base.InternalClientError,
)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password (in the user part, or as a `password=` or `sslpassword=`
    parameter) replaced by ***, for messages and logs."""
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return scheme + sep + _QUERY_PASSWORD.sub(r"\1***", rest)


_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


async def _let_go(conn: asyncpg.Connection) -> None:
    """End a lock connection, its locks freed first: the server frees a session's locks only
    once it sees the session end, a moment after the client drops it, and a standby asking
    then would be refused. A connection that does not answer is just dropped."""
    try:
        await conn.execute("SELECT pg_advisory_unlock_all()", timeout=UNLOCK_TIMEOUT)
    except (asyncpg.PostgresError, *_UNAVAILABLE):
        pass
    finally:
        conn.terminate()


async def _ask_lock(conn: asyncpg.Connection) -> bool:
    """pg_try_advisory_lock of the leader lock on `conn` (closed if that fails)."""
    try:
        return await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK,
                                   timeout=CONNECT_TIMEOUT)  # fmt: skip
    except BaseException:
        conn.terminate()
        raise


class PostgresBackend:
    name = "postgres"
    reads_ahead = True

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._head: Head | None = None  # the head this writer last wrote (cache)
        self._versions: dict[str, int] = {}  # stream versions as of self._head (cache)
        self._wakeup: Callable[[], None] = lambda: None
        self._listener: asyncio.Task | None = None
        self._writer: asyncpg.Connection | None = None  # the connection appends use
        self._writer_used = 0.0  # when it last served an append (monotonic seconds)
        self._leader: asyncpg.Connection | None = None  # holds the leader lock (advisory)
        self._hopeful: asyncpg.Connection | None = None  # a standby's, asking for the lock
        self._closed = False

    def set_wakeup(self, callback: Callable[[], None]) -> None:
        self._wakeup = callback

    def _translate(self, exc: BaseException) -> errors.StoreError:
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return errors.StoreError(f"cannot open log {self.where}: {exc}")
        if isinstance(
            exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
        ):
            return errors.StoreError(f"cannot open log {self.where}: authentication failed ({exc})")
        if isinstance(exc, _UNAVAILABLE):
            reason = str(exc) or type(exc).__name__
            return errors.StoreUnavailable(f"log {self.where} unreachable: {reason}")
        return errors.StoreError(f"log {self.where}: {exc}")

    # -- opening ---------------------------------------------------------------------------
    async def open(self, readonly: bool) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT,
                reset=_keep_session,
            )
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise self._translate(exc) from None
        except ValueError as exc:  # asyncpg's DSN parser (what it quotes may be a password's)
            said = "it cannot be parsed" if _quotes_userinfo(str(exc), self.dsn) else str(exc)
            raise errors.StoreUrlError(f"malformed PostgreSQL URL {self.where}: {said}") from None
        try:
            async with self._pool.acquire() as conn:
                if readonly:
                    await self._check_readable(conn)
                else:
                    await self._migrate(conn)
        except BaseException:
            await self._pool.close()
            raise
        self._listener = asyncio.create_task(self._listen(), name="postgres-listener")

    async def _schema_version(self, conn: asyncpg.Connection) -> int | None:
        """The log's schema version; None where the database holds none of its tables.
        StoreCorrupt where it holds some and not others, or no version."""
        found = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
            sorted(LOG_COLUMNS),
        )
        columns: dict[str, set[str]] = {}
        for table, column in found:
            columns.setdefault(table, set()).add(column)
        present = set(columns)
        if not present:
            return None
        if "batchd_schema" not in present:
            raise errors.StoreCorrupt(
                f"{self.where} holds a table named {sorted(present)[0]} but no batchd log"
            )
        rows = await conn.fetch("SELECT version FROM batchd_schema")
        newest = max((r[0] for r in rows if r[0] is not None), default=0)
        if newest > SCHEMA_VERSION:
            return newest  # a newer batchd's: its tables are its own (_check_version says so)
        damage = lacking(f"log {self.where}", columns)
        if damage is not None:
            raise errors.StoreCorrupt(damage)
        if len(rows) != 1 or rows[0][0] is None or rows[0][0] < 1:
            held = f"{len(rows)} rows, not one version" if len(rows) > 1 else "no schema version"
            raise errors.StoreCorrupt(
                f"log {self.where} is damaged: its batchd_schema table holds {held}"
            )
        return rows[0][0]

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise errors.SchemaVersionError(
                f"log {self.where} is at schema version {version}; this batchd knows up to "
                f"{SCHEMA_VERSION}: upgrade batchd"
            )

    async def _check_readable(self, conn: asyncpg.Connection) -> None:
        try:
            version = await self._schema_version(conn)
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise self._translate(exc) from None
        if version is None:
            raise errors.StoreError(f"no batchd log in {self.where} (its tables do not exist)")
        self._check_version(version)

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        try:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                current = await self._schema_version(conn) or 0
                self._check_version(current)
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    await conn.execute(MIGRATIONS[version])
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS batchd_schema (version integer NOT NULL);"
                        "DELETE FROM batchd_schema;"
                        f"INSERT INTO batchd_schema VALUES ({version});"
                    )
        except errors.StoreError:
            raise
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise self._translate(exc) from None

    async def close(self) -> None:
        self._closed = True  # (a leadership check in flight takes no lock after this)
        if self._writer is not None:
            self._writer.terminate()
            self._writer = None
        for held in (self._leader, self._hopeful):
            if held is not None:
                await _let_go(held)
        self._leader = self._hopeful = None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pool is not None:
            await self._pool.close()

    async def _listen(self) -> None:
        """Keep a LISTEN connection; poke subscribers on every notification and reconnect.
        Its loss is logged once (`log.listener_lost`), and its return (`log.listener_back`)."""
        down = False  # lost, and not back yet
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, lambda *_a: self._wakeup())
                self._wakeup()  # listening again: subscribers reread from their position
                if down:
                    logger.info("log.listener_back", store=self.where)
                    down = False
                await lost.wait()
                error = "the server closed the connection"
            except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                error = str(exc) or type(exc).__name__
            finally:
                if conn is not None:
                    conn.terminate()
            if not down:
                logger.warning("log.listener_lost", store=self.where, error=error,
                               note="subscribers poll for new events until it is back")  # fmt: skip
                down = True
            await asyncio.sleep(LISTEN_BACKOFF)

    # -- plumbing --------------------------------------------------------------------------
    async def _fetch(self, sql: str, *args) -> list:
        async with self._connection() as conn:
            return await conn.fetch(sql, *args)

    @contextlib.asynccontextmanager
    async def _connection(self, translate: bool = True):
        """A pooled connection; after a connection failure it is discarded, not reused.

        Errors are translated into events.errors unless `translate` is False.
        """
        try:
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except _UNAVAILABLE:
                    # (one the server closed is back in the pool already: its proxy refuses)
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                    raise
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            if not translate:
                raise
            raise self._translate(exc) from None

    @contextlib.asynccontextmanager
    async def _write_connection(self):
        """The writer's own connection (appends are one at a time: no pool round trip); it is
        dropped, and opened again by the next append, after anything but a statement error,
        and after WRITER_IDLE seconds unused (a middlebox may drop a quiet connection without
        a word, and a write would then wait for TCP to give up)."""
        idle = time.monotonic() - self._writer_used
        if self._writer is not None and (self._writer.is_closed() or idle > WRITER_IDLE):
            self._writer.terminate()  # a quiet connection may have been dropped on the way
            self._writer = None
        if self._writer is None:
            self._writer = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT,
                                                 command_timeout=WRITE_TIMEOUT)  # fmt: skip
        try:
            yield self._writer
            self._writer_used = time.monotonic()
        except BaseException as exc:  # lost, or cancelled mid-statement: start afresh
            broken = isinstance(exc, _UNAVAILABLE) or not isinstance(exc, asyncpg.PostgresError)
            if broken and self._writer is not None:
                self._writer.terminate()
                self._writer = None
            raise

    # -- head and epoch --------------------------------------------------------------------
    async def read_head(self) -> Head:
        return self._head_of(await self._fetch(_HEAD))

    def _head_of(self, rows: list) -> Head:
        if not rows:
            raise errors.StoreCorrupt(f"log {self.where} is damaged: its log_head row is missing")
        return Head(*rows[0])

    async def try_lock_leader(self) -> bool:
        """A session advisory lock, held by a connection of its own for as long as it lives
        (if that connection is lost, so is the lock: a standby may then take over, and the
        epoch fences this writer). A standby asks again on the connection it asked on."""
        leader = self._leader
        if leader is not None:
            try:  # still held? (a connection lost with the server's restart frees the lock)
                await leader.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT)
                return True
            except (asyncpg.PostgresError, *_UNAVAILABLE):
                leader.terminate()
                self._check_open()  # (closed meanwhile: close let the lock go)
                self._leader = None
        conn, self._hopeful = self._hopeful, None
        held = None
        if conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, *_UNAVAILABLE):  # cut: ask anew
                held = await _ask_lock(conn)
        if held is None:
            self._check_open()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT,
                                             server_settings=LEADER_KEEPALIVE)  # fmt: skip
                held = await _ask_lock(conn)
            except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                raise self._translate(exc) from None
        if self._closed:  # closed while asking: the lock is not kept
            await _let_go(conn)
            self._check_open()
        if held:
            self._leader = conn
        else:
            self._hopeful = conn
        return held

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoreError(f"log {self.where}: the store has closed")

    async def take_epoch(self) -> Head:
        self._forget()
        self._head = self._head_of(await self._fetch(_TAKE_EPOCH))
        return self._head

    def _forget(self) -> None:
        """Drop the cached head and the stream versions that hold only as long as it does."""
        self._head = None
        self._versions = {}

    # -- appending -------------------------------------------------------------------------
    async def commit(
        self, requests: Sequence[AppendRequest], epoch: int, prepare: Prepare
    ) -> BatchPlan:
        recheck = False  # set once an insert violates a unique constraint
        for _attempt in range(WRITE_ATTEMPTS):
            head = self._head or await self.read_head()
            if head.epoch != epoch:
                raise errors.FencedError(epoch, head.epoch)
            try:
                plan = await self._try_commit(requests, head, prepare, recheck)
            except asyncpg.UniqueViolationError:
                plan = None  # a retried append, or another writer got in: decide again
                recheck = True
            except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                self._forget()  # ambiguous: the next batch rereads the head
                raise self._translate(exc) from None
            if plan is not None:
                self._head = plan.head
                self._remember_versions(plan)
                return plan
            self._forget()
        raise errors.StoreUnavailable(f"log {self.where}: the head kept moving under this writer")

    async def _try_commit(
        self, requests: Sequence[AppendRequest], head: Head, prepare: Prepare, recheck: bool
    ) -> BatchPlan | None:
        """One attempt; `recheck` (after a unique violation) reads every fact from the tables."""
        async with self._write_connection() as conn:
            if recheck:
                self._versions = {}
            versions, assumed = await self._stream_versions(conn, requests, assume=not recheck)
            plan = prepare(head, versions, None)
            if plan.conflicted and assumed:
                self._versions = {}  # a conflict is reported only as the table has it
                versions, _ = await self._stream_versions(conn, requests, assume=False)
                plan = prepare(head, versions, None)
            if recheck or plan.conflicted:
                ids = [e.event_id for r in requests for e in r.events]
                existing = {i: (p, s) for i, p, s in await conn.fetch(_EXISTING, ids)}
                plan = prepare(head, versions, existing)
            if not plan.rows:
                return plan
            if len(plan.rows) >= COPY_ROWS:
                return plan if await self._copy(conn, head, plan) else None
            if len(plan.rows) == 1:
                statement, values = _WRITE_ONE, plan.rows[0]
            else:
                statement, values = _WRITE, list(zip(*plan.rows, strict=True))
            new = plan.head
            inserted, _ = await conn.fetchrow(statement, head.epoch, head.position, new.position,
                                              new.hash, new.recorded_at, *values)  # fmt: skip
        return plan if inserted == len(plan.rows) else None

    async def _copy(self, conn: asyncpg.Connection, head: Head, plan: BatchPlan) -> bool:
        """Store a large batch in one transaction: move the head (if it is still `head`),
        then COPY the rows, which costs the server much less than INSERT of arrays.
        False when the head had moved: nothing is stored."""
        new = plan.head
        async with conn.transaction():
            moved = await conn.fetchrow(
                _MOVE_HEAD, head.epoch, head.position, new.position, new.hash, new.recorded_at
            )
            if moved is None:
                return False
            await conn.copy_records_to_table("events", records=plan.rows, columns=_COPY_COLUMNS)
        return True

    async def _stream_versions(
        self, conn: asyncpg.Connection, requests: Sequence[AppendRequest], assume: bool
    ) -> tuple[dict[str, int], bool]:
        """The current version of each stream of `requests` (0: none), and whether any of them
        was taken from the cache or assumed rather than read.

        With `assume`, a stream this writer does not know whose appends all expect NO_STREAM
        is taken to be new without asking: if it is not, inserting its version 1 violates
        UNIQUE(stream, version) and the batch is decided again with `recheck`.
        """
        known = self._versions
        versions = {}
        unknown = set()
        for request in requests:
            stream = request.stream
            if stream in known:
                versions[stream] = known[stream]
            elif not assume or request.expected_version != NO_STREAM:
                unknown.add(stream)
            elif stream not in unknown:
                versions[stream] = 0
        assumed = bool(versions)
        if unknown:
            if len(known) + len(unknown) > VERSION_CACHE:
                known.clear()
            fetched = dict.fromkeys(unknown, 0)
            fetched.update(await conn.fetch(_VERSIONS, list(unknown)))
            known.update(fetched)
            versions.update(fetched)
        return versions, assumed

    def _remember_versions(self, plan: BatchPlan) -> None:
        versions = self._versions
        if len(versions) > VERSION_CACHE:
            versions.clear()  # forgotten versions are read again when needed
        for row in plan.rows:  # in position order, so the last version of a stream wins
            versions[row[2]] = row[3]

    # -- reading ---------------------------------------------------------------------------
    async def read_rows(
        self, after: int, limit: int, full: bool = True, bulk: bool = False
    ) -> list[asyncpg.Record]:
        return await self._fetch(_READ if full else _READ_FOLD, after, limit)  # index like rows

    async def read_stream_rows(self, stream: str, after_version: int) -> list[asyncpg.Record]:
        return await self._fetch(_READ_STREAM, stream, after_version)

    async def read_stream_page(
        self, stream: str, after: int, through: int, limit: int
    ) -> list[asyncpg.Record]:
        return await self._fetch(_READ_STREAM_PAGE, stream, after, through, limit)

    async def recorded_at(self, position: int) -> int:
        return (await self._fetch(_RECORDED_AT, position))[0][0]

    # -- snapshots -------------------------------------------------------------------------
    async def save_snapshot(self, snapshot: Snapshot, keep: int) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO snapshots VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (projection, position) DO UPDATE SET format = $3, "
                "code_hash = $4, state = $5",
                *snapshot,
            )
            await conn.execute(
                "DELETE FROM snapshots WHERE projection = $1 AND position NOT IN "
                "(SELECT position FROM snapshots WHERE projection = $1 "
                "ORDER BY position DESC LIMIT $2)",
                snapshot.projection,
                keep,
            )

    async def load_snapshot(self, projection: str, upto: int) -> Snapshot | None:
        rows = await self._fetch(
            "SELECT projection, position, format, code_hash, state FROM snapshots "
            "WHERE projection = $1 AND position <= $2 ORDER BY position DESC LIMIT 1",
            projection,
            upto,
        )
        return Snapshot(*rows[0]) if rows else None
