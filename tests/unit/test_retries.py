"""Retries: a ledger per cause, each with its own ceiling."""

from __future__ import annotations

from batchd.scheduler import retries
from tests.unit.test_planner import World


def lifecycle_of(w: World, job_id: str, node: str, causes: list[str]) -> list[str]:
    """Run the job, end its attempt with each cause in turn; the event types that follow."""
    seen = []
    for cause in causes:
        w.plan()
        job = w.models.jobs[job_id]
        if job.state != "scheduled":
            break
        decisions = retries.attempt_ended(w.models, job_id, job.attempt, cause, exit_code=1)
        for _s, e in decisions:
            w.apply(e.type, **e.data)
            seen.append(e.type)
        for attempt, task, node_id in list(job.stopping):  # its killed task reports its exit
            w.apply("JobTaskExited", jobId=job_id, attempt=attempt, task=task, exitCode=137,
                    node=node_id)  # fmt: skip
    return seen


def test_exit_code_failures_spend_max_retries_only():
    w = World().cluster(nodes=1)
    job = w.job(gpus=1)
    w.models.jobs[job].max_retries = 2
    assert lifecycle_of(w, job, "c-n0", ["exit_code"] * 3) == ["JobRequeued", "JobRequeued",
                                                                 "JobFailed"]  # fmt: skip
    assert w.models.jobs[job].retries == {"exit_code": 2}
    assert w.models.jobs[job].state == "failed"


def test_node_losses_have_their_own_ceiling_and_preemption_none():
    w = World().cluster(nodes=1)
    job = w.job(gpus=1)  # maxRetries 0, maxNodeFailureRetries 3
    causes = ["preempted", "node_lost", "evicted", "preempted", "node_lost", "node_lost"]
    assert lifecycle_of(w, job, "c-n0", causes) == [
        "JobPreempted", "JobRequeued", "JobRequeued", "JobPreempted", "JobRequeued", "JobFailed",
    ]  # fmt: skip
    assert w.models.jobs[job].retries == {"preempted": 2, "node_lost": 2, "evicted": 1}


def test_an_interruption_by_the_daemon_stopping_spends_no_retry():
    w = World().cluster(nodes=1)
    job = w.job(gpus=1)
    w.models.jobs[job].max_node_failure_retries = 0
    causes = ["interrupted", "interrupted", "node_lost"]
    assert lifecycle_of(w, job, "c-n0", causes) == ["JobRequeued", "JobRequeued", "JobFailed"]
    assert w.models.jobs[job].retries == {"interrupted": 2}


def test_a_lost_node_requeues_every_attempt_it_ran_once():
    w = World().cluster(nodes=2)
    gang, single, elsewhere = w.job(gpus=2, nodes=2), w.job(gpus=1), w.job(gpus=1)
    w.run(gang, [("c-n0", [0, 1]), ("c-n1", [0, 1])])
    w.run(single, [("c-n0", [2])])
    w.run(elsewhere, [("c-n1", [2])])
    decisions = retries.node_lost(w.models, "c-n0")
    assert sorted((e.type, e.data["jobId"], e.data["cause"]) for _s, e in decisions) == [
        ("JobRequeued", gang, "node_lost"), ("JobRequeued", single, "node_lost"),
    ]  # fmt: skip
    assert retries.attempt_ended(w.models, gang, 7, "node_lost") == []  # not its attempt


def test_a_termination_completed_by_a_lost_node_keeps_the_reason_it_was_asked_with():
    w = World().cluster(nodes=1)
    job = w.job(gpus=1)
    w.run(job, [("c-n0", [0])])
    w.apply("JobTerminateRequested", jobId=job, reason="wrong learning rate")
    [(_stream, ended)] = retries.node_lost(w.models, "c-n0")
    assert ended.type == "JobTerminated"
    assert ended.data["reason"] == "wrong learning rate (its attempt ended: node_lost)"
