"""The read models as JSON-ready documents: what `batchd replay` prints (and the API serves).

Keys are camelCase as in Batch AI's API; times are ISO-8601 UTC.
"""

from __future__ import annotations

from typing import Any

from batchd.events.timeutil import to_iso
from batchd.projections import clusters, queue
from batchd.projections.model import EXECUTION_STATE, Cluster, Job, Node, ReadModels, job_key


def _time(us: int | None) -> str | None:
    return None if us is None else to_iso(us)


def errors(recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded errors as shown: each one's time (`at`) in ISO-8601."""
    return [{**e, "at": _time(e["at"])} if isinstance(e.get("at"), int) else e for e in recorded]


def cluster(m: ReadModels, c: Cluster) -> dict[str, Any]:
    return {
        "id": c.cluster_id, "workspace": c.workspace, "name": c.name, "vmSize": c.vm_size,
        "vmPriority": c.vm_priority, "scaleSettings": c.scale_settings,
        "allocationState": c.allocation_state, "deleting": c.deleting,
        "currentNodeCount": len(c.nodes), "nodeStateCounts": clusters.node_counts(m, c),
        "freeCapacity": clusters.free_capacity(m, c),
        "queuedJobs": len(m.queues.get(c.cluster_id, ())), "errors": errors(c.errors),
        "creationTime": _time(c.created_at), "createdBy": c.created_by,
    }  # fmt: skip


def node(m: ReadModels, n: Node) -> dict[str, Any]:
    owner = m.clusters.get(n.cluster)
    return {
        "id": n.node_id, "cluster": owner.name if owner else n.cluster, "state": n.state,
        "since": _time(n.since), "lastTransition": n.last_event, "gpus": n.gpus,
        "gpuModel": n.gpu_model, "gpuMemoryMb": n.gpu_memory_mb, "cpus": n.cpus,
        "memoryMb": n.memory_mb, "runtimes": n.runtimes, "agentVersion": n.agent_version,
        "address": n.address,
        "allocations": [
            {"gpu": _gpu_order(item), "job": item[1][0], "jobName": _job_name(m, item[1][0]),
             "attempt": item[1][1], "task": item[1][2]}
            for item in sorted(n.allocations.items(), key=_gpu_order)
        ],
        "errors": errors(n.errors), "setup": n.setup,
    }  # fmt: skip


def pending_reason(m: ReadModels, reason: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's pending reason as shown: `preempting` also names its victims
    (`victimNames`: workspace/experiment/name, as people know them; `victims` are ids)."""
    if not reason or reason.get("code") != "preempting":
        return reason
    jobs = [m.jobs.get(v) for v in reason.get("victims") or ()]
    names = [f"{j.workspace}/{j.experiment}/{j.name}" if j else "(deleted)" for j in jobs]
    return {**reason, "victimNames": names}


def _job_name(m: ReadModels, job_id: str) -> str | None:
    held = m.jobs.get(job_id)
    return None if held is None else held.name


def _gpu_order(item: tuple[str, list]) -> int | None:
    """The GPU index of an allocation (None: the whole node, held by a task needing no GPU)."""
    return None if item[0] == "*" else int(item[0])


def name_reused(m: ReadModels, j: Job) -> bool:
    """Did an earlier job (deleted since) have this job's name? Then their output paths are
    the same (an attempt's stdouterr directory holds no job id)."""
    ids = m.job_ids.get(job_key(j.workspace, j.experiment, j.name)) or [j.job_id]
    return ids[0] != j.job_id


def job_cluster(m: ReadModels, j: Job) -> tuple[str, str] | None:
    """The (workspace, name) of the job's cluster, also once it was deleted (None: a job
    logged before that was kept, whose deleted cluster is known by its id only)."""
    owner = m.clusters.get(j.cluster)
    if owner is not None:
        return owner.workspace, owner.name
    workspace, _, name = j.cluster_path.partition("/")
    return (workspace, name) if name else None


def job(m: ReadModels, j: Job) -> dict[str, Any]:
    where = job_cluster(m, j)
    return {
        "id": j.job_id, "workspace": j.workspace, "experiment": j.experiment, "name": j.name,
        "cluster": where[1] if where else j.cluster, "owner": j.owner, "priority": j.priority,
        "nodeCount": j.node_count, "gpusPerNode": j.gpus_per_node, "state": j.state,
        "executionState": EXECUTION_STATE[j.state], "attempt": j.attempt,
        "retries": j.retries, "pendingReason": pending_reason(m, j.pending_reason),
        "pendingReasonSince": _time(j.pending_reason_at) if j.pending_reason else None,
        "tasks": [{"node": node_id, "gpus": gpus} for node_id, gpus in j.tasks],
        "creationTime": _time(j.submitted_at), "scheduledTime": _time(j.scheduled_at),
        "startTime": _time(j.started_at), "endTime": _time(j.ended_at),
        "exitCode": j.exit_code, "errors": errors(j.errors),
    }  # fmt: skip


def queued(m: ReadModels, cluster_id: str) -> list[dict[str, Any]]:
    """The cluster's queue in placement order, with each job's pending reason."""
    return [
        {
            "job": j.job_id,
            "name": j.name,
            "priority": j.priority,
            "pendingReason": pending_reason(m, j.pending_reason),
        }
        for j in queue.ordered(m, cluster_id)
    ]


def queues(m: ReadModels) -> dict[str, list[dict[str, Any]]]:
    """Every queue by cluster (`workspace/name`; a deleted cluster's leftover queue by id)."""
    out = {f"{c.workspace}/{c.name}": queued(m, c.cluster_id) for c in m.clusters.values()}
    for cluster_id, waiting in m.queues.items():
        if cluster_id not in m.clusters and waiting:
            out[f"deleted cluster {cluster_id}"] = queued(m, cluster_id)
    return out


def world(m: ReadModels, note: str | None = None) -> dict[str, Any]:
    """Everything: clusters, nodes, each cluster's queue in order, and every job; `note`
    says what a reader should know about the moment (a time before the first event)."""
    return {
        "position": m.position,
        "recordedAt": _time(m.recorded_at) if m.position else None,
        "workspaces": sorted(m.workspaces),
        "experiments": sorted(m.experiments),
        "clusters": [cluster(m, c) for c in m.clusters.values()],
        "nodes": [node(m, n) for n in m.nodes.values()],
        "queues": queues(m),
        "jobs": [job(m, j) for j in m.jobs.values()],
        "note": note,
    }
