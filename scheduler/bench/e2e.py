"""`batchd bench e2e`: trivial jobs through a real daemon and real agents until all succeed.

A `batchd serve` process runs with a local cluster of `--nodes` agents of `--gpus-per-node`
simulated GPUs each, on the process runtime, or with `--runtime docker` on the docker runtime
too, whose jobs run in containers of `--image` (it must be in the engine at `--docker-host`
already; nothing is pulled). `--jobs` one-GPU jobs running `true` are
submitted through the API in a closed loop that keeps at most nodes x GPUs of them queued or
running, so latency measures scheduling and dispatch, not waiting for capacity; the daemon's
event stream says when each ends. `jobs_per_s` is the jobs over the time from the first
submission to the last success; submit-to-start is each job's JobStarted minus its
JobSubmitted, read from the log afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from batchd.events import urls
from batchd.scheduler.bench.api import BenchError, daemon_in

EXPERIMENT = "/v1/workspaces/default/experiments/default"


async def main(args: argparse.Namespace) -> int:
    image = None
    if args.runtime == "docker":
        await _check_engine(args.docker_host, args.image)
        image = args.image
    result = await run(args.jobs, args.nodes, args.gpus_per_node, image, args.docker_host)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"bench e2e: {result['jobs']:,} jobs on {result['nodes']} nodes x "
            f"{result['gpus_per_node']} GPUs in {result['seconds']:.2f} s: "
            f"{result['jobs_per_s']:,.0f} jobs/s, submit to start p50 "
            f"{result['submit_to_start_p50_ms']:.1f} ms, p99 "
            f"{result['submit_to_start_p99_ms']:.1f} ms"
        )
    return 0


async def _check_engine(url: str, image: str) -> None:
    """BenchError unless the engine at `url` answers and holds `image` (nothing is pulled)."""
    try:
        async with aiodocker.Docker(url=url) as docker:
            await docker.images.inspect(image)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError) as exc:
        raise BenchError(f"--runtime docker needs the container engine at {url} (--docker-host)"
                         f" holding the image {image} (--image): {exc}") from None  # fmt: skip


async def run(jobs: int, nodes: int, gpus: int, image: str | None = None,
              docker_host: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`image`: run the jobs in containers of it (the docker runtime, on `docker_host`)."""
    state = Path(tempfile.mkdtemp(prefix="batchd-bench-e2e-"))
    config = state / "batchd.toml"
    text = f"[local]\nnodes = {nodes}\ngpus_per_node = {gpus}\n"
    if image is not None:
        text += f'runtimes = "docker,process"\ndocker_host = {json.dumps(docker_host)}\n'
    config.write_text(text)
    try:
        async with daemon_in(state, "--config", str(config)) as (url, token):
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            async with aiohttp.ClientSession(headers=headers) as session:
                await _nodes_ready(session, url, nodes)
                seconds = await _closed_loop(session, url, jobs, nodes * gpus, image)
        waits = await _submit_to_start(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if len(waits) != jobs:
        raise BenchError(f"{len(waits)} of {jobs} jobs started")
    ordered = sorted(waits)
    return {
        "bench": "e2e", "runtime": "process" if image is None else "docker", "jobs": jobs,
        "nodes": nodes,
        "gpus_per_node": gpus, "seconds": round(seconds, 4),
        "jobs_per_s": round(jobs / seconds, 1),
        "submit_to_start_p50_ms": round(statistics.median(ordered) / 1000, 3),
        "submit_to_start_p99_ms": round(ordered[min(len(ordered) - 1,
                                                    int(len(ordered) * 0.99))] / 1000, 3),
    }  # fmt: skip


async def _nodes_ready(session: aiohttp.ClientSession, url: str, nodes: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with session.get(f"{url}/v1/nodes?cluster=default/local") as response:
            listed = await response.json() if response.status == 200 else {"value": []}
        if sum(n["properties"]["state"] == "ready" for n in listed["value"]) >= nodes:
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"{nodes} nodes did not become ready within 60 s")


async def _closed_loop(session: aiohttp.ClientSession, url: str, jobs: int, window: int,
                       image: str | None) -> float:  # fmt: skip
    """Submit `jobs` jobs, at most `window` unfinished at a time; seconds until all succeeded."""
    free = asyncio.Semaphore(window)
    done = asyncio.Event()
    finished = 0
    head = (await (await session.get(f"{url}/readyz")).json())["position"]
    job: dict[str, Any] = {"cluster": "local", "nodeCount": 1, "gpusPerNode": 1,
                           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/bench",
                           "customToolkitSettings": {"commandLine": "true"}}  # fmt: skip
    if image is not None:
        job["containerSettings"] = {"imageSourceRegistry": {"image": image}}
    body = json.dumps(job)

    async def watch() -> None:
        nonlocal finished
        stream = f"{url}/v1/events/stream?after={head}&type=JobSucceeded,JobFailed"
        tail = b""  # the end of the previous chunk, where a line may have been cut
        async with session.get(stream, timeout=aiohttp.ClientTimeout(total=None)) as response:
            async for chunk in response.content.iter_any():  # the events a write carried
                text = tail + chunk
                cut = text.rfind(b"\n") + 1
                lines, tail = b"\n" + text[:cut], text[cut:]  # each line after a newline
                if b"\nevent: JobFailed\n" in lines:
                    raise BenchError("a job failed")
                ended = lines.count(b"\nevent: JobSucceeded\n")
                for _ in range(ended):
                    free.release()
                finished += ended
                if finished >= jobs:
                    done.set()
                    return

    async def submit() -> None:
        for n in range(jobs):
            await free.acquire()
            async with session.put(f"{url}{EXPERIMENT}/jobs/e2e-{n:07d}", data=body) as answer:
                if answer.status != 201:
                    raise BenchError(f"job {n}: HTTP {answer.status} {await answer.text()}")
        await done.wait()

    started = time.perf_counter()
    watcher, submitter = asyncio.create_task(watch()), asyncio.create_task(submit())
    try:  # whichever ends first: all done, or a failure (a failed job ends the watcher)
        await asyncio.wait({watcher, submitter}, return_when=asyncio.FIRST_COMPLETED)
        for task in (watcher, submitter):
            if task.done() and task.exception():
                raise task.exception()
        if not done.is_set():
            raise BenchError("the daemon's event stream ended early")
    finally:
        watcher.cancel()
        submitter.cancel()
    return time.perf_counter() - started


async def _submit_to_start(state: Path) -> list[int]:
    """Microseconds from each job's JobSubmitted to its (first) JobStarted."""
    store = await urls.open_store(f"sqlite:///{state / 'events.db'}", readonly=True)
    submitted: dict[str, int] = {}
    waits: dict[str, int] = {}
    try:
        async for page in store.read_pages(0, 5000):
            for e in page:
                if e.type == "JobSubmitted":
                    submitted[e.data["jobId"]] = e.recorded_at
                elif e.type == "JobStarted" and e.data["jobId"] not in waits:
                    waits[e.data["jobId"]] = e.recorded_at - submitted[e.data["jobId"]]
    finally:
        await store.close()
    return list(waits.values())
