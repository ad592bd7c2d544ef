"""The API's resources: read models (and the documents as submitted) in ARM's shape.

A resource is `{"id", "name", "type", "properties"}`; its properties carry the Batch AI
document as created (secrets as "***") beside the read-only fields Batch AI reported
(`executionState`, `executionInfo`, `allocationState`, `nodeStateCounts`, ...) and batchd's
own (`state`, `pendingReason`, ...). See docs/api.md.
"""

from __future__ import annotations

from typing import Any

from batchd.events.secrets import Keyring, Sealed, redact
from batchd.events.store import EventStore
from batchd.events.timeutil import to_iso
from batchd.projections import clusters, views
from batchd.projections.model import (
    EXECUTION_STATE,
    Cluster,
    Experiment,
    Job,
    Node,
    ReadModels,
    Token,
    Workspace,
)
from batchd.scheduler.toolkits import output_segment, tool_type


def _time(us: int | None) -> str | None:
    return None if us is None else to_iso(us)


def workspace_id(ws: str) -> str:
    return f"/workspaces/{ws}"


def cluster_id(ws: str, name: str) -> str:
    return f"/workspaces/{ws}/clusters/{name}"


def experiment_id(ws: str, exp: str) -> str:
    return f"/workspaces/{ws}/experiments/{exp}"


def job_id(ws: str, exp: str, name: str) -> str:
    return f"/workspaces/{ws}/experiments/{exp}/jobs/{name}"


def workspace(w: Workspace) -> dict[str, Any]:
    return {"id": workspace_id(w.name), "name": w.name, "type": "batchd/workspaces",
            "properties": {"creationTime": _time(w.created_at), "createdBy": w.created_by,
                           "provisioningState": "succeeded"}}  # fmt: skip


def experiment(x: Experiment) -> dict[str, Any]:
    return {"id": experiment_id(x.workspace, x.name), "name": x.name,
            "type": "batchd/experiments",
            "properties": {"creationTime": _time(x.created_at), "createdBy": x.created_by,
                           "provisioningState": "succeeded"}}  # fmt: skip


def cluster(m: ReadModels, c: Cluster, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    properties = {
        **(redact(spec) if spec else {}),
        "vmSize": c.vm_size, "vmPriority": c.vm_priority, "scaleSettings": c.scale_settings,
        "allocationState": c.allocation_state, "currentNodeCount": len(c.nodes),
        "nodeStateCounts": clusters.node_counts(m, c),
        "freeCapacity": clusters.free_capacity(m, c), "errors": views.errors(c.errors),
        "creationTime": _time(c.created_at), "createdBy": c.created_by,
        "provisioningState": "deleting" if c.deleting else "succeeded",
    }  # fmt: skip
    return {"id": cluster_id(c.workspace, c.name), "name": c.name, "type": "batchd/clusters",
            "properties": properties}  # fmt: skip


def job(m: ReadModels, j: Job, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    where = views.job_cluster(m, j)
    target = cluster_id(*where) if where else j.cluster
    properties = {
        **(redact(spec) if spec else {}),
        "cluster": {"id": target}, "nodeCount": j.node_count, "gpusPerNode": j.gpus_per_node,
        "priority": j.priority, "state": j.state, "executionState": EXECUTION_STATE[j.state],
        "executionInfo": {
            "startTime": _time(j.started_at), "endTime": _time(j.ended_at),
            "exitCode": j.exit_code, "errors": views.errors(j.errors),
        },
        "pendingReason": views.pending_reason(m, j.pending_reason),
        "pendingReasonSince": _time(j.pending_reason_at) if j.pending_reason else None,
        "attempt": j.attempt, "retries": j.retries,
        "tasks": [{"node": node_id, "gpus": gpus} for node_id, gpus in j.tasks],
        "owner": j.owner, "creationTime": _time(j.submitted_at),
        "scheduledTime": _time(j.scheduled_at),
        "provisioningState": "deleting" if j.delete_requested_by else "succeeded",
        "jobOutputDirectoryPathSegment": output_segment(j.workspace, j.experiment, j.name,
                                                        j.job_id),
    }  # fmt: skip
    if spec:
        properties["toolType"] = tool_type(spec)
    return {"id": job_id(j.workspace, j.experiment, j.name), "name": j.name,
            "type": "batchd/jobs", "properties": properties}  # fmt: skip


def node(m: ReadModels, n: Node, heartbeat_age: float | None) -> dict[str, Any]:
    """A node as `batchd replay` shows it, with its cluster's id and its heartbeat's age."""
    owner = m.clusters.get(n.cluster)
    properties = views.node(m, n)
    properties.pop("id")
    properties["cluster"] = {"id": cluster_id(owner.workspace, owner.name) if owner else n.cluster}
    properties["heartbeatAgeSeconds"] = None if heartbeat_age is None else round(heartbeat_age, 1)
    return {"id": f"/nodes/{n.node_id}", "name": n.node_id, "type": "batchd/nodes",
            "properties": properties}  # fmt: skip


def token(t: Token) -> dict[str, Any]:
    answer = {"id": t.token_id, "name": t.name, "role": t.role, "workspaces": t.workspaces,
              "creationTime": _time(t.created_at), "createdBy": t.created_by}  # fmt: skip
    if t.node is not None:
        answer["node"] = t.node
    return answer


# -- the documents as submitted -----------------------------------------------------------------
async def job_spec(store: EventStore, j: Job) -> dict[str, Any]:
    """The job's properties as submitted (secrets still sealed)."""
    found = await store.read_all(j.submitted_position - 1, 1)  # a recent one: from memory
    if found and found[0].type == "JobSubmitted" and found[0].data.get("jobId") == j.job_id:
        return found[0].data.get("spec") or {}
    for event in await store.read_stream(f"job-{j.job_id}"):
        if event.type == "JobSubmitted":
            return event.data.get("spec") or {}
    return {}


async def cluster_spec(store: EventStore, c: Cluster) -> dict[str, Any]:
    """The cluster's properties as created (secrets still sealed)."""
    for event in await store.read_stream(f"cluster-{c.workspace}/{c.name}"):
        if event.type == "ClusterCreated" and event.data.get("clusterId") == c.cluster_id:
            return event.data.get("spec") or {}
    return {}


def opened(value: Any, keyring: Keyring | None) -> Any:
    """`value` with its sealed secrets opened, to compare with a new request's plain ones."""
    if isinstance(value, dict):
        return {k: opened(v, keyring) for k, v in value.items()}
    if isinstance(value, list):
        return [opened(v, keyring) for v in value]
    if isinstance(value, Sealed):
        return keyring.open(value) if keyring is not None else value
    return value
