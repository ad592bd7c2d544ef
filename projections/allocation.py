"""Node allocation: which GPUs of which node hold which job attempt and task.

`allocate` records a JobScheduled placement on the nodes; `retire` gives an attempt's GPUs back
when it ends, or is requeued or preempted. A GPU holds at most one attempt: an entry is
released only by the attempt that holds it, so a late event about an older attempt cannot
free a newer one's GPU.

An attempt may end (a gang whose other task failed, a termination ended by a node loss) or go
back to the queue while some of its tasks still run until their agents have killed them (a
SIGTERM grace, a checkpoint being written): `retire` frees the GPUs of the tasks that have
exited or whose node is lost, and leaves the others' held, listed in the job's `stopping`,
until each task is seen to stop (`stopped`: its exit, reported late) or its node's agent is
gone (`forget_stopped`: the node was lost, removed, or its agent restarted). Only then are
those GPUs placed again, and only then is the job's next attempt placed: two attempts never
share a GPU, and a job's attempts never run at once.
"""

from __future__ import annotations

from typing import Any

from batchd.projections.model import LOST, Job, Node, ReadModels

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
            before = node.allocations.get(str(gpu))
            if before is not None:  # placed over a stopping task (a log of an older version)
                _unlist(m, before, node_id)  # says it stopped: the log moved on from it
            node.allocations[str(gpu)] = holder


def retire(m: ReadModels, job: Job, exited: bool = False) -> None:
    """The job's current attempt ended, or was requeued or preempted: the GPUs of its tasks
    that have exited (all of them, with `exited`: it succeeded), or whose node is lost, are
    free; the others' stay held until the task is seen to stop (it is being killed)."""
    for index, (node_id, gpus) in enumerate(job.tasks):
        node = m.nodes.get(node_id)
        if node is None:
            continue
        held = [job.job_id, job.attempt, index]
        if (exited or node.state == LOST or str(index) in job.task_exits
                or held not in node.allocations.values()):  # fmt: skip
            _free(node, job, gpus)
        else:
            job.stopping.append([job.attempt, index, node_id])
    job.tasks = []


def stopping_node(m: ReadModels, job_id: str, attempt: int, task: int) -> str | None:
    """The node of a task of an earlier attempt still stopping (for a report that does not
    name it: a log of an older version)."""
    job = m.jobs.get(job_id)
    found = [s[2] for s in job.stopping if s[:2] == [attempt, task]] if job is not None else []
    return found[0] if found else None


def _unlist(m: ReadModels, holder: list[Any], node_id: str) -> bool:
    """Take task `holder` (job, attempt, task) on `node_id` off its job's `stopping`; was it
    there?"""
    job = m.jobs.get(holder[0])
    entry = [holder[1], holder[2], node_id]
    if job is None or entry not in job.stopping:
        return False
    job.stopping.remove(entry)
    return True


def stopped(m: ReadModels, job_id: str, attempt: int, task: int, node_id: str) -> bool:
    """A task of an earlier attempt was seen to stop on `node_id`: its GPUs are free. False
    if it held none there (it is no earlier attempt's, or was freed already)."""
    held = [job_id, attempt, task]
    node = m.nodes.get(node_id)
    gpus = [g for g, h in stale_allocations(m, node) if h == held] if node is not None else []
    for gpu in gpus:
        del node.allocations[gpu]
    return _unlist(m, held, node_id) or bool(gpus)


def forget_stopped(m: ReadModels, node: Node) -> None:
    """The node's agent is gone (lost, removed, restarted): the tasks of earlier attempts it
    held run no more, and their GPUs are free."""
    for gpu, holder in stale_allocations(m, node):
        del node.allocations[gpu]
        _unlist(m, holder, node.node_id)


def stale_allocations(m: ReadModels, node: Node) -> list[tuple[str, list[Any]]]:
    """(GPU key, holder) of the node's allocations held by tasks of earlier attempts, still
    stopping (see is_stale)."""
    return [(gpu, holder) for gpu, holder in node.allocations.items() if is_stale(m, holder)]


def is_stale(m: ReadModels, holder: list[Any]) -> bool:
    """Is an allocation held by a task that is not one of its job's placed attempt (a task
    of an earlier attempt, still stopping)? A job's `tasks` are those of its attempt while it
    holds GPUs, and empty otherwise (a requeued job keeps its attempt's number until the next
    placement)."""
    job = m.jobs.get(holder[0])
    return job is None or job.attempt != holder[1] or holder[2] >= len(job.tasks)


def _free(node: Node, job: Job, gpus: list[int]) -> None:
    for gpu in gpus or WHOLE_NODE:
        holder = node.allocations.get(str(gpu))
        if holder is not None and holder[0] == job.job_id and holder[1] == job.attempt:
            del node.allocations[str(gpu)]
