"""The daemon's side of the agent channel: agents register, beat, report; the daemon turns
that into node and job events, hands out StartTask and KillTask commands, and finds dead
nodes.

- Register: `NodeRegistered` when the node or its incarnation is new, then
  `NodeSetupSucceeded` (or `NodeRecovered` for a node that was suspected or lost); what the
  agent says still runs is reconciled: a task of an attempt the log no longer places there is
  killed. A new incarnation (the agent restarted) lost every attempt the node held: they are
  requeued or failed as for a lost node.
- Leaving (the agent stops): `NodeLost` at once, its attempts requeued or failed.
- TaskPreparing: `JobPreparing` (the first of the attempt's tasks to pull its image or run
  its jobPreparation). TaskStarted: `JobStarted`. TaskExited: `JobTaskExited`, then the
  attempt's end once it is known: every task exited 0 (`JobSucceeded`; or the master's task,
  for a TensorFlow job with parameter servers: toolkits.master_decides), one failed (the
  others are killed, the retry ledger decides: `JobRequeued` or `JobFailed`), or it was
  being terminated (`JobTerminated`).
- `dispatch()` (after every planner cycle) sends StartTask for each newly scheduled attempt,
  with the per-node commands and environment of scheduler/toolkits.py, and KillTask for each
  attempt being terminated or preempted.
- `sweep()` (every second): a node silent for 3 heartbeats is suspected, for `NODE_TIMEOUT`
  lost, and its attempts requeued or failed (scheduler/retries.py). After a daemon start every
  node gets one full timeout of grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Container
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from batchd.events import errors
from batchd.events.envelope import NewEvent
from batchd.events.store import EventStore
from batchd.events.timeutil import now_us
from batchd.projections import allocation, lifecycle, views
from batchd.projections.model import (
    LEAVING,
    LOST,
    PREPARING,
    PREPARING_JOB,
    PROVISIONING,
    READY,
    RUNNING,
    SCHEDULED,
    SUSPECT,
    TERMINATING,
    UNUSABLE,
    Cluster,
    Job,
    Node,
    ReadModels,
    job_key,
)
from batchd.projections.runner import Runner
from batchd.scheduler import auth, commands, protocol, retries, toolkits
from batchd.scheduler.auth import AuthError
from batchd.scheduler.control import Control
from batchd.scheduler.images import image_reference, registry_auth
from batchd.scheduler.planner import Decision
from batchd.scheduler.protocol import TaskKey
from batchd.scheduler.resources import cluster_spec, job_spec, opened
from batchd.scheduler.vmsizes import CATALOG, Catalog

logger = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL = 2.0
SUSPECT_AFTER = 3 * HEARTBEAT_INTERVAL
NODE_TIMEOUT = 10.0
MAX_WAIT = 30
SETUP_TAIL = 4000  # characters of the setup task's output kept in the log
RESEND_AFTER = 5.0  # seconds before a StartTask the node does not report is sent again
# seconds an earlier attempt's task, still holding its GPUs, may go unlisted by its node's
# heartbeats before it is taken to have stopped (its exit report, or its start, was lost)
STOPPED_AFTER = 3 * RESEND_AFTER
# seconds after a KillTask that a task its node still lists is sent one again (the first was
# lost: a poll's answer cut off): more than the agent's grace between SIGTERM and SIGKILL
KILL_AGAIN = 15.0
MAX_GPUS = 64  # a node reporting more is refused
MAX_SAID = 300  # characters of an agent's word on its engine kept in the log
# microseconds a node suspected for its container engine stays so at least: a heartbeat sent
# before its agent knew (or one of an agent too old to tell) does not make it ready at once
ENGINE_HOLD = int(2 * HEARTBEAT_INTERVAL * 1_000_000)
UNWRITABLE_HOLD = 60_000_000  # µs a node that could not write its own scratch space is held
# a node suspected for a fault its agent reported (not for its silence) takes no work for a
# while after, so that the retry is placed elsewhere: the fault's code -> how long (µs)
HELD = {protocol.ENGINE_UNREACHABLE: ENGINE_HOLD, protocol.NODE_UNWRITABLE: UNWRITABLE_HOLD}
BEGUN = (PREPARING_JOB, RUNNING, TERMINATING)  # a job whose tasks have begun on their nodes
# states of a node with an agent, in which silence for NODE_TIMEOUT makes it lost
LOSABLE = (SUSPECT, LEAVING, PREPARING, UNUSABLE)
FORGET = 60.0  # seconds after which the daemon forgets a silent node id it has no node for
# bytes of a file a node sends in one answer: well under the daemon's limit on a message body
# (1 MiB, api.MAX_BODY), which also holds the answer's other fields and whatever else the
# agent sends in the same batch
READ_CHUNK = 256 * 1024
READ_TIMEOUT = 10.0  # seconds a node has to answer for a file


class NodeService:
    def __init__(self, store: EventStore, runner: Runner, control: Control, mounts: Path,
                 state_dir: Path, catalog: Catalog = CATALOG) -> None:  # fmt: skip
        self.store, self.runner, self.control = store, runner, control
        self.mounts, self.state_dir = mounts, state_dir
        self.catalog = catalog  # the VM sizes: a node with fewer GPUs than its size's is unusable
        self.seen: dict[str, float] = {}  # node id -> monotonic time of its last message
        self.outbox: dict[str, list[dict[str, Any]]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        # attempts sent StartTask and still live -> their tasks ([node, GPUs] each)
        self.dispatched: dict[tuple[str, int], list[list[Any]]] = {}
        self.killed: set[tuple[str, int]] = set()  # attempts sent KillTask
        # attempts of multi-node jobs -> the tasks that said TaskPrepared (see _prepared)
        self.prepared: dict[tuple[str, int], set[int]] = {}
        # tasks sent KillTask -> (their node, when): sent again while still listed (KILL_AGAIN)
        self.kills: dict[TaskKey, tuple[str, float]] = {}
        # attempts -> does the master's task decide them? (see _master_decides)
        self.deciding: dict[tuple[str, int], bool] = {}
        self.started_at = time.monotonic()
        self.since_us = now_us()  # what this daemon scheduled is recorded at or after this
        self.closing = False
        self.leading: Callable[[], bool] = lambda: True  # does this daemon lead the log still?
        self.pollers: dict[str, int] = {}  # node id -> its newest poll
        self._polls = 0
        # (job id, attempt, task) -> (node, StartTask, when sent): until the node reports it
        self.unstarted: dict[tuple[str, int, int], tuple[str, dict[str, Any], float]] = {}
        # node id -> tasks of earlier attempts holding its GPUs that its heartbeats do not
        # list -> when a heartbeat first did not
        self.unlisted: dict[str, dict[TaskKey, float]] = {}
        # exec or file request id -> (the node asked, where its answers go)
        self.execs: dict[str, tuple[str, asyncio.Queue[dict[str, Any]]]] = {}

    @property
    def models(self) -> ReadModels:
        return self.runner.models

    # -- commands out ------------------------------------------------------------------------
    async def _still_to_start(self, job_id: str, attempt: int) -> bool:
        """Is `attempt` still the job's scheduled one, holding its nodes? (While its spec was
        read, it may have been terminated, requeued or failed.) A termination that came
        meanwhile ends here: no task of the attempt was ever sent."""
        job = self.models.jobs.get(job_id)
        if job is None or job.attempt != attempt:
            return False
        if job.state == TERMINATING:
            await self.control.run(lambda m: _terminated(m, job_id, attempt),
                                   key=self._key(job_id))  # fmt: skip
        return job.state == SCHEDULED and bool(job.tasks)

    def _send(self, node_id: str, command: dict[str, Any]) -> None:
        command = {**command, "v": protocol.VERSION, "node": node_id,
                   "epoch": self.store.epoch}  # fmt: skip
        self.outbox.setdefault(node_id, []).append(command)
        self.wakeups.setdefault(node_id, asyncio.Event()).set()

    def _send_start(self, node_id: str, command: dict[str, Any]) -> None:
        self._send(node_id, command)
        key = (command["jobId"], command["attempt"], command["task"])
        self.unstarted[key] = (node_id, self.outbox[node_id][-1], time.monotonic())

    def _kill(self, job_id: str, attempt: int, tasks: list[list[Any]],
              skip: Container[int] = ()) -> None:  # fmt: skip
        for index, (node_id, _gpus) in enumerate(tasks):
            if index not in skip:
                # a ProceedTask still queued would start the command the kill comes to stop
                self.outbox[node_id] = [c for c in self.outbox.get(node_id, ())
                                        if not _proceeds(c, job_id, attempt)]  # fmt: skip
                self._kill_task(node_id, (job_id, attempt, index))

    def _kill_task(self, node_id: str, key: TaskKey) -> None:
        self._send(node_id, {"type": "KillTask", "jobId": key[0], "attempt": key[1],
                             "task": key[2]})  # fmt: skip
        self.kills[key] = (node_id, time.monotonic())

    def _kill_again(self, node_id: str, running: list[TaskKey]) -> None:
        """KillTask again for a task its node still lists KILL_AGAIN after the last one (a
        terminated job's, which would otherwise run on, terminating, for as long as it
        takes); the node's tasks that have gone are forgotten."""
        now, listed = time.monotonic(), set(running)
        for key, (node, sent) in list(self.kills.items()):
            if node != node_id:
                continue
            if key not in listed:
                del self.kills[key]
            elif now - sent >= KILL_AGAIN:
                self._kill_task(node_id, key)

    async def dispatch(self) -> None:
        """StartTask for newly scheduled attempts; KillTask for those being terminated, and
        for dispatched attempts that are no longer the job's live one (preempted, requeued,
        failed): their tasks must not run beside the next attempt."""
        m = self.models
        # scheduled and terminating attempts hold GPUs: look at those, not the job history
        holding = {held[0] for node in m.nodes.values() for held in node.allocations.values()}
        for job in [m.jobs[j] for j in holding if j in m.jobs]:
            key = (job.job_id, job.attempt)
            if job.state == SCHEDULED and key not in self.dispatched:
                self.dispatched[key] = [list(t) for t in job.tasks]
                await self._start_or_fail(job, key)
            elif job.state == TERMINATING and key not in self.killed and job.tasks:
                self.killed.add(key)
                self._kill(job.job_id, job.attempt, job.tasks)
                if key not in self.dispatched:  # terminated before this daemon started it
                    self._await_reports(key, job.tasks)
        for memo in (self.prepared, self.deciding):  # (also of attempts not dispatched here)
            for job_id, attempt in [k for k in memo if not _live(m, *k)]:
                del memo[job_id, attempt]
        for (job_id, attempt), tasks in list(self.dispatched.items()):
            job = m.jobs.get(job_id)
            if not _live(m, job_id, attempt):
                del self.dispatched[job_id, attempt]
                self.killed.discard((job_id, attempt))
                if job is None or job.attempt != attempt or len(job.task_exits) < len(tasks):
                    self._kill(job_id, attempt, tasks)  # some task may still run

    async def _start_or_fail(self, job: Job, key: tuple[str, int]) -> None:
        """Start an attempt; a fault in doing so fails that attempt, not the daemon. With the
        log unreachable nothing was sent: the attempt is started at a later cycle."""
        try:
            try:
                await self._start(job)
            except errors.StoreUnavailable:
                raise
            except Exception as exc:
                logger.exception("nodes.start_failed", job=key[0], attempt=key[1])
                error = {"code": "start_failed", "message": f"{type(exc).__name__}: {exc}"}
                unsent = self._never_sent(job)
                await self.control.run(lambda m: _fail(m, key[0], key[1], error, unsent),
                                       key=self._key(key[0]))  # fmt: skip
        except BaseException:
            if not self._sent_any(key):
                self.dispatched.pop(key, None)
            raise

    def _sent_any(self, key: tuple[str, int]) -> bool:
        """Did this daemon send a StartTask of attempt `key` (job, attempt) not yet reported?"""
        return any(k[:2] == key for k in self.unstarted)

    def _never_sent(self, job: Job) -> bool:
        """Was no StartTask of the job's attempt ever sent? None of this daemon's, and the
        attempt was scheduled by this daemon (an earlier one may have sent some)."""
        sent = self._sent_any((job.job_id, job.attempt))
        return not sent and (job.scheduled_at or 0) >= self.since_us

    def _await_reports(self, key: tuple[str, int], tasks: list[list[Any]]) -> None:
        """Watch the tasks of a terminating attempt that this daemon never started (another
        daemon may have): a node that does not report its task has none, and the attempt's
        termination ends then (see _resend_unstarted)."""
        now = time.monotonic()
        for index, (node_id, _gpus) in enumerate(tasks):
            kill = {"type": "KillTask", "jobId": key[0], "attempt": key[1], "task": index}
            self.unstarted[(key[0], key[1], index)] = (node_id, kill, now)

    async def _start(self, job: Job) -> None:
        job_id, attempt = job.job_id, job.attempt
        unsent = self._never_sent(job)  # a failure below sends nothing: free its GPUs then
        try:
            spec = await _job_spec(self.store, job)
        except errors.SecretKeyError as exc:  # sealed with a key this daemon does not hold
            error = {"code": "secret_key", "message": str(exc)}
            if await self._still_to_start(job_id, attempt):
                await self.control.run(lambda m: _fail(m, job_id, attempt, error, unsent),
                                       key=self._key(job_id))  # fmt: skip
            return
        if not await self._still_to_start(job_id, attempt):
            return
        identity = toolkits.JobIdentity(job.workspace, job.experiment, job.name, job.job_id,
                                        job.attempt)  # fmt: skip
        jobs_root = self.state_dir / "nodes"
        hosts = [toolkits.Host(node_id, _address(self.models, node_id), tuple(gpus),
                               _port_base(self.models, node_id))
                 for node_id, gpus in job.tasks]  # fmt: skip
        paths = toolkits.Paths(
            mount_root=str(self.mounts), job_mount_root=str(self.mounts / "jobs" / job.job_id),
            job_temp=str(jobs_root / "temp" / f"{job.job_id}.{job.attempt}"),
            shared_job_temp=str(self.mounts / "shared" / job.job_id),
        )  # fmt: skip
        secrets = {item["name"]: item["value"] for item in spec.get("secrets") or ()
                   if isinstance(item.get("value"), str)}  # fmt: skip
        try:
            plans = toolkits.translate(spec, identity, hosts, paths, secrets)
        except (KeyError, TypeError, ValueError) as exc:
            error = {"code": "translation_failed", "message": str(exc)}
            await self.control.run(lambda m: _fail(m, job_id, attempt, error, unsent),
                                   key=self._key(job_id))  # fmt: skip
            return
        preparation = (spec.get("jobPreparation") or {}).get("commandLine")
        container = spec.get("containerSettings") or {}
        nodes = self.models.nodes
        lacking = [n for n, _ in job.tasks if n in nodes and job.runtime not in nodes[n].runtimes]
        if lacking:
            error = {"code": "runtime_missing",
                     "message": f"node {lacking[0]} has no {job.runtime} runtime"}  # fmt: skip
            await self.control.run(lambda m: _fail(m, job_id, attempt, error, unsent),
                                   key=self._key(job_id))  # fmt: skip
            return
        reused = views.name_reused(self.models, job)
        self.deciding[job_id, attempt] = toolkits.master_decides(spec, len(plans))
        for plan in plans:
            self._send_start(plan.node_id, {
                "type": "StartTask", "jobId": job.job_id, "attempt": job.attempt,
                "task": plan.index, "gpus": list(hosts[plan.index].gpus), "command": plan.command,
                "env": plan.env, "files": plan.files, "runtime": job.runtime,
                "inputs": plan.inputs, "outputs": plan.outputs,
                **_image(container),
                "shmSize": container.get("shmSize"),
                "stdouterr": plan.env["AZ_BATCHAI_STDOUTERR_DIR"], "reused": reused,
                "workDir": str(jobs_root / "work" / f"{job.job_id}.{job.attempt}.{plan.index}"),
                "preparation": preparation, "barrier": len(plans) > 1,
                "secretNames": sorted(secrets),
            })  # fmt: skip

    # -- messages in -------------------------------------------------------------------------
    def _not_leading(self) -> web.Response | None:
        """503 while this daemon cannot confirm that it still leads the log (its database
        away): its agents' leases then run out and they stop their tasks, rather than run
        them on beside copies a standby that took the log over may start."""
        if self.leading():
            return None
        message = "this daemon cannot confirm that it still leads the event log"
        return web.json_response({"error": {"code": "ServiceUnavailable", "message": message,
                                            "details": []}}, status=503)  # fmt: skip

    async def handle_messages(self, request: web.Request) -> web.Response:
        principal = _agent(request)
        if (refused := self._not_leading()) is not None:
            return refused
        try:
            messages = protocol.unpack(await request.read())
            if not isinstance(messages, list):
                raise protocol.ProtocolError("the body must be a list of messages")
            checked = []
            for msg in messages:
                msg = protocol.check(msg, protocol.AGENT_MESSAGES)
                self._authorize(principal, msg["node"])
                if msg["type"] == "Register":
                    msg = _with_address(msg, request.remote)
                checked.append(msg)
            await self._handle_all(checked, principal)
        except protocol.ProtocolError as exc:
            return web.json_response({"error": {"code": "BadRequest", "message": str(exc),
                                                "details": []}}, status=400)  # fmt: skip
        except Superseded as exc:
            return web.json_response({"error": {"code": "Conflict", "message": str(exc),
                                                "details": []}}, status=409)  # fmt: skip
        return web.Response(body=protocol.pack({"ok": True}), content_type=protocol.CONTENT_TYPE)

    async def _handle_all(self, messages: list[dict[str, Any]],
                          principal: auth.Principal) -> None:  # fmt: skip
        """Handle a body's messages in order, except that task reports of different jobs in a
        row (protocol.TASK_REPORTS) are handled at once, so that their events share one
        commit; those of one job keep their order."""
        by_job: dict[str, list[dict[str, Any]]] = {}
        for msg in [*messages, None]:
            if msg is not None and msg["type"] in protocol.TASK_REPORTS:
                by_job.setdefault(str(msg.get("jobId")), []).append(msg)
                continue
            if by_job:
                await _first_error(*(self._handle_each(group, principal)
                                     for group in by_job.values()))  # fmt: skip
                by_job = {}
            if msg is not None:
                await self._handle(msg, principal)

    async def _handle_each(self, messages: list[dict[str, Any]],
                           principal: auth.Principal) -> None:  # fmt: skip
        for msg in messages:
            await self._handle(msg, principal)

    async def _handle(self, msg: dict[str, Any], principal: auth.Principal) -> None:
        node_id = msg["node"]
        kind = msg["type"]
        if kind == "Leaving" and node_id not in self.models.nodes:
            return  # removed already (its cluster shrank): it goes, as asked
        if kind != "Register":
            self._check_current(node_id, msg["incarnation"])
        self.seen[node_id] = time.monotonic()
        if kind == "Register":
            _check_register(msg, principal)
            # a poll still open from before (a dead agent's, its answer read by nobody) takes
            # none of the commands queued from now on: they are the registering agent's
            self.pollers[node_id] = 0
            await self.control.run(lambda m: self._register(m, msg, agent_actor(node_id)),
                                   key=f"node/{node_id}")  # fmt: skip
        elif kind in ("ExecOutput", "FileData"):
            asked = self.execs.get(str(msg.get("execId") or msg.get("requestId")))
            if asked is not None and asked[0] == node_id:  # only the node asked answers
                asked[1].put_nowait(msg)
        elif kind == "SetupExited":
            await self.control.run(_by_agent(node_id, lambda m: _setup_exited(m, msg)),
                                   key=f"node/{node_id}")  # fmt: skip
        elif kind == "Heartbeat":
            await self._heartbeat(node_id, _running_keys(msg), _fault_said(msg))
        elif kind in protocol.TASK_REPORTS:
            await self._task_report(node_id, kind, msg)
        elif kind == "TaskPrepared":
            self._prepared(node_id, protocol.task_key(msg))
        elif kind == "Leaving" and not self.closing:  # (a stopping daemon stops its own)
            await self.control.run(_by_agent(node_id, lambda m: _left(m, node_id)),
                                   key=f"node/{node_id}")  # fmt: skip

    async def _heartbeat(self, node_id: str, running: list[TaskKey],
                         fault: tuple[str, str] | None) -> None:  # fmt: skip
        for job_id, attempt in self._resend_unstarted(node_id, running):
            await self.control.run(_by_agent(node_id, lambda m, j=job_id, a=attempt:
                                             _terminated(m, j, a)),
                                   key=self._key(job_id))  # fmt: skip
        self._kill_unwanted(self.models, node_id, running)
        self._kill_again(node_id, running)
        for key in self._unlisted_long(node_id, running):
            decide = _stopped if _stopping_on(self.models, key, node_id) else _vanished
            await self.control.run(_by_agent(node_id, lambda m, k=key, d=decide:
                                             d(m, k, node_id, None)),
                                   key=self._key(key[0]))  # fmt: skip
        node = self.models.nodes.get(node_id)
        # (not while the daemon stops: it has just lost its local nodes, agents still up)
        if node is None or self.closing:
            return
        if fault is not None:  # no work until its engine answers, its scratch takes files
            if _fault_suspected(self.models, node_id, fault[0], ""):  # (most beats: said)
                await self._suspect(node_id, *fault)
        elif node.state in (SUSPECT, LOST) and _may_recover(node, None, now_us()):
            await self.control.run(_by_agent(node_id, lambda m: _recovered(m, node_id)),
                                   key=f"node/{node_id}")  # fmt: skip

    async def _suspect(self, node_id: str, code: str, message: str) -> None:
        decide = _by_agent(node_id, lambda m: _fault_suspected(m, node_id, code, message))
        await self.control.run(decide, key=f"node/{node_id}")

    async def _task_report(self, node_id: str, kind: str, msg: dict[str, Any]) -> None:
        key = protocol.task_key(msg)
        job_id, attempt, _task = key
        error = msg.get("error") if kind == "TaskExited" else None
        fault = error.get("code") if isinstance(error, dict) else None
        if fault in HELD and not self.closing:  # the node first: the retry is placed elsewhere
            await self._suspect(node_id, fault, str(error.get("message"))[:MAX_SAID])
        if kind == "TaskExited" and _stopping_on(self.models, key, node_id):
            await self.control.run(_by_agent(node_id, lambda m: _stopped(
                m, key, node_id, msg.get("exitCode"))), key=self._key(job_id))  # fmt: skip
            return
        if not _placed_on(self.models, key, node_id):
            return  # only the node that runs a task reports on it
        self.unstarted.pop(key, None)
        if kind in ("TaskPreparing", "TaskStarted"):
            decide = _preparing if kind == "TaskPreparing" else _started
            await self.control.run(_by_agent(node_id, lambda m: decide(m, job_id, attempt)),
                                   key=self._key(job_id))  # fmt: skip
        else:
            decides = await self._master_decides(key, msg.get("exitCode"))
            job = self.models.jobs.get(job_id)
            tasks = list(job.tasks) if job is not None else []
            await self.control.run(_by_agent(node_id, lambda m: self._exited(m, msg, decides)),
                                   key=self._key(job_id))  # fmt: skip
            job = self.models.jobs.get(job_id)
            if tasks and job is not None and not _live(self.models, job_id, attempt):
                # this exit ended it (its failure, or its master's success): the tasks still
                # running are stopped, once that is logged (had it not been, their exits
                # would race the agent's retry of this report)
                self._kill(job_id, attempt, tasks, skip=set(map(int, job.task_exits)))

    async def _master_decides(self, key: TaskKey, code: Any) -> bool:
        """Does this exit of task `key` end its attempt (toolkits.master_decides), though
        the attempt's other tasks still run? Known for what this daemon started; read from
        the job's document for an attempt an earlier daemon started."""
        job_id, attempt, task = key
        job = self.models.jobs.get(job_id)
        if task != 0 or code != 0 or job is None or len(job.tasks) < 2:
            return False
        if (job_id, attempt) not in self.deciding:
            spec = await job_spec(self.store, job)
            self.deciding[job_id, attempt] = toolkits.master_decides(spec, len(job.tasks))
        return self.deciding[job_id, attempt]

    def _prepared(self, node_id: str, key: TaskKey) -> None:
        """A task of a multi-node job is prepared (its image, its jobPreparation) and waits:
        once every task of its attempt is, each is told to start (ProceedTask), so that no
        node runs the job's command (an MPI master reaching the others) while another still
        prepares. A task that says so again later (the ProceedTask crossed its word), or of an
        attempt released already (before this daemon started: the job runs, or a task
        exited 0, which a waiting task does only once released), is told at once; one of an
        attempt being stopped is told to stop again (its KillTask may have been lost)."""
        if not _placed_on(self.models, key, node_id):
            return
        self.unstarted.pop(key, None)  # (its StartTask arrived)
        job_id, attempt, index = key
        job = self.models.jobs[job_id]
        if job.state not in (SCHEDULED, PREPARING_JOB, RUNNING):  # being stopped
            self._kill_task(node_id, key)
            return
        waiting = self.prepared.setdefault((job_id, attempt), set())
        released = (
            len(waiting) == len(job.tasks)
            or job.state == RUNNING
            or any(code == 0 for code in job.task_exits.values())
        )
        waiting.add(index)
        if released:
            go = [index]
        elif len(waiting) == len(job.tasks):
            go = sorted(waiting)
        else:
            return
        for task in go:
            self._send(job.tasks[task][0], {"type": "ProceedTask", "jobId": job_id,
                                            "attempt": attempt, "task": task})  # fmt: skip

    def _authorize(self, principal: auth.Principal, node_id: str) -> None:
        """AuthError 403 unless `principal` may speak for `node_id`: a token bound to another
        node may not, nor one limited to workspaces other than that of the node's cluster."""
        principal.require_node(node_id)
        node = self.models.nodes.get(node_id)
        if principal.workspaces and node is not None:
            cluster = self.models.clusters.get(node.cluster)
            if cluster is None or cluster.workspace not in principal.workspaces:
                raise AuthError(f"token {principal.name!r} may not speak for node {node_id} "
                                "of another workspace's cluster", 403)  # fmt: skip

    def _check_current(self, node_id: str, incarnation: int) -> None:
        """A message from an agent that is not the node's registered one is refused: a
        replaced agent must stop (it hears 409), and nobody speaks for a node unregistered."""
        node = self.models.nodes.get(node_id)
        if node is None:
            raise Superseded(f"node {node_id} is not registered: it was removed (its cluster "
                             "shrank or was deleted), or never joined")  # fmt: skip
        if node.incarnation != incarnation:
            raise Superseded(f"node {node_id} incarnation {incarnation} is not registered: "
                             "another agent registered as this node since")  # fmt: skip

    def _key(self, job_id: str) -> str:
        """The lock of a job's commands: the one the API takes for it (its name)."""
        job = self.models.jobs.get(job_id)
        return job_key(job.workspace, job.experiment, job.name) if job else job_id

    async def _register(self, m: ReadModels, msg: dict[str, Any], actor: str) -> list[Decision]:
        node_id = msg["node"]
        cluster_id = m.cluster_ids.get(str(msg.get("cluster", "")))
        if cluster_id is None:
            raise protocol.ProtocolError(f"no cluster {msg.get('cluster')!r} (WORKSPACE/NAME)")
        node = m.nodes.get(node_id)
        if m.clusters[cluster_id].deleting and (node is None or node.cluster != cluster_id):
            raise protocol.ProtocolError(f"cluster {msg.get('cluster')} is being deleted")
        out: list[Decision] = []
        stream = f"node-{node_id}"
        if node is not None and node.cluster != cluster_id:  # a machine moved to this cluster
            out.append(_moved_out(m, node, msg, actor))
            node = None  # it joins as a new node
        if node is not None and node.incarnation not in (0, msg["incarnation"]):
            out += retries.node_lost(m, node_id)  # a restarted agent runs none of the old tasks
        if node is None or node.incarnation != msg["incarnation"]:
            data = {"nodeId": node_id, "cluster": cluster_id, "incarnation": msg["incarnation"]}
            for field in _REGISTERED:
                if field in msg:
                    data[field] = msg[field]
            out.append((stream, NewEvent("NodeRegistered", data, actor)))
        state = node.state if node is not None else PROVISIONING
        fault = _fault_said(msg)
        fresh = node is None or node.incarnation != msg["incarnation"]  # a start, or a reboot
        if fresh or state in (PROVISIONING, PREPARING):
            out += await self._prepare(m, cluster_id, node, node_id, msg, actor)
        elif state in (SUSPECT, LOST) and _may_recover(node, fault, now_us()):
            out.append((stream, NewEvent("NodeRecovered", {"nodeId": node_id}, actor)))
        elif fault is not None:  # (an agent registering again)
            out += _by_agent(node_id, lambda m: _fault_suspected(m, node_id, *fault))(m)
        self._kill_unwanted(m, node_id, _running_keys(msg))
        return out

    async def _prepare(self, m: ReadModels, cluster_id: str, node: Node | None, node_id: str,
                       msg: dict[str, Any], actor: str) -> list[Decision]:  # fmt: skip
        """A node that registers fresh (a new agent) or before it was ready: unusable if it
        has too few GPUs, else its setup task started, or, without one, ready (but suspect at
        once if its agent says its container engine does not answer)."""
        cluster, stream = m.clusters[cluster_id], f"node-{node_id}"
        state = node.state if node is not None else PROVISIONING
        short = self._short_of_gpus(cluster, msg.get("gpus", 0))
        if short:
            return _unusable(cluster, node_id, {"nodeId": node_id}, short, actor)
        setup = await self._setup_command(cluster, node_id)
        if setup is not None:
            self._send(node_id, setup)
            data = {"nodeId": node_id, "outputDir": setup["stdouterr"]}
            return [(stream, NewEvent("NodeSetupStarted", data, actor))]
        out: list[Decision] = []
        # (an unusable node comes here only with a new agent: it may have its GPUs now)
        if state in (PROVISIONING, PREPARING, SUSPECT, LOST, UNUSABLE):
            out.append((stream, NewEvent("NodeSetupSucceeded", {"nodeId": node_id}, actor)))
            state = LEAVING if node is not None and node.draining else READY
        said = _fault_said(msg)
        fault = said
        if fault is None and node is not None and node.state in (SUSPECT, LOST):
            fault = _fault_last(node)  # (found before this agent, or this daemon)
        if state == READY and fault is not None:  # ready, but no work yet
            out.append(_suspicion(node_id, *fault, actor))
            if said is None and fault[0] == protocol.NODE_UNWRITABLE:
                self.check_scratch(node_id, fault[1])  # its new agent probes it too
        return out

    def check_scratch(self, node_id: str, message: str) -> None:
        """Have the node's agent probe the scratch space tasks are given (its own is probed
        too) and say whether it is unwritable: a new agent (restarted, or after a daemon
        restart) of a node last found so does not know."""
        roots = [str(self.state_dir / "nodes" / part) for part in ("work", "temp")]
        self._send(node_id, {"type": "CheckScratch", "dirs": roots, "message": message})

    def _kill_unwanted(self, m: ReadModels, node_id: str, running: list[TaskKey]) -> None:
        """KillTask for each task the node runs that the log does not place there now."""
        for job_id, attempt, task in running:
            job = m.jobs.get(job_id)
            wanted = (job is not None and job.attempt == attempt
                      and job.state in lifecycle.HOLDING and task < len(job.tasks)
                      and job.tasks[task][0] == node_id)  # fmt: skip
            if not wanted:
                self._kill_task(node_id, (job_id, attempt, task))

    def _short_of_gpus(self, cluster: Cluster, gpus: int) -> dict[str, str] | None:
        """The error of a node with fewer GPUs than its cluster's VM size (jobs take that many
        by default, and would wait for it for ever), else None."""
        size = self.catalog.get(cluster.vm_size)
        if size is None or gpus >= size.gpus:
            return None
        return {"code": "gpus_missing",
                "message": f"the node has {gpus} GPU(s); its cluster's VM size {size.name} has "
                           f"{size.gpus}"}  # fmt: skip

    async def _setup_command(self, cluster: Cluster, node_id: str) -> dict[str, Any] | None:
        """RunSetup for the cluster's nodeSetup.setupTask (None: it has none)."""
        spec = opened(await cluster_spec(self.store, cluster), self.store.codec.keyring)
        task = (spec.get("nodeSetup") or {}).get("setupTask")
        if not task:
            return None
        env = {item["name"]: item["value"] for item in task.get("environmentVariables") or ()}
        env.update({item["name"]: item["value"] for item in task.get("secrets") or ()
                    if isinstance(item.get("value"), str)})  # fmt: skip
        env.update(AZ_BATCHAI_MOUNT_ROOT=str(self.mounts), AZ_BATCHAI_NODE_ID=node_id,
                   AZ_BATCHAI_CLUSTER_NAME=cluster.name,
                   AZ_BATCHAI_WORKSPACE_NAME=cluster.workspace)  # fmt: skip
        expand = toolkits.expander({"AZ_BATCHAI_MOUNT_ROOT": str(self.mounts)})
        prefix = expand(str(task["stdOutErrPathPrefix"]))
        where = f"{cluster.workspace}/clusters/{cluster.name}/{node_id}/stdouterr"
        return {"type": "RunSetup", "command": task["commandLine"], "env": env,
                "secretNames": sorted({item["name"] for item in task.get("secrets") or ()}),
                "stdouterr": f"{prefix.rstrip('/')}/{where}",
                "workDir": str(self.state_dir / "nodes" / "setup" / node_id)}  # fmt: skip

    def _exited(self, m: ReadModels, msg: dict[str, Any], decides: bool) -> list[Decision]:
        job_id, attempt, task = protocol.task_key(msg)
        job = m.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.state not in lifecycle.HOLDING:
            return []
        if task >= len(job.tasks) or job.tasks[task][0] != msg["node"]:
            return []  # only the node that runs a task reports on it
        code = msg.get("exitCode")
        stream = f"job-{job_id}"
        out: list[Decision] = [(stream, NewEvent(
            "JobTaskExited", {"jobId": job_id, "attempt": attempt, "task": task,
                              "exitCode": code, "node": msg["node"]}))]  # fmt: skip
        exits = {**job.task_exits, str(task): code}
        if job.state == TERMINATING:
            if len(exits) >= len(job.tasks):
                out.append((stream, NewEvent("JobTerminated", {
                    "jobId": job_id, "attempt": attempt,
                    "reason": job.terminate_reason or "terminated"})))  # fmt: skip
            return out
        if code != 0:  # (the other tasks are killed once this is logged: _task_report)
            error = msg.get("error") or {
                "code": "exit_code", "message": f"task {task} exited with {code}"}  # fmt: skip
            # an agent that lost touch with the daemon stops its tasks, and a task whose
            # container engine went away ends: node failures, not the job's
            cause = "node_lost" if error.get("code") in protocol.NODE_FAULTS else "exit_code"
            out += retries.attempt_ended(m, job_id, attempt, cause, exit_code=code,
                                         error=error)  # fmt: skip
        elif len(exits) >= len(job.tasks) and all(c == 0 for c in exits.values()):
            out.append((stream, NewEvent("JobSucceeded", {
                "jobId": job_id, "attempt": attempt, "exitCode": 0})))  # fmt: skip
        elif decides:  # the master's task ended it: the others (parameter servers) are
            # stopped once this is logged, as for a failure
            out.append((stream, NewEvent("JobSucceeded", {
                "jobId": job_id, "attempt": attempt, "exitCode": 0, "byTask": task})))  # fmt: skip
        return out

    async def handle_commands(self, request: web.Request) -> web.Response:
        """Long-poll: the node's waiting commands. Only the node's newest poll takes them (an
        older one may belong to an agent that died, whose answer nobody reads)."""
        principal = _agent(request)
        node_id = request.query.get("node", "")
        self._authorize(principal, node_id)
        try:
            wait = min(float(request.query.get("wait", "0")), MAX_WAIT)
            self._check_current(node_id, int(request.query.get("incarnation", "")))
        except ValueError:
            return web.json_response({"error": {"code": "BadRequest", "details": [],
                                                "message": "wait and incarnation are numbers"}},
                                     status=400)  # fmt: skip
        except Superseded as exc:
            return web.json_response({"error": {"code": "Conflict", "message": str(exc),
                                                "details": []}}, status=409)  # fmt: skip
        self.seen[node_id] = time.monotonic()
        self._polls += 1
        poll = self.pollers[node_id] = self._polls
        wakeup = self.wakeups.setdefault(node_id, asyncio.Event())
        wakeup.set()  # an older poll of this node ends, empty
        wakeup = self.wakeups[node_id] = asyncio.Event()
        if not self.outbox.get(node_id) and wait > 0 and not self.closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), wait)
        # not a sign of life: a poll ends by itself while its agent is stuck, or gone
        if (refused := self._not_leading()) is not None:  # (it may have waited a while)
            return refused
        commands = self.outbox.pop(node_id, []) if self.pollers.get(node_id) == poll else []
        return web.Response(body=protocol.pack(commands), content_type=protocol.CONTENT_TYPE)

    def _unlisted_long(self, node_id: str, running: list[TaskKey]) -> list[TaskKey]:
        """The tasks that hold GPUs of the node, started there (of earlier attempts, or the
        current one's, reported started), but that its heartbeats have not listed for
        STOPPED_AFTER seconds: they do not run there (their exit report, or their StartTask,
        was lost), so their GPUs can be freed (_stopped, _vanished)."""
        stopping = _stopping_tasks(self.models, node_id) | self._started_on(node_id)
        unlisted = self.unlisted.pop(node_id, {})
        now = time.monotonic()
        for key in stopping.difference(running):
            unlisted[key] = unlisted.get(key, now)  # since the first heartbeat without it
        unlisted = {k: t for k, t in unlisted.items() if k in stopping and k not in running}
        if unlisted:
            self.unlisted[node_id] = unlisted
        return sorted(k for k, first in unlisted.items() if now - first >= STOPPED_AFTER)

    def _started_on(self, node_id: str) -> set[TaskKey]:
        """The current attempts' tasks on the node that it reported started (none of this
        daemon's StartTasks awaits a report) and whose exit is not recorded."""
        node = self.models.nodes.get(node_id)
        if node is None:
            return set()
        keys = {(job_id, attempt, task) for job_id, attempt, task in node.allocations.values()}
        return {k for k in keys if k not in self.unstarted and _awaiting_exit(self.models, k)}

    def _resend_unstarted(self, node_id: str, running: list[Any]) -> list[tuple[str, int]]:
        """StartTask again for tasks sent to this node a while ago that it does not run and
        has not reported (a command lost on the way). The attempts being terminated among
        them never started: they are returned, to end their termination."""
        reported = {tuple(key) for key in running}
        now = time.monotonic()
        never_started = []
        for key, (target, command, sent) in list(self.unstarted.items()):
            if target == node_id and key not in reported and now - sent > RESEND_AFTER:
                job = self.models.jobs.get(key[0])
                if job is not None and job.attempt == key[1] and job.state == TERMINATING:
                    never_started.append((key[0], key[1]))
                # (the job is preparing or running once another of its tasks has begun)
                if job is None or job.attempt != key[1] or job.state not in lifecycle.PLACED:
                    del self.unstarted[key]
                    continue
                self.unstarted[key] = (target, command, now)
                self.outbox.setdefault(node_id, []).append(command)
                self.wakeups.setdefault(node_id, asyncio.Event()).set()
        return never_started

    def exec(self, job: Job, task: int, command: str) -> tuple[str, asyncio.Queue]:
        """Ask the node of `job`'s task to run `command` beside it; its output comes to the
        queue returned (drop it with `exec_done`)."""
        exec_id = uuid.uuid4().hex
        node_id = job.tasks[task][0]
        output: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.execs[exec_id] = (node_id, output)
        self._send(node_id, {"type": "Exec", "execId": exec_id, "jobId": job.job_id,
                             "attempt": job.attempt, "task": task, "command": command})  # fmt: skip
        return exec_id, output

    async def read_remote(self, node_id: str, path: str, *, listing: bool = False,
                          offset: int = 0) -> dict[str, Any]:  # fmt: skip
        """Ask a node's agent for a file's bytes from `offset` (or a directory's entries):
        its FileData answer (`data` or `entries`, or `error`)."""
        node = self.models.nodes.get(node_id)
        if node is None or node.state == LOST:  # nobody would take the request
            return {"error": {"code": "node_unreachable",
                              "message": f"node {node_id} is gone or lost"}}  # fmt: skip
        request_id = uuid.uuid4().hex
        answer: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.execs[request_id] = (node_id, answer)
        self._send(node_id, {"type": "ReadFile", "requestId": request_id, "path": path,
                             "list": listing, "offset": offset, "size": READ_CHUNK})  # fmt: skip
        try:
            return await asyncio.wait_for(answer.get(), READ_TIMEOUT)
        except TimeoutError:
            return {"error": {"code": "node_unreachable",
                              "message": f"node {node_id} did not answer"}}  # fmt: skip
        finally:
            self.execs.pop(request_id, None)

    def exec_done(self, exec_id: str) -> None:
        self.execs.pop(exec_id, None)

    def cancel_exec(self, exec_id: str, job: Job, task: int) -> None:
        """The caller of an exec went away: its node stops the command."""
        asked = self.execs.pop(exec_id, None)
        if asked is not None:
            self._send(asked[0], {"type": "CancelExec", "execId": exec_id,
                                  "jobId": job.job_id, "attempt": job.attempt,
                                  "task": task})  # fmt: skip

    def exec_gone(self, job_id: str, attempt: int, node_id: str) -> str | None:
        """Why an exec beside task of `attempt` on `node_id` can answer no more (None: it
        may): its node is lost or gone, or the attempt has ended."""
        node = self.models.nodes.get(node_id)
        if node is None or node.state == LOST:
            return f"node {node_id} was lost"
        job = self.models.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.state not in lifecycle.HOLDING:
            return "the job's attempt has ended"
        return None

    def close(self) -> None:
        """The daemon stops: every waiting long-poll answers now, and new ones at once."""
        self.closing = True
        for wakeup in self.wakeups.values():
            wakeup.set()

    # -- dead nodes ----------------------------------------------------------------------------
    async def sweep(self) -> None:
        now = time.monotonic()
        for node in list(self.models.nodes.values()):
            last = max(self.seen.get(node.node_id, 0.0), self.started_at)
            fate = silent_fate(node.state, now - last)
            if fate is not None:
                await self.control.run(lambda m, n=node.node_id, f=fate: f(m, n),
                                       key=f"node/{node.node_id}")  # fmt: skip
        self._forget_gone(now)

    def _forget_gone(self, now: float) -> None:
        """Drop what is kept for node ids the log does not have (removed nodes, strangers)
        once they have been silent for a while."""
        known = self.models.nodes
        for node_id in [n for n, t in self.seen.items() if n not in known and now - t > FORGET]:
            for per_node in (self.seen, self.pollers, self.outbox, self.unlisted):
                per_node.pop(node_id, None)
            wakeup = self.wakeups.pop(node_id, None)
            if wakeup is not None:
                wakeup.set()
        for key, (target, _command, _sent) in list(self.unstarted.items()):
            if target not in known:
                del self.unstarted[key]
        for key, (target, _sent) in list(self.kills.items()):
            if target not in known:
                del self.kills[key]

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/agent/v1/messages", self.handle_messages)
        app.router.add_get("/agent/v1/commands", self.handle_commands)


def _agent(request: web.Request) -> auth.Principal:
    from batchd.scheduler.api import API_KEY

    principal = auth.authenticate(request.app[API_KEY].models,
                                  request.headers.getall("Authorization", []))  # fmt: skip
    if principal.role != "agent":
        raise AuthError("the agent channel takes agent credentials only", 403)
    return principal


def _image(container: dict[str, Any]) -> dict[str, Any]:
    """A StartTask's image fields: the image (with its registry) and the login for its pull
    (only in the command to the agent: never logged)."""
    registry = container.get("imageSourceRegistry")
    if not registry:
        return {"image": None}
    return {"image": image_reference(registry), "registryAuth": registry_auth(registry)}


async def _job_spec(store: EventStore, job: Job) -> dict[str, Any]:
    keyring = store.codec.keyring
    return opened(await job_spec(store, job), keyring)


def agent_actor(node_id: str) -> str:
    """Who an agent's reports make the actor of what they lead to: its node."""
    return f"agent:{node_id}"


def _by_agent(node_id: str, decide: Callable[[ReadModels], list[Decision]]):
    """`decide`, with the events it decides written as the node's agent's doing."""
    actor = agent_actor(node_id)

    def decided(m: ReadModels) -> list[Decision]:
        decisions = decide(m)
        for _stream, event in decisions:
            event.actor = actor
        return decisions

    return decided


def _fail(m: ReadModels, job_id: str, attempt: int, error: dict[str, str],
          undispatched: bool = False) -> list[Decision]:  # fmt: skip
    """JobFailed for an attempt that could not be started; `undispatched`: no StartTask of it
    went out, so its GPUs are free at once (no task can be running there)."""
    job = m.jobs.get(job_id)
    if job is None or job.attempt != attempt or job.state not in lifecycle.HOLDING:
        return []
    data = {"jobId": job_id, "attempt": attempt, "error": error}
    if undispatched:
        data["undispatched"] = True
    return [(f"job-{job_id}", NewEvent("JobFailed", data))]


def _with_address(msg: dict[str, Any], remote: str | None) -> dict[str, Any]:
    """A Register with the node's address: the one it gives (`[::1]` taken as `::1`), else
    the one it connects from."""
    address = msg.get("address")
    if address is None:
        return {**msg, "address": remote or ""}
    return {**msg, "address": address.strip("[]")} if isinstance(address, str) else msg


def _address(m: ReadModels, node_id: str) -> str:
    """How the other nodes of a job reach `node_id`: the address it registered with."""
    node = m.nodes.get(node_id)
    return node.address if node is not None and node.address else "127.0.0.1"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _port_base(m: ReadModels, node_id: str) -> int:
    """For a node at a loopback address (a local node: its machine holds others): the number
    its id ends with (`local-3` and `n3` are 3) times its GPUs, so that the ports of jobs on
    different nodes of one machine differ (toolkits, "Ports"), whichever of them exist. 0 for
    a node of its own machine, or one whose id ends in no number."""
    node = m.nodes.get(node_id)
    number = re.search(r"[0-9]+$", node_id)
    if node is None or _address(m, node_id) not in LOOPBACK or number is None:
        return 0
    return int(number[0]) * node.gpus


def node_number(node_id: str) -> int:
    """A node's number (`local-3` is 3); -1 for an id of another form."""
    number = node_id.rpartition("-")[2]
    return int(number) if number.isdigit() else -1


async def _first_error(*work: Awaitable[None]) -> None:
    """Run `work` at once; when any of it failed, raise the first failure (after all ended)."""
    for result in await asyncio.gather(*work, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


class Superseded(Exception):
    """A message from an agent incarnation the log does not have for its node (409)."""


_REGISTER_FIELDS = {"gpus": int, "cpus": int, "memoryMb": int, "gpuModel": str,
                    "gpuMemoryMb": int, "agentVersion": str, "runtimes": list,
                    "cluster": str, "address": str}  # fmt: skip
# what a Register tells about the node that NodeRegistered records (the cluster is its own)
_REGISTERED = tuple(name for name in _REGISTER_FIELDS if name != "cluster")


def _check_register(msg: dict[str, Any], principal: auth.Principal) -> None:
    """A Register's fields have their types (they go into the log, and the planner counts
    on them), and a token limited to workspaces joins only their clusters."""
    workspace = str(msg.get("cluster", "")).partition("/")[0]
    if principal.workspaces and workspace not in principal.workspaces:
        raise AuthError(f"token {principal.name!r} may join clusters of workspaces "
                        f"{', '.join(principal.workspaces)} only", 403)  # fmt: skip
    for name, kind in _REGISTER_FIELDS.items():
        value = msg.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise protocol.ProtocolError(f"Register {name} must be a {kind.__name__}")
    if not 0 <= msg.get("gpus", 0) <= MAX_GPUS:
        raise protocol.ProtocolError(f"Register gpus must be 0 to {MAX_GPUS}")
    for name in ("gpuMemoryMb", "cpus", "memoryMb"):
        if msg.get(name, 0) < 0:
            raise protocol.ProtocolError(f"Register {name} must not be negative")
    address = msg.get("address")
    if address and not protocol.ADDRESS.fullmatch(address):
        raise protocol.ProtocolError(f"Register address must be {protocol.ADDRESS_RULE}")
    unknown = [r for r in msg.get("runtimes") or () if r not in protocol.RUNTIMES]
    if unknown:
        raise protocol.ProtocolError(f"unknown runtimes {unknown}")
    _fault_said(msg)  # strings, if given


def _engine_down(msg: dict[str, Any]) -> str | None:
    """Why a Heartbeat's (or Register's) node says its container engine does not answer
    (None: it does, or the node has none)."""
    said = msg.get("engineDown")
    if said is None:
        return None
    if not isinstance(said, str):
        raise protocol.ProtocolError(f"{msg['type']} engineDown must be a string")
    return said[:MAX_SAID] or "no reason given"


def _fault_said(msg: dict[str, Any]) -> tuple[str, str] | None:
    """The fault of the node's own that a Heartbeat's (or Register's) agent reports, as
    (code, message): its container engine does not answer (`engineDown`), its scratch space
    takes no file (`scratchUnwritable`: a full disk); None while neither."""
    said = _engine_down(msg)
    if said is not None:
        return protocol.ENGINE_UNREACHABLE, f"its container engine does not answer: {said}"
    unwritable = msg.get("scratchUnwritable")
    if unwritable is None:
        return None
    if not isinstance(unwritable, str):
        raise protocol.ProtocolError(f"{msg['type']} scratchUnwritable must be a string")
    return protocol.NODE_UNWRITABLE, unwritable[:MAX_SAID] or "no reason given"


def _fault_suspected(m: ReadModels, node_id: str, code: str, message: str) -> list[Decision]:
    """A node whose agent reports a fault of the node's (HELD: its container engine does
    not answer, its scratch space cannot be written) takes no new work, saying why: a ready
    one is suspected; so is a suspect (silent) or lost one whose agent is heard saying so
    (suspect with the error, not lost: its agent answers), once for each suspicion."""
    node = m.nodes.get(node_id)
    if node is None or node.state not in (READY, SUSPECT, LOST) or _held_for(node) == code:
        return []
    setup = (node.setup or {}).get("state")
    if node.state == LOST and (setup in ("running", "failed") or node.draining):
        return []  # it would come back preparing, unusable or leaving: taking no work anyway
    return [_suspicion(node_id, code, message)]


def _suspicion(node_id: str, code: str, message: str, actor: str = "scheduler") -> Decision:
    data = {"nodeId": node_id, "error": {"code": code, "message": message}}
    return f"node-{node_id}", NewEvent("NodeSuspected", data, actor)


def _held_for(node: Node) -> str | None:
    """The fault its agent reported (HELD) that `node` is suspect for (said as it became
    suspect), if any."""
    error = node.errors[-1] if node.errors else {}
    if node.state != SUSPECT or error.get("at") != node.since or error.get("code") not in HELD:
        return None
    return error["code"]


def _hold(node: Node) -> int | None:
    """How long (µs) `node` takes no work after its suspicion for a fault its agent
    reported (_held_for); None if it is not suspect for one."""
    fault = _held_for(node)
    return None if fault is None else HELD[fault]


def _moved_out(m: ReadModels, node: Node, msg: dict[str, Any], actor: str) -> Decision:
    """NodeRemoved for a node that registers with another cluster than the one it is in (a
    machine given to another cluster, its agent started again with a new --cluster): allowed
    once its old agent is gone (lost: its jobs were requeued then), refused (400) while that
    node is alive, as when two machines share a node id (the default is the host name)."""
    if node.state != LOST:
        old = m.clusters.get(node.cluster)
        where = f"{old.workspace}/{old.name}" if old is not None else node.cluster
        raise protocol.ProtocolError(
            f"node {node.node_id!r} is a node of cluster {where} ({node.state}), not of "
            f"{msg.get('cluster')}: give this agent its own --node-id, or stop the other one "
            "and wait until that node is lost")  # fmt: skip
    return (f"node-{node.node_id}", NewEvent("NodeRemoved", {"nodeId": node.node_id}, actor))


_LOSSES = frozenset({"node_lost", "agent_exited", "agent_stopped"})  # (how an agent goes)


def _fault_last(node: Node | None) -> tuple[str, str] | None:
    """The fault of its own (HELD) that is the last said of the node, but for the loss of its
    agent since, as (code, message): a new agent of the node (restarted, or after a daemon
    restart) does not know of it, and a full disk outlives both, so the node is held again
    rather than given work at once. From its logged errors."""
    for error in reversed(node.errors if node is not None else ()):
        if error.get("code") in HELD:
            return error["code"], str(error.get("message", ""))
        if error.get("code") not in _LOSSES:
            return None
    return None


def _may_recover(node: Node, fault: tuple[str, str] | None, now: int) -> bool:
    """May a suspect or lost node whose agent is heard from be ready again? Not while its
    agent says its engine does not answer, nor within the hold (HELD) of a suspicion for a
    fault its agent reported."""
    if fault is not None:
        return False
    hold = _hold(node)
    # (abs: a clock set back, or a former leader's ahead, does not hold it longer)
    return hold is None or abs(now - node.since) >= hold


def _running_keys(msg: dict[str, Any]) -> list[TaskKey]:
    """The tasks an agent says it runs, checked."""
    running = msg.get("running") or []
    try:
        return [(str(k[0]), int(k[1]), int(k[2])) for k in running]
    except (TypeError, ValueError, IndexError, KeyError):
        raise protocol.ProtocolError("running must be a list of [jobId, attempt, task]") from None


def _terminated(m: ReadModels, job_id: str, attempt: int) -> list[Decision]:
    """End the termination of an attempt whose task its node was not seen to start (for the
    reason it was asked with: its node may yet start it, if the StartTask reached an agent
    that was stalled; its next heartbeat then has it killed, its GPUs held till then)."""
    job = m.jobs.get(job_id)
    if job is None or job.attempt != attempt or job.state != TERMINATING:
        return []
    reason = f"{job.terminate_reason or 'terminated'} (its task was not seen to start)"
    data = {"jobId": job_id, "attempt": attempt, "reason": reason}
    return [(f"job-{job_id}", NewEvent("JobTerminated", data))]


def _setup_exited(m: ReadModels, msg: dict[str, Any]) -> list[Decision]:
    """The node's setup task ended: it takes work, or is unusable with the reason."""
    node_id = msg["node"]
    node = m.nodes.get(node_id)
    if node is None or node.incarnation != msg["incarnation"]:
        return []
    running = (node.setup or {}).get("state") == "running"  # also of a node lost meanwhile
    if node.state != PREPARING and not (running and node.state in (SUSPECT, LOST)):
        return []
    code = msg.get("exitCode")
    data = {"nodeId": node_id, "exitCode": code, "tail": str(msg.get("tail", ""))[-SETUP_TAIL:]}
    if code == 0:
        return [(f"node-{node_id}", NewEvent("NodeSetupSucceeded", data))]
    reason = (msg.get("error") or {}).get("message") or f"the setup task exited with {code}"
    error = {"code": "setup_failed", "message": reason}
    return _unusable(m.clusters.get(node.cluster), node_id, data, error)


def _unusable(cluster: Cluster | None, node_id: str, data: dict[str, Any],
              error: dict[str, str], actor: str = "scheduler") -> list[Decision]:  # fmt: skip
    """NodeSetupFailed: the node cannot take work (its setup task failed, or it lacks GPUs),
    and the error among its cluster's, as Batch AI's cluster `errors` told of its nodes."""
    out = [(f"node-{node_id}", NewEvent("NodeSetupFailed", {**data, "error": error}, actor))]
    if cluster is not None:
        told = {"code": error["code"], "message": f"node {node_id}: {error['message']}"}
        out.append((f"cluster-{cluster.workspace}/{cluster.name}",
                    NewEvent("ClusterErrorRecorded", {"clusterId": cluster.cluster_id,
                                                      "error": told}, actor)))  # fmt: skip
    return out


def _stopping_tasks(m: ReadModels, node_id: str) -> set[TaskKey]:
    """The tasks of earlier attempts still holding GPUs of `node_id`."""
    node = m.nodes.get(node_id)
    return set() if node is None else {tuple(h) for _g, h in allocation.stale_allocations(m, node)}


def _stopping_on(m: ReadModels, key: protocol.TaskKey, node_id: str) -> bool:
    """Is task `key` one of an earlier attempt, still holding GPUs of `node_id`?"""
    return tuple(key) in _stopping_tasks(m, node_id)


def _stopped(
    m: ReadModels, key: protocol.TaskKey, node_id: str, code: int | None
) -> list[Decision]:
    """A task of an earlier attempt has stopped (or, `code` None, was not seen to run for
    STOPPED_AFTER): JobTaskExited with its node frees its GPUs."""
    if not _stopping_on(m, key, node_id):
        return []
    job_id, attempt, task = key
    data = {"jobId": job_id, "attempt": attempt, "task": task, "exitCode": code, "node": node_id}
    out = [(f"job-{job_id}", NewEvent("JobTaskExited", data))]
    job = m.jobs.get(job_id)  # (None: deleted, its GPUs held by a task stopping still)
    if job is not None and job.stopping == [[attempt, task, node_id]]:  # the last one
        out += commands.finished(job, "scheduler")
    return out


def _vanished(
    m: ReadModels, key: protocol.TaskKey, node_id: str, _code: int | None = None
) -> list[Decision]:
    """A task of the current attempt that its node no longer runs, its exit never reported
    (the report was lost): the attempt ends as a node failure, its exit code unknown."""
    if not _placed_on(m, key, node_id) or not _awaiting_exit(m, key):
        return []
    job_id, attempt, task = key
    message = f"node {node_id} no longer runs task {task}, and its end was not reported"
    return retries.attempt_ended(m, job_id, attempt, "node_lost",
                                 error={"code": "task_vanished", "message": message})  # fmt: skip


def _awaiting_exit(m: ReadModels, key: protocol.TaskKey) -> bool:
    """Is task `key` the current attempt's, begun (preparing, running, or being terminated),
    with no exit recorded?"""
    job_id, attempt, task = key
    job = m.jobs.get(job_id)
    return (job is not None and job.attempt == attempt and job.state in BEGUN
            and str(task) not in job.task_exits)  # fmt: skip


def _live(m: ReadModels, job_id: str, attempt: int) -> bool:
    """Is `attempt` the job's current one, still holding its nodes?"""
    job = m.jobs.get(job_id)
    return job is not None and job.attempt == attempt and job.state in lifecycle.HOLDING


def _proceeds(command: dict[str, Any], job_id: str, attempt: int) -> bool:
    """Is `command` a ProceedTask of attempt `attempt` of job `job_id`?"""
    return (command["type"] == "ProceedTask" and command["jobId"] == job_id
            and command["attempt"] == attempt)  # fmt: skip


def _placed_on(m: ReadModels, key: protocol.TaskKey, node_id: str) -> bool:
    """Is task `key` (job, attempt, index) the current attempt's, placed on `node_id`?"""
    job_id, attempt, task = key
    job = m.jobs.get(job_id)
    return (job is not None and job.attempt == attempt and task < len(job.tasks)
            and job.tasks[task][0] == node_id)  # fmt: skip


def _preparing(m: ReadModels, job_id: str, attempt: int) -> list[Decision]:
    """JobPreparing when the first of the attempt's tasks begins its preparation."""
    job = m.jobs.get(job_id)
    if job is None or job.attempt != attempt or job.state != SCHEDULED:
        return []
    return [(f"job-{job_id}", NewEvent("JobPreparing", {"jobId": job_id, "attempt": attempt}))]


def _started(m: ReadModels, job_id: str, attempt: int) -> list[Decision]:
    job = m.jobs.get(job_id)
    if job is None or job.attempt != attempt or job.state not in (SCHEDULED, PREPARING_JOB):
        return []
    return [(f"job-{job_id}", NewEvent("JobStarted", {"jobId": job_id, "attempt": attempt}))]


def silent_fate(state: str, silent: float) -> Callable[[ReadModels, str], list[Decision]] | None:
    """What becomes of a node in `state` whose agent has not been heard from for `silent`
    seconds: a ready node is suspected first; one suspected, draining, running its setup
    task or unusable is lost (a provisioning node has no agent yet: its provider sees to
    it)."""
    if state == READY:
        return _suspected if silent > SUSPECT_AFTER else None
    if state in LOSABLE:
        return _lost if silent > NODE_TIMEOUT else None
    return None


def _recovered(m: ReadModels, node_id: str) -> list[Decision]:
    node = m.nodes.get(node_id)
    if node is None or node.state not in (SUSPECT, LOST):
        return []
    return [(f"node-{node_id}", NewEvent("NodeRecovered", {"nodeId": node_id}))]


def _suspected(m: ReadModels, node_id: str) -> list[Decision]:
    """A ready node that has been silent takes no new work (silence says no more)."""
    node = m.nodes.get(node_id)
    if node is None or node.state != READY:
        return []
    return [(f"node-{node_id}", NewEvent("NodeSuspected", {"nodeId": node_id}))]


def _lost(m: ReadModels, node_id: str) -> list[Decision]:
    node = m.nodes.get(node_id)
    if node is None or node.state not in LOSABLE:
        return []
    silent = f"no word from its agent for {NODE_TIMEOUT:.0f} s"
    return lose_node(m, node_id, {"code": "node_lost", "message": silent})


def _left(m: ReadModels, node_id: str) -> list[Decision]:
    """Its agent said it stops: the node is lost now (a drained node that runs nothing is
    going anyway: its provider removes it)."""
    node = m.nodes.get(node_id)
    if node is not None and node.state == LEAVING and not node.allocations:
        return []
    return lose_node(m, node_id, {"code": "agent_stopped", "message": "its agent stopped"})


def lose_node(
    m: ReadModels, node_id: str, error: dict[str, str], cause: str = "node_lost",
    job_error: dict[str, str] | None = None,
) -> list[Decision]:  # fmt: skip
    """NodeLost with `error`, and the fate of each attempt the node ran (by `cause`: a lost
    node spends the job's node-failure retries, an interrupted one none), recorded with
    `job_error` (default: the node was lost). Nothing for a node that is not up (ready,
    or one of LOSABLE's states)."""
    node = m.nodes.get(node_id)
    if node is None or node.state not in (READY, *LOSABLE):
        return []
    lost = NewEvent("NodeLost", {"nodeId": node_id, "error": error})
    fates = retries.node_lost(m, node_id, cause, job_error)
    for _stream, event in fates:  # each attempt's fate follows from the loss
        event.causation_id = lost.event_id
    return [(f"node-{node_id}", lost), *fates]
