"""When an attempt ends badly: requeue it or fail the job, by the retry ledger.

Each cause has its own ceiling (DESIGN.md, "Job lifecycle"): `exit_code` failures spend the
job's `maxRetries` (default 0, as in Azure Batch); a lost node (`node_lost`) and a low-priority
eviction (`evicted`) spend `maxNodeFailureRetries` (default 3) together; preemption by a
higher-priority job (`preempted`) is the scheduler's choice, not a failure, and is not capped;
nor is `interrupted`: the operator's doing, not the job's (the daemon was stopped, and its
local nodes' agents with it; or a scale-down with `nodeDeallocationOption` `requeue` took the
node away, see providers.deallocate).
"""

from __future__ import annotations

from typing import Any

from batchd.events.envelope import NewEvent
from batchd.projections import lifecycle
from batchd.projections.model import TERMINATING, ReadModels
from batchd.scheduler.planner import Decision

NODE_CAUSES = ("node_lost", "evicted")


def attempt_ended(
    m: ReadModels, job_id: str, attempt: int, cause: str, exit_code: int | None = None,
    error: dict[str, Any] | None = None,
) -> list[Decision]:  # fmt: skip
    """The events for an attempt that ended because of `cause` (exit_code, node_lost, evicted,
    preempted, interrupted); nothing if the attempt is not the job's current one or no longer
    holds GPUs. An attempt that was being terminated ends the termination."""
    job = m.jobs.get(job_id)
    if job is None or job.attempt != attempt:
        return []
    stream = f"job-{job_id}"
    if job.state == TERMINATING and not job.tasks:  # terminated after its attempt was
        return []  # retired: it ends once its last stopping task has (commands.finish_jobs)
    if job.state == TERMINATING:  # it was being killed anyway: the termination is complete
        reason = f"{job.terminate_reason or 'terminated'} (its attempt ended: {cause})"
        data = {"jobId": job_id, "attempt": attempt, "reason": reason}
        return [(stream, NewEvent("JobTerminated", data))]
    if not lifecycle.allowed(job.state, "JobRequeued"):
        return []
    if cause == "preempted":
        return [(stream, NewEvent("JobPreempted", {"jobId": job_id, "attempt": attempt}))]
    details = {"exitCode": exit_code} if exit_code is not None else {}
    if error:
        details["error"] = error
    requeue = NewEvent("JobRequeued", {"jobId": job_id, "attempt": attempt, "cause": cause,
                                       **details})  # fmt: skip
    if cause == "interrupted":  # the operator's doing: never counted against the job
        return [(stream, requeue)]
    if cause == "exit_code":
        spent, ceiling = job.retries.get("exit_code", 0), job.max_retries
    elif cause in NODE_CAUSES:
        spent = sum(job.retries.get(c, 0) for c in NODE_CAUSES)
        ceiling = job.max_node_failure_retries
    else:
        raise ValueError(f"unknown retry cause {cause!r}")
    if spent < ceiling:
        return [(stream, requeue)]
    final = error or {
        "code": cause,
        "message": f"{cause} after {spent} retries ({ceiling} allowed)",
    }
    data = {"jobId": job_id, "attempt": attempt, **details, "error": final}
    return [(stream, NewEvent("JobFailed", data))]


def node_lost(
    m: ReadModels, node_id: str, cause: str = "node_lost", error: dict[str, str] | None = None
) -> list[Decision]:
    """For a node that was lost (or evicted, or interrupted): the fate of every attempt that
    ran on it; `error` (default: the node was lost, or evicted) is recorded with each."""
    node = m.nodes.get(node_id)
    if node is None:
        return []
    holders = sorted({(job_id, attempt) for job_id, attempt, _task in node.allocations.values()})
    out: list[Decision] = []
    for job_id, attempt in holders:
        what = {"node_lost": "was lost", "evicted": "was evicted"}.get(cause, cause)
        told = error or {"code": cause, "message": f"node {node_id} {what}"}
        out.extend(attempt_ended(m, job_id, attempt, cause, error=told))
    return out
