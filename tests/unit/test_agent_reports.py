"""What an agent says when a task ends other than by its own doing: stopped because the agent
lost touch with the daemon, or a command the shell could not run."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import subprocess
import sys
import time

import aiohttp
import pytest
import structlog
from aiohttp import web

from batchd.scheduler import agent as agent_module
from batchd.scheduler import logs, protocol, runtimes
from batchd.scheduler.agent import (
    LEASE_TIMEOUT,
    Agent,
    Gpus,
    _cannot_start_error,
)
from batchd.scheduler.runtimes import TaskResult
from tests.http import serving
from tests.logs import info_logs


class StubbornTask:
    """A task as the agent holds it: it runs until it is killed, then exits 143 (SIGTERM)."""

    def __init__(self, index: int, tmp_path) -> None:
        self.killed = False
        self.began = True
        self.spec = {"jobId": f"j{index}", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
                     "workDir": str(tmp_path / f"work-{index}")}  # fmt: skip
        self._stopped = asyncio.Event()

    async def run(self, started: asyncio.Event) -> TaskResult:
        started.set()
        await self._stopped.wait()
        return TaskResult(143)

    async def kill(self) -> None:
        self.killed = True
        self._stopped.set()


async def test_a_lost_lease_stops_the_tasks_and_reports_their_exit_as_the_nodes_doing(tmp_path):
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    running, done = StubbornTask(1, tmp_path), StubbornTask(2, tmp_path)
    done.killed = True  # already being killed (a KillTask): not the lease's doing
    agent.tasks = {("j1", 1, 0): running, ("j2", 1, 0): done}
    ending = asyncio.create_task(agent._run_task(("j1", 1, 0), running, agent._slot()))
    assert (await agent.outbox.get())["type"] == "TaskStarted"
    agent.last_contact = time.monotonic() - LEASE_TIMEOUT - 1
    agent._check_lease()
    await asyncio.gather(*agent.background, ending)
    assert running.killed and ("j2", 1, 0) not in agent.lease_lost
    exited = agent.outbox.get_nowait()
    assert (exited["type"], exited["jobId"], exited["exitCode"]) == ("TaskExited", "j1", 143)
    assert exited["error"]["code"] == protocol.LEASE_EXPIRED
    assert "lost touch" in exited["error"]["message"]


def test_a_command_the_shell_cannot_run_is_told_in_the_shells_words(tmp_path):
    (tmp_path / "stderr.txt").write_text("starting\n/bin/sh: 1: trian.py: not found\n")
    spec = {"stdouterr": str(tmp_path)}
    error = _cannot_start_error(0, 127, spec)
    assert error == {"code": "cannot_start", "message": "task 0 exited with 127 (command not "
                     "found): /bin/sh: 1: trian.py: not found"}  # fmt: skip
    assert "not executable" in _cannot_start_error(0, 126, spec)["message"]
    assert _cannot_start_error(0, 1, spec) is None  # the job's own code
    (tmp_path / "stderr.txt").write_text("giving up: the data set is empty\n")
    assert _cannot_start_error(0, 127, spec) is None  # its own 127
    (tmp_path / "stderr.txt").write_text(
        "/bin/bash: line 1: ./train.sh: No such file or directory\n"
    )
    assert _cannot_start_error(0, 127, spec)["message"].endswith(
        "./train.sh: No such file or directory"
    )
    (tmp_path / "stderr.txt").write_text("cat: data.csv: No such file or directory\n")
    assert _cannot_start_error(0, 127, spec) is None  # a program's words, not the shell's
    (tmp_path / "stderr-1.txt").write_text("/bin/sh: 1: trian.py: not found\n")
    error = _cannot_start_error(1, 127, {**spec, "task": 1})  # task 1 of a multi-node job
    assert error["message"].endswith("trian.py: not found")  # read from its own stderr-1.txt


async def test_commands_from_a_replaced_daemon_are_dropped(tmp_path):
    """Each command carries its leader's epoch; once the agent has heard from a newer leader,
    an older one's commands (still in flight from before a failover) are ignored."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    started = []
    agent._task = lambda command, slot: started.append(protocol.task_key(command))  # would run
    agent._handle({"type": "KillTask", "epoch": 7, "jobId": "j0", "attempt": 1, "task": 0})
    assert agent.epoch == 7
    stale = {"type": "StartTask", "epoch": 6, "jobId": "j1", "attempt": 1, "task": 0}
    agent._handle(stale)
    assert started == [] and agent.tasks == {} and agent.epoch == 7
    agent._handle({**stale, "epoch": 7})  # the current leader's is taken
    assert started == [("j1", 1, 0)]


class CutShort:
    """A task the lease's kill reached before its command ran (during an image pull, say)."""

    def __init__(self, spec: dict) -> None:
        self.spec, self.killed, self.began = spec, True, False

    async def run(self, started: asyncio.Event) -> TaskResult:
        started.set()
        return TaskResult(None, {"code": "killed", "message": "killed before it started"})


async def test_a_task_the_lease_stopped_before_it_started_is_still_the_nodes_doing(tmp_path):
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    key = ("j1", 1, 0)
    spec = {"jobId": "j1", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
            "workDir": str(tmp_path / "w"), "env": {}}  # fmt: skip
    agent.lease_lost.add(key)
    await agent._run_task(key, CutShort(spec), agent._slot())
    [report] = [agent.outbox.get_nowait() for _ in range(agent.outbox.qsize())]
    assert report["type"] == "TaskExited" and report["exitCode"] is None
    assert report["error"]["code"] == protocol.LEASE_EXPIRED and not agent.lease_lost


async def test_a_kill_that_comes_while_the_process_is_being_started_still_stops_it(
    tmp_path, monkeypatch
):
    spec = {"jobId": "j1", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
            "workDir": str(tmp_path / "w"), "env": {}, "command": "exec sleep 600"}  # fmt: skip
    task = runtimes.ProcessTask(spec)
    real_start = runtimes.start_child

    async def start_and_be_killed_meanwhile(*command, **options):
        process = await real_start(*command, **options)
        await task.kill()  # the KillTask (or the lease) arrives before start_child has returned
        return process

    monkeypatch.setattr(runtimes, "start_child", start_and_be_killed_meanwhile)
    result = await asyncio.wait_for(task.run(asyncio.Event()), 30)
    assert result.exit_code == 128 + 15  # SIGTERM: stopped, not left to sleep


def _daemon_refusing(kind: str, status: int, message: str, taken: list[str],
                     hold: asyncio.Event | None = None) -> web.Application:  # fmt: skip
    """A daemon's agent channel that answers `status` to a body holding a message of type
    `kind` and takes the others (their types go to `taken`), once `hold` is set."""

    async def messages(request: web.Request) -> web.Response:
        if hold is not None:
            await hold.wait()
        batch = protocol.unpack(await request.read())
        if any(m["type"] == kind for m in batch):
            return web.json_response({"error": {"message": message}}, status=status)
        taken.extend(m["type"] for m in batch)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/agent/v1/messages", messages)
    return app


async def test_a_refused_report_costs_only_itself_not_the_others_sent_with_it(tmp_path):
    """A daemon refuses a whole list for one message it does not take (a newer agent's
    message type): the agent sends the list again a message at a time."""
    taken: list[str] = []
    app = _daemon_refusing("FromTheFuture", 400, "unknown message type", taken)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        agent = Agent(url, "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
        agent.session = session
        await agent._send_batch([protocol.pack(m) for m in (
            agent._message("TaskStarted", jobId="j", attempt=1, task=0),
            agent._message("FromTheFuture"),
            agent._message("TaskExited", jobId="j", attempt=1, task=0, exitCode=0),
        )])  # fmt: skip
    assert taken == ["TaskStarted", "TaskExited"]


async def test_reports_go_in_bodies_the_daemon_takes_however_many_wait(tmp_path):
    """A flood of exec output beside a task's exit: the reports go in bodies under the
    daemon's limit, none is dropped, and they keep their order."""
    taken, limit = [], 1024 * 1024

    async def messages(request: web.Request) -> web.Response:
        body = await request.read()
        if len(body) > limit:
            return web.json_response({"error": {"message": "too large"}}, status=413)
        taken.extend(m.get("stdout", m["type"]) for m in protocol.unpack(body))
        return web.json_response({})

    app = web.Application(client_max_size=4 * limit)
    app.router.add_post("/agent/v1/messages", messages)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        agent = Agent(url, "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
        agent.session = session
        chunks = [f"{n:05d}" + "a" * 16_000 for n in range(200)]  # 3.2 MB of output
        for chunk in chunks[:100]:
            agent.outbox.put_nowait(agent._message("ExecOutput", execId="x", stdout=chunk))
        agent.outbox.put_nowait(agent._message("TaskExited", jobId="j", attempt=1, task=0,
                                               exitCode=5))  # fmt: skip
        for chunk in chunks[100:]:
            agent.outbox.put_nowait(agent._message("ExecOutput", execId="x", stdout=chunk))
        sending = asyncio.create_task(agent._send())
        await asyncio.wait_for(_drained(agent, taken, 201), 30)
        sending.cancel()
    assert taken == [*chunks[:100], "TaskExited", *chunks[100:]]


async def _drained(agent: Agent, taken: list, count: int) -> None:
    while len(taken) < count:
        await asyncio.sleep(0.01)


async def test_an_agent_the_daemon_no_longer_has_stops_and_says_why(tmp_path):
    async def messages(request: web.Request) -> web.Response:
        reason = "node n1 is not registered: it was removed (its cluster shrank or was deleted)"
        return web.json_response({"error": {"code": "Conflict", "message": reason}}, status=409)

    app = web.Application()
    app.router.add_post("/agent/v1/messages", messages)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        agent = Agent(url, "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
        agent.session, agent.stop = session, asyncio.Event()
        with info_logs() as logged:
            await agent._send_batch([protocol.pack(agent._message("Heartbeat", running=[]))])
    assert agent.superseded and agent.stop.is_set()
    [said] = [line for line in logged if line["event"] == "agent.superseded"]
    assert "it was removed" in said["reason"]


async def test_an_ended_task_is_listed_until_its_report_is_sent_and_a_fault_costs_one(tmp_path):
    """Heartbeats list an ended task until its TaskExited is sent (the daemon would otherwise
    take it as vanished); a daemon fault (500) on one message loses only that one."""
    taken: list[str] = []
    hold = asyncio.Event()
    app = _daemon_refusing("Faulty", 500, "the request failed", taken, hold)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        agent = Agent(url, "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
        agent.session = session
        agent.outbox.put_nowait(agent._message("Faulty"))
        agent._report_exit(("j", 1, 0), 0)
        assert agent._running() == [["j", 1, 0]]  # ended, its report on the way
        sending = asyncio.create_task(agent._send())
        hold.set()
        await asyncio.wait_for(_drained(agent, taken, 1), 10)
        for _ in range(100):
            if not agent.unreported:
                break
            await asyncio.sleep(0.01)
        sending.cancel()
    assert taken == ["TaskExited"] and agent._running() == []


async def test_a_task_its_watchdog_killed_while_the_agent_was_frozen_is_the_nodes_failure(
    tmp_path,
):
    """Frozen past the watchdog's wait, the agent finds its task killed (137) when it thaws:
    that is reported as the node's doing (lease), never as the job's own exit code."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    task = StubbornTask(1, tmp_path)
    agent.tasks = {("j1", 1, 0): task}
    ending = asyncio.create_task(agent._run_task(("j1", 1, 0), task, agent._slot()))
    assert (await agent.outbox.get())["type"] == "TaskStarted"
    agent.ticked = time.monotonic() - LEASE_TIMEOUT - 1  # its loop did not turn meanwhile
    await task.kill()  # (as the watchdog's SIGKILL: the task ends with a signal)
    await ending
    exited = agent.outbox.get_nowait()
    assert exited["type"] == "TaskExited" and exited["error"]["code"] == protocol.LEASE_EXPIRED


async def test_an_exec_that_cannot_run_is_answered_with_why(tmp_path):
    """Whatever stops an exec from starting, the daemon (and the user's CLI, waiting on it)
    hears so at once, rather than waiting until the task ends."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    task = runtimes.ProcessTask({"jobId": "j1", "attempt": 1, "task": 0, "workDir": str(tmp_path),
                                 "stdouterr": str(tmp_path)})  # fmt: skip
    agent.tasks = {("j1", 1, 0): task}
    exec_id = "e1"
    await agent._exec({"execId": exec_id, "jobId": "j1", "attempt": 1, "task": 0,
                       "command": "a\x00b"})  # fmt: skip
    answer = agent.outbox.get_nowait()
    assert (answer["type"], answer["execId"], answer["exitCode"]) == ("ExecOutput", "e1", None)
    assert answer["error"]["code"] == "exec_failed" and "null" in answer["error"]["message"]
    task.spec["workDir"] = str(tmp_path / "gone")  # (removed under the task)
    await agent._exec({"execId": "e2", "jobId": "j1", "attempt": 1, "task": 0,
                       "command": "true"})  # fmt: skip
    said = agent.outbox.get_nowait()["error"]["message"]
    assert said == f"cannot run it in {tmp_path / 'gone'}: No such file or directory"


@pytest.mark.parametrize(
    ("fails", "command", "said"),
    [("record_dirs", "true", []), ("_cannot_start_error", "exit 3", ["TaskStarted"])],
    ids=["before-it-runs", "after-it-ran-before-its-report"],
)
async def test_a_fault_of_the_agents_own_around_a_task_is_reported_as_its_end(
    tmp_path, monkeypatch, fails, command, said
):
    """Whatever fails while the agent sets a task up or tells its end, the end is reported
    (and its heartbeats list it no more): the daemon does not wait for it for ever, its GPUs
    held. Its slot is free again."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)

    def broken(*_args):
        raise RuntimeError("a fault of the agent's own")

    monkeypatch.setattr(agent_module, fails, broken)
    key = ("j1", 1, 0)
    spec = {"jobId": "j1", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
            "workDir": str(tmp_path / "w"), "env": {}, "command": command}  # fmt: skip
    task = runtimes.ProcessTask(spec)
    agent.tasks[key] = task
    await agent._run_task(key, task, agent._slot())
    reports = [agent.outbox.get_nowait() for _ in range(agent.outbox.qsize())]
    assert [r["type"] for r in reports] == [*said, "TaskExited"]
    assert reports[-1]["exitCode"] is None and reports[-1]["error"]["code"] == "runtime_error"
    assert "a fault of the agent's own" in reports[-1]["error"]["message"]
    assert agent._running() == [list(key)]  # listed until the report is sent
    agent.unreported.discard(key)  # (what sending it does)
    assert agent._running() == [] and agent.free_slots


class FullDisk(io.TextIOBase):
    """A log file on a full disk: every write fails."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_an_agent_whose_log_is_on_a_full_disk_still_runs_and_reports_its_tasks(
    tmp_path, monkeypatch
):
    """A local agent logs to a file in the state directory, which its jobs fill too: a log
    line that cannot be written must not stop the task it is about."""
    config, handlers = structlog.get_config(), logging.getLogger().handlers
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    key = ("j1", 1, 0)
    spec = {"jobId": "j1", "attempt": 1, "task": 0, "stdouterr": str(tmp_path),
            "workDir": str(tmp_path / "w"), "env": {}, "command": "exit 3"}  # fmt: skip
    task = runtimes.ProcessTask(spec)
    agent.tasks[key] = task
    slot = tmp_path / "gone" / "slot-1.pid"  # its record cannot be written: a warning is logged
    try:
        logs.configure(json=True)
        monkeypatch.setattr(sys, "stderr", FullDisk())
        await asyncio.wait_for(agent._run_task(key, task, slot), 30)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers = handlers
    reports = [agent.outbox.get_nowait() for _ in range(agent.outbox.qsize())]
    assert [r["type"] for r in reports] == ["TaskStarted", "TaskExited"]
    assert reports[-1]["exitCode"] == 3 and key not in agent.tasks


async def test_an_agent_one_of_whose_loops_fails_stops_to_be_started_again(tmp_path):
    """A fault of the agent's own in one of its loops (here: the one that sends the daemon
    its reports) stops the agent, exiting 1, instead of leaving it up half deaf: beating,
    but never reporting what its tasks did (their jobs would wait for ever). A command
    whose handling fails costs only that command: the next one is handled."""
    taken: list[str] = []
    app = _daemon_refusing("Nothing", 400, "", taken)
    sent = [[{"type": "StartTask", "epoch": 1, "jobId": "bad"}],
            [{"type": "StartTask", "epoch": 1, "jobId": "good"}]]  # fmt: skip

    async def commands(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        body = sent.pop(0) if sent else []
        return web.Response(body=protocol.pack(body), content_type=protocol.CONTENT_TYPE)

    app.router.add_get("/agent/v1/commands", commands)
    async with serving(app) as url:
        agent = Agent(url, "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
        handled, reporting = [], asyncio.Event()

        def handle(command):
            if command["jobId"] == "bad":
                raise RuntimeError("a fault of the agent's own, for this command")
            handled.append(command["jobId"])
            reporting.set()

        async def broken_reports():
            await reporting.wait()  # (after the commands above)
            raise RuntimeError("a fault of the agent's own, in its reports")

        agent._handle, agent._send = handle, broken_reports
        with info_logs() as logs:
            await asyncio.wait_for(agent.run(asyncio.Event()), 30)
    assert handled == ["good"]
    assert agent.failed and taken[0] == "Register" and taken[-1] == "Leaving"
    [command] = [line for line in logs if line["event"] == "agent.command_failed"]
    assert command["command"] == "StartTask" and command["log_level"] == "error"
    [failed] = [line for line in logs if line["event"] == "agent.loop_failed"]
    assert failed["loop"] == "reports" and failed["log_level"] == "error"


async def test_a_loop_that_fails_as_the_agent_is_told_to_stop_still_fails_the_agent(tmp_path):
    """A fault is a fault even when a stop comes with it: the agent exits 1 and says which
    loop failed, rather than exit 0 as if it had only been stopped."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)
    stop = asyncio.Event()

    async def failing():
        stop.set()
        raise RuntimeError("a fault of the agent's own")

    loops = [asyncio.create_task(failing(), name="reports"),
             asyncio.create_task(asyncio.Event().wait(), name="commands")]  # fmt: skip
    with info_logs() as logs:
        await agent._until_stopped(stop, loops)
    loops[1].cancel()
    assert agent.failed
    assert [line["loop"] for line in logs if line["event"] == "agent.loop_failed"] == ["reports"]


@pytest.mark.parametrize("broken", ["_watch_lease", "_register"])
async def test_a_fault_while_the_agent_registers_stops_it(tmp_path, broken):
    """While an agent waits to register (its daemon away), its lease watch failing stops it
    at once, exiting 1, rather than only once the daemon answers; a fault in registration
    itself stops it too, rather than send it to work unregistered."""
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)

    async def fault():
        raise RuntimeError("a fault of the agent's own")

    setattr(agent, broken, fault)
    with info_logs() as logs:
        await asyncio.wait_for(agent.run(asyncio.Event()), 30)
    assert agent.failed and not agent.registered
    failed = [line["loop"] for line in logs if line["event"] == "agent.loop_failed"]
    assert failed == [{"_watch_lease": "lease", "_register": "register"}[broken]]


def test_a_start_command_that_fails_gives_its_slot_back(tmp_path):
    agent = Agent("http://127.0.0.1:1", "t", "n1", "ws/c", Gpus(0), ["process"], tmp_path)

    def broken(command, slot):
        raise RuntimeError("a fault of the agent's own")

    agent._task = broken
    command = {"type": "StartTask", "epoch": 1, "jobId": "j1", "attempt": 1, "task": 0}
    with pytest.raises(RuntimeError):
        agent._handle(command)
    assert agent.free_slots and not agent.tasks  # the next task takes the same slot


def test_secret_values_in_quoted_output_are_masked_also_where_it_was_cut():
    """What an agent quotes of a task's output (a tail, a last line) ends up in the log for
    good: a secret's value there is ***, and so is a part of one that a cut left at an edge."""
    masked = runtimes.masked
    spec = {"env": {"KEY": "0123456789abcdef", "SHORT": "xy", "PLAIN": "seen"},
            "secretNames": ["KEY", "SHORT"]}  # fmt: skip
    assert masked("using 0123456789abcdef and xy, seen", spec) == "using *** and ***, seen"
    assert masked("9abcdef: not found", spec) == "***: not found"  # its end, the cut before
    assert masked("connecting with 01234567", spec) == "connecting with ***"  # its start
    assert masked("version 01", spec) == "version 01"  # parts under 4 are too common to mask
    assert masked("nothing secret", {"env": {"KEY": "x"}}) == "nothing secret"


async def test_a_node_short_of_its_own_scratch_space_fails_the_task_as_a_node_fault(tmp_path):
    """The work or temp directory, or the record of a task's processes, that the agent
    cannot write is the node's fault (a full disk), retried as such, not the job's; a task
    whose processes cannot be recorded does not run (after an agent crash it could not be
    found again, and would run on beside its retry)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    spec = {"stdouterr": str(tmp_path / "out"), "workDir": str(blocker / "work"),
            "command": "sleep 30", "jobId": "j", "attempt": 1, "task": 0}  # fmt: skip
    result = runtimes.prepare_directories(spec)
    assert result.error["code"] == protocol.NODE_UNWRITABLE and "work" in result.error["message"]
    assert protocol.NODE_UNWRITABLE in protocol.NODE_FAULTS
    unwritable_output = {**spec, "stdouterr": str(blocker / "out")}
    assert runtimes.prepare_directories(unwritable_output).error["code"] == "output_unwritable"
    task = runtimes.ProcessTask({**spec, "workDir": str(tmp_path / "work")},
                                pid_file=blocker / "slot.pid")  # fmt: skip
    result = await asyncio.wait_for(task.run(asyncio.Event()), 10)  # not run for its 30 s
    assert (
        result.error["code"] == protocol.NODE_UNWRITABLE and "slot.pid" in result.error["message"]
    )


def test_a_tail_cut_inside_a_character_still_masks_the_secret_after_it(tmp_path):
    secret = "pässwörd-geheim-42"
    out = tmp_path / "stderr.txt"
    out.write_bytes(b"x" * 50 + f"{secret} failed\n".encode())
    spec = {"env": {"PW": secret}, "secretNames": ["PW"]}
    cut = len("ässwörd-geheim-42 failed\n".encode()) - 1  # inside the "ä"
    tail = runtimes.masked(agent_module._tail(out, cut), spec)
    assert tail == "*** failed\n"


@pytest.mark.parametrize(
    ("value", "command"),
    [("Zq9TRAILNL\n", "$A"), ("  Zq9SPACED  ", "$A --x"), ("Zq9LINE1\nZq9LINE2", "$A"),
     ("Zq9\tTAB2", '"$A"'), ("Zq9\x01ctl", '"$A"')],
)  # fmt: skip
def test_a_secret_is_masked_in_the_forms_the_shell_shows_it(value, command):
    """Its newline, the blanks around it, its other lines left out, or control characters
    written as bash writes them ($'a\\tb'): the shell's message still shows no part of it."""
    said = subprocess.run(["bash", "-c", command], env={"A": value, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True).stderr.strip()  # fmt: skip
    shown = runtimes.masked(said, {"env": {"A": value}, "secretNames": ["A"]})
    assert "Zq9" not in shown and "***" in shown and "command not found" in shown


@pytest.mark.parametrize("value", ["it's-a-Secret9", "p@ss w$rd!Zq9", "pa\tss'Zq9"])
@pytest.mark.parametrize("command", ['set -x; : "$A"', "printf '%q\\n' \"$A\" >&2"])
def test_a_secret_is_masked_as_set_x_and_printf_q_quote_it(value, command):
    said = subprocess.run(["bash", "-c", command], env={"A": value, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True).stderr.strip()  # fmt: skip
    shown = runtimes.masked(said, {"env": {"A": value}, "secretNames": ["A"]})
    assert "***" in shown and not any(part in shown for part in ("Secret9", "Zq9", "ss"))
