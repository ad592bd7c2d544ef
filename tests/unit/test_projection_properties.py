"""Property tests of the read models over random valid histories (hypothesis).

A state machine plays a small cluster world and logs what happens as events: workspaces,
clusters that resize, change scale settings and are deleted; nodes that register, fail setup,
are suspected and recover, drain, get lost and removed; jobs of several shapes and priorities
that queue, are placed on free GPUs, prepare, run, succeed, fail, are requeued or preempted,
terminated and deleted (some fail before any task was sent to a node); and late reports about
attempts that were already requeued (which the read models must ignore). Every history starts
with a cluster of two ready nodes. Hypothesis favours rules with fewer arguments, so the
rules of a job's life draw their parameters from `data`, and the clusters' changes share one
rule: without that, most steps went to resizing clusters and few jobs ever ran. The machine
keeps its own account of every job and node as the oracle. After every event it checks that

- the live read models (applied event by event) equal the read models rebuilt from scratch,
  and equal a snapshot taken just before the event plus catch-up over it (so snapshot plus
  catch-up is checked from every prefix of the log);
- every job's state and attempt, and every node's state, are what the oracle says;

and after every step that

- each cluster's queue is exactly its queued jobs, in (priority desc, submission asc) order;
- no GPU is held by two live attempts, and the nodes' allocations are exactly the GPUs the
  live attempts hold, and those of requeued or preempted attempts' tasks not yet seen to stop
  (their late exit, or their node lost or removed, frees them); node counts by state add up to
  the cluster's nodes.
"""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from batchd.events.envelope import RecordedEvent
from batchd.projections import clusters, fold, queue, snapshot
from batchd.projections.model import ATTEMPT_STATES, QUEUED, ReadModels

GPUS = 4
SCALE = {"manual": {"targetNodeCount": 2}}
OUTCOMES = st.sampled_from(["advance", "requeue", "fail_unsent", "preempt", "succeed", "fail"])
PRIORITIES = st.sampled_from([-500, 0, 0, 500, 1000])
LATE_REPORTS = st.sampled_from(["JobStarted", "JobSucceeded", "JobFailed", "JobRequeued"])
NODE_COUNTS = st.sampled_from([1, 1, 2])
RUNNING_STATES = ("scheduled", "preparing", "running")


class World(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[RecordedEvent] = []
        self.versions: dict[str, int] = {}
        self.live = ReadModels()
        self.ids = 0  # ids are counted, not random: hypothesis must be able to replay a run
        # the oracle: what the read models must say
        self.clusters: list[str] = []
        self.nodes: dict[str, dict] = {}  # id -> {"cluster", "state", "free": set}
        self.jobs: dict[str, dict] = {}  # id -> {"cluster", "state", "attempt", "tasks", ...}
        # tasks of requeued or preempted attempts still holding GPUs: (job, attempt, task) ->
        # (node, GPUs)
        self.stopping: dict[tuple[str, int, int], tuple[str, list[int]]] = {}
        self.names = 0

    def new_id(self) -> uuid.UUID:
        self.ids += 1
        return uuid.UUID(int=self.ids)

    # -- logging: every event is checked as it is applied ----------------------------------
    def emit(self, stream: str, type_: str, data: dict, actor: str = "scheduler") -> None:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        position = len(self.log) + 1
        event = RecordedEvent(
            position, self.new_id(), stream, version, type_, 1, 1_000_000 * position, actor,
            None, None, data, b"",
        )  # fmt: skip
        before = snapshot.encode(self.live)
        self.log.append(event)
        fold.apply(self.live, event)
        live = snapshot.plain(self.live)
        assert live == snapshot.plain(fold.rebuild(self.log)), f"rebuild differs at {position}"
        restored = snapshot.decode(before)
        fold.apply(restored, event)
        assert snapshot.plain(restored) == live, f"snapshot + catch-up differs at {position}"

    def job_event(self, job_id: str, type_: str, **data) -> None:
        self.emit(f"job-{job_id}", type_, {"jobId": job_id, **data})

    def node_event(self, node_id: str, type_: str, state: str, **data) -> None:
        self.emit(f"node-{node_id}", type_, {"nodeId": node_id, **data})
        self.nodes[node_id]["state"] = state

    # -- clusters --------------------------------------------------------------------------
    @initialize()
    def a_cluster_with_two_ready_nodes(self) -> None:
        """Every history starts with some capacity, so that its steps go to the jobs' lives
        (without it, few histories got as far as a job running)."""
        self.create_cluster()
        for _ in range(2):
            self._add_node(self.clusters[0], setup_fails=False)

    @rule(data=st.data(), change=st.sampled_from(["resize", "create", "delete"]))
    def change_clusters(self, data, change: str) -> None:
        """The clusters' own changes share one rule, so that they take no more of a history's
        steps than a job's (hypothesis picks among the rules that may run)."""
        empty = [c for c in self.clusters if self._empty(c)]
        if not self.clusters or (change == "create" and len(self.clusters) < 2):
            self.create_cluster()
        elif change == "delete" and empty:
            self.delete_cluster(data.draw(st.sampled_from(empty)))
        else:
            self.resize(data.draw(st.sampled_from(self.clusters)), data.draw(st.integers(0, 4)))

    def create_cluster(self) -> None:
        if not self.clusters:
            self.emit("workspace-ws", "WorkspaceCreated", {"workspace": "ws"}, "user:ops")
        cluster_id = str(self.new_id())
        self.clusters.append(cluster_id)
        name = f"c{len(self.clusters)}"
        self.emit(f"cluster-ws/{name}", "ClusterCreated", {
            "clusterId": cluster_id, "workspace": "ws", "name": name,
            "spec": {"vmSize": "Standard_NC24s_v3", "scaleSettings": SCALE},
        }, "user:ops")  # fmt: skip

    def resize(self, cluster: str, size: int) -> None:
        stream = f"cluster-{cluster}"
        scale = {"manual": {"targetNodeCount": size}}
        self.emit(
            stream, "ClusterScaleSettingsChanged", {"clusterId": cluster, "scaleSettings": scale}
        )
        self.emit(stream, "ClusterResizeStarted", {"clusterId": cluster})
        self.emit(stream, "ClusterResizeCompleted", {"clusterId": cluster})

    def delete_cluster(self, cluster: str) -> None:
        self.emit(f"cluster-{cluster}", "ClusterDeleteRequested", {"clusterId": cluster})
        self.emit(f"cluster-{cluster}", "ClusterDeleted", {"clusterId": cluster})
        self.clusters.remove(cluster)

    def _empty(self, cluster: str) -> bool:
        return not any(n["cluster"] == cluster for n in self.nodes.values())

    # -- nodes -----------------------------------------------------------------------------
    @precondition(lambda self: self.clusters and len(self.nodes) < 5)
    @rule(data=st.data(), setup_fails=st.booleans())
    def add_node(self, data, setup_fails: bool) -> None:
        self._add_node(data.draw(st.sampled_from(self.clusters)), setup_fails)

    def _add_node(self, cluster: str, setup_fails: bool) -> None:
        node_id = f"n{self.new_id().int}"
        self.nodes[node_id] = {"cluster": cluster, "state": "", "free": set(range(GPUS))}
        self.node_event(node_id, "NodeProvisioning", "provisioning", cluster=cluster)
        resources = {"gpus": GPUS, "cpus": 24, "memoryMb": 1000, "runtimes": ["process"]}
        self.node_event(node_id, "NodeRegistered", "preparing", cluster=cluster, **resources)
        self.node_event(node_id, "NodeSetupStarted", "preparing")
        if setup_fails:
            self.node_event(node_id, "NodeSetupFailed", "unusable", error={"code": "setup"})
        else:
            self.node_event(node_id, "NodeSetupSucceeded", "ready")

    def _nodes_in(self, *states: str) -> list[str]:
        return sorted(n for n, s in self.nodes.items() if s["state"] in states)

    @precondition(lambda self: self._nodes_in("ready"))
    @rule(data=st.data(), recovers=st.booleans())
    def suspect_node(self, data, recovers: bool) -> None:
        node_id = data.draw(st.sampled_from(self._nodes_in("ready")))
        self.node_event(node_id, "NodeSuspected", "suspect")
        if recovers:
            self.node_event(node_id, "NodeRecovered", "ready")
        else:  # it comes back after all, with a reconnect: registering again keeps its state
            cluster = self.nodes[node_id]["cluster"]
            self.node_event(node_id, "NodeRegistered", "suspect", cluster=cluster, incarnation=2)

    @precondition(lambda self: self._nodes_in("ready", "suspect"))
    @rule(data=st.data(), how=st.sampled_from(["lost", "drained", "evicted"]), remove=st.booleans())
    def lose_node(self, data, how: str, remove: bool) -> None:
        node_id = data.draw(st.sampled_from(self._nodes_in("ready", "suspect")))
        if how == "lost":
            self.node_event(node_id, "NodeLost", "lost", reason="heartbeat_timeout")
            self._forget_stopping(node_id)  # its agent is gone, and its tasks with it
        else:
            type_ = "NodeDrainRequested" if how == "drained" else "NodePreempted"
            self.node_event(node_id, type_, "leaving")
        cause = {"lost": "node_lost", "drained": "node_lost", "evicted": "evicted"}[how]
        for job_id in self._jobs_in(*RUNNING_STATES, "terminating"):
            job = self.jobs[job_id]
            if not any(t["node"] == node_id for t in job["tasks"]):
                continue
            if job["state"] == "terminating":  # it was ending anyway: it ends
                self.job_event(job_id, "JobTerminated", reason="node lost while terminating")
                job["state"] = "failed"
                self._retire(job_id)
            else:
                self.job_event(job_id, "JobRequeued", attempt=job["attempt"], cause=cause)
                job["state"] = QUEUED
                self._retire(job_id)
        if remove:
            self.emit(f"node-{node_id}", "NodeRemoved", {"nodeId": node_id})
            self._forget_stopping(node_id)
            del self.nodes[node_id]

    def _forget_stopping(self, node_id: str) -> None:
        for key in [k for k, (n, _gpus) in self.stopping.items() if n == node_id]:
            self.nodes[node_id]["free"] |= set(self.stopping.pop(key)[1])

    @precondition(lambda self: self.stopping)
    @rule(data=st.data())
    def a_stopping_task_exits(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.stopping)))
        node_id, gpus = self.stopping.pop(key)
        self.job_event(key[0], "JobTaskExited", attempt=key[1], task=key[2], exitCode=143,
                       node=node_id)  # fmt: skip
        if node_id in self.nodes:
            self.nodes[node_id]["free"] |= set(gpus)

    # -- jobs ------------------------------------------------------------------------------
    @precondition(lambda self: self.clusters)
    @rule(data=st.data())
    def submit(self, data) -> None:
        cluster = data.draw(st.sampled_from(self.clusters))
        priority = data.draw(PRIORITIES)
        gpus, node_count = data.draw(st.sampled_from([1, 2, 4])), data.draw(NODE_COUNTS)
        job_id = str(self.new_id())
        self.names += 1
        self.jobs[job_id] = {"cluster": cluster, "state": QUEUED, "attempt": 0, "tasks": [],
                             "gpus": gpus, "nodes": node_count, "priority": priority,
                             "submitted": len(self.log) + 1}  # fmt: skip
        self.emit(f"job-{job_id}", "JobSubmitted", {
            "jobId": job_id, "workspace": "ws", "experiment": "exp",
            "name": f"job-{self.names % 4}", "cluster": cluster, "owner": "alice",
            "priority": priority, "nodeCount": node_count, "gpusPerNode": gpus, "spec": {},
        }, "user:alice")  # fmt: skip
        if data.draw(st.booleans()):
            reason = {"code": "insufficient_gpus", "need": gpus}
            self.job_event(job_id, "JobPendingReasonChanged", reason=reason)

    def _jobs_in(self, *states: str) -> list[str]:
        return sorted(j for j, s in self.jobs.items() if s["state"] in states)

    def _fits(self, job_id: str) -> list[str]:
        """The ready nodes where the queued job's task fits (none while an earlier attempt of
        it is still stopping: two attempts never run at once)."""
        if any(k[0] == job_id for k in self.stopping):
            return []
        job = self.jobs[job_id]
        return [n for n in self._nodes_in("ready")
                if self.nodes[n]["cluster"] == job["cluster"]
                and len(self.nodes[n]["free"]) >= job["gpus"]]  # fmt: skip

    def _placeable(self) -> list[str]:
        return [j for j in self._jobs_in(QUEUED) if len(self._fits(j)) >= self.jobs[j]["nodes"]]

    @precondition(lambda self: self._placeable())
    @rule(data=st.data())
    def schedule(self, data) -> None:
        job_id = data.draw(st.sampled_from(self._placeable()))
        job, fits = self.jobs[job_id], self._fits(job_id)
        chosen = data.draw(st.permutations(fits))[: job["nodes"]]
        tasks = []
        for node_id in chosen:
            gpus = sorted(self.nodes[node_id]["free"])[: job["gpus"]]
            self.nodes[node_id]["free"] -= set(gpus)
            tasks.append({"node": node_id, "gpus": gpus})
        job["attempt"] += 1
        job["state"], job["tasks"] = "scheduled", tasks
        self.job_event(job_id, "JobScheduled", attempt=job["attempt"], tasks=tasks)

    def _retire(self, job_id: str) -> None:
        """An attempt that failed, was terminated, requeued or preempted: its tasks hold their
        GPUs until they are seen to stop, but on a lost node, whose agent is gone."""
        job = self.jobs[job_id]
        for index, task in enumerate(job["tasks"]):
            node = self.nodes.get(task["node"])
            if node is not None and node["state"] != "lost":
                self.stopping[job_id, job["attempt"], index] = (task["node"], task["gpus"])
            elif node is not None:
                node["free"] |= set(task["gpus"])
        job["tasks"] = []

    def _release(self, job_id: str) -> None:
        for task in self.jobs[job_id]["tasks"]:
            if task["node"] in self.nodes:
                self.nodes[task["node"]]["free"] |= set(task["gpus"])
        self.jobs[job_id]["tasks"] = []

    @precondition(lambda self: self._jobs_in(*RUNNING_STATES))
    @rule(data=st.data())
    def progress(self, data) -> None:
        job_id = data.draw(st.sampled_from(self._jobs_in(*RUNNING_STATES)))
        outcome = data.draw(OUTCOMES)
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
        elif outcome == "fail_unsent" and job["state"] == "scheduled":
            # failed before any task was sent to a node (the daemon could not start it)
            self.job_event(job_id, "JobFailed", attempt=attempt, undispatched=True,
                           error={"code": "runtime_missing", "message": "no docker"})  # fmt: skip
            job["state"] = "failed"
            self._release(job_id)
        elif outcome in ("fail", "fail_unsent"):
            self.job_event(job_id, "JobFailed", attempt=attempt, exitCode=2,
                           error={"code": "task_failed", "message": "exit 2"})  # fmt: skip
            job["state"] = "failed"
            self._retire(job_id)
        else:
            type_ = "JobRequeued" if outcome == "requeue" else "JobPreempted"
            extra = {"cause": "exit_code"} if outcome == "requeue" else {}
            self.job_event(job_id, type_, attempt=attempt, **extra)
            job["state"] = QUEUED
            self._retire(job_id)

    def _stale(self) -> list[tuple[str, int]]:
        """(job, an attempt of it that was requeued): the current one of a job queued again,
        or the one before the current."""
        return sorted(
            (j, s["attempt"] if s["state"] == QUEUED else s["attempt"] - 1)
            for j, s in self.jobs.items()
            if (s["attempt"] and s["state"] == QUEUED) or s["attempt"] > 1
        )

    @precondition(lambda self: self._stale())
    @rule(data=st.data())
    def late_report_of_an_old_attempt(self, data) -> None:
        job_id, attempt = data.draw(st.sampled_from(self._stale()))
        type_ = data.draw(LATE_REPORTS)
        extra = {"cause": "node_lost"} if type_ == "JobRequeued" else {"exitCode": 1}
        self.job_event(job_id, type_, attempt=attempt, **extra)  # the oracle: nothing changes

    @precondition(lambda self: self._jobs_in(QUEUED, *RUNNING_STATES))
    @rule(data=st.data())
    def terminate(self, data) -> None:
        job_id = data.draw(st.sampled_from(self._jobs_in(QUEUED, *RUNNING_STATES)))
        finish, deleting = data.draw(st.booleans()), data.draw(st.booleans())
        if deleting:  # (a delete of a live job: deleted once it has ended, by the daemon)
            self.emit(f"job-{job_id}", "JobDeleteRequested",
                      {"jobId": job_id, "reason": "deleted by user:bob"}, "user:bob")  # fmt: skip
            self.jobs[job_id]["deleting"] = True
        self.emit(f"job-{job_id}", "JobTerminateRequested", {"jobId": job_id}, "user:bob")
        self.jobs[job_id]["state"] = "terminating"
        if finish:
            self.job_event(job_id, "JobTerminated", reason="terminated by user:bob")
            self.jobs[job_id]["state"] = "failed"
            self._retire(job_id)

    @precondition(lambda self: self._jobs_in("succeeded", "failed"))
    @rule(data=st.data())
    def delete(self, data) -> None:
        job_id = data.draw(st.sampled_from(self._jobs_in("succeeded", "failed")))
        self.job_event(job_id, "JobDeleted")
        del self.jobs[job_id]

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def jobs_and_nodes_are_as_the_oracle_says(self) -> None:
        m = self.live
        assert {j: (s["state"], s["attempt"]) for j, s in self.jobs.items()} == {
            j: (job.state, job.attempt) for j, job in m.jobs.items()
        }
        assert {n: s["state"] for n, s in self.nodes.items()} == {
            n: node.state for n, node in m.nodes.items()
        }
        assert {j for j, s in self.jobs.items() if s.get("deleting")} == {
            j for j, job in m.jobs.items() if job.delete_requested_by == "user:bob"
        }

    @invariant()
    def queues_hold_exactly_the_queued_jobs_in_priority_then_submission_order(self) -> None:
        m = self.live  # (the order the oracle knows: priority and submission as emitted)
        for cluster_id in {j["cluster"] for j in self.jobs.values()} | set(m.clusters):
            queued = [j for j, s in self.jobs.items()
                      if s["state"] == QUEUED and s["cluster"] == cluster_id]  # fmt: skip
            queued.sort(key=lambda j: (-self.jobs[j]["priority"], self.jobs[j]["submitted"]))
            assert [j.job_id for j in queue.ordered(m, cluster_id)] == queued

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
        for (job_id, attempt, _task), (node_id, gpus) in self.stopping.items():
            for gpu in gpus:  # an old attempt's task, still stopping
                assert (node_id, gpu) not in held, f"GPU {gpu} of {node_id} held twice"
                held[(node_id, gpu)] = (job_id, attempt)
        allocated = {
            (node_id, int(gpu)): (holder[0], holder[1])
            for node_id, node in m.nodes.items()
            for gpu, holder in node.allocations.items()
        }
        assert allocated == {k: v for k, v in held.items() if k[0] in m.nodes}
        stopping = {(j, a, t): n for (j, a, t), (n, _g) in self.stopping.items() if j in m.jobs}
        assert stopping == {(j.job_id, a, t): n for j in m.jobs.values()
                            for a, t, n in j.stopping}  # fmt: skip

    @invariant()
    def node_counts_add_up(self) -> None:
        m = self.live
        for cluster in m.clusters.values():
            counts = clusters.node_counts(m, cluster)
            assert sum(counts.values()) == len(cluster.nodes)
            busy = sum(
                1 for n in cluster.nodes if m.nodes[n].allocations and m.nodes[n].state == "ready"
            )
            assert counts["running"] == busy


TestWorld = World.TestCase
TestWorld.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
