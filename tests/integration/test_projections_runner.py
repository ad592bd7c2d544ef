"""The projection runner on real stores: live state, snapshots, restore, replay at a position."""

from __future__ import annotations

import asyncio
import sqlite3

from batchd.events import urls
from batchd.events.secrets import Keyring
from batchd.events.store import Snapshot
from batchd.projections import fold, snapshot
from batchd.projections.runner import Runner
from batchd.scheduler.bench import workload
from tests.conftest import sealing_codec
from tests.logs import info_logs


async def _append_workload(store, events: int, seed: int = 11):
    """Append a simulated cluster's log one append at a time; yield each append's position."""
    for stream, batch in workload.cluster_log(events, seed):
        positions = await store.append(stream, batch)
        yield positions[-1]


async def test_replay_at_a_position_is_the_live_state_at_that_position(store_url):
    store = await urls.open_store(store_url, codec=sealing_codec())
    live = Runner(store, snapshot_every=400)  # snapshots along the way, kept two at a time
    following = asyncio.create_task(live.follow())
    recorded: dict[int, dict] = {}
    try:
        n = 0
        async for position in _append_workload(store, 1500):
            n += 1
            if n % 97 == 0:
                await live.wait_for(position, timeout=10)
                assert live.position == position  # nothing else is appending
                recorded[position] = snapshot.plain(live.models)
        await live.wait_for((await store.head()).position, timeout=10)
    finally:
        following.cancel()
    assert len(recorded) >= 10
    assert await store.load_snapshot(snapshot.NAME) is not None  # the runner took snapshots
    for position, state in recorded.items():
        replayed = Runner(store)
        await replayed.restore(upto=position)
        assert snapshot.plain(replayed.models) == state, f"replay at {position} differs"
    rebuilt = Runner(store, use_snapshots=False)
    await rebuilt.restore()
    assert snapshot.plain(rebuilt.models) == snapshot.plain(live.models)
    await store.close()


async def test_restore_uses_the_snapshot_then_catches_up(durable_url):
    store = await urls.open_store(durable_url, codec=sealing_codec())
    async for _ in _append_workload(store, 600):
        pass
    first = Runner(store)
    await first.restore()
    await first.save_snapshot()
    taken = first.position
    async for _ in _append_workload(store, 300, seed=12):
        pass
    await store.close()

    keyless = await urls.open_store(durable_url, readonly=True)  # (the daemon's keys unknown)
    info = await Runner(keyless).restore()
    assert info.snapshot_position == 0 and "no secret keys" in info.discarded
    await keyless.close()
    store = await urls.open_store(durable_url, readonly=True, codec=sealing_codec())
    restored = Runner(store)
    info = await restored.restore()
    assert info.snapshot_position == taken and info.discarded is None
    assert info.replayed == (await store.head()).position - taken
    scratch = Runner(store, use_snapshots=False)
    await scratch.restore()
    assert snapshot.plain(restored.models) == snapshot.plain(scratch.models)
    await store.close()


async def test_a_snapshot_from_other_code_is_discarded_and_the_models_rebuilt(store):
    async for _ in _append_workload(store, 300):
        pass
    head = (await store.head()).position
    wrong = snapshot.encode(fold.rebuild([]))  # an empty state, claimed to be at the head
    await store.save_snapshot(
        Snapshot(snapshot.NAME, head, snapshot.FORMAT, "another-version", wrong)
    )
    runner = Runner(store)
    info = await runner.restore()
    assert info.snapshot_position == 0 and "other projection code" in info.discarded
    assert info.replayed == head
    assert len(runner.models.jobs) > 0


async def test_a_read_only_follower_keeps_following_when_snapshots_are_due(durable_url):
    writer = await urls.open_store(durable_url, codec=sealing_codec())
    reader = await urls.open_store(durable_url, readonly=True)
    follower = Runner(reader, snapshot_every=5)  # due often; a read-only store takes none
    following = asyncio.create_task(follower.follow())
    try:
        async for position in _append_workload(writer, 60):
            last = position
        await follower.wait_for(last, timeout=10)
        assert not following.done()
        assert await reader.load_snapshot(snapshot.NAME) is None
    finally:
        following.cancel()
        await reader.close()
        await writer.close()


async def _store_sealed(store, state: bytes, position: int, keyring=None) -> None:
    """Store `state` as the snapshot at `position`, sealed (by default with the store's keys)
    for the log's event there."""
    anchor = (await store.read_all(position - 1, 1))[0].hash
    sealed = snapshot.seal(state, keyring or store.codec.keyring, position, anchor)
    await store.save_snapshot(
        Snapshot(snapshot.NAME, position, snapshot.FORMAT, snapshot.CODE_HASH, sealed)
    )


async def test_an_unreadable_snapshot_is_discarded_and_the_models_rebuilt(store):
    async for _ in _append_workload(store, 200):
        pass
    head = (await store.head()).position
    await _store_sealed(store, b"\xc1 not msgpack", head)
    runner = Runner(store)
    info = await runner.restore()
    assert info.discarded.startswith("unreadable") and info.replayed == head
    scratch = Runner(store, use_snapshots=False)
    await scratch.restore()
    assert snapshot.plain(runner.models) == snapshot.plain(scratch.models)


async def test_a_snapshot_changed_or_moved_since_it_was_stored_is_refused(store):
    """Whoever can write the snapshots table but lacks the daemon's keys cannot make the read
    models say what the log does not (grant a token, change a job's end)."""
    async for _ in _append_workload(store, 300):
        pass
    head = (await store.head()).position
    first = Runner(store)
    await first.restore()
    await first.save_snapshot()
    stored = await store.load_snapshot(snapshot.NAME)
    cut = Keyring.signature_length(stored.state)
    forged = snapshot.decode(stored.state[cut:])
    job = next(iter(forged.jobs.values()))
    job.state, job.exit_code = "failed", 42
    changes = {
        "changed, the old seal kept": stored.state[:cut] + snapshot.encode(forged),
        "changed, sealed with other keys": snapshot.seal(
            snapshot.encode(forged), Keyring.generate("k1"), head, b"x"
        ),
    }
    for what, state in changes.items():
        await store.save_snapshot(stored._replace(state=state))
        with info_logs() as logs:
            info = await Runner(store).restore()
        assert info.snapshot_position == 0 and "seal does not verify" in info.discarded, what
        assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
            "projections.snapshot_refused"
        ]
    await store.save_snapshot(stored._replace(position=head - 1), keep=9)  # the genuine, moved
    runner = Runner(store)
    info = await runner.restore(upto=head - 1)
    assert info.snapshot_position == 0 and "seal does not verify" in info.discarded
    assert runner.models.jobs[job.job_id].exit_code != 42  # the log's, rebuilt


async def test_a_sealed_snapshot_of_another_position_or_a_damaged_row_is_discarded(durable_url):
    """A snapshot sealed under one position holding the state of another is not used (one
    taken while events still arrived could say so); a row the store cannot read is
    discarded, not a failure to start; a reader without the daemon's keys just rebuilds."""
    store = await urls.open_store(durable_url, codec=sealing_codec())
    async for _ in _append_workload(store, 200):
        pass
    head = (await store.head()).position
    later = Runner(store, use_snapshots=False)
    await later.restore()
    await _store_sealed(store, snapshot.encode(later.models), head - 1)
    info = await Runner(store).restore()
    assert info.snapshot_position == 0 and f"holds position {head}" in info.discarded
    if urls.parse(durable_url).scheme == "sqlite":  # a blob turned to text that is not UTF-8
        conn = sqlite3.connect(urls.parse(durable_url).target)
        conn.execute("UPDATE snapshots SET state = CAST(x'02fffe' AS TEXT)")
        conn.commit()
        conn.close()
        info = await Runner(store).restore()
        assert info.snapshot_position == 0 and info.discarded.startswith("unreadable")
    await store.close()
    keyless = await urls.open_store(durable_url, readonly=True)
    with info_logs() as logs:
        info = await Runner(keyless).restore()
    assert info.replayed == head
    assert not [line for line in logs if line["log_level"] == "warning"]  # (nothing amiss)
    await keyless.close()


async def test_a_snapshot_sealed_with_a_key_not_loaded_is_not_taken_for_tampering(store):
    async for _ in _append_workload(store, 100):
        pass
    head = (await store.head()).position
    models = Runner(store, use_snapshots=False)
    await models.restore()
    await _store_sealed(store, snapshot.encode(models.models), head, Keyring.generate("k9"))
    with info_logs() as logs:
        info = await Runner(store).restore()
    assert info.snapshot_position == 0 and "key 'k9', which is not loaded" in info.discarded
    assert not [line for line in logs if line["log_level"] == "warning"]
