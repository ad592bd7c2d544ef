"""An agent's watchdog: it ends the agent's tasks when the agent dies without ending them.

An agent killed outright (SIGKILL, the OOM killer, a crash) cannot stop its tasks, and the
daemon soon gives their attempts to other nodes: left alone, an attempt would run on beside
its retry. So each agent starts a watchdog first thing, in a session of its own (a signal to
the agent's process group does not reach it), and keeps the write end of a pipe that is the
watchdog's standard input. The watchdog waits on it:

- `STOPPED` then end of file: the agent stopped its tasks itself; nothing to do. (An agent
  that gave up a kill, its engine not answering, or could not remove a container, ends
  without it: what it left is the watchdog's to end, as below.)
- end of file alone: the agent is gone. The watchdog kills what the agent's task slots name
  (reap_leftovers: each task's process group, and what carries its label in any group) and
  removes the node's containers, then exits.
- silence: the agent's loop writes a beat (BEAT) every second. An agent that stops beating
  for its lease (frozen by SIGSTOP, or its loop hung) sends no heartbeats and stops nothing
  when its lease runs out, so the daemon gives its attempts to other nodes: the watchdog
  ends its tasks as above, once per silence, and goes on watching (a thawed agent finds its
  tasks gone, and its daemon has moved on).

It holds the agent's lock on its work directory (the same open file, inherited), so the
node's next agent starts only once the watchdog has done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from batchd.scheduler import logs
from batchd.scheduler.runtimes import WAITED, reap_leftovers

logger = structlog.get_logger(__name__)

STOPPED = b"STOPPED\n"  # the agent's last word when it stopped its tasks itself
BEAT = b"."  # the agent's loop runs
# seconds without a beat that end the tasks; also the agent's lease (agent.LEASE_TIMEOUT),
# shorter than the daemon's node timeout (10 s)
SILENCE = 8.0
LOCK_WAIT = 30.0  # seconds an agent waits for a previous agent of its work directory to end
# seconds the removal of an agent's containers may take (an engine that hangs is not waited
# for: the node's next agent, waiting for the lock, removes them as it starts)
SWEEP_WAIT = 15.0
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


def released(work_dir: Path) -> bool:
    """Does no agent or watchdog hold the lock on `work_dir` now (an agent that has died
    has its tasks ended then)? Does not wait."""
    try:
        fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (let go as the descriptor closes)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def start(lock: int, running_dir: Path, node_id: str, docker_host: str | None,
          work_dir: str) -> tuple[subprocess.Popen, int]:  # fmt: skip
    """Start the agent's watchdog, handing it the work directory's lock; (the process, the
    pipe's write end: write STOPPED to it once the tasks are stopped, and close it);
    `work_dir` tells the node's containers (containers.agent_dir) from another
    installation's node of the same id. It is
    not one of the event loop's children: it outlives the loop by design."""
    read, write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchd.scheduler.watchdog", "--running-dir",
             str(running_dir), "--node-id", node_id, "--work-dir", work_dir,
             *(("--docker-host", docker_host) if docker_host else ())],
            stdin=read, stdout=subprocess.DEVNULL, pass_fds=(lock,), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    os.set_blocking(write, False)  # a beat never blocks the agent's loop
    WAITED.add(process.pid)  # the agent's orphan sweep leaves it to Popen to reap
    return process, write


def beat(write: int) -> None:
    """Tell the watchdog the agent's loop runs (called every second)."""
    with contextlib.suppress(OSError):  # a full pipe, or a watchdog gone (the agent says so)
        os.write(write, BEAT)


def stopped(write: int) -> None:
    """Tell the watchdog the agent's tasks are stopped (the agent exits next)."""
    with contextlib.suppress(OSError):
        os.write(write, STOPPED)
    with contextlib.suppress(OSError):
        os.close(write)


def _watch_agent(silent: Callable[[], None]) -> bool:
    """Read standard input to its end, calling `silent` once per silence of SILENCE seconds;
    did the agent say it stopped its tasks?"""
    tail, heard, told = b"", time.monotonic(), False
    while True:
        readable, _, _ = select.select([0], [], [], 1.0)
        if readable:
            chunk = os.read(0, 4096)
            if not chunk:
                return tail == STOPPED
            tail = (tail + chunk)[-len(STOPPED) :]
            heard, told = time.monotonic(), False
        elif not told and time.monotonic() - heard > SILENCE:
            told = True
            silent()


async def _remove_containers(url: str, node_id: str, work_dir: str) -> int:
    import aiodocker  # only where the agent ran containers: the watchdog stays small
    import aiohttp

    from batchd.scheduler.containers import remove_node_containers

    docker = aiodocker.Docker(url=url)
    try:  # bounded: it holds the work directory's lock, which the node's next agent awaits
        return await asyncio.wait_for(remove_node_containers(docker, node_id, work_dir),
                                      SWEEP_WAIT)  # fmt: skip
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:  # (TimeoutError too)
        logger.warning("watchdog.containers_left", node=node_id, error=str(exc))
        return 0
    finally:
        await docker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchd-watchdog")
    parser.add_argument("--running-dir", required=True, type=Path)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--work-dir", required=True)  # the agent's (containers.agent_dir)
    parser.add_argument("--docker-host")
    args = parser.parse_args(argv)
    logs.configure(json=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only the agent's end counts
        signal.signal(sig, signal.SIG_IGN)
    if not _watch_agent(lambda: _end_tasks(args, "watchdog.agent_unresponsive")):
        _end_tasks(args, "watchdog.agent_died")
    return 0


def _end_tasks(args: argparse.Namespace, event: str) -> None:
    """Kill the agent's tasks and remove its node's containers; log `event`."""
    killed = reap_leftovers(args.running_dir)
    removed = asyncio.run(_remove_containers(args.docker_host, args.node_id, args.work_dir)) if (
        args.docker_host) else 0  # fmt: skip
    logger.warning(event, node=args.node_id, tasks_killed=killed, containers_removed=removed)


if __name__ == "__main__":
    sys.exit(main())
