"""Placement: `plan(models, now)` decides which queued jobs start where, and why the others
wait. A pure function of the read models and the clock; it returns the events to append.

Per cluster, queued jobs are taken in queue order (priority desc, submission asc; see
projections/queue.py). A job needs `nodeCount` distinct ready nodes with `gpusPerNode` free
GPUs each (a job on a VM size without GPUs takes whole idle nodes), all at once or none (gang).
Among the nodes that fit, the fullest are chosen first (best fit), which keeps whole nodes free
for large jobs. The first job that cannot start gets a reservation: the time the GPUs it needs
are expected to be free (running attempts end at the latest at their wall-clock limit). A later,
smaller job may start before it (backfill) only if its own wall-clock limit ends by then, so
backfill never delays the reserved job. On a cluster with `preemption`, a blocked job may
preempt running `preemptible` jobs of lower priority when that frees what it needs.

Every queued job that does not start gets a pending reason from a closed set. A new reason is
recorded at once; when only its numbers change (`max_free`, `free_nodes`, ...) it is recorded
again at most every `REASON_REFRESH_S` seconds, so a busy cluster does not log a new reason
for every queued job at every cycle. The reasons:

- `cluster_missing{}`: its cluster was deleted;
- `cluster_scaling{ready_nodes}`: the cluster is resizing and has too few ready nodes yet;
- `insufficient_gpus{need, max_free}`: no ready node has enough free GPUs, and the cluster as a
  whole has fewer free GPUs than one node of the job needs (capacity);
- `fragmented{need, max_free, total_free}`: enough GPUs are free, but spread over nodes;
- `gang_incomplete{need_nodes, free_nodes}`: fewer than `nodeCount` nodes could hold a task;
- `behind_reservation{}`: it would fit, but would delay the job holding the reservation;
- `preempting{victims}`: running jobs are being preempted to make room for it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batchd.events.envelope import NewEvent
from batchd.projections import queue
from batchd.projections.model import READY, Cluster, Job, ReadModels

Decision = tuple[str, NewEvent]  # (stream, event)
NEVER = float("inf")
REASON_REFRESH_S = 300  # least seconds between two records of a reason whose code is the same


@dataclass(slots=True)
class _Capacity:
    """Free capacity of one cluster during a cycle: free GPU indices per ready node."""

    free: dict[str, list[int]]  # node id -> free GPU indices, ascending
    gpus: dict[str, int]  # node id -> GPUs on the node (0: a node without GPUs)
    by_free: list[list[str]] = field(default_factory=list)  # free count -> node ids

    def __post_init__(self) -> None:
        top = max(self.gpus.values(), default=0)
        self.by_free = [[] for _ in range(max(top, 1) + 1)]
        for node_id, free in self.free.items():
            self.by_free[self._slots(node_id, free)].append(node_id)
        for bucket in self.by_free:
            bucket.sort()

    def _slots(self, node_id: str, free: list[int]) -> int:
        """What a node can still take: its free GPUs, or 1/0 for a node without GPUs."""
        return len(free) if self.gpus[node_id] else (1 if free == [-1] else 0)

    def fitting(self, need: int) -> int:
        """How many nodes could hold one task that needs `need` GPUs (0: a whole node)."""
        low = max(need, 1)
        return sum(len(b) for b in self.by_free[low:]) if low < len(self.by_free) else 0

    def max_free(self) -> int:
        for count in range(len(self.by_free) - 1, -1, -1):
            if self.by_free[count]:
                return count
        return 0

    def total_free(self) -> int:
        return sum(count * len(nodes) for count, nodes in enumerate(self.by_free))

    def take(self, need: int, nodes: int) -> list[tuple[str, list[int]]] | None:
        """Best fit: `nodes` distinct nodes with the fewest free GPUs that still hold `need`."""
        low = max(need, 1)
        chosen: list[str] = []
        for count in range(low, len(self.by_free)):
            for node_id in self.by_free[count]:
                chosen.append(node_id)
                if len(chosen) == nodes:
                    break
            if len(chosen) == nodes:
                break
        if len(chosen) < nodes:
            return None
        tasks = []
        for node_id in chosen:
            free = self.free[node_id]
            self.by_free[self._slots(node_id, free)].remove(node_id)
            if self.gpus[node_id]:
                gpus, self.free[node_id] = free[:need], free[need:]
            else:
                gpus, self.free[node_id] = [], []
            bisect.insort(self.by_free[self._slots(node_id, self.free[node_id])], node_id)
            tasks.append((node_id, gpus))
        return tasks


def _capacity(m: ReadModels, cluster: Cluster) -> _Capacity:
    free: dict[str, list[int]] = {}
    gpus: dict[str, int] = {}
    for node_id in cluster.nodes:
        node = m.nodes[node_id]
        if node.state != READY:
            continue
        gpus[node_id] = node.gpus
        if node.gpus:
            free[node_id] = [g for g in range(node.gpus) if str(g) not in node.allocations]
        else:
            free[node_id] = [] if node.allocations else [-1]  # [-1]: the whole node is free
    return _Capacity(free, gpus)


def plan(m: ReadModels, now: int) -> list[Decision]:
    """The events of one scheduling cycle at time `now` (microseconds)."""
    decisions: list[Decision] = []
    for cluster_id in list(m.queues):
        waiting = queue.ordered(m, cluster_id)
        if not waiting:
            continue
        cluster = m.clusters.get(cluster_id)
        if cluster is None:
            for job in waiting:
                _reason(decisions, job, {"code": "cluster_missing"}, now)
            continue
        _plan_cluster(m, cluster, waiting, now, decisions)
    return decisions


def _plan_cluster(
    m: ReadModels, cluster: Cluster, waiting: list[Job], now: int, out: list[Decision]
) -> None:
    capacity = _capacity(m, cluster)
    reserved: tuple[Job, float] | None = None  # the first blocked job, and when it can start
    why: dict[tuple[int, int], dict[str, Any]] = {}  # reasons by shape, while capacity holds
    for job in waiting:
        need, nodes = _need(job, capacity), job.node_count
        if reserved is not None and not _ends_before(job, now, reserved[1]):
            reason = why.get((need, nodes))
            if reason is None:
                reason = why[need, nodes] = (
                    {"code": "behind_reservation"}
                    if capacity.fitting(need) >= nodes
                    else _why(cluster, capacity, need, nodes)
                )
            _reason(out, job, reason, now)
            continue
        tasks = capacity.take(need, nodes)
        if tasks is not None:
            why.clear()
            attempt = job.attempt + 1
            placed = [{"node": node_id, "gpus": gpus} for node_id, gpus in tasks]
            out.append((f"job-{job.job_id}", NewEvent(
                "JobScheduled", {"jobId": job.job_id, "attempt": attempt, "tasks": placed},
            )))  # fmt: skip
            continue
        if reserved is None:
            victims = _victims(m, cluster, job) if cluster.preemption else None
            if victims:
                for victim in victims:
                    out.append((f"job-{victim.job_id}", NewEvent(
                        "JobPreempted",
                        {"jobId": victim.job_id, "attempt": victim.attempt, "by": job.job_id},
                    )))  # fmt: skip
                reason = {"code": "preempting", "victims": [v.job_id for v in victims]}
                _reason(out, job, reason, now)
                reserved = (job, now)  # room is being made for it: nothing passes it now
                continue
            reserved = (job, _start_estimate(m, cluster, job))
            why.clear()
        _reason(out, job, _why(cluster, capacity, need, nodes), now)


def _need(job: Job, capacity: _Capacity) -> int:
    """GPUs per node the job needs (0 from an older submission: every GPU of a node)."""
    return job.gpus_per_node or max(capacity.gpus.values(), default=0)


def _why(cluster: Cluster, capacity: _Capacity, need: int, nodes: int) -> dict[str, Any]:
    ready = len(capacity.gpus)
    if cluster.allocation_state == "resizing" and ready < nodes:
        return {"code": "cluster_scaling", "ready_nodes": ready}
    fitting = capacity.fitting(need)
    if nodes > 1 and fitting < nodes and (fitting > 0 or ready >= nodes):
        return {"code": "gang_incomplete", "need_nodes": nodes, "free_nodes": fitting}
    max_free = capacity.max_free()
    total = capacity.total_free()
    if need and total >= need * nodes and max_free < need:
        return {"code": "fragmented", "need": need, "max_free": max_free, "total_free": total}
    return {"code": "insufficient_gpus", "need": need, "max_free": max_free}


def _reason(out: list[Decision], job: Job, reason: dict[str, Any], now: int) -> None:
    recorded = job.pending_reason
    if recorded == reason:
        return
    if (
        recorded is not None
        and recorded.get("code") == reason["code"]
        and now - job.pending_reason_at < REASON_REFRESH_S * 1_000_000
    ):
        return
    out.append((f"job-{job.job_id}", NewEvent(
        "JobPendingReasonChanged", {"jobId": job.job_id, "reason": reason},
    )))  # fmt: skip


def _ends_before(job: Job, now: int, deadline: float) -> bool:
    limit = job.max_wall_clock_s
    return limit is not None and now + limit * 1_000_000 <= deadline


def _running(m: ReadModels, cluster: Cluster) -> Iterable[Job]:
    """The jobs whose current attempts hold GPUs (or whole nodes) of the cluster."""
    seen = set()
    for node_id in cluster.nodes:
        for job_id, _attempt, _task in m.nodes[node_id].allocations.values():
            if job_id not in seen:
                seen.add(job_id)
                yield m.jobs[job_id]


def _start_estimate(m: ReadModels, cluster: Cluster, job: Job) -> float:
    """When `job` could start at the latest, if running attempts end at their wall-clock limit
    (NEVER if it can never fit on the cluster's ready nodes)."""
    capacity = _capacity(m, cluster)
    ends: list[tuple[float, str, list[int]]] = []
    for running in _running(m, cluster):
        limit = running.max_wall_clock_s
        started = running.scheduled_at or 0
        end = started + limit * 1_000_000 if limit is not None else NEVER
        for node_id, gpus in running.tasks:
            if node_id in capacity.free:
                ends.append((end, node_id, gpus))
    ends.sort()
    need = _need(job, capacity)
    for end, node_id, gpus in ends:
        if capacity.fitting(need) >= job.node_count:
            break
        _give_back(capacity, node_id, gpus)
        if capacity.fitting(need) >= job.node_count:
            return end
    return NEVER if capacity.fitting(need) < job.node_count else 0


def _give_back(capacity: _Capacity, node_id: str, gpus: list[int]) -> None:
    free = capacity.free[node_id]
    capacity.by_free[capacity._slots(node_id, free)].remove(node_id)
    if capacity.gpus[node_id]:
        free.extend(gpus)
        free.sort()
    else:
        capacity.free[node_id] = free = [-1]
    bisect.insort(capacity.by_free[capacity._slots(node_id, free)], node_id)


def _victims(m: ReadModels, cluster: Cluster, job: Job) -> list[Job] | None:
    """The fewest running preemptible jobs of lower priority (lowest priority, then newest
    first) whose GPUs, with what is free, let `job` start; None if even all would not do."""
    candidates = sorted(
        (r for r in _running(m, cluster) if r.preemptible and r.priority < job.priority),
        key=lambda r: (r.priority, -(r.scheduled_at or 0)),
    )
    capacity = _capacity(m, cluster)
    chosen = []
    for victim in candidates:
        if capacity.fitting(_need(job, capacity)) >= job.node_count:
            break
        for node_id, gpus in victim.tasks:
            if node_id in capacity.free:
                _give_back(capacity, node_id, gpus)
        chosen.append(victim)
    if capacity.fitting(_need(job, capacity)) < job.node_count:
        return None
    return chosen or None


def overdue(m: ReadModels, now: int) -> list[Decision]:
    """Terminate requests for running jobs past their wall-clock limit."""
    out = []
    for job in m.jobs.values():
        limit = job.max_wall_clock_s
        if job.state in ("scheduled", "preparing", "running") and limit is not None:
            started = job.started_at or job.scheduled_at or now
            if now - started > limit * 1_000_000:
                out.append((f"job-{job.job_id}", NewEvent(
                    "JobTerminateRequested",
                    {"jobId": job.job_id, "reason": f"maxWallClockTime of {limit} s exceeded"},
                )))  # fmt: skip
    return out
