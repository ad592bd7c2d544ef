"""The daemon's side of stopping tasks: a task of a requeued attempt that its node's heartbeats
stop listing is taken to have stopped once STOPPED_AFTER has passed (its exit report, or its
start, was lost), and its GPUs are freed; one its node still lists keeps them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from batchd.scheduler import commands, nodes
from batchd.scheduler.nodes import STOPPED_AFTER, NodeService, _stopped
from tests.unit.test_planner import World, placed


def _service(w: World) -> NodeService:
    service = NodeService.__new__(NodeService)  # only what _unlisted_long reads
    service.runner = SimpleNamespace(models=w.models)
    service.unlisted, service.unstarted = {}, {}
    return service


def test_a_stopping_task_no_heartbeat_lists_is_taken_to_have_stopped(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(nodes, "time", SimpleNamespace(monotonic=lambda: clock.now))
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=2)
    w.run(job, [("c-n0", [0, 1])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="exit_code")
    service, key = _service(w), (job, 1, 0)

    assert service._unlisted_long("c-n0", [key]) == []  # it still runs there
    assert service._unlisted_long("c-n0", []) == []  # the first heartbeat without it
    clock.now += STOPPED_AFTER - 1
    assert service._unlisted_long("c-n0", []) == []
    assert service._unlisted_long("c-n0", [key]) == []  # listed again: it counts anew
    clock.now += STOPPED_AFTER - 1
    assert service._unlisted_long("c-n0", []) == []
    clock.now += STOPPED_AFTER
    assert service._unlisted_long("c-n0", []) == [key]

    for _stream, event in _stopped(w.models, key, "c-n0", None):
        w.apply(event.type, **event.data)
    assert not w.models.nodes["c-n0"].allocations and not w.models.jobs[job].stopping
    assert _stopped(w.models, key, "c-n0", None) == []  # once
    assert service._unlisted_long("c-n0", []) == [] and service.unlisted == {}
    assert set(placed(w.plan())) == {job}


def test_a_lost_node_says_why_it_was_lost():
    w = World().cluster(nodes=1, gpus=4)
    w.apply("NodeSuspected", nodeId="c-n0")
    [(_, lost)] = nodes._lost(w.models, "c-n0")
    w.apply(lost.type, **lost.data)
    why = w.models.nodes["c-n0"].errors[-1]  # what `node show` gives as its last error
    assert why["code"] == "node_lost" and "no word from its agent" in why["message"]


def test_the_fates_of_a_lost_nodes_attempts_name_the_loss_as_their_cause():
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=2)
    w.run(job, [("c-n0", [0, 1])])
    w.apply("NodeSuspected", nodeId="c-n0")
    decided = nodes._lost(w.models, "c-n0")
    [(_, lost), (_, requeued)] = decided
    assert (lost.type, requeued.type) == ("NodeLost", "JobRequeued")
    assert requeued.causation_id == lost.event_id and lost.causation_id is None


def test_an_attempt_failed_before_any_task_was_sent_frees_its_gpus_at_once():
    w = World().cluster(nodes=2, gpus=4)
    gang, waiting = w.job(gpus=4, nodes=2), w.job(gpus=4, nodes=2)
    tasks = [{"node": "c-n0", "gpus": [0, 1, 2, 3]}, {"node": "c-n1", "gpus": [0, 1, 2, 3]}]
    w.apply("JobScheduled", jobId=gang, attempt=1, tasks=tasks)
    error = {"code": "runtime_missing", "message": "node c-n1 has no docker runtime"}
    [(_stream, failed)] = nodes._fail(w.models, gang, 1, error, undispatched=True)
    assert failed.data["undispatched"] is True
    w.apply(failed.type, **failed.data)

    assert w.models.jobs[gang].state == "failed" and not w.models.jobs[gang].stopping
    assert not any(n.allocations for n in w.models.nodes.values())
    assert set(placed(w.plan())) == {waiting}  # not 15 s later


def test_a_failed_attempt_whose_tasks_were_sent_keeps_their_gpus_until_they_stop():
    w = World().cluster(nodes=1, gpus=4)
    job, waiting = w.job(gpus=4), w.job(gpus=4)
    w.run(job, [("c-n0", [0, 1, 2, 3])])
    error = {"code": "start_failed", "message": "RuntimeError: mid-dispatch"}
    [(_stream, failed)] = nodes._fail(w.models, job, 1, error)
    assert "undispatched" not in failed.data
    w.apply(failed.type, **failed.data)

    assert w.models.jobs[job].stopping == [[1, 0, "c-n0"]]
    assert placed(w.plan()) == {}
    assert w.models.jobs[waiting].pending_reason["code"] == "gpus_stopping"


def test_a_setup_report_that_comes_while_its_node_is_lost_is_not_dropped():
    w = World()
    w.apply("ClusterCreated", clusterId="c", workspace="ws", name="c", spec={"vmSize": "x"})
    w.apply("NodeRegistered", nodeId="n", cluster="c", gpus=1, incarnation=7)
    w.apply("NodeSetupStarted", nodeId="n", outputDir="/out")
    w.apply("NodeLost", nodeId="n")  # silent during its setup; its agent comes back
    msg = {"node": "n", "incarnation": 7, "exitCode": 0, "tail": "done"}
    [(_stream, ended)] = nodes._setup_exited(w.models, msg)
    w.apply(ended.type, **ended.data)
    assert w.models.nodes["n"].state == "ready"
    assert nodes._setup_exited(w.models, {**msg, "incarnation": 6}) == []  # an older agent's


def test_a_failed_setup_makes_the_node_unusable_and_is_among_its_clusters_errors():
    w = World()
    w.apply("ClusterCreated", clusterId="c", workspace="ws", name="c", spec={"vmSize": "x"})
    w.apply("NodeRegistered", nodeId="n", cluster="c", gpus=1, incarnation=7)
    w.apply("NodeSetupStarted", nodeId="n", outputDir="/out")
    msg = {"node": "n", "incarnation": 7, "exitCode": 4, "tail": "cannot mount"}
    for _stream, event in nodes._setup_exited(w.models, msg):
        w.apply(event.type, **event.data)
    assert w.models.nodes["n"].state == "unusable"
    [error] = w.models.clusters["c"].errors
    assert (error["code"], error["message"]) == (
        "setup_failed",
        "node n: the setup task exited with 4",
    )


def test_only_an_attempt_this_daemon_scheduled_and_sent_nothing_of_counts_as_undispatched():
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=1)
    w.run(job, [("c-n0", [0])], at=1_000)
    service = NodeService.__new__(NodeService)  # only what _never_sent reads
    service.unstarted, service.since_us = {}, 500
    assert service._never_sent(w.models.jobs[job])
    service.since_us = 2_000  # scheduled by an earlier daemon: it may have sent StartTask
    assert not service._never_sent(w.models.jobs[job])
    service.since_us, service.unstarted = 500, {(job, 1, 0): ("c-n0", {}, 0.0)}
    assert not service._never_sent(w.models.jobs[job])


def test_a_node_suspected_for_its_engine_is_ready_again_only_once_its_agent_says_it_answers():
    """Not while a heartbeat or registration says the engine is away, nor within ENGINE_HOLD
    of the suspicion (a heartbeat sent before its agent knew, or an agent too old to say);
    a node suspected for silence is ready again at its agent's first word."""
    from batchd.projections.model import Node

    at = 1_000_000_000
    engine = {"code": "engine_unreachable", "message": "away", "at": at}
    node = Node("n", "c", "suspect", at, "NodeSuspected", errors=[engine])
    assert not nodes._may_recover(node, ("engine_unreachable", "refused"), at + 60_000_000)
    assert not nodes._may_recover(node, None, at + nodes.ENGINE_HOLD - 1)
    assert nodes._may_recover(node, None, at + nodes.ENGINE_HOLD)
    assert nodes._may_recover(node, None, at - 60_000_000)  # the clock was set back
    silent = Node("n", "c", "suspect", at + 5, "NodeSuspected", errors=[engine])  # an old error
    assert nodes._may_recover(silent, None, at + 6)
    lost = Node("n", "c", "lost", at, "NodeLost", errors=[engine])
    assert nodes._may_recover(lost, None, at + 1) and not nodes._may_recover(lost, "x", at + 1)


def _named(w: World) -> World:
    """The world's workspace and experiment, for commands that find a job by name."""
    w.apply("WorkspaceCreated", workspace="ws")
    w.apply("ExperimentCreated", workspace="ws", experiment="e")
    return w


def _terminate(w: World, job: str) -> list[str]:
    decided = commands.terminate(w.models.jobs[job], "user:ann", "terminated by ann")
    for _stream, event in decided:
        w.apply(event.type, **event.data)
    return [event.type for _stream, event in decided]


def test_a_queued_job_terminated_while_its_last_attempt_stops_ends_when_that_has_stopped():
    """It holds GPUs until then: it is terminating (not ended, not deletable: its name and
    output could be reused while its process still writes), and ends as its task stops."""
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=4)
    w.run(job, [("c-n0", [0, 1, 2, 3])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="preempted")
    assert _terminate(w, job) == ["JobTerminateRequested"]
    assert w.models.jobs[job].state == "terminating"
    assert commands.finish_jobs(w.models, "scheduler") == []  # it still holds them
    for _stream, event in commands.delete_job(_named(w).models, "ws", "e", job, "user:bob"):
        w.apply(event.type, **event.data)  # deleted too: once it has ended
    assert w.models.jobs[job].state == "terminating"
    decided = _stopped(w.models, (job, 1, 0), "c-n0", 143)
    assert [e.type for _s, e in decided] == ["JobTaskExited", "JobTerminated", "JobDeleted"]
    assert decided[1][1].data["reason"] == "terminated by ann"
    for _stream, event in decided[:2]:
        w.apply(event.type, **event.data)
    ended = w.models.jobs[job]
    assert ended.state == "failed" and ended.errors[-1]["code"] == "terminated"
    assert not w.models.nodes["c-n0"].allocations


def _stopping_and_terminated(w: World) -> str:
    job = w.job(gpus=4)
    w.run(job, [("c-n0", [0, 1, 2, 3])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="preempted")
    _terminate(w, job)
    return job


def test_a_terminating_gang_ends_once_its_last_stopping_task_has_not_when_one_node_is_lost():
    w = World().cluster(nodes=2, gpus=4)
    gang = w.job(gpus=4, nodes=2)
    w.run(gang, [("c-n0", [0, 1, 2, 3]), ("c-n1", [0, 1, 2, 3])])
    w.apply("JobRequeued", jobId=gang, attempt=1, cause="preempted")
    _terminate(w, gang)
    w.apply("NodeSuspected", nodeId="c-n0")
    for _stream, event in nodes._lost(w.models, "c-n0"):
        assert event.type == "NodeLost"  # its task on c-n1 still runs: not ended yet
        w.apply(event.type, **event.data)
    assert w.models.jobs[gang].state == "terminating"
    assert commands.finish_jobs(w.models, "scheduler") == []
    decided = _stopped(w.models, (gang, 1, 1), "c-n1", 143)
    assert [e.type for _s, e in decided] == ["JobTaskExited", "JobTerminated"]


def test_a_stopping_task_of_a_job_gone_is_taken_off_its_node_all_the_same():
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=4)
    w.run(job, [("c-n0", [0, 1, 2, 3])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="preempted")
    del w.models.jobs[job]  # (as a deletion raced by a placement left it, in older versions)
    decided = _stopped(w.models, (job, 1, 0), "c-n0", 143)
    assert [e.type for _s, e in decided] == ["JobTaskExited"]


def test_a_terminating_job_whose_stopping_tasks_node_was_removed_ends_at_the_next_sweep():
    w = World().cluster(nodes=1, gpus=4)
    job = _stopping_and_terminated(w)
    w.apply("NodeRemoved", nodeId="c-n0")
    [(_stream, ended)] = commands.finish_jobs(w.models, "scheduler")
    assert ended.type == "JobTerminated" and ended.data == {
        "jobId": job,
        "reason": "terminated by ann",
    }
    w.apply(ended.type, **ended.data)
    assert w.models.jobs[job].state == "failed"
    assert commands.finish_jobs(w.models, "scheduler") == []


def test_an_ended_job_whose_tasks_still_stop_cannot_be_deleted_yet():
    w = World().cluster(nodes=2, gpus=4)
    gang = w.job(gpus=4, nodes=2)
    w.run(gang, [("c-n0", [0, 1, 2, 3]), ("c-n1", [0, 1, 2, 3])])
    w.apply("JobTaskExited", jobId=gang, attempt=1, task=0, exitCode=3)
    w.apply("JobFailed", jobId=gang, attempt=1, exitCode=3)  # its other task is being killed
    assert w.models.jobs[gang].stopping == [[1, 1, "c-n1"]]
    with pytest.raises(commands.CommandError, match=r"still being stopped \(on c-n1\)"):
        commands.delete_job(_named(w).models, "ws", "e", w.models.jobs[gang].name, "user:ann")


def test_deleting_an_experiment_ends_its_queued_job_once_its_stopping_task_has():
    w = _named(World().cluster(nodes=1, gpus=4))
    job = w.job(gpus=4)
    w.run(job, [("c-n0", [0, 1, 2, 3])])
    w.apply("JobRequeued", jobId=job, attempt=1, cause="preempted")
    decided = commands.delete_experiment(w.models, "ws", "e", "user:ann")
    assert [e.type for _s, e in decided] == ["JobTerminateRequested", "ExperimentDeleted"]


def test_a_termination_ended_before_its_task_was_seen_to_start_keeps_its_reason():
    w = World().cluster(nodes=1, gpus=4)
    job = w.job(gpus=4)
    w.apply("JobScheduled", jobId=job, attempt=1, tasks=[{"node": "c-n0", "gpus": [0, 1, 2, 3]}])
    w.apply("JobTerminateRequested", jobId=job, reason="deleted by user:ann")
    [(_stream, ended)] = nodes._terminated(w.models, job, 1)
    assert ended.data["reason"] == "deleted by user:ann (its task was not seen to start)"
