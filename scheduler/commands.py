"""Commands: requests validated against the read models and turned into events.

Each command is a pure function `(models, ..., actor) -> list[Decision]` returning the events
to append (stream, event); nothing is appended when it raises. `DocumentError` names a field
of the request; `CommandError` says why the request cannot apply to what exists (`status`
is the HTTP status the API answers with: 404 for something missing, 409 for a conflict).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from batchd.events.envelope import NewEvent
from batchd.projections import lifecycle
from batchd.projections.model import (
    FAILED,
    LEAVING,
    LIVE_STATES,
    LOST,
    PROVISIONING,
    QUEUED,
    SUCCEEDED,
    TERMINATING,
    Cluster,
    Job,
    ReadModels,
    job_key,
)
from batchd.scheduler.clusterspec import (
    ClusterSpec,
    max_nodes,
    parse_cluster,
    parse_scale_settings,
)
from batchd.scheduler.jobspec import parse_job
from batchd.scheduler.planner import Decision
from batchd.scheduler.schema import DocumentError, string, unwrap
from batchd.scheduler.vmsizes import CATALOG, Catalog

NAME_RULE = "1-64 ASCII letters, digits, '-' or '_'"
NewId = Callable[[], str]


class CommandError(ValueError):
    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _uuid() -> str:
    return str(uuid.uuid4())


_NAME = string(max_len=64, pattern=r"[-A-Za-z0-9_]+", what=NAME_RULE)


def check_name(kind: str, name: str, path: str | None = None) -> None:
    """DocumentError unless `name` is a valid name of a `kind` (reported at `path`)."""
    _NAME(name, path or f"{kind} name")


def _event(stream: str, type_: str, data: dict[str, Any], actor: str) -> Decision:
    return (stream, NewEvent(type_, data, actor))


# -- workspaces and experiments ----------------------------------------------------------------
def create_workspace(m: ReadModels, workspace: str, actor: str) -> list[Decision]:
    check_name("workspace", workspace)
    if workspace in m.workspaces:
        raise CommandError(f"workspace {workspace!r} exists already")
    # (tokens of a workspace of this name that an earlier version let be deleted)
    _no_tokens_of(m, workspace, "an earlier workspace of this name: revoke them first, "
                                "or they would reach this one")  # fmt: skip
    return [_event(f"workspace-{workspace}", "WorkspaceCreated", {"workspace": workspace}, actor)]


def delete_workspace(m: ReadModels, workspace: str, actor: str) -> list[Decision]:
    """A workspace goes once it holds nothing, and no token is limited to it: such a token
    would reach a workspace made later under its name."""
    find_workspace(m, workspace)
    clusters = [c.name for c in m.clusters.values() if c.workspace == workspace]
    experiments = [x.name for x in m.experiments.values() if x.workspace == workspace]
    if clusters or experiments:
        raise CommandError(
            f"workspace {workspace!r} still holds {_listed(clusters, 'cluster')}"
            f"{' and ' if clusters and experiments else ''}"
            f"{_listed(experiments, 'experiment')}: delete them first"
        )
    _no_tokens_of(m, workspace, f"workspace {workspace!r}: revoke them first (they would "
                                "reach a workspace made later under its name)")  # fmt: skip
    return [_event(f"workspace-{workspace}", "WorkspaceDeleted", {"workspace": workspace}, actor)]


def _no_tokens_of(m: ReadModels, workspace: str, what: str) -> None:
    """CommandError (409) naming the tokens limited to `workspace` (`what`: the workspace
    in words, and what to do), if any."""
    names = sorted(t.name for t in m.tokens.values() if workspace in t.workspaces)
    if names:
        verb = "are" if len(names) > 1 else "is"
        raise CommandError(f"{_listed(names, 'token')} {verb} limited to {what}")


def _listed(names: list[str], kind: str) -> str:
    """`names` of `kind` in words ("clusters 'a', 'b'"; "" for none)."""
    if not names:
        return ""
    return f"{kind}{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in sorted(names))}"


def create_experiment(m: ReadModels, workspace: str, experiment: str, actor: str) -> list[Decision]:
    find_workspace(m, workspace)
    check_name("experiment", experiment)
    if f"{workspace}/{experiment}" in m.experiments:
        raise CommandError(f"experiment {experiment!r} exists already in {workspace!r}")
    data = {"workspace": workspace, "experiment": experiment}
    return [_event(f"experiment-{workspace}/{experiment}", "ExperimentCreated", data, actor)]


def delete_experiment(m: ReadModels, workspace: str, experiment: str, actor: str) -> list[Decision]:
    """Deleting an experiment terminates its live jobs (as Batch AI did)."""
    find_experiment(m, workspace, experiment)
    reason = f"experiment {experiment} deleted"
    out = [decision for j in m.jobs.values()
           if j.workspace == workspace and j.experiment == experiment
           and lifecycle.allowed(j.state, "JobTerminateRequested")
           for decision in terminate(j, actor, reason)]  # fmt: skip
    data = {"workspace": workspace, "experiment": experiment}
    out.append(_event(f"experiment-{workspace}/{experiment}", "ExperimentDeleted", data, actor))
    return out


def find_workspace(m: ReadModels, workspace: str) -> None:
    """CommandError 404 unless the workspace exists."""
    if workspace not in m.workspaces:
        raise CommandError(f"no workspace {workspace!r}", 404)


def find_experiment(m: ReadModels, workspace: str, experiment: str) -> None:
    """CommandError 404 unless the workspace and experiment exist."""
    find_workspace(m, workspace)
    if f"{workspace}/{experiment}" not in m.experiments:
        raise CommandError(f"no experiment {experiment!r} in workspace {workspace!r}", 404)


# -- clusters ----------------------------------------------------------------------------------
def create_cluster(
    m: ReadModels, workspace: str, name: str, document: Any, actor: str,
    catalog: Catalog = CATALOG, new_id: NewId = _uuid,
) -> list[Decision]:  # fmt: skip
    find_workspace(m, workspace)
    check_name("cluster", name)
    spec = parse_cluster(document, catalog)
    if f"{workspace}/{name}" in m.cluster_ids:
        raise CommandError(f"cluster {name!r} exists already in {workspace!r}")
    cluster_id = new_id()
    data = {"clusterId": cluster_id, "workspace": workspace, "name": name,
            "spec": cluster_properties(spec)}  # fmt: skip
    out = [_event(f"cluster-{workspace}/{name}", "ClusterCreated", data, actor)]
    manual = spec.scale_settings.get("manual")
    if manual is not None and manual.get("targetNodeCount", 0) > 0:  # (no node has joined)
        data = {"clusterId": cluster_id}  # the answer shows it resizing, as the next read will
        out.append(_event(f"cluster-{workspace}/{name}", "ClusterResizeStarted", data, actor))
    return out


def cluster_properties(spec: ClusterSpec) -> dict[str, Any]:
    """What ClusterCreated keeps of a cluster document: its properties, the VM size in the
    catalog's spelling and the scale settings with their defaults."""
    return {**spec.properties, "vmSize": spec.vm_size.name, "scaleSettings": spec.scale_settings}


def find_cluster(m: ReadModels, workspace: str, name: str) -> Cluster:
    """The live cluster of that name; CommandError 404 if none."""
    find_workspace(m, workspace)
    cluster_id = m.cluster_ids.get(f"{workspace}/{name}")
    if cluster_id is None:
        raise CommandError(f"no cluster {name!r} in workspace {workspace!r}", 404)
    return m.clusters[cluster_id]


def update_scale_settings(
    m: ReadModels, workspace: str, name: str, document: Any, actor: str,
    catalog: Catalog = CATALOG,
) -> list[Decision]:  # fmt: skip
    """PATCH: only `scaleSettings` may change (Batch AI's rule), within the most nodes the
    cluster's VM size allows."""
    cluster = find_cluster(m, workspace, name)
    body, where = unwrap(document)  # (beside the envelope, only what it may hold)
    prefix = f"{where}." if where else ""
    other = [k for k in body if k != "scaleSettings"] if isinstance(body, dict) else []
    if other:
        raise DocumentError(
            prefix + other[0], "cannot be changed: a cluster update changes only scaleSettings"
        )
    if not isinstance(body, dict) or "scaleSettings" not in body:
        raise DocumentError(prefix + "scaleSettings", "is required")
    size = catalog.get(cluster.vm_size)
    settings = parse_scale_settings(body["scaleSettings"], prefix + "scaleSettings", size)
    if cluster.deleting:
        raise CommandError(f"cluster {name!r} is being deleted")
    data = {"clusterId": cluster.cluster_id, "scaleSettings": settings}
    out = [_event(f"cluster-{workspace}/{name}", "ClusterScaleSettingsChanged", data, actor)]
    manual = settings.get("manual")
    if manual is not None:  # the answer shows the allocation state the new target gives
        out += _resize_change(m, cluster, manual.get("targetNodeCount", 0), actor)
    return out


def delete_cluster(m: ReadModels, workspace: str, name: str, actor: str) -> list[Decision]:
    """Ask to delete; with no nodes left the cluster goes at once, else once they are removed
    (it is `resizing` meanwhile: its nodes are leaving, see resize_changes)."""
    cluster = find_cluster(m, workspace, name)
    data = {"clusterId": cluster.cluster_id}
    out = [] if cluster.deleting else [
        _event(f"cluster-{workspace}/{name}", "ClusterDeleteRequested", data, actor)
    ]  # fmt: skip
    if not cluster.nodes:
        out.append(_event(f"cluster-{workspace}/{name}", "ClusterDeleted", data, actor))
    else:  # the answer shows the allocation state its deletion gives
        out += _resize_change(m, cluster, 0, actor)
    return out


def resize_changes(m: ReadModels, actor: str,
                   wanted: Mapping[str, int] | None = None) -> list[Decision]:  # fmt: skip
    """Batch AI's allocationState: ClusterResizeStarted once a cluster's nodes are not what
    it wants (too few have joined, too many, or some are still leaving), ClusterResizeCompleted
    once they are. A cluster with manual scale settings wants their `targetNodeCount`; one that
    scales itself (`autoScale`) wants what its provider says (`wanted`, by cluster id: the
    local provider's count for its queue), and with no provider to scale it stays steady. A
    cluster being deleted wants no node: it is resizing while it has nodes left (its
    `provisioningState` says `deleting`). Cheap: the planner loop asks at every cycle."""
    out = []
    for cluster in m.clusters.values():
        manual = cluster.scale_settings.get("manual")
        target = manual.get("targetNodeCount", 0) if manual is not None else None
        if wanted is not None and cluster.cluster_id in wanted:
            target = wanted[cluster.cluster_id]
        if cluster.deleting:  # every node goes, each once it runs nothing
            target = 0
        out += _resize_change(m, cluster, target, actor)
    return out


def _resize_change(m: ReadModels, cluster: Cluster, target: int | None,
                   actor: str) -> list[Decision]:  # fmt: skip
    """ClusterResizeStarted or ClusterResizeCompleted where the cluster's nodes, against
    `target` (None: nothing scales it, so it is steady), call for a change of its allocation
    state; else nothing."""
    states = {m.nodes[node_id].state for node_id in cluster.nodes}
    settled = target is None or (
        len(cluster.nodes) == target and not (LEAVING in states or PROVISIONING in states)
    )
    if settled == (cluster.allocation_state == "steady"):
        return []
    type_ = "ClusterResizeCompleted" if settled else "ClusterResizeStarted"
    stream = f"cluster-{cluster.workspace}/{cluster.name}"
    return [_event(stream, type_, {"clusterId": cluster.cluster_id}, actor)]


def remove_node(m: ReadModels, node_id: str, actor: str) -> list[Decision]:
    """NodeRemoved for a node whose machine is gone for good (lost: its agent silent) and
    that holds no GPU: a hand-joined node would otherwise stay in its cluster for ever. A
    node that is not lost is refused (409): its agent is alive, and would only join again;
    a busy one goes by resizing its cluster."""
    node = m.nodes.get(node_id)
    if node is None:
        raise CommandError(f"no node {node_id!r}", 404)
    if node.state != LOST:
        raise CommandError(f"node {node_id!r} is {node.state}: only a lost node is removed "
                           "(stop its agent first; resizing its cluster drains and removes a "
                           "node that runs work)")  # fmt: skip
    if node.allocations:
        raise CommandError(f"node {node_id!r} still holds GPUs of tasks that have not been "
                           "seen to stop: remove it once they are")  # fmt: skip
    return [_event(f"node-{node_id}", "NodeRemoved", {"nodeId": node_id}, actor)]


def finish_deletions(m: ReadModels, actor: str) -> list[Decision]:
    """For each cluster being deleted: remove every node that runs nothing (an agent whose
    node is removed stops), and delete the cluster once it has no node left. A node still
    running a job goes when the job ends (a provider drains its own nodes meanwhile).
    Cheap when no cluster is being deleted: the planner loop asks at every cycle."""
    out = []
    for cluster in list(m.clusters.values()):
        if not cluster.deleting:
            continue
        left = []
        for node_id in cluster.nodes:
            if not m.nodes[node_id].allocations:
                out.append(_event(f"node-{node_id}", "NodeRemoved", {"nodeId": node_id}, actor))
            else:
                left.append(node_id)
        if not left:
            data = {"clusterId": cluster.cluster_id}
            stream = f"cluster-{cluster.workspace}/{cluster.name}"
            out.append(_event(stream, "ClusterDeleted", data, actor))
    return out


# -- jobs --------------------------------------------------------------------------------------
def submit_job(
    m: ReadModels, workspace: str, experiment: str, name: str, document: Any, actor: str,
    cluster: str | None = None, catalog: Catalog = CATALOG, new_id: NewId = _uuid,
) -> list[Decision]:  # fmt: skip
    """Validate a job document against the cluster it names and return its JobSubmitted.

    `cluster` (a name, as `--cluster` gives it) is used when the document names none; a
    Batch AI resource id (`.../workspaces/W/clusters/C`) names cluster C of workspace W.
    """
    find_experiment(m, workspace, experiment)
    check_name("job", name)
    spec = parse_job(document)
    where = "properties." if isinstance(document, dict) and "properties" in document else ""
    cluster_id = resolve_cluster(m, spec.cluster or cluster, workspace, where)
    c = m.clusters[cluster_id]
    target = c.name
    if c.deleting:
        raise DocumentError(f"{where}cluster", f"cluster {target!r} is being deleted")
    limit = max_nodes(c.scale_settings)
    if spec.node_count > limit:
        rule = f"{spec.node_count} is more than cluster {target!r} can hold (at most {limit})"
        raise DocumentError(f"{where}nodeCount", rule)
    size = catalog.get(c.vm_size)
    gpus = size.gpus if size is not None else 0
    if spec.gpus_per_node is not None and size is not None and spec.gpus_per_node > gpus:
        rule = f"{spec.gpus_per_node} is more than the {gpus} GPUs of {size.name}"
        raise DocumentError(f"{where}gpusPerNode", rule)
    per_node = spec.gpus_per_node if spec.gpus_per_node is not None else gpus
    _check_tensorflow(spec.properties.get("tensorFlowSettings"), spec.node_count, per_node,
                      f"{where}tensorFlowSettings")  # fmt: skip
    _name_free(m, workspace, experiment, name)
    job_id = new_id()
    data = {
        "jobId": job_id, "workspace": workspace, "experiment": experiment, "name": name,
        "cluster": cluster_id, "owner": actor.removeprefix("user:"), "priority": spec.priority,
        "nodeCount": spec.node_count,
        "gpusPerNode": per_node,
        "maxRetries": spec.max_retries, "maxNodeFailureRetries": spec.max_node_failure_retries,
        "preemptible": spec.preemptible, "maxWallClockTime": spec.max_wall_clock_s,
        "spec": spec.properties,
        "runtime": "docker" if "containerSettings" in spec.properties else "process",
    }  # fmt: skip
    return [_event(f"job-{job_id}", "JobSubmitted", data, actor)]


def _check_tensorflow(settings: dict[str, Any] | None, nodes: int, gpus: int, where: str) -> None:
    """Batch AI's limits: a parameter server a node at most, a worker a GPU (or a node)."""
    if settings is None:
        return
    servers = settings.get("parameterServerCount", 0)
    if servers > nodes:
        rule = f"{servers} is more than the job's {nodes} node(s): one a node at most"
        raise DocumentError(f"{where}.parameterServerCount", rule)
    workers, most = settings.get("workerCount", nodes), nodes * max(gpus, 1)
    if workers > most:
        rule = f"{workers} is more than the job's {most} GPU(s): one worker a GPU at most"
        raise DocumentError(f"{where}.workerCount", rule)


def resolve_cluster(m: ReadModels, reference: str | None, workspace: str, where: str) -> str:
    """The id of the live cluster a job names (a name, or a Batch AI resource id)."""
    target_ws, target = cluster_reference(reference, workspace, where)
    cluster_id = m.cluster_ids.get(f"{target_ws}/{target}")
    if cluster_id is None:
        raise DocumentError(f"{where}cluster", f"no cluster {target!r} in workspace {target_ws!r}")
    return cluster_id


def cluster_workspace(reference: str, workspace: str, where: str) -> str:
    """The workspace of the cluster a job names (a name: the job's own)."""
    return cluster_reference(reference, workspace, where)[0]


def cluster_reference(reference: str | None, workspace: str, where: str) -> tuple[str, str]:
    """(workspace, name) of the cluster a job names: a name (of `workspace`), or a Batch AI
    resource id; DocumentError at `where` for neither."""
    if not reference:
        raise DocumentError(f"{where}cluster", "is required (or name the cluster on the command)")
    parts = reference.strip("/").split("/")
    if len(parts) == 1:
        return workspace, parts[0]
    # an id ends ".../workspaces/<ws>/clusters/<name>" (read from its end: a resource group,
    # a workspace or a cluster may itself be named "workspaces" or "clusters")
    tail = [p.lower() for p in parts[-4:]]
    if len(tail) == 4 and tail[0] == "workspaces" and tail[2] == "clusters" and all(parts[-3::2]):
        return parts[-3], parts[-1]
    # 2018-03-01's ".../providers/Microsoft.BatchAI/clusters/<name>" had no workspaces: the
    # job's own (where Azure moved such clusters, with their jobs, when workspaces came)
    if tail[-3:] == ["microsoft.batchai", "clusters", tail[-1]] and parts[-1]:
        return workspace, parts[-1]
    raise DocumentError(f"{where}cluster", f"{reference!r} is neither a cluster name nor a "
                                           "Batch AI cluster resource id")  # fmt: skip


def _name_free(m: ReadModels, workspace: str, experiment: str, name: str) -> None:
    if current_job(m, workspace, experiment, name) is not None:
        raise CommandError(f"job {name!r} exists already in {workspace}/{experiment}")
    ids = m.job_ids.get(job_key(workspace, experiment, name))
    if ids and ids[-1] in m.jobs:  # detached: its experiment was deleted while it ran
        raise CommandError(f"job {name!r} of a deleted experiment {workspace}/{experiment} is "
                           "still being terminated (it would write to the same output "
                           "directory); its name is free once it has ended")  # fmt: skip


def current_job(m: ReadModels, workspace: str, experiment: str, name: str) -> Job | None:
    """The job that has that name now: its newest incarnation, unless that was deleted (or
    went with its experiment)."""
    ids = m.job_ids.get(job_key(workspace, experiment, name))
    job = m.jobs.get(ids[-1]) if ids else None
    return None if job is None or job.detached else job


def find_job(m: ReadModels, workspace: str, experiment: str, name: str) -> Job:
    """The job (not deleted) of that name; CommandError 404 if none."""
    job = current_job(m, workspace, experiment, name)
    if job is None:
        find_experiment(m, workspace, experiment)  # the one that is not there, by name
        raise CommandError(f"no job {name!r} in {workspace}/{experiment}", 404)
    return job


def terminate_job(
    m: ReadModels, workspace: str, experiment: str, name: str, actor: str
) -> list[Decision]:
    """A user's terminate (see `terminate`)."""
    job = find_job(m, workspace, experiment, name)
    return terminate(job, actor, f"terminated by {actor}")


def terminate(job: Job, actor: str, reason: str) -> list[Decision]:
    """Terminate `job` for `reason`: a queued job ends at once; one that holds GPUs ends when
    its node reports it killed, and so does a queued one whose earlier attempt's tasks are
    still being killed (`finish_jobs`). Asked again while it is terminating, nothing
    changes (a retried request succeeds)."""
    if job.state == TERMINATING:
        return []
    lifecycle.check(job.state, "JobTerminateRequested")
    data = {"jobId": job.job_id, "reason": reason}
    out = [_event(f"job-{job.job_id}", "JobTerminateRequested", data, actor)]
    if job.state == QUEUED and not job.stopping:
        out.append(_event(f"job-{job.job_id}", "JobTerminated", data, actor))
    return out


def finish_jobs(m: ReadModels, actor: str) -> list[Decision]:
    """What ends the terminating jobs that hold no GPU any more (JobTerminated: a job
    terminated while queued with tasks of an earlier attempt still stopping, once they have
    stopped) and deletes the ended jobs deleted while live (JobDeleted, once no task of theirs
    still stops). A stopped task's report does so at once (nodes._stopped); this finds the
    rest (a node lost, removed or restarted; an attempt that ended otherwise)."""
    return [d for job in m.jobs.values() if not job.stopping for d in finished(job, actor)]


def finished(job: Job, actor: str) -> list[Decision]:
    """What `finish_jobs` decides for `job`, whose tasks have all stopped."""
    if job.state == TERMINATING and not job.tasks:
        return [terminated_now(job, actor), *_deleted_as_asked(job)]
    if job.state in (SUCCEEDED, FAILED):
        return _deleted_as_asked(job)
    return []


def terminated_now(job: Job, actor: str) -> Decision:
    """JobTerminated of a terminating job, for the reason it was asked with."""
    data = {"jobId": job.job_id, "reason": job.terminate_reason or "terminated by request"}
    return _event(f"job-{job.job_id}", "JobTerminated", data, actor)


def _deleted_as_asked(job: Job) -> list[Decision]:
    """JobDeleted for a job deleted while it was live (by whoever asked), once it has ended."""
    if job.delete_requested_by is None:
        return []
    return [_event(f"job-{job.job_id}", "JobDeleted", {"jobId": job.job_id},
                   job.delete_requested_by)]  # fmt: skip


def delete_job(
    m: ReadModels, workspace: str, experiment: str, name: str, actor: str
) -> list[Decision]:
    """Delete a job; one still live is terminated first, as Batch AI's Delete did, and deleted
    once it has ended and its tasks have stopped (`finish_jobs`): a queued one at once."""
    job = find_job(m, workspace, experiment, name)
    if job.delete_requested_by is not None:
        return []  # asked already (finish_jobs deletes it): a retried request succeeds
    if job.state in LIVE_STATES:
        return _delete_live(job, actor)
    if job.stopping:  # (its name, and so its output directories, could be reused meanwhile)
        raise CommandError(
            f"cannot delete a job whose tasks are still being stopped (on "
            f"{', '.join(sorted({s[2] for s in job.stopping}))}): delete it once they have "
            "stopped (batchd node show)"
        )
    lifecycle.check(job.state, "JobDeleted")
    return [_event(f"job-{job.job_id}", "JobDeleted", {"jobId": job.job_id}, actor)]


def _delete_live(job: Job, actor: str) -> list[Decision]:
    """JobDeleteRequested first (whatever the planner decided meanwhile, the job is deleted
    once it has ended), then its termination; JobDeleted comes from `finish_jobs`, at once
    for a queued job (the API asks for it right after: `finish_job`)."""
    stream, data = f"job-{job.job_id}", {"jobId": job.job_id, "reason": f"deleted by {actor}"}
    asked = [_event(stream, "JobDeleteRequested", data, actor)]
    if job.state == TERMINATING:
        return asked
    return asked + terminate(job, actor, data["reason"])


def finish_one(m: ReadModels, job_id: str, actor: str) -> list[Decision]:
    """`finish_jobs` for one job (decided under its lock)."""
    job = m.jobs.get(job_id)
    return [] if job is None or job.stopping else finished(job, actor)


def finish_job(m: ReadModels, workspace: str, experiment: str, name: str) -> list[Decision]:
    """`finish_one` for the job of that name now (a queued job just deleted: deleted at once)."""
    job = current_job(m, workspace, experiment, name)
    return [] if job is None else finish_one(m, job.job_id, job.delete_requested_by or "scheduler")
