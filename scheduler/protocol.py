"""The agent channel's messages (DESIGN.md "Nodes"): msgpack maps over HTTP.

Every message carries the protocol version `v`, the node id and the agent's `incarnation`
(new at each agent start, so a restarted agent under the same node id is told apart).
Commands from the daemon carry the leader `epoch`; an agent drops commands of an older epoch
than the newest it has seen. Every message is idempotent: a StartTask for an attempt already
started, or a report already recorded, changes nothing.

Agent to daemon (POST /agent/v1/messages, a list of messages in one body):
  Register {gpus, gpuModel, gpuMemoryMb, cpus, memoryMb, runtimes, agentVersion,
            running: [task keys], address (optional: default, where it connects from),
            engineDown?, scratchUnwritable? (as in Heartbeat)}
  Heartbeat {running: [task keys], engineDown? (why its container engine does not answer:
             the node takes no work until a heartbeat without it), scratchUnwritable? (why
             its own scratch space takes no file, a full disk: the same)}
  TaskPreparing {jobId, attempt, task}: the task's preparation began (an image pull, the
           job's jobPreparation); sent at most once, before TaskStarted
  TaskPrepared {jobId, attempt, task}: a task whose StartTask says `barrier` is prepared and
           waits for ProceedTask; said again every 2 s while it waits
  TaskStarted {jobId, attempt, task}
  TaskExited {jobId, attempt, task, exitCode, error?}
  SetupExited {incarnation's setup: exitCode, error?, tail (the output's last lines)}
  ExecOutput {execId, stdout? | stderr? (text), exitCode? and error? (at the end)}
  FileData {requestId, data (bytes) and size | entries | error}
  Leaving {}: the agent stops (SIGTERM, SIGINT), its tasks killed: the node is lost now and
           its attempts retried, without waiting out its silence
Daemon to agent (GET /agent/v1/commands?node=&incarnation=&wait=S, long-poll):
  StartTask {jobId, attempt, task, gpus, command, env, files, workDir, stdouterr, runtime,
             image?, preparation?, reused? (an earlier job had its name: see files.claim),
             barrier? (a task of a multi-node job: once prepared, it says TaskPrepared and
             starts its command only at ProceedTask), secretNames (the variables of `env`
             whose values the agent writes as *** wherever it quotes the task's output)}
  ProceedTask {jobId, attempt, task}: every task of the attempt is prepared: start
  KillTask {jobId, attempt, task}
  RunSetup {command, env, secretNames, stdouterr, workDir}: the cluster's
             nodeSetup.setupTask, run before the node takes work
  Exec {execId, jobId, attempt, task, command}: run a command beside a running task, in its
        environment (its container, for the docker runtime)
  CancelExec {execId, jobId, attempt, task}: its caller went away: stop that command
  ReadFile {requestId, path, list, offset, size}: a job's output file (or directory) that the
        daemon cannot read itself
  CheckScratch {dirs, message}: the node was last found unable to write its own scratch
        space (before this agent): say so (scratchUnwritable) until a probe writes in `dirs`
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

# the error of a TaskExited for a task the agent stopped because it lost touch with the daemon
# (its lease expired): the daemon retries the attempt as a node failure, not the job's own
LEASE_EXPIRED = "lease_expired"
# the error of a TaskExited for a task whose container engine could not be reached (or stopped
# answering) while it ran: the node's fault as well, not the job's
ENGINE_UNREACHABLE = "engine_unreachable"
# the error of a TaskExited for a task the agent could not run for want of its own scratch
# space (the task's work or temp directory, the record of its processes: a full disk)
NODE_UNWRITABLE = "node_unwritable"
NODE_FAULTS = (LEASE_EXPIRED, ENGINE_UNREACHABLE, NODE_UNWRITABLE)

RUNTIMES = ("process", "docker")  # what a node may offer to run tasks with

# a node's address for the other nodes of a multi-node job: a host name, IPv4 or IPv6 address
ADDRESS = re.compile(r"[A-Za-z0-9_.:%\[\]-]{1,253}")
ADDRESS_RULE = "a host name or IP address (letters, digits and _ . : % [ ] -)"
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
NODE_ID_RULE = "1-200 letters, digits and _ . : - (starting with a letter or digit)"
VERSION = 1
CONTENT_TYPE = "application/msgpack"
AGENT_MESSAGES = ("Register", "Heartbeat", "TaskPreparing", "TaskPrepared", "TaskStarted",
                  "TaskExited", "SetupExited", "ExecOutput", "FileData", "Leaving")  # fmt: skip
TASK_REPORTS = ("TaskPreparing", "TaskStarted", "TaskExited")
COMMANDS = ("StartTask", "ProceedTask", "KillTask", "RunSetup", "Exec", "CancelExec", "ReadFile",
            "CheckScratch")  # fmt: skip

TaskKey = tuple[str, int, int]  # (job id, attempt, task index)


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the sender is told why, with a 400)."""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def pack_list(parts: list[bytes]) -> bytes:
    """A list of messages each already packed (`pack`), as one body."""
    return msgpack.Packer().pack_array_header(len(parts)) + b"".join(parts)


def unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"the body is not msgpack: {exc}") from None


def message(type_: str, node: str, incarnation: int, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "type": type_, "node": node, "incarnation": incarnation, **fields}


def check(msg: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """`msg` if it is a message of a type in `allowed` and of this protocol version."""
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a map")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not {VERSION}")
    if msg.get("type") not in allowed:
        raise ProtocolError(f"unknown message type {msg.get('type')!r}")
    if not isinstance(msg.get("node"), str) or not isinstance(msg.get("incarnation"), int):
        raise ProtocolError("a message needs its node (a string) and incarnation (an integer)")
    if not NODE_ID.fullmatch(msg["node"]):
        raise ProtocolError(f"node id {msg['node'][:80]!r} is not {NODE_ID_RULE}")
    return msg


def task_key(msg: dict[str, Any]) -> TaskKey:
    try:
        key = (str(msg["jobId"]), int(msg["attempt"]), int(msg["task"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"{msg.get('type')} needs jobId, attempt and task") from None
    if key[1] < 1 or key[2] < 0:  # (a negative index would count a job's tasks from its end)
        raise ProtocolError(f"{msg.get('type')}: attempts count from 1 and tasks from 0")
    return key
