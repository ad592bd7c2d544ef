"""Node allocation: which GPUs of which node hold which job attempt and task.

`allocate` records a JobScheduled placement on the nodes; `release` gives an attempt's GPUs back
when it ends or is requeued. A GPU holds at most one live attempt: an entry is released only by
the attempt that holds it, so a late event about an older attempt cannot free a newer one's GPU.
"""

from __future__ import annotations

from typing import Any

from batchd.projections.model import Job, Node, ReadModels

# the allocation key of a task that needs no GPU (gpusPerNode 0): it holds the whole node, on
# a node with GPUs too (and its task is given none of them)
WHOLE_NODE = ("*",)


def free_gpus(node: Node) -> list[int]:
    """The node's GPU indices that no live attempt holds, ascending."""
    if not node.allocations:
        return list(range(node.gpus))
    if WHOLE_NODE[0] in node.allocations:
        return []
    return [g for g in range(node.gpus) if str(g) not in node.allocations]


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
