"""What an agent says when a task ends other than by its own doing: stopped because the agent
lost touch with the daemon, or a command the shell could not run."""

from __future__ import annotations

import asyncio
import time

from batchd.scheduler import protocol
from batchd.scheduler.agent import LEASE_TIMEOUT, Agent, Gpus, _exit_error


class StubbornTask:
    """A running task as the agent holds it: it only records being killed."""

    def __init__(self) -> None:
        self.killed = False

    async def kill(self) -> None:
        self.killed = True


async def test_a_lost_lease_stops_the_tasks_and_marks_their_exit_as_the_nodes_doing(tmp_path):
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    running, done = StubbornTask(), StubbornTask()
    done.killed = True  # already being killed (a KillTask): not the lease's doing
    agent.tasks = {("j1", 1, 0): running, ("j2", 1, 0): done}
    agent.last_contact = time.monotonic() - LEASE_TIMEOUT - 1
    agent._check_lease()
    await asyncio.gather(*agent.background)
    assert running.killed and agent.lease_lost == {("j1", 1, 0)}
    error = _exit_error(("j1", 1, 0), 143, {"stdouterr": str(tmp_path)}, lease_lost=True)
    assert error["code"] == protocol.LEASE_EXPIRED and "lost touch" in error["message"]


def test_a_command_the_shell_cannot_run_is_told_in_the_shells_words(tmp_path):
    (tmp_path / "stderr.txt").write_text("starting\n/bin/sh: 1: trian.py: not found\n")
    spec = {"stdouterr": str(tmp_path)}
    error = _exit_error(("j", 1, 0), 127, spec, lease_lost=False)
    assert error == {"code": "cannot_start", "message": "task 0 exited with 127 (command not "
                     "found): /bin/sh: 1: trian.py: not found"}  # fmt: skip
    assert "not executable" in _exit_error(("j", 1, 0), 126, spec, False)["message"]
    assert _exit_error(("j", 1, 0), 1, spec, lease_lost=False) is None  # the job's own code


async def test_commands_from_a_replaced_daemon_are_dropped(tmp_path):
    """Each command carries its leader's epoch; once the agent has heard from a newer leader,
    an older one's commands (still in flight from before a failover) are ignored."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    started = []
    agent._task = lambda command, key: started.append(key)  # what a StartTask would run
    agent._handle({"type": "KillTask", "epoch": 7, "jobId": "j0", "attempt": 1, "task": 0})
    assert agent.epoch == 7
    stale = {"type": "StartTask", "epoch": 6, "jobId": "j1", "attempt": 1, "task": 0}
    agent._handle(stale)
    assert started == [] and agent.tasks == {} and agent.epoch == 7
