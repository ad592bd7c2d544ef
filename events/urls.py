"""Store URLs (SQLAlchemy's rules) and opening a store from one.

memory://            a private in-memory log          memory://NAME  a named one (tests)
sqlite:///rel.db     a file relative to the cwd       sqlite:////abs/path.db  an absolute one
postgresql://user@host:port/db   (also postgres://)
"""

from __future__ import annotations

from typing import NamedTuple

from batchd.events import errors
from batchd.events.backends.postgres import redact_dsn
from batchd.events.codec import Codec
from batchd.events.store import EventStore

SCHEMES = ("memory", "sqlite", "postgresql", "postgres")


class StoreUrl(NamedTuple):
    scheme: str  # memory | sqlite | postgresql
    target: str  # memory name, file path, or asyncpg DSN

    def __str__(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:///{self.target}"
        return redact_dsn(self.target) if self.scheme == "postgresql" else f"memory://{self.target}"


def parse(url: str) -> StoreUrl:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise errors.StoreUrlError(
            f"unsupported store URL {redact_dsn(url)!r}: expected sqlite:///PATH, "
            "postgresql://USER@HOST/DB or memory://"
        )
    if scheme == "memory":
        return StoreUrl("memory", rest)
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise errors.StoreUrlError(
                f"malformed SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////abs/path.db"
            )
        path = rest[1:]
        if "?" in path:
            raise errors.StoreUrlError(f"malformed SQLite URL {url!r}: options are not supported")
        return StoreUrl("sqlite", path)
    if not rest or (rest.startswith("/") and rest.strip("/") == ""):
        raise errors.StoreUrlError(
            f"malformed PostgreSQL URL {redact_dsn(url)!r}: no host or database"
        )
    _check_authority(url, rest)
    return StoreUrl("postgresql", f"postgresql://{rest}")


def _check_authority(url: str, rest: str) -> None:
    """A PostgreSQL URL's `USER:PASSWORD@HOST:PORT[,HOST:PORT...]` part has one `@` at most
    (the driver would take what follows a second one as the host), and each host's port is
    a number from 1 to 65535, or absent."""
    authority = rest.partition("/")[0].partition("?")[0]
    if authority.count("@") > 1:
        rule = "an @ in the user name or password must be written %40"
        raise errors.StoreUrlError(f"malformed PostgreSQL URL {redact_dsn(url)!r}: {rule}")
    if "#" in authority:
        rule = "a # in the user name or password must be written %23"
        raise errors.StoreUrlError(f"malformed PostgreSQL URL {redact_dsn(url)!r}: {rule}")
    hosts = authority.rpartition("@")[2]
    for host in hosts.split(","):
        after = host.rpartition("]")[2]  # past an IPv6 address in brackets
        port = after.rpartition(":")[2] if ":" in after else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            # without an @, the "port" may be a piece of a password cut at a / or ?: not quoted
            said = f"port {port[:20]!r}" if "@" in authority else "the port"
            rule = (f"{said} must be a number from 1 to 65535 (a / or ? in the user name or "
                    "password must be written %2F, %3F)")  # fmt: skip
            raise errors.StoreUrlError(f"malformed PostgreSQL URL {redact_dsn(url)!r}: {rule}")


def make_backend(url: StoreUrl):
    if url.scheme == "memory":
        from batchd.events.backends import memory

        return memory.MemoryBackend(memory.named_log(url.target))
    if url.scheme == "sqlite":
        from batchd.events.backends import sqlite

        return sqlite.SqliteBackend(url.target)
    from batchd.events.backends import postgres

    return postgres.PostgresBackend(url.target)


async def open_store(
    url: str, *, readonly: bool = False, codec: Codec | None = None, **options
) -> EventStore:
    """Open (and, unless read-only, create or migrate) the log at `url`.

    Read-only opening never creates a file or a table: a missing log is an error.
    """
    store = EventStore(make_backend(parse(url)), codec, **options)
    return await store.open(readonly=readonly)
