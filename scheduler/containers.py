"""The `docker` runtime: a task in a container, through the Docker Engine API (aiodocker).

The engine may be Docker or podman's Docker-compatible API. GPUs are attached the way the
engine understands them: DeviceRequests with the device ids for Docker, CDI device names
(`nvidia.com/gpu=N`) for podman, whose compatible API ignores DeviceRequests. The job's
paths (mount root, job temp, the stdouterr directory) are bound at the same paths inside,
so the job's environment means the same thing in and out. stdout and stderr are written to
the stdouterr files as the task runs. A small shell (WRAPPER) is the container's first
process and passes SIGTERM on to all of its processes. Labels name the job, attempt and
task, and the agent's work directory (two batchd installations on one engine may both
have a node `local-0`); the container is removed once it has exited. `jobPreparation` runs
first, in a container of its own.

The connection to the engine can break while a container runs (the engine's service
restarted, a proxy to its socket gone): the task then ends with the error
`engine_unreachable` and no exit code, and the container is left for the agent to remove
once the engine answers again (`left`). A wait cut off while the engine still answers is
made again: the container runs on, and its exit code is the task's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tarfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker
import aiohttp
import structlog

from batchd.scheduler import protocol
from batchd.scheduler.jobspec import shm_bytes
from batchd.scheduler.runtimes import (
    KILL_GRACE,
    KILLED_UNSTARTED,
    OutputText,
    TaskResult,
    job_temp,
    kill_tree,
    masked,
    nothing,
    output_dirs,
    output_suffix,
    prepare_directories,
    ready,
)

logger = structlog.get_logger(__name__)

LABEL = "batchd"
REMOVE_WAIT = 30.0  # seconds a container's removal may take (an engine that hangs: tried again)
# what a lost connection to the engine raises (a refused or broken socket, a response cut
# short: aiohttp's ServerDisconnectedError, ClientPayloadError; TimeoutError is an OSError)
CONNECTION_ERRORS = (aiohttp.ClientError, OSError)
ENGINE_ERRORS = (aiodocker.DockerError, *CONNECTION_ERRORS)
WAIT_AGAIN = 0.5  # seconds before a cut wait is made again (the engine answering)
NO_CONNECTION = 900  # the status of aiodocker's DockerError for a connection it could not make
# The container's first process (the engine signals it alone). The task's output goes to the
# stdouterr files ("$0", "$1"); the command ("$2") runs as its child, in bash where the image
# has it (as Batch AI ran commands), else in its POSIX shell. On SIGTERM it passes
# the signal on to every process of the container and waits for them all to end (the engine
# SIGKILLs what is left after the grace): a program the command started has its grace too,
# to write a checkpoint. It exits with the command's code (143 once stopped).
WRAPPER = """command exec >>"$0" 2>>"$1" || exit 126
trap 'stopping=1; kill -s TERM -1 2>/dev/null' TERM
shell=/bin/sh
[ -x /bin/bash ] && shell=/bin/bash
"$shell" -c "$2" &
wait $!
code=$?
left() {
  for p in /proc/[0-9]*; do
    case "$p" in "/proc/$$" | /proc/1) continue ;; esac
    read -r s 2>/dev/null <"$p/stat" || continue
    case "${s##*) }" in Z*) continue ;; esac
    return 0
  done
  return 1
}
while [ -n "$stopping" ] && left; do sleep 0.1; done
exit "$code"
"""

# an exec's command ("$0"), in the shell the task's command runs in
IN_SHELL = '[ -x /bin/bash ] && exec /bin/bash -c "$0"; exec /bin/sh -c "$0"'


def cut_off(exc: BaseException) -> bool:
    """Does `exc` come of the engine's connection (none made, or one lost), not of what the
    engine answered?"""
    if isinstance(exc, aiodocker.DockerError):
        return exc.status == NO_CONNECTION
    return isinstance(exc, CONNECTION_ERRORS)


def unreachable(exc: BaseException) -> dict[str, str]:
    """The error of a task whose engine could not be reached (or stopped answering)."""
    said = str(exc) or type(exc).__name__
    return {"code": protocol.ENGINE_UNREACHABLE,
            "message": f"the connection to the container engine was lost: {said}"}  # fmt: skip


def create_config(spec: dict[str, Any], command: str, suffix: str, engine: str,
                  attach_gpus: bool) -> dict[str, Any]:  # fmt: skip
    """The container create request of a task (`engine`: "docker" or "podman").

    Attached GPUs are the only ones in the container, numbered from 0 there, so
    CUDA_VISIBLE_DEVICES counts from 0; simulated ones keep the node's indices. A task
    without GPUs on a node that attaches them gets NVIDIA_VISIBLE_DEVICES=void, so that an
    engine whose default runtime is NVIDIA's mounts none (images often ask for all)."""
    out = spec["stdouterr"]
    gpus = [str(g) for g in spec.get("gpus") or ()]
    visible = [str(i) for i in range(len(gpus))] if attach_gpus else gpus
    env = {**(spec.get("env") or {}), "CUDA_VISIBLE_DEVICES": ",".join(visible)}
    if attach_gpus and not gpus:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    # the host's network, as Batch AI's containers had it: the addresses and ports of the
    # job's environment (MASTER_ADDR:MASTER_PORT, the TensorFlow hosts, the MPI host file)
    # are the nodes', so the tasks of a multi-node job reach each other there
    host: dict[str, Any] = {"Mounts": _mounts(spec), "NetworkMode": "host"}
    size = shm_bytes(spec.get("shmSize"))
    if size:
        host["ShmSize"] = size
    if gpus and attach_gpus:
        if engine == "podman":
            host["Devices"] = [{"PathOnHost": f"nvidia.com/gpu={g}", "PathInContainer": "",
                                "CgroupPermissions": "rwm"} for g in gpus]  # fmt: skip
        else:
            host["DeviceRequests"] = [{"Driver": "nvidia", "DeviceIDs": gpus,
                                       "Capabilities": [["gpu"]]}]  # fmt: skip
    return {
        "Image": spec["image"],
        # the wrapper is the entrypoint: an image's own ENTRYPOINT (and CMD) must not run
        # instead of the job's command, nor take it as arguments
        "Entrypoint": ["/bin/sh", "-c", WRAPPER, f"{out}/stdout{suffix}.txt",
                       f"{out}/stderr{suffix}.txt", command],
        "Cmd": [],
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "WorkingDir": spec["workDir"],
        "Labels": {LABEL: "task", f"{LABEL}.node": spec.get("node", ""),
                   f"{LABEL}.workdir": spec.get("agentDir", ""),
                   f"{LABEL}.job": spec["jobId"], f"{LABEL}.attempt": str(spec["attempt"]),
                   f"{LABEL}.task": str(spec["task"])},
        "HostConfig": host,
    }  # fmt: skip


ROOT_USERS = ("", "0", "root")


def user_ids(user: str, passwd: str | None, groups: str | None) -> tuple[int, int] | None:
    """The uid and gid an image's USER (`name`, `uid`, `name:group`, `uid:gid`) stands for,
    names looked up in the image's /etc/passwd and /etc/group; gid -1 (left as it is) when
    neither the USER nor /etc/passwd gives one. None: a name neither file knows."""
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else None
    gid = -1
    for line in (passwd or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and (fields[0] == name or fields[2] == name) and fields[3].isdigit():
            uid, gid = int(fields[2]) if uid is None else uid, int(fields[3])
            break
    if group:
        gid = int(group) if group.isdigit() else -1
        for line in (groups or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
                gid = int(fields[2])
    return None if uid is None else (uid, gid)


def give_to(spec: dict[str, Any], suffix: str, uid: int, gid: int) -> None:
    """Make the task's stdouterr files (of `suffix`: runtimes.output_suffix) and give them, its work
    directory, its job temp, its shared job temp and its output directories to uid:gid. Links
    are never followed (a job could have planted one to another file of the host): a link, or
    a file where a directory belongs, is left alone. (An agent that is not root cannot give
    files away: the task then fails, saying it cannot write its output.)"""
    try:
        out = os.open(spec["stdouterr"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        out = None
    if out is not None:
        try:
            for name in (f"stdout{suffix}.txt", f"stderr{suffix}.txt"):
                _give_file(name, out, uid, gid)
        finally:
            os.close(out)
    shared = (spec.get("env") or {}).get("AZ_BATCHAI_SHARED_JOB_TEMP")
    for path in (spec["workDir"], job_temp(spec), shared, *output_dirs(spec)):
        with contextlib.suppress(OSError):
            if path and stat.S_ISDIR(os.lstat(path).st_mode):
                os.chown(path, uid, gid, follow_symlinks=False)


def _give_file(name: str, directory: int, uid: int, gid: int) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=directory)
    except OSError:  # a link, or what cannot be made: the wrapper says so if it matters
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchown(fd, uid, gid)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Host directories the task sees at the same paths: the mount root, its job temp, its
    work directory, its stdouterr directory and its output directories, read-write, and
    those of its input directories that exist, read-only, wherever they lie (an input under
    the mount root gets a read-only bind of its own there; a path named both ways stays
    writable). Only the paths the daemon named, never ones from the job's environment, and
    each only where its mode differs from the bind it lies in. Bind mounts of their own, not
    `host:container` strings, which a ':' in a path would cut wrongly; the engine mounts
    the outer ones first."""
    env = spec.get("env") or {}
    root = env.get("AZ_BATCHAI_MOUNT_ROOT")  # (a Docker Engine refuses a bind of a path that
    if root and not os.path.isdir(root):  # is not there; the others are made before it)
        root = None
    paths = [root, env.get("AZ_BATCHAI_JOB_TEMP"),
             spec["workDir"], spec["stdouterr"], *output_dirs(spec)]  # fmt: skip
    inputs = [str(p) for p in spec.get("inputs") or ()
              if str(p).startswith("/") and os.path.isdir(p)]  # fmt: skip
    read_only = {_plain(p): True for p in inputs}
    read_only.update((_plain(p), False) for p in paths if p)
    binds: list[tuple[str, bool]] = []
    for path in sorted(read_only, key=lambda p: (len(p), p)):
        around = [b for b in binds if _within(path, b[0])]  # outer first: the nearest last
        if not around or around[-1][1] != read_only[path]:
            binds.append((path, read_only[path]))
    return [{"Type": "bind", "Source": p, "Target": p, "ReadOnly": ro} for p, ro in binds]


def _plain(path: str) -> str:
    """`path` as one spelling of its directory (no `//`, `.`, `..` or trailing slash), so
    that nesting and sameness are told by the strings; the engine binds that path."""
    plain = os.path.normpath(path)
    return "/" + plain.lstrip("/") if plain.startswith("//") else plain


def _within(path: str, outer: str) -> bool:
    """Does `path` lie inside the directory `outer` (both plain)?"""
    return path.startswith(outer if outer == "/" else outer + "/")


class ContainerTask:
    """One task of one attempt in a container of the engine at `docker`."""

    def __init__(self, spec: dict[str, Any], docker: aiodocker.Docker, engine: str,
                 attach_gpus: bool) -> None:  # fmt: skip
        self.spec = spec
        self.docker, self.engine, self.attach_gpus = docker, engine, attach_gpus
        self.container: Any = None
        self.killed = False
        self.late_kill: asyncio.Future | None = None  # a kill that came while it was created
        self.began = False  # the command (not the preparation) is running
        self.user = ""  # the user the image runs as (its USER; "": root)
        self.owner: tuple[int, int] | None = None  # that user's ids, once looked up
        # called as its preparation begins (an image pull, the jobPreparation)
        self.on_preparing: Callable[[], None] = nothing
        # awaited once it is prepared, where its StartTask says `barrier` (runtimes.py)
        self.on_prepared: Callable[[], Awaitable[None]] = ready
        self.proceed = asyncio.Event()  # set by the daemon's ProceedTask, or by a kill
        self.exited = False  # the container of its command has exited
        self.pulling: asyncio.Future | None = None  # the pull of its image, while under way
        # the ids of its containers it could not remove (the engine unreachable): the agent
        # removes them once the engine answers again
        self.left: list[str] = []

    @property
    def ending(self) -> bool:
        """Is it being stopped, or has its command ended (its execs end with its container)?"""
        return self.killed or self.exited

    async def run(self, started: asyncio.Event) -> TaskResult:
        try:
            return await self._prepare_and_run(started)
        finally:
            started.set()

    async def _prepare_and_run(self, started: asyncio.Event) -> TaskResult:
        unwritable = prepare_directories(self.spec)
        if unwritable is not None:
            return unwritable
        problem = await self._image()
        if problem is not None:
            return TaskResult(None, problem)
        preparation = self.spec.get("preparation")
        if preparation:
            self.on_preparing()
            result = await self._container(preparation, output_suffix(self.spec, True), None)
            if result.exit_code != 0 or self.killed:
                if result.error is None and not self.killed:
                    message = f"jobPreparation exited with {result.exit_code}"
                    result.error = {"code": "job_preparation_failed", "message": message}
                return result
        if self.spec.get("barrier"):
            await self.on_prepared()
            if self.killed:
                return TaskResult(None, KILLED_UNSTARTED)
        if self.spec.get("command") is None:
            return TaskResult(0)
        return await self._container(self.spec["command"], output_suffix(self.spec), started)

    async def _image(self) -> dict[str, str] | None:
        """None once the image is here (pulled if it was not), else the error. Notes the
        user the image runs as."""
        image = self.spec["image"]
        try:
            found = await self.docker.images.inspect(image)
        except ENGINE_ERRORS as exc:
            if cut_off(exc):
                return unreachable(exc)
            self.on_preparing()
            if self.killed:  # (killed while it was asked about the image)
                return KILLED_UNSTARTED
            self.pulling = asyncio.ensure_future(
                self.docker.images.pull(image, auth=self.spec.get("registryAuth")))  # fmt: skip
            try:
                await self.pulling
                found = await self.docker.images.inspect(image)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self.killed and not (task is not None and task.cancelling()):
                    return KILLED_UNSTARTED  # kill() cancelled the pull: a pull can be long
                raise
            except ENGINE_ERRORS as exc:
                if cut_off(exc):
                    return unreachable(exc)
                return {"code": "image_unavailable", "message": f"cannot pull image {image}: "
                                                               f"{exc.message}"}  # fmt: skip
            finally:
                self.pulling = None
        self.user = str((found.get("Config") or {}).get("User") or "")
        return None

    async def _give_to_user(self, suffix: str) -> None:
        """An image that runs as a user of its own (USER) gets the task's output files, work
        directory, job temp and output directories as that user's: the agent made them as
        its own. Its /etc/passwd and /etc/group (read from the created container) tell the
        ids of a user or group it names."""
        if self.user.partition(":")[0] in ROOT_USERS:
            return
        if self.owner is None:
            group = self.user.partition(":")[2]
            passwd = await self._read("/etc/passwd")  # (a uid's group is there too)
            groups = await self._read("/etc/group") if group and not group.isdigit() else None
            self.owner = user_ids(self.user, passwd, groups) or (-1, -1)
        if self.owner != (-1, -1):
            await asyncio.to_thread(give_to, self.spec, suffix, *self.owner)

    async def _read(self, path: str) -> str | None:
        """A small file of the created container (None: it has none)."""
        try:
            archive = await self.container.get_archive(path)
            member = archive.next()
            handle = archive.extractfile(member) if member is not None else None
            return handle.read(1 << 20).decode("utf-8", "replace") if handle else None
        except (*ENGINE_ERRORS, tarfile.TarError):
            return None

    async def _unwritable(self) -> dict[str, str] | None:
        """For a container that exited 126 before its output was redirected (the wrapper
        could not open the stdouterr files): what the wrapper's shell said, as the error."""
        try:
            said = "".join(await self.container.log(stdout=True, stderr=True)).split("\n")
        except ENGINE_ERRORS:
            return None
        lines = [line for line in said if line.strip()]
        if not lines:
            return None
        message = (f"the container's user ({self.user or 'root'}) cannot write the task's "
                   f"output: {masked(lines[-1], self.spec)[:300]}")  # fmt: skip
        return {"code": "output_unwritable", "message": message}

    async def _container(self, command: str, suffix: str,
                         started: asyncio.Event | None) -> TaskResult:  # fmt: skip
        if self.killed:
            return TaskResult(None, KILLED_UNSTARTED)
        config = create_config(self.spec, command, suffix, self.engine, self.attach_gpus)
        try:
            self.container = await self.docker.containers.create(config=config)
            await self._give_to_user(suffix)
            await self.container.start()
        except ENGINE_ERRORS as exc:
            await self._remove()
            if cut_off(exc):
                return TaskResult(None, unreachable(exc))
            return TaskResult(None, {"code": "cannot_start", "message": exc.message})
        if started is not None:
            self.began = True
            started.set()
        if self.killed:  # killed while it was being created: kill() found no container then
            self.late_kill = asyncio.ensure_future(self.kill())
        try:
            code = await self._wait()
            problem = await self._unwritable() if code == 126 else None
        except ENGINE_ERRORS as exc:
            if cut_off(exc):  # the container may run on: removed once the engine answers
                return TaskResult(None, unreachable(exc))
            return TaskResult(None, {"code": "container_lost", "message": exc.message})
        finally:
            self.exited = self.exited or started is not None
            await self._remove()
        return TaskResult(code, problem)

    async def _wait(self) -> int:
        """The container's exit code, once it has exited. A wait whose connection is cut
        while the engine still answers (a proxy's idle timeout, say) is made again while the
        container runs; one the engine cannot be asked about raises."""
        while True:
            try:
                return int((await self.container.wait(timeout=None)).get("StatusCode", 1))
            except ENGINE_ERRORS as exc:
                if not cut_off(exc):
                    raise
                state = (await self.container.show()).get("State") or {}
                if state.get("Status") in ("exited", "dead"):
                    return int(state.get("ExitCode", 1))
                logger.info("container.wait_again", container=self.container.id,
                            cut=str(exc) or type(exc).__name__)  # fmt: skip
                await asyncio.sleep(WAIT_AGAIN)

    async def _remove(self) -> None:
        """Remove (killing) its container; one the engine cannot be asked to remove now is
        noted in `left`. Never raises: it runs as the task ends, whatever ended it."""
        container = self.container
        if container is not None and not await remove_container(self.docker, container.id):
            self.left.append(container.id)

    async def exec(self, command: str, send) -> int:
        """Run `command` in the task's container; `send(stdout=...)`, `send(stderr=...)` get
        its output as it comes; its exit code."""
        if self.container is None:
            raise OSError("the container is not running yet")
        run = await self.container.exec(cmd=["/bin/sh", "-c", IN_SHELL, command], stdout=True,
                                        stderr=True, environment=None)  # fmt: skip
        text = OutputText(send)
        try:
            async with run.start(detach=False) as stream:
                while (message := await stream.read_out()) is not None:
                    text("stdout" if message.stream == 1 else "stderr", message.data)
            text.flush()
        except asyncio.CancelledError:  # its caller went away: the command ends with it
            await asyncio.shield(self._end_exec(run))
            raise
        return int((await run.inspect()).get("ExitCode") or 0)

    async def _end_exec(self, run: Any) -> None:
        """Kill an exec'd command and what it started (the engine offers no way: its
        process, as the engine names it on this machine, and those below it)."""
        with contextlib.suppress(aiodocker.DockerError, ValueError, TypeError):
            kill_tree(int((await run.inspect()).get("Pid") or 0))

    async def kill(self) -> None:
        """SIGTERM the container; SIGKILL it if it is still there after a grace. A task
        whose image is still being pulled stops pulling (its container is never made)."""
        self.killed = True
        self.proceed.set()  # (a task waiting for the others ends unstarted)
        if self.pulling is not None:
            self.pulling.cancel()
        container = self.container
        if container is None:
            return
        with contextlib.suppress(*ENGINE_ERRORS):  # an engine away: the task's end removes it
            await container.kill(signal="SIGTERM")
            deadline = time.monotonic() + KILL_GRACE  # (however slowly the engine answers)
            while time.monotonic() < deadline:
                state = (await container.show()).get("State", {})
                if not state.get("Running"):
                    return
                await asyncio.sleep(0.1)
            await container.kill(signal="SIGKILL")


async def engine_of(docker: aiodocker.Docker) -> str:
    """ "podman" or "docker", by what the engine says it is."""
    version = await docker.version()
    names = " ".join(c.get("Name", "") for c in version.get("Components") or ())
    return "podman" if "podman" in names.lower() else "docker"


async def remove_container(docker: aiodocker.Docker, container_id: str) -> bool:
    """Remove (killing) a container; True once it is gone (or being removed already), False
    when it could not be removed now (the engine unreachable, or failing)."""
    try:
        await asyncio.wait_for(docker.containers.container(container_id).delete(force=True),
                               REMOVE_WAIT)  # fmt: skip
    except aiodocker.DockerError as exc:
        return exc.status in (404, 409)
    except (*CONNECTION_ERRORS, RuntimeError):  # (RuntimeError: the agent closed the session)
        return False
    return True


def agent_dir(work_dir: str | os.PathLike) -> str:
    """The value of a container's `batchd.workdir` label: its agent's work directory, made
    absolute. Agents lock their work directory, so it tells one node of one batchd
    installation from another installation's node of the same id on the same engine."""
    return os.path.abspath(work_dir)


async def remove_node_containers(docker: aiodocker.Docker, node_id: str, work_dir: str) -> int:
    """Remove (killing) every container of a node's tasks; how many there were. Those of the
    node's id are its own when they carry its agents' work directory (`agent_dir`), or no
    work directory label at all (made by an agent of an earlier batchd); a container of
    another installation's node of the same id is left alone."""
    labelled = {"label": [f"{LABEL}.node={node_id}"]}
    found = await docker.containers.list(all=True, filters=labelled)
    mine = [c for c in found
            if ((c["Labels"] or {}).get(f"{LABEL}.workdir") or work_dir) == work_dir]  # fmt: skip
    for container in mine:
        with contextlib.suppress(aiodocker.DockerError):
            await container.delete(force=True)
    return len(mine)
