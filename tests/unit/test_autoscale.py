"""Local clusters: how many nodes an autoScale one wants, and its nodes lost together."""

from __future__ import annotations

import os

from batchd.scheduler import providers
from batchd.scheduler.providers import autoscale_target, lose_nodes, staying_nodes
from tests.unit.test_deallocation import local_world
from tests.unit.test_planner import World, reasons

PROCESS = ("process",)  # the runtimes the local nodes offer


def _auto(w: World, low: int, high: int):
    cluster = w.models.clusters["c"]
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": low, "maximumNodeCount": high,
                                            "initialNodeCount": low}}  # fmt: skip
    return cluster


def test_an_idle_cluster_shrinks_to_its_minimum():
    w = World().cluster(nodes=3)
    assert autoscale_target(w.models, _auto(w, 0, 5), 4, PROCESS) == 0
    assert autoscale_target(w.models, _auto(w, 2, 5), 4, PROCESS) == 2


def test_queued_gpus_are_packed_onto_whole_nodes_beside_the_busy_ones():
    w = World().cluster(nodes=1)
    w.run(w.job(gpus=1), [("c-n0", [0])])
    for _ in range(7):  # 7 GPUs: 3 beside the running job, 4 on a node of their own
        w.job(gpus=1)
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 1 + 1
    w.job(gpus=1)  # and one more node for the eighth
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 1 + 2


def test_a_job_that_fits_beside_running_work_starts_no_node():
    w = World().cluster(nodes=1)
    w.run(w.job(gpus=1), [("c-n0", [0])])
    w.job(gpus=2)  # fits in the busy node's 3 free GPUs: placed there, no node started
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 1
    w.job(gpus=2)  # one GPU is left there now: this one needs a node of its own
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 2


def test_a_gang_or_a_job_without_gpus_takes_whole_nodes_within_the_maximum():
    w = World().cluster(nodes=0)
    w.job(gpus=2, nodes=3)  # 6 GPUs, but on 3 nodes
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 3
    w.job(gpus=0)
    assert autoscale_target(w.models, _auto(w, 0, 10), 4, PROCESS) == 3  # 1 whole + 2 of GPUs, or 3
    assert autoscale_target(w.models, _auto(w, 0, 3), 4, PROCESS) == 3  # at most 3
    assert autoscale_target(w.models, _auto(w, 0, 2), 4, PROCESS) == 1  # the gang never fits


def test_a_gang_wider_than_the_maximum_keeps_no_idle_node():
    """A gang of 3 queued while the maximum was 3, which is lowered to 2: it waits with
    cluster_too_small, and no node is started or kept for it; the idle ones go at once."""
    w = local_world("local-0", "local-1")
    gang = w.job(gpus=4, nodes=3, cluster="local")
    cluster = w.models.clusters["local"]
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 3}}
    assert autoscale_target(w.models, cluster, 4, PROCESS) == 3
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 2}}
    assert reasons(w.plan())[gang] == {"code": "cluster_too_small", "need_nodes": 3}
    target = autoscale_target(w.models, cluster, 4, PROCESS)
    assert target == 0 and staying_nodes(w.models, cluster, target, ()) == []
    w.job(gpus=4, nodes=2, cluster="local")  # one that fits still counts, behind it
    assert autoscale_target(w.models, cluster, 4, PROCESS) == 2
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": 1, "maximumNodeCount": 2}}
    w.apply("JobTerminateRequested", jobId="j2", reason="terminated by ann")
    w.apply("JobTerminated", jobId="j2", reason="terminated by ann")
    assert autoscale_target(w.models, cluster, 4, PROCESS) == 1  # the minimum, no more


def test_a_job_no_node_can_ever_hold_starts_no_node():
    w = World().cluster(nodes=0)
    w.job(gpus=4)  # queued when the nodes had 4 GPUs; they have 2 now
    assert autoscale_target(w.models, _auto(w, 0, 3), 2, PROCESS) == 0


def test_a_job_needing_a_runtime_the_nodes_lack_starts_no_node():
    w = World().cluster(nodes=0)
    w.apply("JobSubmitted", jobId="c1", workspace="ws", experiment="e", name="c1", cluster="c",
            owner="ann", priority=0, nodeCount=1, gpusPerNode=1, maxWallClockTime=3600,
            runtime="docker")  # fmt: skip
    assert autoscale_target(w.models, _auto(w, 0, 3), 4, PROCESS) == 0
    assert autoscale_target(w.models, _auto(w, 0, 3), 4, ("docker", "process")) == 1


def test_shrinking_removes_only_idle_nodes_whatever_their_numbers():
    w = local_world("local-0", "local-1", "local-2")
    w.run(w.job(gpus=4, cluster="local"), [("local-1", [0, 1, 2, 3])])
    cluster = w.models.clusters["local"]
    for low, staying in ((0, ["local-1"]), (2, ["local-0", "local-1"])):
        cluster.scale_settings = {"autoScale": {"minimumNodeCount": low, "maximumNodeCount": 3}}
        target = autoscale_target(w.models, cluster, 4, PROCESS)
        assert staying_nodes(w.models, cluster, target, ()) == staying


def test_a_multi_node_attempt_on_nodes_lost_together_is_requeued_once():
    w = World().cluster(nodes=2)
    gang = w.job(gpus=1, nodes=2)
    w.run(gang, [("c-n0", [0]), ("c-n1", [0])])
    error = {"code": "daemon_stopped", "message": "the daemon stopped"}
    decided = lose_nodes(w.models, ["c-n0", "c-n1"], error, "interrupted")
    assert [e.type for _s, e in decided] == ["NodeLost", "JobRequeued", "NodeLost"]


def test_local_agents_are_not_given_the_daemons_secret_keys(monkeypatch):
    monkeypatch.setenv("BATCHD_SECRET_KEYS", "k1:" + "A" * 44)
    monkeypatch.setenv("BATCHD_SOMETHING_ELSE", "kept")
    env = providers._agent_env()
    assert "BATCHD_SECRET_KEYS" not in env
    assert env["BATCHD_SOMETHING_ELSE"] == "kept"
    assert env["BATCHD_AGENT_PARENT"] == str(os.getpid())
