"""The event-store contract, run against every backend (memory, SQLite, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import traceback
import uuid

import pytest

from batchd.events import audit, errors, urls
from batchd.events import store as store_module
from batchd.events.codec import Codec
from batchd.events.envelope import NO_STREAM, NewEvent
from batchd.events.secrets import Sealed
from batchd.events.store import Snapshot
from batchd.events.types import EventType
from tests.logs import info_logs


def ev(type_: str = "JobStarted", **data) -> NewEvent:
    return NewEvent(type_, data or {"jobId": "j"})


async def test_positions_start_at_one_and_streams_keep_versions(store):
    assert await store.append("job-a", [ev(), ev()], NO_STREAM) == [1, 2]
    assert await store.append("job-b", [ev()], NO_STREAM) == [3]
    assert await store.append("job-a", [ev("JobSucceeded", exitCode=0)], 2) == [4]
    stream = await store.read_stream("job-a")
    assert [(e.position, e.version) for e in stream] == [(1, 1), (2, 2), (4, 3)]
    assert stream[2].data == {"exitCode": 0}
    assert [e.position for e in await store.read_all(after=2)] == [3, 4]
    assert [e.position for e in await store.read_all(after=0, limit=2)] == [1, 2]
    assert (await store.head()).position == 4
    assert [e.version for e in await store.read_stream("job-a", after_version=1)] == [2, 3]


async def test_a_page_of_one_stream_is_bounded_by_position_and_count(store):
    for n in range(6):  # job-a at 1, 3, 5, 7, 9, 11; job-b between
        await store.append("job-a", [ev()], n)
        await store.append("job-b", [ev()], n)

    async def page(after, through, limit, stream="job-a"):
        return [e.position for e in await store.read_stream_page(stream, after, through, limit)]

    assert await page(0, 12, 100) == [1, 3, 5, 7, 9, 11]
    assert await page(3, 12, 2) == [5, 7]  # after a position of the stream
    assert await page(4, 12, 2) == [5, 7]  # after another stream's
    assert await page(5, 9, 100) == [7, 9]  # through is inclusive
    assert await page(11, 12, 100) == [] and await page(0, 0, 100) == []
    assert await page(0, 12, 100, "job-nope") == []


async def test_expected_version_mismatch_is_refused_and_writes_nothing(store):
    await store.append("job-a", [ev()], NO_STREAM)
    with pytest.raises(errors.ConcurrencyError) as refused:
        await store.append("job-a", [ev(), ev()], NO_STREAM)
    assert (refused.value.expected, refused.value.actual) == (0, 1)
    with pytest.raises(errors.ConcurrencyError):
        await store.append("job-a", [ev()], 5)
    assert (await store.head()).position == 1
    assert await store.append("job-a", [ev()], None) == [2]  # None: no check


async def test_a_conflict_in_a_shared_batch_fails_only_its_own_append(store):
    results = await asyncio.gather(
        store.append("job-x", [ev()], NO_STREAM),
        store.append("job-y", [ev(), ev()], NO_STREAM),
        store.append("job-x", [ev()], NO_STREAM),  # loses the race to the first
        store.append("job-z", [ev()], NO_STREAM),
        return_exceptions=True,
    )
    assert isinstance(results[2], errors.ConcurrencyError)
    assert [r for i, r in enumerate(results) if i != 2] == [[1], [2, 3], [4]]
    assert len(await store.read_stream("job-x")) == 1


async def test_a_retried_append_is_recognised_not_written_twice(store):
    events = [ev(), ev()]
    first = await store.append("job-a", events, NO_STREAM)
    assert await store.append("job-a", events, NO_STREAM) == first  # same ids: same answer
    assert (await store.head()).position == 2
    unchecked = [ev()]
    assert await store.append("job-u", unchecked) == [3]  # no version check at all
    assert await store.append("job-u", unchecked) == [3]
    both = asyncio.gather(store.append("job-u", unchecked), store.append("job-v", [ev()]))
    assert await both == [[3], [4]]  # a retry in one batch with a new append
    with pytest.raises(errors.DuplicateEventError):
        await store.append("job-a", [events[0], ev()], 2)  # half old, half new
    with pytest.raises(errors.DuplicateEventError):
        await store.append("job-b", [events[1]], NO_STREAM)  # an old id on another stream
    assert (await store.head()).position == 4
    shared = ev()  # a new id in two appends of one batch: the first stores it, once
    results = await asyncio.gather(
        store.append("job-w", [shared]), store.append("job-w", [shared]),
        store.append("job-x", [shared]), return_exceptions=True,
    )  # fmt: skip
    assert results[:2] == [[5], [5]]
    assert isinstance(results[2], errors.DuplicateEventError)
    assert (await store.head()).position == 5


async def test_pages_read_for_folding_hold_every_event_less_its_ids_and_hash(store):
    cause = uuid.uuid4()
    for n in range(7):
        event = NewEvent(
            "JobStarted",
            {"jobId": f"j{n}", "attempt": n},
            actor=f"user:{n}",
            correlation_id=cause,
            causation_id=cause if n % 2 else None,
        )
        await store.append(f"job-j{n % 3}", [event])
    full = [e for page in [p async for p in store.read_pages(0, 3)] for e in page]
    lean = [e for page in [p async for p in store.read_pages(0, 3, full=False)] for e in page]
    assert len(full) == len(lean) == 7
    for whole, folded in zip(full, lean, strict=True):
        assert whole.event_id is not None and whole.hash
        left_out = ("event_id", "correlation_id", "causation_id", "hash")
        assert all(getattr(folded, f) in (None, getattr(whole, f)) for f in left_out)
        assert folded._replace(**{f: getattr(whole, f) for f in left_out}) == whole


async def test_other_tasks_run_between_the_pages_of_a_bulk_read(store):
    """(a daemon replaying a past moment for the API, or catching up, still answers its
    agents) Reading page after page hands the event loop on between pages."""
    for n in range(12):
        await store.append(f"job-j{n}", [NewEvent("JobStarted", {"jobId": f"j{n}", "attempt": 1})])
    turns = []

    async def other() -> None:
        while True:
            turns.append(1)
            await asyncio.sleep(0)

    beside = asyncio.create_task(other())
    await asyncio.sleep(0)
    try:
        seen = []
        async for _page in store.read_pages(0, 3):
            seen.append(len(turns))
    finally:
        beside.cancel()
    assert len(seen) == 4 and all(b > a for a, b in itertools.pairwise(seen)), seen


async def test_a_replay_stopped_early_leaves_no_handle_on_the_log_once_closed(tmp_path):
    """(`events export --to`, a replay up to a position: the reader leaves after the page it
    wanted) No read of a later page runs after the store closes, and no file of the log is
    held open by this process any more."""
    path = tmp_path / "events.db"
    store = await urls.open_store(f"sqlite:///{path}")
    for n in range(10):
        await store.append(f"job-j{n}", [NewEvent("JobStarted", {"jobId": f"j{n}", "attempt": 1})])
    await store.close()
    store = await urls.open_store(f"sqlite:///{path}", readonly=True)
    async for page in store.read_pages(0, 3):
        assert [e.position for e in page] == [1, 2, 3]
        break
    await store.close()
    await asyncio.sleep(0.1)  # (anything left scheduled runs now)
    links = [_readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    held = [link for link in links if link.startswith(str(path))]
    assert held == []


def _readlink(link: str) -> str:
    try:
        return os.readlink(link)
    except OSError:  # (a descriptor closed meanwhile)
        return ""


async def test_positions_are_gapless_and_in_commit_order_with_16_appenders(store):
    rng = random.Random(16)
    seen: list[int] = []
    done = asyncio.Event()

    async def reader():  # a reader must never see position n+1 before n
        after = 0
        while not done.is_set() or after < (await store.head()).position:
            for e in await store.read_all(after):
                assert e.position == after + 1
                after = e.position
                seen.append(after)
            await asyncio.sleep(0)

    async def appender(n: int):
        version = 0
        for _ in range(25):
            size = rng.randint(1, 5)
            positions = await store.append(f"job-w{n}", [ev() for _ in range(size)], version)
            assert positions == list(range(positions[0], positions[0] + size))
            version += size

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(appender(n) for n in range(16)))
    done.set()
    await reading
    head = (await store.head()).position
    assert seen == list(range(1, head + 1))
    assert [e.position for e in await store.read_all(0, limit=head + 10)] == seen
    times = [e.recorded_at for e in await store.read_all(0, limit=head)]
    assert times == sorted(times)


async def test_subscription_sees_every_event_once_while_appends_run(store):
    got: list[int] = []
    await store.append("job-early", [ev(), ev()], NO_STREAM)

    async def follow():
        async for event in store.subscribe(after=0):
            got.append(event.position)
            if event.position == 202:
                return

    following = asyncio.create_task(follow())
    for n in range(50):
        await asyncio.gather(*(store.append(f"job-{n}-{k}", [ev()], NO_STREAM) for k in range(4)))
    await asyncio.wait_for(following, 10)
    assert got == list(range(1, 203))


async def test_a_second_writer_fences_the_first(store_url):
    first = await urls.open_store(store_url)
    second = await urls.open_store(store_url)
    try:
        await first.take_leadership()
        await first.append("job-a", [ev()], NO_STREAM)
        stop = asyncio.Event()

        async def keep_appending():
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    await first.append(f"job-old-{n}", [NewEvent("JobStarted", {}, actor="old")])
                except errors.FencedError:
                    return n
                await asyncio.sleep(0)
            return n

        appending = asyncio.create_task(keep_appending())
        await asyncio.sleep(0.05)
        epoch = await second.take_leadership()
        takeover = (await second.head()).position
        await asyncio.wait_for(appending, 10)
        with pytest.raises(errors.FencedError) as fenced:
            await first.append("job-b", [ev()])
        assert fenced.value.current == epoch
        await second.append("job-new", [NewEvent("JobStarted", {}, actor="new")])
        old = [e.position for e in await second.read_all(0, 100_000) if e.actor == "old"]
        assert old and max(old) <= takeover  # nothing of the old writer after the takeover
    finally:
        stop.set()
        await first.close()
        await second.close()


async def test_one_store_at_a_time_holds_the_leader_lock(durable_url):
    first = await urls.open_store(durable_url)
    second = await urls.open_store(durable_url)
    try:
        try:
            assert await first.try_lock_leader()
            assert await first.try_lock_leader()  # held: held still
            assert not await second.try_lock_leader()
        finally:
            await first.close()  # a stopped (or dead) leader frees it
        assert await second.try_lock_leader()
    finally:
        await second.close()


async def test_a_leadership_check_in_flight_as_the_store_closes_ends_quietly(durable_url):
    """A daemon checks its lock now and then, and may be doing so as it stops: the check ends
    as held or with a StoreError (nothing else), closing raises nothing, and the lock is free
    for the next leader at once (the check took none after the close)."""
    for _ in range(5):
        first = await urls.open_store(durable_url)
        assert await first.try_lock_leader()
        check = asyncio.ensure_future(first.try_lock_leader())
        await asyncio.sleep(0)  # (under way)
        await first.close()
        with contextlib.suppress(errors.StoreError):
            await check
        second = await urls.open_store(durable_url)
        try:
            assert await second.try_lock_leader()
        finally:
            await second.close()


async def test_a_fenced_batchs_callers_each_get_their_own_error(store_url):
    # One failed batch fails all its callers. Were they given one shared exception, its
    # traceback would hold the writer's frames and theirs: code that clears the frames of a
    # traceback it caught (APScheduler does, after a job failed) would then end the writer.
    first = await urls.open_store(store_url)
    second = await urls.open_store(store_url)
    try:
        await first.take_leadership()
        await second.take_leadership()
        failures = await asyncio.gather(
            *(first.append(f"job-f{n}", [ev()], NO_STREAM) for n in range(3)),
            return_exceptions=True,
        )  # fmt: skip
        assert all(isinstance(f, errors.FencedError) for f in failures)
        assert len({id(f) for f in failures}) == 3 and first.fenced.is_set()
        for failure in failures:
            traceback.clear_frames(failure.__traceback__)
        with pytest.raises(errors.FencedError):  # answered, not left hanging
            await asyncio.wait_for(first.append("job-g", [ev()], NO_STREAM), 5)
    finally:
        await asyncio.wait_for(first.close(), 10)
        await second.close()


async def test_version_checks_hold_when_leadership_moves_back_and_forth(store_url):
    # Each writer knows the stream versions it wrote; after another writer took over and
    # appended, a writer that takes leadership back must check against what is stored.
    first = await urls.open_store(store_url)
    second = await urls.open_store(store_url)
    try:
        await first.append("job-a", [ev()], NO_STREAM)
        await second.take_leadership()
        await second.append("job-a", [ev(), ev()], 1)
        await first.take_leadership()
        with pytest.raises(errors.ConcurrencyError):
            await first.append("job-a", [ev()], 1)
        assert await first.append("job-a", [ev()], 3) == [4]
        await second.take_leadership()
        with pytest.raises(errors.ConcurrencyError):
            await second.append("job-a", [ev()], 3)
        assert await second.append("job-a", [ev()], 4) == [5]
        assert [e.version for e in await second.read_stream("job-a")] == [1, 2, 3, 4, 5]
    finally:
        await first.close()
        await second.close()


async def test_upcasters_run_on_read(store_url):
    v1 = Codec()
    v1.register(EventType("GadgetMade", schema=1))
    store = await urls.open_store(store_url, codec=v1)
    await store.append("gadget-1", [NewEvent("GadgetMade", {"size": 3})])
    await store.close()

    v2 = Codec()
    v2.register(EventType("GadgetMade", schema=2), {1: lambda d: {"sizeCm": d["size"] * 10}})
    store = await urls.open_store(store_url, codec=v2)
    try:
        await store.append("gadget-2", [NewEvent("GadgetMade", {"sizeCm": 5})])
        got = [(e.schema, e.data) for e in await store.read_all()]
        assert got == [(2, {"sizeCm": 30}), (2, {"sizeCm": 5})]
        rows = [row async for row in store.iter_rows()]
        assert [r[5] for r in rows] == [1, 2]  # the stored rows are never rewritten
    finally:
        await store.close()


async def test_secret_values_are_sealed_in_storage(store):
    secret = "hunter2-do-not-log"
    spec = {"secrets": [{"name": "TOKEN", "value": secret}], "nodeCount": 1}
    await store.append("job-s", [NewEvent("JobSubmitted", {"jobId": "s", "spec": spec})])
    rows = [row async for row in store.iter_rows()]
    assert secret.encode() not in rows[0][10]
    value = (await store.read_all())[0].data["spec"]["secrets"][0]["value"]
    assert isinstance(value, Sealed) and repr(value) == "***"
    assert store.codec.keyring.open(value) == secret
    assert spec["secrets"][0]["value"] == secret  # the caller's document is untouched


async def test_secrets_need_a_key(store_url):
    store = await urls.open_store(store_url)  # no keyring
    try:
        spec = {"secrets": [{"name": "TOKEN", "value": "x"}]}
        with pytest.raises(errors.SecretKeyError, match=r"spec\.secrets\[\]\.value"):
            await store.append("job-s", [NewEvent("JobSubmitted", {"spec": spec})])
        assert (await store.head()).position == 0
    finally:
        await store.close()


async def test_recorded_at_never_decreases_even_when_the_clock_steps_back(store_url):
    clock = iter([5_000_000, 9_000_000, 1_000_000, 9_500_000])
    store = await urls.open_store(store_url, clock=lambda: next(clock))
    try:
        for n in range(4):
            await store.append(f"job-{n}", [ev()])
        assert [e.recorded_at for e in await store.read_all()] == [
            5_000_000, 9_000_000, 9_000_000, 9_500_000,
        ]  # fmt: skip
        assert await store.position_at(8_999_999) == 1
        assert await store.position_at(9_000_000) == 3
        assert await store.position_at(1) == 0
    finally:
        await store.close()


async def test_snapshots_keep_the_newest_two(store):
    for position in (10, 30, 20):
        await store.save_snapshot(Snapshot("queue", position, 1, "abc", b"state%d" % position))
    newest = await store.load_snapshot("queue")
    assert newest == Snapshot("queue", 30, 1, "abc", b"state30")
    assert (await store.load_snapshot("queue", upto=29)).position == 20
    assert await store.load_snapshot("queue", upto=19) is None
    assert await store.load_snapshot("nodes") is None


async def test_a_bad_append_is_refused_alone_and_fails_no_other(store):
    event = ev()
    bad = [
        [event, NewEvent("JobStarted", {}, event_id=event.event_id)],  # an id twice
        [NewEvent("JobStarted", {}, actor="a\x00b")],
        [NewEvent("JobStarted", {}, actor="\ud800")],
        [NewEvent("JobStarted", {}, correlation_id="not-a-uuid")],
    ]
    results = await asyncio.gather(
        store.append("job-good-1", [ev()]),
        *(store.append(f"job-bad-{n}", events) for n, events in enumerate(bad)),
        store.append("job-good-2", [ev()]),
        return_exceptions=True,
    )
    assert results[0] == [1] and results[-1] == [2]
    assert all(isinstance(r, ValueError) for r in results[1:-1]), results
    assert [e.stream for e in await store.read_all()] == ["job-good-1", "job-good-2"]


async def test_append_many_answers_each_append_in_order(store):
    await store.append("job-a", [ev()], NO_STREAM)
    results = await store.append_many([
        ("job-b", [ev(), ev()], NO_STREAM),
        ("job-a", [ev()], NO_STREAM),  # job-a exists: refused alone
        ("not a stream!", [ev()], None),  # refused before it is queued
        ("job-a", [ev()], 1),
    ])  # fmt: skip
    assert results[0] == [2, 3] and results[3] == [4]
    assert isinstance(results[1], errors.ConcurrencyError)
    assert isinstance(results[2], ValueError)
    assert [e.stream for e in await store.read_all()] == ["job-a", "job-b", "job-b", "job-a"]


async def test_a_fresh_writer_appending_to_an_existing_stream_as_new_is_refused(store_url):
    first = await urls.open_store(store_url)
    try:
        await first.append("job-a", [ev()], NO_STREAM)
    finally:
        await first.close()
    second = await urls.open_store(store_url)  # knows no stream versions yet
    try:
        results = await asyncio.gather(
            second.append("job-a", [ev()], NO_STREAM),
            second.append("job-b", [ev()], NO_STREAM),
            return_exceptions=True,
        )
        assert isinstance(results[0], errors.ConcurrencyError)
        assert results[1] == [2]
        assert [e.version for e in await second.read_stream("job-a")] == [1]
    finally:
        await second.close()


async def test_what_a_writer_reads_back_is_what_another_process_reads(store_url):
    # A writer answers reads of what it committed lately from memory; those events must be
    # exactly the stored ones, also across a takeover by another writer (a gap in its cache).
    first = await urls.open_store(store_url)
    second = await urls.open_store(store_url)
    try:
        await first.take_leadership()
        cid = NewEvent("JobStarted", {}).event_id
        await first.append("job-a", [NewEvent("JobStarted", {"jobId": "a", "n": [1, 2]},
                                              actor="alice", correlation_id=cid)])  # fmt: skip
        await first.append("job-b", [ev() for _ in range(3)], NO_STREAM)
        queried = []
        read_rows = first.backend.read_rows
        first.backend.read_rows = lambda *a: queried.append(a) or read_rows(*a)
        early = await first.read_all(0, 100)
        assert queried == []  # from the writer's memory
        await second.take_leadership()
        await second.append("job-c", [ev()], NO_STREAM)
        await first.take_leadership()
        await first.append("job-d", [ev(), ev()], NO_STREAM)
        mine = await first.read_all(0, 100)
        assert queried == [(0, 100)]  # positions 1-4 and 5 are not all in its memory now
        theirs = await second.read_all(0, 100)
        assert [e.position for e in mine] == [1, 2, 3, 4, 5, 6, 7]
        assert mine == theirs
        assert early == theirs[:4]
        assert mine[0].correlation_id == cid and mine[0].data == {"jobId": "a", "n": [1, 2]}
        assert await first.read_all(5) == theirs[5:]
        assert await first.read_all(5, 1) == theirs[5:6]
        assert await first.read_all(3, 2) == theirs[3:5]
    finally:
        await first.close()
        await second.close()


async def test_after_an_ambiguous_commit_reads_come_from_the_log(store):
    # A commit that landed but whose answer was lost: the writer's memory of recent rows no
    # longer ends at the head, so reads must not stop short at its end.
    await store.append("job-a", [ev() for _ in range(5)], NO_STREAM)
    commit = store.backend.commit

    async def lands_then_fails(*args, **kwargs):
        await commit(*args, **kwargs)
        raise errors.StoreUnavailable("the connection dropped after COMMIT")

    store.backend.commit = lands_then_fails
    with pytest.raises(errors.StoreUnavailable):
        await store.append("job-b", [ev() for _ in range(3)], NO_STREAM)
    store.backend.commit = commit
    assert [e.position for e in await store.read_all(2, 100)] == [3, 4, 5, 6, 7, 8]


async def test_the_writers_memory_of_recent_rows_is_bounded_in_bytes(store, monkeypatch):
    monkeypatch.setattr(store_module, "RECENT_BYTES", 16_000)
    big = "x" * 1000
    for n in range(40):
        await store.append(f"job-{n}", [ev(blob=big)], NO_STREAM)
    assert store._recent_bytes <= 16_000 and len(store._recent) < 40
    assert [e.position for e in await store.read_all(0, 100)] == list(range(1, 41))
    assert (await store.read_all(38, 100))[1].data == {"blob": big}


async def test_large_batches_keep_the_contract(store_url):
    # Batches of a few hundred events take the bulk path of a backend (COPY on PostgreSQL):
    # retries, conflicts found only by the database, and fencing must hold there too.
    big = [ev() for _ in range(300)]
    first = await urls.open_store(store_url)
    second = await urls.open_store(store_url)  # knows no stream versions yet
    copies = []
    for backend in (first.backend, second.backend):
        if hasattr(backend, "_copy"):  # PostgreSQL: the batches must take the COPY path
            copy = backend._copy
            backend._copy = lambda *a, copy=copy: copies.append(a) or copy(*a)
    try:
        await first.take_leadership()
        assert await first.append("job-big", big, NO_STREAM) == list(range(1, 301))
        assert await first.append("job-big", big, NO_STREAM) == list(range(1, 301))
        await second.take_leadership()
        results = await asyncio.gather(
            second.append("job-big", [ev() for _ in range(200)], NO_STREAM),
            second.append("job-other", [ev() for _ in range(200)], NO_STREAM),
            return_exceptions=True,
        )
        assert isinstance(results[0], errors.ConcurrencyError)
        assert results[1] == list(range(301, 501))
        with pytest.raises(errors.FencedError):
            await first.append("job-late", [ev() for _ in range(200)], NO_STREAM)
        assert (await second.head()).position == 500
        assert len(await second.read_stream("job-big")) == 300
        assert await second.read_stream("job-late") == []
        assert (await audit.verify(second)).ok
        assert copies or "postgres" not in store_url
    finally:
        await first.close()
        await second.close()


async def test_unknown_event_types_and_bad_streams_are_refused(store):
    with pytest.raises(errors.UnknownEventType):
        await store.append("job-a", [NewEvent("JobExploded", {})])
    with pytest.raises(ValueError, match="stream"):
        await store.append("", [ev()])
    with pytest.raises(ValueError, match="at least one"):
        await store.append("job-a", [])
    assert (await store.head()).position == 0


async def test_a_read_only_store_refuses_to_write(store_url):
    writer = await urls.open_store(store_url)
    await writer.append("job-a", [ev()])
    reader = await urls.open_store(store_url, readonly=True)
    try:
        with pytest.raises(errors.StoreError, match="read-only"):
            await reader.append("job-b", [ev()])
        assert [e.stream for e in await reader.read_all()] == ["job-a"]
    finally:
        await reader.close()
        await writer.close()


async def test_a_sqlite_log_others_can_read_is_told_of_when_opened(tmp_path):
    """A new log is its owner's alone; one an operator shared keeps its mode, and a warning
    says who can read it (every job's document and commands are in it)."""
    path = tmp_path / "events.db"
    with info_logs() as logged:
        await (await urls.open_store(f"sqlite:///{path}")).close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [line for line in logged if line["event"] == "log.readable_by_others"]
    path.chmod(0o644)
    with info_logs() as logged:
        await (await urls.open_store(f"sqlite:///{path}")).close()
    [warned] = [line for line in logged if line["event"] == "log.readable_by_others"]
    assert (warned["log_level"], warned["mode"], warned["path"]) == ("warning", "0644", str(path))
    assert oct(path.stat().st_mode & 0o777) == "0o644"
