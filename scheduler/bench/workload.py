"""A deterministic, realistic cluster log: the input of the benchmarks and of projection tests.

`cluster_log(events, seed)` simulates a small Batch AI style installation and yields the appends
a daemon would make, in order, as `(stream, [NewEvent])`. Everything random (ids, job shapes,
outcomes, node losses) comes from one seeded `random.Random`, so a seed always gives the same
log, event ids included. Ids are time-ordered (uuid version 7, like `envelope.new_event_id`) on a
simulated clock.

The world: three workspaces with two experiments each and one cluster each (Standard_NC24s_v3,
4 GPUs per node). Nodes are provisioned, register, run their setup and become ready. Jobs are
submitted by `user:alice`, wait with a pending reason while no placement fits (priority order,
smaller jobs may backfill), are scheduled onto GPUs, prepare, start and end (most succeed). About
six events per job. Now and then a node's heartbeat times out: it is lost and removed, its jobs
are requeued and rescheduled with the next attempt, and a replacement node is provisioned.

Data keys are camelCase, as in the API. The `cluster` field of node and job events holds the
cluster's id (`ClusterCreated.clusterId`), not its name, because names can be reused after a
delete. Job events carry the JobSubmitted event's id as `correlation_id` and the job's
previous event's id as `causation_id`.
"""

from __future__ import annotations

import bisect
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from batchd.events.envelope import NewEvent, uuid7

Append = tuple[str, list[NewEvent]]

WORKSPACES = {
    "vision": ("resnet-sweep", "detr-finetune"),
    "speech": ("conformer", "wav2vec-pretrain"),
    "nlp": ("llama-lora", "bert-distill"),
}
CLUSTERS = (("vision", "nc24-a", 8), ("speech", "nc24-b", 6), ("nlp", "nc24-c", 10))
GPUS_PER_NODE = 4
NODE_SETUP = ("NodeRegistered", "NodeSetupStarted", "NodeSetupSucceeded")
JOB_STAGES = ("JobPreparing", "JobStarted")

SUBMIT_RATE = 0.4  # chance that a step submits a job (when queues have room)
MAX_PENDING = 40  # queued jobs per cluster before submitters wait
NODE_LOSS_RATE = 0.004  # chance that a step loses a ready node
FAILURE_RATE = 0.08  # share of jobs whose process exits non-zero
SECRET_RATE = 0.2  # share of jobs submitted with a secret environment variable
SHAPES = ((1, 1), (1, 1), (1, 2), (1, 2), (1, 4), (2, 4))  # (nodeCount, gpusPerNode)
PRIORITIES = (-500, 0, 0, 0, 500)
IMAGES = (
    "pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
    "nvcr.io/nvidia/pytorch:24.05-py3",
    "tensorflow/tensorflow:2.16.1-gpu",
)
USER = "user:alice"
START_MS = 1_717_200_000_000  # the simulated clock's start (2024-06-01, Unix milliseconds)
STEP_MS = 500  # mean milliseconds between two steps of the simulation
SCHEDULER = "scheduler"


@dataclass(slots=True, eq=False)
class _Node:
    node_id: str
    cluster: _Cluster
    free: list[int] = field(default_factory=lambda: list(range(GPUS_PER_NODE)))
    stage: int = 0  # index into NODE_SETUP of the next setup event
    ready: bool = False


@dataclass(slots=True, eq=False)
class _Job:
    job_id: str
    cluster: _Cluster
    node_count: int
    gpus_per_node: int
    priority: int
    seq: int
    correlation: uuid.UUID
    last: uuid.UUID  # the job's latest event id (the next one's causation)
    attempt: int = 0
    stage: int = 0  # index into JOB_STAGES of the next event while running
    tasks: list[tuple[_Node, list[int]]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Cluster:
    cluster_id: str
    workspace: str
    name: str
    nodes: list[_Node] = field(default_factory=list)
    pending: list[_Job] = field(default_factory=list)


def cluster_log(events: int, seed: int = 7) -> Iterator[Append]:
    """Yield about `events` events (never fewer) as the appends a daemon would make, in order.

    Every append holds one event; the same `seed` yields the same log, event ids included.
    """
    sim = _Simulation(random.Random(seed))
    count = 0
    sim.setup()
    while True:
        for append in sim.drain():
            yield append
            count += len(append[1])
        if count >= events:
            return
        sim.step()


def payload_mix(events: int, seed: int = 7) -> list[NewEvent]:
    """Exactly `events` events with the types, data and actors of `cluster_log`, in its order,
    but with fresh event ids (NewEvent's default), so they can be appended to any log again."""
    mix: list[NewEvent] = []
    for _stream, batch in cluster_log(events, seed):
        for e in batch:
            mix.append(NewEvent(e.type, e.data, e.actor, e.correlation_id, e.causation_id))
    return mix[:events]


class _Simulation:
    """The world's state and its transitions; each transition queues the appends it causes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.clusters: list[_Cluster] = []
        self.busy: list[_Job | _Node] = []  # running jobs and nodes in setup: what can advance
        self.out: list[Append] = []
        self.seq = 0
        self.clock_ms = START_MS

    # -- plumbing --------------------------------------------------------------------------
    def uuid(self) -> uuid.UUID:
        """A time-ordered id (like `envelope.new_event_id`) on the simulated clock."""
        return uuid7(self.clock_ms, self.rng.getrandbits(80))

    def emit(
        self,
        stream: str,
        type_: str,
        data: dict[str, Any],
        actor: str = SCHEDULER,
        correlation: uuid.UUID | None = None,
        causation: uuid.UUID | None = None,
    ) -> uuid.UUID:
        event = NewEvent(type_, data, actor, correlation, causation, self.uuid())
        self.out.append((stream, [event]))
        return event.event_id

    def emit_job(
        self,
        job: _Job,
        type_: str,
        data: dict[str, Any],
        actor: str = SCHEDULER,
        causation: uuid.UUID | None = None,
    ) -> None:
        cause = causation or job.last
        job.last = self.emit(f"job-{job.job_id}", type_, data, actor, job.correlation, cause)

    def drain(self) -> list[Append]:
        out, self.out = self.out, []
        return out

    # -- the world -------------------------------------------------------------------------
    def setup(self) -> None:
        for workspace, experiments in WORKSPACES.items():
            self.emit(f"workspace-{workspace}", "WorkspaceCreated", {"workspace": workspace}, USER)
            for experiment in experiments:
                data = {"workspace": workspace, "experiment": experiment}
                self.emit(f"experiment-{workspace}/{experiment}", "ExperimentCreated", data, USER)
        for workspace, name, size in CLUSTERS:
            cluster = _Cluster(str(self.uuid()), workspace, name)
            self.clusters.append(cluster)
            data = _cluster_data(cluster, size)
            self.emit(f"cluster-{workspace}/{name}", "ClusterCreated", data, USER)
            for _ in range(size):
                self.provision(cluster)

    def step(self) -> None:
        """One transition: lose a node, submit a job, or advance a running job or node setup."""
        rng = self.rng
        self.clock_ms += rng.randrange(1, 2 * STEP_MS)
        roll = rng.random()
        if roll < NODE_LOSS_RATE and self.lose_node():
            return
        open_clusters = [c for c in self.clusters if len(c.pending) < MAX_PENDING]
        if open_clusters and (roll < SUBMIT_RATE or not self.busy):
            self.submit(rng.choice(open_clusters))
        elif self.busy:
            self.advance(rng.randrange(len(self.busy)))
        else:
            self.submit(rng.choice(self.clusters))

    def advance(self, index: int) -> None:
        item = self.busy[index]
        if isinstance(item, _Node):
            self.setup_step(item, index)
        else:
            self.run_step(item, index)

    def finish(self, index: int) -> None:
        """Remove busy item `index` (swap with the last, order does not matter)."""
        self.busy[index] = self.busy[-1]
        self.busy.pop()

    # -- nodes -----------------------------------------------------------------------------
    def provision(self, cluster: _Cluster) -> None:
        node = _Node(f"tvm-{self.rng.getrandbits(40):010x}", cluster)
        cluster.nodes.append(node)
        self.busy.append(node)
        data = {"nodeId": node.node_id, "cluster": cluster.cluster_id}
        self.emit(f"node-{node.node_id}", "NodeProvisioning", data)

    def setup_step(self, node: _Node, index: int) -> None:
        type_ = NODE_SETUP[node.stage]
        data = _registration(node) if type_ == "NodeRegistered" else {"nodeId": node.node_id}
        self.emit(f"node-{node.node_id}", type_, data, f"agent:{node.node_id}")
        node.stage += 1
        if node.stage == len(NODE_SETUP):
            node.ready = True
            self.finish(index)
            self.schedule(node.cluster)

    def lose_node(self) -> bool:
        """A ready node stops heartbeating: requeue its jobs, remove it, provision another."""
        cluster = self.rng.choice(self.clusters)
        ready = [n for n in cluster.nodes if n.ready]
        if not ready:
            return False
        node = self.rng.choice(ready)
        stream = f"node-{node.node_id}"
        data = {"nodeId": node.node_id, "reason": "heartbeat_timeout"}
        lost = self.emit(stream, "NodeLost", data)
        victims = [j for j in self.busy if isinstance(j, _Job) and _runs_on(j, node)]
        for job in victims:
            self.release(job)
            data = {"jobId": job.job_id, "attempt": job.attempt, "cause": "node_lost"}
            self.emit_job(job, "JobRequeued", data, causation=lost)
        self.emit(stream, "NodeRemoved", {"nodeId": node.node_id})
        cluster.nodes.remove(node)
        self.provision(cluster)
        for job in victims:
            self.enqueue(job)
        return True

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, cluster: _Cluster) -> None:
        rng = self.rng
        node_count, gpus = rng.choice(SHAPES)
        self.seq += 1
        job_id = str(self.uuid())
        event_id = self.uuid()
        priority = rng.choice(PRIORITIES)
        job = _Job(job_id, cluster, node_count, gpus, priority, self.seq, event_id, event_id)
        data = self.submission(job)
        event = NewEvent("JobSubmitted", data, USER, event_id=event_id)
        self.out.append((f"job-{job_id}", [event]))
        self.enqueue(job)

    def submission(self, job: _Job) -> dict[str, Any]:
        rng = self.rng
        workspace = job.cluster.workspace
        experiment = rng.choice(WORKSPACES[workspace])
        epochs = rng.choice((10, 30, 90))
        spec: dict[str, Any] = {
            "nodeCount": job.node_count,
            "containerSettings": {"imageSourceRegistry": {"image": rng.choice(IMAGES)}},
            "customToolkitSettings": {
                "commandLine": f"python train.py --lr {rng.choice((0.1, 0.01, 0.001))} "
                f"--epochs {epochs} --batch-size {rng.choice((64, 128, 256))}"
            },
            "environmentVariables": [
                {"name": "EPOCHS", "value": str(epochs)},
                {"name": "DATA_DIR", "value": f"/mnt/data/{workspace}"},
            ],
        }
        if rng.random() < SECRET_RATE:
            spec["secrets"] = [{"name": "WANDB_API_KEY", "value": f"{rng.getrandbits(160):040x}"}]
        return {
            "jobId": job.job_id, "workspace": workspace, "experiment": experiment,
            "name": f"{experiment}-{job.seq}", "cluster": job.cluster.cluster_id,
            "owner": "alice", "priority": job.priority, "nodeCount": job.node_count,
            "gpusPerNode": job.gpus_per_node, "spec": spec,
        }  # fmt: skip

    def enqueue(self, job: _Job) -> None:
        """Queue `job` (new or requeued) and schedule; if it must wait, say why."""
        cluster = job.cluster
        bisect.insort(cluster.pending, job, key=_queue_order)
        self.schedule(cluster)
        if job in cluster.pending:
            reason = {"code": "insufficient_gpus", "need": job.gpus_per_node}
            self.emit_job(job, "JobPendingReasonChanged", {"jobId": job.job_id, "reason": reason})

    def schedule(self, cluster: _Cluster) -> None:
        """Place queued jobs in priority order; a job that does not fit lets smaller ones by."""
        misfits: set[tuple[int, int]] = set()  # shapes that did not fit: skip their like
        for job in list(cluster.pending):
            shape = (job.node_count, job.gpus_per_node)
            if shape in misfits:
                continue
            tasks = _place(cluster, job)
            if tasks is None:
                misfits.add(shape)
                continue
            cluster.pending.remove(job)
            job.attempt += 1
            job.stage = 0
            job.tasks = tasks
            self.busy.append(job)
            placed = [{"node": n.node_id, "gpus": g} for n, g in tasks]
            data = {"jobId": job.job_id, "attempt": job.attempt, "tasks": placed}
            self.emit_job(job, "JobScheduled", data)

    def run_step(self, job: _Job, index: int) -> None:
        agent = f"agent:{job.tasks[0][0].node_id}"
        data: dict[str, Any] = {"jobId": job.job_id, "attempt": job.attempt}
        if job.stage < len(JOB_STAGES):
            self.emit_job(job, JOB_STAGES[job.stage], data, agent)
            job.stage += 1
            return
        if self.rng.random() < FAILURE_RATE:
            code = self.rng.choice((1, 2, 137))
            error = {"code": "task_failed", "message": f"process exited with code {code}"}
            self.emit_job(job, "JobFailed", {**data, "exitCode": code, "error": error}, agent)
        else:
            self.emit_job(job, "JobSucceeded", {**data, "exitCode": 0}, agent)
        self.finish(index)
        self.release(job)
        self.schedule(job.cluster)

    def release(self, job: _Job) -> None:
        """Give the job's GPUs back (and take it off the busy list if it is there)."""
        for node, gpus in job.tasks:
            node.free.extend(gpus)
            node.free.sort()
        job.tasks = []
        if job in self.busy:
            self.busy.remove(job)


def _cluster_data(cluster: _Cluster, size: int) -> dict[str, Any]:
    spec = {
        "vmSize": "Standard_NC24s_v3",
        "vmPriority": "dedicated",
        "scaleSettings": {"manual": {"targetNodeCount": size}},
    }
    return {
        "clusterId": cluster.cluster_id,
        "workspace": cluster.workspace,
        "name": cluster.name,
        "spec": spec,
    }


def _registration(node: _Node) -> dict[str, Any]:
    return {
        "nodeId": node.node_id, "cluster": node.cluster.cluster_id, "gpus": GPUS_PER_NODE,
        "gpuModel": "Tesla V100-PCIE-16GB", "cpus": 24, "memoryMb": 458_752,
        "runtimes": ["process"], "agentVersion": "0.1.0", "incarnation": 1,
    }  # fmt: skip


def _runs_on(job: _Job, node: _Node) -> bool:
    return any(n is node for n, _gpus in job.tasks)


def _queue_order(job: _Job) -> tuple[int, int]:
    return (-job.priority, job.seq)


def _place(cluster: _Cluster, job: _Job) -> list[tuple[_Node, list[int]]] | None:
    """Best fit: the ready nodes with the fewest free GPUs that still hold the job's share."""
    fits = [n for n in cluster.nodes if n.ready and len(n.free) >= job.gpus_per_node]
    if len(fits) < job.node_count:
        return None
    fits.sort(key=lambda n: len(n.free))
    tasks = []
    for node in fits[: job.node_count]:
        gpus = node.free[: job.gpus_per_node]
        del node.free[: job.gpus_per_node]
        tasks.append((node, gpus))
    return tasks
