"""The job table: every job's state, attempts, per-cause retry ledger, times, exit code,
errors and current pending reason; and the name index (a name can be reused after a delete).

Events about an attempt other than the job's current one are ignored: they come from an
attempt that was already requeued (DESIGN.md, "Every attempt carries its number").
"""

from __future__ import annotations

from typing import Any

from batchd.events.envelope import RecordedEvent
from batchd.projections import allocation, lifecycle, queue
from batchd.projections.lifecycle import ENDED, HOLDING, TRANSITIONS
from batchd.projections.model import (
    Job,
    ReadModels,
    job_key,
)

MAX_ERRORS = 20  # newest errors kept per job


def _current(m: ReadModels, e: RecordedEvent, states: frozenset[str] | None = None) -> Job | None:
    """The event's job if the state machine allows the event now (in `states`, if given,
    else as `lifecycle.TRANSITIONS` says) and the event is about the job's current attempt."""
    job = m.jobs.get(e.data["jobId"])
    if job is None or job.state not in (states or TRANSITIONS[e.type][0]):
        return None
    if e.data.get("attempt", job.attempt) != job.attempt:
        return None
    return job


def _after(e: RecordedEvent) -> str:
    """The job's state after `e` (lifecycle.TRANSITIONS, the one definition)."""
    return TRANSITIONS[e.type][1]


def _error(job: Job, error: dict[str, Any] | None, at: int) -> None:
    if error:
        job.errors.append({**error, "at": at})
        del job.errors[:-MAX_ERRORS]


def submitted(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    job = Job(
        d["jobId"], d["workspace"], d["experiment"], d["name"], d["cluster"], d["owner"],
        d.get("priority", 0), d.get("nodeCount", 1), d.get("gpusPerNode", 0),
        e.recorded_at, e.position, d.get("maxRetries", 0), d.get("maxNodeFailureRetries", 3),
        d.get("preemptible", False), d.get("maxWallClockTime"),
    )  # fmt: skip
    job.runtime = d.get("runtime", "process")
    owner = m.clusters.get(job.cluster)
    if owner is not None:
        job.cluster_path = f"{owner.workspace}/{owner.name}"
    m.jobs[job.job_id] = job
    m.job_ids.setdefault(job_key(job.workspace, job.experiment, job.name), []).append(job.job_id)
    queue.enqueue(m, job)


def pending_reason_changed(m: ReadModels, e: RecordedEvent) -> None:
    job = m.jobs.get(e.data["jobId"])
    if job is not None and lifecycle.allowed(job.state, e.type):
        job.pending_reason, job.pending_reason_at = e.data["reason"], e.recorded_at


def scheduled(m: ReadModels, e: RecordedEvent) -> None:
    job = m.jobs.get(e.data["jobId"])  # a new attempt: its number is the event's
    if job is None or not lifecycle.allowed(job.state, e.type):
        return
    job.state, job.attempt = _after(e), e.data["attempt"]
    job.scheduled_at, job.started_at = e.recorded_at, None
    job.pending_reason = None
    job.task_exits = {}
    queue.dequeue(m, job)
    allocation.allocate(m, job, e.data["tasks"])


def preparing(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is not None:
        job.state = _after(e)


def started(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is not None:
        job.state, job.started_at = _after(e), e.recorded_at


def task_exited(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    node_id = d.get("node") or allocation.stopping_node(m, d["jobId"], d.get("attempt"),
                                                        d["task"])  # fmt: skip
    if node_id and allocation.stopped(m, d["jobId"], d.get("attempt"), d["task"], node_id):
        return  # a task of an earlier attempt has stopped: its GPUs are free
    job = _current(m, e)
    if job is not None:
        job.task_exits[str(d["task"])] = d["exitCode"]


def _end(m: ReadModels, job: Job, e: RecordedEvent) -> None:
    job.state, job.ended_at = _after(e), e.recorded_at
    job.exit_code = e.data.get("exitCode", job.exit_code)
    job.pending_reason = None
    queue.dequeue(m, job)
    # a task still being killed keeps its GPUs until it stops (a success: every one exited,
    # unless the master's task decided it, `byTask`; a failure `undispatched`: no task of
    # the attempt was ever sent to a node)
    exited = (e.type == "JobSucceeded" and "byTask" not in e.data) or (
        e.data.get("undispatched") is True
    )
    allocation.retire(m, job, exited=exited)
    if job.detached:  # its experiment is gone: nothing shows it once it holds nothing
        del m.jobs[job.job_id]


def experiment_deleted(m: ReadModels, workspace: str, experiment: str) -> None:
    """An experiment's jobs go with it (their histories stay in the log, by name). One that
    still holds GPUs while its termination completes stays, detached, until it ends."""
    for job in [j for j in m.jobs.values()
                if j.workspace == workspace and j.experiment == experiment]:  # fmt: skip
        if job.state in ENDED:
            del m.jobs[job.job_id]
        else:
            job.detached = True


def succeeded(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is not None:
        _end(m, job, e)


def failed(m: ReadModels, e: RecordedEvent) -> None:
    # about an attempt: only while that attempt holds GPUs; without one (the scheduler failing
    # a job it cannot place), in any live state
    job = _current(m, e, HOLDING if "attempt" in e.data else None)
    if job is not None:
        _error(job, e.data.get("error"), e.recorded_at)
        _end(m, job, e)


def _requeue(m: ReadModels, e: RecordedEvent, cause: str) -> None:
    job = _current(m, e)
    if job is None:
        return
    allocation.retire(m, job)
    job.state = _after(e)
    job.retries[cause] = job.retries.get(cause, 0) + 1
    _error(job, e.data.get("error"), e.recorded_at)
    queue.enqueue(m, job)


def requeued(m: ReadModels, e: RecordedEvent) -> None:
    _requeue(m, e, e.data["cause"])


def preempted(m: ReadModels, e: RecordedEvent) -> None:
    _requeue(m, e, "preempted")


def terminate_requested(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is None:
        return
    job.terminate_requested_by = e.actor
    job.terminate_reason = e.data.get("reason")
    job.pending_reason = None
    queue.dequeue(m, job)
    job.state = _after(e)


def delete_requested(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is not None and job.delete_requested_by is None:
        job.delete_requested_by = e.actor


def terminated(m: ReadModels, e: RecordedEvent) -> None:
    job = _current(m, e)
    if job is None:
        return
    reason = e.data.get("reason") or "terminated by request"
    _error(job, {"code": "terminated", "message": reason}, e.recorded_at)
    _end(m, job, e)


def deleted(m: ReadModels, e: RecordedEvent) -> None:
    if _current(m, e) is not None:
        del m.jobs[e.data["jobId"]]


HANDLERS = {
    "JobSubmitted": submitted,
    "JobPendingReasonChanged": pending_reason_changed,
    "JobScheduled": scheduled,
    "JobPreparing": preparing,
    "JobStarted": started,
    "JobTaskExited": task_exited,
    "JobSucceeded": succeeded,
    "JobFailed": failed,
    "JobRequeued": requeued,
    "JobPreempted": preempted,
    "JobTerminateRequested": terminate_requested,
    "JobTerminated": terminated,
    "JobDeleted": deleted,
    "JobDeleteRequested": delete_requested,
}
