"""The docker runtime against a real Docker Engine API (podman), through a recording proxy in
front of the engine's socket, so the exact create request batchd sends is asserted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile

import aiodocker
import aiohttp
import pytest

from batchd.scheduler import protocol
from batchd.scheduler.containers import WRAPPER, ContainerTask, remove_node_containers
from tests.integration.conftest import (
    ENGINE,
    ENTRYPOINT_IMAGE,
    IMAGE,
    USER_IMAGE,
    admin_client,
    make_token,
    newest_job,
    start_daemon,
)
from tests.integration.test_agents import _post, _until

EXP = "/v1/workspaces/default/experiments/default"


@pytest.fixture
async def box(tmp_path, proxy, monkeypatch):
    """A daemon, a cluster `box` and one agent on it with the docker runtime via the proxy
    (daemon, client, proxy, the agent's process; its log is tmp_path / "agent.log")."""
    host = f"unix://{proxy.socket_path}"
    async with _box(tmp_path, monkeypatch, host) as (daemon, client, agent):
        yield daemon, client, proxy, agent


class Forwarder:
    """A socat in front of the engine's socket: `cut()` ends it and its connections (as an
    engine's restart does, or the end of a proxy to its socket), `start()` brings it back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server: asyncio.Server | None = None
        self.ends: set[asyncio.StreamWriter] = set()
        self.hung = False  # `hang()`: what either side sends is dropped (an engine hanging)

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._forward, self.path)

    async def cut(self) -> None:
        self.server.close()
        self.drop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def drop(self) -> None:
        """Break the connections open now; new ones are still forwarded."""
        for end in self.ends:
            end.transport.abort()

    def hang(self) -> None:
        """From now on, connections are taken and kept but nothing goes through: requests
        are never answered (an engine that hangs)."""
        self.hung = True

    async def _forward(self, reader, writer) -> None:
        try:
            engine_reader, engine_writer = await asyncio.open_unix_connection(ENGINE)
        except OSError:
            writer.close()
            return
        self.ends |= {writer, engine_writer}

        async def pump(source, sink) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await source.read(65536):
                    if self.hung:
                        continue
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, engine_writer), pump(engine_reader, writer))
        self.ends -= {writer, engine_writer}


@pytest.fixture
async def cuttable(tmp_path, engine, monkeypatch):
    """As `box`, its agent reaching the engine through a Forwarder (daemon, client,
    forwarder, the agent's process); it attaches no GPU (the engine here has none)."""
    forwarder = Forwarder(f"{tempfile.mkdtemp(prefix='batchd-cut-')}/engine.sock")
    await forwarder.start()
    try:
        host = f"unix://{forwarder.path}"
        async with _box(tmp_path, monkeypatch, host, gpu_attach="never") as (d, c, agent):
            yield d, c, forwarder, agent
    finally:
        await forwarder.cut()
        shutil.rmtree(os.path.dirname(forwarder.path), ignore_errors=True)


@contextlib.asynccontextmanager
async def _box(tmp_path, monkeypatch, docker_host: str, gpu_attach: str = "always"):
    """A daemon, a cluster `box` and its agent box-0 using the engine at `docker_host`."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    daemon = await start_daemon(tmp_path / "state")
    agent = None
    log = (tmp_path / "agent.log").open("wb")
    try:
        async with admin_client(daemon) as client:
            await client.call("PUT", "/v1/workspaces/default", {})
            await client.call("PUT", EXP, {})
            cluster = {"vmSize": "Standard_NC24s_v3",
                       "scaleSettings": {"manual": {"targetNodeCount": 1}}}  # fmt: skip
            await client.call("PUT", "/v1/workspaces/default/clusters/box", cluster)
            token_file = tmp_path / "agent.token"
            token_file.write_text(await make_token(client, "box-agent", "agent", node="box-0"))
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", daemon.url,
                "--token-file", str(token_file), "--node-id", "box-0", "--cluster", "default/box",
                "--gpus", "4", "--runtimes", "docker,process", "--gpu-attach", gpu_attach,
                "--docker-host", docker_host, "--work-dir", str(tmp_path / "n"),
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
            nodes = daemon.models.models.nodes
            await _until(lambda: "box-0" in nodes and nodes["box-0"].state == "ready", 30)
            yield daemon, client, agent
    finally:
        if agent is not None and agent.returncode is None:
            agent.terminate()
            await agent.wait()
        log.close()
        await daemon.stop()


async def _ended(daemon, name: str) -> None:
    models = daemon.models.models

    def done() -> bool:
        job = newest_job(models, name)
        return job is not None and job.state in ("succeeded", "failed")

    await _until(done, 60)


async def _containers(job_id: str) -> list:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(ENGINE)) as s:
        filters = json.dumps({"label": [f"batchd.job={job_id}"]})
        query = {"all": "1", "filters": filters}
        async with s.get("http://d/v1.41/containers/json", params=query) as r:
            return await r.json()


COMMAND = (
    'echo "job=$AZ_BATCHAI_JOB_NAME gpus=$CUDA_VISIBLE_DEVICES"; '
    'ls "$AZ_BATCHAI_MOUNT_ROOT" >/dev/null && echo mounted; echo oops >&2; exit 3'
)


async def _agent_stays(daemon, client, agent, incarnation: int) -> None:
    """After a job's bad input: the agent is the same process, its node ready with the same
    incarnation, and it runs the next job."""
    nodes = daemon.models.models.nodes
    assert agent.returncode is None and nodes["box-0"].incarnation == incarnation
    assert (await client.call("PUT", f"{EXP}/jobs/next", _box_job("echo next")))[0] == 201
    await _ended(daemon, "next")
    assert newest_job(daemon.models.models, "next").state == "succeeded"
    assert agent.returncode is None and nodes["box-0"].incarnation == incarnation
    assert nodes["box-0"].state == "ready"


def _box_job(command: str, image: str = IMAGE) -> dict:
    """A one-GPU container job on the cluster `box`."""
    return {"cluster": "box", "nodeCount": 1, "gpusPerNode": 1,
            "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
            "containerSettings": {"imageSourceRegistry": {"image": image}},
            "customToolkitSettings": {"commandLine": command}}  # fmt: skip


async def test_a_container_job_whose_output_path_holds_a_colon_runs(box, tmp_path):
    """Paths are bound as mounts of their own (Source, Target), not `host:container` strings
    that a ':' in a path would cut in the wrong place."""
    daemon, client, proxy, _agent = box
    prefix = tmp_path / "models:v2"
    job = {**_box_job("echo weights > $AZ_BATCHAI_OUTPUT_MODEL/w.txt"),
           "outputDirectories": [{"id": "MODEL", "pathPrefix": str(prefix)}]}  # fmt: skip
    assert (await client.call("PUT", f"{EXP}/jobs/colon", job))[0] == 201
    await _ended(daemon, "colon")
    _status, answer = await client.call("GET", f"{EXP}/jobs/colon")
    assert answer["properties"]["state"] == "succeeded", answer["properties"]["executionInfo"]
    [written] = prefix.rglob("w.txt")
    assert written.read_text() == "weights\n"
    (create,) = proxy.creates()
    where = str(written.parent)
    assert {"Type": "bind", "Source": where, "Target": where, "ReadOnly": False} in (
        create["HostConfig"]["Mounts"]
    )


async def test_an_input_under_the_mount_root_is_read_only_in_the_container(box):
    """The usual layout: the input lies on a share under the (writable) mount root. The job
    reads it, cannot change it, and writes its output beside it."""
    daemon, client, proxy, _agent = box
    data = daemon.cfg.mounts / "afs" / "data"
    data.mkdir(parents=True)
    (data / "in.txt").write_text("input\n")
    command = ('cat "$AZ_BATCHAI_INPUT_DATA/in.txt"; '
               '{ echo changed > "$AZ_BATCHAI_INPUT_DATA/in.txt"; } 2>/dev/null || echo kept; '
               'touch "$AZ_BATCHAI_INPUT_DATA/new" 2>/dev/null || echo refused; '
               'echo out > "$AZ_BATCHAI_OUTPUT_MODEL/o.txt"')  # fmt: skip
    job = {
        **_box_job(command),
        "inputDirectories": [{"id": "DATA", "path": "$AZ_BATCHAI_MOUNT_ROOT/afs/data"}],
        "outputDirectories": [{"id": "MODEL", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/afs"}],
    }
    assert (await client.call("PUT", f"{EXP}/jobs/reader", job))[0] == 201
    await _ended(daemon, "reader")
    _status, answer = await client.call("GET", f"{EXP}/jobs/reader")
    assert answer["properties"]["state"] == "succeeded", answer["properties"]["executionInfo"]
    out = daemon.state_dir / "mounts/logs/default/default/reader/1/stdouterr/stdout.txt"
    assert out.read_text() == "input\nkept\nrefused\n"
    assert sorted(p.name for p in data.iterdir()) == ["in.txt"]
    assert (data / "in.txt").read_text() == "input\n"
    [written] = (daemon.cfg.mounts / "afs").rglob("o.txt")
    assert written.read_text() == "out\n"
    (create,) = proxy.creates()
    assert {"Type": "bind", "Source": str(data), "Target": str(data), "ReadOnly": True} in (
        create["HostConfig"]["Mounts"]
    )


async def test_a_container_job_listens_on_the_nodes_own_network(box):
    """A task's addresses and ports (MASTER_ADDR:MASTER_PORT and the like) are its node's:
    a server in the container is reached at the node's address, as another task would."""
    daemon, client, _proxy, _agent = box
    with socket.socket() as probe:  # a port free on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = _box_job(f"nc -l -p {port}")
    assert (await client.call("PUT", f"{EXP}/jobs/server", job))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "server").state == "running", 60)
    for _ in range(100):  # until the server in the container listens
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("nothing listened on the node's port")
    writer.write(b"hello from a peer\n")
    await writer.drain()
    writer.close()
    await _ended(daemon, "server")
    out = daemon.state_dir / "mounts/logs/default/default/server/1/stdouterr/stdout.txt"
    assert out.read_text() == "hello from a peer\n"


async def test_a_container_job_runs_with_its_environment_mounts_labels_and_gpus(box, tmp_path):
    daemon, client, proxy, _agent = box
    job = {"cluster": "box", "nodeCount": 1, "gpusPerNode": 2,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "containerSettings": {"imageSourceRegistry": {"image": IMAGE}, "shmSize": "64m"},
           "customToolkitSettings": {"commandLine": COMMAND}}  # fmt: skip
    status, _ = await client.call("PUT", f"{EXP}/jobs/boxed", job)
    assert status == 201
    await _ended(daemon, "boxed")
    _status, answer = await client.call("GET", f"{EXP}/jobs/boxed")
    assert answer["properties"]["state"] == "failed"
    assert answer["properties"]["executionInfo"]["exitCode"] == 3
    out = daemon.state_dir / "mounts/logs/default/default/boxed/1/stdouterr"
    assert (out / "stdout.txt").read_text() == "job=boxed gpus=0,1\nmounted\n"
    assert (out / "stderr.txt").read_text() == "oops\n"
    (create,) = proxy.creates()
    job_id = newest_job(daemon.models.models, "boxed").job_id
    mounts = str(daemon.cfg.mounts)
    work = str(daemon.state_dir / f"nodes/work/{job_id}.1.0")
    temp = str(daemon.state_dir / f"nodes/temp/{job_id}.1")
    env = {
        "AZ_BATCHAI_EXPERIMENT_NAME": "default", "AZ_BATCHAI_JOB_ATTEMPT": "1",
        "AZ_BATCHAI_JOB_ID": job_id, "AZ_BATCHAI_JOB_MOUNT_ROOT": f"{mounts}/jobs/{job_id}",
        "AZ_BATCHAI_JOB_NAME": "boxed", "AZ_BATCHAI_JOB_TEMP": temp,
        "AZ_BATCHAI_MOUNT_ROOT": mounts, "AZ_BATCHAI_MPI_HOST_FILE": f"{temp}/mpi-hostfile",
        "AZ_BATCHAI_NUM_GPUS": "2", "AZ_BATCHAI_SHARED_JOB_TEMP": f"{mounts}/shared/{job_id}",
        "AZ_BATCHAI_STDOUTERR_DIR": str(out), "AZ_BATCHAI_TASK_INDEX": "0",
        "AZ_BATCHAI_WORKSPACE_NAME": "default", "CUDA_VISIBLE_DEVICES": "0,1",
    }  # fmt: skip
    assert sorted(create["Env"]) == sorted(f"{k}={v}" for k, v in env.items())
    bind = [{"Type": "bind", "Source": p, "Target": p, "ReadOnly": False}
            for p in (mounts, temp, work)]  # fmt: skip
    assert create == {  # the whole request: nothing more (no privilege, no other mount)
        "Image": IMAGE,
        # the wrapper, its output files, the command; nothing of the image's CMD either
        "Entrypoint": ["/bin/sh", "-c", WRAPPER, f"{out}/stdout.txt", f"{out}/stderr.txt",
                       COMMAND],
        "Cmd": [],
        "Env": create["Env"],  # (its order is not the point: checked above)
        "WorkingDir": work,
        "Labels": {"batchd": "task", "batchd.node": "box-0", "batchd.job": job_id,
                   "batchd.workdir": str(tmp_path / "n"),  # the agent's
                   "batchd.attempt": "1", "batchd.task": "0"},
        "HostConfig": {
            "Mounts": bind,
            "ShmSize": 64 * 1024 * 1024,
            "NetworkMode": "host",  # the job's addresses and ports are the node's
            "Devices": [  # podman: CDI names, not DeviceRequests
                {"PathOnHost": f"nvidia.com/gpu={g}", "PathInContainer": "",
                 "CgroupPermissions": "rwm"} for g in (0, 1)
            ],
        },
    }  # fmt: skip
    assert await _containers(job_id) == []  # removed after it exited


async def test_an_image_that_runs_as_a_user_of_its_own_writes_its_output_and_scratch(box):
    """USER trainer (a name the image's /etc/passwd gives uid 1000): the task's output files,
    work directory, job temp and output directories are given to that user."""
    daemon, client, _proxy, _agent = box
    command = ('id -u; touch here "$AZ_BATCHAI_JOB_TEMP/scratch" "$AZ_BATCHAI_OUTPUT_MODEL/m" '
               "&& echo wrote")  # fmt: skip
    model = {"id": "MODEL", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/out"}
    job = {**_box_job(command, USER_IMAGE), "jobPreparation": {"commandLine": "id -un"},
           "outputDirectories": [model]}  # fmt: skip
    assert (await client.call("PUT", f"{EXP}/jobs/asuser", job))[0] == 201
    await _ended(daemon, "asuser")
    _status, answer = await client.call("GET", f"{EXP}/jobs/asuser")
    assert answer["properties"]["state"] == "succeeded", answer["properties"]["executionInfo"]
    out = daemon.state_dir / "mounts/logs/default/default/asuser/1/stdouterr"
    assert (out / "stdout.txt").read_text() == "1000\nwrote\n"
    assert (out / "stdout-prep.txt").read_text() == "trainer\n"


async def test_output_the_container_cannot_open_fails_the_task_saying_why(box):
    daemon, client, _proxy, agent = box
    incarnation = daemon.models.models.nodes["box-0"].incarnation
    out = daemon.state_dir / "mounts/logs/default/default/blocked/1/stdouterr"
    (out / "stdout.txt").mkdir(parents=True)  # a directory where the output file goes
    assert (await client.call("PUT", f"{EXP}/jobs/blocked", _box_job("echo hi")))[0] == 201
    await _ended(daemon, "blocked")
    _status, answer = await client.call("GET", f"{EXP}/jobs/blocked")
    error = answer["properties"]["executionInfo"]["errors"][-1]
    assert answer["properties"]["executionInfo"]["exitCode"] == 126
    assert error["code"] == "output_unwritable" and "stdout.txt" in error["message"]
    await _agent_stays(daemon, client, agent, incarnation)


async def test_an_images_own_entrypoint_does_not_replace_the_jobs_command(box):
    daemon, client, _proxy, _agent = box
    job = _box_job("echo from the job; exit 4", ENTRYPOINT_IMAGE)
    assert (await client.call("PUT", f"{EXP}/jobs/ep", job))[0] == 201
    await _ended(daemon, "ep")
    out = daemon.state_dir / "mounts/logs/default/default/ep/1/stdouterr"
    assert (out / "stdout.txt").read_text() == "from the job\n"  # neither "entrypoint:" nor CMD
    assert newest_job(daemon.models.models, "ep").exit_code == 4


async def test_a_command_the_containers_shell_cannot_run_is_told_in_its_words(box):
    daemon, client, _proxy, agent = box
    incarnation = daemon.models.models.nodes["box-0"].incarnation
    assert (await client.call("PUT", f"{EXP}/jobs/typo", _box_job("echo ok; trian.py")))[0] == 201
    await _ended(daemon, "typo")
    _status, answer = await client.call("GET", f"{EXP}/jobs/typo")
    [error] = answer["properties"]["executionInfo"]["errors"]
    # the shell's words (busybox has no bash), not the wrapper's paths or lines
    assert error == {
        "code": "cannot_start",
        "at": error["at"],
        "message": "task 0 exited with 127 (command not found): /bin/sh: trian.py: not found",
    }
    await _agent_stays(daemon, client, agent, incarnation)


async def test_terminate_stops_the_container_and_a_missing_image_fails_clearly(box):
    daemon, client, _proxy, agent = box
    incarnation = daemon.models.models.nodes["box-0"].incarnation
    job = _box_job("echo started; sleep 600")
    await client.call("PUT", f"{EXP}/jobs/sleepy", job)
    models = daemon.models.models
    await _until(lambda: newest_job(models, "sleepy").state
                 == "running", 60)  # fmt: skip
    job_id = newest_job(models, "sleepy").job_id
    assert len(await _containers(job_id)) == 1
    await client.call("POST", f"{EXP}/jobs/sleepy/terminate")
    await _ended(daemon, "sleepy")
    assert await _containers(job_id) == []
    missing = {**job, "containerSettings": {"imageSourceRegistry": {
        "image": "localhost/no-such-image:1"}}}  # fmt: skip
    await client.call("PUT", f"{EXP}/jobs/noimage", missing)
    await _ended(daemon, "noimage")
    _status, answer = await client.call("GET", f"{EXP}/jobs/noimage")
    error = answer["properties"]["executionInfo"]["errors"][-1]
    assert error["code"] == "image_unavailable" and "no-such-image" in error["message"]
    await _agent_stays(daemon, client, agent, incarnation)


async def test_the_container_of_an_agent_killed_outright_is_removed_by_its_watchdog(box):
    daemon, client, _proxy, agent = box
    await client.call("PUT", f"{EXP}/jobs/stranded", _box_job("sleep 600"))
    models = daemon.models.models
    await _until(lambda: newest_job(models, "stranded").state == "running", 60)
    job_id = newest_job(models, "stranded").job_id
    assert len(await _containers(job_id)) == 1
    agent.kill()  # SIGKILL: it cannot stop the container itself
    await agent.wait()
    deadline = asyncio.get_running_loop().time() + 20
    while await _containers(job_id):
        assert asyncio.get_running_loop().time() < deadline, "the container was left running"
        await asyncio.sleep(0.2)


async def test_a_private_registry_image_is_pulled_from_its_server_with_its_login(box):
    """The pull names the image on `serverUrl`'s registry and logs in with the job's
    credentials (the engine here cannot reach the registry: the job fails, saying so, and
    its password shows nowhere)."""
    daemon, client, proxy, _agent = box
    job = _box_job("true", image="team/trainer:7")
    job["containerSettings"]["imageSourceRegistry"].update(
        serverUrl="https://registry.invalid:5000/",
        credentials={"username": "builder", "password": "hunter2-registry"},
    )
    assert (await client.call("PUT", f"{EXP}/jobs/private", job))[0] == 201
    await _ended(daemon, "private")
    [(query, header)] = proxy.pulls
    assert query["fromImage"] == "registry.invalid:5000/team/trainer:7"
    login = json.loads(base64.urlsafe_b64decode(header))
    assert {k: login[k] for k in ("username", "password", "serveraddress")} == {
        "username": "builder", "password": "hunter2-registry",
        "serveraddress": "registry.invalid:5000",
    }  # fmt: skip
    _status, answer = await client.call("GET", f"{EXP}/jobs/private")
    error = answer["properties"]["executionInfo"]["errors"][-1]
    assert error["code"] == "image_unavailable"
    assert "registry.invalid:5000/team/trainer:7" in error["message"]
    assert "hunter2" not in json.dumps(answer)
    _status, history = await client.call("GET", f"{EXP}/jobs/private/history")
    events = [row["event"] for row in history["value"][0]["timeline"]]
    assert "JobPreparing" in events  # while its image was being pulled


async def test_terminate_gives_a_program_in_the_container_its_sigterm_grace(box, tmp_path):
    daemon, client, _proxy, _agent = box
    saved = daemon.cfg.mounts / "saved"
    program = (f"sh -c 'trap \"sleep 1; echo checkpoint > {saved}; exit 0\" TERM; "
               f"while :; do sleep 0.1; done' & echo started; wait")  # fmt: skip
    job = _box_job(program)
    status, _ = await client.call("PUT", f"{EXP}/jobs/trainer", job)
    assert status == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "trainer").state == "running", 60)
    await asyncio.sleep(0.5)  # its trap is set
    await client.call("POST", f"{EXP}/jobs/trainer/terminate")
    await _ended(daemon, "trainer")
    assert saved.read_text() == "checkpoint\n"  # the shell's child had its grace
    assert await _containers(newest_job(models, "trainer").job_id) == []


@pytest.fixture
async def in_container(proxy):
    """A ContainerTask of a running container (the test image, sleeping)."""
    docker = aiodocker.Docker(url=f"unix://{ENGINE}")
    container = await docker.containers.create(config={"Image": IMAGE, "Cmd": ["sleep", "60"]})
    try:
        await container.start()
        task = ContainerTask({}, docker, "podman", attach_gpus=False)
        task.container = container
        yield task
    finally:
        await container.delete(force=True)
        await docker.close()


async def test_exec_runs_in_the_tasks_container(in_container):
    heard: list[dict] = []
    code = await in_container.exec(
        "echo inside; echo err >&2; exit 4", lambda **kw: heard.append(kw)
    )
    joined = {k: "".join(h.get(k, "") for h in heard) for k in ("stdout", "stderr")}
    assert (code, joined) == (4, {"stdout": "inside\n", "stderr": "err\n"})


def _host_processes(cmdline: str) -> list[int]:
    """Processes of this machine (a container's too) running exactly `cmdline`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read().replace(b"\0", b" ").strip() == cmdline.encode():
                        found.append(int(entry))
            except OSError:
                pass
    return found


async def test_an_exec_in_a_container_ends_with_its_caller(in_container):
    """The caller of `job exec` went away (its CancelExec cancels the exec): the command, and
    what it started, end in the container at once, not when the task does."""
    command = "sleep 307 & echo started; sleep 308"
    running = asyncio.create_task(in_container.exec(command, lambda **kw: None))
    await _until(lambda: _host_processes("sleep 307") and _host_processes("sleep 308"), 30)
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await _until(lambda: not _host_processes("sleep 307") + _host_processes("sleep 308"), 10)


async def test_a_lost_engine_connection_ends_the_task_its_container_removed_later(
    cuttable, tmp_path
):
    """The engine's connection breaks while the container runs (a proxy to its socket
    killed): the task ends, reported with `engine_unreachable` and no exit code, instead of
    hanging in the agent; its container is removed once the engine answers again."""
    daemon, client, forwarder, agent = cuttable
    # the node's fault, not the job's: no node-failure retry left, while exit codes have two
    job = {**_box_job("sleep 600"), "maxNodeFailureRetries": 0, "maxRetries": 2}
    assert (await client.call("PUT", f"{EXP}/jobs/cut", job))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "cut").state == "running", 60)
    job_id = newest_job(models, "cut").job_id
    assert len(await _containers(job_id)) == 1
    await forwarder.cut()
    await _ended(daemon, "cut")
    _status, answer = await client.call("GET", f"{EXP}/jobs/cut")
    info = answer["properties"]["executionInfo"]
    assert (answer["properties"]["state"], info.get("exitCode")) == ("failed", None)
    assert info["errors"][-1]["code"] == "engine_unreachable", info
    assert newest_job(models, "cut").retries == {}  # not retried under maxRetries
    assert len(await _containers(job_id)) == 1  # the engine could not be asked yet
    await forwarder.start()
    deadline = asyncio.get_running_loop().time() + 20
    while await _containers(job_id):
        assert asyncio.get_running_loop().time() < deadline, "the container was left behind"
        await asyncio.sleep(0.2)
    assert agent.returncode is None
    assert "never retrieved" not in (tmp_path / "agent.log").read_text()


async def test_a_node_whose_engine_is_away_takes_no_work_until_it_answers_again(cuttable):
    """Its task ends with `engine_unreachable`; the node is suspect, saying why, so the
    retry waits instead of failing on it again (which would spend the job's node-failure
    retries in a second); once the engine answers, the node is ready and the retry runs."""
    daemon, client, forwarder, _agent = cuttable
    job = {**_box_job("sleep 6"), "maxNodeFailureRetries": 1}
    assert (await client.call("PUT", f"{EXP}/jobs/away", job))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "away").state == "running", 60)
    await forwarder.cut()
    node = models.nodes["box-0"]
    await _until(lambda: newest_job(models, "away").retries == {"node_lost": 1}, 30)
    await asyncio.sleep(5)  # heartbeats come and go: it stays suspect, the retry waits
    assert (node.state, node.errors[-1]["code"]) == ("suspect", "engine_unreachable"), node
    _status, answer = await client.call("GET", f"{EXP}/jobs/away")
    assert answer["properties"]["state"] == "queued", answer
    await forwarder.start()
    await _until(lambda: node.state == "ready", 30)
    await _ended(daemon, "away")
    _status, answer = await client.call("GET", f"{EXP}/jobs/away")
    assert answer["properties"]["state"] == "succeeded", answer
    assert newest_job(models, "away").attempt == 2


async def test_an_idle_node_whose_engine_is_away_is_suspect_even_through_a_registration(
    cuttable, tmp_path
):
    """No task needs the engine: the agent's own check finds it away, and says so in its
    heartbeats and in a registration made again (after a failed heartbeat, a daemon
    restart), which leaves the node suspect; once the engine answers, the node is ready."""
    daemon, client, forwarder, _agent = cuttable
    node = daemon.models.models.nodes["box-0"]
    await forwarder.cut()
    await _until(lambda: node.state == "suspect", 20)
    assert node.errors[-1]["code"] == "engine_unreachable", node.errors
    again = protocol.message("Register", "box-0", node.incarnation, cluster="default/box",
                             gpus=4, runtimes=["docker", "process"], running=[],
                             engineDown="connection refused")  # fmt: skip
    token = (tmp_path / "agent.token").read_text().strip()
    assert await _post(daemon, client, token, again) == 200
    await asyncio.sleep(2 * 2.0 + 1)  # past the hold after the suspicion: still suspect
    told = [e.type for e in await daemon.store.read_stream("node-box-0")]
    assert "NodeRecovered" not in told[told.index("NodeSuspected") :], told  # not for a moment
    assert node.state == "suspect"
    await forwarder.start()
    await _until(lambda: node.state == "ready", 20)


async def test_an_agent_that_starts_while_its_engine_is_away_takes_no_work(cuttable, tmp_path):
    """A new agent (a restart: a new incarnation) whose first registration says its engine
    does not answer leaves its node suspect, saying why, from that registration on: neither a
    ready node nor a suspect one is ready for a moment."""
    daemon, client, _forwarder, _agent = cuttable
    models = daemon.models.models
    node = models.nodes["box-0"]
    assert node.state == "ready"
    token = (tmp_path / "agent.token").read_text().strip()
    for incarnation in (node.incarnation + 1, node.incarnation + 2):  # ready, then suspect
        started = protocol.message("Register", "box-0", incarnation, cluster="default/box",
                                   gpus=4, runtimes=["docker", "process"], running=[],
                                   engineDown="connection refused")  # fmt: skip
        assert await _post(daemon, client, token, started) == 200  # (the agent it replaces
        assert (node.state, node.incarnation) == ("suspect", incarnation), node  # hears 409)
        assert node.errors[-1]["code"] == "engine_unreachable", node.errors
        told = [e.type for e in await daemon.store.read_stream("node-box-0")]
        after = told[len(told) - 1 - told[::-1].index("NodeRegistered") :]
        assert after[-1] == "NodeSuspected", told
        assert "NodeRecovered" not in after, told
    job = _box_job("true")
    assert (await client.call("PUT", f"{EXP}/jobs/waiting", job))[0] == 201
    await asyncio.sleep(1)
    assert newest_job(models, "waiting").state == "queued"  # nothing placed on the node


async def test_a_lost_node_whose_agent_is_heard_saying_its_engine_is_away_says_why(
    cuttable, tmp_path
):
    """Lost (its agent stopped, or went silent), then heard from again, by the same agent,
    saying its engine does not answer: suspect, with that error for `node show`, said once,
    not lost without a word."""
    daemon, client, _forwarder, agent = cuttable
    node = daemon.models.models.nodes["box-0"]
    agent.terminate()
    await asyncio.wait_for(agent.wait(), 30)
    await _until(lambda: node.state == "lost", 20)
    token = (tmp_path / "agent.token").read_text().strip()
    beat = protocol.message("Heartbeat", "box-0", node.incarnation, running=[],
                            engineDown="connection refused")  # fmt: skip
    for _ in range(3):
        assert await _post(daemon, client, token, beat) == 200
    assert node.state == "suspect", node
    assert node.errors[-1]["code"] == "engine_unreachable", node.errors
    assert "connection refused" in node.errors[-1]["message"]
    told = [e.type for e in await daemon.store.read_stream("node-box-0")]
    assert told[told.index("NodeLost") :] == ["NodeLost", "NodeSuspected"], told
    status, shown = await client.call("GET", "/v1/nodes/box-0")
    assert status == 200 and "engine" in json.dumps(shown), shown


async def test_a_wait_cut_off_while_the_engine_answers_is_made_again(cuttable):
    """The connection of a running container's wait breaks (a proxy's idle timeout, say)
    while the engine still answers: the task runs on and ends with its own exit code."""
    daemon, client, forwarder, _agent = cuttable
    job = {**_box_job("sleep 5; exit 3"), "maxRetries": 0}
    assert (await client.call("PUT", f"{EXP}/jobs/waits", job))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "waits").state == "running", 60)
    await asyncio.sleep(0.5)
    forwarder.drop()
    await _ended(daemon, "waits")
    _status, answer = await client.call("GET", f"{EXP}/jobs/waits")
    info = answer["properties"]["executionInfo"]
    assert (answer["properties"]["state"], info.get("exitCode")) == ("failed", 3), info
    assert "engine_unreachable" not in [e["code"] for e in info.get("errors") or ()], info


async def test_an_agent_stopped_removes_its_tasks_containers_before_it_exits(box, tmp_path):
    daemon, client, _proxy, agent = box
    assert (await client.call("PUT", f"{EXP}/jobs/left", _box_job("sleep 600")))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "left").state == "running", 60)
    job_id = newest_job(models, "left").job_id
    assert len(await _containers(job_id)) == 1
    agent.terminate()  # SIGTERM: it stops its tasks itself (its watchdog does nothing)
    assert await asyncio.wait_for(agent.wait(), 15) == 0
    assert await _containers(job_id) == []  # not left Exited
    log = (tmp_path / "agent.log").read_text()
    assert "Session is closed" not in log and "Traceback" not in log


async def test_an_agent_stopped_while_its_engine_hangs_still_says_it_leaves(
    cuttable, tmp_path, engine_cleanup
):
    """Its kills go unanswered: it gives them up after the grace and tells the daemon it
    leaves, so the node is lost (and its job retried) at once, not after its silence."""
    daemon, client, forwarder, agent = cuttable
    assert (await client.call("PUT", f"{EXP}/jobs/hung", _box_job("sleep 600")))[0] == 201
    models = daemon.models.models
    await _until(lambda: newest_job(models, "hung").state == "running", 60)
    job_id = newest_job(models, "hung").job_id
    engine_cleanup.append(job_id)
    forwarder.hang()
    agent.terminate()
    try:
        assert await asyncio.wait_for(agent.wait(), 25) == 0
    finally:
        if agent.returncode is None:  # (not to hang the fixture's end)
            agent.kill()
            await agent.wait()
    told = [e.data for e in await daemon.store.read_stream("node-box-0") if e.type == "NodeLost"]
    assert told and told[-1]["error"]["code"] == "agent_stopped", told
    log = (tmp_path / "agent.log").read_text()
    assert "agent.kills_unanswered" in log and "leaving_not_told" not in log
    forwarder.hung = False
    await forwarder.cut()  # (its watchdog's removal, through the forwarder, is cut short)


@pytest.fixture
async def engine_cleanup():
    """Containers (by job id, appended) removed after the test, however it ended."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        for container in await _containers(job_id):
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(ENGINE)) as s:
                await s.delete(f"http://d/v1.41/containers/{container['Id']}",
                               params={"force": "1"})  # fmt: skip


async def test_a_nodes_containers_are_told_from_another_installations_node_of_its_id(engine):
    """Two batchd installations on one engine both have a node `local-0`: an agent removes
    the containers of its own work directory, and those of an older agent that named none,
    never the other installation's."""
    node = f"twin-{os.getpid()}"
    docker = aiodocker.Docker(url=f"unix://{ENGINE}")
    made = {}
    try:
        for name, workdir in (("mine", "/srv/a/n"), ("theirs", "/srv/b/n"), ("older", None)):
            labels = {"batchd": "task", "batchd.node": node,
                      **({"batchd.workdir": workdir} if workdir else {})}  # fmt: skip
            config = {"Image": IMAGE, "Cmd": ["sleep", "60"], "Labels": labels}
            made[name] = await docker.containers.create(config=config)
            await made[name].start()
        assert await remove_node_containers(docker, node, "/srv/a/n") == 2
        left = await docker.containers.list(all=True, filters={"label": [f"batchd.node={node}"]})
        assert [c.id for c in left] == [made["theirs"].id]
    finally:
        for container in made.values():
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
        await docker.close()


async def test_the_shared_job_temp_is_there_when_a_task_starts_on_either_runtime(box):
    daemon, client, _proxy, _agent = box
    check = 'test -d "$AZ_BATCHAI_SHARED_JOB_TEMP" && echo shared'
    process = {k: v for k, v in _box_job(check).items() if k != "containerSettings"}
    for name, job in (("sharedc", _box_job(check)), ("sharedp", process)):
        assert (await client.call("PUT", f"{EXP}/jobs/{name}", job))[0] == 201
        await _ended(daemon, name)
        out = daemon.state_dir / f"mounts/logs/default/default/{name}/1/stdouterr/stdout.txt"
        assert newest_job(daemon.models.models, name).state == "succeeded", name
        assert out.read_text() == "shared\n"
