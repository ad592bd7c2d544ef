"""A local cluster's scale-down honours its `nodeDeallocationOption` (Batch AI 2018-05-01):
what becomes of the jobs on a node that goes (providers.deallocation_option, deallocate)."""

from __future__ import annotations

from batchd.projections.model import LEAVING
from batchd.scheduler.providers import deallocate, deallocation_option
from tests.unit.test_planner import World, placed


def _busy(option: str | None = None, nodes: int = 1) -> tuple[World, str]:
    """A cluster of two nodes whose manual settings ask one (with `option`), and a job
    running on the node that goes (and on the other too, with `nodes` 2)."""
    w = World().cluster(nodes=2)
    manual = {"targetNodeCount": 1}
    if option is not None:
        manual["nodeDeallocationOption"] = option
    w.apply("ClusterScaleSettingsChanged", clusterId="c", scaleSettings={"manual": manual})
    job = w.job(gpus=1, nodes=nodes)
    w.run(job, [("c-n1", [0]), ("c-n0", [0])][:nodes])
    return w, job


def _apply(w: World, decided) -> None:
    for _stream, event in decided:
        w.apply(event.type, **event.data)


def test_the_option_is_the_manual_settings_and_requeue_by_default():
    w, _job = _busy()
    cluster = w.models.clusters["c"]
    assert deallocation_option(cluster) == "requeue"  # Batch AI's default
    for option in ("requeue", "terminate", "waitforjobcompletion"):
        w, _job = _busy(option)
        assert deallocation_option(w.models.clusters["c"]) == option


def test_a_cluster_being_deleted_or_scaling_itself_waits_for_its_jobs():
    w, _job = _busy("terminate")
    cluster = w.models.clusters["c"]
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 2}}
    assert deallocation_option(cluster) == "waitforjobcompletion"
    w, _job = _busy("terminate")
    w.apply("ClusterDeleteRequested", clusterId="c")
    assert deallocation_option(w.models.clusters["c"]) == "waitforjobcompletion"


def test_requeue_drains_the_node_and_requeues_its_attempt_without_spending_retries():
    w, job = _busy("requeue")
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobRequeued"]
    requeued = decided[1][1].data
    assert requeued["cause"] == "interrupted" and requeued["attempt"] == 1
    assert requeued["error"]["code"] == "node_deallocated"
    assert "c-n1" in requeued["error"]["message"] and "requeue" in requeued["error"]["message"]
    _apply(w, decided)
    assert w.models.nodes["c-n1"].state == LEAVING
    assert w.models.jobs[job].state == "queued" and w.models.jobs[job].retries == {"interrupted": 1}
    assert deallocate(w.models, "c-n1", "requeue", "batchd:serve") == []  # asked once
    # its task stops (the agent killed it): it runs again, on the node that stays
    w.apply("JobTaskExited", jobId=job, attempt=1, task=0, exitCode=143, node="c-n1")
    assert not w.models.nodes["c-n1"].allocations  # the node can go now
    assert placed(w.plan()) == {job: [{"node": "c-n0", "gpus": [0]}]}


def test_terminate_drains_the_node_and_terminates_its_job_with_the_reason():
    w, job = _busy("terminate")
    decided = deallocate(w.models, "c-n1", "terminate", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobTerminateRequested"]
    reason = decided[1][1].data["reason"]
    assert "c-n1" in reason and "terminate" in reason
    _apply(w, decided)
    assert w.models.jobs[job].state == "terminating"
    assert deallocate(w.models, "c-n1", "terminate", "batchd:serve") == []
    w.apply("JobTaskExited", jobId=job, attempt=1, task=0, exitCode=143, node="c-n1")
    w.apply("JobTerminated", jobId=job, attempt=1, reason=reason)
    assert w.models.jobs[job].state == "failed" and not w.models.nodes["c-n1"].allocations


def test_waitforjobcompletion_only_drains_the_node():
    w, job = _busy("waitforjobcompletion")
    decided = deallocate(w.models, "c-n1", "waitforjobcompletion", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested"]
    _apply(w, decided)
    assert w.models.jobs[job].state == "running"
    assert deallocate(w.models, "c-n1", "waitforjobcompletion", "batchd:serve") == []


def test_a_job_being_terminated_on_the_node_is_left_to_end():
    w, job = _busy("requeue")
    w.apply("JobTerminateRequested", jobId=job, reason="terminated by ann")
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested"]


def test_a_multi_node_attempt_on_a_node_that_goes_is_requeued_whole():
    w, job = _busy("requeue", nodes=2)
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobRequeued"]
    _apply(w, decided)
    assert w.models.jobs[job].state == "queued"
