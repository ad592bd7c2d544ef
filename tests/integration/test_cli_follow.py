"""`batchd job wait` and `batchd job file stream` as a user runs them while the job's attempts
come and go and the daemon restarts: they follow the job until it ends, and say plainly when
they cannot."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import pytest

from batchd.scheduler import cli_api
from tests.integration.conftest import admin_client, newest_job, start_daemon
from tests.integration.test_agents import EXP, _ended, _ready_nodes, _run, _until
from tests.integration.test_cli import _free_port
from tests.integration.test_cli_api import Done, _runner, _setup, assert_error

ONCE_INTERRUPTED = ("echo attempt $AZ_BATCHAI_JOB_ATTEMPT; "
                    "[ $AZ_BATCHAI_JOB_ATTEMPT -gt 1 ] || exec sleep 600")  # fmt: skip


def _environment(monkeypatch, daemon) -> dict[str, str]:
    """The CLI's environment for `daemon`: its address, and its state directory (the admin
    token's file)."""
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_STATE_DIR": str(daemon.state_dir)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("BATCHD_TOKEN", "BATCHD_CACERT"):
        monkeypatch.delenv(name, raising=False)
    return {**os.environ, **env}


async def _started(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _finished(process: asyncio.subprocess.Process, first: bytes, seconds: float) -> Done:
    out, err = await asyncio.wait_for(process.communicate(), seconds)
    return Done(process.returncode, (first + out).decode(), err.decode())


async def test_job_wait_and_file_stream_ride_out_a_daemon_restart(tmp_path, monkeypatch):
    """The daemon restarts (an upgrade) while a user waits for a job and follows its output:
    the job runs again as attempt 2 and succeeds, and both commands see it to its end."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state, listen = tmp_path / "state", f"127.0.0.1:{_free_port()}"
    daemon = await start_daemon(state, local_nodes=2, listen=listen)
    waiting = streaming = None
    try:
        env = _environment(monkeypatch, daemon)
        async with admin_client(daemon) as client:
            await _until(lambda: _ready_nodes(daemon) == 2, 30)
            await _run(client, "upgraded", ONCE_INTERRUPTED)
        waiting = await _started(env, "job", "wait", "upgraded")
        streaming = await _started(env, "job", "file", "stream", "upgraded")
        first = await asyncio.wait_for(streaming.stdout.readline(), 30)
        assert first == b"attempt 1\n"
        await asyncio.sleep(0.5)  # `job wait` has asked at least once
        await daemon.stop()
        await asyncio.sleep(3)  # down for longer than `job wait` waits between two looks
        daemon = await start_daemon(state, local_nodes=2, listen=listen)

        waited = await _finished(waiting, b"", 60)
        assert waited.code == 0, waited.err
        assert waited.lines == ["job default/default/upgraded succeeded, exit code 0"]
        streamed = await _finished(streaming, first, 30)
        assert streamed.code == 0, streamed.err
        assert streamed.out == "attempt 1\nattempt 2\n"
        assert "attempt 1 ended; following attempt 2" in streamed.err
        assert newest_job(daemon.models.models, "upgraded").attempt == 2
    finally:
        for process in (waiting, streaming):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
        await daemon.stop()


async def test_file_stream_follows_a_retried_attempt_until_the_job_ends(
    local,
    monkeypatch,
    capsys,
):
    daemon, client = local
    _environment(monkeypatch, daemon)
    command = "echo try $AZ_BATCHAI_JOB_ATTEMPT; sleep 2; [ $AZ_BATCHAI_JOB_ATTEMPT = 2 ]"
    await _run(client, "flaky", command, maxRetries=1)
    streamed = await asyncio.wait_for(_runner(capsys)("job", "file", "stream", "flaky"), 60)
    assert streamed.code == 0, streamed.err
    assert streamed.out == "try 1\ntry 2\n"
    assert streamed.err.strip().splitlines() == ["attempt 1 ended; following attempt 2"]
    job = await _ended(daemon, client, "flaky")
    assert (job["properties"]["state"], job["properties"]["attempt"]) == ("succeeded", 2)
    only = await _runner(capsys)("job", "file", "stream", "flaky", "--attempt", "1")
    assert (only.code, only.out, only.err) == (0, "try 1\n", "")


async def test_file_stream_of_a_queued_job_whose_output_its_node_keeps_waits_for_it(
    local, monkeypatch, capsys, tmp_path
):
    """The output is off the daemon's storage (the node serves it): before the job is
    placed no node has it, and the stream waits for one rather than fail."""
    daemon, client = local
    _environment(monkeypatch, daemon)
    for blocker in ("b0", "b1"):  # every GPU taken
        await _run(client, blocker, "exec sleep 600", gpusPerNode=4)
    await _run(client, "late", "echo late", stdOutErrPathPrefix=str(tmp_path / "on-the-node"))
    streaming = asyncio.create_task(_runner(capsys)("job", "file", "stream", "late"))
    await asyncio.sleep(2.5)
    assert not streaming.done()
    assert newest_job(daemon.models.models, "late").state == "queued"
    for blocker in ("b0", "b1"):
        assert (await client.call("POST", f"{EXP}/jobs/{blocker}/terminate"))[0] < 300
    streamed = await asyncio.wait_for(streaming, 60)
    assert (streamed.code, streamed.out) == (0, "late\n"), streamed.err


async def test_a_daemon_that_does_not_come_back_ends_wait_and_stream_plainly(
    tmp_path, monkeypatch, capsys
):
    """Past the reconnect window, `job wait` exits 125 (not 1, which a job's own exit code may
    be), and `job file stream` exits 1, each saying the server cannot be reached."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    monkeypatch.setattr(cli_api, "RECONNECT_WITHIN", 1.0)
    daemon = await start_daemon(tmp_path / "state", listen=f"127.0.0.1:{_free_port()}")
    try:
        _environment(monkeypatch, daemon)
        batchd = _runner(capsys)
        await _setup(batchd)
        created = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                               "--command", "true")  # fmt: skip
        assert created.code == 0, created.err
        waiting = asyncio.create_task(batchd("job", "wait", "j", "-w", "ws", "-e", "exp"))
        await asyncio.sleep(0.5)
    finally:
        await daemon.stop()
    waited = await asyncio.wait_for(waiting, 30)
    assert waited.code == 125, waited.err
    assert "cannot reach the batchd server" in waited.err and "ws/exp/j" in waited.err
    assert waited.out == ""
    streamed = await asyncio.wait_for(
        batchd("job", "file", "stream", "j", "-w", "ws", "-e", "exp"), 30
    )
    assert_error(streamed, "cannot reach the batchd server")


async def test_file_stream_of_a_job_deleted_while_it_follows_says_so(batchd, api):
    await _setup(batchd)
    created = await batchd("job", "create", "t", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--command", "true")  # fmt: skip
    assert created.code == 0, created.err
    streaming = asyncio.create_task(batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp"))
    await asyncio.sleep(1.0)
    assert not streaming.done()  # a queued job: its first attempt's file is followed
    deleted = await _delete(api, "/v1/workspaces/ws/experiments/exp")
    assert deleted < 300
    streamed = await asyncio.wait_for(streaming, 10)
    assert_error(streamed, "ws/exp/t", "no experiment 'exp'")  # deleted with its job


async def _delete(api, path: str) -> int:
    headers = {"Authorization": f"Bearer {api.admin_token}"}
    async with (
        aiohttp.ClientSession(api.url, headers=headers) as session,
        session.delete(path) as response,
    ):
        return response.status


@pytest.fixture
def batchd(api, capsys, monkeypatch):
    _environment(monkeypatch, api)
    return _runner(capsys)
