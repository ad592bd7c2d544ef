"""The per-cluster priority queue: queued jobs in (priority desc, submission asc) order.

The order is a policy (DESIGN.md "Deciding"): `queue_key` is its one definition. A requeued
job keeps its submission position, so it goes back ahead of later submissions of its priority.
"""

from __future__ import annotations

from batchd.projections.model import Job, ReadModels


def queue_key(job: Job) -> list[int]:
    return [-job.priority, job.submitted_position]


def enqueue(m: ReadModels, job: Job) -> None:
    m.queues.setdefault(job.cluster, {})[job.job_id] = queue_key(job)


def dequeue(m: ReadModels, job: Job) -> None:
    queue = m.queues.get(job.cluster)
    if queue is not None:
        queue.pop(job.job_id, None)


def ordered(m: ReadModels, cluster_id: str) -> list[Job]:
    """The cluster's queued jobs, first to be placed first."""
    queue = m.queues.get(cluster_id, {})
    return [m.jobs[job_id] for job_id in sorted(queue, key=queue.__getitem__)]
