"""Shared fixtures: real services, found or refused.

PostgreSQL is at $BATCHD_TEST_PG_DSN (default postgresql://postgres@127.0.0.1:5432/postgres);
each test that needs it gets a fresh database. Where a service is missing the test is skipped,
except in CI (BATCHD_REQUIRE_SERVICES=1), where a missing service fails the run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import asyncpg
import pytest

from batchd.events import urls
from batchd.events.codec import Codec
from batchd.events.secrets import Keyring

PG_DSN = os.environ.get("BATCHD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_SERVICES = os.environ.get("BATCHD_REQUIRE_SERVICES") == "1"


def _machine_load() -> list[str]:
    """The machine's load, and its busiest processes when it is overloaded: a slow or timed-out
    run on a shared machine then says whether something outside the tests held the CPUs."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    lines = [f"machine: {cores} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"]
    if load[0] > 2 * cores:
        try:
            busiest = subprocess.run(
                ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                text=True, check=False,
            ).stdout.splitlines()[:8]  # fmt: skip
        except OSError:  # (no ps here)
            busiest = ["(ps is not installed)"]
        lines += ["machine overloaded; its busiest processes:", *(line[:160] for line in busiest)]
    return lines


def pytest_report_header(config) -> list[str]:
    return _machine_load()


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _machine_load():
        terminalreporter.write_line(line)


def service_missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (BATCHD_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} not available")


def _dsn_for(database: str) -> str:
    base, _, _ = PG_DSN.rpartition("/")
    return f"{base}/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        service_missing(f"PostgreSQL at {PG_DSN} ({exc})")
    return True


@pytest.fixture
def pg_database(pg_available):
    """A fresh, empty PostgreSQL database; returns its DSN and drops it afterwards."""
    name = f"batchd_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    yield _dsn_for(name)
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """A URL of an empty log, once per backend."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request, tmp_path) -> str:
    """A URL of an empty log on a backend that survives its process."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("pg_database")


def sealing_codec() -> Codec:
    """A codec with a key, so that secret fields can be sealed (one key per test session)."""
    return _CODEC


_CODEC = Codec(Keyring.generate())


@pytest.fixture
async def store(store_url):
    """An open, empty store on each backend (secrets sealed with the test key)."""
    store = await urls.open_store(store_url, codec=sealing_codec())
    yield store
    await store.close()
