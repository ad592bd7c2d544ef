"""Jobs really run: a daemon with its local cluster of two agent processes (4 simulated GPUs
each, process runtime), driven through the API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from batchd.events import errors, urls
from batchd.events.envelope import NewEvent
from batchd.events.timeutil import to_iso
from batchd.scheduler import config, planner, protocol, retries
from batchd.scheduler import nodes as node_service
from batchd.scheduler.agent import HEARTBEAT_INTERVAL
from batchd.scheduler.control import token_file
from tests.integration.conftest import (
    Client,
    admin_client,
    make_token,
    newest_job,
    start_daemon,
)
from tests.integration.test_cli import _free_port, assert_one_line_error, batchd
from tests.logs import info_logs
from tests.processes import alive

EXP = "/v1/workspaces/default/experiments/default"
ONE_NODE = {"vmSize": "Standard_NC6", "scaleSettings": {"manual": {"targetNodeCount": 1}}}


def _ready_nodes(daemon) -> int:
    return sum(1 for n in daemon.models.models.nodes.values() if n.state == "ready")


async def _until(check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _run(client: Client, name: str, command: str, **extra) -> dict:
    job = {"cluster": "local", "nodeCount": 1, "gpusPerNode": 1,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "customToolkitSettings": {"commandLine": command}, **extra}  # fmt: skip
    status, created = await client.call("PUT", f"{EXP}/jobs/{name}", job)
    assert status == 201, created
    return created


async def _ended(daemon, client: Client, name: str, seconds: float = 30) -> dict:
    def done() -> bool:
        job = newest_job(daemon.models.models, name)
        return job is not None and job.state in ("succeeded", "failed")

    await _until(done, seconds)
    return (await client.call("GET", f"{EXP}/jobs/{name}"))[1]


def _exists_with(daemon, name: str, attempt: int, text: str) -> bool:
    try:
        return _out(daemon, name, attempt=attempt) == text
    except FileNotFoundError:
        return False


async def _json_lines(answer: aiohttp.ClientResponse) -> list:
    return [json.loads(line) async for line in answer.content]


def _said(daemon, name: str) -> str:
    """What the job's first attempt has written to its stdout so far ("" before it starts)."""
    try:
        return _out(daemon, name)
    except FileNotFoundError:
        return ""


def _out(daemon, name: str, attempt: int = 1, file: str = "stdout.txt") -> str:
    path = daemon.state_dir / f"mounts/logs/default/default/{name}/{attempt}/stdouterr/{file}"
    return path.read_text()


async def test_a_job_runs_on_its_gpu_and_its_output_and_exit_code_come_back(local):
    daemon, client = local
    command = ('echo "hello from $AZ_BATCHAI_JOB_NAME on GPU $CUDA_VISIBLE_DEVICES"; '
               'echo oops >&2; echo scratch > in-the-work-dir')  # fmt: skip
    await _run(client, "hello", command)
    job = await _ended(daemon, client, "hello")
    assert job["properties"]["state"] == "succeeded"
    work, temp = daemon.state_dir / "nodes" / "work", daemon.state_dir / "nodes" / "temp"
    await _until(lambda: not list(work.iterdir()) and not list(temp.iterdir()), 10)  # removed
    assert job["properties"]["executionInfo"]["exitCode"] == 0
    assert job["properties"]["tasks"] == []  # its GPU was given back when it ended
    assert _out(daemon, "hello") in {f"hello from hello on GPU {g}\n" for g in range(4)}
    assert _out(daemon, "hello", file="stderr.txt") == "oops\n"
    _status, files = await client.call("GET", f"{EXP}/jobs/hello/files")
    assert sorted(f["name"] for f in files["value"]) == ["stderr.txt", "stdout.txt"]
    status, missing = await client.call("GET", f"{EXP}/jobs/hello/files/absent.txt")
    assert (status, missing["error"]["message"]) == (404, "no file 'absent.txt'")  # ended: no "yet"
    status, missing = await client.call("GET", f"{EXP}/jobs/hello/files?directory=nosuch")
    assert (status, missing["error"]["message"]) == (404, "no such directory")


async def test_each_job_sees_exactly_the_gpus_it_was_given(local):
    """Jobs running side by side see, in CUDA_VISIBLE_DEVICES, the GPUs the daemon gave
    each of them (not the first ones of the node), and no two jobs on a node share one."""
    daemon, client = local
    release = daemon.state_dir / "release"
    wait = f"for i in $(seq 600); do [ -e {release} ] && exit 0; sleep 0.05; done; exit 9"
    shapes = {"g1": 1, "g2": 1, "g3": 1, "g4": 2, "g5": 1}
    for name, gpus in shapes.items():
        await _run(client, name, f'echo "$CUDA_VISIBLE_DEVICES"; {wait}', gpusPerNode=gpus)
    given = {}
    for name in shapes:
        await _until(lambda n=name: _said(daemon, n).endswith("\n"), 30)
        _status, job = await client.call("GET", f"{EXP}/jobs/{name}")
        [task] = job["properties"]["tasks"]
        given[name] = (task["node"], task["gpus"])
    release.touch()
    for name, (_node, gpus) in given.items():
        assert len(gpus) == shapes[name]
        assert _out(daemon, name) == ",".join(str(g) for g in gpus) + "\n", (name, given)
        assert (await _ended(daemon, client, name))["properties"]["state"] == "succeeded"
    for node in {node for node, _ in given.values()}:
        held = [g for n, gpus in given.values() if n == node for g in gpus]
        assert len(held) == len(set(held)), given
    assert any(gpus != list(range(len(gpus))) for _node, gpus in given.values()), given


async def test_deleting_a_running_job_terminates_it_and_deletes_it_once_stopped(local):
    """As Batch AI's Delete: a live job is terminated first; its name is free once its task
    has stopped."""
    daemon, client = local
    await _run(client, "doomed", "echo started; sleep 600")
    await _until(lambda: _said(daemon, "doomed") == "started\n", 30)
    status, answer = await client.call("DELETE", f"{EXP}/jobs/doomed")
    assert status == 202 and answer["properties"]["state"] == "terminating", answer
    assert answer["properties"]["provisioningState"] == "deleting"
    assert (await client.call("DELETE", f"{EXP}/jobs/doomed"))[0] == 202  # asked again: fine
    deadline = time.monotonic() + 30
    while (await client.call("GET", f"{EXP}/jobs/doomed"))[0] != 404:
        assert time.monotonic() < deadline, "not deleted"
        await asyncio.sleep(0.1)
    _status, history = await client.call("GET", f"{EXP}/jobs/doomed/history")
    timeline = [(e["event"], e["actor"]) for e in history["value"][0]["timeline"]]
    assert ("JobDeleteRequested", "user:admin") in timeline
    assert timeline[-1] == ("JobDeleted", "user:admin")
    assert not any(n.allocations for n in daemon.models.models.nodes.values())
    await _run(client, "doomed", "echo again")  # the name is free
    assert (await _ended(daemon, client, "doomed"))["properties"]["state"] == "succeeded"


async def test_a_node_whose_scratch_space_is_unwritable_takes_no_work_until_it_is(
    local, monkeypatch
):
    """A full disk (here: a file where the tasks' work directories go): the attempt ends as a
    node fault, and the node stays suspect past its hold for as long as its agent's probe
    cannot write there; once it can, the node works again and the job's retry runs."""
    monkeypatch.setitem(node_service.HELD, protocol.NODE_UNWRITABLE, 5_000_000)  # 5 s
    daemon, client = local
    work = daemon.state_dir / "nodes" / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.write_text("in the way")
    await _run(client, "squeezed", "echo ran")
    nodes = daemon.models.models.nodes

    def unwritable() -> list[str]:
        return [n.node_id for n in nodes.values() if n.state == "suspect"
                and n.errors and n.errors[-1]["code"] == "node_unwritable"]  # fmt: skip

    await _until(lambda: len(unwritable()) == 2, 30)  # its retry found the other node so
    await asyncio.sleep(2 * HEARTBEAT_INTERVAL + 5)  # past the hold: still said, still held
    assert len(unwritable()) == 2 and newest_job(daemon.models.models, "squeezed").state == "queued"
    # an agent restarted meanwhile does not know of the full disk: its node is held again,
    # and the daemon has it probe there (CheckScratch): held past the hold while still full,
    # not given the job (which would spend its last retry)
    [provider] = daemon.providers
    restarted = nodes["local-0"].incarnation
    provider.processes["local-0"].kill()
    await _until(lambda: nodes["local-0"].incarnation != restarted
                 and "local-0" in unwritable(), 30)  # fmt: skip
    await asyncio.sleep(2 * HEARTBEAT_INTERVAL + 5)
    assert "local-0" in unwritable()
    assert newest_job(daemon.models.models, "squeezed").state == "queued"
    work.unlink()  # room again
    job = await _ended(daemon, client, "squeezed")
    assert job["properties"]["state"] == "succeeded", job["properties"]
    assert job["properties"]["retries"] == {"node_lost": 2}
    await _until(lambda: {n.state for n in nodes.values()} == {"ready"}, 20)  # both again


async def test_a_jobs_output_directories_exist_when_it_starts(local):
    daemon, client = local
    outputs = [{"id": "MODEL", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/out"}]
    await _run(client, "made", 'test -d "$AZ_BATCHAI_OUTPUT_MODEL" && echo there',
               outputDirectories=outputs)  # fmt: skip
    assert (await _ended(daemon, client, "made"))["properties"]["state"] == "succeeded"
    assert _out(daemon, "made") == "there\n"


async def test_a_failing_command_fails_the_job_with_its_exit_code(local):
    daemon, client = local
    await _run(client, "bad", "exit 3")
    job = await _ended(daemon, client, "bad")
    assert job["properties"]["state"] == "failed"
    assert job["properties"]["executionInfo"]["exitCode"] == 3
    assert "exited with 3" in job["properties"]["executionInfo"]["errors"][-1]["message"]
    await _run(client, "prep", "echo never", jobPreparation={"commandLine": "exit 7"})
    job = await _ended(daemon, client, "prep")
    assert job["properties"]["state"] == "failed"
    assert job["properties"]["executionInfo"]["errors"][-1]["code"] == "job_preparation_failed"


async def test_terminate_kills_the_whole_process_tree_even_a_child_ignoring_sigterm(local):
    daemon, client = local
    pid_file = daemon.state_dir / "child.pid"
    await _run(client, "stubborn", f"sh -c 'trap \"\" TERM; echo $$ > {pid_file}; sleep 600' & "
               "sleep 600")  # fmt: skip
    await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    child = int(pid_file.read_text())
    status, _ = await client.call("POST", f"{EXP}/jobs/stubborn/terminate")
    assert status == 202
    job = await _ended(daemon, client, "stubborn", seconds=30)
    assert job["properties"]["state"] == "failed"
    assert job["properties"]["executionInfo"]["errors"][-1]["code"] == "terminated"
    await _until(lambda: not alive(child), 10)  # the child that ignored SIGTERM is gone too


async def test_terminate_gives_the_program_the_tasks_shell_started_its_sigterm_grace(local):
    daemon, client = local
    ready, saved = daemon.state_dir / "ready", daemon.state_dir / "saved"
    program = (f"import signal, sys, time, pathlib\n"
               f"def stop(*_):\n    time.sleep(1)\n"
               f"    pathlib.Path({str(saved)!r}).write_text('checkpoint')\n    sys.exit(0)\n"
               f"signal.signal(signal.SIGTERM, stop)\n"
               f"pathlib.Path({str(ready)!r}).write_text('ready')\ntime.sleep(600)\n")  # fmt: skip
    script = daemon.state_dir / "train.py"
    script.write_text(program)
    # the shell stays (a second command follows) and dies of SIGTERM at once; its child
    # saves a checkpoint in the second after its SIGTERM
    await _run(client, "trainer", f"{sys.executable} {script}; echo after")
    await _until(ready.exists, 30)
    status, _ = await client.call("POST", f"{EXP}/jobs/trainer/terminate")
    assert status == 202
    job = await _ended(daemon, client, "trainer", seconds=30)
    assert job["properties"]["state"] == "failed"
    assert saved.read_text() == "checkpoint"  # before the task's end was reported


async def test_terminate_gives_each_tensorflow_process_its_sigterm_grace(local):
    """A TensorFlow node runs its parameter servers and workers each in a group of its own:
    terminating the job still gives every one of them SIGTERM and its grace (a checkpoint),
    not the SIGKILL that ends what is left of a task."""
    daemon, client = local
    out = daemon.state_dir / "tf"
    out.mkdir()
    program = ("import json, os, pathlib, signal, sys, time\n"
               "role = json.loads(os.environ['TF_CONFIG'])['task']['type']\n"
               f"out = pathlib.Path({str(out)!r})\n"
               "def stop(*_):\n    time.sleep(1)\n"
               "    (out / f'saved-{role}').write_text('checkpoint')\n    sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, stop)\n"
               "(out / f'ready-{role}').write_text('ready')\ntime.sleep(600)\n")  # fmt: skip
    script = daemon.state_dir / "tf_train.py"
    script.write_text(program)
    settings = {"pythonScriptFilePath": str(script), "pythonInterpreterPath": sys.executable,
                "workerCount": 1, "parameterServerCount": 1}  # fmt: skip
    job = {"cluster": "local", "nodeCount": 1, "gpusPerNode": 1,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "tensorFlowSettings": settings}  # fmt: skip
    assert (await client.call("PUT", f"{EXP}/jobs/tf", job))[0] == 201
    await _until(lambda: all((out / f"ready-{r}").exists() for r in ("ps", "worker")), 30)
    assert (await client.call("POST", f"{EXP}/jobs/tf/terminate"))[0] == 202
    ended = await _ended(daemon, client, "tf", seconds=30)
    assert ended["properties"]["state"] == "failed"
    assert [(out / f"saved-{r}").exists() for r in ("ps", "worker")] == [True, True]


async def test_parameter_servers_serve_until_the_master_worker_ends_the_job(local, tmp_path):
    """nodeCount 2, one worker, two parameter servers: node 1 runs only a server, which
    serves on (it used to be stopped at once, its node having no worker) until worker 0, on
    the master node, has ended; its end ends the job, and the servers are stopped."""
    daemon, client = local
    marks = tmp_path / "marks"
    marks.mkdir()
    server = f"'echo $$ > {marks}/ps-$AZ_BATCHAI_TASK_INDEX; exec sleep 600'"
    worker = (f"'until [ -s {marks}/ps-1 ]; do sleep 0.05; done; sleep 1; "
              f"kill -0 $(cat {marks}/ps-1) && touch {marks}/ps-1-served'")  # fmt: skip
    settings = {"pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
                "workerCount": 1, "parameterServerCount": 2, "masterCommandLineArgs": worker,
                "parameterServerCommandLineArgs": server}  # fmt: skip
    job = {"cluster": "local", "nodeCount": 2, "gpusPerNode": 4,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "tensorFlowSettings": settings}  # fmt: skip
    assert (await client.call("PUT", f"{EXP}/jobs/tfps", job))[0] == 201
    ended = await _ended(daemon, client, "tfps", seconds=30)
    assert ended["properties"]["state"] == "succeeded"
    assert (marks / "ps-1-served").exists()  # node 1's server was up while the worker ran
    servers = [int((marks / f"ps-{i}").read_text()) for i in (0, 1)]
    await _until(lambda: not any(alive(pid) for pid in servers), 15)  # stopped with the job
    models = daemon.models.models
    await _until(lambda: not any(n.allocations for n in models.nodes.values()), 15)


@pytest.mark.parametrize("failing", ["ps-0", "ps-1", "worker-1"])
async def test_a_failing_parameter_server_or_worker_fails_the_job_at_once(local, failing):
    """Whichever process fails, on the master node or another, and whatever else still
    runs: the job fails at once with its exit code (it used to go unseen until that node's
    workers ended, or for good on the master node)."""
    daemon, client = local
    script = ("'role=$(echo \"$TF_CONFIG\" | sed \"s/.*type.: .\\([a-z]*\\).*/\\1/\"); "
              "me=$role-$AZ_BATCHAI_TASK_INDEX; "
              f"[ $me = {failing} ] && {{ sleep 1; exit 5; }}; exec sleep 60'")  # fmt: skip
    settings = {"pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
                "workerCount": 2, "parameterServerCount": 2, "masterCommandLineArgs": script,
                "workerCommandLineArgs": script,
                "parameterServerCommandLineArgs": script}  # fmt: skip
    job = {"cluster": "local", "nodeCount": 2, "gpusPerNode": 4,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "tensorFlowSettings": settings}  # fmt: skip
    assert (await client.call("PUT", f"{EXP}/jobs/tfail", job))[0] == 201
    ended = await _ended(daemon, client, "tfail", seconds=30)  # (not the workers' 60 s)
    assert ended["properties"]["state"] == "failed"
    assert ended["properties"]["executionInfo"]["exitCode"] == 5


async def test_a_process_that_leaves_the_tasks_group_is_killed_when_the_task_ends(local):
    daemon, client = local
    pid_file = daemon.state_dir / "escaped.pid"
    # setsid puts sleep in a session (and group) of its own: KillTask's and the end's killpg
    # of the task's group cannot reach it; the agent inherits it as an orphan instead
    await _run(client, "escape", f"setsid sleep 600 & echo $! > {pid_file}; sleep 0.2")
    job = await _ended(daemon, client, "escape")
    assert job["properties"]["state"] == "succeeded"
    escaped = int(pid_file.read_text())
    await _until(lambda: not alive(escaped), 10)


async def test_what_a_task_leaves_in_its_group_is_killed_and_reaped(local):
    daemon, client = local
    pids = daemon.state_dir / "left.pids"
    await _run(client, "forks", f"sleep 300 & echo $! >> {pids}; sleep 300 & echo $! >> {pids}; "
               "sleep 0.3")  # fmt: skip
    job = await _ended(daemon, client, "forks")
    assert job["properties"]["state"] == "succeeded"
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2
    # no /proc entry: killed, and reaped by the agent that inherited them (not zombies)
    await _until(lambda: not any(os.path.exists(f"/proc/{p}") for p in left), 10)


async def test_a_two_node_job_gets_consistent_ranks_hosts_and_master(local):
    daemon, client = local
    status, _ = await client.call("PUT", f"{EXP}/jobs/ddp", {
        "cluster": "local", "nodeCount": 2, "gpusPerNode": 4,
        "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "pyTorchSettings": {  # runs on every node: `/bin/sh -c '...'`
            "pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
            "commandLineArgs": "'echo rank=$RANK world=$WORLD_SIZE "
                               "master=$MASTER_ADDR:$MASTER_PORT task=$AZ_BATCHAI_TASK_INDEX; "
                               # both tasks run on this machine: they share one job temp,
                               "cd $AZ_BATCHAI_JOB_TEMP; touch r$RANK; "
                               "until [ -e r$((1 - RANK)) ]; do sleep 0.05; done; "
                               # which outlives the first of them to end
                               "[ $RANK = 0 ] || { sleep 1; cat $AZ_BATCHAI_MPI_HOST_FILE; }'",
        },
    })  # fmt: skip
    assert status == 201
    job = await _ended(daemon, client, "ddp")
    assert job["properties"]["state"] == "succeeded"
    # the tasks share the stdouterr directory, each writes files of its own (task 1: "-1")
    assert _out(daemon, "ddp").splitlines() == ["rank=0 world=2 master=127.0.0.1:29500 task=0"]
    assert _out(daemon, "ddp", file="stdout-1.txt").splitlines() == [
        "rank=1 world=2 master=127.0.0.1:29500 task=1",
        "127.0.0.1 slots=1",
        "127.0.0.1 slots=1",
    ]
    temp = daemon.state_dir / "nodes" / "temp"
    await _until(lambda: not list(temp.iterdir()), 10)  # the last to end removed it


async def test_when_one_task_of_a_two_node_job_fails_the_other_is_killed_and_the_job_fails(local):
    daemon, client = local
    pids = daemon.state_dir / "pids"
    pids.mkdir()
    script = (f"'if [ $RANK = 1 ]; then while [ ! -s {pids}/rank0 ]; do sleep 0.05; done; "
              f"exit 5; fi; echo $$ > {pids}/rank0; exec sleep 600'")  # fmt: skip
    status, _ = await client.call("PUT", f"{EXP}/jobs/gang", {
        "cluster": "local", "nodeCount": 2, "gpusPerNode": 4,
        "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "pyTorchSettings": {  # runs on every node: `/bin/sh -c '...'`
            "pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
            "commandLineArgs": script},
    })  # fmt: skip
    assert status == 201
    job = await _ended(daemon, client, "gang")
    assert job["properties"]["state"] == "failed"
    assert job["properties"]["executionInfo"]["exitCode"] == 5  # the failing task's code
    survivor = int((pids / "rank0").read_text())
    await _until(lambda: not alive(survivor), 15)  # killed, not left running


async def test_what_an_agent_reports_is_written_as_its_nodes_doing(local):
    daemon, client = local
    await _run(client, "who", "true")
    assert (await _ended(daemon, client, "who"))["properties"]["state"] == "succeeded"
    job = newest_job(daemon.models.models, "who")
    events = await daemon.store.read_stream(f"job-{job.job_id}")
    [node_id] = [t["node"] for e in events if e.type == "JobScheduled" for t in e.data["tasks"]]
    actors = {e.type: e.actor for e in events}
    assert actors["JobSubmitted"] == "user:admin" and actors["JobScheduled"] == "scheduler"
    assert (
        actors["JobStarted"]
        == actors["JobTaskExited"]
        == actors["JobSucceeded"]
        == (f"agent:{node_id}")
    )
    node_events = await daemon.store.read_stream(f"node-{node_id}")
    assert {e.actor for e in node_events if e.type in ("NodeRegistered", "NodeSetupSucceeded")} \
        == {f"agent:{node_id}"}  # fmt: skip
    history = (await client.call("GET", f"{EXP}/jobs/who/history"))[1]["value"][0]["timeline"]
    assert [e["nodes"] for e in history if e["event"] == "JobStarted"] == [[node_id]]


async def _stop_agent_of(local, name: str, stop: Callable[[Process], None]):
    """Job `name` runs; then `stop` is done to the agent of its node. Returns (a function
    that gives the job as it is now, the node's id)."""
    daemon, client = local
    await _run(client, name, "echo attempt $AZ_BATCHAI_JOB_ATTEMPT; sleep 600")
    models = daemon.models.models

    def job():
        return newest_job(models, name)

    await _until(lambda: job().state == "running", 30)
    node_id = job().tasks[0][0]
    stop(daemon.providers[0].processes[node_id])
    return job, node_id


async def test_a_killed_agent_loses_its_attempt_which_runs_again_elsewhere_or_after(local):
    daemon, client = local
    # SIGKILL: the agent cannot stop its task
    job, node_id = await _stop_agent_of(local, "long", Process.kill)
    await _until(lambda: job().attempt == 2 and job().state == "running", 60)
    assert job().retries == {"node_lost": 1}
    shown = (await client.call("GET", f"{EXP}/jobs/long"))[1]["properties"]["executionInfo"]
    [lost] = shown["errors"]
    assert lost["code"] == "agent_exited"  # why it was lost (the ledger says node_lost)
    assert lost["message"] == f"node {node_id} was lost: its agent exited with -9"
    assert datetime.fromisoformat(lost["at"]).tzinfo is not None  # a time, not microseconds
    # lost as soon as its agent exited (the daemon started it), not after 10 s of silence
    errors = (await client.call("GET", f"/v1/nodes/{node_id}"))[1]["properties"]["errors"]
    assert [e["code"] for e in errors] == ["agent_exited"]
    await _until(lambda: _exists_with(daemon, "long", 2, "attempt 2\n"), 10)
    nodes = daemon.state_dir / "nodes"
    first = [nodes / "work" / f"{job().job_id}.1.0", nodes / "temp" / f"{job().job_id}.1"]
    # the node's next agent removed the directories of the attempt its predecessor lost
    await _until(lambda: not any(path.exists() for path in first), 30)
    await client.call("POST", f"{EXP}/jobs/long/terminate")
    ended = await _ended(daemon, client, "long")
    assert ended["properties"]["state"] == "failed"
    await _until(lambda: not any(s.read_text().strip() for s in nodes.glob("*/running/*.pid")), 10)


async def test_a_stopped_agent_says_so_and_its_attempt_runs_again_without_waiting(local):
    daemon, client = local
    # SIGTERM: the agent stops its task, and says so
    job, node_id = await _stop_agent_of(local, "told", Process.terminate)
    await _until(lambda: job().attempt == 2, 60)
    assert job().retries == {"node_lost": 1}
    errors = (await client.call("GET", f"/v1/nodes/{node_id}"))[1]["properties"]["errors"]
    # lost when its agent said it stops, not after the daemon waited out its silence
    assert [e["code"] for e in errors] == ["agent_stopped"]
    await client.call("POST", f"{EXP}/jobs/told/terminate")
    await _ended(daemon, client, "told")


async def test_node_list_and_show_tell_state_gpus_and_heartbeat_age(local):
    daemon, client = local
    await _run(client, "busy", "sleep 600")
    models = daemon.models.models
    await _until(lambda: any(n.allocations for n in models.nodes.values()), 30)
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}
    done = await asyncio.to_thread(batchd, "node", "list", "--cluster", "default/local", env=env)
    assert done.returncode == 0, done.stderr
    rows = sorted(line.split("\t") for line in done.stdout.splitlines())
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in rows] == [
        ("local-0", "default/local", "ready", "simulated", "process"),
        ("local-1", "default/local", "ready", "simulated", "process"),
    ]  # fmt: skip
    assert sorted(r[3] for r in rows) == ["0/4", "1/4"]
    assert all(r[6].endswith("s") and int(r[6][:-1]) < 10 for r in rows)  # heard from lately
    done = await asyncio.to_thread(batchd, "node", "show", "local-0", "--json", env=env)
    node = json.loads(done.stdout)
    assert node["properties"]["gpus"] == 4 and node["properties"]["runtimes"] == ["process"]
    await client.call("POST", f"{EXP}/jobs/busy/terminate")


async def test_an_agent_finds_real_gpus_through_nvidia_smi_when_nvml_is_not_there(local):
    """With NVML unavailable (a stand-in `pynvml` that cannot load, as where no driver is),
    `--gpus auto` asks `nvidia-smi` (a stand-in printing what an H100 machine's does); the node
    shows the GPUs' model and memory."""
    daemon, client = local
    bin_dir = daemon.state_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "pynvml.py").write_text("raise ImportError('no NVIDIA driver here')\n")
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\n[ "$1" = --query-gpu=name,memory.total ] || exit 9\n'
        'printf "NVIDIA H100 80GB HBM3, 81559\\nNVIDIA H100 80GB HBM3, 81559\\n"\n'
    )
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(bin_dir)}
    agent = await _agent_on(daemon, client, "real", ONE_NODE, gpus="auto", env=env)
    try:
        done = await asyncio.to_thread(batchd, "node", "show", "real-0", "--json",
                                       env={"BATCHD_SERVER": daemon.url,
                                            "BATCHD_TOKEN": daemon.admin_token})  # fmt: skip
        node = json.loads(done.stdout)["properties"]
        assert (node["gpus"], node["gpuModel"], node["gpuMemoryMb"]) == (
            2, "NVIDIA H100 80GB HBM3", 81559)  # fmt: skip
        done = await asyncio.to_thread(batchd, "node", "list", "--cluster", "default/real",
                                       env={"BATCHD_SERVER": daemon.url,
                                            "BATCHD_TOKEN": daemon.admin_token})  # fmt: skip
        assert done.stdout.split("\t")[3:5] == ["0/2", "NVIDIA H100 80GB HBM3 (81559 MiB)"]
    finally:
        agent.terminate()
        await agent.wait()


async def test_a_node_is_reached_at_the_address_it_gives_else_where_it_connects_from(local):
    daemon, client = local
    _status, local_node = await client.call("GET", "/v1/nodes/local-0")
    assert local_node["properties"]["address"] == "127.0.0.1"  # where it connected from
    agent = await _agent_on(daemon, client, "far", ONE_NODE, "1", None,
                            "--address", "gpu-7.cluster.internal")  # fmt: skip
    try:
        _status, node = await client.call("GET", "/v1/nodes/far-0")
        assert node["properties"]["address"] == "gpu-7.cluster.internal"
        await _run(client, "where", "cat $AZ_BATCHAI_MPI_HOST_FILE", cluster="far")
        assert (await _ended(daemon, client, "where"))["properties"]["state"] == "succeeded"
        assert _out(daemon, "where").startswith("gpu-7.cluster.internal slots=")
    finally:
        agent.terminate()
        await agent.wait()
    done = await asyncio.to_thread(
        batchd, "agent", "--server", daemon.url, "--token-file", "/dev/null",
        "--address", "not an address", env={})  # fmt: skip
    assert done.returncode != 0 and "--address 'not an address'" in done.stderr
    done = await asyncio.to_thread(
        batchd, "agent", "--server", daemon.url, "--token-file", "/dev/null",
        "--tls-server-name", "batchd.example.com", env={})  # fmt: skip
    assert done.returncode != 0 and "--tls-server-name: the --server" in done.stderr
    token = await _node_token(client, daemon, "filed-0")
    done = await asyncio.to_thread(
        batchd, "agent", "--server", daemon.url, "--token-file", str(token),
        "--node-id", "filed-0", "--work-dir", str(token))  # fmt: skip
    assert_one_line_error(done, f"--work-dir {token}: is not a directory")


async def test_resizing_down_drains_a_busy_node_which_takes_no_new_work_then_leaves(local):
    daemon, client = local
    models = daemon.models.models
    cluster = "/v1/workspaces/default/clusters/local"

    async def resize(nodes: int) -> None:
        manual = {"targetNodeCount": nodes, "nodeDeallocationOption": "waitforjobcompletion"}
        status, answer = await client.call("PATCH", cluster, {"scaleSettings": {"manual": manual}})
        assert status == 200, answer

    def state(node_id: str) -> str | None:
        node = models.nodes.get(node_id)
        return node.state if node is not None else None

    def job(name: str):
        return newest_job(models, name)

    await resize(3)
    await _until(lambda: state("local-2") == "ready", 30)
    for name, gpus in (("w0", 4), ("w1", 4), ("w2", 2)):  # best fit: local-2 keeps 2 free
        await _run(client, name, "sleep 600", gpusPerNode=gpus)
    await _until(lambda: all(job(n).state == "running" for n in ("w0", "w1", "w2")), 30)
    assert job("w2").tasks[0][0] == "local-2"
    await resize(2)
    await _until(lambda: state("local-2") == "leaving", 30)  # its job runs on
    await _run(client, "small", "sleep 600")  # would fit only on local-2's two free GPUs
    await _until(lambda: job("small").pending_reason is not None, 10)
    assert job("small").state == "queued" and job("w2").state == "running"
    await resize(3)  # wanted again before it emptied: it takes work again
    await _until(lambda: job("small").state == "running", 30)
    assert job("small").tasks[0][0] == "local-2"
    await resize(2)
    await _until(lambda: state("local-2") == "leaving", 30)
    for name in ("w2", "small"):
        await client.call("POST", f"{EXP}/jobs/{name}/terminate")
    await _until(lambda: "local-2" not in models.nodes, 30)  # emptied: stopped and removed
    local = models.clusters[models.cluster_ids["default/local"]]
    assert sorted(local.nodes) == ["local-0", "local-1"]
    token = daemon.state_dir / "nodes" / "local-2" / "agent.token"
    await _until(lambda: not token.exists(), 10)  # its credential went with it
    assert not any(t.node == "local-2" for t in models.tokens.values())
    for name in ("w0", "w1"):
        await client.call("POST", f"{EXP}/jobs/{name}/terminate")


async def _both_busy(local) -> tuple[str, str]:
    """Each of the two local nodes runs a job (a whole node each): (the job on local-1, which
    goes at a resize to one node since both are busy, the job on local-0, which stays)."""
    daemon, client = local
    models = daemon.models.models
    for name in ("x0", "x1"):
        await _run(client, name, "echo attempt $AZ_BATCHAI_JOB_ATTEMPT; sleep 600", gpusPerNode=4)
    await _until(lambda: all(newest_job(models, n).state == "running" for n in ("x0", "x1")), 30)
    going, staying = sorted(
        ("x0", "x1"), key=lambda n: newest_job(models, n).tasks[0][0] == "local-0"
    )
    assert newest_job(models, going).tasks[0][0] == "local-1"
    return going, staying


async def _busy_on_local_1(local) -> str:
    """Of the two local nodes, local-1 runs a job (returned) and local-0 nothing."""
    daemon, client = local
    going, staying = await _both_busy(local)
    await client.call("POST", f"{EXP}/jobs/{staying}/terminate")
    await _ended(daemon, client, staying)
    return going


async def test_resizing_down_lets_an_idle_node_go_before_a_busy_one(local):
    """As in Azure Batch, idle nodes go first: with local-0 idle and local-1 running a job, a
    resize to one node (the default nodeDeallocationOption, requeue) removes local-0, and the
    job runs on as attempt 1."""
    daemon, client = local
    models = daemon.models.models
    agents = dict(daemon.providers[0].processes)
    name = await _busy_on_local_1(local)
    manual = {"targetNodeCount": 1}
    cluster = "/v1/workspaces/default/clusters/local"
    assert (await client.call("PATCH", cluster, {"scaleSettings": {"manual": manual}}))[0] == 200
    await _until(lambda: "local-0" not in models.nodes and agents["local-0"].returncode is not None,
                 30)  # fmt: skip
    local_cluster = models.clusters[models.cluster_ids["default/local"]]
    await _until(lambda: local_cluster.allocation_state == "steady", 10)
    await asyncio.sleep(1)  # a few planner cycles: nothing else changes
    job = newest_job(models, name)
    assert (job.state, job.attempt, job.tasks[0][0]) == ("running", 1, "local-1")
    assert not job.retries and models.nodes["local-1"].state == "ready"
    assert local_cluster.nodes == ["local-1"] and set(daemon.providers[0].processes) == {"local-1"}
    told = [e.type for e in await daemon.store.read_stream("node-local-0")]
    assert told[-1] == "NodeRemoved" and "NodeLost" not in told  # it went; it was not lost
    log = (daemon.state_dir / "nodes/local-0/agent.log").read_text()
    assert "leaving_not_told" not in log and "superseded" not in log  # its leaving was heard
    await client.call("POST", f"{EXP}/jobs/{name}/terminate")


async def test_a_local_cluster_is_not_sized_past_its_most_nodes(local):
    """Each local node is an agent process on this machine: a size past `[local] max_nodes`
    (64 by default), by resize, scale settings or a new cluster of size Local, is refused
    naming the field, and starts nothing."""
    daemon, client = local
    models = daemon.models.models
    cluster = "/v1/workspaces/default/clusters/local"
    for settings, field in (({"manual": {"targetNodeCount": 1000}}, "manual.targetNodeCount"),
                            ({"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 65}},
                             "autoScale.maximumNodeCount")):  # fmt: skip
        status, answer = await client.call("PATCH", cluster, {"scaleSettings": settings})
        assert status == 400, answer
        [problem] = answer["error"]["details"]
        assert problem["name"] == f"scaleSettings.{field}", problem
        assert "at most 64" in problem["value"] and "Local" in problem["value"], problem
    other = {"vmSize": "Local", "scaleSettings": {"manual": {"targetNodeCount": 100}}}
    status, answer = await client.call("PUT", "/v1/workspaces/default/clusters/more", other)
    assert status == 400 and "at most 64" in answer["error"]["message"], answer
    local_cluster = models.clusters[models.cluster_ids["default/local"]]
    assert local_cluster.scale_settings == {"manual": {"targetNodeCount": 2}}
    assert "default/more" not in models.cluster_ids and len(daemon.providers[0].processes) == 2


async def _history_reasons(client: Client, name: str) -> list[tuple[str, str | None]]:
    status, history = await client.call("GET", f"{EXP}/jobs/{name}/history")
    assert status == 200, history
    return [(e["event"], e["reason"]) for e in history["value"][-1]["timeline"]]


async def test_resizing_down_requeues_the_jobs_of_the_node_that_goes_by_default(local):
    """Batch AI's default nodeDeallocationOption, requeue: with both nodes busy, local-1 goes;
    the attempt on it is killed and runs again on the node that stays (once that has room),
    spending none of the job's retries; the node leaves at once."""
    daemon, client = local
    models = daemon.models.models
    name, other = await _both_busy(local)
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}
    done = await asyncio.to_thread(batchd, "cluster", "resize", "local", "--nodes", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "resized cluster default/local to 1 nodes; jobs on the nodes that go are requeued "
        "(requeue), where batchd started the nodes; nodes that joined by hand stay until their "
        "agents are stopped (docs/scheduling.md)")  # fmt: skip
    await _until(lambda: "local-1" not in models.nodes, 30)  # without waiting for the job
    job = newest_job(models, name)
    assert job.state == "queued" and job.retries == {"interrupted": 1}  # local-0 is full
    await client.call("POST", f"{EXP}/jobs/{other}/terminate")
    await _until(lambda: newest_job(models, name).attempt == 2
                 and newest_job(models, name).state == "running", 30)  # fmt: skip
    job = newest_job(models, name)
    assert job.tasks[0][0] == "local-0" and job.retries == {"interrupted": 1}
    await _until(lambda: _exists_with(daemon, name, 2, "attempt 2\n"), 10)
    shown = (await client.call("GET", f"{EXP}/jobs/{name}"))[1]["properties"]
    assert shown["executionInfo"]["errors"][-1]["code"] == "node_deallocated"
    requeued = [r for e, r in await _history_reasons(client, name) if e == "JobRequeued"]
    assert len(requeued) == 1 and "local-1" in requeued[0] and "requeue" in requeued[0]
    await client.call("POST", f"{EXP}/jobs/{name}/terminate")


async def _shrink_to_one_node(local, option: str) -> tuple[str, str]:
    """_both_busy, then a resize to one node with nodeDeallocationOption `option`: (the job
    on the node that goes, local-1; the job on the node that stays)."""
    _daemon, client = local
    going, staying = await _both_busy(local)
    manual = {"targetNodeCount": 1, "nodeDeallocationOption": option}
    cluster = "/v1/workspaces/default/clusters/local"
    assert (await client.call("PATCH", cluster, {"scaleSettings": {"manual": manual}}))[0] == 200
    return going, staying


async def test_resizing_down_with_terminate_ends_the_jobs_of_the_node_that_goes(local):
    daemon, client = local
    models = daemon.models.models
    name, other = await _shrink_to_one_node(local, "terminate")
    job = await _ended(daemon, client, name)
    assert job["properties"]["state"] == "failed" and job["properties"]["attempt"] == 1
    error = job["properties"]["executionInfo"]["errors"][-1]
    assert error["code"] == "terminated"
    assert "local-1" in error["message"] and "terminate" in error["message"]
    await _until(lambda: "local-1" not in models.nodes, 30)
    assert newest_job(models, name).state == "failed"  # it does not run again
    reasons = dict(await _history_reasons(client, name))
    assert "nodeDeallocationOption terminate" in reasons["JobTerminateRequested"]
    assert newest_job(models, other).state == "running"  # on the node that stays
    await client.call("POST", f"{EXP}/jobs/{other}/terminate")


async def test_resizing_down_with_waitforjobcompletion_lets_the_job_finish_first(local):
    daemon, client = local
    models = daemon.models.models
    name, other = await _shrink_to_one_node(local, "waitforjobcompletion")
    await _until(lambda: models.nodes["local-1"].state == "leaving", 30)
    await asyncio.sleep(1)  # a few planner cycles: the job runs on
    job = newest_job(models, name)
    assert (job.state, job.attempt) == ("running", 1)
    await client.call("POST", f"{EXP}/jobs/{name}/terminate")
    await _until(lambda: "local-1" not in models.nodes, 30)
    assert newest_job(models, other).state == "running" and models.nodes["local-0"].state == "ready"
    await client.call("POST", f"{EXP}/jobs/{other}/terminate")


async def test_a_draining_node_a_stopped_daemon_left_is_lost_then_removed(tmp_path, monkeypatch):
    """The daemon stops while an extra node drains; its agent stops with it, and the node is
    lost then (its attempt requeued as interrupted, not as a node failure). The next daemon
    runs no agent for that node: it is removed from the cluster."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state = tmp_path / "state"
    cluster = "/v1/workspaces/default/clusters/local"
    daemon = await start_daemon(state, local_nodes=2)
    models = daemon.models.models

    def job(name: str):
        return newest_job(models, name)

    try:
        async with admin_client(daemon) as client:
            await _until(lambda: _ready_nodes(daemon) == 2, 30)
            body = {"scaleSettings": {"manual": {"targetNodeCount": 3}}}
            assert (await client.call("PATCH", cluster, body))[0] == 200
            await _until(lambda: _ready_nodes(daemon) == 3, 30)
            for name, gpus in (("w0", 4), ("w1", 4), ("w2", 2)):  # w2 goes to local-2
                await _run(client, name, "sleep 600", gpusPerNode=gpus)
            await _until(lambda: job("w2").state == "running", 30)
            assert job("w2").tasks[0][0] == "local-2"
            manual = {"targetNodeCount": 2, "nodeDeallocationOption": "waitforjobcompletion"}
            body = {"scaleSettings": {"manual": manual}}
            assert (await client.call("PATCH", cluster, body))[0] == 200
            await _until(lambda: models.nodes["local-2"].state == "leaving", 30)
    finally:
        await daemon.stop()
    assert models.nodes["local-2"].state == "lost"
    daemon = await start_daemon(state, local_nodes=2)
    models = daemon.models.models
    try:
        await _until(lambda: "local-2" not in models.nodes, 40)
        assert sorted(models.clusters[models.cluster_ids["default/local"]].nodes) == [
            "local-0", "local-1"]  # fmt: skip
        assert job("w2").retries == {"interrupted": 1}  # not a node failure
    finally:
        async with admin_client(daemon) as client:
            for name in ("w0", "w1", "w2"):
                await client.call("POST", f"{EXP}/jobs/{name}/terminate")
        await daemon.stop()


async def test_the_setup_task_runs_before_a_node_takes_work_and_its_failure_is_shown(local):
    daemon, client = local
    models = daemon.models.models
    agents = []
    try:
        for name, command in (("good", "echo prepared $GREETING; exit 0"),
                              ("bad", "echo cannot mount $KEY >&2; exit 4")):  # fmt: skip
            setup = {
                "commandLine": command,
                "stdOutErrPathPrefix": "${AZ_BATCHAI_MOUNT_ROOT}/setup",
                "environmentVariables": [{"name": "GREETING", "value": "hi"}],
                "secrets": [{"name": "KEY", "value": "k3y-secret"}],
            }
            cluster = {
                "vmSize": "Standard_NC6",
                "nodeSetup": {"setupTask": setup},
                "scaleSettings": {"manual": {"targetNodeCount": 1}},
            }
            status, _ = await client.call("PUT", f"/v1/workspaces/default/clusters/{name}", cluster)
            assert status == 201
            agents.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
                "--token-file", str(await _node_token(client, daemon, f"{name}-0")),
                "--node-id", f"{name}-0",
                "--cluster", f"default/{name}", "--gpus", "1",
                "--work-dir", str(daemon.state_dir / f"nodes/{name}-0"),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            ))  # fmt: skip
        await _until(lambda: models.nodes.get("good-0") is not None
                     and models.nodes["good-0"].state == "ready", 30)  # fmt: skip
        await _until(lambda: models.nodes.get("bad-0") is not None
                     and models.nodes["bad-0"].state == "unusable", 30)  # fmt: skip
        _status, good = await client.call("GET", "/v1/nodes/good-0")
        assert good["properties"]["setup"]["state"] == "succeeded"
        assert good["properties"]["setup"]["tail"] == "prepared hi\n"
        _status, bad = await client.call("GET", "/v1/nodes/bad-0")
        assert bad["properties"]["setup"]["exitCode"] == 4
        assert bad["properties"]["setup"]["tail"] == "cannot mount ***\n"  # no secret kept
        assert bad["properties"]["errors"][-1]["code"] == "setup_failed"
        out = daemon.cfg.mounts / "setup/default/clusters/bad/bad-0/stdouterr/stderr.txt"
        assert out.read_text() == "cannot mount k3y-secret\n"  # under the mount root
        _status, shown = await client.call("GET", "/v1/workspaces/default/clusters/bad")
        assert shown["properties"]["errors"][-1]["code"] == "setup_failed"
        # the unusable node takes no work; the job says why
        job = {"cluster": "bad", "nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT",
               "customToolkitSettings": {"commandLine": "true"}}  # fmt: skip
        await client.call("PUT", f"{EXP}/jobs/stuck", job)
        await _until(lambda: newest_job(models, "stuck").pending_reason is not None, 10)
        stuck = newest_job(models, "stuck")
        assert stuck.state == "queued"  # the only node is unusable, and the job says so
        assert stuck.pending_reason == {"code": "nodes_not_ready"}
    finally:
        for agent in agents:
            agent.terminate()
            await agent.wait()


async def test_a_node_with_fewer_gpus_than_its_vm_size_is_unusable_until_an_agent_has_them(local):
    """Jobs take every GPU of the VM size by default: a node short of them would leave such
    jobs waiting for ever, so it is unusable, and says why, until a new agent has them."""
    daemon, client = local
    models = daemon.models.models
    four = {"vmSize": "Standard_NC24s_v3", "scaleSettings": {"manual": {"targetNodeCount": 1}}}
    status, _ = await client.call("PUT", "/v1/workspaces/default/clusters/short", four)
    assert status == 201
    token = await _node_token(client, daemon, "short-0")

    def agent(gpus: str):
        return asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
            "--token-file", str(token), "--node-id", "short-0", "--cluster", "default/short",
            "--gpus", gpus, "--work-dir", str(daemon.state_dir / "nodes/short-0"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    def state() -> str | None:
        node = models.nodes.get("short-0")
        return node.state if node is not None else None

    first = await agent("2")
    try:
        await _until(lambda: state() == "unusable", 30)
        _status, node = await client.call("GET", "/v1/nodes/short-0")
        error = node["properties"]["errors"][-1]
        assert error["code"] == "gpus_missing"
        assert "2 GPU(s)" in error["message"] and "Standard_NC24s_v3 has 4" in error["message"]
        _status, shown = await client.call("GET", "/v1/workspaces/default/clusters/short")
        assert shown["properties"]["errors"][-1]["code"] == "gpus_missing"
        job = {"cluster": "short", "nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT",
               "customToolkitSettings": {"commandLine": "true"}}  # fmt: skip
        await client.call("PUT", f"{EXP}/jobs/whole", job)  # all 4 GPUs, by default
        await _until(lambda: newest_job(models, "whole").pending_reason is not None, 10)
        assert newest_job(models, "whole").pending_reason == {"code": "nodes_not_ready"}
    finally:
        first.terminate()
        await first.wait()
    second = await agent("4")  # the node again, now with its GPUs: a new incarnation
    try:
        job = await _ended(daemon, client, "whole")
        assert job["properties"]["state"] == "succeeded"
        assert state() == "ready"
    finally:
        second.terminate()
        await second.wait()


async def test_a_job_that_cannot_write_its_output_or_start_fails_clearly_and_the_agent_stays(local):
    daemon, client = local
    nodes = daemon.models.models.nodes
    incarnations = {n.node_id: n.incarnation for n in nodes.values()}
    await _run(client, "nowhere", "echo hi", stdOutErrPathPrefix="/proc/batchd-no-such-place")
    job = await _ended(daemon, client, "nowhere")
    error = job["properties"]["executionInfo"]["errors"][-1]
    assert job["properties"]["state"] == "failed"
    assert error["code"] == "output_unwritable" and "/proc/batchd-no-such-place" in error["message"]
    await _run(client, "missing", "no-such-command-here")
    job = await _ended(daemon, client, "missing")
    assert job["properties"]["state"] == "failed"
    assert job["properties"]["executionInfo"]["exitCode"] == 127  # the shell's "not found"
    error = job["properties"]["executionInfo"]["errors"][-1]
    assert error["code"] == "cannot_start" and "command not found" in error["message"]
    assert "no-such-command-here" in error["message"]  # the shell's own words
    assert "not found" in _out(daemon, "missing", file="stderr.txt")
    # the shell's words quote a secret's value: the error, kept in the log, does not
    await _run(client, "secretive", "$API_TOKEN --help",
               secrets=[{"name": "API_TOKEN", "value": "tok-4b1d-secret"}])  # fmt: skip
    job = await _ended(daemon, client, "secretive")
    error = job["properties"]["executionInfo"]["errors"][-1]
    assert error["code"] == "cannot_start" and "***: command not found" in error["message"]
    assert "tok-4b1d-secret" in _out(daemon, "secretive", file="stderr.txt")  # the job's own
    exported = batchd("events", "export", "--store", daemon.cfg.store_url)
    assert exported.returncode == 0 and "tok-4b1d" not in exported.stdout
    await _run(client, "after", "echo still here")  # the agents took it all in their stride
    assert (await _ended(daemon, client, "after"))["properties"]["state"] == "succeeded"
    assert {n.node_id: n.incarnation for n in nodes.values()} == incarnations  # not restarted
    assert {n.state for n in nodes.values()} == {"ready"}


async def test_job_exec_runs_beside_the_job_in_its_environment_and_streams_output(local):
    daemon, client = local
    await _run(client, "busy", "sleep 600")
    models = daemon.models.models
    await _until(lambda: newest_job(models, "busy").state == "running", 30)
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}
    done = await asyncio.to_thread(
        batchd, "job", "exec", "busy", "-w", "default", "--node", "0", "--",
        'echo "in $AZ_BATCHAI_JOB_NAME on GPU $CUDA_VISIBLE_DEVICES"; echo warn >&2; exit 5',
        env=env,
    )  # fmt: skip
    [(_node, gpus)] = newest_job(models, "busy").tasks
    assert done.returncode == 5
    assert done.stdout == f"in busy on GPU {','.join(map(str, gpus))}\n"
    assert done.stderr == "warn\n"
    done = await asyncio.to_thread(batchd, "job", "exec", "busy", "--json", "--",
                                   "echo out; echo err >&2; exit 3", env=env)  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 3 and lines[-1]["exitCode"] == 3, (done.stdout, done.stderr)
    assert {"stdout": "out\n"} in lines and {"stderr": "err\n"} in lines
    done = await asyncio.to_thread(batchd, "job", "exec", "busy", "--node", "3", "--", "true",
                                   env=env)  # fmt: skip
    assert done.returncode == 1 and "0 to 0" in done.stderr  # one task only
    pid_file = daemon.state_dir / "beside.pid"
    beside = asyncio.create_task(
        asyncio.to_thread(
            batchd, "job", "exec", "busy", "--", f"echo $$ > {pid_file}; exec sleep 600", env=env
        )
    )
    await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    await client.call("POST", f"{EXP}/jobs/busy/terminate")
    await _ended(daemon, client, "busy")
    done = await asyncio.to_thread(batchd, "job", "exec", "busy", "--", "true", env=env)
    assert done.returncode == 1 and "only a running job" in done.stderr
    await _until(lambda: not alive(int(pid_file.read_text())), 10)  # it ended with the task
    cut = await asyncio.wait_for(beside, 30)  # killed with its task: no exit code of its own
    assert cut.returncode == 1 and "the job's task ended" in cut.stderr, cut.stderr
    await _run(client, "brief", "sleep 3")  # a task that ends by itself
    await _until(lambda: newest_job(models, "brief").state == "running", 30)
    done = await asyncio.to_thread(batchd, "job", "exec", "brief", "--",
                                   "echo begin; sleep 100", env=env)  # fmt: skip
    assert done.stdout == "begin\n"
    assert done.returncode == 1 and "the job's task ended" in done.stderr, done.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # (gone meanwhile)
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _readme_block(after: str) -> str:
    """The README's first `sh` block after the line `after`."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    return readme.split(after, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_readme_walk_through_from_serve_to_the_jobs_output(tmp_path):
    """`make run` (the virtualenv is there already: it starts `batchd serve` with no
    configuration), then the README's commands for a second shell, as they are written (its
    server and state directory given by the environment)."""
    root = Path(__file__).parents[2]
    port = _free_port()
    env = {"BATCHD_STATE_DIR": str(tmp_path / "state"), "BATCHD_SERVER": f"http://127.0.0.1:{port}"}
    make = subprocess.Popen(  # (-o: the virtualenv as it is, installed by `make test`)
        ["make", "--no-print-directory", "-o", ".venv/.run-installed", "run",
         f"ARGS=--listen 127.0.0.1:{port}"], cwd=root, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while batchd("node", "list", env=env).stdout.count("\tready\t") < 2:
            assert make.poll() is None, "make run ended"
            assert time.monotonic() < deadline, "the local nodes did not become ready"
            time.sleep(0.2)
        commands = _readme_block("Then, in a second shell:")
        assert "batchd job file stream hello" in commands, commands
        done = subprocess.run(["bash", "-ec", commands], cwd=root, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        # `job file stream` prints the job's output last; where there is a GPU, nvidia-smi -L
        # lists it after the greeting
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert done.stdout.startswith(
            "created job default/default/hello (queued)\n"
            "job default/default/hello succeeded, exit code 0\nhello\n"
        ), (done.stdout, done.stderr)
    finally:
        serve = _children(make.pid)  # (batchd serve, which make started)
        if serve:
            os.kill(serve[0], signal.SIGTERM)
        else:  # (make ended, or had not started it: stop whatever is left of the run)
            os.killpg(make.pid, signal.SIGTERM)
        code = make.wait(30)
    assert serve and code == 0  # it stopped cleanly


async def test_output_the_daemon_cannot_read_is_served_by_the_jobs_node(local, tmp_path):
    daemon, client = local
    node_local = tmp_path / "node-local-disk"  # not on the daemon's storage
    await _run(
        client, "local-out", "echo from the node; echo more", stdOutErrPathPrefix=str(node_local)
    )
    job = await _ended(daemon, client, "local-out")
    assert job["properties"]["state"] == "succeeded"
    _status, listed = await client.call("GET", f"{EXP}/jobs/local-out/files")
    assert sorted(f["name"] for f in listed["value"]) == ["stderr.txt", "stdout.txt"]
    async with client.session.get(client.url + f"{EXP}/jobs/local-out/files/stdout.txt",
                                  headers=client.headers) as r:  # fmt: skip
        assert (r.status, await r.text()) == (200, "from the node\nmore\n")
    headers = {**client.headers, "Range": "bytes=5-"}
    async with client.session.get(client.url + f"{EXP}/jobs/local-out/files/stdout.txt",
                                  headers=headers) as r:  # fmt: skip
        assert (r.status, await r.text()) == (206, "the node\nmore\n")
    out = node_local / "default/default/local-out/1/stdouterr"
    (out / "secret").symlink_to(daemon.state_dir / "admin.token")
    status, answer = await client.call("GET", f"{EXP}/jobs/local-out/files/secret")
    assert status == 400 and "link" in answer["error"]["message"]
    status, _ = await client.call("GET", f"{EXP}/jobs/local-out/files/absent.txt")
    assert status == 404


@pytest.mark.parametrize("where", ["storage", "node"])
async def test_a_reused_job_name_has_output_of_its_own(local, tmp_path, where):
    daemon, client = local
    prefix = {} if where == "storage" else {"stdOutErrPathPrefix": str(tmp_path / "node-disk")}
    base = daemon.state_dir / "mounts/logs" if where == "storage" else tmp_path / "node-disk"
    out = base / "default/default/again/1"
    await _run(client, "again", "echo first", **prefix)
    await _ended(daemon, client, "again")
    assert (out / "stdouterr/stdout.txt").read_text() == "first\n"
    assert (await client.call("DELETE", f"{EXP}/jobs/again"))[0] in (200, 202)
    await client.call("PUT", "/v1/workspaces/default/clusters/nobody", ONE_NODE)
    await _run(client, "again", "echo never", cluster="nobody", **prefix)  # waits: no agent
    status, answer = await client.call("GET", f"{EXP}/jobs/again/files")
    assert status == 404, answer  # the deleted job's output is not this one's
    status, _ = await client.call("GET", f"{EXP}/jobs/again/files/stdout.txt")
    assert status == 404
    await client.call("POST", f"{EXP}/jobs/again/terminate")
    assert (await client.call("DELETE", f"{EXP}/jobs/again"))[0] in (200, 202)
    await _run(client, "again", "echo second", **prefix)
    assert (await _ended(daemon, client, "again"))["properties"]["state"] == "succeeded"
    async with client.session.get(client.url + f"{EXP}/jobs/again/files/stdout.txt",
                                  headers=client.headers) as r:  # fmt: skip
        assert (r.status, await r.text()) == (200, "second\n")
    _status, listed = await client.call("GET", f"{EXP}/jobs/again/files")
    assert sorted(f["name"] for f in listed["value"]) == ["stderr.txt", "stdout.txt"]
    kept = out / "stdouterr-unknown/stdout.txt"  # set aside, not lost (a first job: no marker)
    assert kept.read_text() == "first\n"
    second = newest_job(daemon.models.models, "again").job_id
    assert (await client.call("DELETE", f"{EXP}/jobs/again"))[0] in (200, 202)
    await _run(client, "again", "echo third", **prefix)
    assert (await _ended(daemon, client, "again"))["properties"]["state"] == "succeeded"
    assert (out / "stdouterr/stdout.txt").read_text() == "third\n"
    assert (out / f"stdouterr-{second}/stdout.txt").read_text() == "second\n"


async def test_output_on_the_node_can_be_followed_while_the_job_runs(local, tmp_path):
    _daemon, client = local
    node_local = tmp_path / "node-local-disk"  # not on the daemon's storage
    go = tmp_path / "go"
    await _run(client, "chatty", f"echo line 1; while [ ! -e {go} ]; do sleep 0.05; done; "
               "echo line 2", stdOutErrPathPrefix=str(node_local))  # fmt: skip
    out = node_local / "default/default/chatty/1/stdouterr/stdout.txt"
    await _until(lambda: out.exists() and out.read_text().startswith("line 1"), 30)
    url = client.url + f"{EXP}/jobs/chatty/files/stdout.txt?follow=true"
    async with client.session.get(url, headers=client.headers) as r:
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readline(), 10)  # while the job still runs
        go.touch()
        rest = await asyncio.wait_for(r.text(), 30)  # ends when the job has ended
    assert (first, rest) == (b"line 1\n", "line 2\n")
    job = (await client.call("GET", f"{EXP}/jobs/chatty"))[1]
    assert job["properties"]["state"] == "succeeded"


async def _node_token(client: Client, daemon, node_id: str) -> Path:
    """A file holding a new agent token bound to `node_id`."""
    path = daemon.state_dir / f"{node_id}.token"
    path.write_text(await make_token(client, f"agent-{node_id}", "agent", node=node_id))
    return path


async def _agent_on(
    daemon,
    client,
    cluster: str,
    document: dict,
    gpus: str = "1",
    env: dict | None = None,
    *extra: str,
) -> asyncio.subprocess.Process:
    """A cluster of its own, and one agent on it, with its own node-bound token."""
    status, _ = await client.call("PUT", f"/v1/workspaces/default/clusters/{cluster}", document)
    assert status == 201
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
        "--token-file", str(await _node_token(client, daemon, f"{cluster}-0")),
        "--node-id", f"{cluster}-0",
        "--cluster", f"default/{cluster}", "--gpus", gpus, *extra,
        "--work-dir", str(daemon.state_dir / f"nodes/{cluster}-0"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    nodes = daemon.models.models.nodes
    await _until(lambda: f"{cluster}-0" in nodes and nodes[f"{cluster}-0"].state == "ready", 30)
    return agent


async def test_the_tasks_of_an_agent_killed_outright_end_with_it(local):
    """An agent killed outright (SIGKILL, the OOM killer) cannot stop its tasks: its watchdog
    does, at once, so an attempt never runs on beside its retry. No agent of the node is
    started again here to reap them."""
    daemon, client = local
    agent = await _agent_on(daemon, client, "dies", ONE_NODE)
    shell, away = daemon.state_dir / "shell.pid", daemon.state_dir / "away.pid"
    command = (f"echo $$ > {shell}; setsid sh -c 'echo $$ > {away}; exec sleep 600' & "
               "exec sleep 600")  # fmt: skip
    await _run(client, "orphaned", command, cluster="dies")
    await _until(lambda: all(p.exists() and p.read_text().strip() for p in (shell, away)), 30)
    pids = [int(p.read_text()) for p in (shell, away)]
    agent.kill()
    await agent.wait()
    # the task's group, and what left it (setsid), end with their agent
    await _until(lambda: not any(alive(pid) for pid in pids), 10)
    await client.call("POST", f"{EXP}/jobs/orphaned/terminate")


async def test_the_tasks_of_a_frozen_agent_end_before_their_attempt_runs_again(local):
    """A frozen agent (SIGSTOP, a hung loop) neither heartbeats nor stops its tasks when its
    lease runs out, so the daemon gives the attempt to another node: its watchdog ends the
    tasks once the agent has been unresponsive for the lease. Thawed, the agent carries on."""
    daemon, client = local
    agent = await _agent_on(daemon, client, "frozen", ONE_NODE)
    shell = daemon.state_dir / "frozen.pid"
    await _run(client, "stuck", f"echo $$ > {shell}; exec sleep 600", cluster="frozen")
    await _until(lambda: shell.exists() and shell.read_text().strip(), 30)
    pid = int(shell.read_text())
    agent.send_signal(signal.SIGSTOP)
    try:
        await _until(lambda: not alive(pid), 20)  # while the agent is still frozen
        await _until(lambda: daemon.models.models.nodes["frozen-0"].state == "lost", 15)
    finally:
        agent.send_signal(signal.SIGCONT)
    await _until(lambda: daemon.models.models.nodes["frozen-0"].state == "ready", 30)

    def job():
        return newest_job(daemon.models.models, "stuck")

    await _until(lambda: job().attempt == 2 and job().state == "running", 30)  # thawed node
    await client.call("POST", f"{EXP}/jobs/stuck/terminate")
    assert (await _ended(daemon, client, "stuck"))["properties"]["state"] == "failed"
    agent.terminate()
    assert await agent.wait() == 0


async def _busy_node(daemon, client, cluster: str) -> asyncio.subprocess.Process:
    """A one-node cluster of its own, with its agent (returned), running a job `busy`."""
    agent = await _agent_on(daemon, client, cluster, ONE_NODE)
    await _run(client, "busy", "sleep 600", cluster=cluster)
    await _until(lambda: newest_job(daemon.models.models, "busy").state == "running", 30)
    return agent


async def test_a_preempted_jobs_task_is_killed_before_its_gpu_is_reused(local):
    daemon, client = local
    document = {"vmSize": "Standard_NC6", "preemption": True,
                "scaleSettings": {"manual": {"targetNodeCount": 1}}}  # fmt: skip
    agent = await _agent_on(daemon, client, "pre", document)
    try:
        pid_file = daemon.state_dir / "victim.pid"
        stopped, started = daemon.state_dir / "stopped", daemon.state_dir / "started"
        # the victim takes a second to stop (a checkpoint written on SIGTERM)
        await _run(client, "victim", f"echo $$ > {pid_file}; trap 'sleep 1; date +%s%N > "
                   f"{stopped}; exit 143' TERM; while :; do sleep 0.05; done", cluster="pre",
                   schedulingPriority="low", preemptible=True)  # fmt: skip
        await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
        victim = int(pid_file.read_text())
        await _run(client, "urgent", f"date +%s%N > {started}", cluster="pre",
                   schedulingPriority="high")  # fmt: skip
        job = await _ended(daemon, client, "urgent")
        assert job["properties"]["state"] == "succeeded"
        assert int(started.read_text()) > int(stopped.read_text())  # not beside the victim
        await _until(lambda: not alive(victim), 10)
        await client.call("POST", f"{EXP}/jobs/victim/terminate")
    finally:
        agent.terminate()
        await agent.wait()


def _local_token(daemon, node_id: str) -> str:
    """A local node's own agent credential."""
    return (daemon.state_dir / "nodes" / node_id / "agent.token").read_text().strip()


async def _post(daemon, client: Client, token: str, *messages) -> int:
    """Agent messages in one body, as the agent sends them; the HTTP status."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": protocol.CONTENT_TYPE}
    async with client.session.post(daemon.url + "/agent/v1/messages", headers=headers,
                                   data=protocol.pack(list(messages))) as r:  # fmt: skip
        return r.status


async def test_the_agent_channel_refuses_strangers_and_bad_registrations(local):
    daemon, client = local
    own = _local_token(daemon, "local-0")
    fleet = await make_token(client, "fleet-agent", "agent")  # bound to no node

    async def post(token: str, *messages) -> int:
        return await _post(daemon, client, token, *messages)

    async def poll(token: str, node: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.session.get(daemon.url + "/agent/v1/commands", headers=headers,
                                      params={"node": node, "incarnation": "7"}) as r:  # fmt: skip
            return r.status

    await _run(client, "real", "sleep 600")
    models = daemon.models.models
    await _until(lambda: newest_job(models, "real").state == "running", 30)
    job_id = newest_job(models, "real").job_id
    node_id = models.jobs[job_id].tasks[0][0]
    fake_exit = protocol.message("TaskExited", node_id, 1, jobId=job_id, attempt=1, task=0,
                                 exitCode=0)  # fmt: skip
    # a local agent's credential speaks for its own node only
    other = "local-1" if node_id == "local-0" else "local-0"
    assert await post(_local_token(daemon, other), fake_exit) == 403
    assert await poll(own, "local-1") == 403  # nor does it get another node's commands
    # a task index counted from the end (job.tasks[-1]) is no task of the job's
    for index in (-1, 1):
        odd_exit = protocol.message("TaskExited", node_id, models.nodes[node_id].incarnation,
                                    jobId=job_id, attempt=1, task=index, exitCode=0)  # fmt: skip
        assert await post(_local_token(daemon, node_id), odd_exit) == (400 if index < 0 else 200)
    assert models.jobs[job_id].state == "running"
    beat = protocol.message("Heartbeat", "local-1", models.nodes["local-1"].incarnation,
                            running=[])  # fmt: skip
    assert await post(own, beat) == 403  # nor speak for it, even as its current agent
    # nor can a node report on a task placed on another node, under its own name
    await _run(client, "prep", "true", jobPreparation={"commandLine": "sleep 4"})
    await _until(lambda: newest_job(models, "prep").tasks, 30)
    prep = newest_job(models, "prep")
    elsewhere = "local-1" if prep.tasks[0][0] == "local-0" else "local-0"
    spoof = protocol.message("TaskStarted", elsewhere, models.nodes[elsewhere].incarnation,
                             jobId=prep.job_id, attempt=1, task=0)  # fmt: skip
    elsewhere_token = _local_token(daemon, elsewhere)
    assert await post(elsewhere_token.strip(), spoof) == 200  # accepted, and ignored
    assert models.jobs[prep.job_id].state in ("scheduled", "preparing")  # still preparing
    # a token limited to a workspace joins only that workspace's clusters
    assert (await client.call("PUT", "/v1/workspaces/elsewhere", {}))[0] == 201
    scoped = await make_token(client, "scoped-agent", "agent", workspaces=["elsewhere"])
    join = protocol.message("Register", "new-node", 3, cluster="default/local", gpus=1)
    assert await post(scoped, join) == 403
    # nor take over a node of another workspace's cluster by moving it to its own
    hijack = protocol.message("Register", "local-0", 99, cluster="elsewhere/c", gpus=1)
    assert await post(scoped, hijack) == 403
    assert await poll(scoped, "local-0") == 403
    assert models.nodes["local-0"].incarnation != 99
    # a fleet credential (bound to no node) still cannot speak for a task it was not given
    stranger_exit = protocol.message("TaskExited", "evil-node", 1, jobId=job_id, attempt=1,
                                     task=0, exitCode=0)  # fmt: skip
    assert await post(fleet, stranger_exit) == 409  # a node nobody registered speaks for none
    bad = protocol.message("Register", "evil-node", 2, cluster="default/local", gpus="x")
    assert await post(fleet, bad) == 400
    bad = protocol.message("Register", "evil-node", 2, cluster="default/local", gpus=1,
                           gpuMemoryMb=-1)  # fmt: skip
    assert await post(fleet, bad) == 400
    assert await post(fleet, protocol.message("Heartbeat", "bad id!", 1, running=[])) == 400
    odd = protocol.message("Heartbeat", "local-0", models.nodes["local-0"].incarnation,
                           running=[], engineDown={"why": "?"})  # fmt: skip
    assert await post(own, odd) == 400
    assert models.jobs[job_id].state == "running" and "evil-node" not in models.nodes
    assert not daemon.stopping.is_set()
    assert await poll(fleet, "local-0") == 409  # another agent's commands are not handed out
    await client.call("POST", f"{EXP}/jobs/real/terminate")


async def test_a_machine_moves_to_another_cluster_once_its_old_node_is_lost(local):
    """An agent registering a node id that another cluster holds: refused (400, naming the
    cluster and --node-id) while that node is alive, as when two machines share a host
    name; once its old agent is gone (the node lost), the node moves: removed from the old
    cluster and ready in the new one, which places its jobs there."""
    daemon, client = local
    models = daemon.models.models
    for name in ("first", "second"):
        path = f"/v1/workspaces/default/clusters/{name}"
        assert (await client.call("PUT", path, ONE_NODE))[0] == 201
    fleet = await make_token(client, "fleet-agent", "agent")
    join = protocol.message("Register", "mover", 1, cluster="default/first", gpus=1)
    assert await _post(daemon, client, fleet, join) == 200
    first, second = (models.cluster_ids[f"default/{n}"] for n in ("first", "second"))
    await _until(lambda: models.nodes["mover"].state == "ready", 10)
    elsewhere = protocol.message("Register", "mover", 2, cluster="default/second", gpus=1)
    assert await _post(daemon, client, fleet, elsewhere) == 400  # the other one is alive
    assert models.nodes["mover"].cluster == first and models.nodes["mover"].incarnation == 1
    gone = NewEvent("NodeLost", {"nodeId": "mover"})
    await daemon.control.run(lambda m: [("node-mover", gone)], key="node/mover")
    moved = protocol.message("Register", "mover", 3, cluster="default/second", gpus=1)
    assert await _post(daemon, client, fleet, moved) == 200
    await _until(lambda: models.nodes["mover"].state == "ready", 10)
    assert models.nodes["mover"].cluster == second
    assert models.clusters[first].nodes == [] and models.clusters[second].nodes == ["mover"]
    await _run(client, "there", "true", cluster="second")
    await _until(lambda: newest_job(models, "there").tasks, 30)
    assert newest_job(models, "there").tasks[0][0] == "mover"
    await client.call("POST", f"{EXP}/jobs/there/terminate")


async def test_a_lost_node_whose_machine_is_gone_can_be_removed(local):
    """A hand-joined node stays in its cluster when its machine goes for good (nothing else
    removes it, and its cluster stays resizing past its target): an admin removes it once it
    is lost, and the agent tokens bound to it are revoked. A node that is not lost is refused
    (its agent is alive, and would join again), and a viewer may not remove one."""
    daemon, client = local
    models = daemon.models.models
    assert (await client.call("PUT", "/v1/workspaces/default/clusters/hand", ONE_NODE))[0] == 201
    fleet = await make_token(client, "fleet-agent", "agent")
    bound = await make_token(client, "gone-agent", "agent", node="gone")
    join = protocol.message("Register", "kept", 1, cluster="default/hand", gpus=1)
    assert await _post(daemon, client, fleet, join) == 200
    join = protocol.message("Register", "gone", 1, cluster="default/hand", gpus=1)
    assert await _post(daemon, client, bound, join) == 200
    await _until(lambda: models.nodes["gone"].state == "ready", 10)
    status, error = await client.call("DELETE", "/v1/nodes/gone")
    assert status == 409 and "is ready: only a lost node" in error["error"]["message"]
    lost = NewEvent("NodeLost", {"nodeId": "gone"})
    await daemon.control.run(lambda m: [("node-gone", lost)], key="node/gone")
    viewer = Client(client.session, client.url, await make_token(client, "eyes", "viewer"))
    assert (await viewer.call("DELETE", "/v1/nodes/gone"))[0] == 403
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}
    done = await asyncio.to_thread(batchd, "node", "remove", "gone", env=env)
    assert done.returncode == 0 and done.stdout == "removed node gone\n", done.stderr
    assert "gone" not in models.nodes
    assert await _post(daemon, client, bound, join) == 401  # its credential went with it
    hand = models.clusters[models.cluster_ids["default/hand"]]
    assert hand.nodes == ["kept"]
    assert (await client.call("GET", "/v1/nodes/gone"))[0] == 404
    assert (await client.call("DELETE", "/v1/nodes/gone"))[0] == 404


async def test_one_body_of_task_reports_for_several_jobs_ends_each_as_reported(local):
    """An agent sends what queued up while its last message was on the way in one body; the
    daemon handles the reports of different jobs together, and each takes effect."""
    daemon, client = local
    models = daemon.models.models
    for name in ("one", "two"):
        await _run(client, name, "sleep 600")
    await _until(lambda: all(newest_job(models, n).state
                             == "running" for n in ("one", "two")), 30)  # fmt: skip
    jobs = [newest_job(models, n) for n in ("one", "two")]
    node_id = jobs[0].tasks[0][0]
    assert jobs[1].tasks[0][0] == node_id  # best fit: the second on the first one's node
    body = [protocol.message("TaskExited", node_id, models.nodes[node_id].incarnation,
                             jobId=job.job_id, attempt=1, task=0, exitCode=code)
            for job, code in zip(jobs, (0, 5), strict=True)]  # fmt: skip
    assert await _post(daemon, client, _local_token(daemon, node_id), *body) == 200
    one, two = [await _ended(daemon, client, name) for name in ("one", "two")]
    assert (one["properties"]["state"], one["properties"]["executionInfo"]["exitCode"]) == (
        "succeeded", 0)  # fmt: skip
    assert (two["properties"]["state"], two["properties"]["executionInfo"]["exitCode"]) == (
        "failed", 5)  # fmt: skip


async def test_reading_files_through_a_node_that_is_gone_answers_at_once(local):
    daemon, _client = local
    service = daemon.nodes
    answer = await asyncio.wait_for(service.read_remote("ghost", "/etc/hostname"), 1.0)
    assert answer["error"]["code"] == "node_unreachable" and "gone or lost" in (
        answer["error"]["message"])  # fmt: skip
    agent = daemon.providers[0].processes["local-1"]
    agent.send_signal(signal.SIGSTOP)  # silent: no heartbeat brings it back meanwhile
    try:
        await asyncio.sleep(0.3)  # what it sent before is handled
        for decide in (node_service._suspected, node_service._lost):  # the sweep, on silence
            await daemon.control.run(lambda m, decide=decide: decide(m, "local-1"),
                                     key="node/local-1")  # fmt: skip
        assert daemon.models.models.nodes["local-1"].state == "lost"
        answer = await asyncio.wait_for(service.read_remote("local-1", "/etc/hostname"), 1.0)
    finally:
        agent.send_signal(signal.SIGCONT)
    assert answer["error"]["code"] == "node_unreachable"
    answer = await service.read_remote("local-0", "/etc/hostname")  # a live node answers
    assert "error" not in answer


@pytest.mark.parametrize("fault", protocol.NODE_FAULTS)
async def test_a_task_stopped_by_its_agents_lost_lease_is_retried_as_a_node_failure(local, fault):
    """An agent out of touch with the daemon for longer than its lease stops its tasks (the
    daemon may have given their GPUs away) and says so when it reports their exit; the job
    is not blamed: the attempt is requeued under maxNodeFailureRetries and runs again. So
    is a task whose container engine went away (engine_unreachable)."""
    daemon, client = local
    models = daemon.models.models
    await _run(client, "cut", "sleep 600")
    await _until(lambda: newest_job(models, "cut").state
                 == "running", 30)  # fmt: skip
    job = newest_job(models, "cut")
    node_id = job.tasks[0][0]
    error = {"code": fault, "message": "task 0 was stopped"}
    report = protocol.message("TaskExited", node_id, models.nodes[node_id].incarnation,
                              jobId=job.job_id, attempt=1, task=0, exitCode=143,
                              error=error)  # fmt: skip
    assert await _post(daemon, client, _local_token(daemon, node_id), report) == 200
    await _until(lambda: job.attempt == 2 and job.state == "running", 30)
    assert job.retries == {"node_lost": 1}
    await client.call("POST", f"{EXP}/jobs/cut/terminate")


async def test_an_agent_outlives_a_daemon_restart_and_its_task_runs_on(tmp_path, monkeypatch):
    """The daemon restarts (an upgrade) within the agent's lease: the agent registers again
    and says what it runs, the new daemon keeps the attempt where it is, and commands it."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state, listen = tmp_path / "state", f"127.0.0.1:{_free_port()}"
    daemon = await start_daemon(state, listen=listen)
    agent = None
    pid_file = state / "survivor.pid"
    try:
        async with admin_client(daemon) as client:
            for path in ("/v1/workspaces/default", EXP):
                assert (await client.call("PUT", path, {}))[0] == 201
            agent = await _agent_on(daemon, client, "keep", ONE_NODE)
            await _run(client, "survivor", f"echo $$ > {pid_file}; exec sleep 600",
                       cluster="keep")  # fmt: skip
            await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
        pid = int(pid_file.read_text())
        await daemon.stop()
        daemon = await start_daemon(state, listen=listen)
        nodes = daemon.nodes
        await _until(lambda: "keep-0" in nodes.seen, 15)  # it found the new daemon
        # heartbeats listing the task have been and gone
        await asyncio.sleep(2 * HEARTBEAT_INTERVAL + 0.5)
        models = daemon.models.models
        job = newest_job(models, "survivor")
        assert (job.state, job.attempt) == ("running", 1) and alive(pid)
        async with admin_client(daemon) as client:
            await client.call("POST", f"{EXP}/jobs/survivor/terminate")
        await _until(lambda: not alive(pid), 15)  # the new daemon's KillTask reached it
        await _until(lambda: job.state == "failed", 15)
    finally:
        if agent is not None:
            agent.terminate()
            await agent.wait()
        await daemon.stop()


async def test_a_daemon_restart_runs_its_local_jobs_again_without_spending_retries(
    tmp_path, monkeypatch
):
    """Local agents stop with their daemon. A restart (an upgrade) is the operator's doing:
    the attempts it stops are queued again without spending the job's node-failure retries,
    and the stopped nodes take no work until their new agents have registered."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state = tmp_path / "state"
    daemon = await start_daemon(state, local_nodes=2)
    try:
        async with admin_client(daemon) as client:
            await _until(lambda: _ready_nodes(daemon) == 2, 30)
            await _run(client, "upgraded", "echo attempt $AZ_BATCHAI_JOB_ATTEMPT; sleep 600",
                       maxNodeFailureRetries=0)  # fmt: skip
            job = lambda: newest_job(daemon.models.models, "upgraded")  # noqa: E731
            await _until(lambda: job().state == "running", 30)
        for _ in range(2):
            with info_logs() as logged:
                await daemon.stop()
            # the last anchor covers what stopping appended (the nodes lost, the requeue)
            anchors = [e["position"] for e in logged if e["event"] == "log.anchor"]
            assert anchors[-1:] == [daemon.models.position]
            stopped = newest_job(daemon.models.models, "upgraded")
            assert stopped.state == "queued"  # not "running" on a node that runs nothing
            assert all(n.state == "lost" for n in daemon.models.models.nodes.values())
            daemon = await start_daemon(state, local_nodes=2)
            await _until(lambda: job().state == "running", 30)
        assert job().attempt == 3 and job().retries == {"interrupted": 2}
        await _until(lambda: _exists_with(daemon, "upgraded", 3, "attempt 3\n"), 10)
        [*_, error] = job().errors
        assert error["code"] == "daemon_stopped"
        async with admin_client(daemon) as client:
            await client.call("POST", f"{EXP}/jobs/upgraded/terminate")
            await _ended(daemon, client, "upgraded")
    finally:
        await daemon.stop()


async def _serve_ready(state: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """`batchd serve` (the embedded default) as a process of its own, once its two local
    nodes are ready; (the process, the environment the CLI needs to reach it)."""
    port = _free_port()
    env = {"BATCHD_STATE_DIR": str(state), "BATCHD_SERVER": f"http://127.0.0.1:{port}"}
    serve = [sys.executable, "-m", "batchd.scheduler.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen(serve, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while batchd("node", "list", env=env).stdout.count("\tready\t") < 2:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the local nodes did not become ready")
        await asyncio.sleep(0.2)
    return process, env


async def test_a_local_cluster_whose_deletion_a_crash_cut_short_is_made_again(tmp_path):
    """`cluster delete local` while a job runs there (its nodes drain), then the daemon is
    killed: the next start finishes the deletion and makes the cluster anew, as a start
    does for a deleted local cluster."""
    state = tmp_path / "state"
    crashed, env = await _serve_ready(state)
    try:
        done = batchd("job", "create", "held", "--cluster", "local", "--command", "sleep 600",
                      env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr

        def job_state() -> str:
            shown = batchd("job", "show", "held", "--json", env=env).stdout
            return json.loads(shown)["properties"]["state"]

        deadline = time.monotonic() + 30
        while job_state() != "running":  # placed on a node: the deletion has to wait for it
            assert time.monotonic() < deadline, "the job did not start"
            await asyncio.sleep(0.2)
        done = batchd("cluster", "delete", "local", env=env)
        assert done.stdout.startswith("deleting cluster default/local"), done.stdout
    finally:
        crashed.kill()
        crashed.wait()
    daemon = await start_daemon(state, local_nodes=2)
    try:
        models = daemon.models.models
        cluster = models.clusters[models.cluster_ids["default/local"]]
        assert not cluster.deleting
        await _until(lambda: _ready_nodes(daemon) == 2, 30)
        assert newest_job(models, "held").errors[-1]["code"] == "cluster_deleted"
    finally:
        await daemon.stop()


async def test_a_daemon_killed_outright_requeues_its_local_jobs_when_it_starts_again(tmp_path):
    """A daemon that did not stop cleanly: its local agents end with it (they find it gone),
    their tasks with them, and the next daemon requeues the attempts it finds placed on its
    local nodes, as node failures, before their new agents take work."""
    state = tmp_path / "state"
    crashed, env = await _serve_ready(state)
    pid_file = tmp_path / "task.pid"
    try:
        done = batchd("job", "create", "kept", "--cluster", "local", "--command",
                      f"echo $$ > {pid_file}; exec sleep 600", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    finally:
        crashed.kill()
        crashed.wait()
    await _until(lambda: not alive(int(pid_file.read_text())), 15)  # its agents ended it
    store = await urls.open_store(config.default_store_url(state))
    try:
        heard = to_iso((await store.head()).recorded_at)  # the old daemon's last event
    finally:
        await store.close()
    (state / "admin.token").unlink()  # (made again at this start: an event before the rest)
    daemon = await start_daemon(state, local_nodes=2)
    try:
        job = newest_job(daemon.models.models, "kept")
        await _until(lambda: job.attempt == 2 and job.state == "running", 30)
        assert job.retries == {"node_lost": 1}  # a crash is a failure: it is counted
        assert job.errors[-1]["code"] == "daemon_restarted"
        # stamped at this start, the error says when the log last heard of the old daemon
        assert f"the log's last event before this start: {heard})" in job.errors[-1]["message"]
        async with admin_client(daemon) as client:
            await client.call("POST", f"{EXP}/jobs/kept/terminate")
            await _ended(daemon, client, "kept")
    finally:
        await daemon.stop()


async def test_local_nodes_have_the_configured_gpus_and_vm_sizes_come_from_configuration(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    config_file = tmp_path / "batchd.toml"
    config_file.write_text("[local]\nnodes = 1\ngpus_per_node = 2\n\n"
                           "[vm_sizes.Standard_Lab8]\ngpus = 8\ngpu_model = \"L40S\"\n"
                           "vcpus = 64\nmemory_mb = 524288\n")  # fmt: skip
    daemon = await start_daemon(tmp_path / "state", config_file, local_nodes=None)
    try:
        async with admin_client(daemon) as client:
            await _until(lambda: _ready_nodes(daemon) == 1, 30)
            _, local = await client.call("GET", "/v1/workspaces/default/clusters/local")
            assert local["properties"]["vmSize"] == "Local"
            command = {"commandLine": "echo $CUDA_VISIBLE_DEVICES"}
            spec = {"cluster": "local", "nodeCount": 1, "customToolkitSettings": command,
                    "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs"}  # fmt: skip
            status, created = await client.call("PUT", f"{EXP}/jobs/whole", spec)
            assert created["properties"]["gpusPerNode"] == 2  # every GPU of a local node
            job = await _ended(daemon, client, "whole")
            assert job["properties"]["state"] == "succeeded"
            assert _out(daemon, "whole") == "0,1\n"
            status, answer = await client.call("PUT", f"{EXP}/jobs/toobig",
                                               {**spec, "gpusPerNode": 3})  # fmt: skip
            assert status == 400 and "more than the 2 GPUs of Local" in json.dumps(answer)
            lab = {"vmSize": "standard_lab8", "scaleSettings": {"manual": {"targetNodeCount": 1}}}
            status, made = await client.call("PUT", "/v1/workspaces/default/clusters/lab", lab)
            assert status == 201 and made["properties"]["vmSize"] == "Standard_Lab8"
            status, created = await client.call("PUT", f"{EXP}/jobs/onlab",
                                                {**spec, "cluster": "lab"})  # fmt: skip
            assert status == 201 and created["properties"]["gpusPerNode"] == 8
    finally:
        await daemon.stop()


async def test_deleting_a_busy_cluster_fails_its_queued_jobs_and_drains_its_running_ones(local):
    daemon, client = local
    agent = await _busy_node(daemon, client, "gone")
    try:
        await _run(client, "waiting", "true", cluster="gone")
        models = daemon.models.models
        env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}
        done = await asyncio.to_thread(batchd, "cluster", "delete", "gone", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("deleting cluster default/gone: it goes once its 1 node")
        job = await _ended(daemon, client, "waiting")
        assert job["properties"]["executionInfo"]["errors"][-1]["code"] == "cluster_deleted"
        assert newest_job(models, "busy").state == "running"  # its node drains
        await client.call("POST", f"{EXP}/jobs/busy/terminate")
        await _until(lambda: "gone-0" not in models.nodes, 30)
    finally:
        agent.terminate()
        await agent.wait()


async def test_a_local_cluster_with_autoscale_follows_its_queue(local):
    daemon, client = local
    models = daemon.models.models
    cluster = "/v1/workspaces/default/clusters/local"
    auto = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 3, "initialNodeCount": 0}}
    assert (await client.call("PATCH", cluster, {"scaleSettings": auto}))[0] == 200
    local_cluster = models.clusters[models.cluster_ids["default/local"]]
    await _until(lambda: not models.nodes and local_cluster.allocation_state == "steady", 30)
    for name in ("a1", "a2", "a3"):  # idle, down to its minimum; now it grows for them
        await _run(client, name, "sleep 600", gpusPerNode=4)
    await _until(lambda: local_cluster.allocation_state == "resizing", 10)
    await _until(lambda: all(newest_job(models, n).state == "running" for n in ("a1", "a2", "a3")),
                 60)  # fmt: skip
    assert len(models.nodes) == 3
    await _until(lambda: local_cluster.allocation_state == "steady", 10)
    for name in ("a1", "a2", "a3"):  # each was told first that the cluster grows for it
        events = await daemon.store.read_stream(f"job-{newest_job(models, name).job_id}")
        reasons = [e.data["reason"]["code"] for e in events if e.type == "JobPendingReasonChanged"]
        assert reasons[:1] == ["cluster_scaling"], (name, reasons)
    for name in ("a1", "a2", "a3"):
        await client.call("POST", f"{EXP}/jobs/{name}/terminate")
    await _until(lambda: not models.nodes, 30)  # idle again


async def test_a_job_is_preparing_while_its_job_preparation_runs(local, tmp_path):
    daemon, client = local
    go = tmp_path / "go"
    wait = f"while [ ! -e {go} ]; do sleep 0.05; done"
    await _run(client, "prepared", "echo ran", jobPreparation={"commandLine": wait})
    models = daemon.models.models
    await _until(lambda: newest_job(models, "prepared").state == "preparing", 30)
    _status, shown = await client.call("GET", f"{EXP}/jobs/prepared")
    assert shown["properties"]["state"] == "preparing"
    go.touch()
    job = await _ended(daemon, client, "prepared")
    assert job["properties"]["state"] == "succeeded"
    _status, history = await client.call("GET", f"{EXP}/jobs/prepared/history")
    [incarnation] = history["value"]
    rows = [(row["event"], row["state"]) for row in incarnation["timeline"]]
    assert rows[2:4] == [("JobPreparing", "preparing"), ("JobStarted", "running")]


async def test_no_task_of_a_multi_node_job_starts_before_every_node_is_prepared(local, tmp_path):
    """Task 1's jobPreparation takes a while: task 0 (the master an MPI job would start
    from) waits for it, and the job is preparing until both start."""
    daemon, client = local
    marks = tmp_path / "marks"
    marks.mkdir()
    go = tmp_path / "go"
    prepare = (f"if [ $AZ_BATCHAI_TASK_INDEX = 1 ]; then while [ ! -e {go} ]; do sleep 0.05; "
               f"done; fi; touch {marks}/prepared-$AZ_BATCHAI_TASK_INDEX")  # fmt: skip
    command = f"ls {marks} > {marks}/seen-by-$AZ_BATCHAI_TASK_INDEX"
    await _run(client, "barrier", command, nodeCount=2, gpusPerNode=4,
               jobPreparation={"commandLine": prepare})  # fmt: skip
    models = daemon.models.models
    await _until(lambda: (marks / "prepared-0").exists(), 30)
    await asyncio.sleep(1.0)  # task 0 waits meanwhile
    assert not (marks / "seen-by-0").exists()
    assert newest_job(models, "barrier").state == "preparing"
    daemon.nodes.prepared.clear()  # as after a daemon restart: task 0 says it again
    go.touch()
    job = await _ended(daemon, client, "barrier")
    assert job["properties"]["state"] == "succeeded"
    seen = (marks / "seen-by-0").read_text().split()
    assert "prepared-1" in seen  # task 1 was prepared when task 0 started


async def test_a_waiting_master_is_released_after_a_restart_once_another_task_has_ended(
    local, tmp_path
):
    """Task 1 has no command (a node the master reaches): released, it exits at once and
    says nothing more. Task 0's ProceedTask is lost with a daemon that stops: the next
    daemon knows from task 1's exit that the attempt was released, and lets task 0 go."""
    daemon, client = local
    service = daemon.nodes
    send, lost = service._send, []

    def losing(node_id: str, command: dict) -> None:
        if command["type"] == "ProceedTask" and command["task"] == 0 and not lost:
            lost.append(command)  # (in the outbox of a daemon that stopped)
            service.prepared.clear()  # what a daemon started since knows of it: nothing
            return
        send(node_id, command)

    service._send = losing
    ran = tmp_path / "ran"
    await _run(client, "mpi", f"touch {ran}", nodeCount=2, gpusPerNode=4,
               jobPreparation={"commandLine": "true"})  # fmt: skip
    models = daemon.models.models
    await _until(lambda: lost and "1" in newest_job(models, "mpi").task_exits, 30)
    job = await _ended(daemon, client, "mpi")
    assert job["properties"]["state"] == "succeeded" and ran.exists()


async def test_a_waiting_task_whose_kill_was_lost_is_told_again(local, tmp_path):
    daemon, client = local
    service = daemon.nodes
    send = service._send

    def losing(node_id: str, command: dict) -> None:
        if command["type"] != "KillTask":  # every KillTask lost on the way
            send(node_id, command)

    go = tmp_path / "go"
    prepare = f"[ $AZ_BATCHAI_TASK_INDEX = 0 ] || while [ ! -e {go} ]; do sleep 0.05; done"
    await _run(client, "stuck", "sleep 600", nodeCount=2, gpusPerNode=4,
               jobPreparation={"commandLine": prepare})  # fmt: skip
    models = daemon.models.models
    await _until(lambda: service.prepared.get((newest_job(models, "stuck").job_id, 1)), 30)
    service._send = losing
    assert (await client.call("POST", f"{EXP}/jobs/stuck/terminate"))[0] == 202
    await asyncio.sleep(0.5)  # the first KillTask of task 0, lost
    service._send = send
    go.touch()  # (task 1 ends its preparation: its own kill is lost too, as it waits)
    job = await _ended(daemon, client, "stuck", seconds=30)
    assert job["properties"]["state"] == "failed"  # terminated: every task told, and gone


async def test_a_running_task_whose_kill_was_lost_is_killed_again(local, monkeypatch):
    """A terminated job's KillTask lost on its way (a poll's answer cut off): the node still
    lists the task, and is told again, so the job does not run on, terminating, for days."""
    daemon, client = local
    service = daemon.nodes
    monkeypatch.setattr(node_service, "KILL_AGAIN", 1.0, raising=False)
    send = service._send

    def losing(node_id: str, command: dict) -> None:
        if command["type"] != "KillTask":
            send(node_id, command)

    await _run(client, "long", "sleep 600")
    models = daemon.models.models
    await _until(lambda: newest_job(models, "long").state == "running", 30)
    service._send = losing
    assert (await client.call("POST", f"{EXP}/jobs/long/terminate"))[0] == 202
    await asyncio.sleep(0.5)  # the KillTask, lost
    service._send = send
    job = await _ended(daemon, client, "long", seconds=30)
    assert job["properties"]["state"] == "failed"


async def test_a_token_of_an_earlier_default_workspace_does_not_stop_the_local_cluster(tmp_path):
    """A log an older batchd wrote may hold a token limited to a `default` workspace it let
    be deleted: the start that makes `default` again revokes it (it would reach the new
    one) rather than fail."""
    state = tmp_path / "state"
    await (await start_daemon(state, local_nodes=0)).stop()  # its log and keys: no `default`
    store = await urls.open_store(config.default_store_url(state))
    try:
        data = {"tokenId": "t-old", "name": "old-ci", "role": "operator",
                "workspaces": ["default"], "hash": "0" * 64}  # fmt: skip
        await store.append("token-t-old", [NewEvent("TokenCreated", data, "admin")])
    finally:
        await store.close()
    daemon = await start_daemon(state, local_nodes=1)
    try:
        models = daemon.models.models
        assert "default" in models.workspaces and "t-old" not in models.tokens
    finally:
        await daemon.stop()


async def test_a_failed_preparation_on_one_node_keeps_the_others_from_starting(local, tmp_path):
    daemon, client = local
    marks = tmp_path / "marks"
    marks.mkdir()
    prepare = "[ $AZ_BATCHAI_TASK_INDEX = 0 ] || { sleep 0.5; exit 3; }"
    command = f"touch {marks}/ran-$AZ_BATCHAI_TASK_INDEX"
    await _run(client, "unprepared", command, nodeCount=2, gpusPerNode=4,
               jobPreparation={"commandLine": prepare})  # fmt: skip
    job = await _ended(daemon, client, "unprepared")
    assert job["properties"]["state"] == "failed"
    [error] = job["properties"]["executionInfo"]["errors"]
    assert error["code"] == "job_preparation_failed"
    assert list(marks.iterdir()) == []  # no node ran the job's command


async def test_a_lost_start_is_sent_again_while_the_jobs_other_task_already_runs(local):
    """Two nodes of a two-node job: node 0 starts its task (the job runs), node 1's
    StartTask is lost on the way. Its heartbeats, which do not list the task, bring the
    StartTask again."""
    daemon, client = local
    two = {**ONE_NODE, "scaleSettings": {"manual": {"targetNodeCount": 2}}}
    assert (await client.call("PUT", "/v1/workspaces/default/clusters/pair", two))[0] == 201
    tokens = {}
    for n in (0, 1):
        tokens[n] = (await _node_token(client, daemon, f"pair-{n}")).read_text().strip()
        join = protocol.message("Register", f"pair-{n}", 1, cluster="default/pair", gpus=1)
        assert await _post(daemon, client, tokens[n], join) == 200
    await _run(client, "gang", "true", cluster="pair", nodeCount=2)
    models, service = daemon.models.models, daemon.nodes
    await _until(lambda: newest_job(models, "gang").state == "scheduled", 30)
    job = newest_job(models, "gang")
    node = {t: node_id for t, (node_id, _gpus) in enumerate(job.tasks)}
    await _until(lambda: all(service.outbox.get(node[t]) for t in (0, 1)), 30)
    service.outbox[node[1]].clear()  # taken by a poll whose answer never arrived
    started = protocol.message("TaskStarted", node[0], 1, jobId=job.job_id, attempt=1, task=0)
    assert await _post(daemon, client, tokens[int(node[0][-1])], started) == 200
    await _until(lambda: job.state == "running", 10)
    beat = protocol.message("Heartbeat", node[1], 1, running=[])
    deadline = time.monotonic() + 20
    while not service.outbox.get(node[1]):  # beats until the resend is due
        assert time.monotonic() < deadline, "the lost StartTask was not sent again"
        assert await _post(daemon, client, tokens[int(node[1][-1])], beat) == 200
        await asyncio.sleep(0.5)
    [again] = service.outbox[node[1]]
    assert (again["type"], again["jobId"], again["task"]) == ("StartTask", job.job_id, 1)
    await client.call("POST", f"{EXP}/jobs/gang/terminate")


async def test_a_running_task_whose_node_no_longer_lists_it_is_not_waited_for_forever(
    local, monkeypatch
):
    """A task's exit report was lost on the way (its agent runs on, same incarnation): its
    node's heartbeats stop listing it. The daemon does not wait for a report that will never
    come: the attempt is requeued as a node failure (its exit code is unknown), and a job
    being terminated meanwhile ends."""
    monkeypatch.setattr(node_service, "STOPPED_AFTER", 1.0)
    daemon, client = local
    token = (await _node_token(client, daemon, "quiet-0")).read_text().strip()
    assert (await client.call("PUT", "/v1/workspaces/default/clusters/quiet", ONE_NODE))[0] == 201
    join = protocol.message("Register", "quiet-0", 1, cluster="default/quiet", gpus=2)
    assert await _post(daemon, client, token, join) == 200
    models = daemon.models.models
    for name in ("lost-report", "lost-kill"):
        await _run(client, name, "true", cluster="quiet")
        await _until(lambda n=name: newest_job(models, n).state == "scheduled", 30)
        job = newest_job(models, name)
        started = protocol.message("TaskStarted", "quiet-0", 1, jobId=job.job_id, attempt=1,
                                   task=0)  # fmt: skip
        assert await _post(daemon, client, token, started) == 200
        await _until(lambda n=name: newest_job(models, n).state == "running", 10)
        if name == "lost-kill":
            await client.call("POST", f"{EXP}/jobs/{name}/terminate")
        beat = protocol.message("Heartbeat", "quiet-0", 1, running=[])
        deadline = time.monotonic() + 20
        while newest_job(models, name).attempt == 1 and newest_job(models, name).state in (
            "running",
            "terminating",
        ):
            assert time.monotonic() < deadline, "still waiting for a report that never comes"
            assert await _post(daemon, client, token, beat) == 200
            await asyncio.sleep(0.2)
        shown = (await client.call("GET", f"{EXP}/jobs/{name}"))[1]["properties"]
        if name == "lost-report":
            assert shown["retries"] == {"node_lost": 1}  # queued again: the node's failure
            assert shown["executionInfo"]["errors"][-1]["code"] == "task_vanished"
            await client.call("POST", f"{EXP}/jobs/{name}/terminate")
        else:
            assert shown["state"] == "failed"  # the termination ended


async def test_a_local_cluster_of_another_shape_than_its_nodes_is_reported(tmp_path, monkeypatch):
    """A local cluster made by an earlier version (Standard_NC24s_v3, 4 GPUs a node) while
    the configuration now gives its nodes 2: the daemon says so at start."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state = tmp_path / "state"
    daemon = await start_daemon(state)
    try:
        async with admin_client(daemon) as client:
            for path in ("/v1/workspaces/default", EXP):
                assert (await client.call("PUT", path, {}))[0] == 201
            old = {
                "vmSize": "Standard_NC24s_v3",
                "scaleSettings": {"manual": {"targetNodeCount": 0}},
            }
            await client.call("PUT", "/v1/workspaces/default/clusters/local", old)
    finally:
        await daemon.stop()
    config_file = tmp_path / "batchd.toml"
    config_file.write_text("[local]\nnodes = 0\ngpus_per_node = 2\n")
    with info_logs() as logged:
        daemon = await start_daemon(state, config_file, local_nodes=1)
        await daemon.stop()
    [shape] = [e for e in logged if e["event"] == "local.cluster_shape"]
    assert (shape["vm_size"], shape["gpus"], shape["gpus_per_node"]) == ("Standard_NC24s_v3", 4, 2)
    [count] = [e for e in logged if e["event"] == "local.cluster_nodes"]  # the log's count rules
    assert (count["target_node_count"], count["nodes"]) == (0, 1) and "resize" in count["note"]


async def test_the_daemon_forgets_node_ids_it_has_no_node_for(local):
    daemon, _client = local
    service = daemon.nodes
    service.seen["ghost"] = time.monotonic() - 120  # a removed node, or a stranger, long silent
    service.outbox["ghost"] = [{"type": "KillTask"}]
    service.pollers["ghost"] = 1
    service.unlisted["ghost"] = {("j", 1, 0): time.monotonic()}
    await service.sweep()
    assert "ghost" not in service.seen and "ghost" not in service.outbox
    assert "ghost" not in service.pollers and "ghost" not in service.unlisted
    assert {"local-0", "local-1"} <= set(service.seen)  # the real ones are kept


async def test_a_running_job_past_its_wall_clock_is_killed_with_that_reason(local):
    daemon, client = local
    await _run(client, "slow", "sleep 600", constraints={"maxWallClockTime": "00:00:01"})
    job = await _ended(daemon, client, "slow", seconds=30)
    error = job["properties"]["executionInfo"]["errors"][-1]
    assert job["properties"]["state"] == "failed"
    assert error["code"] == "terminated" and "maxWallClockTime of 1 s exceeded" in error["message"]


async def test_an_exit_code_failure_is_retried_up_to_max_retries(local):
    daemon, client = local
    await _run(client, "flaky", "echo try $AZ_BATCHAI_JOB_ATTEMPT; exit 3", maxRetries=1)
    job = await _ended(daemon, client, "flaky")
    assert job["properties"]["state"] == "failed"
    assert (job["properties"]["attempt"], job["properties"]["retries"]) == (2, {"exit_code": 1})
    assert [_out(daemon, "flaky", attempt=a) for a in (1, 2)] == ["try 1\n", "try 2\n"]


async def test_the_shared_agent_token_of_earlier_versions_is_revoked(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state = tmp_path / "state"
    join = protocol.message("Register", "local-9", 1, cluster="default/local", gpus=1)
    daemon = await start_daemon(state)  # as an earlier version left it: one unbound token
    try:
        shared = await token_file(daemon.control, state / "agent.token", "agent",
                                  "local-agents", "batchd:serve")  # fmt: skip
        async with admin_client(daemon) as client:  # it is taken (there is no cluster yet)
            assert await _post(daemon, client, shared, join) == 400
    finally:
        await daemon.stop()
    daemon = await start_daemon(state, local_nodes=1)
    try:
        assert not (state / "agent.token").exists()
        await _until(lambda: _ready_nodes(daemon) == 1, 30)  # on a token of its own
        async with admin_client(daemon) as client:
            assert await _post(daemon, client, shared, join) == 401  # now it is refused
    finally:
        await daemon.stop()


async def test_the_token_of_a_local_node_that_never_registered_goes_at_the_next_start(
    tmp_path, monkeypatch
):
    """An agent stopped before it registered, by a daemon stopped then too, leaves a token
    made for a node the cluster does not have: revoked, and its file removed, at start."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    state = tmp_path / "state"
    daemon = await start_daemon(state, local_nodes=1)
    try:
        (state / "nodes/local-5").mkdir(parents=True)
        stray = await token_file(daemon.control, state / "nodes/local-5/agent.token", "agent",
                                 "local-agent-local-5", "batchd:serve", "local-5")  # fmt: skip
        await _until(lambda: _ready_nodes(daemon) == 1, 30)
        own = _local_token(daemon, "local-0")
    finally:
        await daemon.stop()
    daemon = await start_daemon(state, local_nodes=1)
    try:
        await _until(lambda: _ready_nodes(daemon) == 1, 30)
        beat = protocol.message("Heartbeat", "local-5", 1, running=[])
        async with admin_client(daemon) as client:
            assert await _post(daemon, client, stray, beat) == 401
        assert not (state / "nodes/local-5/agent.token").exists()
        assert _local_token(daemon, "local-0") == own  # a node the cluster has keeps its own
        async with admin_client(daemon) as client:  # a user's own, named alike: not the daemon's
            users = await make_token(client, "local-agent-local-0-mine", "agent", node="local-0")
    finally:
        await daemon.stop()
    daemon = await start_daemon(state, local_nodes=0)  # local nodes turned off: no agent runs
    try:
        beat = protocol.message("Heartbeat", "local-0", 1, running=[])
        async with admin_client(daemon) as client:
            assert await _post(daemon, client, own, beat) == 401
            assert await _post(daemon, client, users, beat) != 401  # (409: not registered)
        assert not (state / "nodes/local-0/agent.token").exists()
    finally:
        await daemon.stop()


async def test_deleting_the_local_cluster_drains_its_nodes_then_deletes_it(local):
    daemon, client = local
    models = daemon.models.models
    agents = dict(daemon.providers[0].processes)
    await _run(client, "busy", "sleep 600")
    await _until(lambda: newest_job(models, "busy").state == "running", 30)
    busy_node = newest_job(models, "busy").tasks[0][0]
    cluster = "/v1/workspaces/default/clusters/local"
    assert (await client.call("DELETE", cluster))[0] == 202  # accepted: it has nodes
    idle = "local-1" if busy_node == "local-0" else "local-0"
    await _until(lambda: idle not in models.nodes and agents[idle].returncode is not None, 30)
    await _until(lambda: models.nodes[busy_node].state == "leaving", 30)  # its job runs on
    status, body = await client.call("GET", cluster)
    assert status == 200 and body["properties"]["provisioningState"] == "deleting"
    fleet = await make_token(client, "fleet-agent", "agent")  # no new node joins it now
    join = protocol.message("Register", "local-9", 1, cluster="default/local", gpus=1)
    assert await _post(daemon, client, fleet, join) == 400
    await client.call("POST", f"{EXP}/jobs/busy/terminate")
    await _until(lambda: "default/local" not in models.cluster_ids, 30)  # emptied, then gone
    assert models.nodes == {} and agents[busy_node].returncode is not None
    assert (await client.call("GET", cluster))[0] == 404


async def test_an_attempt_requeued_while_its_start_is_prepared_is_not_started(local, monkeypatch):
    """The daemon reads a job's spec before it sends StartTask. If the attempt is requeued
    meanwhile (its node was lost), none of it is started: the next attempt runs, once, and
    the daemon goes on (it used to fail with ZeroDivisionError and stop)."""
    daemon, client = local
    models = daemon.models.models
    reading, gate = asyncio.Event(), asyncio.Event()
    read_spec = node_service._job_spec

    async def held(store, job):
        reading.set()
        await gate.wait()
        return await read_spec(store, job)

    monkeypatch.setattr(node_service, "_job_spec", held)
    await _run(client, "racy", "echo attempt $AZ_BATCHAI_JOB_ATTEMPT")
    await asyncio.wait_for(reading.wait(), 30)
    node_id = newest_job(models, "racy").tasks[0][0]
    await daemon.control.run(lambda m: retries.node_lost(m, node_id))  # as when it is lost
    assert newest_job(models, "racy").tasks == []
    monkeypatch.setattr(node_service, "_job_spec", read_spec)
    gate.set()
    job = await _ended(daemon, client, "racy")
    assert job["properties"]["state"] == "succeeded" and not daemon.stopping.is_set()
    assert job["properties"]["attempt"] == 2 and _out(daemon, "racy", attempt=2) == "attempt 2\n"
    assert not (daemon.state_dir / "mounts/logs/default/default/racy/1").exists()  # never ran


async def test_an_attempt_terminated_before_it_was_dispatched_ends_once_its_node_reports(
    local, monkeypatch
):
    """An attempt placed and then terminated before the daemon sent its StartTask (another
    job's start held the dispatch up, or another daemon placed it) holds its GPUs only until
    its node's heartbeats show that it never ran."""
    daemon, client = local
    models = daemon.models.models
    reading, gate = asyncio.Event(), asyncio.Event()
    read_spec = node_service._job_spec

    async def held(store, job):
        if job.name == "first":
            reading.set()
            await gate.wait()
        return await read_spec(store, job)

    monkeypatch.setattr(node_service, "_job_spec", held)
    await _run(client, "first", "true")
    await asyncio.wait_for(reading.wait(), 30)  # the dispatch waits on its spec
    await _run(client, "second", "sleep 600")
    await daemon.control.run(lambda m: planner.plan(m, time.time_ns() // 1000))  # a cycle
    assert newest_job(models, "second").state == "scheduled"
    assert (await client.call("POST", f"{EXP}/jobs/second/terminate"))[0] in (200, 202)
    gate.set()
    second = await _ended(daemon, client, "second", seconds=30)
    assert second["properties"]["state"] == "failed" and second["properties"]["tasks"] == []
    assert not (daemon.state_dir / "mounts/logs/default/default/second").exists()  # never ran


async def test_a_job_whose_start_meets_an_unreachable_log_starts_at_a_later_cycle(
    local, monkeypatch
):
    daemon, client = local
    read_spec = node_service._job_spec
    failures = []

    async def flaky(store, job):
        if not failures:
            failures.append(job.job_id)
            raise errors.StoreUnavailable("log unreachable (for a moment)")
        return await read_spec(store, job)

    monkeypatch.setattr(node_service, "_job_spec", flaky)
    await _run(client, "patient", "echo started")
    job = await _ended(daemon, client, "patient")
    assert failures and job["properties"]["state"] == "succeeded"  # not failed for good
    assert job["properties"]["attempt"] == 1 and _out(daemon, "patient") == "started\n"


async def test_an_agent_that_stops_during_its_setup_task_stops_that_too(local):
    daemon, client = local
    pid_file = daemon.state_dir / "setup.pid"
    setup = {"commandLine": f"echo $$ > {pid_file}; exec sleep 600",
             "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT"}  # fmt: skip
    cluster = {"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": setup},
               "scaleSettings": {"manual": {"targetNodeCount": 1}}}  # fmt: skip
    assert (await client.call("PUT", "/v1/workspaces/default/clusters/slow", cluster))[0] == 201
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
        "--token-file", str(await _node_token(client, daemon, "slow-0")), "--node-id", "slow-0",
        "--cluster", "default/slow", "--gpus", "1",
        "--work-dir", str(daemon.state_dir / "nodes/slow-0"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
        setup_pid = int(pid_file.read_text())
        assert daemon.models.models.nodes["slow-0"].state == "preparing"
    finally:
        agent.terminate()
        await agent.wait()
    await _until(lambda: not alive(setup_pid), 15)  # not left running without its agent


async def test_a_dead_agents_setup_task_is_lost_with_it_and_killed_by_the_next_agent(local):
    daemon, client = local
    pids = {name: daemon.state_dir / f"{name}.pid" for name in ("shell", "child", "detached")}
    setup = {"commandLine": f"echo $$ > {pids['shell']}; "
                            f"sh -c 'echo $$ > {pids['child']}; exec sleep 600' & "
                            f"setsid sh -c 'echo $$ > {pids['detached']}; exec sleep 601' & wait",
             "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT"}  # fmt: skip
    cluster = {"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": setup},
               "scaleSettings": {"manual": {"targetNodeCount": 1}}}  # fmt: skip
    assert (await client.call("PUT", "/v1/workspaces/default/clusters/slow", cluster))[0] == 201
    token = await _node_token(client, daemon, "slow-0")

    async def agent() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
            "--token-file", str(token), "--node-id", "slow-0", "--cluster", "default/slow",
            "--gpus", "1", "--work-dir", str(daemon.state_dir / "nodes/slow-0"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    def written() -> bool:
        return all(p.exists() and p.read_text().strip() for p in pids.values())

    first = await agent()
    await _until(written, 30)
    left = [int(p.read_text()) for p in pids.values()]
    for p in pids.values():
        p.unlink()
    nodes = daemon.models.models.nodes
    assert nodes["slow-0"].state == "preparing"
    first.kill()  # SIGKILL: its setup task runs on, without it
    await first.wait()
    await _until(lambda: nodes["slow-0"].state == "lost", 30)  # not "preparing" for ever
    second = await agent()
    try:
        await _until(lambda: not any(alive(pid) for pid in left), 30)  # the old setup is gone
        await _until(written, 30)  # and it runs anew, once
        assert nodes["slow-0"].state == "preparing"
    finally:
        second.terminate()
        await second.wait()


async def test_an_exec_ends_with_its_caller_and_answers_when_its_node_is_lost(local):
    daemon, client = local
    agent = await _busy_node(daemon, client, "ex")
    try:
        pid_file = daemon.state_dir / "beside.pid"
        url = f"{daemon.url}{EXP}/jobs/busy/exec"
        body = {"command": f"echo $$ > {pid_file}; echo started; exec sleep 300"}
        async with (
            aiohttp.ClientSession(headers=client.headers) as session,
            session.post(url, json=body) as answer,
        ):
            assert json.loads(await answer.content.readline()) == {"stdout": "started\n"}
            beside = int(pid_file.read_text())
        await _until(lambda: not alive(beside), 15)  # its caller went: it ended

        agent.send_signal(signal.SIGSTOP)  # the node goes silent, then lost
        async with (
            aiohttp.ClientSession(headers=client.headers) as session,
            session.post(url, json={"command": "echo never"}) as answer,
        ):
            lines = await asyncio.wait_for(_json_lines(answer), 60)  # not a silent 600 s
        assert lines[-1]["exitCode"] is None
        assert lines[-1]["error"]["code"] == "node_unreachable"
        assert "ex-0 was lost" in lines[-1]["error"]["message"]
    finally:
        agent.send_signal(signal.SIGCONT)
        agent.terminate()
        await agent.wait()


async def test_an_exec_is_stopped_and_broken_off_when_its_token_is_revoked(local):
    """An exec runs commands in the job's environment, secrets included: a revoked token's
    exec stops there, as its next request would fail."""
    daemon, client = local
    agent = await _busy_node(daemon, client, "rv")
    try:
        operator = await make_token(client, "ops", "operator")
        _status, tokens = await client.call("GET", "/v1/tokens")
        [token_id] = [t["id"] for t in tokens["value"] if t["name"] == "ops"]
        pid_file = daemon.state_dir / "counting.pid"
        body = {"command": f"echo $$ > {pid_file}; for i in $(seq 60); do echo $i; sleep 0.2; done"}
        headers = {"Authorization": f"Bearer {operator}"}
        rest = b""
        async with (
            aiohttp.ClientSession(headers=headers) as session,
            session.post(f"{daemon.url}{EXP}/jobs/busy/exec", json=body) as answer,
        ):
            assert json.loads(await answer.content.readline()) == {"stdout": "1\n"}
            counting = int(pid_file.read_text())
            assert (await client.call("DELETE", f"/v1/tokens/{token_id}"))[0] in (200, 202, 204)
            with pytest.raises(aiohttp.ClientPayloadError):  # unfinished, not a clean end
                async with asyncio.timeout(10):
                    while chunk := await answer.content.readany():
                        rest += chunk
        assert b"exitCode" not in rest and b"60" not in rest
        await _until(lambda: not alive(counting), 15)  # the command was stopped
    finally:
        agent.terminate()
        await agent.wait()


async def test_an_agent_whose_token_is_refused_stops_and_says_why(local, tmp_path):
    daemon, _client = local
    token = tmp_path / "revoked.token"
    token.write_text("bd_not-a-token-the-daemon-knows")
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
        "--token-file", str(token), "--node-id", "stray-0", "--cluster", "default/local",
        "--gpus", "1", "--work-dir", str(tmp_path / "work"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(agent.communicate(), 30)  # not retrying for ever
    assert agent.returncode == 1
    refused = [json.loads(line) for line in err.decode().splitlines() if "agent.refused" in line]
    assert refused and "401" in refused[0]["error"] and "--token-file" in refused[0]["hint"]


async def test_an_agent_asking_to_join_a_cluster_there_is_not_stops_and_says_why(local, tmp_path):
    daemon, client = local
    token = await make_token(client, "n-nope", "agent", node="n-nope")
    (tmp_path / "agent.token").write_text(token)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
        "--token-file", str(tmp_path / "agent.token"), "--node-id", "n-nope",
        "--cluster", "default/nope", "--gpus", "1", "--work-dir", str(tmp_path / "work"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(agent.communicate(), 30)  # not retrying for ever
    assert agent.returncode == 1
    refused = [json.loads(line) for line in err.decode().splitlines() if "agent.refused" in line]
    assert refused and "no cluster 'default/nope'" in refused[0]["error"], err.decode()[-2000:]
