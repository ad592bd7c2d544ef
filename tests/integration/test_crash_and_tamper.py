"""Durability and tamper evidence on the stores that outlive a process (SQLite, PostgreSQL).

A writer killed with SIGKILL in the middle of its batches leaves whole batches or none, and a
chain that verifies; altering, deleting or swapping stored rows makes `batchd audit verify`
fail at that position; cutting the tail fails `--expect`.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import textwrap

import asyncpg
import pytest

from batchd.events import audit, urls
from batchd.events.envelope import NewEvent
from batchd.events.urls import parse

BATCH = 400  # four appends of 100 events: on PostgreSQL each is stored with COPY, in a
# transaction of its own (a smaller one is one INSERT statement, which nothing can cut short)

WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    import asyncpg
    from batchd.events import urls
    from batchd.events.backends.sqlite import SqliteBackend
    from batchd.events.envelope import NewEvent

    def hold_open(backend, after):
        # Once `after` transactions have committed, stop the writer for good inside the
        # next one, its rows stored and not committed, and say "open".
        seen = [0]
        if isinstance(backend, SqliteBackend):  # the trace runs as each statement starts
            def trace(sql):
                if sql == "COMMIT":
                    seen[0] += 1
                    if seen[0] > after:
                        print("open", flush=True)
                        time.sleep(600)
            backend._writer.set_trace_callback(trace)
            # a page cache this small spills a batch's pages into the WAL before its COMMIT:
            # the kill leaves frames of the open transaction there, for recovery to ignore
            backend._writer.execute("PRAGMA cache_size = 8")
            return
        copy = asyncpg.Connection.copy_records_to_table  # PostgreSQL: rows COPYed, before COMMIT

        async def copy_then_hold(self, *args, **kwargs):
            done = await copy(self, *args, **kwargs)
            seen[0] += 1
            if seen[0] > after:
                print("open", flush=True)
                await asyncio.sleep(600)
            return done

        asyncpg.Connection.copy_records_to_table = copy_then_hold

    async def main(url, after):
        store = await urls.open_store(url)
        await store.take_leadership()
        hold_open(store.backend, after)
        print("ready", flush=True)
        n = 0
        while True:
            n += 1
            batch = [NewEvent("JobStarted", {"n": n, "k": k, "pad": "x" * 200})
                     for k in range(BATCH)]
            appends = [store.append(f"crash-{n}-{w}", batch[w::4], 0) for w in range(4)]
            await asyncio.gather(*appends)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
).replace("BATCH", str(BATCH))


def _batchd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchd.scheduler.cli", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def _head(url: str) -> int:
    store = await urls.open_store(url, readonly=True)
    try:
        return (await store.head()).position
    finally:
        await store.close()


@pytest.mark.parametrize("committed", [0, 4, 15])
async def test_sigkill_mid_batch_leaves_whole_batches_and_a_valid_chain(durable_url, committed):
    """The writer is killed inside a transaction whose rows are stored and not committed
    (after `committed` transactions): none of them is in the log, every earlier one is."""
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, durable_url, str(committed), stdout=subprocess.PIPE
    )
    try:
        line = b""
        while line.strip() != b"open":  # (log lines come first)
            line = await asyncio.wait_for(writer.stdout.readline(), 60)
            assert line, "the writer died"
        held = await _head(durable_url)  # what is committed while the last one is open
    finally:
        writer.kill()  # SIGKILL
        await asyncio.wait_for(writer.wait(), 10)
    store = await urls.open_store(durable_url)  # reopening recovers (WAL replay) and migrates
    try:
        assert (held > 0) == (committed > 0)
        assert (await store.head()).position == held  # nothing of the open transaction
        result = await audit.verify(store)
        assert result.ok, result.problem
        per_stream: dict[str, int] = {}
        async for row in store.iter_rows():
            per_stream[row[2]] = per_stream.get(row[2], 0) + 1
        assert sum(per_stream.values()) == held
        assert not per_stream or set(per_stream.values()) == {BATCH // 4}  # whole appends
        await store.append("after-crash", [NewEvent("JobStarted", {})])  # and it still writes
        assert (await audit.verify(store)).ok
    finally:
        await store.close()


# -- tampering -------------------------------------------------------------------------------


async def _tamper(url: str, *statements: str) -> None:
    target = parse(url)
    if target.scheme == "sqlite":
        conn = sqlite3.connect(target.target)
        for sql in statements:
            conn.execute(sql)
        conn.commit()
        conn.close()
        return
    conn = await asyncpg.connect(target.target)
    try:
        for sql in statements:  # SQLite's x'..' blob literal in PostgreSQL's spelling
            await conn.execute(re.sub(r"x'([0-9a-f]*)'", r"'\\x\1'::bytea", sql))
    finally:
        await conn.close()


async def _fill(url: str, count: int = 20) -> str:
    store = await urls.open_store(url)
    try:
        for n in range(count):
            await store.append(f"job-{n % 3}", [NewEvent("JobStarted", {"n": n})])
        return str((await audit.verify(store)).head)
    finally:
        await store.close()


async def test_an_intact_log_verifies_and_prints_its_head(durable_url):
    head = await _fill(durable_url)
    done = _batchd("audit", "verify", "--store", durable_url, "--expect", head)
    assert done.returncode == 0, done.stderr
    assert f"20 events, head {head}" in done.stdout


@pytest.mark.parametrize(
    ("statements", "bad", "why"),
    [
        (["UPDATE events SET data = x'81a16ecd0101' WHERE position = 7"], 7, "altered"),
        (["UPDATE events SET actor = 'mallory' WHERE position = 12"], 12, "altered"),
        (["DELETE FROM events WHERE position = 9"], 9, "missing"),
        (
            [
                "UPDATE events SET position = -4 WHERE position = 4",
                "UPDATE events SET position = 4 WHERE position = 5",
                "UPDATE events SET position = 5 WHERE position = -4",
            ],
            4,
            "altered or moved",
        ),
        (["DELETE FROM events WHERE position = 20"], 20, "log head says position 20"),
        (["UPDATE log_head SET recorded_at = 1900000000000000"], 20,
         "recorded_at (1900000000000000) is not the last event's ("),
        (["UPDATE log_head SET recorded_at = recorded_at - 1"], 20, "recorded_at"),
    ],
    ids=["data-altered", "actor-altered", "row-deleted", "rows-swapped", "last-row-deleted",
         "head-time-forged", "head-time-earlier"],
)  # fmt: skip
async def test_tampering_fails_verification_at_that_position(durable_url, statements, bad, why):
    await _fill(durable_url)
    await _tamper(durable_url, *statements)
    done = _batchd("audit", "verify", "--store", durable_url)
    assert done.returncode == 1
    assert f"FAILED at position {bad}" in done.stderr and why in done.stderr


@pytest.mark.parametrize(
    ("statement", "bad", "why"),
    [
        ("UPDATE events SET event_id = randomblob(17) WHERE position = 7", 7, "not of its"),
        ("UPDATE events SET event_id = hex(event_id) WHERE position = 8", 8, "not of its"),
        ("UPDATE events SET correlation_id = randomblob(20) WHERE position = 9", 9, "not of its"),
        ("UPDATE events SET data = CAST(x'c3' AS TEXT) WHERE position = 11", 11, "cannot be read"),
        ("UPDATE events SET recorded_at = 'abc' WHERE position = 12", 12, "not of its"),
        ("UPDATE events SET hash = hex(hash) WHERE position = 13", 13, "not of its"),
        ("UPDATE log_head SET position = 'x'", 20, "log_head row holds a value not of its"),
    ],
    ids=["id-too-long", "id-as-text", "correlation-id-too-long", "data-as-bad-text",
         "time-as-text", "hash-as-text", "head-position-as-text"],
)  # fmt: skip
async def test_a_value_altered_to_another_type_fails_verification_at_its_row(
    tmp_path, statement, bad, why
):
    """(SQLite only: PostgreSQL's columns keep their types.) The audit names the row and the
    last good one, in its JSON too, instead of failing on the value."""
    url = f"sqlite:///{tmp_path}/log.db"
    await _fill(url)
    await _tamper(url, statement)
    done = _batchd("audit", "verify", "--store", url, "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is False and result["badPosition"] == bad and why in result["problem"]
    good = bad if "log_head" in why else bad - 1
    assert result["events"] == good and result["head"].startswith(f"{good}:")


async def test_a_head_recorded_at_in_the_future_fails_verification(durable_url):
    """A forged head time would stamp every later event with it (recorded_at never decreases),
    hiding them from `replay --at now`: verify names it, on an empty log too."""
    await _fill(durable_url, 0)
    empty = _batchd("audit", "verify", "--store", durable_url)
    assert empty.returncode == 0 and empty.stdout.startswith("ok: 0 events"), empty.stderr
    await _tamper(durable_url, "UPDATE log_head SET recorded_at = 1900000000000000")
    done = _batchd("audit", "verify", "--store", durable_url, "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["ok"] is False and result["events"] == 0
    assert result["problem"] == (
        "the log head's recorded_at (1900000000000000) is not 0: the log is empty"
    )


async def test_a_row_put_beyond_the_log_head_fails_verification(durable_url):
    """A forged row after the last one (its head row left alone) is no later append that
    the audit may leave for next time: no writer's head reaches it."""
    await _fill(durable_url)
    new_id = "randomblob(16)" if parse(durable_url).scheme == "sqlite" else "gen_random_uuid()"
    await _tamper(
        durable_url,
        f"INSERT INTO events SELECT 21, {new_id}, stream, 999, type, schema, recorded_at + 1, "
        "'user:mallory', correlation_id, causation_id, data, hash FROM events WHERE position = 20",
    )
    done = _batchd("audit", "verify", "--store", durable_url)
    assert done.returncode == 1
    assert "FAILED at position 21" in done.stderr and "beyond the log head (20)" in done.stderr


async def test_reading_a_row_whose_data_is_damaged_names_the_event(durable_url):
    await _fill(durable_url)
    await _tamper(durable_url, "UPDATE events SET data = x'c1ffee' WHERE position = 5")
    for command in (("events", "tail", "--after", "0"), ("events", "export"),
                    ("replay", "--position", "9")):  # fmt: skip
        done = _batchd(*command, "--store", durable_url)
        assert done.returncode == 1
        [line] = done.stderr.splitlines()
        assert line.startswith("batchd: error: event 5 (") and "cannot be decoded" in line, line


async def test_a_cut_tail_fails_against_the_anchor(durable_url):
    anchor = await _fill(durable_url)
    store = await urls.open_store(durable_url, readonly=True)
    rows = [row async for row in store.iter_rows()]
    await store.close()
    fifteen = rows[14]
    await _tamper(
        durable_url,
        "DELETE FROM events WHERE position > 15",
        f"UPDATE log_head SET position = 15, hash = x'{fifteen[11].hex()}', "
        f"recorded_at = {fifteen[6]}",
    )
    assert _batchd("audit", "verify", "--store", durable_url).returncode == 0  # the chain alone
    done = _batchd("audit", "verify", "--store", durable_url, "--expect", anchor)
    assert done.returncode == 1
    assert "FAILED at position 16" in done.stderr and "tail was cut" in done.stderr
    wrong = _batchd("audit", "verify", "--store", durable_url, "--expect", f"3:{'ab' * 32}")
    assert wrong.returncode == 1 and "the anchor says" in wrong.stderr
    # a chain that disagrees with its anchor vouches for none of the rows up to it
    assert "FAILED at position 3" in wrong.stderr and "last good: none" in wrong.stderr
