"""Providers create and remove a cluster's nodes, behind one interface (`Provider`).
`local`: agent processes on this machine.

The embedded default (`batchd serve` with no configuration) has a cluster `local` in
workspace `default` whose nodes are `batchd agent` processes with simulated GPUs on the
process runtime. The provider keeps as many running as the cluster's scale settings ask:
manual's `targetNodeCount`, or with `autoScale` as many as run work and its queued jobs need,
within `minimumNodeCount` and `maximumNodeCount` (autoscale_target). An agent that exits is
started again. Which nodes stay is chosen at every cycle (staying_nodes): those running work
first, then ready idle ones, then the others, lowest number first; new ones take the lowest
free numbers. A node not chosen goes: at once if it runs nothing, else it is drained (it takes
no new work), stopped once it runs nothing, and removed from the cluster. What becomes of the
jobs it runs meanwhile is the manual settings' `nodeDeallocationOption` (deallocation_option,
deallocate): `requeue` (Batch AI's default) kills their attempts and queues them again,
spending none of their retries (`interrupted`); `terminate` terminates them;
`waitforjobcompletion` lets them end. A cluster being deleted, or scaling itself, waits for
them.

Local agents stop with their daemon. When it stops, its local nodes are lost (`daemon_stopped`)
and the attempts they ran are queued again as `interrupted`, which spends none of the job's
retries; a daemon that did not stop cleanly finds its nodes so when it starts again
(`daemon_restarted`), and requeues their attempts as node failures (`node_lost`). Either way
they take no work until their new agents have registered.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from batchd.events.envelope import NewEvent
from batchd.events.timeutil import to_iso
from batchd.projections import lifecycle, queue
from batchd.projections.allocation import free_gpus
from batchd.projections.model import LEAVING, READY, Cluster, ReadModels, Token
from batchd.scheduler import commands, config, retries, tls, watchdog
from batchd.scheduler.agent import PARENT_ENV
from batchd.scheduler.auth import revoke_token
from batchd.scheduler.clusterspec import max_nodes
from batchd.scheduler.control import Control, token_file
from batchd.scheduler.nodes import lose_node, node_number
from batchd.scheduler.planner import Decision
from batchd.scheduler.vmsizes import DEFAULT_LOCAL_MAX_NODES, LOCAL, Catalog

logger = structlog.get_logger(__name__)

WORKSPACE, EXPERIMENT, CLUSTER = "default", "default", "local"
STOP_GRACE = 10.0
ACTOR = "batchd:serve"


STOPPED = {"code": "daemon_stopped", "message": "the daemon stopped, and its local agents with it"}


def restarted(heard_at: int) -> dict[str, str]:
    """The error of the local nodes a daemon that did not stop cleanly left: its events of
    them are stamped at this start, so the message says when the log last heard of it
    (`heard_at`: its last event as this daemon restored it, before it wrote any; it ended at
    some time after that)."""
    last = f" (the log's last event before this start: {to_iso(heard_at)})"
    return {"code": "daemon_restarted",
            "message": f"the daemon did not stop cleanly{last if heard_at else ''}; its "
                       "local agents ended with it"}  # fmt: skip


LEGACY_TOKEN = "local-agents"  # the one token earlier versions gave every local agent
# Batch AI 2018-05-01's scaleSettings.manual.nodeDeallocationOption
REQUEUE, TERMINATE, WAIT = "requeue", "terminate", "waitforjobcompletion"


class Provider(Protocol):
    """What the daemon asks of a provider, which owns some clusters' nodes: `bootstrap` once
    it leads (create what it needs in the log), `reconcile` after every planner cycle (bring
    the nodes to what the clusters' scale settings ask: start, drain, remove), `stop` when
    the daemon stops. Each runs under the daemon's leadership and appends through `Control`;
    nodes join by registering over the agent channel like any other."""

    async def bootstrap(self) -> None: ...

    async def reconcile(self) -> None: ...

    def wanted(self) -> dict[str, int]:
        """How many nodes each cluster it scales wants now, by cluster id (see
        commands.resize_changes)."""
        ...

    async def stop(self) -> None: ...


class LocalProvider:
    def __init__(self, control: Control, url: str, state_dir: Path, nodes: int,
                 gpus_per_node: int, runtimes: str, docker_host: str | None,
                 catalog: Catalog, cacert: Path | None = None) -> None:  # fmt: skip
        self.control = control
        self.url = url
        self.cacert = cacert  # the daemon's certificate, when it serves https
        host = urlsplit(url).hostname or ""
        self.server_name = tls.name_to_check(cacert, host) if cacert else None
        self.state_dir = state_dir
        self.nodes, self.gpus = nodes, gpus_per_node
        self.runtimes, self.docker_host = runtimes, docker_host
        self.catalog = catalog  # with the nodes' own shape, LOCAL
        size = catalog.get(LOCAL) if catalog is not None else None
        self.max_nodes = (size and size.max_nodes) or DEFAULT_LOCAL_MAX_NODES
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.heard_at = control.models.recorded_at  # the log's last event before this start
        self.watchers: dict[str, asyncio.Task] = {}  # node id -> its agent's _watch
        self.told: dict[str, str] = {}  # node id -> why its agent last failed to register
        self.stopping = False

    async def bootstrap(self) -> None:
        """The embedded workspace, experiment and cluster."""

        def revoke_stale(m: ReadModels):  # tokens of an earlier workspace of its name, which
            if WORKSPACE in m.workspaces:  # an older batchd let be deleted: they would reach
                return []  # the new one (commands.create_workspace refuses while they exist)
            stale = [t for t in m.tokens.values() if WORKSPACE in t.workspaces]
            if stale:
                logger.warning("local.stale_tokens_revoked", workspace=WORKSPACE,
                               tokens=sorted(t.name for t in stale))  # fmt: skip
            return [d for t in stale for d in revoke_token(m, t.token_id, ACTOR)]

        def decide(m: ReadModels):
            out = []
            if WORKSPACE not in m.workspaces:
                out += commands.create_workspace(m, WORKSPACE, ACTOR)
            return out

        await self.control.run(revoke_stale, structural=True)
        await self.control.run(decide, structural=True)

        def decide_rest(m: ReadModels):
            out = []
            if f"{WORKSPACE}/{EXPERIMENT}" not in m.experiments:
                out += commands.create_experiment(m, WORKSPACE, EXPERIMENT, ACTOR)
            if f"{WORKSPACE}/{CLUSTER}" not in m.cluster_ids:
                scale = {"manual": {"targetNodeCount": self.nodes}}
                document = {"vmSize": LOCAL, "scaleSettings": scale}
                out += commands.create_cluster(m, WORKSPACE, CLUSTER, document, ACTOR,
                                               self.catalog)  # fmt: skip
            return out

        await self._interrupt(restarted(self.heard_at), "node_lost")  # none runs now
        # a local cluster being deleted goes now (its nodes run nothing), and is made again
        await self.control.run(lambda m: commands.finish_deletions(m, ACTOR), structural=True)
        await self.control.run(decide_rest, structural=True)
        self._check_shape()
        await self._retire_shared_token()
        await self._retire_stray_tokens()

    def _check_shape(self) -> None:
        """Jobs are checked against the cluster's VM size: say so if a cluster made earlier
        (or with another `gpus_per_node`) has a shape other than its nodes'."""
        m = self.control.models
        cluster = m.clusters[m.cluster_ids[f"{WORKSPACE}/{CLUSTER}"]]
        size = self.catalog.get(cluster.vm_size)
        if size is None or size.gpus != self.gpus:
            logger.warning("local.cluster_shape", vm_size=cluster.vm_size,
                           gpus=size.gpus if size else None, gpus_per_node=self.gpus,
                           note="delete the cluster local to have it made again with "
                           "[local] gpus_per_node GPUs a node")  # fmt: skip
        if max_nodes(cluster.scale_settings) > self.max_nodes:  # set before there was a bound
            logger.warning("local.cluster_too_big", nodes=max_nodes(cluster.scale_settings),
                           max_nodes=self.max_nodes, note="no more than [local] max_nodes "
                           "local nodes run")  # fmt: skip
        target = (cluster.scale_settings.get("manual") or {}).get("targetNodeCount")
        if target is not None and target != self.nodes:  # [local] nodes made it, once
            logger.info("local.cluster_nodes", target_node_count=target, nodes=self.nodes,
                        note="the cluster keeps the node count its log holds; `batchd cluster "
                        "resize local --nodes N` changes it")  # fmt: skip

    async def _interrupt(self, error: dict[str, str], cause: str = "interrupted") -> None:
        """The local nodes' agents stop, or have stopped: each node still up is lost with
        `error`, and its attempts are queued again as `cause` (`interrupted` spends none of
        the job's retries; after a daemon that did not stop cleanly, `node_lost` does, so a
        job that brings its daemon down is not run again for ever)."""

        def decide(m: ReadModels) -> list:
            cluster = _local_cluster(m)
            return lose_nodes(m, cluster.nodes if cluster else (), error, cause)

        await self.control.run(decide, structural=True)

    async def _retire_stray_tokens(self) -> None:
        """Revoke the own tokens of local nodes the cluster does not have: an agent stopped
        before it registered, by a daemon that stopped then too, left its token valid (a
        node wanted again gets a new one as its agent starts)."""

        def kept(m: ReadModels) -> set[str]:
            cluster = _local_cluster(m)
            return set(cluster.nodes) if cluster is not None else set()

        await retire_local_tokens(self.control, self.state_dir, kept)

    async def _retire_shared_token(self) -> None:
        """Earlier versions gave every local agent one token that could speak for any node
        (`local-agents`, kept in `<state-dir>/agent.token`); each agent has its own bound
        one now: revoke it, and remove its file."""

        def decide(m: ReadModels):
            return [decision for t in list(m.tokens.values())
                    if t.name == LEGACY_TOKEN and t.role == "agent" and t.node is None
                    and t.created_by == ACTOR
                    for decision in revoke_token(m, t.token_id, ACTOR)]  # fmt: skip

        await self.control.run(decide, structural=True)
        try:
            (self.state_dir / "agent.token").unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("local.legacy_token_file", error=str(exc))

    def wanted(self) -> dict[str, int]:
        m = self.control.models
        cluster_id = m.cluster_ids.get(f"{WORKSPACE}/{CLUSTER}")
        return {} if cluster_id is None else {cluster_id: self._target(m)}

    def _target(self, m: ReadModels) -> int:
        cluster = _local_cluster(m)
        if cluster is None:
            return 0
        if cluster.deleting:  # its nodes drain, and go once they run nothing
            return 0
        if "autoScale" in cluster.scale_settings:
            target = autoscale_target(m, cluster, self.gpus, self.runtimes.split(","))
        else:
            target = int((cluster.scale_settings.get("manual") or {}).get("targetNodeCount", 0))
        return min(target, self.max_nodes)

    async def reconcile(self) -> None:
        """Keep the nodes that stay (staying_nodes) running, and let the others go."""
        if self.stopping:
            return
        m = self.control.models
        staying = self._staying(m)
        for node_id in staying:
            await self._keep(node_id)
        for node_id in sorted(_own_nodes(_local_cluster(m), self.processes) - set(staying)):
            await self._let_go(node_id)

    def _staying(self, m: ReadModels) -> list[str]:
        return staying_nodes(m, _local_cluster(m), self._target(m), self.processes)

    async def _keep(self, node_id: str) -> None:
        """A node that stays: its agent is started (again, if it exited), and if it was
        draining, it is wanted again (ready)."""
        process = self.processes.get(node_id)
        # one that exited is started again once _watch has told of its end (its node lost
        # as its agent's exit says, not as a new agent's registration would)
        if process is None or (process.returncode is not None and self.watchers[node_id].done()):
            self.processes[node_id] = await self._spawn(node_id)
        await self._node_event(node_id, "NodeRecovered", LEAVING)

    async def _let_go(self, node_id: str) -> None:
        """A node that goes: drained while it runs work (its jobs' fate is the cluster's
        nodeDeallocationOption), else its agent is stopped and the node removed at once. Its
        token is revoked either way, also when its agent was stopped before it registered
        (no node in the read models, but a token made for it)."""
        node = self.control.models.nodes.get(node_id)
        if node is not None and node.allocations:
            await self._deallocate(node_id)
            return  # stopped once it runs nothing
        if node is not None:  # removed first: its agent's leaving is then no node's loss
            await self._node_event(node_id, "NodeRemoved", node.state)
        process = self.processes.pop(node_id, None)
        self.told.pop(node_id, None)
        if process is not None:
            await self._stop(process)
        await self._revoke_credential(node_id)

    async def _deallocate(self, node_id: str) -> None:
        """Drain a node that goes, and end its jobs' attempts as the cluster's
        nodeDeallocationOption says: all as they are when the decision is taken (a node
        chosen to stay meanwhile keeps its jobs, and the option may have changed)."""

        def decide(m: ReadModels) -> list[Decision]:
            if node_id in self._staying(m):
                return []
            return deallocate(m, node_id, deallocation_option(_local_cluster(m)), ACTOR)

        if decide(self.control.models):  # most cycles: nothing to do, and no lock to take
            await self.control.run(decide, key=f"node/{node_id}")

    async def _revoke_credential(self, node_id: str) -> None:
        """A removed node's agent token goes with it: revoked, and its file deleted (a node
        wanted again later gets a new one)."""

        def chosen(m: ReadModels) -> list[Token]:
            return [t for t in m.tokens.values() if _node_token(t) and t.node == node_id]

        await _revoke_node_tokens(self.control, self.state_dir, chosen, key=f"node/{node_id}")
        (work_dir(self.state_dir, node_id) / "agent.token").unlink(missing_ok=True)

    async def _node_event(self, node_id: str, type_: str, when: str) -> None:
        """Append `type_` for the node if it is (still) in state `when`."""
        node = self.control.models.nodes.get(node_id)
        if node is None or node.state != when:
            return  # most cycles: nothing to do, and no need to take the node's lock

        def decide(m: ReadModels) -> list:
            node = m.nodes.get(node_id)
            if node is None or node.state != when:
                return []
            return [(f"node-{node_id}", NewEvent(type_, {"nodeId": node_id}, ACTOR))]

        await self.control.run(decide, key=f"node/{node_id}")

    async def _spawn(self, node_id: str) -> asyncio.subprocess.Process:
        work = work_dir(self.state_dir, node_id)
        work.mkdir(parents=True, exist_ok=True)
        token = work / "agent.token"  # the node's own credential: it speaks for this node only
        await token_file(self.control, token, "agent", _token_name(node_id), ACTOR, node_id)
        log = open(work / "agent.log", "ab")  # noqa: SIM115 (the child keeps it open)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchd.scheduler.cli", "agent", "--server", self.url,
                "--token-file", str(token), "--node-id", node_id,
                "--cluster", f"{WORKSPACE}/{CLUSTER}", "--gpus", str(self.gpus),
                "--runtimes", self.runtimes, "--work-dir", str(work),
                *(("--docker-host", self.docker_host) if self.docker_host else ()),
                *(("--cacert", str(self.cacert)) if self.cacert else ()),
                *(("--tls-server-name", self.server_name) if self.server_name else ()),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=_agent_env(),
            )  # fmt: skip
        finally:
            log.close()
        logger.info("local.agent_started", node=node_id, pid=process.pid)
        self.watchers[node_id] = asyncio.create_task(self._watch(node_id, process))
        return process

    async def _watch(self, node_id: str, process: asyncio.subprocess.Process) -> None:
        """An agent that exits unasked (killed, crashed): its node is lost as soon as its
        watchdog has ended its tasks (it holds the work directory's lock until then: a
        container's removal takes a moment), and its attempts requeued, rather than after
        the daemon has waited out its silence. The next reconcile starts a new agent."""
        code = await process.wait()
        if self.stopping or self.processes.get(node_id) is not process:
            return  # stopped on purpose
        logger.warning("local.agent_exited", node=node_id, code=code)
        if not await self._watchdog_done(node_id, process):
            return  # a new agent of the node has started: its registration loses the old one's
        if node_id not in self.control.models.nodes:  # it never registered: tell why, once
            await self._unregistered(node_id, code)
            return
        self.told.pop(node_id, None)  # it had registered: a later failure is news again
        error = {"code": "agent_exited", "message": f"its agent exited with {code}"}
        told = {"code": "agent_exited",  # (what its jobs' timelines say)
                "message": f"node {node_id} was lost: its agent exited with {code}"}  # fmt: skip

        try:
            await self.control.run(lambda m: lose_node(m, node_id, error, job_error=told),
                                   key=f"node/{node_id}")  # fmt: skip
        except Exception as exc:  # (the log fenced or closed): its silence tells in time
            logger.warning("local.agent_exit_not_logged", node=node_id, error=str(exc))

    async def _watchdog_done(self, node_id: str, process: asyncio.subprocess.Process) -> bool:
        """Wait until a dead agent's watchdog has let go of the work directory's lock (it
        holds it until it has ended the agent's tasks: a container takes a moment to
        remove), LOCK_WAIT at most: never two attempts of a job at once, the old one ends
        before its retry starts. False if meanwhile a new agent of the node has started
        (or the provider stops): that one waited for the same lock, and its registration,
        under a new incarnation, ends the old agent's attempts."""
        work = work_dir(self.state_dir, node_id)
        deadline = time.monotonic() + watchdog.LOCK_WAIT
        while not watchdog.released(work):
            if self.stopping or self.processes.get(node_id) is not process:
                return False
            if time.monotonic() > deadline:
                logger.warning("local.watchdog_slow", node=node_id, seconds=watchdog.LOCK_WAIT)
                break
            await asyncio.sleep(0.05)
        return not self.stopping and self.processes.get(node_id) is process

    async def _unregistered(self, node_id: str, code: int) -> None:
        """An agent that exited before its node registered (it could not reach its container
        engine, say) is started again at every reconcile: its cluster's errors tell why
        (its log's last line), once per node while its reason stays the same: however
        many nodes fail, and also after a restart while the cluster's errors still hold it."""
        log = work_dir(self.state_dir, node_id) / "agent.log"
        why = _last_line(log).removeprefix("batchd: error: ")
        message = (f"the agent of node {node_id} exited with {code} before it registered"
                   f"{': ' + why if why else ''} ({log})")  # fmt: skip
        error = {"code": "agent_exited", "message": message}
        if self.told.get(node_id) == message:
            return

        def decide(m: ReadModels) -> list[Decision]:
            cluster = _local_cluster(m)
            if cluster is None or any(e.get("message") == message for e in cluster.errors):
                return []
            data = {"clusterId": cluster.cluster_id, "error": error}
            return [(f"cluster-{cluster.workspace}/{cluster.name}",
                     NewEvent("ClusterErrorRecorded", data, ACTOR))]  # fmt: skip

        try:
            await self.control.run(decide)
        except Exception as exc:  # (the log fenced or closed): its agent log tells
            logger.warning("local.agent_exit_not_logged", node=node_id, error=str(exc))
            return
        self.told[node_id] = message

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop(self) -> None:
        self.stopping = True  # no agent is started again from now on
        try:
            await self._interrupt(STOPPED)
        except Exception as exc:  # (fenced out, the log gone): the agents stop all the same
            logger.warning("local.interruption_not_logged", error=str(exc))
        await asyncio.gather(*(self._stop(p) for p in self.processes.values()))
        self.processes.clear()


def _last_line(path: Path, most: int = 4096) -> str:
    """The last non-blank line of a log (of its last `most` bytes), at most 300 characters."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - most))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


async def retire_local_tokens(
    control: Control, state_dir: Path, kept: Callable[[ReadModels], set[str]] | None = None
) -> None:
    """Revoke the tokens the daemon made for local nodes' agents (a user's own stay), but
    those of the nodes `kept` names, and remove their files. A daemon that runs no local
    nodes (`[local] nodes = 0`, no `kept`) keeps none: no agent of its will use them."""

    def chosen(m: ReadModels) -> list[Token]:
        keep = kept(m) if kept is not None else set()
        return [t for t in m.tokens.values()
                if _node_token(t) and t.created_by == ACTOR and t.node not in keep]  # fmt: skip

    await _revoke_node_tokens(control, state_dir, chosen)


async def _revoke_node_tokens(control: Control, state_dir: Path,
                              chosen: Callable[[ReadModels], list[Token]],
                              key: str = "") -> None:  # fmt: skip
    """Revoke the local nodes' agent tokens `chosen` picks from the read models (under the
    node's lock `key`, else structurally), and remove those nodes' token files."""
    nodes: list[str] = []

    def decide(m: ReadModels) -> list[Decision]:
        tokens = chosen(m)
        nodes[:] = [t.node for t in tokens]
        return [d for t in tokens for d in revoke_token(m, t.token_id, ACTOR)]

    await control.run(decide, structural=not key, key=key)
    for node_id in nodes:
        (work_dir(state_dir, node_id) / "agent.token").unlink(missing_ok=True)


def work_dir(state_dir: Path, node_id: str) -> Path:
    """A local node's directory: its agent's work directory, token and log."""
    return state_dir / "nodes" / node_id


def _local_cluster(m: ReadModels) -> Cluster | None:
    return m.clusters.get(m.cluster_ids.get(f"{WORKSPACE}/{CLUSTER}", ""))


def staying_nodes(m: ReadModels, cluster: Cluster | None, target: int,
                  running: Iterable[str]) -> list[str]:  # fmt: skip
    """The local nodes that stay for a target of `target` nodes, by number: of the cluster's
    nodes and those of the agents `running` (_own_nodes), those running work first, then
    ready idle ones, then the others, lowest number first within each; if they are fewer than
    `target`, new ones with the lowest numbers none of them has. The others go. Chosen from
    the read models alone, so the same at every cycle while they do not change: a node that
    goes runs work (an idle one goes at once), and only ever stays instead of one that has
    become idle, or been lost, meanwhile."""
    present = sorted(_own_nodes(cluster, running), key=lambda node_id: _rank(m, node_id))
    kept = present[:target]
    taken = {node_number(node_id) for node_id in present}
    free = (number for number in itertools.count() if number not in taken)
    kept += [f"{CLUSTER}-{next(free)}" for _ in range(target - len(kept))]
    return sorted(kept, key=node_number)


def _own_nodes(cluster: Cluster | None, running: Iterable[str]) -> set[str]:
    """The local nodes (`local-N`) in the cluster (also those of a previous run) or running
    an agent. A node of another id (joined by hand) is none of the provider's business."""
    logged = cluster.nodes if cluster is not None else ()
    return {node_id for node_id in (*logged, *running)
            if node_id == f"{CLUSTER}-{node_number(node_id)}"}  # fmt: skip


def _rank(m: ReadModels, node_id: str) -> tuple[int, int]:
    """How much a node is worth keeping (lowest first): running work (a job's placed attempt,
    not one requeued or being terminated whose tasks are still stopping: a node whose work was
    deallocated stays gone), then ready and idle, then any other (joining, lost, not
    registered yet); by number within each."""
    node = m.nodes.get(node_id)
    if node is not None and node.allocations and _placed_attempts(m, node_id):
        tier = 0
    elif node is not None and node.state == READY:
        tier = 1
    else:
        tier = 2
    return tier, node_number(node_id)


def lose_nodes(m: ReadModels, node_ids: Iterable[str], error: dict[str, str],
               cause: str) -> list[Decision]:  # fmt: skip
    """lose_node for each of `node_ids` at once: an attempt that ran on several of them (a
    multi-node job's) meets its fate once, not once a node."""
    out: list[Decision] = []
    decided: set[tuple[str, str, Any]] = set()  # (job stream, event type, attempt)
    for node_id in node_ids:
        for stream, event in lose_node(m, node_id, error, cause, error):
            key = (stream, event.type, event.data.get("attempt"))
            if stream.startswith("job-") and key in decided:
                continue
            decided.add(key)
            out.append((stream, event))
    return out


def deallocation_option(cluster: Cluster | None) -> str:
    """What becomes of the jobs of a node that goes when the cluster shrinks: its manual
    settings' `nodeDeallocationOption` (Batch AI's default: `requeue`). A cluster being
    deleted, or scaling itself (`autoScale` has no such option), waits for them."""
    manual = cluster.scale_settings.get("manual") if cluster is not None else None
    if manual is None or cluster.deleting:
        return WAIT
    return manual.get("nodeDeallocationOption", REQUEUE)


def deallocate(m: ReadModels, node_id: str, option: str, actor: str) -> list[Decision]:
    """For a node that goes (not among staying_nodes) that still holds work:
    NodeDrainRequested if it is ready (it takes no new work), and by `option` the end of each
    attempt placed on it (an attempt being terminated already is left to end): `requeue`
    queues it again as `interrupted`, which spends none of the job's retries; `terminate`
    terminates the job; `waitforjobcompletion` lets it run to its end. Nothing once all that
    is done."""
    node = m.nodes.get(node_id)
    if node is None:
        return []
    out: list[Decision] = []
    if node.state == READY:
        drain = NewEvent("NodeDrainRequested", {"nodeId": node_id}, actor)
        out.append((f"node-{node_id}", drain))
    if option == WAIT:
        return out
    message = (f"node {node_id} was deallocated: its cluster scaled down "
               f"(nodeDeallocationOption {option})")  # fmt: skip
    for job_id, attempt in _placed_attempts(m, node_id):
        if option == TERMINATE:
            out += commands.terminate(m.jobs[job_id], actor, message)
        else:
            error = {"code": "node_deallocated", "message": message}
            out += retries.attempt_ended(m, job_id, attempt, "interrupted", error=error)
    for _stream, event in out:
        event.actor = actor
    return out


def _placed_attempts(m: ReadModels, node_id: str) -> list[tuple[str, int]]:
    """(job, attempt) of each job's current attempt placed on the node (scheduled, preparing
    or running), not one being terminated or a task of an earlier attempt still stopping."""
    node = m.nodes[node_id]
    held = sorted({(job_id, attempt) for job_id, attempt, _task in node.allocations.values()})
    return [(job_id, attempt) for job_id, attempt in held
            if (job := m.jobs.get(job_id)) is not None and job.attempt == attempt
            and job.state in lifecycle.PLACED]  # fmt: skip


def autoscale_target(m: ReadModels, cluster: Cluster, gpus_per_node: int,
                     runtimes: Collection[str]) -> int:  # fmt: skip
    """How many nodes an `autoScale` cluster wants now: those that run work, and enough for
    its queued jobs (a one-node job that fits beside the work of a busy ready node, none;
    the others' GPUs packed onto whole nodes; a job without GPUs, or a gang, takes whole
    nodes; a job that asks more GPUs a node than the nodes have, a runtime they do not
    offer, or more nodes than `maximumNodeCount` (lowered after it was submitted: it waits
    with `cluster_too_small`), none), within `minimumNodeCount` and `maximumNodeCount`."""
    auto = cluster.scale_settings["autoScale"]
    busy = [m.nodes[node_id] for node_id in cluster.nodes if m.nodes[node_id].allocations]
    spare = sorted(len(free_gpus(node)) for node in busy if node.state == READY)
    gpus = whole = widest = 0
    for job in queue.ordered(m, cluster.cluster_id):
        if (job.gpus_per_node > gpus_per_node or job.runtime not in runtimes
                or job.node_count > auto["maximumNodeCount"]):  # fmt: skip
            continue  # no node of this cluster can ever run it: none is started for it
        if job.node_count == 1 and job.gpus_per_node and _take(spare, job.gpus_per_node):
            continue  # it is placed beside running work: no node is started for it
        widest = max(widest, job.node_count)
        if job.gpus_per_node and gpus_per_node:
            gpus += job.gpus_per_node * job.node_count
        else:
            whole += job.node_count
    wanted = max(whole + (-(-gpus // gpus_per_node) if gpus_per_node else 0), widest)
    return max(auto["minimumNodeCount"], min(auto["maximumNodeCount"], len(busy) + wanted))


def _take(spare: list[int], need: int) -> bool:
    """Take `need` GPUs from the fullest node of `spare` (free GPUs a node, ascending) that
    has them; False if none has."""
    at = bisect.bisect_left(spare, need)
    if at == len(spare):
        return False
    bisect.insort(spare, spare.pop(at) - need)
    return True


def _token_name(node_id: str) -> str:
    """The name of a local node's own agent token."""
    return f"local-agent-{node_id}"


def _node_token(token: Token) -> bool:
    """Is `token` a local node's own (`_token_name`, or `-N` after it where that was taken)?"""
    return (token.role == "agent" and token.node is not None
            and token.name.startswith(_token_name(token.node)))  # fmt: skip


def _agent_env() -> dict[str, str]:
    """A local agent's environment: the daemon's, less its secret keys (an agent needs none,
    and its environment is readable by what runs as its user), plus the daemon's pid."""
    env = {k: v for k, v in os.environ.items() if k != config.KEYS_ENV}
    env[PARENT_ENV] = str(os.getpid())
    return env
