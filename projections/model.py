"""The read models: the state every projection folds the log into.

One `ReadModels` object holds them all, each a plain dict keyed by id, so that the handlers
(projections/clusters.py, nodes.py, jobs.py, ...) can read what they need of the others while
each writes only its own part. Entities are mutable slotted dataclasses: replay applies
hundreds of thousands of events a second, so handlers update in place.

Times are integer microseconds since the Unix epoch (the `recorded_at` of the event that set
them). Every field is a plain value, list or dict, so that snapshots (projections/snapshot.py)
can store and restore the whole state exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Node states, and the Batch AI node-state count each falls under.
PROVISIONING = "provisioning"  # asked for, not registered yet
PREPARING = "preparing"  # registered, running its setup task
READY = "ready"  # takes work: counted as idle or running
UNUSABLE = "unusable"  # setup failed
SUSPECT = "suspect"  # missed heartbeats
LOST = "lost"  # timed out; its attempts are requeued
LEAVING = "leaving"  # draining or evicted, about to be removed
NODE_COUNT_OF = {
    PROVISIONING: "preparing",
    PREPARING: "preparing",
    UNUSABLE: "unusable",
    SUSPECT: "unusable",
    LOST: "unusable",
    LEAVING: "leaving",
}
NODE_COUNTS = ("idle", "running", "preparing", "unusable", "leaving")

# Job states (DESIGN.md "Job lifecycle") and Batch AI's executionState for each.
QUEUED, SCHEDULED, PREPARING_JOB, RUNNING = "queued", "scheduled", "preparing", "running"
TERMINATING, SUCCEEDED, FAILED = "terminating", "succeeded", "failed"
LIVE_STATES = frozenset({QUEUED, SCHEDULED, PREPARING_JOB, RUNNING, TERMINATING})
ATTEMPT_STATES = frozenset({SCHEDULED, PREPARING_JOB, RUNNING, TERMINATING})  # hold GPUs
EXECUTION_STATE = {
    QUEUED: "queued",
    SCHEDULED: "queued",
    PREPARING_JOB: "running",
    RUNNING: "running",
    TERMINATING: "terminating",
    SUCCEEDED: "succeeded",
    FAILED: "failed",
}

# Retry causes: each has its own ledger entry and ceiling (DESIGN.md "Job lifecycle").
RETRY_CAUSES = ("exit_code", "node_lost", "evicted", "preempted", "interrupted")


@dataclass(slots=True)
class Workspace:
    name: str
    created_at: int
    created_by: str


@dataclass(slots=True)
class Experiment:
    workspace: str
    name: str
    created_at: int
    created_by: str


@dataclass(slots=True)
class Cluster:
    cluster_id: str
    workspace: str
    name: str
    vm_size: str
    vm_priority: str
    scale_settings: dict[str, Any]
    created_at: int
    created_by: str
    allocation_state: str = "steady"  # steady | resizing
    deleting: bool = False
    nodes: list[str] = field(default_factory=list)  # node ids, in the order they appeared
    errors: list[dict[str, Any]] = field(default_factory=list)
    preemption: bool = False  # may the scheduler preempt preemptible lower-priority jobs


@dataclass(slots=True)
class Node:
    node_id: str
    cluster: str  # cluster id
    state: str
    since: int  # when it entered `state`
    last_event: str  # type of its last transition
    gpus: int = 0
    gpu_model: str = ""
    gpu_memory_mb: int = 0  # each GPU's, as the agent found it (0: unknown, or simulated)
    cpus: int = 0
    memory_mb: int = 0
    runtimes: list[str] = field(default_factory=list)
    agent_version: str = ""
    address: str = ""  # how the other nodes of a multi-node job reach it
    incarnation: int = 0
    draining: bool = False  # asked to drain: it takes no new work, even after it recovers
    # GPU index (as a string key, for snapshots; "*": the whole node, held by a task that
    # needs no GPU) -> [job id, attempt, task index]
    allocations: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    # the setup task's last run: state (running, succeeded, failed), outputDir, exitCode, tail
    setup: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Job:
    job_id: str
    workspace: str
    experiment: str
    name: str
    cluster: str  # cluster id
    owner: str
    priority: int
    node_count: int
    gpus_per_node: int
    submitted_at: int
    submitted_position: int  # queue order within a priority
    max_retries: int = 0
    max_node_failure_retries: int = 3
    preemptible: bool = False
    max_wall_clock_s: int | None = None
    state: str = QUEUED
    attempt: int = 0
    retries: dict[str, int] = field(default_factory=dict)  # cause -> requeues so far
    pending_reason: dict[str, Any] | None = None
    tasks: list[list[Any]] = field(default_factory=list)  # [node id, [GPU indices]] per task
    task_exits: dict[str, int] = field(default_factory=dict)  # task index -> exit code
    scheduled_at: int | None = None
    started_at: int | None = None
    ended_at: int | None = None
    exit_code: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    terminate_requested_by: str | None = None
    terminate_reason: str | None = None  # why it is being terminated (the request's reason)
    # who deleted it while it was live: it is deleted once it has ended and its tasks stopped
    delete_requested_by: str | None = None
    pending_reason_at: int = 0  # when the current pending reason was recorded
    runtime: str = "process"  # what its nodes must offer: "docker" for containerSettings
    detached: bool = False  # its experiment was deleted while it ran: it ends out of sight
    # [attempt, task, node id] of an earlier attempt's tasks that still hold their GPUs until
    # they are seen to stop (projections/allocation.py)
    stopping: list[list[Any]] = field(default_factory=list)
    cluster_path: str = ""  # its cluster's `workspace/name` when submitted (kept if deleted)


@dataclass(slots=True)
class Token:
    token_id: str
    name: str
    role: str  # viewer | operator | admin | agent
    workspaces: list[str]  # the only workspaces it may use; empty: all
    hash: str  # SHA-256 of the token, hex
    created_at: int
    created_by: str
    node: str | None = None  # an agent token bound to one node: it speaks for that node only


@dataclass(slots=True)
class ReadModels:
    """Everything the log says now (as of `position`)."""

    position: int = 0
    recorded_at: int = 0
    workspaces: dict[str, Workspace] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)  # "ws/exp"
    clusters: dict[str, Cluster] = field(default_factory=dict)  # by cluster id
    cluster_ids: dict[str, str] = field(default_factory=dict)  # "ws/name" -> live cluster id
    nodes: dict[str, Node] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)  # live and ended, not deleted
    # "ws/exp/name" -> every job id that ever had the name, oldest first (deleted ones too)
    job_ids: dict[str, list[str]] = field(default_factory=dict)
    # cluster id -> queued job id -> its queue key (-priority, submitted_position)
    queues: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)  # by token id
    token_hashes: dict[str, str] = field(default_factory=dict)  # SHA-256 hex -> token id


def job_key(workspace: str, experiment: str, name: str) -> str:
    return f"{workspace}/{experiment}/{name}"
