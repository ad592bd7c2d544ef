"""An agent's watchdog: it ends the agent's tasks when the agent dies without ending them.

An agent killed outright (SIGKILL, the OOM killer, a crash) cannot stop its tasks, and the
daemon soon gives their attempts to other nodes: left alone, an attempt would run on beside
its retry. So each agent starts a watchdog first thing, in a session of its own (a signal to
the agent's process group does not reach it), and keeps the write end of a pipe that is the
watchdog's standard input. The watchdog waits on it:

- `STOPPED` then end of file: the agent stopped its tasks itself; nothing to do.
- end of file alone: the agent is gone. The watchdog kills what the agent's task slots name
  (reap_leftovers: each task's process group, and what carries its label in any group) and
  removes the node's containers, then exits.

It holds the agent's lock on its work directory (the same open file, inherited), so the
node's next agent starts only once the watchdog has done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog

from batchd.scheduler import logs
from batchd.scheduler.runtimes import WAITED, reap_leftovers

logger = structlog.get_logger(__name__)

STOPPED = b"STOPPED\n"  # the agent's last word when it stopped its tasks itself
LOCK_WAIT = 30.0  # seconds an agent waits for a previous agent of its work directory to end
LOCK_FILE = "agent.lock"


class WorkDirBusy(Exception):
    """Another agent (or its watchdog) holds the work directory."""


def hold_work_dir(work_dir: Path) -> int:
    """Take the agent's lock on `work_dir` (made if missing), waiting up to LOCK_WAIT seconds
    for a previous agent's watchdog to finish; the lock's descriptor. Raises WorkDirBusy
    when another agent still holds it. Blocks: call it off the event loop."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise WorkDirBusy(str(work_dir)) from None
            time.sleep(0.05)


def start(lock: int, running_dir: Path, node_id: str,
          docker_host: str | None) -> tuple[subprocess.Popen, int]:  # fmt: skip
    """Start the agent's watchdog, handing it the work directory's lock; (the process, the
    pipe's write end: write STOPPED to it once the tasks are stopped, and close it). It is
    not one of the event loop's children: it outlives the loop by design."""
    read, write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchd.scheduler.watchdog", "--running-dir",
             str(running_dir), "--node-id", node_id,
             *(("--docker-host", docker_host) if docker_host else ())],
            stdin=read, stdout=subprocess.DEVNULL, pass_fds=(lock,), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    WAITED.add(process.pid)  # the agent's orphan sweep leaves it to Popen to reap
    return process, write


def stopped(write: int) -> None:
    """Tell the watchdog the agent's tasks are stopped (the agent exits next)."""
    with contextlib.suppress(OSError):
        os.write(write, STOPPED)
    with contextlib.suppress(OSError):
        os.close(write)


def _wait_for_agent() -> bool:
    """Read standard input to its end; did the agent say it stopped its tasks?"""
    said = b""
    while chunk := os.read(0, 64):
        said += chunk
    return said == STOPPED


async def _remove_containers(url: str, node_id: str) -> int:
    import aiodocker  # only where the agent ran containers: the watchdog stays small
    import aiohttp

    from batchd.scheduler.containers import remove_node_containers

    docker = aiodocker.Docker(url=url)
    try:
        return await remove_node_containers(docker, node_id)
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        logger.warning("watchdog.containers_left", node=node_id, error=str(exc))
        return 0
    finally:
        await docker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchd-watchdog")
    parser.add_argument("--running-dir", required=True, type=Path)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--docker-host")
    args = parser.parse_args(argv)
    logs.configure(json=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only the agent's end counts
        signal.signal(sig, signal.SIG_IGN)
    if _wait_for_agent():
        return 0
    killed = reap_leftovers(args.running_dir)
    removed = asyncio.run(_remove_containers(args.docker_host, args.node_id)) if (
        args.docker_host) else 0  # fmt: skip
    logger.warning("watchdog.agent_died", node=args.node_id, tasks_killed=killed,
                   containers_removed=removed)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
