"""The projection runner on real stores: live state, snapshots, restore, replay at a position."""

from __future__ import annotations

import asyncio

from batchd.events import urls
from batchd.events.store import Snapshot
from batchd.projections import fold, snapshot
from batchd.projections.runner import Runner
from batchd.scheduler.bench import workload
from tests.conftest import sealing_codec


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

    store = await urls.open_store(durable_url, readonly=True)
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


async def test_an_unreadable_snapshot_is_discarded_and_the_models_rebuilt(store):
    async for _ in _append_workload(store, 200):
        pass
    head = (await store.head()).position
    await store.save_snapshot(
        Snapshot(snapshot.NAME, head, snapshot.FORMAT, snapshot.CODE_HASH, b"\xc1 not msgpack")
    )
    runner = Runner(store)
    info = await runner.restore()
    assert info.discarded.startswith("unreadable") and info.replayed == head
    scratch = Runner(store, use_snapshots=False)
    await scratch.restore()
    assert snapshot.plain(runner.models) == snapshot.plain(scratch.models)
