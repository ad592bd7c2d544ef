"""Property tests of the read models over random valid histories (hypothesis).

A state machine plays a small cluster world and logs what happens as events: clusters, nodes
that register, fail setup, get lost and removed; jobs of several shapes and priorities that
queue, get placed on free GPUs, prepare, run, succeed, fail, get requeued or preempted,
terminated and deleted. After every step it checks that

- the live read models (applied event by event) equal the read models rebuilt from scratch,
  and equal the snapshot taken before the step plus catch-up over the step's events (so, over
  a run, snapshot-plus-catch-up is checked from every prefix);
- each cluster's queue is exactly its queued jobs, in (priority desc, submission asc) order;
- no GPU is held by two live attempts, and the nodes' allocations are exactly the GPUs the
  live attempts hold.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchd.events.envelope import RecordedEvent
from batchd.projections import fold, queue, snapshot
from batchd.projections.model import ATTEMPT_STATES, QUEUED, ReadModels

GPUS = 4
SCALE = {"manual": {"targetNodeCount": 2}}
OUTCOMES = st.sampled_from(["advance", "advance", "succeed", "fail", "requeue", "preempt"])
PRIORITIES = st.sampled_from([-500, 0, 0, 500, 1000])


class World(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[RecordedEvent] = []
        self.versions: dict[str, int] = {}
        self.live = ReadModels()
        self.before_step = snapshot.encode(self.live)
        self.step_start = 0
        # the generator's own view, used only to keep the history valid
        self.clusters: list[str] = []
        self.nodes: dict[str, dict] = {}  # id -> {"cluster", "ready", "free": set}
        self.jobs: dict[str, dict] = {}  # id -> {"cluster", "state", "attempt", "tasks", ...}
        self.names = 0
        self.ids = 0  # ids are counted, not random: hypothesis must be able to replay a run

    def new_id(self) -> uuid.UUID:
        self.ids += 1
        return uuid.UUID(int=self.ids)

    # -- logging ---------------------------------------------------------------------------
    def emit(self, stream: str, type_: str, data: dict, actor: str = "scheduler") -> None:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        position = len(self.log) + 1
        event = RecordedEvent(
            position, self.new_id(), stream, version, type_, 1, 1_000_000 * position, actor,
            None, None, data, b"",
        )  # fmt: skip
        self.log.append(event)
        fold.apply(self.live, event)

    def job_event(self, job_id: str, type_: str, **data) -> None:
        self.emit(f"job-{job_id}", type_, {"jobId": job_id, **data})

    # -- steps -----------------------------------------------------------------------------
    def begin(self) -> None:
        self.before_step = snapshot.encode(self.live)
        self.step_start = len(self.log)

    @precondition(lambda self: len(self.clusters) < 2)
    @rule()
    def create_cluster(self) -> None:
        self.begin()
        cluster_id = str(self.new_id())
        self.clusters.append(cluster_id)
        name = f"c{len(self.clusters)}"
        self.emit(f"cluster-ws/{name}", "ClusterCreated", {
            "clusterId": cluster_id, "workspace": "ws", "name": name,
            "spec": {"vmSize": "Standard_NC24s_v3", "scaleSettings": SCALE},
        }, "user:ops")  # fmt: skip

    @precondition(lambda self: self.clusters and len(self.nodes) < 5)
    @rule(data=st.data(), setup_fails=st.booleans())
    def add_node(self, data, setup_fails: bool) -> None:
        self.begin()
        cluster = data.draw(st.sampled_from(self.clusters))
        node_id = f"n{self.new_id().int}"
        stream = f"node-{node_id}"
        self.emit(stream, "NodeProvisioning", {"nodeId": node_id, "cluster": cluster})
        resources = {"gpus": GPUS, "cpus": 24, "memoryMb": 1000, "runtimes": ["process"]}
        self.emit(stream, "NodeRegistered", {"nodeId": node_id, "cluster": cluster, **resources})
        self.emit(stream, "NodeSetupStarted", {"nodeId": node_id})
        if setup_fails:
            self.emit(stream, "NodeSetupFailed", {"nodeId": node_id, "error": {"code": "setup"}})
        else:
            self.emit(stream, "NodeSetupSucceeded", {"nodeId": node_id})
        self.nodes[node_id] = {
            "cluster": cluster,
            "ready": not setup_fails,
            "free": set(range(GPUS)),
        }

    @precondition(lambda self: self.clusters)
    @rule(data=st.data(), priority=PRIORITIES, gpus=st.sampled_from([1, 2, 4]),
          node_count=st.sampled_from([1, 1, 2]))  # fmt: skip
    def submit(self, data, priority: int, gpus: int, node_count: int) -> None:
        self.begin()
        cluster = data.draw(st.sampled_from(self.clusters))
        job_id = str(self.new_id())
        self.names += 1
        self.emit(f"job-{job_id}", "JobSubmitted", {
            "jobId": job_id, "workspace": "ws", "experiment": "exp",
            "name": f"job-{self.names % 4}", "cluster": cluster, "owner": "alice",
            "priority": priority, "nodeCount": node_count, "gpusPerNode": gpus, "spec": {},
        }, "user:alice")  # fmt: skip
        self.jobs[job_id] = {"cluster": cluster, "state": QUEUED, "attempt": 0, "tasks": [],
                             "gpus": gpus, "nodes": node_count}  # fmt: skip
        if data.draw(st.booleans()):
            reason = {"code": "insufficient_gpus", "need": gpus, "maxFree": 0}
            self.job_event(job_id, "JobPendingReasonChanged", reason=reason)

    def _in(self, *states: str) -> list[str]:
        return sorted(j for j, s in self.jobs.items() if s["state"] in states)

    @precondition(lambda self: self._in(QUEUED))
    @rule(data=st.data())
    def schedule(self, data) -> None:
        job_id = data.draw(st.sampled_from(self._in(QUEUED)))
        job = self.jobs[job_id]
        fits = sorted(
            n for n, s in self.nodes.items()
            if s["ready"] and s["cluster"] == job["cluster"] and len(s["free"]) >= job["gpus"]
        )  # fmt: skip
        if len(fits) < job["nodes"]:
            return
        self.begin()
        chosen = data.draw(st.permutations(fits))[: job["nodes"]]
        tasks = []
        for node_id in chosen:
            free = sorted(self.nodes[node_id]["free"])
            gpus = free[: job["gpus"]]
            self.nodes[node_id]["free"] -= set(gpus)
            tasks.append({"node": node_id, "gpus": gpus})
        job["attempt"] += 1
        job["state"], job["tasks"] = "scheduled", tasks
        self.job_event(job_id, "JobScheduled", attempt=job["attempt"], tasks=tasks)

    def _release(self, job_id: str) -> None:
        for task in self.jobs[job_id]["tasks"]:
            if task["node"] in self.nodes:
                self.nodes[task["node"]]["free"] |= set(task["gpus"])
        self.jobs[job_id]["tasks"] = []

    @precondition(lambda self: self._in("scheduled", "preparing", "running"))
    @rule(data=st.data(), outcome=OUTCOMES)
    def progress(self, data, outcome: str) -> None:
        self.begin()
        job_id = data.draw(st.sampled_from(self._in("scheduled", "preparing", "running")))
        job = self.jobs[job_id]
        attempt = job["attempt"]
        if outcome == "advance" and job["state"] != "running":
            step = {
                "scheduled": ("JobPreparing", "preparing"),
                "preparing": ("JobStarted", "running"),
            }
            type_, job["state"] = step[job["state"]]
            self.job_event(job_id, type_, attempt=attempt)
        elif outcome in ("succeed", "advance"):
            self.job_event(job_id, "JobTaskExited", attempt=attempt, task=0, exitCode=0)
            self.job_event(job_id, "JobSucceeded", attempt=attempt, exitCode=0)
            job["state"] = "succeeded"
            self._release(job_id)
        elif outcome == "fail":
            self.job_event(job_id, "JobFailed", attempt=attempt, exitCode=2,
                           error={"code": "task_failed", "message": "exit 2"})  # fmt: skip
            job["state"] = "failed"
            self._release(job_id)
        else:
            type_ = "JobRequeued" if outcome == "requeue" else "JobPreempted"
            extra = {"cause": "exit_code"} if outcome == "requeue" else {}
            self.job_event(job_id, type_, attempt=attempt, **extra)
            job["state"] = QUEUED
            self._release(job_id)

    @precondition(lambda self: any(s["ready"] for s in self.nodes.values()))
    @rule(data=st.data(), remove=st.booleans())
    def lose_node(self, data, remove: bool) -> None:
        self.begin()
        node_id = data.draw(st.sampled_from(sorted(n for n, s in self.nodes.items() if s["ready"])))
        self.emit(f"node-{node_id}", "NodeLost", {"nodeId": node_id, "reason": "heartbeat_timeout"})
        self.nodes[node_id]["ready"] = False
        for job_id in self._in("scheduled", "preparing", "running", "terminating"):
            job = self.jobs[job_id]
            if any(t["node"] == node_id for t in job["tasks"]):
                self.job_event(job_id, "JobRequeued", attempt=job["attempt"], cause="node_lost")
                job["state"] = QUEUED
                self._release(job_id)
        if remove:
            self.emit(f"node-{node_id}", "NodeRemoved", {"nodeId": node_id})
            del self.nodes[node_id]

    @precondition(lambda self: self._in(QUEUED, "scheduled", "preparing", "running"))
    @rule(data=st.data(), finish=st.booleans())
    def terminate(self, data, finish: bool) -> None:
        self.begin()
        job_id = data.draw(st.sampled_from(self._in(QUEUED, "scheduled", "preparing", "running")))
        self.emit(f"job-{job_id}", "JobTerminateRequested", {"jobId": job_id}, "user:bob")
        self.jobs[job_id]["state"] = "terminating"
        if finish:
            self.job_event(job_id, "JobTerminated", reason="terminated by user:bob")
            self.jobs[job_id]["state"] = "failed"
            self._release(job_id)

    @precondition(lambda self: self._in("succeeded", "failed"))
    @rule(data=st.data())
    def delete(self, data) -> None:
        self.begin()
        job_id = data.draw(st.sampled_from(self._in("succeeded", "failed")))
        self.job_event(job_id, "JobDeleted")
        del self.jobs[job_id]

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def live_equals_rebuilt_and_snapshot_plus_catch_up(self) -> None:
        live = snapshot.plain(self.live)
        assert live == snapshot.plain(fold.rebuild(self.log))
        restored = snapshot.decode(self.before_step)
        fold.apply_page(restored, self.log[self.step_start :])
        assert snapshot.plain(restored) == live

    @invariant()
    def queues_hold_exactly_the_queued_jobs_in_priority_then_submission_order(self) -> None:
        m = self.live
        for cluster_id in m.clusters:
            queued = [j for j in m.jobs.values() if j.state == QUEUED and j.cluster == cluster_id]
            queued.sort(key=lambda j: (-j.priority, j.submitted_position))
            assert [j.job_id for j in queue.ordered(m, cluster_id)] == [j.job_id for j in queued]

    @invariant()
    def no_gpu_is_held_by_two_live_attempts(self) -> None:
        m = self.live
        held: dict[tuple[str, int], tuple[str, int]] = {}
        for job in m.jobs.values():
            if job.state not in ATTEMPT_STATES:
                assert job.tasks == []
                continue
            for node_id, gpus in job.tasks:
                for gpu in gpus:
                    assert (node_id, gpu) not in held, f"GPU {gpu} of {node_id} held twice"
                    held[(node_id, gpu)] = (job.job_id, job.attempt)
        allocated = {
            (node_id, int(gpu)): (holder[0], holder[1])
            for node_id, node in m.nodes.items()
            for gpu, holder in node.allocations.items()
        }
        assert allocated == {k: v for k, v in held.items() if k[0] in m.nodes}


TestWorld = World.TestCase
TestWorld.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
