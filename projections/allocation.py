"""Node allocation: which GPUs of which node hold which job attempt and task.

`allocate` records a JobScheduled placement on the nodes; `release` gives an attempt's GPUs back
when it ends or is requeued. A GPU holds at most one live attempt: an entry is released only by
the attempt that holds it, so a late event about an older attempt cannot free a newer one's GPU.
"""

from __future__ import annotations

from typing import Any

from batchd.projections.model import Job, ReadModels

WHOLE_NODE = ("*",)  # the allocation key of a task on a node without GPUs: the whole node


def allocate(m: ReadModels, job: Job, tasks: list[dict[str, Any]]) -> None:
    job.tasks = []
    for index, task in enumerate(tasks):
        node_id, gpus = task["node"], list(task.get("gpus", ()))
        job.tasks.append([node_id, gpus])
        node = m.nodes.get(node_id)
        if node is None:
            continue
        holder = [job.job_id, job.attempt, index]
        for gpu in gpus or WHOLE_NODE:
            node.allocations[str(gpu)] = holder


def release(m: ReadModels, job: Job) -> None:
    for node_id, gpus in job.tasks:
        node = m.nodes.get(node_id)
        if node is None:
            continue
        for gpu in gpus or WHOLE_NODE:
            holder = node.allocations.get(str(gpu))
            if holder is not None and holder[0] == job.job_id and holder[1] == job.attempt:
                del node.allocations[str(gpu)]
    job.tasks = []
