"""`batchd bench memory`: how much memory the read models of a large installation take.

Folds a synthetic history straight into the read models (no store): `--nodes` nodes of 8
GPUs in clusters of 100, and `--jobs` jobs with the data of a real submission, each submitted,
placed, prepared, started and ended (the newest tenth still queued or running). Prints the
process's resident set size before and after, and the difference, in MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import uuid

from batchd.events.envelope import RecordedEvent
from batchd.projections import fold
from batchd.projections.model import ReadModels

GPUS = 8
NODES_PER_CLUSTER = 100


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Log:
    def __init__(self, models: ReadModels) -> None:
        self.models = models
        self.position = 0

    def emit(self, type_: str, data: dict, actor: str = "scheduler") -> None:
        self.position += 1
        event = RecordedEvent(
            self.position, uuid.UUID(int=self.position), "bench", 1, type_, 1,
            1_700_000_000_000_000 + self.position * 1000, actor, None, None, data, b"",
        )  # fmt: skip
        fold.apply(self.models, event)


def build(jobs: int, nodes: int) -> ReadModels:
    models = ReadModels()
    log = _Log(models)
    clusters = [f"c-{i}" for i in range(max(1, -(-nodes // NODES_PER_CLUSTER)))]
    for n, cluster in enumerate(clusters):
        spec = {"vmSize": "Standard_ND96isr_H100_v5", "scaleSettings": {"manual": {}}}
        log.emit("ClusterCreated", {"clusterId": cluster, "workspace": "ws", "name": f"gpu{n}",
                                    "spec": spec}, "user:ops")  # fmt: skip
    node_ids = [f"node-{i:05d}" for i in range(nodes)]
    for i, node_id in enumerate(node_ids):
        cluster = clusters[i // NODES_PER_CLUSTER]
        log.emit("NodeProvisioning", {"nodeId": node_id, "cluster": cluster})
        log.emit("NodeRegistered", {"nodeId": node_id, "cluster": cluster, "gpus": GPUS,
                                    "gpuModel": "NVIDIA H100 80GB HBM3", "cpus": 96,
                                    "memoryMb": 1_900_000, "runtimes": ["docker", "process"],
                                    "agentVersion": "0.1.0", "incarnation": 1})  # fmt: skip
        log.emit("NodeSetupSucceeded", {"nodeId": node_id})
    ended = jobs - jobs // 10
    running = 0
    for j in range(jobs):
        job_id = str(uuid.UUID(int=(1 << 100) + j))
        node_index = j % nodes
        cluster = clusters[node_index // NODES_PER_CLUSTER]
        log.emit("JobSubmitted", {
            "jobId": job_id, "workspace": "ws", "experiment": f"exp-{j % 50}",
            "name": f"train-{j}", "cluster": cluster, "owner": "alice", "priority": 0,
            "nodeCount": 1, "gpusPerNode": 1, "maxWallClockTime": 86400,
            "spec": {"customToolkitSettings": {"commandLine": "python train.py"}},
        }, "user:alice")  # fmt: skip
        if j >= ended and j % 2:
            continue  # still queued
        if j < ended:
            node_id, gpu = node_ids[node_index], 0  # ended: its GPU is free again
        else:  # running: each on a GPU of its own
            node_id, gpu = node_ids[running % nodes], running // nodes % GPUS
            running += 1
        tasks = [{"node": node_id, "gpus": [gpu]}]
        log.emit("JobScheduled", {"jobId": job_id, "attempt": 1, "tasks": tasks})
        log.emit("JobPreparing", {"jobId": job_id, "attempt": 1})
        log.emit("JobStarted", {"jobId": job_id, "attempt": 1})
        if j < ended:
            log.emit("JobSucceeded", {"jobId": job_id, "attempt": 1, "exitCode": 0})
    return models


def main(args: argparse.Namespace) -> int:
    gc.collect()
    before = rss_mib()
    models = build(args.jobs, args.nodes)
    gc.collect()
    after = rss_mib()
    result = {
        "bench": "memory", "jobs": len(models.jobs), "nodes": len(models.nodes),
        "events": models.position, "rss_before_mib": round(before, 1),
        "rss_after_mib": round(after, 1), "read_models_mib": round(after - before, 1),
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"bench memory: {result['jobs']:,} jobs on {result['nodes']:,} nodes "
            f"({result['events']:,} events): read models {result['read_models_mib']:.1f} MiB, "
            f"process RSS {result['rss_after_mib']:.1f} MiB"
        )
    return 0
