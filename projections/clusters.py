"""Clusters: spec summary, scale settings, allocation state (steady/resizing), errors.

Node counts by state are not stored: `node_counts` derives them from the nodes, so they can
never disagree with them.
"""

from __future__ import annotations

from batchd.events.envelope import RecordedEvent
from batchd.projections.allocation import free_gpus
from batchd.projections.model import NODE_COUNT_OF, NODE_COUNTS, READY, Cluster, ReadModels

MAX_ERRORS = 20  # newest cluster errors kept


def cluster_created(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    spec = d.get("spec") or {}
    cluster = Cluster(
        d["clusterId"], d["workspace"], d["name"], spec.get("vmSize", ""),
        spec.get("vmPriority", "dedicated"), spec.get("scaleSettings") or {},
        e.recorded_at, e.actor, preemption=bool(spec.get("preemption", False)),
    )  # fmt: skip
    m.clusters[cluster.cluster_id] = cluster
    m.cluster_ids[f"{cluster.workspace}/{cluster.name}"] = cluster.cluster_id
    m.queues.setdefault(cluster.cluster_id, {})


def scale_settings_changed(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.get(e.data["clusterId"])
    if cluster is not None:
        cluster.scale_settings = e.data["scaleSettings"]


def resize_started(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.get(e.data["clusterId"])
    if cluster is not None:
        cluster.allocation_state = "resizing"


def resize_completed(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.get(e.data["clusterId"])
    if cluster is not None:
        cluster.allocation_state = "steady"


def error_recorded(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.get(e.data["clusterId"])
    if cluster is not None:
        cluster.errors.append({**e.data["error"], "at": e.recorded_at})
        del cluster.errors[:-MAX_ERRORS]


def delete_requested(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.get(e.data["clusterId"])
    if cluster is not None:
        cluster.deleting = True


def cluster_deleted(m: ReadModels, e: RecordedEvent) -> None:
    cluster = m.clusters.pop(e.data["clusterId"], None)
    if cluster is None:
        return
    key = f"{cluster.workspace}/{cluster.name}"
    if m.cluster_ids.get(key) == cluster.cluster_id:
        del m.cluster_ids[key]
    if not m.queues.get(cluster.cluster_id):  # jobs still queued for it stay visible
        m.queues.pop(cluster.cluster_id, None)


def node_counts(m: ReadModels, cluster: Cluster) -> dict[str, int]:
    """Batch AI's nodeStateCounts: idle, running, preparing, unusable, leaving."""
    counts = dict.fromkeys(NODE_COUNTS, 0)
    for node_id in cluster.nodes:
        node = m.nodes[node_id]
        if node.state == READY:
            counts["running" if node.allocations else "idle"] += 1
        else:
            counts[NODE_COUNT_OF[node.state]] += 1
    return counts


HANDLERS = {
    "ClusterCreated": cluster_created,
    "ClusterScaleSettingsChanged": scale_settings_changed,
    "ClusterResizeStarted": resize_started,
    "ClusterResizeCompleted": resize_completed,
    "ClusterErrorRecorded": error_recorded,
    "ClusterDeleteRequested": delete_requested,
    "ClusterDeleted": cluster_deleted,
}


def free_capacity(m: ReadModels, cluster: Cluster) -> dict[str, int]:
    """What the cluster's ready nodes have free now, to read beside pending reasons (which do
    not carry these numbers, as they change at every placement): ready nodes, free GPUs in
    all, the most free on one node, and the ready nodes with nothing allocated."""
    ready = free = most = idle = 0
    for node_id in cluster.nodes:
        node = m.nodes[node_id]
        if node.state != READY:
            continue
        ready += 1
        idle += not node.allocations
        here = len(free_gpus(node))
        free += here
        most = max(most, here)
    return {"readyNodes": ready, "freeGpus": free, "maxFreeGpusOnNode": most, "idleNodes": idle}
