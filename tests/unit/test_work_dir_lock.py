"""One agent per work directory: the lock an agent (and then its watchdog) holds."""

from __future__ import annotations

import asyncio
import os

import pytest

from batchd.scheduler import watchdog


def test_a_second_agent_on_a_work_directory_is_refused_while_the_first_holds_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(watchdog, "LOCK_WAIT", 0.2)
    first = watchdog.hold_work_dir(tmp_path / "node")
    with pytest.raises(watchdog.WorkDirBusy):
        watchdog.hold_work_dir(tmp_path / "node")
    os.close(first)  # the first agent (and its watchdog) ended
    os.close(watchdog.hold_work_dir(tmp_path / "node"))


def test_the_lock_is_held_while_any_process_holding_it_runs(tmp_path, monkeypatch):
    """The watchdog inherits the agent's open lock: it stays held until both have let go."""
    monkeypatch.setattr(watchdog, "LOCK_WAIT", 0.2)
    agent = watchdog.hold_work_dir(tmp_path)
    handed = os.dup(agent)  # the same open file, as a child process inherits it
    os.close(agent)
    with pytest.raises(watchdog.WorkDirBusy):
        watchdog.hold_work_dir(tmp_path)
    os.close(handed)
    os.close(watchdog.hold_work_dir(tmp_path))


async def test_a_watchdog_does_not_wait_for_ever_on_an_engine_that_hangs(tmp_path, monkeypatch):
    """It holds the lock the node's next agent waits for: its container removal is bounded."""
    monkeypatch.setattr(watchdog, "SWEEP_WAIT", 0.5)
    taken = []

    async def never_answer(reader, writer) -> None:
        taken.append(writer)  # kept open, never answered
        await reader.read()

    path = str(tmp_path / "engine.sock")
    server = await asyncio.start_unix_server(never_answer, path)
    try:
        removing = watchdog._remove_containers(f"unix://{path}", "n-0", str(tmp_path))
        assert await asyncio.wait_for(removing, 10) == 0
        assert taken  # it did ask
    finally:
        server.close()
        for writer in taken:
            writer.close()
