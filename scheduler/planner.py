"""Placement: `plan(models, now)` decides which queued jobs start where, and why the others
wait. A pure function of the read models and the clock; it returns the events to append.

Per cluster, queued jobs are taken in queue order (priority desc, submission asc; see
projections/queue.py). A job needs `nodeCount` distinct ready nodes with `gpusPerNode` free
GPUs each (a job with `gpusPerNode` 0 takes whole idle nodes), all at once or none (gang).
Among the nodes that fit, the fullest are chosen first (best fit), which keeps whole nodes free
for large jobs. The first job that cannot start gets a reservation: the time the GPUs it needs
are expected to be free (running attempts end at the latest at their wall-clock limit). A later,
smaller job may start before it (backfill) only if its own wall-clock limit ends by then, so
backfill never delays the reserved job; a later job may also start on nodes the reserved one
cannot use (they lack its runtime). A job uses only nodes that offer its runtime (`docker`
for containers, `process` otherwise). On a cluster with `preemption`, a blocked job may
preempt running `preemptible` jobs of lower priority when that frees what it needs.

Every queued job that does not start gets a pending reason from a closed set, recorded only
when it changes. Its parameters are stable: they describe the job (what it needs) or the
decision (whom it preempts), never the cluster's free capacity of the moment, which changes at
every cycle and would log a new reason for every queued job each time (the read models show
that capacity beside the queue: `projections.clusters.free_capacity`). The reasons:

(A queued job whose cluster is deleted, or being deleted, is not given a reason: it fails,
`cluster_deleted`, since no node will ever take it. Logs of earlier versions hold the reason
`cluster_missing{}` for such jobs.)

- `cluster_scaling{}`: the cluster is resizing and has too few ready nodes yet;
- `cluster_too_small{need_nodes}`: the cluster's scale settings were lowered after the job was
  submitted, and now allow fewer than `need_nodes` nodes (nor does it have them); it waits
  until they allow enough;
- `insufficient_gpus{need}`: no ready node has `need` free GPUs, and the cluster as a whole
  has fewer than the job needs, or no ready node has `need` GPUs at all (capacity);
- `fragmented{need}`: enough GPUs are free in all, but no node has `need` of them;
- `gang_incomplete{need_nodes}`: fewer than `need_nodes` nodes could each hold a task;
- `insufficient_nodes{need_nodes}`: for a job that needs no GPU, fewer than `need_nodes`
  nodes are idle;
- `nodes_not_ready{}`: the cluster's ready nodes could never hold it, but some of its nodes
  are not ready (still preparing, `unusable` after a failed setup task, suspect or lost);
  `batchd node list` shows which and why. While some of them are on their way to ready
  (registering, as after a daemon restart, running their setup task, suspect, or lost for
  less than NODES_COMING), such a job holds the reservation: nothing passes it meanwhile;
- `runtime_missing{runtime}`: no ready node offers the runtime it needs (`docker` for a job
  with containerSettings, `process` otherwise);
- `behind_reservation{}`: an earlier job holds the reservation, and this one could not start
  before it without delaying it (or could, but does not fit now); a job that could never fit
  the cluster's ready nodes is told its own reason instead (unless the reservation is held
  for nodes on their way back, as after a restart, and it lacks only those). Like Slurm's
  `Priority` beside `Resources`, this keeps the reasons of a long queue steady: only the
  job at its head is told about capacity, and only its reason changes as capacity comes and
  goes;
- `preempting{victims}`: running jobs are being preempted to make room for it;
- `attempt_stopping{}`: the tasks of its own previous attempt (requeued or preempted) are
  still stopping; two attempts of a job never run at once;
- `gpus_stopping{}`: it fits once the tasks of requeued or preempted attempts that still hold
  GPUs here have stopped (a preempting job keeps its `preempting` reason meanwhile).

The last two wait seconds (a task's SIGTERM grace): such a job holds a reservation for now,
so nothing passes it meanwhile, and no further job is preempted for it.

A cycle stops once it has decided `CYCLE_DECISIONS` events (never within a job's, so it may
pass the bound by the few events of its last job). A long queue meeting much free capacity
(a new cluster, a burst of submissions) is then planned in several short cycles instead of
one long one: the daemon's event loop, which also answers the API and the agents, is never
held for long, and each cycle's events commit soon. The next cycle (the daemon plans again
after its usual short gap) carries on where this one stopped: the jobs it placed have left
the queue, and those it told their reason have it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from batchd.events.envelope import NewEvent
from batchd.projections import lifecycle, queue
from batchd.projections.allocation import free_gpus, is_stale, stale_allocations
from batchd.projections.model import (
    LEAVING,
    LOST,
    PREPARING,
    PROVISIONING,
    READY,
    SUSPECT,
    Cluster,
    Job,
    ReadModels,
)
from batchd.scheduler.clusterspec import max_nodes

Decision = tuple[str, NewEvent]  # (stream, event)
NEVER = float("inf")
CYCLE_DECISIONS = 1000  # the most events one cycle decides (see the module's docstring)
BEHIND_RESERVATION = {"code": "behind_reservation"}
ATTEMPT_STOPPING = {"code": "attempt_stopping"}
GPUS_STOPPING = {"code": "gpus_stopping"}
NODES_NOT_READY = {"code": "nodes_not_ready"}
# A job that only the cluster's nodes on their way to ready could hold (registering after a
# restart, running their setup task, suspect, just lost) holds the queue while they come, for
# so long after their last change of state at most: a node that stays away frees the queue.
COMING = (PROVISIONING, PREPARING, SUSPECT, LOST)
NODES_COMING = 120 * 1_000_000  # microseconds
NO_NODES: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Capacity:
    """Free capacity of one cluster during a cycle. Nodes with GPUs take tasks that need GPUs
    (`by_free`: free GPU count -> node ids, each list sorted); a task that needs none (`need`
    0) takes a whole idle node: one without GPUs (`whole`, sorted), else one whose GPUs are
    all free (`idle`), the one with the fewest GPUs first."""

    free: dict[str, list[int]]  # node id -> free GPU indices, ascending
    gpus: dict[str, int]  # node id -> GPUs on the node (0: a node without GPUs)
    whole: list[str]  # idle nodes without GPUs
    by_free: list[list[str]] = field(default_factory=list)
    idle: set[str] = field(default_factory=set)  # nodes with GPUs, all of them free
    _ever: dict[int, int] = field(default_factory=dict)  # need -> nodes that could ever hold it
    staying: int = 0  # the cluster's nodes that are not leaving (draining, evicted)
    coming: int = 0  # its nodes on their way to ready (for less than NODES_COMING)
    joining: int = 0  # its nodes registering or running their setup task
    # runtime -> the ready nodes without it (none, on a cluster whose nodes all offer the same)
    lacking: dict[str, frozenset[str]] = field(default_factory=dict)
    runtimes: frozenset[str] = frozenset()  # those some ready node offers

    def __post_init__(self) -> None:
        if self.by_free:
            return
        self.by_free = [[] for _ in range(max(self.gpus.values(), default=0) + 1)]
        for node_id, free in self.free.items():
            if self.gpus[node_id]:
                self.by_free[len(free)].append(node_id)
                if len(free) == self.gpus[node_id]:
                    self.idle.add(node_id)
        for bucket in self.by_free:
            bucket.sort()
        self.whole.sort()

    def copy(self) -> _Capacity:
        return _Capacity(
            {node_id: list(free) for node_id, free in self.free.items()},
            self.gpus,
            list(self.whole),
            [list(nodes) for nodes in self.by_free],
            set(self.idle),
            self._ever,
            self.staying,
            self.coming,
            self.joining,
            self.lacking,
            self.runtimes,
        )

    @property
    def ready(self) -> frozenset[str]:
        return frozenset(self.gpus)

    def skip(self, runtime: str) -> frozenset[str]:
        """The ready nodes a job on `runtime` cannot use."""
        return self.lacking.get(runtime, NO_NODES)

    def fitting(self, need: int, skip: frozenset[str] = NO_NODES) -> int:
        """How many nodes could hold one task that needs `need` GPUs (0: a whole node), of
        those not in `skip`."""
        if skip:
            return len(self._fitting_nodes(need, skip))
        if not need:
            return len(self.whole) + len(self.idle)
        return sum(len(b) for b in self.by_free[need:]) if need < len(self.by_free) else 0

    def _fitting_nodes(self, need: int, skip: frozenset[str]) -> list[str]:
        if not need:
            by_size = sorted(self.idle, key=lambda n: (self.gpus[n], n))
            return [n for n in [*self.whole, *by_size] if n not in skip]
        return [n for bucket in self.by_free[need:] for n in bucket if n not in skip]

    def ever_fits(self, need: int, nodes: int, skip: frozenset[str] = NO_NODES) -> bool:
        """Whether `nodes` of the ready nodes (not in `skip`) could hold a task each, were
        they all free."""
        if skip:
            count = sum(1 for n, gpus in self.gpus.items() if gpus >= need and n not in skip)
            return count >= nodes
        count = self._ever.get(need)
        if count is None:
            count = self._ever[need] = sum(1 for gpus in self.gpus.values() if gpus >= need)
        return count >= nodes

    def max_free(self, skip: frozenset[str] = NO_NODES) -> int:
        for count in range(len(self.by_free) - 1, 0, -1):
            if any(n not in skip for n in self.by_free[count]):
                return count
        return 0

    def total_free(self, skip: frozenset[str] = NO_NODES) -> int:
        return sum(count * sum(n not in skip for n in nodes)
                   for count, nodes in enumerate(self.by_free))  # fmt: skip

    def take(
        self, need: int, nodes: int, skip: frozenset[str] = NO_NODES
    ) -> list[tuple[str, list[int]]] | None:
        """Best fit: `nodes` distinct nodes (not in `skip`) with the fewest free GPUs that
        still hold `need` (`need` 0: whole idle nodes, those without GPUs first)."""
        if skip:
            chosen = self._fitting_nodes(need, skip)[:nodes]
            if len(chosen) < nodes:
                return None
            if not need:
                self.whole[:] = [n for n in self.whole if n not in chosen]
        elif self.fitting(need) < nodes:
            return None
        elif not need:
            chosen, self.whole[:nodes] = self.whole[:nodes], []
            if len(chosen) < nodes:
                by_size = sorted(self.idle, key=lambda n: (self.gpus[n], n))
                chosen += by_size[: nodes - len(chosen)]
        else:
            chosen = []
            for count in range(need, len(self.by_free)):
                chosen.extend(self.by_free[count][: nodes - len(chosen)])
                if len(chosen) == nodes:
                    break
        tasks = []
        for node_id in chosen:
            if not self.gpus[node_id]:
                tasks.append((node_id, []))
                continue
            free = self.free[node_id]
            held = need or len(free)  # a whole node holds all its GPUs
            self.by_free[len(free)].remove(node_id)
            gpus, self.free[node_id] = free[:held], free[held:]
            bisect.insort(self.by_free[len(free) - held], node_id)
            self.idle.discard(node_id)
            tasks.append((node_id, gpus if need else []))
        return tasks

    def give_back(self, node_id: str, gpus: list[int]) -> None:
        """Return a task's GPUs (or its whole node: `gpus` empty) to the free capacity."""
        if not self.gpus[node_id]:
            bisect.insort(self.whole, node_id)
            return
        free = self.free[node_id]
        self.by_free[len(free)].remove(node_id)
        free.extend(gpus or range(self.gpus[node_id]))
        free.sort()
        bisect.insort(self.by_free[len(free)], node_id)
        if len(free) == self.gpus[node_id]:
            self.idle.add(node_id)


def _capacity(m: ReadModels, cluster: Cluster, now: int) -> _Capacity:
    free: dict[str, list[int]] = {}
    gpus: dict[str, int] = {}
    whole: list[str] = []
    staying = coming = joining = 0
    for node_id in cluster.nodes:
        node = m.nodes[node_id]
        staying += node.state != LEAVING
        if node.state != READY:
            coming += node.state in COMING and now - node.since < NODES_COMING
            joining += node.state in (PROVISIONING, PREPARING)
            continue
        gpus[node_id] = node.gpus
        free[node_id] = free_gpus(node)
        if not node.gpus and not node.allocations:
            whole.append(node_id)
    offered = {node_id: m.nodes[node_id].runtimes for node_id in gpus}
    runtimes = frozenset(r for each in offered.values() for r in each)
    lacking = {}
    for runtime in runtimes:
        without = frozenset(n for n, each in offered.items() if runtime not in each)
        if without:
            lacking[runtime] = without
    return _Capacity(free, gpus, whole, staying=staying, coming=coming, joining=joining,
                     lacking=lacking, runtimes=runtimes)  # fmt: skip


def plan(m: ReadModels, now: int, limit: int = CYCLE_DECISIONS) -> list[Decision]:
    """The events of one scheduling cycle at time `now` (microseconds), stopping once there
    are `limit` of them (see `cut_short`)."""
    decisions: list[Decision] = []
    for cluster_id in list(m.queues):
        waiting = queue.ordered(m, cluster_id)
        if not waiting:
            continue
        cluster = m.clusters.get(cluster_id)
        if cluster is None or cluster.deleting:  # no node will ever take them
            for job in waiting:
                if len(decisions) >= limit:
                    return decisions
                decisions.append(_cluster_gone(job, cluster))
            continue
        _plan_cluster(m, cluster, waiting, now, decisions, limit)
        if len(decisions) >= limit:
            break
    return decisions


def cut_short(decisions: list[Decision], limit: int = CYCLE_DECISIONS) -> bool:
    """Did the cycle stop at its bound, leaving jobs it did not look at? (Plan again now.)"""
    return len(decisions) >= limit


def _plan_cluster(
    m: ReadModels, cluster: Cluster, waiting: list[Job], now: int, out: list[Decision],
    limit: int,
) -> None:  # fmt: skip
    capacity = _capacity(m, cluster, now)
    reserved: float | None = None  # when the first blocked job can start, once there is one
    apart = NO_NODES  # the ready nodes that job cannot use (its runtime): free for others
    awaited = False  # is that job waiting for nodes on their way back (a daemon restart)?
    stopping = _stopping(m, capacity)
    # when GPUs come back: this cycle's placements and the stopping tasks' (end, node, GPUs)
    ends: list[tuple[float, str, list[int]]] = [(now, n, gpus) for n, gpus in stopping]
    why: dict[tuple[int, int, str], dict[str, Any]] = {}  # reasons by shape, while none is placed
    lacking, runtimes = capacity.lacking, capacity.runtimes
    for job in waiting:
        if len(out) >= limit:
            return
        need, nodes = job.gpus_per_node, job.node_count
        skip = lacking.get(job.runtime, NO_NODES) if lacking else NO_NODES
        if job.runtime not in runtimes and capacity.gpus:  # no ready node can run it
            _reason(out, job, {"code": "runtime_missing", "runtime": job.runtime})
            continue
        if job.stopping:  # its last attempt's tasks are still stopping: never two at once
            _reason(out, job, ATTEMPT_STOPPING)
            if reserved is None:
                reserved, apart = now, skip
            continue
        if reserved is not None and not _ends_before(job, now, reserved):
            tasks, apart = _apart(capacity, job, skip, apart) if apart else (None, apart)
            if tasks is None:
                told = job.pending_reason == BEHIND_RESERVATION  # most of a long queue: no call
                if not told or not capacity.ever_fits(need, nodes, skip):
                    _wait_behind(out, job, cluster, capacity, why, skip, awaited)
                continue
        else:
            tasks = capacity.take(need, nodes, skip)
        if tasks is not None:
            attempt = job.attempt + 1
            placed = [{"node": node_id, "gpus": gpus} for node_id, gpus in tasks]
            out.append((f"job-{job.job_id}", NewEvent(
                "JobScheduled", {"jobId": job.job_id, "attempt": attempt, "tasks": placed},
            )))  # fmt: skip
            end = _end(now, job.max_wall_clock_s)
            ends.extend((end, node_id, gpus) for node_id, gpus in tasks)
            why.clear()
            continue
        if reserved is not None:  # it could have backfilled, but does not fit now
            _wait_behind(out, job, cluster, capacity, why, skip, awaited)
            continue
        soon = _back(capacity, stopping)
        if _room_coming(out, job, soon, stopping) or (
            cluster.preemption and _preempt(out, m, cluster, job, soon)
        ):
            reserved, apart = now, skip  # room is being made for it: nothing passes it now
            continue
        reserved, apart, awaited = _first_blocked(out, m, cluster, job, capacity, ends, why,
                                                  now)  # fmt: skip


def _first_blocked(
    out: list[Decision], m: ReadModels, cluster: Cluster, job: Job, capacity: _Capacity,
    ends: list[tuple[float, str, list[int]]], why: dict[tuple[int, int, str], dict[str, Any]],
    now: int,
) -> tuple[float | None, frozenset[str], bool]:  # fmt: skip
    """The first job that cannot start is told why, and holds the reservation: when it can
    start (None: never here), the ready nodes it cannot use (free for the others), and
    whether it holds it for nodes on their way back (for NODES_COMING of its waiting)."""
    skip = capacity.skip(job.runtime)
    reserved, apart = None, NO_NODES
    if capacity.ever_fits(job.gpus_per_node, job.node_count, skip):  # else it reserves nothing
        start = _start_estimate(m, cluster, job, capacity.copy(), ends)
        if start != NEVER:
            reserved, apart = start, skip
    reason = _cached_why(why, cluster, capacity, job)
    awaited = (reason is NODES_NOT_READY and capacity.coming > 0
               and _waited_less(job, now, NODES_COMING))  # fmt: skip
    if awaited:
        reserved, apart = now, skip  # nothing passes it while they come
    _reason(out, job, reason)
    return reserved, apart, awaited


def _waited_less(job: Job, now: int, bound: int) -> bool:
    """Has `job` waited for nodes not ready (its reason, now or from this cycle on) for less
    than `bound`? (Nodes that keep changing state do not hold the queue for ever.)"""
    since = job.pending_reason_at if job.pending_reason == NODES_NOT_READY else now
    return now - (since or now) < bound


def _apart(
    capacity: _Capacity, job: Job, skip: frozenset[str], apart: frozenset[str]
) -> tuple[list[tuple[str, list[int]]] | None, frozenset[str]]:
    """A placement for a job that would not end before the reservation, on nodes the
    reserving job cannot use (`apart`: nodes without its runtime) only, if it fits there;
    and what stays apart for the jobs after it (if it waits, not the nodes it could use)."""
    tasks = capacity.take(job.gpus_per_node, job.node_count, skip | (capacity.ready - apart))
    return tasks, apart if tasks is not None else apart & skip


def _room_coming(out: list[Decision], job: Job, soon: _Capacity,
                 stopping: list[tuple[str, list[int]]]) -> bool:  # fmt: skip
    """Does `job` fit once the stopping tasks' GPUs are back (`soon`, in seconds)? It is
    told so (a preempting job keeps its reason: those are its victims')."""
    if not stopping or soon.fitting(job.gpus_per_node, soon.skip(job.runtime)) < job.node_count:
        return False
    if (job.pending_reason or {}).get("code") != "preempting":
        _reason(out, job, GPUS_STOPPING)
    return True


def _back(capacity: _Capacity, stopping: list[tuple[str, list[int]]]) -> _Capacity:
    """`capacity` with the stopping tasks' GPUs back (they are, in seconds)."""
    if not stopping:
        return capacity
    soon = capacity.copy()
    for node_id, gpus in stopping:
        soon.give_back(node_id, gpus)
    return soon


def _preempt(out: list[Decision], m: ReadModels, cluster: Cluster, job: Job,
             capacity: _Capacity) -> bool:  # fmt: skip
    """Preempt the running jobs that make room for `job` (with what `capacity` has free,
    counting the stopping tasks' GPUs as back), if there are such."""
    victims = _victims(m, cluster, job, capacity)
    if not victims:
        return False
    for victim in victims:
        out.append((f"job-{victim.job_id}", NewEvent(
            "JobPreempted", {"jobId": victim.job_id, "attempt": victim.attempt, "by": job.job_id},
        )))  # fmt: skip
    _reason(out, job, {"code": "preempting", "victims": [v.job_id for v in victims]})
    return True


def _wait_behind(out: list[Decision], job: Job, cluster: Cluster, capacity: _Capacity,
                 why: dict[tuple[int, int, str], dict[str, Any]], skip: frozenset[str],
                 awaited: bool) -> None:  # fmt: skip
    """A job held behind the reservation: told so, unless it could never fit anyway (on the
    nodes not in `skip`: those without its runtime). While the reservation is held for
    nodes on their way back (`awaited`: a daemon restart), lacking those nodes is not
    never: the queue behind its head keeps its reasons, instead of each job logging
    `nodes_not_ready` and then back. (That hold ends after NODES_COMING of the head's
    waiting: nodes that keep coming back do not hide the reason for ever.)"""
    reason = BEHIND_RESERVATION
    if not capacity.ever_fits(job.gpus_per_node, job.node_count, skip):
        reason = _cached_why(why, cluster, capacity, job)
        if reason is NODES_NOT_READY and awaited:
            reason = BEHIND_RESERVATION
    _reason(out, job, reason)


def _too_small(cluster: Cluster, nodes: int, staying: int) -> bool:
    """The job needs more nodes than the cluster's scale settings allow (they were lowered
    after it was submitted) and than the cluster keeps (`staying`: its nodes not leaving)."""
    limit = max_nodes(cluster.scale_settings) if cluster.scale_settings else nodes
    return nodes > max(limit, staying)


def _cached_why(why: dict[tuple[int, int, str], dict[str, Any]], cluster: Cluster,
                capacity: _Capacity, job: Job) -> dict[str, Any]:  # fmt: skip
    """`_why` for a job shape, computed once while the free capacity stays as it is."""
    shape = (job.gpus_per_node, job.node_count, job.runtime)
    reason = why.get(shape)
    if reason is None:
        reason = why[shape] = _why(cluster, capacity, *shape)
    return reason


def _why(cluster: Cluster, capacity: _Capacity, need: int, nodes: int,
         runtime: str) -> dict[str, Any]:  # fmt: skip
    if _too_small(cluster, nodes, capacity.staying):
        return {"code": "cluster_too_small", "need_nodes": nodes}
    skip = capacity.skip(runtime)
    ready = len(capacity.gpus) - len(skip)
    if ready < nodes and _scaling(cluster, capacity):
        return {"code": "cluster_scaling"}
    if len(capacity.gpus) < capacity.staying and not capacity.ever_fits(need, nodes, skip):
        return NODES_NOT_READY
    if not need:
        return {"code": "insufficient_nodes", "need_nodes": nodes}
    fitting = capacity.fitting(need, skip)
    if (
        nodes > 1
        and fitting < nodes
        and (fitting or ready >= nodes or not capacity.ever_fits(need, nodes, skip))
    ):
        return {"code": "gang_incomplete", "need_nodes": nodes}
    if (
        capacity.total_free(skip) >= need * nodes
        and capacity.max_free(skip) < need
        and capacity.ever_fits(need, nodes, skip)
    ):  # (else no node has `need` at all)
        return {"code": "fragmented", "need": need}
    return {"code": "insufficient_gpus", "need": need}


def _scaling(cluster: Cluster, capacity: _Capacity) -> bool:
    """Are nodes on their way to the cluster: some joining now, or fewer staying than its
    manual target asks (an autoscaled cluster that is resizing: its provider's)? Not a
    cluster resizing only because it holds more nodes than its target, lost ones among
    them, nor one whose nodes are leaving: no node is coming to those."""
    if cluster.allocation_state != "resizing":
        return False
    manual = cluster.scale_settings.get("manual")
    if manual is None or capacity.joining:
        return True
    return capacity.staying < manual.get("targetNodeCount", 0)


def _cluster_gone(job: Job, cluster: Cluster | None) -> Decision:
    """JobFailed for a queued job whose cluster is deleted, or being deleted."""
    what = f"cluster {cluster.name!r} is being deleted" if cluster else "its cluster was deleted"
    error = {"code": "cluster_deleted", "message": f"{what}: the job can never run"}
    return (f"job-{job.job_id}", NewEvent("JobFailed", {"jobId": job.job_id, "error": error}))


def _reason(out: list[Decision], job: Job, reason: dict[str, Any]) -> None:
    if job.pending_reason != reason:
        out.append((f"job-{job.job_id}", NewEvent(
            "JobPendingReasonChanged", {"jobId": job.job_id, "reason": reason},
        )))  # fmt: skip


def _ends_before(job: Job, now: int, deadline: float) -> bool:
    """Does `job`, started now, end before `deadline` at the latest? Strictly: a job whose
    limit ends with the reservation's (both the 7-day default, the reservation resting on a
    job placed in this cycle) would pass the reserved job on a tie of two worst cases, and
    hold its GPUs long after the job it tied with has ended."""
    limit = job.max_wall_clock_s
    return limit is not None and now + limit * 1_000_000 < deadline


def _running(m: ReadModels, cluster: Cluster) -> Iterable[Job]:
    """The jobs whose current attempts hold GPUs (or whole nodes) of the cluster."""
    seen = set()
    for node_id in cluster.nodes:
        for holder in m.nodes[node_id].allocations.values():
            if holder[0] not in seen and not is_stale(m, holder):
                seen.add(holder[0])
                yield m.jobs[holder[0]]


def _stopping(m: ReadModels, capacity: _Capacity) -> list[tuple[str, list[int]]]:
    """(node, GPUs) held on the ready nodes by tasks of earlier attempts still stopping."""
    out = []
    for node_id in capacity.free:
        held = [gpu for gpu, _holder in stale_allocations(m, m.nodes[node_id])]
        if held:
            out.append((node_id, [int(g) for g in held if g != "*"]))
    return out


def _end(start: int, limit: int | None) -> float:
    """When an attempt placed at `start` ends at the latest (the limit counts from placement,
    as the attempt holds its GPUs from then: see `overdue`)."""
    return NEVER if limit is None else start + limit * 1_000_000


def _start_estimate(
    m: ReadModels,
    cluster: Cluster,
    job: Job,
    capacity: _Capacity,
    ends: list[tuple[float, str, list[int]]],
) -> float:
    """When `job` could start at the latest, from the free `capacity` (which it may use up) and
    the attempts holding the rest: those running, and this cycle's placements `ends`, each
    ending at its wall-clock limit. NEVER if it can never fit on the cluster's ready nodes."""
    ends = list(ends)
    for running in _running(m, cluster):
        end = _end(running.scheduled_at or 0, running.max_wall_clock_s)
        ends.extend(
            (end, node_id, gpus) for node_id, gpus in running.tasks if node_id in capacity.free
        )
    ends.sort()
    need, skip = job.gpus_per_node, capacity.skip(job.runtime)
    if capacity.fitting(need, skip) >= job.node_count:
        return 0
    for end, node_id, gpus in ends:
        capacity.give_back(node_id, gpus)
        if capacity.fitting(need, skip) >= job.node_count:
            return end
    return NEVER


def _victims(m: ReadModels, cluster: Cluster, job: Job, free: _Capacity) -> list[Job] | None:
    """Running preemptible jobs of lower priority whose GPUs, with what is `free` now (the
    stopping tasks' GPUs counted as back), let `job` start; None if even all of them would
    not do. They are found node by node, and taken on the `nodeCount` nodes where that
    costs least (`_cost`: victims of the lowest priority, then the fewest, then the
    newest): on a node, lowest priority and newest first, each one then found not needed
    spared."""
    candidates = sorted(
        (r for r in _running(m, cluster) if r.preemptible and r.priority < job.priority
         and lifecycle.allowed(r.state, "JobPreempted")),
        key=lambda r: (r.priority, -(r.scheduled_at or 0)),
    )  # fmt: skip
    by_node: dict[str, list[Job]] = {}  # each node's candidates, in their order
    for candidate in candidates:
        for node_id, _gpus in candidate.tasks:
            by_node.setdefault(node_id, []).append(candidate)
    skip = free.skip(job.runtime)
    options = []
    for node_id in free.free:
        if node_id in skip:
            continue
        here = by_node.get(node_id, [])
        chosen = _spared(here, lambda vs, n=node_id: _fits_on(free, n, job.gpus_per_node, vs))
        if chosen is not None:
            options.append((_cost(chosen), node_id, chosen))
    if len(options) < job.node_count:
        return None
    rank = {id(c): i for i, c in enumerate(candidates)}
    victims = {id(v): v for *_cheapest, chosen in sorted(options, key=lambda o: o[:2])[
        : job.node_count] for v in chosen}  # fmt: skip
    ordered = sorted(victims.values(), key=lambda v: rank[id(v)])
    return ordered if ordered and _frees_enough(free, ordered, job) else None


def _spared(victims: list[Job], enough: Callable[[list[Job]], bool]) -> list[Job] | None:
    """`victims` taken in order until they are `enough`, then each one not needed spared
    (the last taken first); None if even all of them are not enough."""
    chosen: list[Job] = []
    for victim in victims:
        if enough(chosen):
            break
        chosen.append(victim)
    if not enough(chosen):
        return None
    for victim in reversed(list(chosen)):
        rest = [v for v in chosen if v is not victim]
        if enough(rest):
            chosen = rest
    return chosen


def _fits_on(free: _Capacity, node_id: str, need: int, victims: list[Job]) -> bool:
    """Does `node_id` hold a task needing `need` GPUs (0: the whole node) once the victims'
    tasks on it have stopped?"""
    back = [gpus for v in victims for n, gpus in v.tasks if n == node_id]
    total = free.gpus[node_id]
    if not total:  # a node without GPUs: whole, if nothing else holds it
        return not need and (node_id in free.whole or bool(back))
    count = len(free.free[node_id]) + sum(len(gpus) or total for gpus in back)
    return count >= (need or total)


def _cost(victims: list[Job]) -> tuple[float, int, float]:
    """What preempting `victims` costs, least first: their highest priority, their number,
    and how long ago the oldest of them started (newer ones have done less)."""
    if not victims:
        return (-NEVER, 0, -NEVER)
    oldest = min(v.scheduled_at or 0 for v in victims)
    return (max(v.priority for v in victims), len(victims), -oldest)


def _frees_enough(free: _Capacity, victims: list[Job], job: Job) -> bool:
    capacity = free.copy()
    for victim in victims:
        for node_id, gpus in victim.tasks:
            if node_id in capacity.free:
                capacity.give_back(node_id, gpus)
    return capacity.fitting(job.gpus_per_node, capacity.skip(job.runtime)) >= job.node_count


def overdue(m: ReadModels, now: int) -> list[Decision]:
    """Terminate requests for placed jobs past their wall-clock limit, which counts from
    placement: the attempt holds its GPUs from then, preparation included, and the planner's
    reservations count on that."""
    out = []
    for job in m.jobs.values():
        limit = job.max_wall_clock_s
        if job.state in lifecycle.PLACED and limit is not None:
            placed = job.scheduled_at if job.scheduled_at is not None else now
            if now - placed > limit * 1_000_000:
                out.append((f"job-{job.job_id}", NewEvent(
                    "JobTerminateRequested",
                    {"jobId": job.job_id, "reason": f"maxWallClockTime of {limit} s exceeded"},
                )))  # fmt: skip
    return out
