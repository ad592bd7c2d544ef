"""`batchd bench schedule`: placement throughput of the planner, with its events appended.

`--nodes` nodes of `--gpus-per-node` GPUs in one cluster; `--jobs` jobs of mixed shapes (1, 2,
4 or 8 GPUs, at most a node's worth; 5 % gangs of 2-4 whole nodes; priorities -500, 0, 500)
are submitted (untimed). Then cycles run on a simulated clock until every job has been placed:
each cycle is one `plan()` over the queue and the free capacity, its events appended to the
store and folded into the read models (timed); then the clock moves on ten minutes and the
jobs whose simulated run (ten minutes to an hour) ended finish, freeing their GPUs (untimed).

Every cycle is checked before its events are applied: no GPU given twice or while held, and
no job that fit passed over by a later one, except behind the reservation of an earlier job
that did not fit. `placements_per_s` is the jobs divided by the time spent planning and
appending.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import time
from typing import Any

from batchd.events import urls
from batchd.events.envelope import NewEvent, RecordedEvent
from batchd.events.store import EventStore
from batchd.projections import fold, queue
from batchd.projections.allocation import free_gpus
from batchd.projections.model import READY, ReadModels
from batchd.scheduler.bench import append
from batchd.scheduler.planner import Decision, cut_short, plan

STEP_US = 600 * 1_000_000  # simulated time between cycles: ten minutes
START_US = 1_800_000_000 * 1_000_000
CLUSTER = "bench-cluster"


class BenchError(RuntimeError):
    """The planner broke a rule the benchmark checks."""


async def main(args: argparse.Namespace) -> int:
    async with append.bench_store(args.store) as url:
        result = await run(url, args.jobs, args.nodes, args.gpus_per_node)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"bench schedule: {result['jobs']:,} jobs on {result['nodes']:,} nodes x "
            f"{result['gpus_per_node']} GPUs in {result['cycles']} cycles: "
            f"{result['placements_per_s']:,.0f} placements/s, cycle p50 "
            f"{result['cycle_p50_ms']:.1f} ms, p99 {result['cycle_p99_ms']:.1f} ms (checked)"
        )
    return 0


class _Sim:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.models = ReadModels()
        self.now = START_US

    async def emit(self, decisions: list[Decision]) -> None:
        """Append the events and fold them into the read models."""
        results = await self.store.append_many([(s, [e], None) for s, e in decisions])
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise failed[0]
        done = [positions[0] for positions in results]
        for (stream, event), position in zip(decisions, done, strict=True):
            fold.apply(self.models, RecordedEvent(
                position, event.event_id, stream, 0, event.type, 1, self.now, event.actor,
                None, None, event.data, b"",
            ))  # fmt: skip


def _world(nodes: int, gpus: int) -> list[Decision]:
    out: list[Decision] = [(f"cluster-ws/{CLUSTER}", NewEvent("ClusterCreated", {
        "clusterId": CLUSTER, "workspace": "ws", "name": CLUSTER,
        "spec": {"vmSize": "bench", "scaleSettings": {"manual": {"targetNodeCount": nodes}}},
    }, "user:bench"))]  # fmt: skip
    for i in range(nodes):
        node = f"node-{i:05d}"
        out.append((f"node-{node}", NewEvent("NodeRegistered", {
            "nodeId": node, "cluster": CLUSTER, "gpus": gpus,
        }, f"agent:{node}")))  # fmt: skip
        out.append((f"node-{node}", NewEvent("NodeSetupSucceeded", {"nodeId": node})))
    return out


def _jobs(count: int, gpus: int, nodes: int, rng: random.Random) -> list[tuple[Decision, int]]:
    """(JobSubmitted, simulated run time in µs) for `count` jobs of the benchmark's mix."""
    shapes = [g for g in (1, 2, 4, 8) if g <= gpus] or [gpus]
    out = []
    for n in range(count):
        job_id = f"job-{n:06d}"
        if rng.random() < 0.05 and nodes >= 2:
            width, per_node = rng.randint(2, min(4, nodes)), gpus
        else:
            width, per_node = 1, rng.choice(shapes)
        data = {
            "jobId": job_id, "workspace": "ws", "experiment": "bench", "name": job_id,
            "cluster": CLUSTER, "owner": "bench", "priority": rng.choice((-500, 0, 500)),
            "nodeCount": width, "gpusPerNode": per_node, "maxWallClockTime": 2 * 3600,
        }  # fmt: skip
        run_us = rng.randint(1, 6) * STEP_US  # ten minutes to an hour
        out.append(((f"job-{job_id}", NewEvent("JobSubmitted", data, "user:bench")), run_us))
    return out


def _check(m: ReadModels, decisions: list[Decision]) -> None:
    """No GPU given twice or while held; no job that fit passed over, except behind the
    reservation of an earlier job that did not fit (or after the job a cycle cut short
    stopped at, which the next cycle looks at)."""
    free = {}
    for node_id in m.clusters[CLUSTER].nodes:
        node = m.nodes[node_id]
        if node.state == READY:
            free[node_id] = set(free_gpus(node))
    width = collections.Counter(len(f) for f in free.values())  # free GPUs -> nodes
    placed = {e.data["jobId"]: e.data["tasks"] for _s, e in decisions if e.type == "JobScheduled"}
    blocked = False
    last = decisions[-1][1].data["jobId"] if cut_short(decisions) else None
    for job in queue.ordered(m, CLUSTER):
        if job.job_id == last:
            last = "looked at"
        elif last == "looked at":
            break
        tasks = placed.get(job.job_id)
        if tasks is None:
            fitting = sum(n for count, n in width.items() if count >= job.gpus_per_node)
            if fitting >= job.node_count and not blocked:
                raise BenchError(f"{job.job_id} fit and was passed over")
            blocked = True
            continue
        if len({t["node"] for t in tasks}) != len(tasks):
            raise BenchError(f"{job.job_id}: two tasks on one node")
        for task in tasks:
            gpus = set(task["gpus"])
            if not gpus <= free[task["node"]]:
                raise BenchError(f"{job.job_id}: GPUs {sorted(gpus)} of {task['node']} not free")
            width[len(free[task["node"]])] -= 1
            free[task["node"]] -= gpus
            width[len(free[task["node"]])] += 1


async def run(url: str, jobs: int, nodes: int, gpus: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    store = await urls.open_store(url)
    try:
        sim = _Sim(store)
        await sim.emit(_world(nodes, gpus))
        submitted = _jobs(jobs, gpus, nodes, rng)
        run_for = {d[1].data["jobId"]: run_us for d, run_us in submitted}
        for start in range(0, len(submitted), 5000):
            await sim.emit([d for d, _ in submitted[start : start + 5000]])
        ends: dict[int, list[str]] = {}
        placed = events = 0
        plan_s = 0.0
        cycle_s: list[float] = []
        while placed < jobs:
            started = time.perf_counter()
            decisions = plan(sim.models, sim.now)
            planned = time.perf_counter()
            _check(sim.models, decisions)  # not timed
            appending = time.perf_counter()
            await sim.emit(decisions)
            plan_s += planned - started
            cycle_s.append(planned - started + time.perf_counter() - appending)
            events += len(decisions)
            for _s, event in decisions:
                if event.type == "JobScheduled":
                    placed += 1
                    end = sim.now + run_for[event.data["jobId"]]
                    ends.setdefault(end - end % STEP_US + STEP_US, []).append(event.data["jobId"])
            if cut_short(decisions):  # the same moment's cycle carries on where it stopped
                continue
            sim.now += STEP_US
            finished = ends.pop(sim.now, [])
            await sim.emit([
                (f"job-{job_id}", NewEvent("JobSucceeded", {
                    "jobId": job_id, "attempt": sim.models.jobs[job_id].attempt, "exitCode": 0,
                }, "agent:bench"))
                for job_id in finished
            ])  # fmt: skip
    finally:
        await store.close()
    spent = sum(cycle_s)
    ordered = sorted(cycle_s)
    return {
        "bench": "schedule", "store": store.backend.name, "jobs": jobs, "nodes": nodes,
        "gpus_per_node": gpus, "cycles": len(cycle_s), "seconds": round(spent, 4),
        "plan_s": round(plan_s, 4), "append_s": round(spent - plan_s, 4), "events": events,
        "placements_per_s": round(jobs / spent, 1) if spent else 0.0,
        "cycle_p50_ms": round(statistics.median(ordered) * 1000, 3),
        "cycle_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "checked": True,
    }  # fmt: skip
