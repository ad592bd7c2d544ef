"""How an agent runs a task: the `process` runtime.

A task runs as `bash -c COMMAND` (`sh -c` on a node without bash) in its own process group
(so KillTask reaches every process it started), with the job's environment and
`CUDA_VISIBLE_DEVICES` set to the GPUs it was given (empty: none). `jobPreparation` runs
first, the same way; if it fails, the task fails with its exit code. What a task leaves
running in its group when it exits is killed. A task without a command (a node an MPI
master reaches) exits 0 at once. stdout and stderr go to `stdout.txt` and `stderr.txt` in
the attempt's stdouterr directory (the preparation's to `stdout-prep.txt`,
`stderr-prep.txt`); see `output_suffix` for the other tasks of a multi-node job. A task of a
multi-node job (`barrier` in its StartTask) waits, once prepared, until the daemon says that
every task of its attempt is (`on_prepared`): none starts its command before all are ready.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import fcntl
import functools
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from batchd.scheduler import files, protocol
from batchd.scheduler.jobspec import TASK_VARIABLE

logger = structlog.get_logger(__name__)

# Commands run in bash, as Batch AI ran them (`source`, `[[ ]]`, arrays), on a node without
# bash in the POSIX shell
SHELL = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a task's process group
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")


KILLED_UNSTARTED = {"code": "killed", "message": "killed before it started"}


@dataclass
class TaskResult:
    exit_code: int | None  # None: it never started
    error: dict[str, str] | None = None


SECRET_EDGE = 4  # a secret's part this long, at the edge of a cut, is masked too


def masked(text: str, spec: dict[str, Any]) -> str:
    """`text` (a task's output, quoted in what the agent reports, which ends up in the event
    log for good) with the values of the task's secret variables (StartTask's and
    RunSetup's `secretNames`) as ***, in the forms a shell shows them too (`_shown`); also a
    secret's end that begins `text`, or its start that ends it, where `text` was cut out of
    a longer output."""
    env = spec.get("env") or {}
    values = {env.get(name) for name in spec.get("secretNames") or ()}
    values = sorted({shown for v in values if isinstance(v, str) and v for shown in _shown(v)},
                    key=len, reverse=True)  # fmt: skip
    for value in values:
        text = text.replace(value, "***")
    for value in values:
        for size in range(len(value) - 1, min(SECRET_EDGE, len(value)) - 1, -1):
            if text.startswith(value[-size:]):
                text = "***" + text[size:]
            if text.endswith(value[:size]):
                text = text[:-size] + "***"
    return text


def _shown(value: str) -> set[str]:
    """A secret's value as a shell may show it: as it is; without surrounding white space
    (`$A` unquoted, a token read from a file with its newline); each of its lines; and each
    of those as `set -x` quotes it (`'it'\\''s'`), as `printf %q` does (`p@ss\\ w\\$rd`) and
    as bash writes control characters (`$'a\\tb'`: the part inside). Derived forms shorter
    than SECRET_EDGE are left out (too common to mask)."""
    forms = {value, value.strip(), *(line.strip() for line in value.splitlines())}
    for form in list(forms):
        forms.add(form.replace("'", "'\\''"))
        forms.add("".join(c if c.isalnum() or c in _UNQUOTED else "\\" + c for c in form))
        if any(map(_control, form)):
            forms.add("".join(_C_ESCAPES.get(c) or (f"\\{ord(c):03o}" if _control(c) else c)
                              for c in form))  # fmt: skip
    return {value} | {f for f in forms if len(f) >= SECRET_EDGE}


def _control(c: str) -> bool:
    return ord(c) < 32 or c == "\x7f"


_UNQUOTED = "_-./:=+@%~"  # what printf %q leaves as it is, besides letters and digits
_C_ESCAPES = {
    "\t": "\\t",
    "\n": "\\n",
    "\r": "\\r",
    "\x1b": "\\E",
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\v": "\\v",
    "\\": "\\\\",
    "'": "\\'",
}


def output_dirs(spec: dict[str, Any]) -> list[str]:
    """The task's output directories, as the daemon listed them (never read from the
    environment, which the job's own variables share)."""
    return [str(p) for p in spec.get("outputs") or () if str(p).startswith("/")]


def job_temp(spec: dict[str, Any]) -> str | None:
    """The task's job-temp directory ($AZ_BATCHAI_JOB_TEMP, as the daemon named it)."""
    return (spec.get("env") or {}).get("AZ_BATCHAI_JOB_TEMP")


def prepare_directories(spec: dict[str, Any]) -> TaskResult | None:
    """Make a task's stdouterr (claimed for its job where its name was reused: files.claim)
    and output directories, which the job chose (`output_unwritable`, the job's fault), then
    its work and job temp directories and files (the MPI host file), the node's own scratch
    space (`node_unwritable`, the node's); a failed TaskResult saying what could not be
    written, or None."""
    try:
        if spec.get("reused"):  # a name an earlier job had: its output may be in the way
            files.claim(Path(spec["stdouterr"]), str(spec.get("jobId", "")))
        for path in (spec["stdouterr"], *output_dirs(spec)):
            Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot write {exc.filename}: {exc.strerror}"
        return TaskResult(None, {"code": "output_unwritable", "message": message})
    try:
        for path in (spec["workDir"], job_temp(spec)):
            if path:
                Path(path).mkdir(parents=True, exist_ok=True)
        for path, content in (spec.get("files") or {}).items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    except OSError as exc:
        message = f"this node cannot write its own {exc.filename}: {exc.strerror}"
        return TaskResult(None, {"code": protocol.NODE_UNWRITABLE, "message": message})
    return None


PROBE = ".batchd-probe"  # (written and removed at once: a disk that takes it has room)


def scratch_dirs(spec: dict[str, Any], running_dir: Path) -> list[Path]:
    """The directories of the node's own scratch space a task writes in: where its work and
    job temp directories are made, and where its processes are recorded."""
    dirs = [Path(path).parent for path in (spec.get("workDir"), job_temp(spec)) if path]
    return [*dirs, running_dir]


def unwritable_dir(dirs: list[Path]) -> str | None:
    """Why one of `dirs` (made where missing) takes no file of 4 KiB now; None if all do."""
    for directory in dirs:
        probe = directory / PROBE
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(os.urandom(4096))  # (zeros could be a hole, or compressed)
                handle.flush()
                os.fsync(handle.fileno())  # (a full disk may take the write and refuse this)
        except OSError as exc:
            return f"this node cannot write its own {exc.filename or probe}: {exc.strerror}"
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    return None


class OutputText:
    """A command's stdout and stderr bytes, as they come, as text for `send(stdout=...)` and
    `send(stderr=...)`: each stream is decoded on its own, so a character split between two
    reads stays whole; bytes that are not UTF-8 become U+FFFD. `flush()` at the end."""

    def __init__(self, send: Callable[..., None]) -> None:
        self.send = send
        self.decoders: dict[str, codecs.IncrementalDecoder] = {}

    def __call__(self, name: str, data: bytes, final: bool = False) -> None:
        decoder = self.decoders.get(name)
        if decoder is None:
            decoder = self.decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data, final)
        if text:
            self.send(**{name: text})

    def flush(self) -> None:
        for name in list(self.decoders):
            self(name, b"", final=True)


def watch_children_with_pidfd() -> None:
    """Have asyncio wait for child processes in the (running) event loop through pidfds.
    Python 3.11's default waits for each one in a thread of its own (a thread started per
    task); 3.12 and later choose pidfds themselves."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel without pidfds
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


async def ready() -> None:
    """The prepared task of a job whose tasks need not wait for each other goes on at once."""


def nothing() -> None:
    """What a task's `on_preparing` does until the agent gives it a use (or after)."""


def _exit_code(returncode: int) -> int:
    """A shell's convention: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class ProcessTask:
    """One task of one attempt, run as a process group."""

    def __init__(self, spec: dict[str, Any], pid_file: Path | None = None) -> None:
        self.spec = spec
        self.process: asyncio.subprocess.Process | None = None
        self.killed = False
        self.began = False  # the command (not the preparation) is running
        self.pid_file = pid_file  # holds the process group while it runs (see reap_leftovers)
        self.execs: set[asyncio.subprocess.Process] = set()  # commands run beside it (exec)
        self.late_kill: asyncio.Future | None = None  # a kill that came while it started
        self.on_preparing: Callable[[], None] = nothing  # called as its preparation begins
        # awaited once it is prepared, where its StartTask says `barrier` (see the docstring)
        self.on_prepared: Callable[[], Awaitable[None]] = ready
        self.proceed = asyncio.Event()  # set by the daemon's ProceedTask, or by a kill

    @property
    def ending(self) -> bool:
        """Is it being stopped, or has its command ended (its execs are killed with it)?"""
        return self.killed or (self.process is not None and self.process.returncode is not None)

    def _env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        env.update({str(k): str(v) for k, v in (self.spec.get("env") or {}).items()})
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.spec.get("gpus") or ())
        env[TASK_VARIABLE] = task_label(self.spec)
        return env

    async def run(self, started: asyncio.Event) -> TaskResult:
        """Prepare, run, and wait; `started` is set once the command is running (or once it
        is clear that it never will)."""
        try:
            return await self._prepare_and_run(started)
        finally:
            started.set()

    async def _prepare_and_run(self, started: asyncio.Event) -> TaskResult:
        out = Path(self.spec["stdouterr"])
        work = Path(self.spec["workDir"])
        unwritable = prepare_directories(self.spec)
        if unwritable is not None:
            return unwritable
        env = self._env()
        preparation = self.spec.get("preparation")
        if preparation:
            self.on_preparing()
            result = await self._run(preparation, env, work, out, output_suffix(self.spec, True))
            if result.exit_code != 0 or self.killed:
                if result.error is None and not self.killed:
                    message = f"jobPreparation exited with {result.exit_code}"
                    result.error = {"code": "job_preparation_failed", "message": message}
                started.set()
                return result
        if self.spec.get("barrier"):
            await self.on_prepared()
            if self.killed:
                started.set()
                return TaskResult(None, KILLED_UNSTARTED)
        if self.spec.get("command") is None:  # a node the master reaches (MPI): nothing here
            started.set()
            return TaskResult(0)
        return await self._run(self.spec["command"], env, work, out, output_suffix(self.spec),
                               started)  # fmt: skip

    async def _run(self, command: str, env: dict[str, str], work: Path, out: Path, suffix: str,
                   started: asyncio.Event | None = None) -> TaskResult:  # fmt: skip
        if self.killed:
            return TaskResult(None, KILLED_UNSTARTED)
        try:
            with open(out / f"stdout{suffix}.txt", "ab") as stdout, \
                    open(out / f"stderr{suffix}.txt", "ab") as stderr:  # fmt: skip
                self.process = await start_child(
                    SHELL, "-c", command, cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdout, stderr=stderr, start_new_session=True,
                )  # fmt: skip
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the command or environment
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            return TaskResult(None, {"code": "cannot_start", "message": f"{message}"})
        finally:
            if started is not None:
                self.began = self.process is not None
                started.set()
        if self.killed:  # killed while it was being started: kill() found no process then
            self.late_kill = asyncio.ensure_future(self.kill())
        if self.pid_file is not None:
            try:
                self.pid_file.write_text(process_mark(self.process.pid, task_label(self.spec)))
            except OSError as exc:  # after an agent crash it would run on beside its retry
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await wait_child(self.process)
                message = (f"this node cannot record the task's processes in {self.pid_file}: "
                           f"{exc.strerror}")  # fmt: skip
                return TaskResult(None, {"code": protocol.NODE_UNWRITABLE, "message": message})
        returncode = await wait_child(self.process)
        if self.killed:  # being stopped: the rest of its group has its SIGTERM grace (kill)
            await _group_ended(self.process.pid, KILL_GRACE)
        with contextlib.suppress(ProcessLookupError):  # what it left running in its group
            os.killpg(self.process.pid, signal.SIGKILL)
        self._kill_execs()
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                self.pid_file.write_text("")  # free: the agent gives the slot to another task
        return TaskResult(_exit_code(returncode))

    async def exec(self, command: str, send) -> int:
        """Run `command` in the task's environment and directory; `send(stdout=...)` and
        `send(stderr=...)` get its output as it comes; its exit code."""
        process = await start_child(
            SHELL, "-c", command, cwd=self.spec["workDir"], env=self._env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.execs.add(process)
        text = OutputText(send)

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            while chunk := await stream.read(1 << 14):
                text(name, chunk)

        try:
            await asyncio.gather(pump(process.stdout, "stdout"), pump(process.stderr, "stderr"))
            text.flush()
            return _exit_code(await wait_child(process))
        except asyncio.CancelledError:  # its caller went away: the command ends with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            self.execs.discard(process)
            WAITED.discard(process.pid)  # also when abandoned: it is nobody's to wait for then

    async def kill(self) -> None:
        """SIGTERM the task's process group; SIGKILL what is left of it after a grace. The
        grace is the whole group's: a program that the task's shell started (and that saves
        a checkpoint on SIGTERM) has it too, though the shell itself ends at once."""
        self.killed = True
        self.proceed.set()  # (a task waiting for the others ends unstarted)
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await _group_ended(process.pid, KILL_GRACE)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # also children that ignored SIGTERM
        self._kill_execs()

    def _kill_execs(self) -> None:
        """Commands run beside the task end with it (each is a process group of its own)."""
        for process in list(self.execs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


PR_SET_CHILD_SUBREAPER = 36  # prctl option (Linux 3.4 and later)
WAITED: set[int] = set()  # the children asyncio waits for (tasks, preparations, setup, exec)


def become_subreaper() -> bool:
    """Make this process the one that inherits its descendants' orphans (instead of init): a
    task's process that leaves its group (setsid, a double fork) then stays findable here.
    False where the system does not allow it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> list[int]:
    """This process's children (of every thread: an orphan may be given to any of them)."""
    found = []
    with contextlib.suppress(OSError):
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/self/task/{thread}/children").read_text()
                found += [int(pid) for pid in text.split()]
    return found


def _environ(pid: int | str) -> list[bytes]:
    """A process's environment as `NAME=value` entries (none: it is gone, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _label(pid: int) -> str | None:
    """The task label in a process's environment (None: none, or it is gone)."""
    prefix = f"{TASK_VARIABLE}=".encode()
    return next((v[len(prefix) :].decode() for v in _environ(pid) if v.startswith(prefix)), None)


def sweep_orphans(ended: Container[str]) -> int:
    """Kill the orphans (this agent's children by inheritance) of tasks that have ended, and
    reap every orphan that has died; how many were killed.

    A child that is not one asyncio waits for (WAITED) is an orphan: what was left in a
    task's group when its leader exited, or what left the group (setsid, a double fork) and
    lost its parent. While a process is being started it is not in WAITED yet, so no dead
    child is reaped then: it could be that one.
    """
    killed = 0
    for pid in _children():
        if pid in WAITED:
            continue
        fields = _stat(pid)
        if fields is None:
            continue
        if fields[0] == "Z":
            if not _starting:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            continue
        if _label(pid) in ended:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def kill_tree(pid: int) -> int:
    """SIGKILL process `pid` (if above 1) and every process below it; how many there were."""
    if pid <= 1:
        return 0
    below: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None:
            below.setdefault(int(fields[1]), []).append(int(entry))
    doomed, killed = [pid], 0
    while doomed:
        current = doomed.pop()
        doomed += below.get(current, [])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(current, signal.SIGKILL)
            killed += 1
    return killed


async def _group_ended(group: int, seconds: float) -> bool:
    """Wait until no process of process group `group` is left, for at most `seconds`; did it
    end? (Those of its processes that became this agent's by inheritance are reaped here
    once dead, as sweep_orphans would: a dead one is in its group until reaped.)"""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a member changed its user: it is still there
            pass
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(GROUP_POLL)
        sweep_orphans(())


GROUP_POLL = 0.05  # seconds between looks at a stopping task's process group


async def start_child(*command: str, **options: Any) -> asyncio.subprocess.Process:
    """Start a child process asyncio waits for (see sweep_orphans); `wait_child` forgets it."""
    global _starting
    _starting += 1
    try:
        process = await asyncio.create_subprocess_exec(*command, **options)
    finally:
        _starting -= 1
    WAITED.add(process.pid)
    return process


async def wait_child(process: asyncio.subprocess.Process) -> int:
    """Wait for a child started by `_start`; its return code."""
    code = await process.wait()
    WAITED.discard(process.pid)
    return code


_starting = 0  # processes being started now


def output_suffix(spec: dict[str, Any], preparation: bool = False) -> str:
    """What a task's stdouterr file names carry after `stdout`/`stderr`: nothing for a job's
    first task (and a node's setup task), `-<k>` for task k of a multi-node job, whose tasks
    may share one stdouterr directory (on shared storage, or nodes on one machine); `-prep`
    first for its jobPreparation's. Task 2's files: `stdout-2.txt`, `stdout-prep-2.txt`."""
    task = spec.get("task") or 0
    return ("-prep" if preparation else "") + (f"-{task}" if task else "")


def task_label(spec: dict[str, Any]) -> str:
    """`<jobId>.<attempt>.<task>`; a node's setup task: `setup.<node>.<agent incarnation>`
    (the agent names it: node ids repeat across installs on one machine)."""
    if spec.get("type") == "RunSetup":
        return f"setup.{spec.get('node')}.{spec.get('incarnation')}"
    return f"{spec.get('jobId')}.{spec.get('attempt')}.{spec.get('task')}"


def process_mark(pid: int, label: str) -> str:
    """What a slot file holds for a running task: its process group, this boot's id, the
    leader's start time and the task's label, so that a later agent never kills a group that
    only reuses the id."""
    return f"{pid} {_boot_id()} {_start_time(pid)} {label}"


@functools.cache
def _boot_id() -> str:
    """This boot's id (a running system's never changes)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "-"


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the name (which may hold spaces): [2] is the process
    group, [19] the start time in clock ticks since boot."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else "-"


def _members(group: int | None, wanted: set[bytes]) -> list[int]:
    """The processes of group `group` (None: of any group) whose environment holds every
    entry of `wanted` (the task's label): a group id another process reused holds none of
    them."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields is None or (group is not None and fields[2] != str(group)):
            continue
        if fields[0] != "Z" and wanted <= set(_environ(entry.name)):
            found.append(int(entry.name))
    return found


def _kill_left(slot: Path, mark: str) -> bool:
    """Kill what a slot's mark names, if it can only be that task's; whether anything was."""
    parts = mark.split()
    older = _older_slot_label(slot) if len(parts) == 1 and parts[0].isdigit() else set()
    if older:
        return _kill_members(int(parts[0]), older)
    if len(parts) != 4 or not parts[0].isdigit():
        if parts:
            logger.warning("agent.leftover_unverified", slot=mark[:200])
        return False
    group, boot, started, label = int(parts[0]), parts[1], parts[2], parts[3]
    if boot != _boot_id():
        return False  # from before a reboot: none of it runs
    killed = False
    if _start_time(group) == started:  # its leader still runs: the whole group is the task's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
            killed = True
    # and, in any group, what carries the task's label (what left the group: setsid, a
    # double fork; its parent, the previous agent, is gone, so nobody else inherited it)
    return _kill_members(None, {f"{TASK_VARIABLE}={label}".encode()}) or killed


def _older_slot_label(slot: Path) -> set[bytes]:
    """What the task of an earlier version's slot (`<jobId>-<attempt>-<task>.pid`, holding
    the bare group id) has in its environment; empty: nothing can be told."""
    job_id, _, rest = slot.stem.rpartition("-")
    job_id, _, attempt = job_id.rpartition("-")
    if not job_id or not attempt.isdigit() or not rest.isdigit():
        return set()
    return {
        f"AZ_BATCHAI_JOB_ID={job_id}".encode(),
        f"AZ_BATCHAI_JOB_ATTEMPT={attempt}".encode(),
        f"AZ_BATCHAI_TASK_INDEX={rest}".encode(),
    }


def _kill_members(group: int | None, wanted: set[bytes]) -> bool:
    killed = False
    for pid in _members(group, wanted) if wanted else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed = True
    return killed


def reap_leftovers(directory: Path) -> int:
    """Kill the process groups a previous agent on this node left running (it died without
    stopping them: its node's attempts are given to others now); how many there were.

    Each `*.pid` file is a slot that holds the mark of a running task's process group, or
    nothing; slots are emptied here and reused (a new file costs far more than a rewritten
    one). A group whose leader still runs is killed whole, and so is every process, in any
    group, that carries the task's label. A mark from an earlier boot kills nothing, nor does
    a group id another process has taken since.
    """
    count = 0
    for pid_file in directory.glob("*.pid") if directory.is_dir() else ():
        with contextlib.suppress(OSError):
            count += _kill_left(pid_file, pid_file.read_text())
        with contextlib.suppress(OSError):
            pid_file.write_text("")
    return count


def _one_node(spec: dict[str, Any]) -> bool:
    """Does the task's job run on one node? (The tasks of a multi-node job on one machine
    share its job-temp directory: see hold_job_temp.)"""
    return "WORLD_SIZE" not in (spec.get("env") or {})


def shares_job_temp(spec: dict[str, Any]) -> bool:
    """Is the task's job-temp directory shared with the job's other tasks on this machine?"""
    return not _one_node(spec) and bool(job_temp(spec))


def hold_job_temp(spec: dict[str, Any]) -> int | None:
    """Take a hold on a multi-node task's job-temp directory for as long as the task runs.

    Every node of a job sees its job temp at the same path (an MPI launcher passes paths in
    it from node to node), so the job's tasks that run on one machine share the directory.
    Each holds a shared lock on `<directory>.lock`; the last one to let go removes the
    directory (release_job_temp). Returns the lock's descriptor, or None when the lock file
    cannot be made (the task's own directory checks then say why). Blocks while another
    holder removes the directory; call it off the event loop.
    """
    lock = f"{job_temp(spec)}.lock"
    fd = None
    try:
        Path(lock).parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _still_named(fd, lock):
                return fd
            os.close(fd)  # its last holder removed it meanwhile: take the new one
            fd = None
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        logger.warning("agent.job_temp_unshared", path=lock, error=str(exc))
        return None


def release_job_temp(spec: dict[str, Any], fd: int) -> None:
    """Let go of a hold_job_temp hold; the task's last holder on this machine removes the
    job-temp directory and its lock file."""
    _let_go(job_temp(spec), fd)


def _let_go(temp: str, fd: int) -> None:
    lock = temp + ".lock"
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)  # let go first: of tasks ending together, one gets it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no other task of the job holds it
        if _still_named(fd, lock):  # not removed by another holder while this one let go
            shutil.rmtree(temp, ignore_errors=True)
            os.unlink(lock)
    except OSError:
        pass  # BlockingIOError: another task of the job still runs here and removes it later
    finally:
        os.close(fd)


def _still_named(fd: int, path: str) -> bool:
    """Is the open file `fd` still the one at `path`?"""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _task_dirs(spec: dict[str, Any]) -> list[str]:
    """What a task's end removes: its work directory, and its job-temp directory when the job
    runs on one node."""
    found = [spec.get("workDir")]
    if _one_node(spec):
        found.append(job_temp(spec))
    return [d for d in found if d]


def remove_work_dir(spec: dict[str, Any]) -> bool:
    """Remove a task's own directories once it has ended, if they hold nothing but what the
    agent wrote (most do); False if they still hold files (see remove_work_tree)."""
    if _one_node(spec):
        for path in spec.get("files") or ():  # the MPI host file, in the job temp
            with contextlib.suppress(OSError):
                os.unlink(path)
    for directory in _task_dirs(spec):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return True


def remove_work_tree(spec: dict[str, Any]) -> None:
    """Remove a task's own directories and what they hold (this may take a while)."""
    for directory in _task_dirs(spec):
        shutil.rmtree(directory, ignore_errors=True)


def record_dirs(record: Path, spec: dict[str, Any]) -> None:
    """Write down, before a task makes them, the directories its end removes, in `record`
    (a file of the agent's own): if the agent dies or stops before the task's end is seen
    to, the next agent of the node removes them (sweep_dirs). Emptied by forget_dirs."""
    shared = job_temp(spec) if shares_job_temp(spec) else None
    try:
        record.write_text(json.dumps({"own": _task_dirs(spec), "shared": shared}))
    except OSError as exc:  # the task runs on: only the cleanup after a crash is lost
        logger.warning("agent.dirs_unrecorded", path=str(record), error=exc.strerror)


def forget_dirs(record: Path) -> None:
    """The task's directories are gone (or are another holder's to remove)."""
    with contextlib.suppress(OSError):
        record.write_text("")


def sweep_dirs(directory: Path) -> int:
    """Remove the directories that tasks of a previous agent of this node left (see
    record_dirs); how many tasks had left some. A multi-node job-temp directory is removed
    only if no task of the job on this machine holds it still (its last holder removes it
    then). Call it once that agent's processes are gone."""
    count = 0
    for record in directory.glob("*.dirs") if directory.is_dir() else ():
        try:
            left = json.loads(record.read_text() or "null")
        except (OSError, ValueError):
            left = None
        if isinstance(left, dict):
            for path in left.get("own") or ():
                shutil.rmtree(str(path), ignore_errors=True)
            if isinstance(left.get("shared"), str):
                _remove_unheld(left["shared"])
            count += 1
        forget_dirs(record)
    return count


def _remove_unheld(temp: str) -> None:
    """Remove a multi-node job-temp directory that no task holds (see hold_job_temp)."""
    try:
        fd = os.open(f"{temp}.lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # no lock file: its last holder removed the directory already
        return
    _let_go(temp, fd)
