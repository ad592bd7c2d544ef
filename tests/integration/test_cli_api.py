"""The `batchd` CLI against a real in-process daemon, as a user runs it: exit codes, printed
lines, and what the server holds afterwards."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from batchd.events.envelope import NewEvent
from batchd.events.timeutil import to_iso
from batchd.scheduler import client, tls
from batchd.scheduler.cli import main
from tests.http import serving
from tests.integration.conftest import admin_client, settled, start_daemon

RECIPES = Path(__file__).parent.parent / "data" / "batchai-recipes"
STORAGE_KEY = "c3RvcmFnZS1rZXktZm9yLXRlc3Rz"


@dataclass
class Done:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture
def batchd(api, capsys, monkeypatch):
    """Run `batchd ...` (cli.main in a thread) against the `api` daemon, with the server and
    state directory from the environment, so the CLI reads the admin token from the file."""
    monkeypatch.setenv("BATCHD_SERVER", api.url)
    monkeypatch.setenv("BATCHD_STATE_DIR", str(api.state_dir))
    for name in ("BATCHD_TOKEN", "BATCHD_CACERT"):
        monkeypatch.delenv(name, raising=False)
    return _runner(capsys)


def _runner(capsys):
    async def run(*argv: str) -> Done:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Done(code, out, err)

    return run


def assert_error(done: Done, *words: str) -> list[str]:
    """A plain error: non-zero exit, `batchd: error: ...` first, no traceback; the lines."""
    assert done.code == 1, (done.code, done.err)
    lines = [line for line in done.err.strip().splitlines() if not line.startswith("note: ")]
    assert lines[0].startswith("batchd: error: "), done.err
    for word in words:
        assert word in done.err, (word, done.err)
    return lines


async def _setup(batchd, vm_size: str = "STANDARD_NC24", nodes: int = 2) -> None:
    assert (await batchd("workspace", "create", "ws")).code == 0
    assert (await batchd("experiment", "create", "exp", "-w", "ws")).code == 0
    done = await batchd("cluster", "create", "c", "-w", "ws", "--vm-size", vm_size,
                        "--nodes", str(nodes))  # fmt: skip
    assert done.code == 0, done.err


def _job_id(api, name: str, ws: str = "ws", exp: str = "exp") -> str:
    return api.models.models.job_ids[f"{ws}/{exp}/{name}"][-1]


async def _drive(api, job_id: str, *ends: tuple[str, dict]) -> None:
    """Schedule and start the job's first attempt, then append `ends` (type, data)."""
    stream = f"job-{job_id}"
    events = [
        NewEvent("JobScheduled", {"jobId": job_id, "attempt": 1,
                                  "tasks": [{"node": "n-1", "gpus": [0]}]}),
        NewEvent("JobStarted", {"jobId": job_id, "attempt": 1}),
        *(NewEvent(kind, {"jobId": job_id, "attempt": 1, **data}) for kind, data in ends),
    ]  # fmt: skip
    for event in events:
        position = await api.store.append(stream, [event])
    await api.models.wait_for(_position(position))


def _position(positions: list[int]) -> int:
    return positions[-1]


# -- the whole lifecycle ----------------------------------------------------------------------
async def test_workspace_experiment_and_cluster_lifecycle(batchd, api, tmp_path):
    done = await batchd("workspace", "create", "ws")
    assert done.code == 0 and done.lines == ["created workspace ws"]
    assert (await batchd("workspace", "create", "ws")).lines == [
        "workspace ws exists as given: unchanged"
    ]
    assert [line.split("\t")[0] for line in (await batchd("workspace", "list")).lines] == ["ws"]
    shown = await batchd("workspace", "show", "ws")
    assert "name: ws" in shown.lines and "provisioningState: succeeded" in shown.lines

    done = await batchd("experiment", "create", "exp", "-w", "ws")
    assert done.lines == ["created experiment ws/exp"]
    listed = await batchd("experiment", "list", "-w", "ws", "--json")
    assert [e["name"] for e in listed.json["value"]] == ["exp"]

    done = await batchd("cluster", "create", "c", "-w", "ws", "--vm-size", "STANDARD_NC24",
                        "--nodes", "2")  # fmt: skip
    assert done.code == 0 and done.lines == ["created cluster ws/c"]
    rows = [line.split("\t") for line in (await batchd("cluster", "list", "-w", "ws")).lines]
    assert [(r[0], r[1]) for r in rows] == [("c", "Standard_NC24")]
    done = await batchd("cluster", "resize", "c", "-w", "ws", "--nodes", "3")
    assert done.code == 0 and done.lines == ["resized cluster ws/c to 3 nodes"]
    shown = await batchd("cluster", "show", "c", "-w", "ws")
    assert "scaleSettings.manual.targetNodeCount: 3" in shown.lines
    assert (await batchd("cluster", "show", "c", "-w", "ws", "--json")).json["properties"][
        "scaleSettings"
    ] == {"manual": {"targetNodeCount": 3}}
    done = await batchd("cluster", "resize", "c", "-w", "ws", "--nodes", "1",
                        "--node-deallocation-option", "waitforjobcompletion")  # fmt: skip
    assert done.code == 0 and done.lines == ["resized cluster ws/c to 1 nodes"]  # none had joined
    done = await batchd("cluster", "resize", "c", "-w", "ws", "--nodes", "2")
    shown = await batchd("cluster", "show", "c", "-w", "ws", "--json")
    assert shown.json["properties"]["scaleSettings"] == {  # the option is kept
        "manual": {"targetNodeCount": 2, "nodeDeallocationOption": "waitforjobcompletion"}
    }

    # --nodes over a file's manual settings changes the count only
    manual = {"targetNodeCount": 1, "nodeDeallocationOption": "waitforjobcompletion"}
    path = tmp_path / "cw.json"
    path.write_text(json.dumps({"properties": {"vmSize": "Standard_NC6",
                                               "scaleSettings": {"manual": manual}}}))  # fmt: skip
    done = await batchd("cluster", "create", "cw", "-w", "ws", "-f", str(path), "--nodes", "3")
    assert done.code == 0, done.lines
    shown = await batchd("cluster", "show", "cw", "-w", "ws", "--json")
    assert shown.json["properties"]["scaleSettings"] == {"manual": {**manual, "targetNodeCount": 3}}
    assert (await batchd("cluster", "delete", "cw", "-w", "ws")).code == 0

    assert (await batchd("cluster", "delete", "c", "-w", "ws")).lines == ["deleted cluster ws/c"]
    assert_error(await batchd("cluster", "show", "c", "-w", "ws"), "no cluster 'c'")
    done = await batchd("experiment", "delete", "exp", "-w", "ws")
    assert done.code == 0 and "ws/exp" not in api.models.models.experiments
    assert (await batchd("workspace", "delete", "ws")).code == 0
    assert (await batchd("workspace", "list")).lines == []


async def test_job_from_flags_then_list_show_wait_history_and_delete(batchd, api):
    await _setup(batchd)
    done = await batchd(
        "job", "create", "train", "-w", "ws", "-e", "exp", "--cluster", "c",
        "--command", "python train.py --epochs 3", "--image", "pytorch/pytorch:2.3",
        "--nodes", "2", "--gpus-per-node", "1", "--priority", "high", "--max-retries", "2",
        "--env", "LR=0.1", "--env", "BATCH=64",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert done.lines == ["created job ws/exp/train (queued)"]

    shown = (await batchd("job", "show", "train", "-w", "ws", "-e", "exp")).lines
    for line in (
        "state: queued", "nodeCount: 2", "gpusPerNode: 1", "priority: 500", "maxRetries: 2",
        "customToolkitSettings.commandLine: python train.py --epochs 3",
        "containerSettings.imageSourceRegistry.image: pytorch/pytorch:2.3",
        "environmentVariables[0].name: LR", "environmentVariables[1].value: 64",
        "cluster.id: /workspaces/ws/clusters/c",
    ):  # fmt: skip
        assert line in shown, line

    job = await batchd("job", "list", "-w", "ws", "-e", "exp")
    (row,) = [line.split("\t") for line in job.lines]
    assert row[:6] == ["train", "queued", "c", "2", "500", "0"]
    assert (await batchd("job", "list", "-w", "ws", "-e", "exp", "--state", "running")).lines == []

    await _drive(api, _job_id(api, "train"), ("JobFailed", {"exitCode": 3}))
    waited = await batchd("job", "wait", "train", "-w", "ws", "-e", "exp")
    assert waited.code == 3 and waited.lines == ["job ws/exp/train failed, exit code 3"]
    listed = await batchd("job", "list", "-w", "ws", "-e", "exp", "--state", "failed", "--json")
    assert [j["properties"]["executionInfo"]["exitCode"] for j in listed.json["value"]] == [3]

    history = await batchd("job", "history", "train", "-w", "ws", "-e", "exp")
    assert history.code == 0
    assert "incarnation 1 of 1" in history.out
    for event in ("JobSubmitted", "JobScheduled", "JobStarted", "JobFailed"):
        assert event in history.out
    timeline = (await batchd("job", "history", "train", "-w", "ws", "-e", "exp", "--json")).json
    assert timeline["value"][0]["timeline"][0]["event"] == "JobSubmitted"

    done = await batchd("job", "delete", "train", "-w", "ws", "-e", "exp")
    assert done.lines == ["deleted job ws/exp/train"]
    assert (await batchd("job", "list", "-w", "ws", "-e", "exp")).lines == []
    assert_error(await batchd("job", "show", "train", "-w", "ws", "-e", "exp"), "no job")
    gone = await batchd("job", "history", "train", "-w", "ws", "-e", "exp", "--json")
    assert [e["event"] for e in gone.json["value"][0]["timeline"]][-1] == "JobDeleted"


async def test_what_a_job_says_is_shown_not_obeyed_by_the_terminal(batchd, api):
    """A command line or an error that a job's own output ends carries escape sequences and
    carriage returns: `job show`, `job list`, `job wait` and `job history` print them as
    escapes, so a job cannot write over, recolour or retitle an operator's terminal."""
    await _setup(batchd)
    command = "echo hi\n\x1b[31mRED\x1b[0m\rOVERWRITE"
    done = await batchd("job", "create", "esc", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", command)  # fmt: skip
    assert done.code == 0, done.err
    said = {"code": "output_unwritable", "message": "cannot write: \x1b]0;pwned\x07\r"}
    await _drive(api, _job_id(api, "esc"), ("JobFailed", {"exitCode": 3, "error": said}))
    outputs = [await batchd("job", verb, "esc", "-w", "ws", "-e", "exp")
               for verb in ("show", "wait", "history")]  # fmt: skip
    outputs.append(await batchd("job", "list", "-w", "ws", "-e", "exp"))
    for done in outputs:
        assert not any(c in done.out + done.err for c in "\x1b\x07\r"), done
    shown = outputs[0].lines
    assert "customToolkitSettings.commandLine: echo hi\\n\\x1b[31mRED\\x1b[0m\\rOVERWRITE" in shown
    assert outputs[1].lines == ["job ws/exp/esc failed, exit code 3: output_unwritable: "
                                "cannot write: \\x1b]0;pwned\\x07\\r"]  # fmt: skip


async def test_job_from_a_config_file_with_flags_overriding_it(batchd, api, tmp_path):
    await _setup(batchd)
    spec = {"properties": {
        "nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "schedulingPriority": "low", "customToolkitSettings": {"commandLine": "echo hi"},
        "environmentVariables": [{"name": "LR", "value": "1"}],
    }}  # fmt: skip
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    done = await batchd("job", "create", "j1", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--config-file", str(path), "--nodes", "2", "--priority", "42",
                        "--env", "LR=0.5")  # fmt: skip
    assert done.code == 0, done.err
    job = (await batchd("job", "show", "j1", "-w", "ws", "-e", "exp", "--json")).json
    props = job["properties"]
    assert (props["nodeCount"], props["priority"]) == (2, 42)
    assert "schedulingPriority" not in props
    assert props["environmentVariables"] == [{"name": "LR", "value": "0.5"}]
    # the same document again is no change; a different one is refused with the reason
    again = await batchd("job", "create", "j1", "-w", "ws", "-e", "exp", "--cluster", "c",
                         "--config-file", str(path), "--nodes", "2", "--priority", "42",
                         "--env", "LR=0.5")  # fmt: skip
    assert again.code == 0 and again.lines == ["job ws/exp/j1 exists as given: unchanged"]
    other = await batchd("job", "create", "j1", "-w", "ws", "-e", "exp", "--cluster", "c",
                         "--config-file", str(path))  # fmt: skip
    assert_error(other, "exists already")


async def test_job_list_follows_every_page(batchd, api):
    await _setup(batchd)
    headers = {"Authorization": f"Bearer {api.admin_token}"}
    document = {"properties": {"cluster": "c", "nodeCount": 1, "stdOutErrPathPrefix": "/o",
                               "customToolkitSettings": {"commandLine": "true"}}}  # fmt: skip
    async with aiohttp.ClientSession(api.url, headers=headers) as session:

        async def put(n: int) -> int:
            path = f"/v1/workspaces/ws/experiments/exp/jobs/j{n:03}"
            async with session.put(path, json=document) as response:
                return response.status

        assert set(await asyncio.gather(*(put(n) for n in range(130)))) == {201}
    listed = await batchd("job", "list", "-w", "ws", "-e", "exp")
    assert sorted(line.split("\t")[0] for line in listed.lines) == [f"j{n:03}" for n in range(130)]
    as_json = (await batchd("job", "list", "-w", "ws", "-e", "exp", "--json")).json
    assert len(as_json["value"]) == 130 and as_json["nextLink"] is None


async def test_terminate_a_queued_job_and_wait_for_succeeded_ones(batchd, api):
    await _setup(batchd)
    for name in ("a", "b"):
        done = await batchd("job", "create", name, "-w", "ws", "-e", "exp", "--cluster", "c",
                            "--command", "sleep 100")  # fmt: skip
        assert done.code == 0, done.err
    done = await batchd("job", "terminate", "a", "-w", "ws", "-e", "exp")  # queued: ends at once
    assert done.code == 0 and done.lines == ["terminated job ws/exp/a: it has ended (failed)"]
    waited = await batchd("job", "wait", "a", "-w", "ws", "-e", "exp")
    assert waited.code == 1 and waited.lines == [
        "job ws/exp/a failed: terminated: terminated by user:admin"]  # fmt: skip
    again = await batchd("job", "terminate", "a", "-w", "ws", "-e", "exp")
    assert_error(again, "cannot terminate a job that is failed")

    timed_out = await batchd("job", "wait", "b", "-w", "ws", "-e", "exp", "--timeout", "0.3")
    assert timed_out.code == 124 and "still queued after 0.3 s" in timed_out.err
    done = await batchd("job", "create", "d", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "sleep 100")  # fmt: skip
    done = await batchd("job", "delete", "d", "-w", "ws", "-e", "exp")  # queued: at once
    assert done.code == 0 and done.lines == ["deleted job ws/exp/d"], done.err
    assert_error(await batchd("job", "show", "d", "-w", "ws", "-e", "exp"), "no job 'd'")

    await _drive(api, _job_id(api, "b"), ("JobSucceeded", {"exitCode": 0}))
    waited = await batchd("job", "wait", "b", "-w", "ws", "-e", "exp", "--json")
    assert waited.code == 0 and waited.json["properties"]["state"] == "succeeded"


async def test_terminate_a_running_job_says_it_is_terminating(batchd, api):
    await _setup(batchd)
    done = await batchd("job", "create", "r", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "sleep 100")  # fmt: skip
    assert done.code == 0, done.err
    await _drive(api, _job_id(api, "r"))  # running on n-1: it ends when its node says so
    done = await batchd("job", "terminate", "r", "-w", "ws", "-e", "exp")
    assert done.code == 0 and done.lines == [
        "terminating job ws/exp/r: it ends once its tasks have stopped (batchd job wait)"
    ]
    shown = await batchd("job", "show", "r", "-w", "ws", "-e", "exp")
    assert "state: terminating" in shown.lines
    as_json = await batchd("job", "terminate", "r", "-w", "ws", "-e", "exp", "--json")
    assert as_json.code == 0 and as_json.json["properties"]["state"] == "terminating"
    done = await batchd("job", "delete", "r", "-w", "ws", "-e", "exp")  # once it has stopped
    assert done.code == 0 and done.lines == [
        "deleting job ws/exp/r: it is terminated first, and deleted once its tasks have stopped"
    ], done.err


async def test_job_wait_on_a_retried_job_terminated_says_who_ended_it(batchd, api):
    """Not its first attempt's lost node: that was not why it ended."""
    await _setup(batchd)
    done = await batchd("job", "create", "r", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "sleep 100")  # fmt: skip
    assert done.code == 0, done.err
    job_id = _job_id(api, "r")
    lost = {"code": "node_lost", "message": "node n-1 was lost"}
    await _drive(api, job_id, ("JobRequeued", {"cause": "node_lost", "error": lost}))
    for event in (NewEvent("JobScheduled", {"jobId": job_id, "attempt": 2,
                                            "tasks": [{"node": "n-1", "gpus": [0]}]}),
                  NewEvent("JobStarted", {"jobId": job_id, "attempt": 2})):  # fmt: skip
        position = await api.store.append(f"job-{job_id}", [event])
    await api.models.wait_for(_position(position))
    done = await batchd("job", "terminate", "r", "-w", "ws", "-e", "exp")
    assert done.code == 0, done.err
    why = "terminated by user:admin"
    ended = NewEvent("JobTerminated", {"jobId": job_id, "attempt": 2, "reason": why})
    await api.models.wait_for(_position(await api.store.append(f"job-{job_id}", [ended])))
    waited = await batchd("job", "wait", "r", "-w", "ws", "-e", "exp")
    assert waited.code == 1 and waited.lines == [f"job ws/exp/r failed: terminated: {why}"]


async def test_job_output_files_are_listed_and_streamed(batchd, api):
    await _setup(batchd)
    done = await batchd("job", "create", "t", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "python t.py")  # fmt: skip
    assert done.code == 0, done.err
    await _drive(api, _job_id(api, "t"))
    out = api.cfg.mounts / "ws" / "exp" / "t" / "1" / "stdouterr"  # $AZ_BATCHAI_MOUNT_ROOT
    out.mkdir(parents=True)
    (out / "stdout.txt").write_bytes(b"epoch 1\n")
    (out / "stderr.txt").write_bytes(b"")
    listed = await batchd("job", "file", "list", "t", "-w", "ws", "-e", "exp")
    assert [line.split("\t")[:3] for line in listed.lines] == [
        ["stderr.txt", "file", "0"], ["stdout.txt", "file", "8"],
    ]  # fmt: skip

    streaming = asyncio.create_task(batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp"))
    await asyncio.sleep(0.5)
    with (out / "stdout.txt").open("ab") as handle:
        handle.write(b"epoch 2\n")
    await asyncio.sleep(0.5)
    assert not streaming.done()  # follows while the job runs
    await _drive_end(api, _job_id(api, "t"), "JobSucceeded", {"exitCode": 0})
    done = await asyncio.wait_for(streaming, 10)
    assert done.code == 0 and done.out == "epoch 1\nepoch 2\n"
    dotted = await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp",
                          "--file", "./stdout.txt")  # fmt: skip
    assert dotted.code == 0 and dotted.out == "epoch 1\nepoch 2\n"  # as the API serves it
    assert_error(await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp",
                              "--file", "."), "must name a file")  # fmt: skip
    missing = await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp",
                           "--output-directory-id", "nope")  # fmt: skip
    assert_error(missing, "nope")
    gone = await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp", "--file", "x.txt")
    assert_error(gone, "no file 'x.txt'")  # the job has ended: it will never be written


async def _drive_end(api, job_id: str, kind: str, data: dict) -> None:
    event = NewEvent(kind, {"jobId": job_id, "attempt": 1, **data})
    result = await api.store.append(f"job-{job_id}", [event])
    await api.models.wait_for(_position(result))


# -- tokens and roles -------------------------------------------------------------------------
async def test_a_viewer_token_reads_but_cannot_write(batchd, api):
    await _setup(batchd)
    done = await batchd("token", "create", "--role", "viewer", "--name", "ann")
    assert done.code == 0, done.err
    (token,) = done.lines
    assert len(token) >= 32 and "shown only this once" in done.err
    listed = await batchd("token", "list")
    rows = {line.split("\t")[1]: line.split("\t") for line in listed.lines}
    assert rows["ann"][2] == "viewer" and token not in listed.out
    assert rows["admin"][2] == "admin"
    assert api.admin_token not in listed.out + listed.err
    bound = await batchd("token", "create", "--role", "agent", "--name", "n1", "--node", "n-1")
    assert bound.code == 0, bound.err
    rows = {line.split("\t")[1]: line.split("\t") for line in (await batchd("token", "list")).lines}
    assert rows["n1"][4] == "n-1" and rows["ann"][4] == "-"  # the node an agent token binds

    seen = await batchd("cluster", "list", "-w", "ws", "--token", token)
    assert seen.code == 0 and seen.lines[0].startswith("c\t")
    refused = await batchd("job", "create", "x", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--command", "true", "--token", token)  # fmt: skip
    lines = assert_error(refused)
    assert len(lines) == 1 and token not in refused.err
    assert "ws/exp/x" not in api.models.models.job_ids

    revoked = await batchd("token", "revoke", rows["ann"][0])
    assert revoked.code == 0
    assert_error(await batchd("cluster", "list", "-w", "ws", "--token", token))


async def test_an_agent_token_for_one_node(batchd, api):
    done = await batchd("token", "create", "--role", "agent", "--name", "gpu-1", "--node",
                        "gpu-1", "--json")  # fmt: skip
    assert done.code == 0, done.err
    assert done.json["node"] == "gpu-1" and done.json["role"] == "agent"
    wrong = await batchd("token", "create", "--role", "viewer", "--name", "v", "--node", "gpu-1")
    assert "node" in assert_error(wrong)[0]


async def test_a_workspace_scoped_operator_token(batchd, api, monkeypatch):
    await _setup(batchd)
    assert (await batchd("workspace", "create", "other")).code == 0
    done = await batchd("token", "create", "--role", "operator", "--name", "bob", "-w", "ws",
                        "--json")  # fmt: skip
    token = done.json["token"]
    monkeypatch.setenv("BATCHD_TOKEN", token)
    listed = await batchd("workspace", "list")
    assert [line.split("\t")[0] for line in listed.lines] == ["ws"]
    ok = await batchd("job", "create", "x", "-w", "ws", "-e", "exp", "--cluster", "c",
                      "--command", "true")  # fmt: skip
    assert ok.code == 0, ok.err
    assert_error(await batchd("experiment", "create", "e2", "-w", "other"))
    assert_error(await batchd("cluster", "delete", "c", "-w", "ws"))
    elsewhere = await batchd("job", "create", "y", "-w", "ws", "-e", "exp", "--cluster",
                             "/workspaces/other/clusters/c", "--command", "true")  # fmt: skip
    assert_error(elsewhere, "cluster names a cluster of workspace 'other'")  # (ws is allowed)
    assert_error(await batchd("events", "tail"))


# -- bad input --------------------------------------------------------------------------------
async def test_bad_input_is_printed_plainly_with_the_field_path(batchd, api, tmp_path):
    await _setup(batchd)
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "true", "--priority", "5000")  # fmt: skip
    assert assert_error(done) == ["batchd: error: properties.priority: must be at most 1000"]

    done = await batchd("cluster", "create", "c2", "-w", "ws", "--vm-size", "STANDARD_XYZ")
    assert "properties.vmSize" in assert_error(done, "STANDARD_XYZ")[-1]

    path = tmp_path / "job.json"
    path.write_text(json.dumps({"properties": {
        "nodeCount": 1, "stdOutErrPathPrefix": "/x", "customToolkitSettings": {"commandLine": "x"},
        "mountVolumes": {"azureFileShares": [{"azureFileUrl": "u", "relativeMountPath": "up"}]},
        "bogus": 1,
    }}))  # fmt: skip
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert assert_error(done) == ["batchd: error: properties.bogus: is not a known property"]
    other = {"id": "/workspaces/ws/clusters/other"}
    elsewhere = {"properties": {"cluster": other, "nodeCount": 1,
                                "customToolkitSettings": {"commandLine": "x"}}}  # fmt: skip
    path.write_text(json.dumps(elsewhere))
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert_error(done, "--cluster c: the file names cluster 'other'")

    path.write_text("{not json")
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert assert_error(done, str(path), "not valid JSON") == done.err.strip().splitlines()[:1]
    path.write_text('{"properties": {"nodeCount": 1, "nodeCount": 2}}')
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert_error(done, str(path), "'properties.nodeCount' is given twice in one object")
    path.write_text("[" * 100_000 + "]" * 100_000)
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert_error(done, str(path), "nested too deeply")
    path.write_text('{"nodeCount": ' + "9" * 5000 + "}")
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert_error(done, str(path), "a number of 5000 digits")
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(tmp_path / "missing.json"))  # fmt: skip
    assert_error(done, "missing.json")
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "nope",
                        "--command", "true")  # fmt: skip
    assert_error(done, "nope")
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--command", "true")
    assert_error(done, "--cluster")
    done = await batchd("job", "show", "nope", "-w", "ws", "-e", "exp")
    assert_error(done, "no job 'nope'")
    done = await batchd("job", "create", "j", "--cluster", "c", "--command", "x", "--env", "X")
    assert done.code == 2 and "NAME=VALUE" in done.err
    path.write_text(json.dumps({"properties": {
        "nodeCount": 1, "stdOutErrPathPrefix": "/x", "customToolkitSettings": {"commandLine": "x"},
        "environmentVariables": [{"name": "A", "value": "1"}],
        "secrets": [{"name": "A", "value": "hidden"}],
    }}))  # fmt: skip
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert assert_error(done) == ["batchd: error: properties.secrets[0].name: A is set already, "
                                  "by properties.environmentVariables[0].name"]  # fmt: skip
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "x", "--image", "")  # fmt: skip
    assert_error(done, "image")
    path.write_text(json.dumps({"properties": [], "cluster": "c"}))
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "-f", str(path))
    assert assert_error(done) == [f"batchd: error: {path}: properties must be a JSON object"]
    assert api.models.models.job_ids.get("ws/exp/j") is None
    for argv in (("workspace", "create", ""), ("experiment", "show", "", "-w", "ws"),
                 ("job", "show", "", "-w", "ws", "-e", "exp"), ("cluster", "show", "", "-w", "ws"),
                 ("node", "show", "")):  # fmt: skip
        assert_error(await batchd(*argv), "name must not be empty" if argv[0] != "node" else
                     "node id must not be empty")  # fmt: skip
    done = await batchd("job", "show", "bad/name", "-w", "ws", "-e", "exp")
    assert_error(done, "job name", "letters, digits")
    done = await batchd("workspace", "create", "ünï")
    assert_error(done, "workspace name")
    done = await batchd("events", "tail", "--after", str(2**63))
    assert done.code == 2 and "too large" in done.err
    done = await batchd("job", "wait", "j", "-w", "ws", "-e", "exp", "--timeout", "nan")
    assert done.code == 2 and "not a finite number" in done.err


async def test_every_detail_of_an_error_gets_its_own_line(capsys, monkeypatch, tmp_path):
    async def refuse(request: web.Request) -> web.Response:
        details = [
            {"name": "properties.nodeCount", "value": "must be at least 1"},
            {"name": "properties.vmSize", "value": "'X' is not a known VM size"},
        ]
        body = {"error": {"code": "BadRequest", "message": "the document has 2 problems",
                          "details": details}}  # fmt: skip
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_put("/v1/workspaces/ws/clusters/c", refuse)
    monkeypatch.setenv("BATCHD_STATE_DIR", str(tmp_path))
    async with serving(app) as url:
        server = ["--server", url, "--token", "t"]
        done = await _runner(capsys)(
            "cluster", "create", "c", "-w", "ws", "--vm-size", "X", *server
        )
    assert assert_error(done) == [
        "batchd: error: the document has 2 problems",
        "  properties.nodeCount: must be at least 1",
        "  properties.vmSize: 'X' is not a known VM size",
    ]
    assert done.out == ""


@pytest.mark.parametrize(("answers", "words"), [
    ([(200, "running", "t1"), (200, "failed", "t2")], "deleted and a new job took its name"),
    ([(200, "running", "t1"), (404, None, None)], "it was deleted"),
    ([(200, "running", "t1"), (401, None, None)], "token revoked"),
    ([(404, None, None)], "no job 'j'"),
])  # fmt: skip
async def test_a_wait_that_cannot_tell_how_its_job_ended_exits_125(capsys, monkeypatch, tmp_path,
                                                                   answers, words):  # fmt: skip
    """The job waited on deleted (and its name taken by a new job, whose end is not its
    own), or the server refusing the wait: 125 and why, never a job's exit code or 1."""

    async def job(request: web.Request) -> web.Response:
        status, state, created = answers.pop(0) if len(answers) > 1 else answers[0]
        if status != 200:
            message = "token revoked" if status == 401 else "no job 'j' in ws/exp"
            return web.json_response({"error": {"code": "x", "message": message}}, status=status)
        properties = {"state": state, "creationTime": created,
                      "executionInfo": {"exitCode": 5 if state == "failed" else None}}  # fmt: skip
        return web.json_response({"name": "j", "properties": properties})

    app = web.Application()
    app.router.add_get("/v1/workspaces/ws/experiments/exp/jobs/j", job)
    monkeypatch.setenv("BATCHD_STATE_DIR", str(tmp_path))
    async with serving(app) as url:
        done = await _runner(capsys)("job", "wait", "j", "-w", "ws", "-e", "exp",
                                     "--server", url, "--token", "t")  # fmt: skip
    assert done.code == 125 and words in done.err and done.out == "", done


async def test_a_file_stream_does_not_go_on_into_a_new_job_of_its_name(capsys, monkeypatch,
                                                                       tmp_path):  # fmt: skip
    """The followed job deleted and a new one made under its name: the stream stops, saying
    so, rather than print the new job's output after the old one's."""
    jobs = [("running", "t1"), ("running", "t2")]  # as fetched: the second is the new job's

    async def job(request: web.Request) -> web.Response:
        state, created = jobs.pop(0) if len(jobs) > 1 else jobs[0]
        properties = {"state": state, "creationTime": created, "attempt": 1}
        return web.json_response({"name": "j", "properties": properties})

    async def stdout(request: web.Request) -> web.Response:
        return web.Response(body=b"old job\n", content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/v1/workspaces/ws/experiments/exp/jobs/j", job)
    app.router.add_get("/v1/workspaces/ws/experiments/exp/jobs/j/files/stdout.txt", stdout)
    monkeypatch.setenv("BATCHD_STATE_DIR", str(tmp_path))
    async with serving(app) as url:
        done = await _runner(capsys)("job", "file", "stream", "j", "-w", "ws", "-e", "exp",
                                     "--server", url, "--token", "t")  # fmt: skip
    assert done.out == "old job\n"
    assert_error(done, "deleted, and a new job took its name")


async def test_unreachable_server_and_missing_token(capsys, monkeypatch, tmp_path):
    batchd = _runner(capsys)
    monkeypatch.setenv("BATCHD_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("BATCHD_TOKEN", raising=False)
    done = await batchd("workspace", "list", "--server", "http://127.0.0.1:9")
    lines = assert_error(done, "http://127.0.0.1:9", "connection refused")
    assert len(lines) == 1
    done = await batchd("job", "wait", "x", "--server", "ftp://example.org")
    assert_error(done, "http:// or https://")
    done = await batchd("job", "wait", "x", "--server", "http://127.0.0.1:9")  # (never up)
    assert done.code == 125, done  # not 1: a job's own exit code may be 1
    assert "connection refused" in done.err and "cannot tell whether job" in done.err
    done = await batchd("job", "list", "--server", "http://127.0.0.1:9/v1/")
    assert_error(done, "without /v1", "http://127.0.0.1:8080")


async def test_no_token_is_explained(batchd, api, monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHD_STATE_DIR", str(tmp_path))  # no admin.token here
    done = await batchd("workspace", "list")
    assert_error(done, "--token", "BATCHD_TOKEN")
    done = await batchd("workspace", "list", "--token", "not-a-token")
    assert len(assert_error(done)) == 1 and "not-a-token" not in done.err


async def test_a_token_given_empty_is_refused_not_taken_for_the_admin_token(batchd, api):
    """`--token "$VIEWER"` with $VIEWER unset must not run as the daemon's admin (whose
    admin.token the CLI reads here): nothing is written."""
    before = len(api.models.models.tokens)
    done = await batchd("token", "create", "--role", "viewer", "--name", "t", "--token", " ")
    assert_error(done, "--token is empty")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BATCHD_TOKEN", "")
        assert_error(await batchd("workspace", "create", "w2"), "$BATCHD_TOKEN is empty")
    assert len(api.models.models.tokens) == before and "w2" not in api.models.models.workspaces
    assert (await batchd("workspace", "list")).code == 0  # neither given: the admin token


# -- every Batch AI recipe --------------------------------------------------------------------
async def test_every_batchai_recipe_is_accepted(batchd, api, monkeypatch):
    await _setup(batchd, "STANDARD_NC24", 2)
    monkeypatch.setenv("AZURE_BATCHAI_STORAGE_ACCOUNT", "mystorage")
    monkeypatch.setenv("AZURE_BATCHAI_STORAGE_KEY", STORAGE_KEY)
    recipes = sorted(RECIPES.glob("*.json"))
    assert len(recipes) == 17
    for n, recipe in enumerate(recipes):
        done = await batchd("job", "create", f"r{n}", "-w", "ws", "-e", "exp",
                            "--config-file", str(recipe), "--cluster", "c")  # fmt: skip
        assert done.code == 0, (recipe.name, done.err)
        assert STORAGE_KEY not in done.out + done.err
        mounts = json.loads(recipe.read_text())["properties"].get("mountVolumes")
        assert ("no node mounts them yet" in done.err) == bool(mounts), recipe.name
    listed = await batchd("job", "list", "-w", "ws", "-e", "exp")
    assert sorted(line.split("\t")[0] for line in listed.lines) == sorted(
        f"r{n}" for n in range(17)
    )
    shares = []
    for n in range(17):
        shown = await batchd("job", "show", f"r{n}", "-w", "ws", "-e", "exp", "--json")
        assert STORAGE_KEY not in shown.out
        volumes = shown.json["properties"].get("mountVolumes", {})
        shares += volumes.get("azureFileShares", []) + volumes.get("azureBlobFileSystems", [])
    assert len(shares) == 34
    assert all("<AZURE_BATCHAI" not in json.dumps(share) for share in shares)
    assert all("mystorage" in json.dumps(share) for share in shares)
    assert all(share["credentials"] == {"accountKey": "***"} for share in shares)


async def test_the_storage_key_is_filled_in_only_where_the_log_keeps_it_sealed(
    batchd, api, monkeypatch, tmp_path
):
    await _setup(batchd)
    monkeypatch.setenv("AZURE_BATCHAI_STORAGE_KEY", STORAGE_KEY)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"properties": {
        "nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "customToolkitSettings": {"commandLine": "echo <AZURE_BATCHAI_STORAGE_KEY>"},
        "environmentVariables": [{"name": "KEY", "value": "<AZURE_BATCHAI_STORAGE_KEY>"}],
        "secrets": [{"name": "SEALED", "value": "<AZURE_BATCHAI_STORAGE_KEY>"}]}}))  # fmt: skip
    done = await batchd("job", "create", "k", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(job))  # fmt: skip
    assert done.code == 0, done.err
    assert "is filled in only where the log keeps it encrypted" in done.err
    shown = await batchd("job", "show", "k", "-w", "ws", "-e", "exp", "--json")
    props = shown.json["properties"]
    assert STORAGE_KEY not in shown.out
    assert props["environmentVariables"][0]["value"] == "<AZURE_BATCHAI_STORAGE_KEY>"
    assert props["customToolkitSettings"]["commandLine"] == "echo <AZURE_BATCHAI_STORAGE_KEY>"
    assert props["secrets"] == [{"name": "SEALED", "value": "***"}]
    exported = await batchd("events", "export", "--store", api.cfg.store_url)
    assert STORAGE_KEY not in exported.out


async def test_recipes_without_storage_settings_are_sent_as_written(batchd, api, monkeypatch):
    await _setup(batchd, "STANDARD_NC24", 2)
    monkeypatch.delenv("AZURE_BATCHAI_STORAGE_ACCOUNT", raising=False)
    monkeypatch.delenv("AZURE_BATCHAI_STORAGE_KEY", raising=False)
    recipe = RECIPES / "Horovod__Horovod-PyTorch__job.json"
    done = await batchd("job", "create", "h", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(recipe))  # fmt: skip
    assert done.code == 0, done.err
    assert "AZURE_BATCHAI_STORAGE_ACCOUNT" in done.err and "AZURE_BATCHAI_STORAGE_KEY" in done.err


# -- the log through the API ------------------------------------------------------------------
async def test_events_tail_and_replay_through_the_api(batchd, api):
    await _setup(batchd)
    await settled(api)
    head = (await api.store.head()).position
    done = await batchd("events", "tail", "-n", "2")
    assert done.code == 0
    assert [int(line.split()[0]) for line in done.lines] == [head - 1, head]
    assert "ClusterCreated" in done.lines[-1] or "Cluster" in done.out
    events = [json.loads(line) for line in (await batchd("events", "tail", "--after", "0",
                                                          "--json")).lines]  # fmt: skip
    assert [e["position"] for e in events] == list(range(1, head + 1))
    world = (await batchd("replay", "--position", str(head), "--json")).json
    assert world["position"] == head and [c["name"] for c in world["clusters"]] == ["c"]
    text = await batchd("replay", "--position", str(head))
    assert text.code == 0 and "clusters (1)" in text.out and world["note"] is None
    early = await batchd("replay", "--at", "2001-01-01T00:00:00Z", "--json")
    assert early.code == 0 and early.json["position"] == 0 and early.json["clusters"] == []
    assert "2001-01-01T00:00:00.000000Z is before the first event" in early.err
    created = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--command", "true")  # fmt: skip
    assert created.code == 0, created.err
    history = (await batchd("job", "history", "j", "-w", "ws", "-e", "exp", "--json")).json
    # {"value": [incarnation, ...]}, the same document as offline (test_cli_history)
    assert [i["timeline"][0]["event"] for i in history["value"]] == ["JobSubmitted"]
    assert_error(await batchd("replay", "--position", str(head + 100)), "--position")


async def test_the_log_tools_through_the_api_say_what_they_say_offline(batchd, api):
    """events tail past the head, and a bad --at, name what is wrong as offline
    (test_cli, test_cli_history)."""
    await _setup(batchd)
    await settled(api)
    head = (await api.store.head()).position
    done = await batchd("events", "tail", "--after", "100000")
    assert done.code == 0 and done.out == ""
    assert done.err.strip() == (f"batchd: no events after position 100000 (the log's head is "
                                f"at {head})")  # fmt: skip
    done = await batchd("events", "tail", "--after", str(head), "--json")
    assert done.code == 0 and done.out == "" and f"head is at {head}" in done.err
    done = await batchd("events", "tail", "--after", str(head - 1))
    assert done.code == 0 and len(done.lines) == 1 and done.err == ""
    for at, problem in (("nonsense", "is not an ISO-8601 time"),
                        ("0001-01-01T00:00:00+01:00", "is out of range")):  # fmt: skip
        [line] = assert_error(await batchd("replay", "--at", at))
        assert line.startswith(f"batchd: error: --at: {at!r} {problem}"), line
    done = await batchd("replay", "--position", str(head + 100))
    assert assert_error(done) == [
        f"batchd: error: --position: {head + 100} is beyond the log's head ({head})"]  # fmt: skip


async def test_the_history_of_a_job_removed_with_its_experiment_ends_with_that(batchd, api):
    await _setup(batchd)
    created = await batchd("job", "create", "gone", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--command", "true")  # fmt: skip
    assert created.code == 0, created.err
    assert (await batchd("experiment", "delete", "exp", "-w", "ws")).code == 0
    history = (await batchd("job", "history", "gone", "-w", "ws", "-e", "exp", "--json")).json
    [incarnation] = history["value"]
    last = incarnation["timeline"][-1]
    assert (last["event"], last["state"], last["reason"]) == (
        "ExperimentDeleted",
        "deleted",
        "experiment exp deleted",
    )


async def test_events_tail_follow_prints_new_events_as_they_land(batchd, api):
    env = {**os.environ, "BATCHD_SERVER": api.url, "BATCHD_TOKEN": api.admin_token}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "events", "tail", "--after", "0",
        "--follow", "--json", env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        first = json.loads(await asyncio.wait_for(follower.stdout.readline(), 20))
        assert first["position"] == 1
        head = (await api.store.head()).position
        for _ in range(head - 1):
            await asyncio.wait_for(follower.stdout.readline(), 10)
        assert (await batchd("workspace", "create", "late")).code == 0
        landed = json.loads(await asyncio.wait_for(follower.stdout.readline(), 10))
        assert landed["position"] == head + 1 and landed["data"]["workspace"] == "late"
    finally:
        follower.terminate()
        await follower.wait()


# -- TLS --------------------------------------------------------------------------------------
async def test_https_with_the_daemons_self_signed_certificate(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    for name in ("BATCHD_TOKEN", "BATCHD_CACERT", "BATCHD_SERVER"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    daemon = await start_daemon(state, tls_self_signed=True)
    batchd = _runner(capsys)
    try:
        assert daemon.url.startswith("https://")
        done = await batchd("workspace", "create", "ws", "--server", daemon.url,
                            "--state-dir", str(state))  # fmt: skip
        assert done.code == 0, done.err  # the state directory's tls/cert.pem is trusted
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        elsewhere_flags = ["--state-dir", str(elsewhere), "--token", daemon.admin_token]
        done = await batchd("workspace", "list", "--server", daemon.url, *elsewhere_flags)
        assert_error(done, daemon.url, "--cacert")
        cacert = str(state / "tls" / "cert.pem")
        done = await batchd(
            "workspace", "list", "--server", daemon.url, *elsewhere_flags, "--cacert", cacert
        )
        assert done.code == 0 and done.lines[0].startswith("ws\t")
    finally:
        await daemon.stop()


async def test_jobs_left_queued_by_a_deleted_cluster_still_name_it(batchd, api):
    await _setup(batchd)
    created = await batchd("job", "create", "stranded", "-w", "ws", "-e", "exp", "--cluster",
                           "c", "--command", "true")  # fmt: skip
    assert created.code == 0, created.err
    assert (await batchd("cluster", "delete", "c", "-w", "ws")).code == 0
    listed = (await batchd("job", "list", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--json")).json  # fmt: skip
    assert [j["name"] for j in listed["value"]] == ["stranded"]
    shown = (await batchd("job", "show", "stranded", "-w", "ws", "-e", "exp", "--json")).json
    assert shown["properties"]["cluster"] == {"id": "/workspaces/ws/clusters/c"}


async def test_a_file_path_reaches_only_the_jobs_files(batchd, api):
    await _setup(batchd)
    done = await batchd("job", "create", "t", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "--command", "true")  # fmt: skip
    assert done.code == 0, done.err
    await _drive_end_of_first_attempt(api, "t")
    for given, problem in (("../../../../exp", "must not contain '..'"),
                           ("logs/../../../../../exp", "must not contain '..'"),
                           (".", "must name a file"),  # (./stdout.txt is stdout.txt)
                           ("/etc/passwd", "must be relative"),
                           ("a\\..\\b", "must not contain NUL or backslashes"),
                           ("a\x00b", "must not contain NUL or backslashes")):  # fmt: skip
        done = await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp",
                            "--file", given)  # fmt: skip
        assert assert_error(done, f"--file: {problem}") == done.err.strip().splitlines()
        assert done.out == ""
    # the rest of a path is the file's name, whatever it holds
    done = await batchd("job", "file", "stream", "t", "-w", "ws", "-e", "exp",
                        "--file", "a?b#c%2F..")  # fmt: skip
    assert_error(done, "no file 'a?b#c%2F..'")
    for argv in (("job", "show", "..", "-w", "ws", "-e", "exp"), ("experiment", "show", ".",
                 "-w", "ws"), ("workspace", "show", "..")):  # fmt: skip
        done = await batchd(*argv)
        assert_error(done, "name must not be '.' or '..'")
        assert done.out == ""


async def _drive_end_of_first_attempt(api, name: str) -> None:
    await _drive(api, _job_id(api, name), ("JobSucceeded", {"exitCode": 0}))


async def test_node_list_takes_a_bare_cluster_name_in_the_workspace(batchd, api):
    await _setup(batchd)
    for argv in (("--cluster", "c", "-w", "ws"), ("--cluster", "ws/c")):
        done = await batchd("node", "list", *argv, "--json")
        assert done.code == 0, done.err
        assert done.json == {"value": [], "nextLink": None}
    assert_error(await batchd("node", "list", "--cluster", "c"), "no cluster 'default/c'")


async def test_following_a_job_that_ends_without_running_says_it_never_ran(batchd, api):
    """As reading its output once it has ended does (not exit 0 with nothing printed)."""
    await _setup(batchd)  # (a cluster whose nodes never come: the job stays queued)
    created = await batchd("job", "create", "q", "-w", "ws", "-e", "exp", "--cluster", "c",
                           "--command", "echo hi")  # fmt: skip
    assert created.code == 0, created.err
    streaming = asyncio.create_task(batchd("job", "file", "stream", "q", "-w", "ws", "-e", "exp"))
    await asyncio.sleep(1)
    assert not streaming.done()
    async with admin_client(api) as admin:
        status, _ = await admin.call("POST", "/v1/workspaces/ws/experiments/exp/jobs/q/terminate")
    assert status < 300
    followed = await asyncio.wait_for(streaming, 30)
    assert_error(followed, "job 'q' never ran: it has no output")
    again = await batchd("job", "file", "stream", "q", "-w", "ws", "-e", "exp")
    assert_error(again, "job 'q' never ran: it has no output")


async def test_a_document_saved_with_a_byte_order_mark_is_read(batchd, api, tmp_path):
    """(as Windows editors save UTF-8, and as the API takes it)"""
    await _setup(batchd)
    path = tmp_path / "bom.json"
    document = {"properties": {"nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT",
                               "customToolkitSettings": {"commandLine": "true"}}}  # fmt: skip
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(document).encode())
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(path))  # fmt: skip
    assert done.code == 0, done.err
    twice = await batchd("job", "create", "j2", "-w", "ws", "-e", "exp", "--cluster", "c",
                         "-f", str(path), "--env", "A=1", "--env", "A=2")  # fmt: skip
    assert_error(twice, "--env A is given more than once")  # (one --env over the file's: fine)


async def test_a_document_that_is_not_utf8_is_named(batchd, api, tmp_path):
    await _setup(batchd)
    path = tmp_path / "latin1.json"
    path.write_bytes('{"properties": {"customToolkitSettings": {"commandLine": "caf\xe9"}}}'
                     .encode("latin-1"))  # fmt: skip
    for argv in (("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c", "-f"),
                 ("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                  "--config-file"), ("cluster", "create", "c2", "-w", "ws", "-f")):  # fmt: skip
        done = await batchd(*argv, str(path))
        lines = assert_error(done, str(path), "not UTF-8")
        assert lines == [f"batchd: error: {path} is not UTF-8 text: invalid continuation byte "
                         "at byte 61"]  # fmt: skip


async def test_a_daemon_on_every_address_is_reached_by_the_names_its_certificate_holds(
    tmp_path, capsys, monkeypatch
):
    """The self-signed certificate of a daemon listening on 0.0.0.0 names this machine's
    addresses; reached at one it does not name, the CLI says to use one it does (not to
    give a CA, which would not help)."""
    for name in ("BATCHD_TOKEN", "BATCHD_CACERT", "BATCHD_SERVER"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    daemon = await start_daemon(state, tls_self_signed=True, listen="0.0.0.0:0")
    try:
        monkeypatch.setenv("BATCHD_STATE_DIR", str(state))
        cert = state / "tls/cert.pem"
        names = tls.names(tls.certificates(cert)[0])
        assert {"127.0.0.1", "localhost", *tls._own_addresses()} <= set(names)
        port = daemon.url.rpartition(":")[2]
        batchd = _runner(capsys)
        listed = await batchd("workspace", "list", "--server", f"https://127.0.0.1:{port}",
                              "--cacert", str(cert))  # fmt: skip
        assert listed.code == 0, listed.err
        other = await batchd("workspace", "list", "--server", f"https://127.0.0.2:{port}",
                             "--cacert", str(cert))  # fmt: skip
        assert_error(other, "not for that address", "--server")
        assert "--cacert" not in other.err
    finally:
        await daemon.stop()


async def test_events_export_through_the_daemon_is_the_offline_export(batchd, api, tmp_path):
    """Without --store, `events export` asks the daemon (a PostgreSQL deployment's CLI has
    no log file at hand), and prints what the offline export prints."""
    await _setup(batchd)
    secret = "s3cr3t-never-shown"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"properties": {
        "nodeCount": 1, "secrets": [{"name": "K", "value": secret}],
        "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "customToolkitSettings": {"commandLine": "true"}}}))  # fmt: skip
    done = await batchd("job", "create", "j", "-w", "ws", "-e", "exp", "--cluster", "c",
                        "-f", str(job))  # fmt: skip
    assert done.code == 0, done.err
    await settled(api)
    for _ in range(100):  # the planner says why it waits: then the log stands still
        events = await api.store.read_all(0, 1000)
        if events[-1].type == "JobPendingReasonChanged":
            break
        await asyncio.sleep(0.05)
    middle = events[len(events) // 2].recorded_at
    job_stream = next(e.stream for e in events if e.type == "JobSubmitted")
    for extra in (
        (),
        ("--from", to_iso(middle)),
        ("--to", to_iso(middle)),
        ("--stream", job_stream),
        ("--stream", "cluster-ws/c", "--to", to_iso(middle)),
    ):
        online = await batchd("events", "export", *extra)
        offline = await batchd("events", "export", "--store", api.cfg.store_url, *extra)
        assert online.code == offline.code == 0, (extra, online.err)
        assert online.out == offline.out and online.out, extra
        assert secret not in online.out
    done = await batchd("events", "export", "--stream", "job-nope")
    assert_error(done, "no stream 'job-nope'")
    done = await batchd("events", "export", "--from", "soon")
    assert_error(done, "--from: 'soon'")


async def test_offline_and_through_the_daemon_the_read_side_says_the_same(batchd, api):
    await _setup(batchd)
    await settled(api)  # (the new cluster's resize state has landed)
    head = (await api.store.head()).position
    for argv, said in (
        (("job", "history", "nope", "-w", "ws", "-e", "exp"),
         "no job named 'nope' in ws/exp, now or before"),
        (("replay", "--position", str(head + 1000)),
         f"--position: {head + 1000} is beyond the log's head ({head})"),
    ):  # fmt: skip
        online = await batchd(*argv)
        offline = await batchd(*argv, "--store", api.cfg.store_url)
        assert assert_error(online, said) == assert_error(offline, said), argv


def test_the_local_admin_token_goes_only_to_a_server_on_this_machine(tmp_path, monkeypatch):
    """Without --token or $BATCHD_TOKEN, the CLI reads <state-dir>/admin.token: that is
    this machine's daemon's, and no other server (or one posing as it) is sent it."""
    for name in ("BATCHD_TOKEN", "BATCHD_SERVER", "BATCHD_CACERT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "admin.token").write_text("bd_local-admin\n")
    for server, sent in (("http://127.0.0.1:8080", True), ("https://localhost:8443", True),
                         ("http://[::1]:8080", True), ("http://10.1.2.3:8080", False),
                         ("https://batchd.example.test", False)):  # fmt: skip
        args = argparse.Namespace(server=server, state_dir=str(tmp_path), token=None)
        token = client.settings(args).token
        assert token == ("bd_local-admin" if sent else None), server
    args = argparse.Namespace(server="http://10.1.2.3:8080", state_dir=str(tmp_path),
                              token="bd_given")  # fmt: skip
    assert client.settings(args).token == "bd_given"  # one given goes where it is told
