"""Toolkit translation: a job's toolkit settings become what each node runs, with the
environment Batch AI gave it.

`translate(properties, job, hosts, paths)` returns one `TaskPlan` per node (task index order),
each with its shell command (None: the node only hosts MPI ranks or waits on the master), its
environment and the files to write first (the MPI host file). The agent runs the command with
`bash -c` in that environment; `$AZ_BATCHAI_*` references in the user's command lines are left
for the shell, while paths batchd builds are written out in full.

Per toolkit (`processCount` defaults to `nodeCount`):

- `customToolkitSettings`: `commandLine` on the master node (task 0).
- `customMpiSettings`: `mpirun` on the master, `processCount` ranks over the host file.
- `horovodSettings`, `chainerSettings`, `cntkSettings` and `caffeSettings`: the script (or, for
  CNTK BrainScript and Caffe, `cntk configFile=...` / `caffe train --solver=...`) run directly
  when it is one process on one node, else under `mpirun` on the master.
- `pyTorchSettings`: the script on every node with `AZ_BATCHAI_PYTORCH_INIT_METHOD`
  (`tcp://<master>:<port>`) and the torch.distributed variables; with the MPI backend, under
  `mpirun` on the master instead.
- `caffe2Settings`: the script on every node.
- `tensorFlowSettings`: `parameterServerCount` parameter servers (default 1 on more than one
  node, else 0; at most `nodeCount`) on the first nodes and `workerCount` workers (default
  `nodeCount`; at most `nodeCount` x the GPUs a node) round-robin over all nodes;
  `AZ_BATCHAI_PS_HOSTS`, `AZ_BATCHAI_WORKER_HOSTS` and a `TF_CONFIG` per process, and
  `AZ_BATCHAI_TASK_INDEX` the process's index among its kind; worker 0 gets
  `masterCommandLineArgs`. A node's parameter servers run in the background. With parameter
  servers (which run until they are stopped), the master's task decides the attempt, as
  Batch AI's did (`master_decides`): once worker 0 and the master node's other workers have
  ended, the master's servers are stopped and its exit ends the attempt, the other nodes'
  tasks killed; another node's task, its workers done, keeps its servers up for the workers
  still at work (a worker that fails, or a server, still fails the attempt at once).

Multi-node jobs also get `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE` (the node count) and `RANK`
(the task index), as DESIGN.md defines them.

Ports: two live attempts never hold the same GPU, so a node's ports for a job are offset by the
first GPU index its task holds there (a task without GPUs holds the whole node). Two jobs
whose tasks share a node thus never ask for the same port: `MASTER_PORT` is 29500 + the
master task's first GPU, TensorFlow's ports 2222 + 200 x that node's first GPU (+ 100 for
workers) + the process's number on the node. Nodes that share a machine (local nodes, all at
a loopback address) count their GPUs one after another for this, by the number their ids
end with: `local-1`'s GPU 0 is the machine's GPU 4 when the nodes have four. The offsets count
modulo PORT_SLOTS (300), so that every port stays below 65536: a node whose number times its
GPUs reaches 300 (`local-38` of eight) shares offsets with lower-numbered ones, and two such
nodes whose ids end with the same number, in two clusters, share theirs: those may ask for
the same ports.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MASTER_PORT = 29500  # torch.distributed rendezvous on the master node, + its first GPU
PS_PORT = 2222  # TensorFlow parameter servers (+ 200 per first GPU); workers 100 above
TF_PER_NODE = 100  # TensorFlow processes of each kind a node has ports for
PORT_SLOTS = 300  # port offsets wrap at this (TensorFlow's highest: 2222 + 200 x 299 + 199)
MPIRUN = "mpirun --allow-run-as-root --hostfile $AZ_BATCHAI_MPI_HOST_FILE"


@dataclass(frozen=True, slots=True)
class Host:
    node_id: str
    address: str  # how the other nodes reach it
    gpus: tuple[int, ...] = ()  # GPU indices assigned to the job's task there
    port_base: int = 0  # GPUs of the other nodes on its machine that come first (see Ports)


@dataclass(frozen=True, slots=True)
class JobIdentity:
    workspace: str
    experiment: str
    name: str
    job_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Paths:
    mount_root: str  # cluster mounts ($AZ_BATCHAI_MOUNT_ROOT)
    job_mount_root: str  # job mounts ($AZ_BATCHAI_JOB_MOUNT_ROOT)
    job_temp: str  # per-node scratch, wiped between jobs
    shared_job_temp: str


@dataclass(frozen=True, slots=True)
class TaskPlan:
    index: int
    node_id: str
    command: str | None
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # path -> content, written first
    inputs: list[str] = field(default_factory=list)  # the job's input directories
    outputs: list[str] = field(default_factory=list)  # its output directories, made first


def output_segment(workspace: str, experiment: str, name: str, job_id: str) -> str:
    """The part of a job's output directories between prefix and suffix (the job GET's
    `jobOutputDirectoryPathSegment`)."""
    return f"{workspace}/experiments/{experiment}/jobs/{name}/{job_id}"


def output_path(prefix: str, suffix: str | None, job: JobIdentity) -> str:
    """Batch AI's output directory: prefix / job segment / suffix (in which the job's
    names and id may be referred to, `$AZ_BATCHAI_JOB_NAME` and the like)."""
    segment = output_segment(job.workspace, job.experiment, job.name, job.job_id)
    suffix = expander(_identity(job))(suffix or "")
    return "/".join(p.rstrip("/") for p in (prefix, segment, suffix) if p)


TOOL_TYPES = {  # a toolkit's settings -> Batch AI's read-only toolType (with none: custom)
    "cntkSettings": "cntk", "tensorFlowSettings": "tensorflow", "caffeSettings": "caffe",
    "caffe2Settings": "caffe2", "chainerSettings": "chainer", "horovodSettings": "horovod",
    "customMpiSettings": "custommpi", "pyTorchSettings": "pytorch",
}  # fmt: skip


def tool_type(spec: dict[str, Any]) -> str:
    """Batch AI's `toolType` of a job's properties (its enum has no PyTorch value: batchd
    says `pytorch`)."""
    return next((tool for key, tool in TOOL_TYPES.items() if key in spec), "custom")


def _identity(job: JobIdentity) -> dict[str, str]:
    return {
        "AZ_BATCHAI_JOB_NAME": job.name,
        "AZ_BATCHAI_JOB_ID": job.job_id,
        "AZ_BATCHAI_EXPERIMENT_NAME": job.experiment,
        "AZ_BATCHAI_WORKSPACE_NAME": job.workspace,
    }


def stdouterr_dir(prefix: str, job: JobIdentity) -> str:
    return (
        f"{prefix.rstrip('/')}/{job.workspace}/{job.experiment}/{job.name}/{job.attempt}/stdouterr"
    )


def translate(
    properties: dict[str, Any], job: JobIdentity, hosts: list[Host], paths: Paths,
    secrets: dict[str, str] | None = None,
) -> list[TaskPlan]:  # fmt: skip
    """What each node of `hosts` (task index order) runs for this job attempt."""
    if not hosts:
        raise ValueError("the attempt holds no node")
    known = {
        "AZ_BATCHAI_MOUNT_ROOT": paths.mount_root,
        "AZ_BATCHAI_JOB_MOUNT_ROOT": paths.job_mount_root,
        "AZ_BATCHAI_JOB_TEMP": paths.job_temp,
        "AZ_BATCHAI_SHARED_JOB_TEMP": paths.shared_job_temp,
    }
    expand = expander(known)
    base = {
        **known,
        **_identity(job),
        "AZ_BATCHAI_JOB_ATTEMPT": str(job.attempt),
        "AZ_BATCHAI_STDOUTERR_DIR": stdouterr_dir(expand(properties["stdOutErrPathPrefix"]), job),
        "AZ_BATCHAI_MPI_HOST_FILE": f"{paths.job_temp}/mpi-hostfile",
    }
    inputs, outputs = [], []
    for item in properties.get("outputDirectories", ()):
        outputs.append(output_path(expand(item["pathPrefix"]), item.get("pathSuffix"), job))
        base[f"AZ_BATCHAI_OUTPUT_{item['id'].upper()}"] = outputs[-1]
    for item in properties.get("inputDirectories", ()):  # (which may name an output's)
        inputs.append(expander(base)(item["path"]))
        base[f"AZ_BATCHAI_INPUT_{item['id'].upper()}"] = inputs[-1]
    ours = dict(base)  # the job's own variables cannot move its paths
    mentioned = []  # the job's variables, whose values may name batchd's (set per task)
    for item in properties.get("environmentVariables", ()):
        base[item["name"]] = item["value"]
        if "$" in item["value"]:
            mentioned.append(item["name"])
    base.update(secrets or {})
    base.update(ours)
    nodes = len(hosts)
    toolkit, settings = _toolkit(properties)
    commands, extra = _COMMANDS[toolkit](settings, hosts)
    process_count = settings.get("processCount", nodes) if isinstance(settings, dict) else nodes
    slots = max(1, math.ceil(process_count / nodes))
    hostfile = "".join(f"{h.address} slots={slots}\n" for h in hosts)
    plans = []
    for index, host in enumerate(hosts):
        env = {**base, **extra[index], "AZ_BATCHAI_TASK_INDEX": str(index),
               "AZ_BATCHAI_NUM_GPUS": str(len(host.gpus))}  # fmt: skip
        if nodes > 1:
            env.update(MASTER_ADDR=hosts[0].address, MASTER_PORT=str(_master_port(hosts)),
                       WORLD_SIZE=str(nodes), RANK=str(index))  # fmt: skip
        if mentioned:  # `$AZ_BATCHAI_OUTPUT_MODEL/ckpt`, as Batch AI let jobs write
            batchds = expander({k: v for k, v in env.items() if k.startswith("AZ_BATCHAI_")})
            env.update({name: batchds(env[name]) for name in mentioned})
        files = {env["AZ_BATCHAI_MPI_HOST_FILE"]: hostfile}
        plans.append(TaskPlan(index, host.node_id, commands[index], env, files, inputs, outputs))
    return plans


_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expander(known: dict[str, str]) -> Callable[[str], str]:
    """`$NAME` and `${NAME}` of each of the `known` variables replaced by its value, once
    (a value is not expanded again); any other name is left as written."""

    def value(match: re.Match[str]) -> str:
        return known.get(match[1] or match[2], match[0])

    def expand(text: str) -> str:
        return _REFERENCE.sub(value, text) if "$" in text else text

    return expand


def _toolkit(properties: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for name in _COMMANDS:
        if name in properties:
            return name, properties[name]
    raise ValueError("the job has no toolkit settings")  # parse_job refuses such a job


def _python(settings: dict[str, Any]) -> str:
    interpreter = settings.get("pythonInterpreterPath") or "python"
    args = settings.get("commandLineArgs")
    return " ".join(p for p in (interpreter, settings["pythonScriptFilePath"], args) if p)


def _master_only(command: str, hosts: list[Host]) -> tuple[list[str | None], list[dict]]:
    return [command] + [None] * (len(hosts) - 1), [{} for _ in hosts]


def _mpi_or_direct(command: str, settings: dict[str, Any], hosts: list[Host]):
    processes = settings.get("processCount", len(hosts))
    if processes == 1 and len(hosts) == 1:
        return _master_only(command, hosts)
    return _master_only(f"{MPIRUN} -np {processes} {command}", hosts)


def _custom(settings, hosts):
    return _master_only(settings["commandLine"], hosts)


def _custom_mpi(settings, hosts):
    processes = settings.get("processCount", len(hosts))
    return _master_only(f"{MPIRUN} -np {processes} {settings['commandLine']}", hosts)


def _script_mpi(settings, hosts):
    return _mpi_or_direct(_python(settings), settings, hosts)


def _cntk(settings, hosts):
    if settings.get("configFilePath"):
        args = settings.get("commandLineArgs")
        command = f"cntk configFile={settings['configFilePath']}" + (f" {args}" if args else "")
    else:
        command = _python(settings)
    return _mpi_or_direct(command, settings, hosts)


def _caffe(settings, hosts):
    if settings.get("configFilePath"):
        args = settings.get("commandLineArgs")
        command = f"caffe train --solver={settings['configFilePath']}" + (
            f" {args}" if args else ""
        )
    else:
        command = _python(settings)
    return _mpi_or_direct(command, settings, hosts)


def _offset(host: Host) -> int:
    """The first GPU index the job's task holds on `host` (no two live attempts share it),
    after the GPUs of the other nodes on its machine that come first (modulo PORT_SLOTS)."""
    return (host.port_base + (host.gpus[0] if host.gpus else 0)) % PORT_SLOTS


def _master_port(hosts: list[Host]) -> int:
    return MASTER_PORT + _offset(hosts[0])


def _tf_address(host: Host, number: int) -> str:
    return _endpoint(host.address, PS_PORT + 200 * _offset(host) + number)


def _endpoint(address: str, port: int) -> str:
    """HOST:PORT, with an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _every_node(settings, hosts):
    return [_python(settings)] * len(hosts), [{} for _ in hosts]


def _pytorch(settings, hosts):
    master = _endpoint(hosts[0].address, _master_port(hosts))
    init = {"AZ_BATCHAI_PYTORCH_INIT_METHOD": f"tcp://{master}"}
    if settings.get("communicationBackend") == "MPI":
        commands, _ = _mpi_or_direct(_python(settings), settings, hosts)
        return commands, [dict(init) for _ in hosts]
    return [_python(settings)] * len(hosts), [dict(init) for _ in hosts]


def _tf_processes(settings: dict[str, Any], nodes: int) -> tuple[int, int]:
    """(parameter servers, workers) of a TensorFlow job of `nodes` nodes, defaults applied."""
    parameter_servers = settings.get("parameterServerCount", 1 if nodes > 1 else 0)
    return parameter_servers, settings.get("workerCount", nodes)


def tf_distributed(settings: dict[str, Any], nodes: int) -> bool:
    """Does a TensorFlow job of `nodes` nodes run more than one process (each told its part
    by TF_CONFIG), rather than its script once?"""
    parameter_servers, workers = _tf_processes(settings, nodes)
    return nodes > 1 or workers > 1 or parameter_servers > 0


def _tensorflow(settings, hosts):
    nodes = len(hosts)
    parameter_servers, workers = _tf_processes(settings, nodes)
    interpreter = settings.get("pythonInterpreterPath") or "python"
    script = settings["pythonScriptFilePath"]
    if not tf_distributed(settings, nodes):
        args = settings.get("masterCommandLineArgs") or settings.get("workerCommandLineArgs")
        return [" ".join(p for p in (interpreter, script, args) if p)], [{}]
    if max(parameter_servers, workers) > TF_PER_NODE * nodes:
        raise ValueError(f"at most {TF_PER_NODE} parameter servers and {TF_PER_NODE} workers "
                         "a node: each node has that many ports for each")  # fmt: skip
    ps = [(i % nodes, _tf_address(hosts[i % nodes], i // nodes))
          for i in range(parameter_servers)]  # fmt: skip
    worker = [(i % nodes, _tf_address(hosts[i % nodes], 100 + i // nodes))
              for i in range(workers)]  # fmt: skip
    cluster = {"ps": [a for _n, a in ps], "worker": [a for _n, a in worker]}
    hosts_env = {"AZ_BATCHAI_PS_HOSTS": ",".join(cluster["ps"]),
                 "AZ_BATCHAI_WORKER_HOSTS": ",".join(cluster["worker"])}  # fmt: skip
    commands: list[str | None] = []
    envs = []
    for node in range(nodes):
        background = []
        for index, (where, _address) in enumerate(ps):
            if where == node:
                config = _tf_config(cluster, "ps", index)
                args = settings.get("parameterServerCommandLineArgs")
                background.append(_process(interpreter, script, args, config, index))
        foreground = []
        for index, (where, _address) in enumerate(worker):
            if where == node:
                config = _tf_config(cluster, "worker", index)
                key = "masterCommandLineArgs" if index == 0 else "workerCommandLineArgs"
                args = settings.get(key) or settings.get("workerCommandLineArgs")
                foreground.append(_process(interpreter, script, args, config, index))
        commands.append(_node_script(background, foreground, master=node == 0))
        envs.append(dict(hosts_env))
    return commands, envs


def master_decides(properties: dict[str, Any], nodes: int) -> bool:
    """Does the master's task (task 0) end the attempt when it ends, the other tasks being
    killed then? For a distributed TensorFlow job with parameter servers: they serve until
    they are stopped, so the other nodes' tasks would never end on their own."""
    settings = properties.get("tensorFlowSettings")
    return isinstance(settings, dict) and nodes > 1 and _tf_processes(settings, nodes)[0] > 0


def _tf_config(cluster: dict[str, list[str]], role: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": role, "index": index}})


def _process(interpreter: str, script: str, args: str | None, tf_config: str,
             task_index: int | None = None) -> str:  # fmt: skip
    """One TensorFlow process in a subshell, so that its arguments see its own variables."""
    exports = f"export TF_CONFIG={shlex.quote(tf_config)}; "
    if task_index is not None:
        exports += f"export AZ_BATCHAI_TASK_INDEX={task_index}; "
    return f"({exports}exec {' '.join(p for p in (interpreter, script, args) if p)})"


def _node_script(background: list[str], foreground: list[str], master: bool) -> str | None:
    """Parameter servers and workers, each in the background and each in a group of its own.
    The first of them to fail (exit other than 0, in any order) ends the node's task with its
    exit code at once, the others killed. Once the workers have all ended well: on the
    master node its servers are stopped and the task exits 0 (which ends the attempt:
    master_decides); on another node they serve on (the other nodes' workers use them)
    until the attempt ends and the task is killed, or they end by themselves. The whole
    script is one block, so that the shell reads all of it before it starts anything."""
    if not background and not foreground:
        return None
    # each process its own group, so a server is stopped with its children (a shell without
    # job control, busybox's, says so and runs them in its own group: `kill PID` then)
    lines = [
        "{",
        "set -m 2>/dev/null; jc= servers= workers=; case $- in *m*) jc=1;; esac",
        'here=$PWD; rm -rf "$here/.batchd-failed" "$here/.batchd-failing" "$here/.batchd-stop"',
    ]
    # the shell's own notices (each job's "Done", with its whole text) are no output of the
    # job's: only its processes write to the task's stderr
    lines.append("exec 3>&2 2>/dev/null")
    # the task's SIGTERM (terminate, a wall clock, preemption) reaches every process, which
    # has its grace: the runtime signals only the shell's own group (a failure's word is not
    # heard meanwhile: it would cut the others' grace short)
    lines.append(f"trap 'trap \"\" USR1; {_STOPPING}; {_SIGNAL_ALL.format('TERM')}; wait; "
                 "exit 143' TERM")  # fmt: skip
    # a process that failed: its code, at once; its siblings are killed (no grace: the
    # attempt has failed)
    lines.append(f"trap 'trap \"\" TERM USR1; {_STOPPING}; {_SIGNAL_ALL.format('KILL')}; c=; "
                 f'read c < "$here/.batchd-failed"; exit "${{c:-1}}"\' USR1')  # fmt: skip
    lines += [f'{_watched(command)} & servers="$servers $!"' for command in background]
    lines += [f'{_watched(command)} & workers="$workers $!"' for command in foreground]
    # (a failure its subshell could not say, its work directory unwritable, is seen here)
    lines.append(f'for w in $workers; do wait "$w" || {_FAILED}; done')
    if background and master:
        lines.append(f"{_STOPPING}; {_SIGNAL.format('TERM', '$servers')}")
    elif background:
        lines.append(f'for p in $servers; do wait "$p" || {_FAILED}; done')
    lines += ["exit 0", "}"]
    return "\n".join(lines)


def _watched(command: str) -> str:
    """`command` in a subshell that, when it fails (unless the task is stopping), writes its
    exit code down and tells the node's script (USR1); only the first failure of the node
    does (`.batchd-failing`). With job control (`jc`), the subshell waits out the
    command's SIGTERM grace: a SIGTERM to its group reaches both, and it only notes it.
    Without (busybox's or dash's sh), everything is in the task's group, which the runtime
    signals whole; a server stopped by the script itself then goes at the task's end,
    without a grace. The subshell's own words (a command killed by a signal) go nowhere."""
    return (
        f'([ -z "$jc" ] || trap : TERM; {command} 2>&3 3>&-; s=$?; [ $s = 0 ] || '
        f'[ -e "$here/.batchd-stop" ] || ! mkdir "$here/.batchd-failing" || '
        f'{{ echo $s > "$here/.batchd-failed"; kill -USR1 $$; }}; exit $s)'
    )


_SIGNAL = 'for p in {1}; do kill -{0} -- "-$p" || kill -{0} "$p"; done'
_SIGNAL_ALL = _SIGNAL.replace("{1}", "$servers $workers")
_STOPPING = 'true > "$here/.batchd-stop"'  # (what ends now, ends as asked: not a failure)
_FAILED = f"{{ s=$?; {_STOPPING}; {_SIGNAL_ALL.format('KILL')}; exit $s; }}"


_COMMANDS = {
    "customToolkitSettings": _custom,
    "customMpiSettings": _custom_mpi,
    "horovodSettings": _script_mpi,
    "chainerSettings": _script_mpi,
    "cntkSettings": _cntk,
    "caffeSettings": _caffe,
    "caffe2Settings": _every_node,
    "pyTorchSettings": _pytorch,
    "tensorFlowSettings": _tensorflow,
}
