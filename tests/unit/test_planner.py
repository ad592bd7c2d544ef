"""Placement, in the style of Nomad's scheduler tests: seed the read models with factories,
run the planner, assert on the events it returns."""

from __future__ import annotations

import uuid

from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchd.events.envelope import RecordedEvent
from batchd.projections import clusters, fold, history, views
from batchd.projections.model import ReadModels
from batchd.scheduler import commands
from batchd.scheduler.planner import cut_short, overdue, plan

HOUR = 3600
NOW = 10_000 * 1_000_000


class World:
    """Read models built the real way: events folded by the projections."""

    def __init__(self) -> None:
        self.models = ReadModels()
        self.jobs = 0

    def apply(self, type_: str, at: int | None = None, **data) -> None:
        n = self.models.position + 1
        event = RecordedEvent(n, uuid.UUID(int=n), "s", n, type_, 1, n if at is None else at,
                              "test", None, None, data, b"")  # fmt: skip
        fold.apply(self.models, event)

    def cluster(self, name="c", nodes=2, gpus=4, preemption=False, resizing=False) -> World:
        self.apply("ClusterCreated", clusterId=name, workspace="ws", name=name,
                   spec={"vmSize": "x", "preemption": preemption})  # fmt: skip
        for i in range(nodes):
            node = f"{name}-n{i}"
            self.apply("NodeRegistered", nodeId=node, cluster=name, gpus=gpus)
            self.apply("NodeSetupSucceeded", nodeId=node)
        if resizing:
            self.apply("ClusterResizeStarted", clusterId=name)
        return self

    def mixed(self, gpus: int, runtimes: dict[str, list[str]]) -> World:
        """A cluster `c` whose ready nodes (id -> the runtimes it offers) differ in runtimes."""
        self.apply("ClusterCreated", clusterId="c", workspace="ws", name="c", spec={"vmSize": "x"})
        for node, offered in runtimes.items():
            self.apply("NodeRegistered", nodeId=node, cluster="c", gpus=gpus, runtimes=offered)
            self.apply("NodeSetupSucceeded", nodeId=node)
        return self

    def job(self, gpus=1, nodes=1, priority=0, cluster="c", wall=24 * HOUR, preemptible=False,
            name=None) -> str:  # fmt: skip
        self.jobs += 1
        job_id = name or f"j{self.jobs}"
        self.apply("JobSubmitted", jobId=job_id, workspace="ws", experiment="e", name=job_id,
                   cluster=cluster, owner="ann", priority=priority, nodeCount=nodes,
                   gpusPerNode=gpus, maxWallClockTime=wall, preemptible=preemptible)  # fmt: skip
        return job_id

    def run(self, job_id: str, tasks: list[tuple[str, list[int]]], at: int = 0) -> None:
        self.apply("JobScheduled", jobId=job_id, attempt=1,
                   tasks=[{"node": n, "gpus": g} for n, g in tasks])  # fmt: skip
        self.models.jobs[job_id].scheduled_at = at
        self.apply("JobStarted", jobId=job_id, attempt=1)

    def plan(self, now: int = NOW, apply: bool = True) -> list:
        decisions = plan(self.models, now)
        if apply:
            for _stream, event in decisions:
                self.apply(event.type, **event.data)
        return decisions


def placed(decisions) -> dict[str, list]:
    return {e.data["jobId"]: e.data["tasks"] for _s, e in decisions if e.type == "JobScheduled"}


def reasons(decisions) -> dict[str, dict]:
    return {e.data["jobId"]: e.data["reason"] for _s, e in decisions
            if e.type == "JobPendingReasonChanged"}  # fmt: skip


def test_higher_priority_first_then_first_come_first_served():
    w = World().cluster(nodes=1, gpus=4)
    first, urgent, second = w.job(gpus=2), w.job(gpus=2, priority=500), w.job(gpus=2)
    decisions = w.plan()
    assert set(placed(decisions)) == {urgent, first}
    assert reasons(decisions)[second] == {"code": "insufficient_gpus", "need": 2}


def test_best_fit_packs_gpus_onto_the_fullest_node():
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=3), [("c-n1", [0, 1, 2])])
    small = w.job(gpus=1)
    assert placed(w.plan()) == {small: [{"node": "c-n1", "gpus": [3]}]}


def test_a_gang_starts_on_distinct_nodes_all_at_once_or_not_at_all():
    w = World().cluster(nodes=3, gpus=4)
    w.run(w.job(gpus=2), [("c-n0", [0, 1])])
    gang = w.job(gpus=4, nodes=2)
    tasks = placed(w.plan())[gang]
    assert sorted(t["node"] for t in tasks) == ["c-n1", "c-n2"]
    big = w.job(gpus=4, nodes=2)
    decisions = w.plan()
    assert big not in placed(decisions)
    assert reasons(decisions)[big] == {"code": "gang_incomplete", "need_nodes": 2}


def test_fragmented_capacity_is_told_apart_from_missing_capacity():
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=2), [("c-n0", [0, 1])])
    w.run(w.job(gpus=2), [("c-n1", [0, 1])])
    four = w.job(gpus=4)
    assert reasons(w.plan())[four] == {"code": "fragmented", "need": 4}


def test_backfill_only_when_it_ends_before_the_reserved_job_could_start():
    w = World().cluster(nodes=1, gpus=4)
    w.run(w.job(gpus=3, wall=2 * HOUR), [("c-n0", [0, 1, 2])], at=NOW)  # frees at NOW + 2 h
    big = w.job(gpus=4, priority=500)
    long = w.job(gpus=1, wall=3 * HOUR)
    short = w.job(gpus=1, wall=1 * HOUR)
    decisions = w.plan()
    assert set(placed(decisions)) == {short}
    assert reasons(decisions)[big]["code"] == "insufficient_gpus"
    assert reasons(decisions)[long] == {"code": "behind_reservation"}


def test_the_reservation_counts_the_jobs_placed_earlier_in_the_same_cycle():
    w = World().cluster(nodes=1, gpus=4)
    first = w.job(gpus=2, wall=1 * HOUR)  # placed now: the node's 4 GPUs are free at NOW + 1 h
    big = w.job(gpus=4)
    short, long = w.job(gpus=2, wall=HOUR // 2), w.job(gpus=2, wall=2 * HOUR)
    decisions = w.plan()
    assert set(placed(decisions)) == {first, short}
    assert reasons(decisions) == {
        big: {"code": "insufficient_gpus", "need": 4}, long: {"code": "behind_reservation"},
    }  # fmt: skip


def test_a_job_whose_limit_ties_with_the_reservation_waits_behind_it():
    """Two jobs with the same (default) limit placed in one cycle: the reserved job behind the
    first may start once it ends, so the second, which would end just as late, does not pass
    the reserved one: it could run on for the whole limit after the first has gone."""
    w = World().cluster(nodes=1, gpus=4)
    first = w.job(gpus=2, priority=500, wall=7 * 24 * HOUR)
    gang = w.job(gpus=4, priority=100, wall=7 * 24 * HOUR)
    tied = w.job(gpus=2, priority=-1000, wall=7 * 24 * HOUR)
    decisions = w.plan()
    assert set(placed(decisions)) == {first}
    assert reasons(decisions)[tied] == {"code": "behind_reservation"}
    assert reasons(decisions)[gang]["code"] == "insufficient_gpus"


def test_a_job_too_big_for_the_cluster_does_not_block_the_others():
    w = World().cluster(nodes=1, gpus=4)
    huge = w.job(gpus=4, nodes=3, priority=1000)
    small = w.job(gpus=1, wall=30 * 24 * HOUR)
    decisions = w.plan()
    assert set(placed(decisions)) == {small}
    assert reasons(decisions)[huge]["code"] == "gang_incomplete"


def test_preemption_takes_only_preemptible_lower_priority_jobs_where_allowed():
    w = World().cluster(nodes=1, gpus=4, preemption=True)
    keep = w.job(gpus=2, priority=-500)  # not preemptible
    w.run(keep, [("c-n0", [0, 1])])
    victim = w.job(gpus=2, priority=-500, preemptible=True)
    w.run(victim, [("c-n0", [2, 3])])
    urgent = w.job(gpus=2, priority=500)
    decisions = w.plan()
    preempted = [e.data["jobId"] for _s, e in decisions if e.type == "JobPreempted"]
    assert preempted == [victim]
    assert reasons(decisions)[urgent] == {"code": "preempting", "victims": [victim]}
    assert w.models.jobs[victim].state == "queued" and w.models.jobs[keep].state == "running"
    shown = views.job(w.models, w.models.jobs[urgent])["pendingReason"]  # who, by name
    assert shown["victimNames"] == [f"ws/e/{victim}"]
    assert history.pending_reason(shown) == f"preempting{{victims=['ws/e/{victim}']}}"
    # the victim's task still runs (its SIGTERM grace): nothing else is preempted, nothing is
    # placed on its GPUs, and the victim waits for its own task too
    decisions = w.plan()
    assert placed(decisions) == {} and reasons(decisions) == {victim: {"code": "attempt_stopping"}}
    w.apply("JobTaskExited", jobId=victim, attempt=1, task=0, exitCode=143, node="c-n0")
    decisions = w.plan()
    assert placed(decisions) == {urgent: [{"node": "c-n0", "gpus": [2, 3]}]}


def test_a_requeued_gangs_next_attempt_waits_until_its_surviving_task_has_stopped():
    w = World().cluster(nodes=3, gpus=4)
    gang = w.job(gpus=4, nodes=2)
    w.run(gang, [("c-n0", [0, 1, 2, 3]), ("c-n1", [0, 1, 2, 3])])
    w.apply("NodeLost", nodeId="c-n1")
    w.apply("JobRequeued", jobId=gang, attempt=1, cause="node_lost")
    assert w.models.nodes["c-n0"].allocations  # its task on c-n0 is being killed
    assert not w.models.nodes["c-n1"].allocations  # the lost node's agent is gone
    small = w.job(gpus=1)
    decisions = w.plan()  # c-n2 is free, but the gang's own earlier attempt still runs
    assert placed(decisions) == {} and reasons(decisions) == {
        gang: {"code": "attempt_stopping"},
        small: {"code": "behind_reservation"},
    }
    w.apply("JobTaskExited", jobId=gang, attempt=1, task=0, exitCode=137, node="c-n0")
    assert not w.models.nodes["c-n0"].allocations and not w.models.jobs[gang].stopping
    assert [t["node"] for t in placed(w.plan())[gang]] == ["c-n0", "c-n2"]


def test_a_stopping_task_is_freed_when_its_node_is_lost_or_its_agent_restarts():
    for end in ("NodeLost", "NodeRegistered"):
        w = World().cluster(nodes=1, gpus=4, preemption=True)
        w.apply("NodeRegistered", nodeId="c-n0", cluster="c", gpus=4, incarnation=1)
        victim = w.job(gpus=4, priority=-500, preemptible=True)
        w.run(victim, [("c-n0", [0, 1, 2, 3])])
        urgent = w.job(gpus=4, priority=500)
        w.plan()
        assert w.models.jobs[victim].stopping == [[1, 0, "c-n0"]]
        if end == "NodeLost":
            w.apply("NodeLost", nodeId="c-n0")
            w.apply("NodeRecovered", nodeId="c-n0")
        else:  # a new agent: the old one's tasks were killed
            w.apply("NodeRegistered", nodeId="c-n0", cluster="c", gpus=4, incarnation=2)
        assert w.models.jobs[victim].stopping == [] and not w.models.nodes["c-n0"].allocations
        assert set(placed(w.plan())) == {urgent}


def test_no_preemption_where_the_cluster_does_not_allow_it_or_for_equal_priority():
    for preemption, priority in ((False, 500), (True, -500)):
        w = World().cluster(nodes=1, gpus=4, preemption=preemption)
        w.run(w.job(gpus=4, priority=-500, preemptible=True), [("c-n0", [0, 1, 2, 3])])
        w.job(gpus=4, priority=priority)
        assert not [e for _s, e in w.plan() if e.type == "JobPreempted"]


def test_no_preemption_when_earlier_placements_of_the_cycle_leave_it_useless():
    w = World().cluster(nodes=1, gpus=4, preemption=True)
    w.run(w.job(gpus=2, priority=-500, preemptible=True), [("c-n0", [0, 1])])
    urgent, big = w.job(gpus=2, priority=500), w.job(gpus=4)
    decisions = w.plan()
    assert set(placed(decisions)) == {urgent}  # on GPUs 2 and 3
    assert not [e for _s, e in decisions if e.type == "JobPreempted"]
    assert reasons(decisions)[big]["code"] == "insufficient_gpus"


def test_preemption_spares_victims_whose_gpus_would_not_help():
    w = World().cluster(nodes=2, gpus=4, preemption=True)
    useless = w.job(gpus=2, priority=-500, preemptible=True)
    w.run(useless, [("c-n0", [0, 1])])
    w.run(w.job(gpus=2, priority=-500), [("c-n0", [2, 3])])  # not preemptible
    needed = w.job(gpus=4, priority=-100, preemptible=True)
    w.run(needed, [("c-n1", [0, 1, 2, 3])])
    urgent = w.job(gpus=4, priority=500)
    decisions = w.plan()
    assert [e.data["jobId"] for _s, e in decisions if e.type == "JobPreempted"] == [needed]
    assert reasons(decisions)[urgent] == {"code": "preempting", "victims": [needed]}


def test_preemption_takes_the_fewest_victims_of_the_lowest_priority_and_the_newest():
    """Not the newest first at any cost: one job freeing a node beats two newer ones sharing
    another; victims of a lower priority beat fewer of a higher one; among equals, the
    newer victim goes."""
    w = World().cluster(nodes=5, gpus=4, preemption=True)
    w.run(w.job(gpus=4, priority=-500, preemptible=True, name="older"), [("c-n0", [0, 1, 2, 3])],
          at=1)  # fmt: skip
    for name, gpus in (("newer-a", [0, 1]), ("newer-b", [2, 3])):
        w.run(w.job(gpus=2, priority=-500, preemptible=True, name=name), [("c-n1", gpus)], at=2)
    w.run(w.job(gpus=4, priority=0, preemptible=True, name="normal"), [("c-n2", [0, 1, 2, 3])],
          at=3)  # fmt: skip
    w.run(w.job(gpus=4, priority=-500, name="kept"), [("c-n3", [0, 1, 2, 3])], at=4)
    w.run(w.job(gpus=4, priority=-500, preemptible=True, name="newest"), [("c-n4", [0, 1, 2, 3])],
          at=5)  # fmt: skip
    urgent = w.job(gpus=4, priority=500)
    decisions = w.plan()
    assert [e.data["jobId"] for _s, e in decisions if e.type == "JobPreempted"] == ["newest"]
    assert reasons(decisions)[urgent] == {"code": "preempting", "victims": ["newest"]}
    w.apply("JobTaskExited", jobId="newest", attempt=1, task=0, exitCode=143, node="c-n4")
    assert set(placed(w.plan())) == {urgent}
    # a gang of two: n0's one victim and n1's two of the lowest priority, not n2's one of a
    # higher priority (nor n1's two alone with n2)
    gang = w.job(gpus=4, nodes=2, priority=500)
    decisions = w.plan()
    preempted = [e.data["jobId"] for _s, e in decisions if e.type == "JobPreempted"]
    assert sorted(preempted) == ["newer-a", "newer-b", "older"], preempted
    assert reasons(decisions)[gang]["code"] == "preempting"
    assert w.models.jobs["normal"].state == "running"


def test_a_terminating_job_is_not_preempted():
    w = World().cluster(nodes=1, gpus=4, preemption=True)
    victim = w.job(gpus=4, priority=-500, preemptible=True)
    w.run(victim, [("c-n0", [0, 1, 2, 3])])
    w.apply("JobTerminateRequested", jobId=victim)
    w.job(gpus=4, priority=500)
    assert not [e for _s, e in w.plan() if e.type == "JobPreempted"]


def test_gpu_jobs_never_go_to_nodes_without_gpus_and_whole_node_jobs_only_there():
    w = World().cluster(nodes=1, gpus=0)
    w.apply("NodeRegistered", nodeId="c-gpu", cluster="c", gpus=2)
    w.apply("NodeSetupSucceeded", nodeId="c-gpu")
    one_gpu, whole, second_whole = w.job(gpus=1), w.job(gpus=0), w.job(gpus=0)
    decisions = w.plan()
    assert placed(decisions) == {one_gpu: [{"node": "c-gpu", "gpus": [0]}],
                                 whole: [{"node": "c-n0", "gpus": []}]}  # fmt: skip
    assert reasons(decisions)[second_whole] == {"code": "insufficient_nodes", "need_nodes": 1}


def test_a_job_needing_no_gpu_takes_a_whole_idle_gpu_node_and_none_of_its_gpus():
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=1, wall=HOUR), [("c-n1", [2])], at=NOW)  # c-n1 is not idle
    cpu = w.job(gpus=0, priority=1)
    second_cpu, gpu = w.job(gpus=0), w.job(gpus=1, wall=HOUR // 2)
    decisions = w.plan()
    # the idle node goes whole to the first; the second finds no idle node and reserves c-n1
    # (free in an hour); the GPU job fits beside the running one, and ends before that, but
    # never goes beside the whole-node task
    assert placed(decisions) == {cpu: [{"node": "c-n0", "gpus": []}],
                                 gpu: [{"node": "c-n1", "gpus": [0]}]}  # fmt: skip
    assert reasons(decisions)[second_cpu] == {"code": "insufficient_nodes", "need_nodes": 1}
    assert w.models.nodes["c-n0"].allocations == {"*": [cpu, 1, 0]}
    assert clusters.free_capacity(w.models, w.models.clusters["c"])["freeGpus"] == 2
    four = w.job(gpus=4, priority=2)
    assert reasons(w.plan())[four] == {"code": "insufficient_gpus", "need": 4}
    w.apply("JobSucceeded", jobId=cpu, attempt=1, exitCode=0)
    assert placed(w.plan())[four] == [{"node": "c-n0", "gpus": [0, 1, 2, 3]}]


def test_the_queued_jobs_of_a_cluster_being_deleted_fail_saying_so():
    w = World().cluster(nodes=1, gpus=4)
    running, job = w.job(gpus=1), w.job(gpus=1)
    w.run(running, [("c-n0", [0])])
    w.apply("ClusterDeleteRequested", clusterId="c")
    decisions = w.plan()
    assert placed(decisions) == {}
    [(_stream, failed)] = decisions  # the running job runs on while its node drains
    assert (failed.type, failed.data["jobId"]) == ("JobFailed", job)
    assert failed.data["error"]["code"] == "cluster_deleted"
    w.apply(failed.type, **failed.data)
    assert w.models.jobs[job].state == "failed" and w.plan() == []


def test_a_job_that_can_never_fit_is_told_so_even_behind_a_reservation():
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=4), [("c-n0", [0, 1, 2, 3])])
    w.run(w.job(gpus=2), [("c-n1", [0, 1])])
    head, never = w.job(gpus=4), w.job(gpus=4, nodes=3)
    decisions = w.plan()
    assert reasons(decisions)[head]["code"] == "insufficient_gpus"
    assert reasons(decisions)[never] == {"code": "gang_incomplete", "need_nodes": 3}


def test_pending_reasons_for_scaling_and_missing_clusters_recorded_only_when_they_change():
    w = World().cluster(nodes=0, resizing=True)
    job = w.job(gpus=1)
    assert reasons(w.plan())[job] == {"code": "cluster_scaling"}
    assert w.plan() == []  # the same reason again: nothing to record
    w.apply("ClusterDeleted", clusterId="c")
    [(_stream, failed)] = w.plan()
    assert failed.type == "JobFailed" and failed.data["error"]["code"] == "cluster_deleted"


def test_a_cluster_resizing_only_for_its_lost_nodes_is_not_said_to_be_scaling():
    """Three nodes for a target of two, two of them lost (their agents stopped): the cluster
    is resizing, but no node is coming; a gang that needs two waits for nodes not ready. A
    cluster short of its target is scaling, and so is one whose node is joining."""
    w = World()
    w.apply("ClusterCreated", clusterId="c", workspace="ws", name="c",
            spec={"vmSize": "x", "scaleSettings": {"manual": {"targetNodeCount": 2}}})  # fmt: skip
    for node in ("a", "b", "d"):
        w.apply("NodeRegistered", nodeId=node, cluster="c", gpus=4)
        w.apply("NodeSetupSucceeded", nodeId=node)
    for node in ("b", "d"):
        w.apply("NodeLost", nodeId=node)
    w.apply("ClusterResizeStarted", clusterId="c")
    gang = w.job(gpus=1, nodes=2)
    assert reasons(w.plan(now=NOW + 200 * 1_000_000)) == {gang: {"code": "nodes_not_ready"}}
    w.apply("NodeRemoved", nodeId="b")
    w.apply("NodeRemoved", nodeId="d")  # one staying node for a target of two
    assert reasons(w.plan(now=NOW + 200 * 1_000_000)) == {gang: {"code": "cluster_scaling"}}


def test_a_job_that_only_nodes_not_ready_could_hold_says_so():
    w = World().cluster(nodes=2, gpus=4)
    w.apply("NodeSetupFailed", nodeId="c-n0", exitCode=1)  # unusable
    gang, small = w.job(gpus=1, nodes=2), w.job(gpus=1)
    decisions = w.plan()
    assert reasons(decisions) == {gang: {"code": "nodes_not_ready"}}  # one ready node of two
    assert placed(decisions) == {small: [{"node": "c-n1", "gpus": [0]}]}
    big = w.job(gpus=4)  # the ready node could hold it, once free: it waits for GPUs
    assert reasons(w.plan())[big] == {"code": "insufficient_gpus", "need": 4}
    w.apply("NodeSetupFailed", nodeId="c-n1", exitCode=1)
    assert reasons(w.plan()) == {big: {"code": "nodes_not_ready"}}  # no node is ready


def test_a_job_waiting_for_nodes_coming_back_keeps_its_place_in_the_queue():
    """After a restart the nodes register one by one: a gang that needs them all must not
    be passed by a later job while the others come back (it would wait for that job's end);
    a node that stays away holds the queue for NODES_COMING at most."""
    w = World().cluster(nodes=2, gpus=4)
    first = w.job(gpus=1)
    w.run(first, [("c-n0", [0])])
    w.apply("NodeLost", nodeId="c-n1", at=NOW - 5_000_000)  # its agent is starting again
    gang, small = w.job(gpus=4, nodes=2), w.job(gpus=1)
    decisions = w.plan()
    assert placed(decisions) == {}
    assert reasons(decisions) == {gang: {"code": "nodes_not_ready"},
                                  small: {"code": "behind_reservation"}}  # fmt: skip
    w.models.jobs[gang].pending_reason_at = NOW  # (the harness records events at 0 s)
    assert placed(w.plan(now=NOW + 60 * 1_000_000)) == {}  # still coming
    later = w.plan(now=NOW + 10 * 60 * 1_000_000)  # c-n1 never came back
    assert placed(later) == {small: [{"node": "c-n0", "gpus": [1]}]}


def test_a_restart_tells_only_the_head_of_a_long_queue_that_its_nodes_are_coming_back():
    """While every node of a cluster re-registers (a daemon restart), the jobs behind the head
    of its queue keep `behind_reservation`: a restart logs a reason change or two for each
    cluster, not one for each queued job."""
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=4), [("c-n0", [0, 1, 2, 3])])
    w.run(w.job(gpus=4), [("c-n1", [0, 1, 2, 3])])
    head, *behind = (w.job(gpus=g, nodes=n) for g, n in [(4, 1), (1, 1), (2, 2), (4, 2)])
    w.plan()
    assert {j: w.models.jobs[j].pending_reason["code"] for j in behind} == dict.fromkeys(
        behind, "behind_reservation")  # fmt: skip
    for node in ("c-n0", "c-n1"):  # the daemon stops: its local agents go, and come back
        w.apply("NodeLost", nodeId=node, at=NOW - 1_000_000)
    assert reasons(w.plan()) == {head: {"code": "nodes_not_ready"}}
    w.apply("NodeRegistered", nodeId="c-n0", cluster="c", gpus=4, incarnation=2, at=NOW)
    w.apply("NodeSetupSucceeded", nodeId="c-n0", at=NOW)
    # one back: the head holds the reservation for GPUs now, no longer for nodes coming, so
    # the gangs, which one ready node can never hold, say that the other is not ready
    gangs = {j: {"code": "nodes_not_ready"} for j in behind[1:]}
    assert reasons(w.plan()) == {head: {"code": "insufficient_gpus", "need": 4}, **gangs}
    assert w.models.jobs[behind[0]].pending_reason["code"] == "behind_reservation"
    w.apply("NodeRegistered", nodeId="c-n1", cluster="c", gpus=4, incarnation=2, at=NOW)
    w.apply("NodeSetupSucceeded", nodeId="c-n1", at=NOW)
    assert reasons(w.plan()) == {j: {"code": "behind_reservation"} for j in behind[1:]}
    for node in ("c-n0", "c-n1"):  # a cluster whose nodes stay unusable: each job says why
        w.apply("NodeSetupFailed", nodeId=node, exitCode=1)
    assert reasons(w.plan()) == {j: {"code": "nodes_not_ready"} for j in [head, *behind]}


def test_a_node_that_keeps_coming_back_does_not_hide_why_a_gang_waits():
    """A node in a crash loop (registering, lost, registering again) is always on its way
    back; a gang that needs it, behind a head that waits for GPUs, says `nodes_not_ready`."""
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=4), [("c-n0", [0, 1, 2, 3])])
    w.apply("NodeLost", nodeId="c-n1", at=NOW - 10_000 * 1_000_000)
    head, gang = w.job(gpus=4), w.job(gpus=4, nodes=2)
    at = NOW
    for incarnation in range(2, 6):
        w.apply("NodeRegistered", nodeId="c-n1", cluster="c", gpus=4, incarnation=incarnation,
                at=at)  # fmt: skip
        at += 60 * 1_000_000
        w.plan(now=at)
        assert w.models.jobs[head].pending_reason == {"code": "insufficient_gpus", "need": 4}
        assert w.models.jobs[gang].pending_reason == {"code": "nodes_not_ready"}
        w.apply("NodeLost", nodeId="c-n1", at=at)
        at += 30 * 1_000_000


def test_a_node_that_keeps_coming_back_does_not_hold_the_queue_for_ever():
    w = World().cluster(nodes=2, gpus=4)
    w.apply("NodeLost", nodeId="c-n1", at=NOW)
    gang = w.job(gpus=4, nodes=2)
    w.run(w.job(gpus=1), [("c-n0", [0])])
    w.plan()
    w.models.jobs[gang].pending_reason_at = NOW
    w.apply("NodeRegistered", nodeId="c-n1", cluster="c", gpus=4, incarnation=2,
            at=NOW + 150 * 1_000_000)  # back, preparing: coming again  # fmt: skip
    small = w.job(gpus=1)
    assert set(placed(w.plan(now=NOW + 160 * 1_000_000))) == {small}  # the gang waited 160 s


def test_a_reason_is_not_recorded_again_when_only_the_free_capacity_changes():
    w = World().cluster(nodes=2, gpus=4)
    w.run(w.job(gpus=4), [("c-n0", [0, 1, 2, 3])])
    w.run(w.job(gpus=3), [("c-n1", [0, 1, 2])])
    waiting = [w.job(gpus=8), w.job(gpus=8)]  # larger than any node: never placed
    assert [r["code"] for r in reasons(w.plan()).values()] == ["insufficient_gpus"] * 2
    capacity = clusters.free_capacity(w.models, w.models.clusters["c"])
    assert capacity == {"readyNodes": 2, "freeGpus": 1, "maxFreeGpusOnNode": 1, "idleNodes": 0}
    w.apply("JobSucceeded", jobId=w.models.nodes["c-n1"].allocations["0"][0], attempt=1,
            exitCode=0)  # fmt: skip
    assert clusters.free_capacity(w.models, w.models.clusters["c"])["freeGpus"] == 4
    assert w.plan() == []  # the same reasons: nothing new to record for `waiting`
    assert all(w.models.jobs[j].pending_reason["code"] == "insufficient_gpus" for j in waiting)


def test_jobs_past_their_wall_clock_are_terminated_with_that_reason():
    w = World().cluster(nodes=1)
    late, fine = w.job(gpus=1, wall=60), w.job(gpus=1, wall=3600)
    w.run(late, [("c-n0", [0])])
    w.run(fine, [("c-n0", [1])])
    # placed two minutes ago, started (after preparing) ten seconds ago: the limit counts
    # from placement, as the GPUs are held from then
    w.models.jobs[late].scheduled_at = w.models.jobs[fine].scheduled_at = NOW - 120 * 1_000_000
    w.models.jobs[late].started_at = w.models.jobs[fine].started_at = NOW - 10 * 1_000_000
    decisions = overdue(w.models, NOW)
    assert [(e.type, e.data["jobId"]) for _s, e in decisions] == [("JobTerminateRequested", late)]
    assert "maxWallClockTime" in decisions[0][1].data["reason"]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    nodes=st.integers(1, 4),
    running=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(1, 48)), max_size=6
    ),
    queued=st.lists(
        st.tuples(
            st.sampled_from([1, 2, 4]),
            st.integers(1, 2),
            st.sampled_from([-500, 0, 500]),
            st.integers(1, 48),
        ),
        max_size=12,
    ),
)
def test_placements_never_overcommit_pass_over_a_job_that_fit_or_delay_the_reserved_one(
    nodes, running, queued
):
    w = World().cluster(nodes=nodes, gpus=4)
    free = {f"c-n{i}": list(range(4)) for i in range(nodes)}
    for node_index, gpus, hours in running:
        node = f"c-n{node_index % nodes}"
        if len(free[node]) >= gpus:
            take, free[node] = free[node][:gpus], free[node][gpus:]
            w.run(w.job(gpus=gpus, wall=hours * HOUR), [(node, take)], at=NOW)
    for gpus, count, priority, hours in queued:
        w.job(gpus=gpus, nodes=count, priority=priority, wall=hours * HOUR)
    order = [j.job_id for j in sorted(
        (j for j in w.models.jobs.values() if j.state == "queued"),
        key=lambda j: (-j.priority, j.submitted_position))]  # fmt: skip
    decisions = w.plan()
    got = placed(decisions)
    # no GPU twice, none beyond a node's four, gangs on distinct nodes
    held = [(t["node"], g) for tasks in got.values() for t in tasks for g in t["gpus"]]
    assert len(held) == len(set(held)) and all(g in free[n] for n, g in held)
    for tasks in got.values():
        assert len({t["node"] for t in tasks}) == len(tasks)
    # replay the queue: a job not placed either did not fit in what was left when its turn came,
    # or waits behind the reservation of an earlier blocked job
    left = {n: len(f) for n, f in free.items()}
    blocked = False
    for job_id in order:
        job = w.models.jobs[job_id]
        if job_id in got:
            for t in got[job_id]:
                left[t["node"]] -= len(t["gpus"])
            continue
        fits = sum(1 for n in left.values() if n >= job.gpus_per_node) >= job.node_count
        assert not fits or blocked, f"{job_id} fit and was passed over"
        blocked = True
    # backfill never delays the reserved job: the first one that did not start but could fit
    # the cluster starts no later than it would have without the jobs placed after it
    jobs = w.models.jobs
    reserved = next((j for j in order if j not in got and jobs[j].node_count <= nodes), None)
    if reserved is not None:
        ahead = order[: order.index(reserved)]
        before = {j: t for j, t in got.items() if j in ahead}
        assert _earliest_start(w, nodes, reserved, before) == _earliest_start(
            w, nodes, reserved, got
        ), f"backfill delayed {reserved}"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    nodes=st.integers(1, 4),
    running=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=6),
    queued=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 4]),
            st.integers(1, 2),
            st.sampled_from([-500, 500]),
            st.integers(1, 48),
            st.booleans(),
        ),
        max_size=14,
    ),
    limit=st.integers(1, 4),
)
def test_cycles_cut_short_end_where_unbounded_cycles_do(nodes, running, queued, limit):
    """Cycles that stop at a small bound, planned again at the same moment until one decides
    nothing, place the same jobs on the same GPUs, preempt the same, and leave the same
    reasons as unbounded cycles do; each stops between jobs, never within one."""
    worlds = [World().cluster(nodes=nodes, gpus=4, preemption=True) for _ in range(2)]
    for w in worlds:
        free = {f"c-n{i}": list(range(4)) for i in range(nodes)}
        for node_index, gpus in running:
            node = f"c-n{node_index % nodes}"
            if len(free[node]) >= gpus:
                take, free[node] = free[node][:gpus], free[node][gpus:]
                w.run(w.job(gpus=gpus, wall=HOUR, preemptible=True), [(node, take)], at=NOW)
        for gpus, count, priority, hours, preemptible in queued:
            w.job(gpus=gpus, nodes=count, priority=priority, wall=hours * HOUR,
                  preemptible=preemptible)  # fmt: skip

    def settle(w: World, bound: int) -> None:
        for _cycle in range(100):
            decisions = plan(w.models, NOW, limit=bound)
            if not decisions:
                return
            for _stream, event in decisions:
                w.apply(event.type, **event.data)
            if cut_short(decisions, bound):
                jobs = [e.data["jobId"] for _s, e in decisions if e.type != "JobPreempted"]
                assert len(set(jobs)) == len(jobs)  # one decision a job, but its preemptions
                assert len(jobs) - bound <= 1
        raise AssertionError("the cycles never settle")

    whole, cut = worlds
    settle(whole, 10_000)
    settle(cut, limit)

    def outcome(w: World) -> dict:
        return {j.job_id: (j.state, j.attempt, j.tasks, j.pending_reason, j.retries)
                for j in w.models.jobs.values()}  # fmt: skip

    assert outcome(cut) == outcome(whole)


def _earliest_start(w: World, nodes: int, job_id: str, placed_now: dict) -> float:
    """When `job_id` could start at the earliest if every running job (and each of
    `placed_now`, placed at NOW) held its GPUs until its wall clock ends."""
    jobs = w.models.jobs
    free = {f"c-n{i}": 4 for i in range(nodes)}
    ends = []
    holding = [(j.job_id, j.tasks, j.scheduled_at) for j in jobs.values() if j.state == "running"]
    for j, tasks in placed_now.items():
        holding.append((j, [(t["node"], t["gpus"]) for t in tasks], NOW))
    for held_by, tasks, since in holding:
        for node, gpus in tasks:
            free[node] -= len(gpus)
            ends.append((since + jobs[held_by].max_wall_clock_s * 1_000_000, node, len(gpus)))
    need, count = jobs[job_id].gpus_per_node, jobs[job_id].node_count
    for at, node, gpus in [(NOW, None, 0), *sorted(ends)]:
        if node is not None:
            free[node] += gpus
        if sum(1 for n in free.values() if n >= need) >= count:
            return at
    return float("inf")


def test_a_gang_beyond_lowered_scale_settings_says_the_cluster_is_too_small():
    w = World()
    w.apply("ClusterCreated", clusterId="c", workspace="ws", name="c",
            spec={"vmSize": "x", "scaleSettings": {"manual": {"targetNodeCount": 3}}})  # fmt: skip
    for i in range(2):
        w.apply("NodeRegistered", nodeId=f"c-n{i}", cluster="c", gpus=4)
        w.apply("NodeSetupSucceeded", nodeId=f"c-n{i}")
    gang, small = w.job(gpus=4, nodes=3), w.job(gpus=1)
    decisions = w.plan()
    assert reasons(decisions)[gang] == {"code": "gang_incomplete", "need_nodes": 3}  # may come
    assert small in placed(decisions)  # the gang that cannot start reserves nothing
    w.apply("ClusterScaleSettingsChanged", clusterId="c",
            scaleSettings={"manual": {"targetNodeCount": 2}})  # fmt: skip
    assert reasons(w.plan())[gang] == {"code": "cluster_too_small", "need_nodes": 3}
    auto = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 4}}
    w.apply("ClusterScaleSettingsChanged", clusterId="c", scaleSettings=auto)
    assert reasons(w.plan())[gang] == {"code": "gang_incomplete", "need_nodes": 3}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([0, 2, 2, 4]), min_size=1, max_size=3),
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("submit"),
                st.integers(0, 4),
                st.integers(1, 2),
                st.sampled_from([-500, 0, 500]),
            ),
            st.tuples(st.just("end"), st.integers(0, 30)),
            st.just(("plan",)),
        ),
        max_size=40,
    ),
)
@example(sizes=[2], steps=[("submit", 0, 1, 0), ("plan",), ("submit", 1, 1, 0), ("plan",)])
def test_whole_node_and_gpu_jobs_never_share_what_they_hold(sizes, steps):
    """Jobs needing no GPU (a whole idle node) and GPU jobs, on nodes with and without GPUs,
    submitted, placed and ended in any order: no GPU is held twice, a node held whole holds
    nothing else, and the nodes' allocations are exactly what the live attempts hold."""
    w = World()
    w.apply("ClusterCreated", clusterId="c", workspace="ws", name="c", spec={"vmSize": "x"})
    for i, gpus in enumerate(sizes):
        w.apply("NodeRegistered", nodeId=f"c-n{i}", cluster="c", gpus=gpus)
        w.apply("NodeSetupSucceeded", nodeId=f"c-n{i}")
    jobs = w.models.jobs
    for step in steps:
        if step[0] == "submit":
            w.job(gpus=step[1], nodes=step[2], priority=step[3])
        elif step[0] == "end":
            holding = sorted(j for j, job in jobs.items() if job.state == "scheduled")
            if holding:
                job = jobs[holding[step[1] % len(holding)]]
                w.apply("JobStarted", jobId=job.job_id, attempt=job.attempt)
                w.apply("JobSucceeded", jobId=job.job_id, attempt=job.attempt, exitCode=0)
        else:
            w.plan()
        held: dict[str, list[list[int]]] = {}
        for job in jobs.values():
            if job.state in ("scheduled", "running"):
                for node_id, gpus in job.tasks:
                    held.setdefault(node_id, []).append(list(gpus))
        for node_id, node in w.models.nodes.items():
            tasks = held.get(node_id, [])
            used = [g for gpus in tasks for g in gpus]
            assert len(used) == len(set(used)) and all(0 <= g < node.gpus for g in used)
            assert all(gpus or len(tasks) == 1 for gpus in tasks), (node_id, tasks)
            assert all(gpus for gpus in tasks) or not used  # nothing beside a whole node
            assert set(node.allocations) == ({str(g) for g in used} if used else
                                             {"*"} if tasks else set())  # fmt: skip


def test_a_cluster_resizes_until_its_nodes_are_what_its_target_asks():
    w = World().cluster(nodes=2, gpus=4)

    def changes() -> list[str]:
        decided = commands.resize_changes(w.models, "scheduler")
        for _stream, event in decided:
            w.apply(event.type, **event.data)
        return [event.type for _s, event in decided]

    def scale(target: int) -> None:
        w.apply("ClusterScaleSettingsChanged", clusterId="c",
                scaleSettings={"manual": {"targetNodeCount": target}})  # fmt: skip

    scale(2)
    assert changes() == [] and w.models.clusters["c"].allocation_state == "steady"
    scale(3)  # a node more is asked for
    assert changes() == ["ClusterResizeStarted"]
    gang = w.job(gpus=4, nodes=3)
    assert reasons(w.plan())[gang] == {"code": "cluster_scaling"}
    w.apply("NodeRegistered", nodeId="c-n2", cluster="c", gpus=4)
    assert changes() == ["ClusterResizeCompleted"]  # joined (its setup task runs): allocated
    w.apply("NodeSetupSucceeded", nodeId="c-n2")
    assert changes() == [] and w.models.clusters["c"].allocation_state == "steady"
    assert set(placed(w.plan())) == {gang}
    scale(1)  # two nodes drain: resizing until they have left
    w.apply("NodeDrainRequested", nodeId="c-n1")
    w.apply("NodeDrainRequested", nodeId="c-n2")
    assert changes() == ["ClusterResizeStarted"]
    w.apply("NodeRemoved", nodeId="c-n1")
    assert changes() == []
    w.apply("NodeRemoved", nodeId="c-n2")
    assert changes() == ["ClusterResizeCompleted"]


def test_a_cluster_that_scales_itself_resizes_toward_what_its_provider_wants():
    w = World().cluster(nodes=1, gpus=4)
    w.apply(
        "ClusterScaleSettingsChanged",
        clusterId="c",
        scaleSettings={
            "autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 4, "initialNodeCount": 0}
        },
    )

    def changes(wanted: dict[str, int] | None) -> list[str]:
        decided = commands.resize_changes(w.models, "scheduler", wanted)
        for _stream, event in decided:
            w.apply(event.type, **event.data)
        return [event.type for _s, event in decided]

    assert changes(None) == []  # nothing scales it: steady, whatever its nodes
    assert changes({"c": 1}) == []
    assert changes({"c": 2}) == ["ClusterResizeStarted"]  # a queued job wants a node more
    job = w.job(gpus=4, nodes=2)
    assert reasons(w.plan())[job] == {"code": "cluster_scaling"}
    w.apply("NodeRegistered", nodeId="c-n1", cluster="c", gpus=4)
    assert changes({"c": 2}) == ["ClusterResizeCompleted"]
    assert changes({"c": 3}) == ["ClusterResizeStarted"]
    assert changes(None) == ["ClusterResizeCompleted"]  # no provider scales it (any more)


def test_a_job_needing_more_nodes_than_the_cluster_keeps_is_told_so_while_they_drain():
    w = World().cluster(nodes=2, gpus=4)
    busy = w.job(gpus=4)
    w.run(busy, [("c-n0", [0, 1, 2, 3])])
    w.apply("ClusterScaleSettingsChanged", clusterId="c",
            scaleSettings={"manual": {"targetNodeCount": 0}})  # fmt: skip
    for node in ("c-n0", "c-n1"):
        w.apply("NodeDrainRequested", nodeId=node)
    waiting = w.job(gpus=1)
    assert reasons(w.plan())[waiting] == {"code": "cluster_too_small", "need_nodes": 1}


def test_a_task_that_has_exited_gives_its_gpus_back_when_its_attempt_is_retried():
    w = World().cluster(nodes=1, gpus=4)
    job, other = w.job(gpus=2), w.job(gpus=2)
    w.run(job, [("c-n0", [0, 1])])
    w.apply("JobTaskExited", jobId=job, attempt=1, task=0, exitCode=1, node="c-n0")
    w.apply("JobRequeued", jobId=job, attempt=1, cause="exit_code")  # its own failure
    assert not w.models.jobs[job].stopping and not w.models.nodes["c-n0"].allocations
    assert set(placed(w.plan())) == {job, other}


def test_a_failed_gangs_task_still_being_killed_keeps_its_gpus_until_it_stops():
    w = World().cluster(nodes=2, gpus=4)
    gang = w.job(gpus=4, nodes=2)
    w.run(gang, [("c-n0", [0, 1, 2, 3]), ("c-n1", [0, 1, 2, 3])])
    w.apply("JobTaskExited", jobId=gang, attempt=1, task=0, exitCode=5, node="c-n0")
    w.apply("JobFailed", jobId=gang, attempt=1, exitCode=5)  # task 1 is being killed
    big = w.job(gpus=4, nodes=2)
    assert placed(w.plan()) == {} and w.models.jobs[gang].stopping == [[1, 1, "c-n1"]]
    w.apply("JobTaskExited", jobId=gang, attempt=1, task=1, exitCode=143, node="c-n1")
    assert set(placed(w.plan())) == {big}


def test_preemption_counts_the_gpus_of_stopping_tasks_as_back():
    w = World().cluster(nodes=2, gpus=8, preemption=True)
    gone = w.job(gpus=4)
    w.run(gone, [("c-n0", [0, 1, 2, 3])])
    spare = {"B": ("c-n0", [4, 5, 6, 7]), "C": ("c-n1", [0, 1, 2, 3]), "D": ("c-n1", [4, 5, 6, 7])}
    for name, task in spare.items():
        w.run(w.job(gpus=4, preemptible=True, name=name), [task])
    w.apply("JobRequeued", jobId=gone, attempt=1, cause="node_lost")  # its task is stopping
    w.apply("JobTerminateRequested", jobId=gone)
    w.apply("JobTerminated", jobId=gone)
    urgent = w.job(gpus=8, priority=500)
    decisions = w.plan()  # B, with the stopping task's GPUs, makes room on c-n0: not C and D
    assert reasons(decisions)[urgent] == {"code": "preempting", "victims": ["B"]}


def test_a_placement_over_a_stopping_task_in_an_older_versions_log_forgets_that_task():
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=2)
    w.run(job, [("c-n0", [0, 1])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="node_lost")
    # an older version placed the next attempt at once, on the same GPUs
    w.apply("JobScheduled", jobId=job, attempt=2, tasks=[{"node": "c-n0", "gpus": [0, 1]}])
    assert w.models.jobs[job].stopping == []
    w.apply("JobPreempted", jobId=job, attempt=2)
    w.apply("JobTaskExited", jobId=job, attempt=2, task=0, exitCode=143)  # without its node
    assert w.models.jobs[job].stopping == [] and not w.models.nodes["c-n0"].allocations
    assert set(placed(w.plan())) == {job}


def test_a_container_job_goes_only_to_nodes_that_offer_docker_and_waits_for_them():
    w = World().mixed(2, {"c-dk": ["docker", "process"], "c-pr": ["process"]})
    busy = w.job(gpus=2)
    w.run(busy, [("c-dk", [0, 1])])
    container, plain = w.job(gpus=1), w.job(gpus=1)
    w.models.jobs[container].runtime = "docker"

    assert placed(w.plan()) == {plain: [{"node": "c-pr", "gpus": [0]}]}
    assert w.models.jobs[container].pending_reason == {"code": "insufficient_gpus", "need": 1}
    w.apply("JobSucceeded", jobId=busy, attempt=1, exitCode=0)
    assert placed(w.plan()) == {container: [{"node": "c-dk", "gpus": [0]}]}


def test_a_container_gang_needs_as_many_docker_nodes_as_tasks():
    w = World().mixed(4, {"c-a": ["docker"], "c-b": ["process"], "c-c": ["docker"]})
    gang, bigger = w.job(gpus=4, nodes=2), w.job(gpus=4, nodes=3)
    for job in (gang, bigger):
        w.models.jobs[job].runtime = "docker"

    decided = w.plan()
    assert placed(decided) == {gang: [{"node": "c-a", "gpus": [0, 1, 2, 3]},
                                      {"node": "c-c", "gpus": [0, 1, 2, 3]}]}  # fmt: skip
    assert w.models.jobs[bigger].pending_reason == {"code": "gang_incomplete", "need_nodes": 3}


def test_nothing_passes_a_blocked_job_on_nodes_it_could_use_while_a_container_job_reserves():
    w = World().mixed(8, {"c-dk": ["docker", "process"], "c-pr": ["process"]})
    w.run(w.job(gpus=8), [("c-dk", list(range(8)))])
    w.run(w.job(gpus=4), [("c-pr", [0, 1, 2, 3])])
    container = w.job(gpus=8, priority=10)
    w.models.jobs[container].runtime = "docker"
    blocked, small = w.job(gpus=8, priority=5), w.job(gpus=4, priority=0)

    assert placed(w.plan()) == {}  # the small job would delay the blocked one on c-pr
    for job in (blocked, small):
        assert w.models.jobs[job].pending_reason == {"code": "behind_reservation"}


def test_a_job_larger_than_every_node_is_short_of_gpus_not_fragmented():
    w = World().cluster(nodes=2, gpus=1)  # two GPUs free in all, one a node
    job = w.job(gpus=2)
    assert reasons(w.plan())[job] == {"code": "insufficient_gpus", "need": 2}
