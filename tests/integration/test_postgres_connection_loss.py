"""A subscription on PostgreSQL survives its connections being killed by the server."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from batchd.events import audit, errors, urls
from batchd.events.backends.postgres import LEADER_LOCK
from batchd.events.envelope import NewEvent
from tests.conftest import PG_DSN
from tests.logs import info_logs

TOTAL = 400


async def _kill(application_name: str) -> int:
    conn = await asyncpg.connect(PG_DSN)
    try:
        return await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            application_name,
        )
    finally:
        await conn.close()


async def test_subscription_sees_every_event_once_across_pg_terminate_backend(pg_database):
    writer = await urls.open_store(pg_database)
    reader = await urls.open_store(f"{pg_database}?application_name=batchd-sub", readonly=True)
    got: list[int] = []
    kills = 0

    async def follow():
        async for event in reader.subscribe(after=0, page=20):
            got.append(event.position)
            if event.position == TOTAL:
                return

    async def append_all():
        for n in range(TOTAL // 4):
            await asyncio.gather(*(writer.append(f"job-{n}-{k}", [NewEvent("JobStarted", {})])
                                   for k in range(4)))  # fmt: skip
            await asyncio.sleep(0.002)

    async def killer():
        nonlocal kills
        while len(got) < TOTAL:
            await asyncio.sleep(0.05)
            kills += await _kill("batchd-sub")

    try:
        following = asyncio.create_task(follow())
        killing = asyncio.create_task(killer())
        await append_all()
        await asyncio.wait_for(following, 30)
        killing.cancel()
        assert kills >= 2  # the reader's connections really were cut, more than once
        assert got == list(range(1, TOTAL + 1))
    finally:
        await reader.close()
        await writer.close()


async def test_notify_wakes_a_subscriber_of_another_store_long_before_its_poll(pg_database):
    writer = await urls.open_store(pg_database)
    reader = await urls.open_store(pg_database, readonly=True, poll_interval=3600)
    try:
        await writer.append("job-1", [NewEvent("JobStarted", {})])
        following = reader.subscribe(after=0)
        assert (await anext(following)).position == 1  # caught up; now it waits
        waiting = asyncio.ensure_future(anext(following))
        await asyncio.sleep(0.2)
        await writer.append("job-2", [NewEvent("JobStarted", {})])
        assert (await asyncio.wait_for(waiting, 20)).position == 2  # only NOTIFY can wake it
        await following.aclose()
    finally:
        await reader.close()
        await writer.close()


async def test_a_writer_whose_connections_are_killed_appends_again(pg_database):
    # Its append in flight may fail (ambiguous: it is reported, not guessed); the next ones
    # reconnect, a retry with the same event ids is not written twice, and the chain holds.
    writer = await urls.open_store(f"{pg_database}?application_name=batchd-writer")
    try:
        assert await writer.append("job-a", [NewEvent("JobStarted", {})], 0) == [1]
        assert await _kill("batchd-writer") >= 1
        event = NewEvent("JobStarted", {})
        positions = None
        for _ in range(3):
            try:
                positions = await writer.append("job-b", [event], 0)
                break
            except errors.StoreUnavailable:
                continue
        assert positions == [2]
        assert await writer.append("job-b", [event], 0) == [2]  # the same append again
        assert await writer.append("job-c", [NewEvent("JobStarted", {})], 0) == [3]
        assert (await audit.verify(writer)).ok
    finally:
        await writer.close()


async def test_a_lost_listener_connection_is_logged_once_and_its_return_too(pg_database):
    store = await urls.open_store(f"{pg_database}?application_name=batchd-listen")
    try:
        with info_logs() as logs:

            def said(event: str) -> list[dict]:
                return [line for line in logs if line["event"] == event]

            for _ in range(100):  # (the listener connects a moment after the store opens)
                await _kill("batchd-listen")
                await asyncio.sleep(0.05)
                if said("log.listener_lost"):
                    break
            for _ in range(100):
                if said("log.listener_back"):
                    break
                await asyncio.sleep(0.05)
        [lost] = said("log.listener_lost")
        assert lost["log_level"] == "warning" and "postgresql://" in lost["store"]
        assert len(said("log.listener_back")) == 1
    finally:
        await store.close()


async def test_a_leader_whose_lock_connection_was_cut_takes_its_lock_again(pg_database):
    """The lock's connection lost (a PostgreSQL restart, a proxy's cut) frees the lock: the
    leader's next check takes it again, before a stray daemon could."""
    leader = await urls.open_store(pg_database)
    other = await urls.open_store(pg_database)
    try:
        assert await leader.try_lock_leader()
        pid = leader.backend._leader.get_server_pid()
        conn = await asyncpg.connect(PG_DSN)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        assert await leader.try_lock_leader()  # taken again on a new connection
        assert leader.backend._leader.get_server_pid() != pid
        assert not await other.try_lock_leader()
    finally:
        await leader.close()
        await other.close()


async def test_a_standby_asks_for_the_lock_on_one_connection_and_takes_it_when_it_frees(
    pg_database,
):
    """A standby asks again and again on the same connection (not a new one each time);
    when that connection is cut it opens another; it takes the lock once the leader is
    gone, and holds it on that connection."""
    leader = await urls.open_store(pg_database)
    standby = await urls.open_store(pg_database)
    try:
        assert await leader.try_lock_leader()
        assert not await standby.try_lock_leader()
        pid = standby.backend._hopeful.get_server_pid()
        for _ in range(3):
            assert not await standby.try_lock_leader()
        assert standby.backend._hopeful.get_server_pid() == pid
        conn = await asyncpg.connect(PG_DSN)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            assert not await standby.try_lock_leader()  # asked on a new connection
            again = standby.backend._hopeful.get_server_pid()
            assert again != pid
            await leader.close()
            assert await standby.try_lock_leader()
            assert standby.backend._leader.get_server_pid() == again
            database = pg_database.rsplit("/", 1)[-1]  # (daemons on other databases hold theirs)
            holders = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND objid = ($1::bigint & 4294967295)::oid"
                " AND database = (SELECT oid FROM pg_database WHERE datname = $2)",
                LEADER_LOCK, database)  # fmt: skip
            assert holders == 1
        finally:
            await conn.close()
    finally:
        await leader.close()
        await standby.close()


async def test_a_pooled_connection_cut_mid_query_is_reported_as_cut(pg_database):
    """The pool takes a connection the server closed back at once: discarding it must not
    replace the cause with asyncpg's refusal to terminate a released connection."""
    store = await urls.open_store(f"{pg_database}?application_name=batchd-pooled")
    try:
        with pytest.raises(errors.StoreUnavailable) as cut:
            async with store.backend._connection() as conn:
                query = asyncio.ensure_future(conn.fetch("SELECT pg_sleep(5)"))
                await asyncio.sleep(0.2)  # running
                await _kill("batchd-pooled")
                await query
        # (the query may find the connection gone itself: asyncpg then says it was released)
        assert "Connection.terminate()" not in str(cut.value)
        assert (await store.head()).position == 0  # the pool serves on, with a new connection
    finally:
        await store.close()
