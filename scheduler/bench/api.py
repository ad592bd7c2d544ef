"""`batchd bench api`: job submission through the HTTP API of a real daemon.

A `batchd serve` process is started on the embedded default (SQLite in a temporary state
directory, a free port of 127.0.0.1); a workspace, an experiment and a cluster are created.
Then `--clients` concurrent clients (each one HTTP connection, one request at a time) submit
`--jobs` jobs in all with `PUT .../jobs/{name}`. The figure is jobs accepted per second of
wall time, with the latency of each request (p50, p99). Afterwards the daemon is stopped
with SIGTERM and the log is read offline: every accepted job must be in it, exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from batchd.events import urls
from batchd.scheduler.cli import CliError

CLUSTER = {"vmSize": "Standard_NC24s_v3", "scaleSettings": {"manual": {"targetNodeCount": 4}}}
JOB = {
    "cluster": "bench", "nodeCount": 1, "gpusPerNode": 1,
    "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
    "containerSettings": {"imageSourceRegistry": {"image": "pytorch/pytorch:2.3.0"}},
    "customToolkitSettings": {"commandLine": "python train.py --epochs 1"},
    "environmentVariables": [{"name": "SEED", "value": "1"}],
}  # fmt: skip


class BenchError(CliError):
    """The daemon lost or refused what it should not have, or a benchmark cannot run as
    asked (the CLI prints it as an error)."""


async def main(args: argparse.Namespace) -> int:
    result = await run(args.jobs, args.clients)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"bench api: {result['jobs']:,} jobs from {result['clients']} clients in "
            f"{result['seconds']:.2f} s: {result['jobs_per_s']:,.0f} jobs/s, latency p50 "
            f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; all in the log"
        )
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _start(state: Path, port: int, *flags: str) -> asyncio.subprocess.Process:
    """`batchd serve` on `state` and `port` (with `flags`), once it answers /readyz."""
    env = {**os.environ, "BATCHD_STATE_DIR": str(state)}
    env.pop("BATCHD_SECRET_KEYS", None)
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "serve", "--listen", f"127.0.0.1:{port}",
        *flags, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if daemon.returncode is not None:
                raise BenchError(f"the daemon exited with {daemon.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200 and (state / "admin.token").exists():
                        return daemon
            await asyncio.sleep(0.1)
    daemon.kill()
    raise BenchError("the daemon did not become ready within 60 s")


@contextlib.asynccontextmanager
async def daemon_in(state: Path, *flags: str) -> AsyncIterator[tuple[str, str]]:
    """A `batchd serve` process on `state` (with `flags`) while the block runs: its URL and
    admin token. It is stopped with SIGTERM afterwards, as an operator would."""
    port = _free_port()
    daemon = await _start(state, port, *flags)
    try:
        yield f"http://127.0.0.1:{port}", (state / "admin.token").read_text().strip()
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 60)


async def run(jobs: int, clients: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="batchd-bench-api-"))
    try:
        async with daemon_in(state) as (url, token):
            base = f"{url}/v1/workspaces/bench"
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            async with aiohttp.ClientSession(headers=headers) as session:
                for path, body in (("", {}), ("/experiments/bench", {}),
                                   ("/clusters/bench", CLUSTER)):  # fmt: skip
                    async with session.put(base + path, data=json.dumps(body)) as response:
                        if response.status != 201:
                            raise BenchError(f"PUT {path}: {response.status} "
                                             f"{await response.text()}")  # fmt: skip
            accepted, latencies, seconds = await _submit(base, headers, jobs, clients)
        stored = await _submitted_names(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    missing = accepted - stored
    if missing or len(stored) != len(accepted):
        raise BenchError(f"{len(missing)} accepted jobs not in the log, "
                         f"{len(stored) - len(accepted)} extra")  # fmt: skip
    ordered = sorted(latencies)
    return {
        "bench": "api", "store": "sqlite", "jobs": jobs, "clients": clients,
        "seconds": round(seconds, 4), "jobs_per_s": round(jobs / seconds, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "in_log": len(stored),
    }  # fmt: skip


async def _submit(base: str, headers: dict[str, str], jobs: int, clients: int):
    names = iter(range(jobs))
    accepted: set[str] = set()
    latencies: list[float] = []
    body = json.dumps(JOB)

    async def client() -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            for n in names:
                name = f"job-{n:07d}"
                started = time.perf_counter()
                async with session.put(f"{base}/experiments/bench/jobs/{name}",
                                       data=body) as response:  # fmt: skip
                    await response.read()
                    if response.status != 201:
                        raise BenchError(f"job {name}: HTTP {response.status}")
                latencies.append(time.perf_counter() - started)
                accepted.add(name)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return accepted, latencies, time.perf_counter() - started


async def _submitted_names(state: Path) -> set[str]:
    store = await urls.open_store(f"sqlite:///{state / 'events.db'}", readonly=True)
    names: list[str] = []
    try:
        async for page in store.read_pages(0, 5000):
            names.extend(e.data["name"] for e in page if e.type == "JobSubmitted")
    finally:
        await store.close()
    if len(names) != len(set(names)):
        raise BenchError("a job was stored twice")
    return set(names)
