"""`batchd agent`: the node agent. It registers its node with the daemon, sends heartbeats
with the tasks it runs, takes StartTask and KillTask commands by long-poll, runs tasks on the
process runtime (scheduler/runtimes.py) and reports when they start and exit.

If it cannot reach the daemon for `LEASE_TIMEOUT` seconds (less than the daemon's node
timeout), it kills its own tasks: the daemon will have given their jobs to other nodes, and
two attempts of one job must never run at once. After a reconnect it registers again and
says what still runs; the daemon kills what it no longer wants.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import ssl as ssl_module
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from batchd.scheduler import files, protocol, watchdog
from batchd.scheduler.client import ClientError, ssl_context
from batchd.scheduler.containers import (
    ENGINE_ERRORS,
    ContainerTask,
    agent_dir,
    cut_off,
    engine_of,
    remove_container,
    remove_node_containers,
    unreachable,
)
from batchd.scheduler.protocol import TaskKey
from batchd.scheduler.runtimes import (
    KILL_GRACE,
    ProcessTask,
    TaskResult,
    become_subreaper,
    forget_dirs,
    hold_job_temp,
    masked,
    nothing,
    output_suffix,
    reap_leftovers,
    record_dirs,
    release_job_temp,
    remove_work_dir,
    remove_work_tree,
    scratch_dirs,
    shares_job_temp,
    sweep_dirs,
    sweep_orphans,
    task_label,
    unwritable_dir,
    watch_children_with_pidfd,
)
from batchd.scheduler.vmsizes import memory_mb

logger = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL = 2.0
LEASE_TIMEOUT = watchdog.SILENCE  # < the daemon's node timeout (10 s)
POLL_WAIT = 20  # seconds a command long-poll may wait
RETRY_DELAY = 1.0
AGENT_VERSION = "1"
POST_TIMEOUT = 5.0  # seconds a message to the daemon may take
ORPHAN_WATCH = 600.0  # seconds after a task ends that what it left behind is still ended
PARENT_ENV = "BATCHD_AGENT_PARENT"  # set by the local provider: the daemon's pid
BATCH_BYTES = 512 * 1024  # a body of reports is closed past this (one message is < 300 KiB)
# seconds a stopping agent waits, once its tasks are killed and it has said it leaves, for
# them to end (their containers removed) before it closes the engine's connection. The kill's
# grace (5 s) and the Leaving message come first, within the 10 s the daemon gives its local
# agents to stop; a container still there if the agent is cut short is the next agent's to
# remove (it removes its node's containers as it starts).
ENDING_WAIT = 3.0
# seconds a stopping agent gives its kills (the grace, and the engine's answers): an engine
# that hangs would hold them for aiohttp's 5 minutes, and the agent would be SIGKILLed unheard
KILL_WAIT = KILL_GRACE + 2.0
ENGINE_CHECK_TIMEOUT = 5.0  # seconds the container engine has to answer its check


KILLED = 128 + signal.SIGKILL  # the exit code of a command killed with SIGKILL


class AgentError(ValueError):
    """The agent cannot go on as asked (a bad flag), or the daemon refused a message (with
    its HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _refusal_hint(exc: BaseException) -> str | None:
    """What to do about a registration the daemon refused for good (its token, 401/403; the
    registration itself, 400: an unknown cluster, a runtime it does not know); None for a
    failure worth retrying (the daemon away, restarting, busy)."""
    status = exc.status if isinstance(exc, AgentError) else None
    if status in (401, 403):
        return ("the daemon refuses this token (revoked, or bound to another node): give a "
                "valid one with --token-file")  # fmt: skip
    if status == 400:
        return "the daemon refuses this registration: mend what it names (--cluster, ...)"
    return None


async def _stopped_with(task: Any) -> bool:
    """Is the task ending (so an exec killed meanwhile was stopped with it)? A container's
    exec can tell its end a moment before the task sees its container exit: up to 2 s."""
    for _ in range(20):
        if task.ending:
            return True
        await asyncio.sleep(0.1)
    return task.ending


@dataclass(frozen=True, slots=True)
class Gpus:
    """What `--gpus` found: how many, their model, and each one's memory (MiB; 0: unknown)."""

    count: int
    model: str = ""
    memory_mb: int = 0


def discover_gpus(option: str) -> Gpus:
    """`N` simulates N GPUs; `auto` asks NVML, then nvidia-smi, else finds none."""
    if option != "auto":
        try:
            count = int(option)
        except ValueError:
            count = -1
        if not 0 <= count <= 64:
            raise AgentError(f"--gpus must be auto or a number from 0 to 64, not {option!r}")
        return Gpus(count, "simulated" if count else "")
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if not count:
            return Gpus(0)
        first = pynvml.nvmlDeviceGetHandleByIndex(0)
        model = pynvml.nvmlDeviceGetName(first)
        memory = pynvml.nvmlDeviceGetMemoryInfo(first).total // (1024 * 1024)
        return Gpus(count, model.decode() if isinstance(model, bytes) else model, memory)
    except Exception:  # no library, no driver, no device: try the tool
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess

        query = [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        try:
            done = subprocess.run(query, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:  # it hung, or cannot run
            logger.warning("agent.nvidia_smi_failed", error=str(exc))
            return Gpus(0)
        rows = [line.rsplit(",", 1) for line in done.stdout.splitlines() if "," in line]
        if done.returncode == 0 and rows:
            memory = rows[0][1].strip()
            return Gpus(len(rows), rows[0][0].strip(), int(memory) if memory.isdigit() else 0)
    return Gpus(0)


class Agent:
    def __init__(self, server: str, token: str, node_id: str, cluster: str, gpus: Gpus,
                 runtimes: list[str], work_dir: Path, address: str | None = None,
                 ssl: ssl_module.SSLContext | bool = True,
                 server_name: str | None = None) -> None:  # fmt: skip
        self.server = server.rstrip("/")
        self.ssl = ssl  # how the daemon's certificate is checked (client.ssl_context)
        self.server_name = server_name  # the name it is checked against (None: the URL's host)
        self.headers = {"Authorization": f"Bearer {token}",
                        "Content-Type": protocol.CONTENT_TYPE}  # fmt: skip
        self.node_id = node_id
        self.cluster = cluster
        self.gpus = gpus
        self.address = address  # None: the daemon takes the one it sees us connect from
        self.runtimes = runtimes
        self.incarnation = time.time_ns()
        # a slot per running task: `<slot>.pid` holds a process task's group, and
        # `<slot>.dirs` the task's directories until its end has removed them
        self.running_dir = work_dir / "running"
        self.agent_dir = agent_dir(work_dir)  # its containers' batchd.workdir label
        self.free_slots: list[Path] = []  # slots (their .pid files) no task holds now
        self.ended: dict[str, float] = {}  # labels of tasks ended lately -> when (orphan sweep)
        self.lease_lost: set[TaskKey] = set()  # tasks stopped because the lease expired
        self.unreported: set[TaskKey] = set()  # ended tasks whose TaskExited is not sent yet
        self.ticked = time.monotonic()  # the lease loop's last turn (see _thawed)
        self.slots = 0  # pid files made so far
        self.tasks: dict[TaskKey, ProcessTask] = {}
        self.epoch = 0
        self.last_contact = time.monotonic()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.background: set[asyncio.Task] = set()  # tasks running and kills under way
        self.setup: asyncio.Task | None = None  # the node's setup task, while it runs
        self.setup_task: ProcessTask | None = None  # its process group (stopped with the agent)
        self.execs: dict[Any, asyncio.Task] = {}  # commands run beside tasks, by exec id
        self.refused = False  # the daemon refused its token or registration: it stopped
        self.registered = False  # the daemon took its Register
        self.superseded = False  # another agent registered as this node since (409)
        self.failed = False  # one of its loops failed (a fault of its own): it stopped
        self.docker: aiodocker.Docker | None = None  # the docker runtime's engine
        # containers of ended tasks that the engine could not be asked to remove then (its
        # connection lost): removed once it answers again
        self.left_containers: set[str] = set()
        self.removing: asyncio.Task | None = None  # their removal, while it is tried
        # why its container engine does not answer (None: it does), told in heartbeats: the
        # daemon gives the node no work meanwhile (checked every heartbeat: _watch_engine)
        self.engine_down: str | None = None
        self.engine_down_at = 0.0  # (monotonic) when it was last found not to answer
        # the node's own scratch space a task found it could not write (a full disk): the
        # directories to try, and why; told in heartbeats (the daemon gives the node no work
        # meanwhile) until a probe writes in each of them again (_watch_scratch)
        self.unwritable: tuple[list[Path], str] | None = None
        # a kill given up or a container left as it stopped: its watchdog removes what is left
        self.left_running = False
        self.engine = "docker"
        self.attach_gpus = False
        self.stop: asyncio.Event | None = None
        self.watchdog: subprocess.Popen | None = None  # ends its tasks if it is killed outright
        self.guard: int | None = None  # the pipe to the watchdog (watchdog.beat, .stopped)
        # a local agent's daemon (its parent): when it is gone, the agent stops
        self.parent = int(os.environ[PARENT_ENV]) if os.environ.get(PARENT_ENV) else None

    def _message(self, type_: str, **fields: Any) -> dict[str, Any]:
        return protocol.message(type_, self.node_id, self.incarnation, **fields)

    def _running(self) -> list[list[Any]]:
        """The tasks to list in a heartbeat: those that run, and those that ended but whose
        exit report is not sent yet (the daemon waits for it instead of taking them as gone)."""
        return [list(key) for key in (*self.tasks, *self.unreported)]

    def _report_exit(self, key: TaskKey, exit_code: int | None,
                     error: dict[str, str] | None = None) -> None:  # fmt: skip
        """Tell the daemon that task `key` ended (listed as running until it is told)."""
        report = {"jobId": key[0], "attempt": key[1], "task": key[2], "exitCode": exit_code}
        if error:
            report["error"] = error
        self.unreported.add(key)
        self.outbox.put_nowait(self._message("TaskExited", **report))

    async def connect_engine(self, url: str, attach_gpus: bool) -> None:
        """The container engine for the docker runtime; containers a previous agent of this
        node left are removed."""
        self.docker = aiodocker.Docker(url=url)
        try:
            self.engine = await engine_of(self.docker)
            removed = await remove_node_containers(self.docker, self.node_id, self.agent_dir)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            await self.docker.close()
            raise AgentError(f"cannot use the container engine at {url}: {exc}") from None
        self.attach_gpus = attach_gpus
        logger.info("agent.engine", engine=self.engine, url=url, removed=removed)

    def _task(self, command: dict[str, Any], slot: Path):
        if command.get("runtime") == "docker":
            if self.docker is None:
                return None
            return ContainerTask({**command, "node": self.node_id, "agentDir": self.agent_dir},
                                 self.docker, self.engine, self.attach_gpus)  # fmt: skip
        return ProcessTask(command, slot)

    def _slot(self) -> Path:
        if self.free_slots:
            return self.free_slots.pop()
        self.slots += 1
        return self.running_dir / f"slot-{self.incarnation}-{self.slots}.pid"

    async def _watch_lease(self) -> None:
        """Every second: out of touch for longer than the lease means stop every task; a
        local agent whose daemon is gone stops itself."""
        while True:
            await asyncio.sleep(1.0)
            if self._thawed():  # its watchdog has killed the tasks: the node's doing
                logger.warning("agent.thawed", seconds=round(time.monotonic() - self.ticked))
                self.lease_lost.update(self.tasks)
            self.ticked = time.monotonic()
            if self.guard is not None:
                watchdog.beat(self.guard)
            self._check_lease()
            self._sweep()
            if self.left_containers and (self.removing is None or self.removing.done()):
                self.removing = asyncio.create_task(self._remove_left(), name="remove left")
            if self.watchdog is not None and self.watchdog.poll() is not None:
                note = "its tasks outlive this agent if it is killed outright"
                logger.error("agent.watchdog_ended", code=self.watchdog.returncode, note=note)
                self.watchdog = None
            if self.parent is not None and os.getppid() != self.parent and self.stop is not None:
                logger.warning("agent.daemon_gone", node=self.node_id)
                self.stop.set()

    async def _remove_left(self) -> None:
        """Remove the containers that ended tasks left (the engine was unreachable then); what
        the engine still cannot be asked is tried again a second later."""
        for container_id in sorted(self.left_containers):
            if self.docker is None or not await remove_container(self.docker, container_id):
                return
            self.left_containers.discard(container_id)
            logger.info("agent.left_container_removed", container=container_id)

    def _thawed(self) -> bool:
        """Was this agent's loop stopped (frozen) for longer than its watchdog waits? Then
        the watchdog has killed its tasks, and their ends are the node's failure."""
        return time.monotonic() - self.ticked > watchdog.SILENCE

    def _sweep(self) -> None:
        """End what tasks that ended left behind outside their process groups."""
        horizon = time.monotonic() - ORPHAN_WATCH
        for label in [label for label, at in self.ended.items() if at < horizon]:
            del self.ended[label]
        killed = sweep_orphans(self.ended)
        if killed:
            logger.info("agent.killed_orphans", count=killed)

    async def run(self, stop: asyncio.Event) -> None:
        self.stop = stop
        left = reap_leftovers(self.running_dir)
        self.free_slots = sorted({p.with_suffix(".pid") for p in self.running_dir.glob("*.*")})
        if left:
            logger.warning("agent.reaped_leftover_tasks", count=left)
        swept = await asyncio.to_thread(sweep_dirs, self.running_dir)
        if swept:
            logger.info("agent.removed_leftover_dirs", tasks=swept)
        self.running_dir.mkdir(parents=True, exist_ok=True)
        connector = aiohttp.TCPConnector(ssl=self.ssl)
        async with aiohttp.ClientSession(headers=self.headers, connector=connector) as session:
            self.session = session
            workers = [asyncio.create_task(self._watch_lease(), name="lease")]
            try:
                registering = asyncio.create_task(self._register(), name="register")
                workers.append(registering)
                if await self._until_stopped(stop, workers[:1], registering):  # to work
                    if self.docker is not None:
                        workers.append(asyncio.create_task(self._watch_engine(), name="engine"))
                    workers += [asyncio.create_task(self._watch_scratch(), name="scratch"),
                                asyncio.create_task(self._heartbeats(), name="heartbeats"),
                                asyncio.create_task(self._commands(), name="commands"),
                                asyncio.create_task(self._send(), name="reports")]  # fmt: skip
                    await self._until_stopped(stop, [w for w in workers if w is not registering])
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await self._kill_all()
                await self._leave()  # first: its tasks are dead, the rest may be cut short
                await self._tasks_ended()
                if self.docker is not None:
                    await self.docker.close()

    async def _until_stopped(self, stop: asyncio.Event, loops: list[asyncio.Task],
                             step: asyncio.Task | None = None) -> bool:  # fmt: skip
        """Until `stop`, until `step` (registration) is done, or until one of the agent's
        loops (which run until they are cancelled) or `step` fails by a fault of its own: the
        agent then stops, exiting 1 for its supervisor to start it again, rather than stay up
        half deaf, its reports or the daemon's commands no longer heard. True: `step` is done
        and the agent goes on."""
        stopping = asyncio.create_task(stop.wait())
        watched = [*loops, *([step] if step is not None else [])]
        try:
            await asyncio.wait({stopping, *watched}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        for task in watched:
            if not task.done():
                continue
            error = None if task.cancelled() else task.exception()
            ended = not stop.is_set() and (task is not step or task.cancelled())
            if error is not None or ended:  # a fault, even one as stop came
                logger.error("agent.loop_failed", loop=task.get_name(), exc_info=error)
                self.failed = True
        return step is not None and step.done() and not self.failed and not stop.is_set()

    async def _kill_all(self) -> None:
        """Kill every task (KILL_WAIT at most: kills still unanswered then are given up, and
        the agent's watchdog removes their containers once it has gone)."""
        running = [*self.tasks.values(), *([self.setup_task] if self.setup_task else [])]
        kills = [asyncio.create_task(t.kill()) for t in running]
        if not kills:
            return
        _done, unanswered = await asyncio.wait(kills, timeout=KILL_WAIT)
        for kill in unanswered:
            kill.cancel()
        if unanswered:
            logger.warning("agent.kills_unanswered", count=len(unanswered), seconds=KILL_WAIT)
            self.left_running = True
        await asyncio.gather(*kills, return_exceptions=True)

    async def _tasks_ended(self) -> None:
        """Once its tasks are killed: wait (ENDING_WAIT at most) for them to end, which
        removes their containers, then remove whatever container of this node is left (a
        task that has not ended yet, one whose removal failed) while the engine's connection
        is still open."""
        ending = [t for t in self.background if not t.done()]
        if ending:
            await asyncio.wait(ending, timeout=ENDING_WAIT)
        if self.docker is None:
            return
        try:
            removed = await asyncio.wait_for(
                remove_node_containers(self.docker, self.node_id, self.agent_dir), ENDING_WAIT
            )
        except ENGINE_ERRORS as exc:  # its watchdog (or the node's next agent) removes them
            logger.warning("agent.containers_left", error=_why(exc))
            self.left_running = True
            return
        if removed:
            logger.info("agent.removed_containers", count=removed)

    async def _leave(self) -> None:
        """Tell the daemon this agent stops, its tasks killed: the node is lost now, and its
        attempts retried at once, not after the daemon has waited out its silence."""
        if not self.registered or self.refused or self.superseded:
            return
        try:
            await self._post([self._message("Leaving")])
        except (aiohttp.ClientError, AgentError, OSError, TimeoutError) as exc:
            logger.warning("agent.leaving_not_told", error=_why(exc))

    async def _post(self, messages: list[dict[str, Any]] | bytes) -> None:
        """POST messages (a list, or a body packed already) to the daemon."""
        body = messages if isinstance(messages, bytes) else protocol.pack(messages)
        async with self.session.post(f"{self.server}/agent/v1/messages", data=body,
                                     server_hostname=self.server_name,
                                     timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT)
                                     ) as response:  # fmt: skip
            await self._answered(response)
            if response.status != 200:
                text = await response.text()
                raise AgentError(f"daemon answered {response.status}: {text}", response.status)
        self.last_contact = time.monotonic()

    async def _answered(self, response: aiohttp.ClientResponse) -> None:
        """409: the daemon no longer has this agent as its node's (another agent registered
        as the node since, or the node was removed: its cluster shrank or was deleted); this
        one stops, saying the daemon's reason (its tasks are not its to run any more)."""
        if response.status == 409 and self.stop is not None and not self.stop.is_set():
            try:
                reason = (await response.json(content_type=None))["error"]["message"]
            except (aiohttp.ClientError, ValueError, KeyError, TypeError):
                reason = "the daemon has another agent for this node"
            logger.warning("agent.superseded", node=self.node_id, reason=reason)
            self.superseded = True
            self.stop.set()

    async def _register(self) -> None:
        register = self._message(
            "Register", cluster=self.cluster, gpus=self.gpus.count, gpuModel=self.gpus.model,
            gpuMemoryMb=self.gpus.memory_mb, cpus=os.cpu_count() or 1, memoryMb=memory_mb(),
            runtimes=self.runtimes, agentVersion=AGENT_VERSION, running=self._running(),
            **({"address": self.address} if self.address else {}), **self._engine_word(),
        )  # fmt: skip
        while True:
            try:
                await self._post([register])
                self.registered = True
                logger.info("agent.registered", node=self.node_id, server=self.server)
                return
            except (aiohttp.ClientError, AgentError, OSError, TimeoutError) as exc:
                hint = _refusal_hint(exc)
                if hint is not None:  # asking again would be refused again
                    logger.error("agent.refused", node=self.node_id, error=_why(exc),
                                 hint=hint)  # fmt: skip
                    self.refused = True
                    if self.stop is not None:
                        self.stop.set()
                    return
                logger.warning("agent.register_failed", error=_why(exc))
                await asyncio.sleep(RETRY_DELAY)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self._post([self._message("Heartbeat", running=self._running(),
                                                **self._engine_word())])  # fmt: skip
            except (aiohttp.ClientError, AgentError, OSError, TimeoutError) as exc:
                logger.warning("agent.heartbeat_failed", error=_why(exc))
                await self._register()  # (the lease is watched on its own: _watch_lease)

    async def _watch_engine(self) -> None:
        """Ask the container engine its version every heartbeat interval: whether it answers
        (ENGINE_CHECK_TIMEOUT) is `engine_down`."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            asked = time.monotonic()
            try:
                await asyncio.wait_for(self.docker.version(), ENGINE_CHECK_TIMEOUT)
            except ENGINE_ERRORS as exc:  # (TimeoutError is an OSError)
                hung = isinstance(exc, TimeoutError)
                said = f"no answer in {ENGINE_CHECK_TIMEOUT:.0f} s" if hung else _why(exc)
                if self.engine_down is None:
                    logger.warning("agent.engine_unreachable", error=said)
                self._engine_away(said)
                continue
            # (a task that found it away since it was asked says more than this answer)
            if self.engine_down is not None and self.engine_down_at < asked:
                logger.info("agent.engine_back")
                self.engine_down = None

    def _engine_away(self, said: str) -> None:
        self.engine_down, self.engine_down_at = said, time.monotonic()

    def _engine_word(self) -> dict[str, str]:
        """What a Heartbeat or Register says of the node's faults: that its container engine
        is away, that its scratch space cannot be written; nothing while all is well."""
        word = {"engineDown": self.engine_down} if self.engine_down else {}
        if self.unwritable is not None:
            word["scratchUnwritable"] = self.unwritable[1]
        return word

    async def _watch_scratch(self) -> None:
        """While a task found the node's scratch space unwritable: write a probe in each of
        its directories every heartbeat interval; once all take one, the node can work."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            probed = self.unwritable
            if probed is None:
                continue
            still = await asyncio.to_thread(unwritable_dir, probed[0])
            if self.unwritable is not probed:
                continue  # a task found it so meanwhile: that says more than this probe
            if still is None:
                logger.info("agent.scratch_writable_again")
                self.unwritable = None
            else:
                self.unwritable = (probed[0], still)

    def _check_lease(self) -> None:
        """Out of touch for longer than the lease: stop every task (the daemon has moved on)."""
        if self.tasks and time.monotonic() - self.last_contact > LEASE_TIMEOUT:
            logger.warning("agent.lease_expired", tasks=len(self.tasks))
            for key, task in list(self.tasks.items()):
                if not task.killed:
                    self.lease_lost.add(key)
                    self._background(task.kill(), "kill")

    async def _send(self) -> None:
        """Send reports in order, as many at a time as are waiting, up to BATCH_BYTES a body
        (a file's chunk, a flood of exec output: the daemon takes no body over 1 MiB); retry
        each body until it is sent."""
        while True:
            first = await self.outbox.get()
            parts = [protocol.pack(first)]
            size = len(parts[0])
            batch = [first]
            while not self.outbox.empty() and size < BATCH_BYTES:
                batch.append(self.outbox.get_nowait())
                parts.append(protocol.pack(batch[-1]))
                size += len(parts[-1])
            await self._send_batch(parts)
            for message in batch:  # sent, or refused for good: heartbeats list them no more
                if message["type"] == "TaskExited":
                    self.unreported.discard(protocol.task_key(message))

    async def _send_batch(self, parts: list[bytes]) -> None:
        """Send the packed messages `parts` until they are taken. If the daemon refuses them
        (400: a message it does not take, such as a newer agent's type; 413: too large; 500:
        a fault of its own), each half is sent on its own, so that only the message refused
        is lost; a 502, 503 or 504 (starting, its log away) is waited out."""
        while True:
            try:
                await self._post(protocol.pack_list(parts))
                return
            except AgentError as exc:
                if exc.status in (502, 503, 504):  # starting, the log away, a proxy's wait
                    logger.warning("agent.report_failed", error=_why(exc))
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                # refused (or a fault of the daemon's): sending it again would not help
                if len(parts) > 1 and exc.status in (400, 413, 500):
                    half = len(parts) // 2
                    await self._send_batch(parts[:half])
                    await self._send_batch(parts[half:])
                    return
                refused = protocol.unpack(parts[0]).get("type") if parts else None
                logger.error("agent.report_refused", error=str(exc), message=refused)
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                logger.warning("agent.report_failed", error=_why(exc))
                await asyncio.sleep(RETRY_DELAY)

    async def _commands(self) -> None:
        query = {"node": self.node_id, "incarnation": str(self.incarnation),
                 "wait": str(POLL_WAIT)}  # fmt: skip
        while True:
            try:
                async with self.session.get(f"{self.server}/agent/v1/commands", params=query,
                                            server_hostname=self.server_name,
                                            timeout=aiohttp.ClientTimeout(total=POLL_WAIT + 10)
                                            ) as response:  # fmt: skip
                    await self._answered(response)
                    if response.status != 200:
                        raise AgentError(f"daemon answered {response.status}")
                    commands = protocol.unpack(await response.read())
                self.last_contact = time.monotonic()
            except (aiohttp.ClientError, AgentError, OSError, TimeoutError) as exc:
                logger.warning("agent.poll_failed", error=_why(exc))
                await asyncio.sleep(RETRY_DELAY)
                continue
            for command in commands:
                try:
                    self._handle(command)
                except (protocol.ProtocolError, KeyError, TypeError, ValueError) as exc:
                    logger.error("agent.bad_command", error=str(exc))
                except Exception:  # a fault of the agent's own: that command's, not the node's
                    logger.exception("agent.command_failed", command=command.get("type"))

    def _handle(self, command: dict[str, Any]) -> None:
        epoch = command.get("epoch", 0)
        if epoch < self.epoch:
            return  # from a daemon that has been replaced
        self.epoch = epoch
        other = {"ReadFile": self._on_read_file, "Exec": self._on_exec,
                 "CancelExec": self._on_cancel_exec, "RunSetup": self._on_run_setup,
                 "CheckScratch": self._on_check_scratch}.get(command["type"])  # fmt: skip
        if other is not None:
            other(command)
            return
        key = protocol.task_key(command)
        if command["type"] == "StartTask" and key not in self.tasks:
            slot = self._slot()
            try:
                task = self._task(command, slot)
            except Exception:  # (a fault of the command's: see _commands) the slot is free
                self.free_slots.append(slot)
                raise
            if task is None:  # the daemon checks runtimes: only a stale command gets here
                error = {
                    "code": "runtime_missing",
                    "message": f"this node has no {command.get('runtime')} runtime",
                }
                self._report_exit(key, None, error)
                self.free_slots.append(slot)
                return
            self.tasks[key] = task
            self.ended.pop(task_label(command), None)  # the same task again: its own now
            self._background(self._run_task(key, task, slot), f"task {key}")
        elif command["type"] == "KillTask" and key in self.tasks:
            self._background(self.tasks[key].kill(), f"kill {key}")
        elif command["type"] == "ProceedTask" and key in self.tasks:
            self.tasks[key].proceed.set()

    def _on_read_file(self, command: dict[str, Any]) -> None:
        self._background(self._read_file(command), "read file")

    def _on_exec(self, command: dict[str, Any]) -> None:
        exec_id = command.get("execId")
        self.execs[exec_id] = asyncio.create_task(self._exec(command), name=f"exec {exec_id}")
        self.execs[exec_id].add_done_callback(lambda _t: self.execs.pop(exec_id, None))

    def _on_cancel_exec(self, command: dict[str, Any]) -> None:
        running = self.execs.get(command.get("execId"))
        if running is not None:
            running.cancel()  # the command is killed (ProcessTask.exec)

    def _on_run_setup(self, command: dict[str, Any]) -> None:
        if self.setup is None or self.setup.done():
            self.setup = asyncio.create_task(self._run_setup(command), name="setup")

    def _on_check_scratch(self, command: dict[str, Any]) -> None:
        """The node was found unwritable before this agent: said so from now on, and probed
        (_watch_scratch) until it can be written."""
        if self.unwritable is None:
            dirs = [Path(str(d)) for d in command.get("dirs") or ()]
            self.unwritable = ([*dirs, self.running_dir], str(command.get("message", "")))

    def _background(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            logger.error("agent.background_failed", work=task.get_name(), exc_info=error)

    async def _read_file(self, command: dict[str, Any]) -> None:
        """A job's output file or directory the daemon cannot read itself."""
        answer = await asyncio.to_thread(read_output, command)
        self.outbox.put_nowait(self._message("FileData", requestId=command.get("requestId"),
                                             **answer))  # fmt: skip

    async def _exec(self, command: dict[str, Any]) -> None:
        """A command beside a running task, its output sent as it comes."""
        exec_id = command.get("execId")
        task = self.tasks.get(protocol.task_key(command))

        def send(**fields: Any) -> None:
            self.outbox.put_nowait(self._message("ExecOutput", execId=exec_id, **fields))

        if task is None:
            error = {"code": "not_running", "message": "the task does not run on this node"}
            send(exitCode=None, error=error)
            return
        ended = {"code": "task_ended", "message": "the job's task ended, and the command with it"}
        try:
            code = await task.exec(command["command"], send)
        except Exception as exc:  # (OSError, DockerError, ValueError...): always answered
            message = _why(exc)
            if isinstance(exc, OSError) and exc.filename == task.spec.get("workDir"):
                message = f"cannot run it in {exc.filename}: {exc.strerror}"  # (no errno)
            send(
                exitCode=None,
                error=ended if task.ending else {"code": "exec_failed", "message": message},
            )
            return
        if code == KILLED and await _stopped_with(task):  # no exit code of its own
            send(exitCode=None, error=ended)
            return
        send(exitCode=code)

    async def _run_setup(self, command: dict[str, Any]) -> None:
        """The cluster's setup task, in a slot like a job's task (an agent that dies leaves it
        to the next one to kill); the daemon hears how it ended and the output's tail."""
        out = Path(command["stdouterr"])
        for name in ("stdout.txt", "stderr.txt"):  # this run's output only (the tail shown)
            with contextlib.suppress(OSError):
                (out / name).unlink()
        slot = self._slot()
        command = {**command, "node": self.node_id, "incarnation": self.incarnation}
        self.setup_task = ProcessTask(command, pid_file=slot)  # labelled by both
        try:
            result = await self.setup_task.run(asyncio.Event())
        finally:
            self.setup_task = None
            self.free_slots.append(slot)
        tail = "".join(masked(_tail(out / name), command) for name in ("stdout.txt", "stderr.txt"))
        report = {"exitCode": result.exit_code, "tail": tail}
        if result.error:
            report["error"] = result.error
        logger.info("agent.setup_ended", exit_code=result.exit_code)
        self.outbox.put_nowait(self._message("SetupExited", **report))

    async def _run_task(self, key: TaskKey, task: ProcessTask, slot: Path) -> None:
        record = slot.with_suffix(".dirs")
        hold = None
        try:
            record_dirs(record, task.spec)  # an agent stopped before the end leaves them
            await _make_shared_job_temp(task.spec)
            if shares_job_temp(task.spec):
                hold = await asyncio.to_thread(hold_job_temp, task.spec)
            await self._run_and_report(key, task)
        except Exception as exc:  # a fault of the agent's own, before the task ran or after
            logger.exception("agent.task_failed", job=key[0], attempt=key[1], task=key[2])
            if self.tasks.get(key) is task:  # its end not reported yet: reported all the
                del self.tasks[key]  # same, or the daemon would wait for ever, its GPUs held
                self._report_exit(key, None, _run_failed(key[2], exc, task))
        finally:  # the last of the job's tasks here removes the shared job temp, come what may
            if hold is not None:
                await asyncio.shield(asyncio.to_thread(release_job_temp, task.spec, hold))
        forget_dirs(record)
        self.free_slots.append(slot)

    def _preparing(self, key: TaskKey, task: ProcessTask) -> None:
        """The task's preparation began (its image pull, its jobPreparation): say so, once."""
        task.on_preparing = nothing
        job_id, attempt, index = key
        self.outbox.put_nowait(self._message(
            "TaskPreparing", jobId=job_id, attempt=attempt, task=index))  # fmt: skip

    async def _prepared(self, key: TaskKey, task: ProcessTask) -> None:
        """The task is prepared and its job has other tasks: say so, and wait until the
        daemon says that every one of them is (ProceedTask) or the task is killed. Said
        again every heartbeat interval meanwhile: a daemon started since then knows it too."""
        job_id, attempt, index = key
        while not task.proceed.is_set():
            self.outbox.put_nowait(self._message(
                "TaskPrepared", jobId=job_id, attempt=attempt, task=index))  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.proceed.wait(), HEARTBEAT_INTERVAL)

    async def _run_and_report(self, key: TaskKey, task: ProcessTask) -> None:
        job_id, attempt, index = key
        started = asyncio.Event()
        task.on_preparing = functools.partial(self._preparing, key, task)
        task.on_prepared = functools.partial(self._prepared, key, task)
        running = asyncio.create_task(task.run(started))
        await started.wait()
        if task.began:
            self.outbox.put_nowait(self._message(
                "TaskStarted", jobId=job_id, attempt=attempt, task=index))  # fmt: skip
        try:
            result = await running
        except Exception as exc:  # a fault the runtime did not handle: still reported, once
            logger.exception("agent.task_failed", job=job_id, attempt=attempt, task=index)
            result = TaskResult(None, _run_failed(index, exc, task))
        left = getattr(task, "left", None)
        if left:  # its container is removed once the engine answers again
            logger.warning("agent.container_left", job=job_id, task=index, containers=left)
            self.left_containers.update(left)
        lease_lost = (key in self.lease_lost or self._thawed()) and result.exit_code != 0
        self.lease_lost.discard(key)
        if lease_lost:  # however it ended (killed before it started, a pull cut short)
            error = _lease_error(index)
        else:
            error = result.error or _cannot_start_error(index, result.exit_code, task.spec)
        if error and error["code"] == protocol.ENGINE_UNREACHABLE:  # until its check says
            self._engine_away(error["message"])  # otherwise
        if error and error["code"] == protocol.NODE_UNWRITABLE:  # until a probe writes there
            self.unwritable = (scratch_dirs(task.spec, self.running_dir), error["message"])
        self.tasks.pop(key, None)  # (no await since its run ended: nothing saw it still here)
        self._report_exit(key, result.exit_code, error)  # its GPUs are free now
        self.ended[task_label(task.spec)] = time.monotonic()
        self._sweep()
        if not remove_work_dir(task.spec):  # not empty: remove it without holding the loop
            await asyncio.to_thread(remove_work_tree, task.spec)


async def _make_shared_job_temp(spec: dict[str, Any]) -> None:
    """Make the job's $AZ_BATCHAI_SHARED_JOB_TEMP (under the mount root, where every task of
    the job sees it) before the task starts, as the task's other directories are. One that
    cannot be made is logged: the task runs on, as a job that does not use it would."""
    shared = (spec.get("env") or {}).get("AZ_BATCHAI_SHARED_JOB_TEMP")
    if not shared:
        return
    try:
        await asyncio.to_thread(functools.partial(os.makedirs, shared, exist_ok=True))
    except OSError as exc:
        logger.warning("agent.shared_job_temp_not_made", path=shared, error=_why(exc))


def read_output(command: dict[str, Any]) -> dict[str, Any]:
    """What a ReadFile asks: the entries of a directory, or bytes of a file from an offset.
    The daemon has checked the path's parts; a path that leads through a link is refused.
    The path is opened part by part without following links, and served from what was
    opened (files.open_absolute): a link swapped in meanwhile is never followed."""
    try:
        fd = files.open_absolute(str(command.get("path", "")))
    except files.Linked:
        return {"error": {"code": "refused", "message": "the path leads through a link"}}
    except (FileNotFoundError, NotADirectoryError):
        return {"error": {"code": "not_found", "message": "no such file (yet)"}}
    except OSError as exc:
        return {"error": {"code": "unreadable", "message": exc.strerror or str(exc)}}
    try:
        if command.get("list"):
            return {"entries": files.listing(fd)}
        size = files.regular(fd, str(command.get("path", ""))).st_size  # no device, no FIFO
        data = os.pread(fd, int(command.get("size", 1 << 20)), int(command.get("offset", 0)))
        return {"data": data, "size": size}
    except files.FileNotFound as exc:
        return {"error": {"code": "not_found", "message": str(exc)}}
    except OSError as exc:
        return {"error": {"code": "unreadable", "message": exc.strerror or str(exc)}}
    finally:
        os.close(fd)


def _why(exc: BaseException) -> str:
    """An error for the log: its message, or its kind where it has none (a timeout)."""
    return str(exc) or type(exc).__name__


def _lease_error(index: int) -> dict[str, str]:
    """A task the agent stopped when it lost touch with the daemon: not the job's fault, so
    the daemon retries it as a node failure."""
    return {"code": protocol.LEASE_EXPIRED, "message": (
        f"task {index} was stopped: its node lost touch with the daemon for more than "
        f"{LEASE_TIMEOUT:.0f} s")}  # fmt: skip


def _run_failed(index: int, exc: Exception, task: ProcessTask) -> dict[str, str]:
    """The error of a task whose run raised: a container's engine connection lost, or a fault
    of the agent's own (`runtime_error`: a process task's OSError among them); the task
    never has an exit code then."""
    if isinstance(task, ContainerTask) and cut_off(exc):
        return unreachable(exc)
    return {"code": "runtime_error",
            "message": f"the agent could not run task {index}: {_why(exc)}"}  # fmt: skip


def _cannot_start_error(index: int, code: int | None, spec: dict[str, Any]) -> dict | None:
    """For a command the shell could not run (126, 127), the shell's words; None for any
    other exit (the job may choose those codes itself, so its words are checked)."""
    if code not in (126, 127):
        return None
    stderr = Path(spec["stdouterr"]) / f"stderr{output_suffix(spec)}.txt"
    lines = masked(_tail(stderr, 500), spec).strip().splitlines()
    said = lines[-1][:300] if lines else ""
    shell_said = said.startswith(SHELLS) and "No such file or directory" in said  # ./trian.sh
    if not shell_said and not any(words in said for words in SHELL_CANNOT_RUN):
        return None
    reason = "not found" if code == 127 else "not executable"
    return {"code": "cannot_start",
            "message": f"task {index} exited with {code} (command {reason}): {said}"}  # fmt: skip


# how /bin/sh (dash, bash, busybox) says it cannot run a command
SHELL_CANNOT_RUN = ("not found", "Permission denied", "cannot execute", "Is a directory")
# (a program's own "No such file or directory" is not the shell's: only the shell's, by name)
SHELLS = ("/bin/bash:", "bash:", "/bin/sh:", "sh:")


def _tail(path: Path, size: int = 2000) -> str:
    """The last `size` bytes of a file, as text ("" if there is none)."""
    try:
        with path.open("rb") as handle:
            start = max(0, path.stat().st_size - size)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    if start:  # a character cut at the start is left out: what follows is whole (a secret's
        data = data.lstrip(_UTF8_CONTINUATION)  # end there is then found and masked)
    return data.decode("utf-8", "replace")


_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


async def main(args: argparse.Namespace) -> int:
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise AgentError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    gpus = discover_gpus(args.gpus)
    node_id = args.node_id or socket.gethostname()
    if not protocol.NODE_ID.fullmatch(node_id):
        raise AgentError(f"--node-id {node_id!r}: a node id is {protocol.NODE_ID_RULE}")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in protocol.RUNTIMES]
    if unknown:
        raise AgentError(f"--runtimes: {', '.join(unknown)}: the runtimes are process, docker")
    if args.address is not None and not protocol.ADDRESS.fullmatch(args.address):
        raise AgentError(f"--address {args.address!r}: {protocol.ADDRESS_RULE}")
    if args.tls_server_name and not args.server.lower().startswith("https://"):
        raise AgentError(f"--tls-server-name: the --server {args.server} is not https://")
    work_dir = Path(args.work_dir)
    try:  # one agent per work directory; a previous one's watchdog may still be ending its tasks
        lock = await asyncio.to_thread(watchdog.hold_work_dir, work_dir)
    except watchdog.WorkDirBusy:
        raise AgentError(f"--work-dir {work_dir}: another agent runs there (it holds "
                         f"{work_dir / watchdog.LOCK_FILE})") from None  # fmt: skip
    except OSError as exc:  # a file there, a directory it may not write, a full disk
        what = (
            "is not a directory"
            if work_dir.exists() and not work_dir.is_dir()
            else (exc.strerror or str(exc))
        )
        raise AgentError(f"--work-dir {work_dir}: {what}") from None
    cacert = args.cacert or os.environ.get("BATCHD_CACERT")
    try:
        checked = ssl_context(Path(cacert) if cacert else None)
    except ClientError as exc:
        raise AgentError(f"--cacert: {exc}") from None
    agent = Agent(args.server, token, node_id, args.cluster, gpus, runtimes, work_dir,
                  args.address, checked, args.tls_server_name)  # fmt: skip
    docker_host = args.docker_host if "docker" in runtimes else None
    if docker_host:
        attach = args.gpu_attach == "always" or (
            args.gpu_attach == "auto" and gpus.model != "simulated"
        )
        await agent.connect_engine(docker_host, attach)
    watch_children_with_pidfd()
    if not become_subreaper():
        logger.warning("agent.no_subreaper", note="processes that leave a task's group survive it")
    agent.watchdog, agent.guard = watchdog.start(lock, agent.running_dir, node_id, docker_host,
                                                 agent.agent_dir)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)  # its tasks are stopped when it returns (or left to the watchdog)
    if not agent.left_running:
        watchdog.stopped(agent.guard)
    return 1 if agent.refused or agent.failed else 0
