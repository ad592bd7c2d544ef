"""The read models on hand-written histories: the cases a real scheduler logs and that are
easy to get wrong (late reports from requeued attempts, terminate during requeue, deleted
clusters with queued jobs, a bad event)."""

from __future__ import annotations

import uuid

import pytest

from batchd.events.envelope import RecordedEvent
from batchd.projections import fold, history, views
from batchd.projections.fold import ProjectionError


class Log:
    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []

    def __call__(self, type_: str, actor: str = "scheduler", **data) -> Log:
        n = len(self.events) + 1
        self.events.append(RecordedEvent(
            n, uuid.UUID(int=n), "s", n, type_, 1, n * 1_000_000, actor, None, None, data, b"",
        ))  # fmt: skip
        return self

    def models(self):
        return fold.rebuild(self.events)


def cluster_with_a_job() -> Log:
    log = Log()
    log("ClusterCreated", clusterId="c1", workspace="ws", name="gpu", spec={})
    for node in ("n1", "n2"):
        log("NodeRegistered", nodeId=node, cluster="c1", gpus=4)
        log("NodeSetupSucceeded", nodeId=node)
    log("JobSubmitted", jobId="j", workspace="ws", experiment="e", name="train", cluster="c1",
        owner="ann", priority=0, nodeCount=1, gpusPerNode=2)  # fmt: skip
    log("JobScheduled", jobId="j", attempt=1, tasks=[{"node": "n1", "gpus": [0, 1]}])
    log("JobStarted", jobId="j", attempt=1)
    log("NodeLost", nodeId="n1")
    log("JobRequeued", jobId="j", attempt=1, cause="node_lost")
    return log


def test_a_node_lost_during_or_after_its_setup_task_comes_back_to_where_it_was():
    log = Log()
    log("ClusterCreated", clusterId="c1", workspace="ws", name="gpu", spec={})
    for node in ("n1", "n2"):
        log("NodeRegistered", nodeId=node, cluster="c1", gpus=4)
        log("NodeSetupStarted", nodeId=node, outputDir=f"/out/{node}")
    log("NodeSetupFailed", nodeId="n2", exitCode=5, error={"code": "setup_failed"})
    for node in ("n1", "n2"):
        log("NodeLost", nodeId=node)  # silent: its agent died, or froze
    assert {n.state for n in log.models().nodes.values()} == {"lost"}
    for node in ("n1", "n2"):
        log("NodeRecovered", nodeId=node)  # the same agent answers again
    nodes = log.models().nodes
    assert (nodes["n1"].state, nodes["n2"].state) == ("preparing", "unusable")  # not ready
    log("NodeSetupSucceeded", nodeId="n1", exitCode=0)
    assert log.models().nodes["n1"].state == "ready"


def test_a_silent_node_is_suspected_when_ready_and_lost_in_any_state_with_an_agent():
    from batchd.scheduler.nodes import NODE_TIMEOUT, SUSPECT_AFTER, _lost, _suspected, silent_fate

    assert silent_fate("ready", SUSPECT_AFTER + 1) is _suspected
    for state in ("suspect", "leaving", "preparing", "unusable"):
        assert silent_fate(state, NODE_TIMEOUT + 1) is _lost
        assert silent_fate(state, NODE_TIMEOUT - 1) is None
    for state in ("provisioning", "lost"):
        assert silent_fate(state, 10 * NODE_TIMEOUT) is None


def test_a_draining_node_that_comes_back_keeps_draining_until_it_is_wanted_again():
    log = cluster_with_a_job()
    log("NodeDrainRequested", nodeId="n2")
    log("NodeLost", nodeId="n2")
    log("NodeRecovered", nodeId="n2")  # its agent answers again: still no new work
    assert log.models().nodes["n2"].state == "leaving"
    log("NodeRegistered", nodeId="n2", cluster="c1", gpus=4, incarnation=2)  # a restart
    log("NodeSetupSucceeded", nodeId="n2")
    assert log.models().nodes["n2"].state == "leaving"
    log("NodeRecovered", nodeId="n2")  # the cluster wants it again
    log("NodeLost", nodeId="n2")
    log("NodeRecovered", nodeId="n2")
    assert log.models().nodes["n2"].state == "ready"
    assert log.models().nodes["n1"].state == "lost"  # n1 was lost while ready
    log("NodeRecovered", nodeId="n1")
    assert log.models().nodes["n1"].state == "ready"


def test_a_late_failure_of_a_requeued_attempt_leaves_the_job_queued():
    log = cluster_with_a_job()("JobFailed", jobId="j", attempt=1, exitCode=137)
    m = log.models()
    assert m.jobs["j"].state == "queued" and m.jobs["j"].retries == {"node_lost": 1}
    assert list(m.queues["c1"]) == ["j"]
    timeline = history.timeline([e for e in log.events if e.type.startswith("Job")])
    assert [(e["event"], e["state"], e["ignored"]) for e in timeline[-2:]] == [
        ("JobRequeued", "queued", False), ("JobFailed", "queued", True),
    ]  # fmt: skip


def test_reports_of_an_old_attempt_do_not_touch_the_new_one():
    log = cluster_with_a_job()
    log("JobScheduled", jobId="j", attempt=2, tasks=[{"node": "n2", "gpus": [2, 3]}])
    log("JobSucceeded", jobId="j", attempt=1, exitCode=0)
    log("JobStarted", jobId="j", attempt=1)
    m = log.models()
    assert (m.jobs["j"].state, m.jobs["j"].attempt) == ("scheduled", 2)
    assert m.nodes["n2"].allocations == {"2": ["j", 2, 0], "3": ["j", 2, 0]}
    job_stream = [e for e in log.events if e.type.startswith("Job")]
    timeline = history.timeline(job_stream)
    assert [(e["state"], e["ignored"]) for e in timeline[-3:]] == [
        ("scheduled", False), ("scheduled", True), ("scheduled", True),
    ]  # fmt: skip


def test_a_late_report_of_an_old_attempt_names_that_attempts_node_and_is_marked():
    log = cluster_with_a_job()
    log("JobScheduled", jobId="j", attempt=2, tasks=[{"node": "n2", "gpus": [2, 3]}])
    log("JobTaskExited", jobId="j", attempt=1, task=0, exitCode=1)
    log("JobFailed", jobId="j", attempt=1, exitCode=1)
    log("JobTaskExited", jobId="j", attempt=2, task=0, exitCode=0)
    timeline = history.timeline([e for e in log.events if e.type.startswith("Job")])
    assert [(e["event"], e["attempt"], e["nodes"], e["ignored"]) for e in timeline[-4:]] == [
        ("JobScheduled", 2, ["n2"], False),
        ("JobTaskExited", 1, ["n1"], True),  # attempt 1 ran on n1, and has moved on
        ("JobFailed", 1, ["n1"], True),
        ("JobTaskExited", 2, ["n2"], False),
    ]  # fmt: skip


def test_a_job_removed_with_its_experiment_says_so_where_it_happened():
    log = Log()
    log("JobSubmitted", jobId="j", workspace="ws", experiment="e", name="train", cluster="c1",
        owner="ann", priority=0, nodeCount=1, gpusPerNode=2)  # fmt: skip
    log("JobTerminated", jobId="j", reason="experiment e deleted", actor="user:bob")
    log("ExperimentDeleted", workspace="ws", experiment="e", actor="user:bob")
    job_stream, [removal] = log.events[:2], log.events[2:]
    timeline = history.timeline(job_stream, removal)
    assert [(e["event"], e["state"], e["actor"], e["reason"]) for e in timeline] == [
        ("JobSubmitted", "queued", "scheduler", None),
        ("JobTerminated", "failed", "user:bob", "experiment e deleted"),
        ("ExperimentDeleted", "deleted", "user:bob", "experiment e deleted"),
    ]  # fmt: skip
    live = history.timeline(job_stream[:1], removal)  # a running job ends after, out of sight
    assert [(e["event"], e["state"]) for e in live] == [
        ("JobSubmitted", "queued"),
        ("ExperimentDeleted", "queued"),
    ]


def test_a_job_deleted_before_its_experiment_ends_with_its_own_deletion():
    log = Log()
    log("JobSubmitted", jobId="j", workspace="ws", experiment="e", name="train", cluster="c1",
        owner="ann", priority=0, nodeCount=1, gpusPerNode=2)  # fmt: skip
    log("JobTerminated", jobId="j", reason="no longer wanted", actor="user:ann")
    log("JobDeleted", jobId="j", actor="user:ann")
    log("ExperimentDeleted", workspace="ws", experiment="e", actor="user:bob")
    job_stream, [removal] = log.events[:3], log.events[3:]
    timeline = history.timeline(job_stream, removal)
    assert [e["event"] for e in timeline] == ["JobSubmitted", "JobTerminated", "JobDeleted"]


def test_a_requeue_does_not_undo_a_terminate_request():
    log = Log()
    log("ClusterCreated", clusterId="c1", workspace="ws", name="gpu", spec={})
    log("NodeRegistered", nodeId="n1", cluster="c1", gpus=4)("NodeSetupSucceeded", nodeId="n1")
    log("JobSubmitted", jobId="j", workspace="ws", experiment="e", name="t", cluster="c1",
        owner="ann", priority=0, nodeCount=1, gpusPerNode=1)  # fmt: skip
    log("JobScheduled", jobId="j", attempt=1, tasks=[{"node": "n1", "gpus": [0]}])
    log("JobTerminateRequested", actor="user:bob", jobId="j")
    log("JobRequeued", jobId="j", attempt=1, cause="node_lost")
    m = log.models()
    assert m.jobs["j"].state == "terminating" and m.jobs["j"].terminate_requested_by == "user:bob"
    assert not m.queues["c1"]
    log("JobTaskExited", jobId="j", attempt=1, task=0, exitCode=143, node="n1")  # killed
    log("JobTerminated", jobId="j")
    m = log.models()
    assert m.jobs["j"].state == "failed" and m.nodes["n1"].allocations == {}


def test_jobs_queued_for_a_deleted_cluster_stay_visible():
    log = Log()
    log("ClusterCreated", clusterId="c1", workspace="ws", name="gpu", spec={})
    log("JobSubmitted", jobId="j", workspace="ws", experiment="e", name="t", cluster="c1",
        owner="ann", priority=0, nodeCount=1, gpusPerNode=1)  # fmt: skip
    log("ClusterDeleted", clusterId="c1")
    world = views.world(log.models())
    assert world["clusters"] == []
    assert [q["job"] for q in world["queues"]["deleted cluster c1"]] == ["j"]


def test_an_event_whose_data_cannot_be_applied_names_its_position():
    log = Log()
    log("ClusterCreated", clusterId="c1", workspace="ws", name="gpu", spec={})
    log("NodeLost", reason="no node id")
    with pytest.raises(ProjectionError, match="event 2 \\(NodeLost"):
        log.models()


def test_a_requeue_in_the_history_says_its_cause_and_what_happened():
    log = cluster_with_a_job()
    stopped = {"code": "daemon_stopped", "message": "the daemon stopped, and its agents"}
    log("JobRequeued", jobId="j", attempt=1, cause="interrupted", error=stopped)
    [requeue] = history.timeline([e for e in log.events if e.type.startswith("Job")])[-1:]
    assert requeue["reason"] == "interrupted: the daemon stopped, and its agents"


def test_a_timeline_says_a_task_not_seen_to_run_had_no_exit_code_and_a_delete_asked():
    log = cluster_with_a_job()
    log("JobTerminateRequested", jobId="j", reason="deleted by user:ann")
    log("JobDeleteRequested", jobId="j", reason="deleted by user:ann")
    log("JobTaskExited", jobId="j", attempt=1, task=0, exitCode=None)
    timeline = history.timeline([e for e in log.events if e.type.startswith("Job")])
    assert [(e["event"], e["state"], e["reason"]) for e in timeline[-2:]] == [
        ("JobDeleteRequested", "terminating", "deleted by user:ann"),
        ("JobTaskExited", "terminating", "no exit code: not seen to run"),
    ]
    assert log.models().jobs["j"].delete_requested_by is not None
