"""The container create request: GPUs as each engine understands them, binds, shm size,
labels; what an agent reports for a task whose run failed."""

from __future__ import annotations

import asyncio
import os

import aiodocker
import aiohttp
import pytest

from batchd.scheduler.agent import Agent, Gpus
from batchd.scheduler.containers import (
    ContainerTask,
    agent_dir,
    create_config,
    give_to,
    user_ids,
)
from batchd.scheduler.images import image_reference, registry_auth
from batchd.scheduler.jobspec import shm_bytes

SPEC = {
    "image": "pytorch/pytorch:2.3.0", "jobId": "j1", "attempt": 2, "task": 1, "node": "n7",
    "gpus": [2, 3], "stdouterr": "/mnt/batch/logs/ws/e/j/2/stdouterr", "workDir": "/var/w/j1",
    "env": {"AZ_BATCHAI_MOUNT_ROOT": "/mnt/batch", "AZ_BATCHAI_JOB_TEMP": "/var/tmp/j1",
            "RANK": "1"},
    "shmSize": "2g",
}  # fmt: skip


def test_docker_gets_device_requests_and_podman_cdi_names():
    docker = create_config(SPEC, "python train.py", "", "docker", attach_gpus=True)
    assert docker["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["2", "3"], "Capabilities": [["gpu"]]}
    ]
    assert "Devices" not in docker["HostConfig"]
    assert "CUDA_VISIBLE_DEVICES=0,1" in docker["Env"]  # the container's own numbering
    podman = create_config(SPEC, "python train.py", "", "podman", attach_gpus=True)
    assert [d["PathOnHost"] for d in podman["HostConfig"]["Devices"]] == [
        "nvidia.com/gpu=2",
        "nvidia.com/gpu=3",
    ]
    simulated = create_config(SPEC, "python train.py", "", "podman", attach_gpus=False)
    assert "Devices" not in simulated["HostConfig"]
    assert "CUDA_VISIBLE_DEVICES=2,3" in simulated["Env"]  # the node's, as if they were real
    none = create_config({**SPEC, "gpus": []}, "python prep.py", "", "docker", attach_gpus=True)
    assert "DeviceRequests" not in none["HostConfig"]
    assert {"CUDA_VISIBLE_DEVICES=", "NVIDIA_VISIBLE_DEVICES=void"} <= set(none["Env"])


@pytest.fixture
def mount_root_there(monkeypatch):
    """SPEC's mount root (/mnt/batch) exists on this node."""
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda path: path == "/mnt/batch" or isdir(path))


@pytest.fixture
def mount_root_missing(monkeypatch):
    """SPEC's mount root (/mnt/batch) does not exist on this node (whatever this machine has)."""
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda path: path != "/mnt/batch" and isdir(path))


def test_a_mount_root_the_node_lacks_is_not_bound(mount_root_missing):
    """(a Docker Engine refuses to create a container with a bind of a missing path)"""
    mounts = create_config(SPEC, "train", "", "docker", attach_gpus=False)["HostConfig"]["Mounts"]
    assert [m["Source"] for m in mounts] == ["/var/w/j1", "/var/tmp/j1", SPEC["stdouterr"]]


def test_binds_output_directories_and_the_input_directories_there_are_read_only(
    tmp_path, mount_root_there
):
    data = tmp_path / "data"
    (data / "out").mkdir(parents=True)
    spec = {**SPEC, "inputs": [str(data), str(tmp_path / "gone")],
            "outputs": ["/srv/out/model", "/mnt/batch/logs/x", str(data / "out")],
            "env": {**SPEC["env"], "AZ_BATCHAI_INPUT_ETC": "/etc",  # the job's own variables
                    "AZ_BATCHAI_OUTPUT_KEYS": "/root/.ssh"}}  # fmt: skip
    mounts = create_config(spec, "train", "", "docker", attach_gpus=False)["HostConfig"]["Mounts"]
    binds = [(m["Source"], m["Target"], m["ReadOnly"]) for m in mounts]
    assert {m["Type"] for m in mounts} == {"bind"}
    assert (str(data), str(data), True) in binds
    assert ("/srv/out/model", "/srv/out/model", False) in binds
    assert (f"{data}/out", f"{data}/out", False) in binds  # writable inside the read-only input
    assert binds.index((str(data), str(data), True)) < binds.index(
        (f"{data}/out", f"{data}/out", False)
    )
    assert not any("gone" in b[0] for b in binds)  # an input that is not there is not bound
    assert not any(b[0].startswith("/mnt/batch/logs") for b in binds)  # under the mount root
    assert not any(b[0].startswith(("/etc", "/root")) for b in binds)  # only what the daemon named


def test_an_input_under_the_writable_mount_root_is_bound_read_only_there(tmp_path, monkeypatch):
    """Inputs usually lie under the mount root (its shares): each gets a read-only bind of its
    own inside the root's writable one; an output inside such an input is writable again; a
    path named both as an input and as an output stays writable (the job must write there)."""
    root = tmp_path / "mnt"
    for sub in ("afs/data/cache", "afs/both", "afs/data/deep"):
        (root / sub).mkdir(parents=True)
    spec = {**SPEC, "env": {**SPEC["env"], "AZ_BATCHAI_MOUNT_ROOT": f"{root}/"},
            "stdouterr": f"{root}/logs/j/2/stdouterr",
            "inputs": [f"{root}/afs/data", f"{root}/afs/both", f"{root}/afs/data/deep"],
            "outputs": [f"{root}/afs/data/cache", f"{root}/afs/both", f"{root}/out"]}  # fmt: skip
    mounts = create_config(spec, "train", "", "docker", attach_gpus=False)["HostConfig"]["Mounts"]
    binds = [(m["Source"], m["ReadOnly"]) for m in mounts if m["Source"].startswith(str(root))]
    # afs/both, out and the stdouterr directory are writable through the root's bind, and
    # afs/data/deep is read-only through its input's
    assert binds == [(str(root), False), (f"{root}/afs/data", True),
                     (f"{root}/afs/data/cache", False)]  # fmt: skip
    assert all(m["Source"] == m["Target"] for m in mounts)
    odd = {
        **spec,
        "outputs": [f"{root}/afs/data/cache/", f"{root}/afs/both"],
        "inputs": [f"{root}/afs//data", f"{root}/afs/./both", f"{root}/afs/data/deep/.."],
    }
    mounts = create_config(odd, "train", "", "docker", attach_gpus=False)["HostConfig"]["Mounts"]
    binds = [(m["Source"], m["ReadOnly"]) for m in mounts if m["Source"].startswith(str(root))]
    assert binds == [(str(root), False), (f"{root}/afs/data", True),  # the same, however spelt
                     (f"{root}/afs/data/cache", False)]  # fmt: skip


def test_binds_the_job_paths_once_each_and_sizes_shared_memory(mount_root_there):
    config = create_config(SPEC, "python train.py", "-prep", "docker", attach_gpus=False)
    assert config["HostConfig"]["Mounts"] == [
        {"Type": "bind", "Source": path, "Target": path, "ReadOnly": False}
        for path in ("/var/w/j1", "/mnt/batch", "/var/tmp/j1")
    ]
    assert config["HostConfig"]["ShmSize"] == 2 * 1024**3
    assert config["Entrypoint"][3:] == ["/mnt/batch/logs/ws/e/j/2/stdouterr/stdout-prep.txt",
                                 "/mnt/batch/logs/ws/e/j/2/stdouterr/stderr-prep.txt",
                                 "python train.py"]  # fmt: skip
    assert config["Labels"]["batchd.attempt"] == "2" and config["Labels"]["batchd.node"] == "n7"
    labelled = create_config({**SPEC, "agentDir": "/var/lib/batchd/n7"}, "train", "", "docker",
                             attach_gpus=False)["Labels"]  # fmt: skip
    assert labelled["batchd.workdir"] == "/var/lib/batchd/n7"  # the node of this installation
    assert [shm_bytes(t) for t in ("512m", "1024", "1k", "x", None)] == [
        512 * 1024**2,
        1024,
        1024,
        None,
        None,
    ]


@pytest.mark.parametrize(
    ("registry", "reference"),
    [
        ({"image": "busybox"}, "busybox"),
        ({"image": "team/x:1", "serverUrl": "https://r.azurecr.io/"}, "r.azurecr.io/team/x:1"),
        ({"image": "r.azurecr.io/team/x", "serverUrl": "https://other.io"}, "r.azurecr.io/team/x"),
        ({"image": "localhost/busybox:test", "serverUrl": "r.io"}, "localhost/busybox:test"),
        ({"image": "x", "serverUrl": "registry:5000"}, "registry:5000/x"),
        ({"image": "user/repo", "credentials": {"username": "u"}}, "docker.io/user/repo"),
    ],
)
def test_an_image_is_named_on_its_registry(registry, reference):
    assert image_reference(registry) == reference


def test_the_login_goes_to_the_images_registry_and_a_key_vault_password_is_not_resolved():
    login = {"image": "team/x", "serverUrl": "https://r.io",
             "credentials": {"username": "u", "password": "p"}}  # fmt: skip
    assert registry_auth(login) == {"username": "u", "password": "p", "serveraddress": "r.io"}
    vault = {"image": "x", "credentials": {"username": "u", "passwordSecretReference": {}}}
    assert registry_auth(vault) == {"username": "u", "password": "", "serveraddress": "docker.io"}
    assert registry_auth({"image": "x"}) is None


PASSWD = "root:x:0:0:root:/root:/bin/sh\ntrainer:x:1000:1001::/tmp:/bin/sh\n"
GROUPS = "root:x:0:\ndata:x:2000:trainer\n"


@pytest.mark.parametrize(
    ("user", "ids"),
    [
        ("trainer", (1000, 1001)),  # its primary group, from /etc/passwd
        ("1000", (1000, 1001)),
        ("4242", (4242, -1)),  # a uid the image does not list: the group is left alone
        ("4242:7", (4242, 7)),
        ("trainer:data", (1000, 2000)),
        ("ghost", None),
    ],
)
def test_an_images_user_is_looked_up_in_its_own_files(user, ids):
    assert user_ids(user, PASSWD, GROUPS) == ids


def test_giving_a_tasks_files_to_the_images_user_follows_no_link(tmp_path):
    """A job could plant links where its next task's output goes: the agent (root) gives
    away only what it finds (or makes) there itself, never what a link leads to."""
    out, work, elsewhere = tmp_path / "out", tmp_path / "work", tmp_path / "host-file"
    out.mkdir()
    work.mkdir()
    elsewhere.write_text("the host's")
    (out / "stderr.txt").symlink_to(elsewhere)
    outputs, host_dir = tmp_path / "model", tmp_path / "host-dir"
    host_dir.mkdir()
    outputs.symlink_to(host_dir)  # an output directory that is a link
    shared = tmp_path / "shared"
    shared.mkdir()
    spec = {"stdouterr": str(out), "workDir": str(work), "outputs": [str(outputs)],
            "env": {"AZ_BATCHAI_SHARED_JOB_TEMP": str(shared)}}  # fmt: skip
    give_to(spec, "", 4321, 4321)
    assert (out / "stdout.txt").stat().st_uid == 4321  # made, and given
    assert work.stat().st_uid == 4321
    assert shared.stat().st_uid == 4321  # the job's shared temp, writable to the image's user
    assert elsewhere.stat().st_uid == os.getuid()  # behind a link: left alone
    assert host_dir.stat().st_uid == os.getuid()


def test_an_agents_containers_are_labelled_with_its_absolute_work_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert agent_dir("node-0") == str(tmp_path / "node-0")
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["docker"], tmp_path / "w")
    assert agent.agent_dir == str(tmp_path / "w")


class FailingTask:
    """A task whose run raises (as a lost engine connection once did, uncaught)."""

    def __init__(self, tmp_path, error: Exception) -> None:
        self.began, self.killed, self.error = True, False, error
        self.spec = {"jobId": "j1", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
                     "workDir": str(tmp_path / "work")}  # fmt: skip

    async def run(self, started: asyncio.Event) -> None:
        started.set()
        await asyncio.sleep(0)
        raise self.error


class FailingContainerTask(FailingTask, ContainerTask):
    """As FailingTask, a container's task."""


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        (FailingContainerTask, aiohttp.ClientPayloadError("Response payload is not completed"),
         "engine_unreachable"),
        (FailingContainerTask, ValueError("a fault of the agent's"), "runtime_error"),
        # a process task has no engine: its OSError is the agent's fault, not a lost engine
        (FailingTask, OSError(28, "No space left on device"), "runtime_error"),
    ],
)  # fmt: skip
async def test_a_task_whose_run_raises_is_reported_ended_with_no_exit_code(tmp_path, kind, error,
                                                                          code):  # fmt: skip
    """The task is not left running for good (listed by heartbeats, its GPUs held)."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["docker"], tmp_path)
    task = kind(tmp_path, error)
    agent.tasks = {("j1", 1, 0): task}
    await agent._run_task(("j1", 1, 0), task, agent._slot())
    assert agent.tasks == {}
    started, exited = agent.outbox.get_nowait(), agent.outbox.get_nowait()
    assert (started["type"], exited["type"], exited["exitCode"]) == ("TaskStarted", "TaskExited",
                                                                     None)  # fmt: skip
    assert exited["error"]["code"] == code and str(error) in exited["error"]["message"]


class _SlowPulls:
    """An engine without the image, whose pulls never end (a huge image, a stuck registry)."""

    def __init__(self) -> None:
        self.images = self
        self.pulled = asyncio.Event()

    async def inspect(self, image: str) -> dict:
        raise aiodocker.DockerError(404, {"message": f"no such image: {image}"})

    async def pull(self, image: str, auth=None) -> None:
        self.pulled.set()
        await asyncio.Event().wait()


async def test_a_task_killed_while_its_image_is_pulled_stops_pulling_and_ends_at_once():
    """Terminate (or a wall-clock limit) while the image is pulled: the pull is given up,
    and the task ends as killed before it started, not once the pull has ended."""
    engine = _SlowPulls()
    task = ContainerTask({"image": "example.org/huge:1"}, engine, "podman", attach_gpus=False)
    imaging = asyncio.ensure_future(task._image())
    await asyncio.wait_for(engine.pulled.wait(), 5)
    await asyncio.wait_for(task.kill(), 5)
    said = await asyncio.wait_for(imaging, 5)
    assert said == {"code": "killed", "message": "killed before it started"}
