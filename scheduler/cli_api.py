"""`batchd workspace|experiment|cluster|job|token ...`, and `events tail` and `replay` without
`--store`: the CLI over the HTTP API (docs/api.md).

Each command prints a table on a terminal and tab-separated lines otherwise (`show`: one
`key: value` line per property); `--json` prints the API's JSON unchanged (a list's pages as
one `{"value": [...], "nextLink": null}`). Errors are ApiError/ClientError, printed by cli.main.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from batchd.events.timeutil import to_iso
from batchd.projections.history import pending_reason
from batchd.scheduler import cli_log, cli_replay
from batchd.scheduler.cli_text import error_text, printable
from batchd.scheduler.client import (
    ApiError,
    Client,
    ClientError,
    segment,
    server_events,
    settings,
)
from batchd.scheduler.schema import DuplicateKey, NumberTooLong, loads

ENDED = ("succeeded", "failed")
EXIT_WAIT_TIMEOUT = 124  # `job wait --timeout` ran out (as timeout(1))
EXIT_WAIT_UNKNOWN = 125  # `job wait` cannot tell how the job ended: the server lost for good,
# the job deleted, access refused (as timeout(1)'s own failure)
WAIT_POLL_MAX = 2.0  # seconds between polls of a job at most
RECONNECT_WITHIN = 30.0  # seconds: following commands ride out a lost server this long
UNPLACED_POLL = 1.0  # seconds between looks at a queued job whose output its node will have

Row = Callable[[dict[str, Any]], list[Any]]
T = TypeVar("T")


def _client(args: argparse.Namespace) -> Client:
    return Client(settings(args))


# -- output -----------------------------------------------------------------------------------
def _tty() -> bool:
    return sys.stdout.isatty()


def _get(item: dict[str, Any], path: str, default: Any = None) -> Any:
    value: Any = item
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, dict, bool)):  # as JSON has them: true, not True
        return json.dumps(value)
    return printable(str(value))


def _print_table(header: list[str], rows: Iterable[list[Any]]) -> None:
    cells = [[_cell(c) for c in row] for row in rows]
    if not _tty():
        for row in cells:
            print("\t".join(row))
        return
    if not cells:
        print("(none)")
        return
    cells.insert(0, header)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _flatten(value: Any, prefix: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list) and value:
        for index, inner in enumerate(value):
            yield from _flatten(inner, f"{prefix}[{index}]")
    else:
        yield prefix, _cell(value) if value not in ({}, []) else json.dumps(value)


def _print_resource(args: argparse.Namespace, resource: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(resource))
        return
    for key in ("name", "id"):
        if key in resource:
            print(f"{key}: {_cell(resource[key])}")
    for key, value in _flatten(resource.get("properties", {}), ""):
        print(f"{key}: {value}")


async def _print_list(
    args: argparse.Namespace, api: Client, path: str, header: list[str], row: Row, **params: Any
) -> int:
    items = [item async for item in api.items(path, **params)]
    if args.json:
        print(json.dumps({"value": items, "nextLink": None}))
    else:
        _print_table(header, (row(item) for item in items))
    return 0


def _print_write(
    args: argparse.Namespace, status: int, body: Any, done: str, unchanged: str | None = None
) -> int:
    """After a write: the API's answer with --json, else one line saying what happened."""
    if args.json:
        print(json.dumps(body))
    else:
        print(unchanged if status == 200 and unchanged else done)
    return 0


def _when(value: str | None) -> str | None:
    """An ISO time to the second (tables only)."""
    return value[:19].replace("T", " ") if isinstance(value, str) else value


# -- documents --------------------------------------------------------------------------------
ACCOUNT_ENV, KEY_ENV = "AZURE_BATCHAI_STORAGE_ACCOUNT", "AZURE_BATCHAI_STORAGE_KEY"
PLACEHOLDERS = {f"<{ACCOUNT_ENV}>": ACCOUNT_ENV, f"<{KEY_ENV}>": KEY_ENV}
DEFAULT_STDOUTERR = "$AZ_BATCHAI_MOUNT_ROOT"  # stdOutErrPathPrefix of a job made from --command


class InputError(ValueError):
    """A flag or file the command cannot use; printed as one line."""


def load_document(path: str) -> dict[str, Any]:
    """A Batch AI JSON file (with or without the `{"properties": ...}` envelope)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors save)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        document = loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InputError(f"{path} is not valid JSON: {exc.msg} at {where}") from None
    except (DuplicateKey, NumberTooLong) as exc:
        raise InputError(f"{path}: {exc}") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply") from None
    if not isinstance(document, dict):
        raise InputError(f"{path} must hold a JSON object")
    if "properties" in document and not isinstance(document["properties"], dict):
        raise InputError(f"{path}: properties must be a JSON object")
    return document


def _properties(document: dict[str, Any]) -> dict[str, Any]:
    inner = document.get("properties")
    return inner if isinstance(inner, dict) else document


def _child(parent: dict[str, Any], key: str) -> dict[str, Any]:
    if not isinstance(parent.get(key), dict):
        parent[key] = {}
    return parent[key]


SECRET_KEYS = ("accountKey", "password", "adminUserPassword")  # fields stored sealed


def _replace_placeholders(value: Any, values: dict[str, str], left: set[str],
                          secret: bool = False, in_secrets: bool = False) -> Any:  # fmt: skip
    """`value` with the placeholders filled in. The storage key goes only into fields the
    log seals (`secret`: an account key, a password, a `secrets` entry's value): elsewhere
    it is left as written, and noted in `left` as misplaced."""
    if isinstance(value, dict):
        return {k: _replace_placeholders(v, values, left, k in SECRET_KEYS or (
                    in_secrets and k == "value"), k == "secrets")
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_replace_placeholders(v, values, left, in_secrets=in_secrets) for v in value]
    if isinstance(value, str):
        for placeholder, env in PLACEHOLDERS.items():
            if placeholder in value:
                if env == KEY_ENV and not secret:
                    left.add(MISPLACED)
                elif env in values:
                    value = value.replace(placeholder, values[env])
                else:
                    left.add(env)
    return value


MISPLACED = "misplaced"  # (in `left`) the storage key's placeholder outside a secret field


def fill_storage(document: dict[str, Any], where: dict[str, Any]) -> dict[str, Any]:
    """As `az batchai` did: `<AZURE_BATCHAI_STORAGE_ACCOUNT>`/`_KEY>` placeholders and Azure
    file shares or blob containers without credentials get the values of those environment
    variables (those not set are left as they are, with a note on stderr)."""
    values = {env: os.environ[env] for env in (ACCOUNT_ENV, KEY_ENV) if os.environ.get(env)}
    left: set[str] = set()
    document = _replace_placeholders(document, values, left)
    volumes = [_get(_properties(document), path) for path in where]
    for mounts in (v for v in volumes if isinstance(v, dict)):
        for kind in ("azureFileShares", "azureBlobFileSystems"):
            for entry in mounts.get(kind) or ():
                if not isinstance(entry, dict):
                    continue
                credentials = entry.get("credentials")
                if credentials is None or (
                    isinstance(credentials, dict)
                    and not {"accountKey", "accountKeySecretReference"} & credentials.keys()
                ):
                    if KEY_ENV in values:
                        _child(entry, "credentials")["accountKey"] = values[KEY_ENV]
                    else:
                        left.add(KEY_ENV)
    if MISPLACED in left:
        left.discard(MISPLACED)
        print(f"note: <{KEY_ENV}> is filled in only where the log keeps it encrypted "
              "(credentials.accountKey, a password, secrets[].value): elsewhere it is left "
              "as the file has it, as it would be shown to every reader of the job",
              file=sys.stderr)  # fmt: skip
    for env in sorted(left):
        print(f"note: set {env} to fill in the storage {'key' if env == KEY_ENV else 'account'}"
              " (left as the file has it)", file=sys.stderr)  # fmt: skip
    if any(isinstance(v, dict) and any(v.values()) for v in volumes):
        print("note: mountVolumes are kept with it, but no node mounts them yet: its tasks see "
              "$AZ_BATCHAI_MOUNT_ROOT, the daemon's storage (docs/nodes.md, \"Not yet\")",
              file=sys.stderr)  # fmt: skip
    return document


def _check_same_cluster(args: argparse.Namespace, props: dict[str, Any], where: str) -> None:
    """--cluster, where the file names a cluster too (at `where`, "properties." or ""): the
    same one, or it is a mistake."""
    if "cluster" not in props:
        return
    from batchd.scheduler.commands import cluster_reference  # (only here: a heavy import)
    from batchd.scheduler.schema import resource_id

    reference = resource_id(props["cluster"], f"{where}cluster")
    named = cluster_reference(reference, args.workspace, where)
    if named != cluster_reference(args.cluster, args.workspace, ""):
        raise InputError(f"--cluster {args.cluster}: the file names cluster {named[1]!r} of "
                         f"workspace {named[0]!r}; give one or the other")  # fmt: skip


def job_document(args: argparse.Namespace) -> dict[str, Any]:
    """The job document to PUT: the config file (or one made from --command), then the flags."""
    if args.config_file:
        document = load_document(args.config_file)
    else:
        document = {"properties": {
            "nodeCount": 1, "stdOutErrPathPrefix": DEFAULT_STDOUTERR,
            "customToolkitSettings": {"commandLine": args.command},
        }}  # fmt: skip
    props = _properties(document)
    if args.cluster:
        _check_same_cluster(args, props, "properties." if "properties" in document else "")
        props["cluster"] = args.cluster
    elif "cluster" not in props:
        raise InputError("job create needs --cluster NAME")
    if args.image is not None:  # "" too: the server says what is wrong with it
        _child(_child(props, "containerSettings"), "imageSourceRegistry")["image"] = args.image
    if args.nodes is not None:
        props["nodeCount"] = args.nodes
    if args.gpus_per_node is not None:
        props["gpusPerNode"] = args.gpus_per_node
    if isinstance(args.priority, str):
        props["schedulingPriority"] = args.priority
        props.pop("priority", None)
    elif args.priority is not None:
        props["priority"] = args.priority
        props.pop("schedulingPriority", None)
    if args.max_retries is not None:
        props["maxRetries"] = args.max_retries
    if args.env:
        names = [name for name, _value in args.env]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InputError(f"--env {twice[0]} is given more than once")
        given = props.get("environmentVariables")
        variables = given if isinstance(given, list) else []
        for name, value in args.env:
            variables = [
                v for v in variables if not (isinstance(v, dict) and v.get("name") == name)
            ]
            variables.append({"name": name, "value": value})
        props["environmentVariables"] = variables
    return fill_storage(document, ["mountVolumes"])


def cluster_document(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster document to PUT: the config file, then the flags."""
    if not args.config_file and not args.vm_size:
        raise InputError("cluster create needs --config-file FILE or --vm-size SIZE")
    document = load_document(args.config_file) if args.config_file else {"properties": {}}
    props = _properties(document)
    if args.vm_size:
        props["vmSize"] = args.vm_size
    if args.vm_priority:
        props["vmPriority"] = args.vm_priority
    if args.nodes is not None:  # (the file's nodeDeallocationOption is kept)
        given = _get(props, "scaleSettings.manual")
        manual = dict(given) if isinstance(given, dict) else {}
        props["scaleSettings"] = {"manual": {**manual, "targetNodeCount": args.nodes}}
    return fill_storage(document, ["nodeSetup.mountVolumes"])


# -- paths ------------------------------------------------------------------------------------
def _named(what: str, name: str) -> str:
    """`name` as one path segment; InputError if it is empty (no path could name it) or a dot
    segment (the URL would lead to another resource)."""
    if not name:
        raise InputError(f"{what} must not be empty")
    if name in (".", ".."):
        raise InputError(f"{what} must not be '.' or '..'")
    return segment(name)


def _relative_path(option: str, path: str) -> str:
    """A file path the user gave with `option`, as percent-encoded URL path segments below the
    job's files; InputError naming `option` for one that could lead elsewhere (the checks the
    API makes of its `directory` query, made here since a URL's dot segments never reach it)."""
    from batchd.scheduler import files  # (only here: the server's module)
    from batchd.scheduler.schema import DocumentError

    if not path:
        raise InputError(f"{option}: must not be empty")
    try:
        files.joined(Path(), path, option)  # the API's own rules
    except DocumentError as exc:
        raise InputError(str(exc)) from None
    parts = [part for part in path.split("/") if part and part != "."]  # (./stdout.txt)
    if not parts:
        raise InputError(f"{option}: must name a file")
    return "/".join(segment(part) for part in parts)


def _workspace(args: argparse.Namespace, name: str | None = None) -> str:
    return f"/v1/workspaces/{_named('workspace name', args.workspace if name is None else name)}"


def _experiment(args: argparse.Namespace, name: str | None = None) -> str:
    experiment = args.experiment if name is None else name
    return f"{_workspace(args)}/experiments/{_named('experiment name', experiment)}"


def _job(args: argparse.Namespace) -> str:
    return f"{_experiment(args)}/jobs/{_named('job name', args.name)}"


def _job_key(args: argparse.Namespace) -> str:
    return f"{args.workspace}/{args.experiment}/{args.name}"


# -- riding out a restart of the daemon --------------------------------------------------------
class ServerLost(ClientError):
    """The server has not been reached again within RECONNECT_WITHIN seconds of losing it."""


class _Reconnecting:
    """Requests of a command that follows something (`events tail --follow`, `job wait`, `job
    file stream`) and rides out a restart of the daemon: a request that cannot reach the server
    is made again each second, once /readyz says the daemon is ready again, and ServerLost ends
    it when the server has been lost for RECONNECT_WITHIN seconds (or at `until`, a
    time.monotonic()). The server's own answers (ApiError) are raised as they are, but a 503
    (a daemon starting). A server never reached fails at once (a mistyped --server)."""

    def __init__(self, api: Client, until: float | None = None, answered: bool = False) -> None:
        self.api = api
        self.until = math.inf if until is None else until
        self.lost_at: float | None = None  # when the server was lost, while it is
        self.answered = answered  # the server has answered this command once

    def reached(self) -> None:
        """The server answers: a later loss has the whole window again."""
        self.lost_at = None
        self.answered = True

    async def call(self, request: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                if self.lost_at is not None:  # a restarted daemon answers before it is ready
                    await self.api.get("/readyz")
                result = await request()
            except ClientError as exc:
                await self._lost(exc)
                continue
            self.reached()
            return result

    async def _lost(self, exc: ClientError) -> None:
        """Wait before the next try, or raise: the server's answer, or ServerLost."""
        starting = isinstance(exc, ApiError) and exc.status == 503  # starting, or log away
        if (isinstance(exc, ApiError) or not self.answered) and not starting:
            raise exc
        now = time.monotonic()
        self.lost_at = self.lost_at or now
        give_up = min(self.lost_at + RECONNECT_WITHIN, self.until)
        if now >= give_up:
            why = f"the batchd server at {self.api.cfg.server} is not ready" if starting else exc
            raise ServerLost(f"{why} (for {now - self.lost_at:.0f} s)") from None
        await asyncio.sleep(min(1.0, give_up - now))


# -- workspaces and experiments ---------------------------------------------------------------
async def workspace_create(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("PUT", _workspace(args, args.name), body={})
    return _print_write(
        args,
        status,
        answer,
        f"created workspace {args.name}",
        f"workspace {args.name} exists as given: unchanged",
    )


async def workspace_list(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        return await _print_list(
            args, api, "/v1/workspaces", ["NAME", "CREATED", "CREATED BY", "STATE"],
            lambda w: [w.get("name"), _when(_get(w, "properties.creationTime")),
                       _get(w, "properties.createdBy"),
                       _get(w, "properties.provisioningState")],
        )  # fmt: skip


async def workspace_show(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _print_resource(args, await api.get(_workspace(args, args.name)))
    return 0


async def workspace_delete(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("DELETE", _workspace(args, args.name))
    return _print_write(args, status, answer, f"deleted workspace {args.name}")


async def experiment_create(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("PUT", _experiment(args, args.name), body={})
    what = f"experiment {args.workspace}/{args.name}"
    return _print_write(args, status, answer, f"created {what}", f"{what} exists: unchanged")


async def experiment_list(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        return await _print_list(
            args, api, f"{_workspace(args)}/experiments",
            ["NAME", "CREATED", "CREATED BY", "STATE"],
            lambda e: [e.get("name"), _when(_get(e, "properties.creationTime")),
                       _get(e, "properties.createdBy"), _get(e, "properties.provisioningState")],
        )  # fmt: skip


async def experiment_show(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _print_resource(args, await api.get(_experiment(args, args.name)))
    return 0


async def experiment_delete(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("DELETE", _experiment(args, args.name))
    return _print_write(args, status, answer, f"deleted experiment {args.workspace}/{args.name}")


# -- clusters ---------------------------------------------------------------------------------
def _cluster_path(args: argparse.Namespace) -> str:
    return f"{_workspace(args)}/clusters/{_named('cluster name', args.name)}"


def _target(c: dict[str, Any]) -> str:
    scale = _get(c, "properties.scaleSettings", {})
    if "autoScale" in scale:
        auto = scale["autoScale"]
        return f"{auto.get('minimumNodeCount')}-{auto.get('maximumNodeCount')}"
    return _cell(_get(scale, "manual.targetNodeCount"))


def _cluster_row(c: dict[str, Any]) -> list[Any]:
    counts = _get(c, "properties.nodeStateCounts", {})
    return [
        c.get("name"), _get(c, "properties.vmSize"),
        _get(c, "properties.vmPriority", "dedicated"), _get(c, "properties.allocationState"),
        f"{_cell(_get(c, 'properties.currentNodeCount'))}/{_target(c)}",
        *(counts.get(k) for k in ("idle", "running", "preparing", "unusable", "leaving")),
        _get(c, "properties.freeCapacity.freeGpus"), _get(c, "properties.provisioningState"),
    ]  # fmt: skip


async def cluster_create(args: argparse.Namespace) -> int:
    document = cluster_document(args)
    async with _client(args) as api:
        status, answer = await api.call("PUT", _cluster_path(args), body=document)
    what = f"cluster {args.workspace}/{args.name}"
    return _print_write(
        args, status, answer, f"created {what}", f"{what} exists as given: unchanged"
    )


async def cluster_list(args: argparse.Namespace) -> int:
    header = ["NAME", "VM SIZE", "PRIORITY", "ALLOCATION", "NODES", "IDLE", "RUNNING",
              "PREPARING", "UNUSABLE", "LEAVING", "FREE GPUS", "STATE"]  # fmt: skip
    async with _client(args) as api:
        return await _print_list(args, api, f"{_workspace(args)}/clusters", header, _cluster_row)


async def cluster_show(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _print_resource(args, await api.get(_cluster_path(args)))
    return 0


_FATE = {"requeue": "requeued", "terminate": "terminated",
         "waitforjobcompletion": "run to their end first"}  # fmt: skip


async def cluster_resize(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _status, cluster = await api.call("GET", _cluster_path(args))
        before = _get(cluster, "properties.scaleSettings.manual") or {}
        manual = {"targetNodeCount": args.nodes}
        option = args.node_deallocation_option or before.get("nodeDeallocationOption")
        if option:  # (kept as the cluster had it)
            manual["nodeDeallocationOption"] = option
        body = {"scaleSettings": {"manual": manual}}
        status, answer = await api.call("PATCH", _cluster_path(args), body=body)
    done = f"resized cluster {args.workspace}/{args.name} to {args.nodes} nodes"
    if args.nodes < _get(cluster, "properties.currentNodeCount", 0):
        option = option or "requeue"
        done += (f"; jobs on the nodes that go are {_FATE[option]} ({option}), where batchd "
                 "started the nodes; nodes that joined by hand stay until their agents are "
                 "stopped (docs/scheduling.md)")  # fmt: skip
    return _print_write(args, status, answer, done)


async def cluster_delete(args: argparse.Namespace) -> int:
    name = f"{args.workspace}/{args.name}"
    async with _client(args) as api:
        status, answer = await api.call("DELETE", _cluster_path(args))
        try:
            _, left = await api.call("GET", _cluster_path(args))
        except ApiError as exc:
            if exc.status != 404:
                raise
            left = None
    done = f"deleted cluster {name}"
    if left is not None:  # its nodes go first, each once it runs nothing
        count = _get(left, "properties.currentNodeCount", 0)
        done = (f"deleting cluster {name}: it goes once its {count} node(s) are removed, "
                "each once it runs nothing; its queued jobs fail")  # fmt: skip
    return _print_write(args, status, answer, done)


# -- jobs -------------------------------------------------------------------------------------
def _cluster_shown(j: dict[str, Any]) -> str:
    """A job's cluster by name, as `workspace/name` when it is another workspace's."""
    parts = str(_get(j, "properties.cluster.id", "")).split("/")  # /workspaces/W/clusters/C
    own = str(j.get("id", "")).split("/")[2:3]  # /workspaces/W/experiments/E/jobs/J
    if len(parts) == 5 and parts[1] == "workspaces" and [parts[2]] != own:
        return f"{parts[2]}/{parts[4]}"
    return parts[-1]


def _job_row(j: dict[str, Any]) -> list[Any]:
    state = _get(j, "properties.state")
    reason = pending_reason(_get(j, "properties.pendingReason")) if state == "queued" else None
    nodes = [t.get("node") for t in _get(j, "properties.tasks", []) if isinstance(t, dict)]
    return [
        j.get("name"), state, _cluster_shown(j),
        _get(j, "properties.nodeCount"), _get(j, "properties.priority"),
        _get(j, "properties.attempt"), _get(j, "properties.executionInfo.exitCode"),
        _when(_get(j, "properties.creationTime")), reason or " ".join(n for n in nodes if n),
    ]  # fmt: skip


async def job_create(args: argparse.Namespace) -> int:
    document = job_document(args)
    async with _client(args) as api:
        status, answer = await api.call("PUT", _job(args), body=document)
    state = _get(answer, "properties.state")
    done = f"created job {_job_key(args)}" + (f" ({state})" if state else "")
    unchanged = f"job {_job_key(args)} exists as given: unchanged"
    return _print_write(args, status, answer, done, unchanged)


# -- nodes -----------------------------------------------------------------------------------
def _node_row(n: dict[str, Any]) -> list[Any]:
    p = n.get("properties", {})
    cluster = (_get(p, "cluster.id") or "").removeprefix("/workspaces/").replace("/clusters/", "/")
    held = p.get("allocations") or []
    whole = any(a.get("gpu") is None for a in held)  # a task that needs no GPU holds the node
    used = p.get("gpus", 0) if whole and p.get("gpus") else len(held)
    age = p.get("heartbeatAgeSeconds")
    errors = p.get("errors") or []
    # only an error of its present state: a ready node's, or one from before the node last
    # changed state, are past ones (`node show` lists them all)
    last = errors[-1] if errors and p.get("state") != "ready" else {}
    last_error = last.get("message") if str(last.get("at", "")) >= str(p.get("since", "")) else None
    heartbeat = None if age is None else f"{age:.0f}s"
    gpus = f"{used}/{p.get('gpus', 0)}"
    runtimes = ",".join(p.get("runtimes") or [])
    model = p.get("gpuModel") or ""
    if p.get("gpuMemoryMb"):
        model += f" ({p['gpuMemoryMb']} MiB)"
    return [n.get("name"), cluster, p.get("state"), gpus, model, runtimes, heartbeat,
            last_error]  # fmt: skip


def _cluster_key(args: argparse.Namespace) -> str | None:
    """`--cluster` as the API's WORKSPACE/NAME: a bare NAME is in -w's workspace."""
    if not args.cluster or "/" in args.cluster:
        return args.cluster
    return f"{args.workspace}/{args.cluster}"


async def node_list(args: argparse.Namespace) -> int:
    header = ["NODE", "CLUSTER", "STATE", "GPUS USED", "GPU MODEL", "RUNTIMES", "HEARTBEAT",
              "LAST ERROR"]  # fmt: skip
    async with _client(args) as api:
        return await _print_list(args, api, "/v1/nodes", header, _node_row,
                                 cluster=_cluster_key(args))  # fmt: skip


async def node_show(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _print_resource(args, await api.get(f"/v1/nodes/{_named('node id', args.id)}"))
    return 0


async def node_remove(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("DELETE", f"/v1/nodes/{_named('node id', args.id)}")
    return _print_write(args, status, answer, f"removed node {args.id}")


async def job_list(args: argparse.Namespace) -> int:
    header = ["NAME", "STATE", "CLUSTER", "NODES", "PRIORITY", "ATTEMPT", "EXIT CODE", "CREATED",
              "PENDING REASON / NODES"]  # fmt: skip
    async with _client(args) as api:
        return await _print_list(args, api, f"{_experiment(args)}/jobs", header, _job_row,
                                 state=args.state, cluster=args.cluster)  # fmt: skip


async def job_show(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        _print_resource(args, await api.get(_job(args)))
    return 0


async def job_terminate(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("POST", f"{_job(args)}/terminate")
    return _print_write(args, status, answer, _terminated(_job_key(args), answer))


def _terminated(key: str, answer: Any) -> str:
    """What a terminate did, by the state the API answers with: a queued job ends at once
    (failed), one that holds GPUs is terminating until its tasks have stopped."""
    state = _get(answer, "properties.state") if isinstance(answer, dict) else None
    if state == "terminating" or state is None:
        return f"terminating job {key}: it ends once its tasks have stopped (batchd job wait)"
    return f"terminated job {key}: it has ended ({state})"


async def job_delete(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("DELETE", _job(args))
    done = f"deleted job {_job_key(args)}"
    if isinstance(answer, dict) and _get(answer, "properties.state"):  # it was live
        done = (f"deleting job {_job_key(args)}: it is terminated first, and deleted once its "
                "tasks have stopped")  # fmt: skip
    return _print_write(args, status, answer, done)


async def job_history(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        answer = await api.get(f"{_job(args)}/history")
    if args.json:
        print(json.dumps(answer))
    else:
        print(cli_replay.history_text(_job_key(args), answer.get("value", [])))
    return 0


async def job_wait(args: argparse.Namespace) -> int:
    """Poll the job until it has ended; its exit code (1 if it failed without one), riding out
    a restart of the daemon; EXIT_WAIT_TIMEOUT when --timeout runs out, EXIT_WAIT_UNKNOWN when
    the server stays lost, refuses the wait (the job not there, a token revoked) or the job
    waited on is deleted (its name perhaps taken by a new job, never reported as its end)."""
    progress = sys.stderr.isatty() and not args.json
    started = time.monotonic()
    delay = 0.1
    state = created = None
    async with _client(args) as api:
        until = None if args.timeout is None else started + args.timeout
        server = _Reconnecting(api, until)
        while True:
            try:
                job = await server.call(lambda: api.get(_job(args)))
            except ApiError as exc:
                if state is None:  # refused from the start (no such job, say)
                    print(error_text(exc.lines()), file=sys.stderr)
                    return EXIT_WAIT_UNKNOWN
                why = "it was deleted" if exc.status == 404 else printable(exc.lines()[0])
                return _cannot_tell(args, why, state, progress)
            except ServerLost as exc:
                return _cannot_tell(args, str(exc), state, progress)
            except ClientError as exc:  # never reached (at once: a mistyped --server, say)
                return _cannot_tell(args, str(exc), state, progress)
            if created not in (None, _get(job, "properties.creationTime")):
                return _cannot_tell(args, "it was deleted and a new job took its name", state,
                                    progress)  # fmt: skip
            created = _get(job, "properties.creationTime")
            state = _get(job, "properties.state")
            waited = time.monotonic() - started
            if state in ENDED:
                break
            if progress:
                reason = pending_reason(_get(job, "properties.pendingReason"))
                line = f"job {_job_key(args)}: {state}{f' ({reason})' if reason else ''}"
                sys.stderr.write(f"\r\x1b[K{line}, {waited:.0f} s")
                sys.stderr.flush()
            if args.timeout is not None and waited >= args.timeout:
                if progress:
                    sys.stderr.write("\r\x1b[K")
                print(f"batchd: error: job {_job_key(args)} is still {state} after "
                      f"{args.timeout:g} s", file=sys.stderr)  # fmt: skip
                return EXIT_WAIT_TIMEOUT
            pause = delay if args.timeout is None else min(delay, args.timeout - waited)
            await asyncio.sleep(max(pause, 0.01))
            delay = min(delay * 1.5, WAIT_POLL_MAX)
    return _ended_with(args, job, state, progress)


def _ended_with(args: argparse.Namespace, job: dict, state: str, progress: bool) -> int:
    """`job wait`'s last word on an ended job: it, and the job's exit code."""
    if progress:
        sys.stderr.write("\r\x1b[K")
    code = _get(job, "properties.executionInfo.exitCode")
    if args.json:
        print(json.dumps(job))
    else:
        said = f"job {_job_key(args)} {state}" + (f", exit code {code}" if code is not None else "")
        errors = _get(job, "properties.executionInfo.errors") or []
        if state != "succeeded" and errors and isinstance(errors[-1], dict):
            said += printable(f": {errors[-1].get('code')}: {errors[-1].get('message')}")
        print(said)
    if state == "succeeded":
        return 0
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _cannot_tell(args: argparse.Namespace, why: str, state: str | None,
                 progress: bool) -> int:  # fmt: skip
    """EXIT_WAIT_UNKNOWN, saying why (not 1, which a job's own exit code may be)."""
    if progress:
        sys.stderr.write("\r\x1b[K")
    seen = f" (last seen {state})" if state else ""
    print(f"batchd: error: {why}; cannot tell whether job {_job_key(args)}{seen} has ended",
          file=sys.stderr)  # fmt: skip
    return EXIT_WAIT_UNKNOWN


def _file_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"outputdirectoryid": args.output_directory_id, "attempt": args.attempt}


async def job_file_list(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        return await _print_list(
            args,
            api,
            f"{_job(args)}/files",
            ["NAME", "TYPE", "SIZE", "MODIFIED"],
            _file_row,
            directory=args.directory,
            **_file_params(args),
        )


@dataclass(slots=True)
class _Followed:
    """Where `job file stream` is: the attempt whose file it prints, and how much it printed."""

    attempt: int
    offset: int = 0
    answered: bool = False  # the server has followed this attempt's file once
    unplaced: bool = False  # the job has not been placed yet (no node has its file)


def _attempt(job: dict[str, Any]) -> int:
    """The job's latest attempt (1 before its first starts)."""
    return max(_get(job, "properties.attempt") or 0, 1)


def _attempt_over(job: dict[str, Any], attempt: int) -> bool:
    """Has `attempt` ended for good (the job has ended, or runs a later attempt)?"""
    return _get(job, "properties.state") in ENDED or _attempt(job) > attempt


async def job_file_stream(args: argparse.Namespace) -> int:
    """Print the file as it grows, attempt after attempt, until the job ends (with --attempt:
    until that attempt ends), riding out a restart of the daemon."""
    path = f"{_job(args)}/files/{_relative_path('--file', args.file)}"
    sys.stdout.flush()
    async with _client(args) as api:
        server = _Reconnecting(api)
        job = await server.call(lambda: api.get(_job(args)))
        followed = _Followed(args.attempt or _attempt(job))
        created = _get(job, "properties.creationTime")
        while True:
            last = _attempt_over(job, followed.attempt)  # the server sends the rest, then ends
            followed.unplaced = not last and not _get(job, "properties.attempt")
            await server.call(functools.partial(_print_file, api, server, path, args, followed))
            if last:
                if not _get(job, "properties.attempt"):  # ended before it was placed
                    raise ClientError(f"job {args.name!r} never ran: it has no output")
                return 0
            job = await _job_again(args, api, server)
            if _get(job, "properties.creationTime") != created:  # not the job it followed
                raise ClientError(f"cannot follow job {_job_key(args)} any more: it was "
                                  "deleted, and a new job took its name")  # fmt: skip
            if args.attempt is None and _attempt(job) > followed.attempt:
                print(f"attempt {followed.attempt} ended; following attempt {_attempt(job)}",
                      file=sys.stderr, flush=True)  # fmt: skip
                followed = _Followed(_attempt(job))
            await asyncio.sleep(0.1)  # (a stopping daemon ends each follow at once)


async def _print_file(api: Client, server: _Reconnecting, path: str, args: argparse.Namespace,
                      followed: _Followed) -> None:  # fmt: skip
    """The followed attempt's file from where it was left, printed as it comes, until the
    server ends its answer (the attempt has ended, or the daemon stops)."""
    params = {"follow": "true", "attempt": str(followed.attempt),
              "outputdirectoryid": args.output_directory_id}  # fmt: skip
    headers = {"Range": f"bytes={followed.offset}-"} if followed.offset else None
    try:
        async with api.stream(path, params=params, headers=headers) as response:
            server.reached()
            followed.answered = True
            async for chunk in response.content.iter_any():
                _write_out(chunk)
                followed.offset += len(chunk)
    except ApiError as exc:  # past its end, or never written: nothing more to print
        if exc.status == 404 and followed.unplaced:  # its node, to come, will have the file
            await asyncio.sleep(UNPLACED_POLL)
        elif exc.status != 416 and not (exc.status == 404 and followed.answered):
            raise


def _write_out(chunk: bytes) -> None:
    """Bytes to stdout as they are, where stdout has a buffer (else decoded)."""
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        sys.stdout.write(chunk.decode(errors="replace"))
    else:
        out.write(chunk)
    (out or sys.stdout).flush()


async def _job_again(args: argparse.Namespace, api: Client, server: _Reconnecting) -> dict:
    """The followed job as it is now; ClientError if it is gone (deleted)."""
    try:
        return await server.call(lambda: api.get(_job(args)))
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise ClientError(f"cannot follow job {_job_key(args)} any more: {exc.message}") from None


async def job_exec(args: argparse.Namespace) -> int:
    """A command beside the job's task on node K, its output as it comes; its exit code.
    With --json: the API's lines as they come (`{"stdout": ...}`, `{"stderr": ...}`, then
    `{"exitCode": ...}`), on stdout."""
    parts, node = args.cmd, args.node  # (cli.main takes all after -- as the command)
    command = parts[0] if len(parts) == 1 else " ".join(shlex.quote(part) for part in parts)
    if not command:
        raise InputError("give the command after --: batchd job exec NAME -- CMD ...")
    body = {"command": command, "node": node}
    code: int | None = None
    async with _client(args) as api, api.stream(f"{_job(args)}/exec", method="POST",
                                                body=body) as response:  # fmt: skip
        async for line in response.content:
            message = json.loads(line)
            if args.json:
                sys.stdout.write(json.dumps(message) + "\n")
                sys.stdout.flush()
                code = message.get("exitCode", code)
                continue
            if "stdout" in message:
                sys.stdout.write(message["stdout"])
                sys.stdout.flush()
            if "stderr" in message:
                sys.stderr.write(message["stderr"])
                sys.stderr.flush()
            if "exitCode" in message:
                code = message["exitCode"]
                if message.get("error"):
                    print(f"batchd: error: {message['error'].get('message')}", file=sys.stderr)
    return 1 if code is None else code


# -- tokens -----------------------------------------------------------------------------------
async def token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.token_name, "role": args.role}
    if args.scopes:
        body["workspaces"] = args.scopes
    if args.node:
        body["node"] = args.node
    async with _client(args) as api:
        _, answer = await api.call("POST", "/v1/tokens", body=body)
    if args.json:
        print(json.dumps(answer))
        return 0
    print(answer.get("token"))
    ident = str(answer.get("id", "")).rpartition("/")[2]
    note = f"token {ident} ({args.role}) for {args.token_name}: it is shown only this once"
    print(note, file=sys.stderr)
    return 0


def _token_row(t: dict[str, Any]) -> list[Any]:
    fields = {**t, **(t.get("properties") or {})}  # flat, or in a resource's properties
    return [
        str(fields.get("id", "")).rpartition("/")[2], fields.get("name"), fields.get("role"),
        ",".join(fields.get("workspaces") or ()) or "(all)", fields.get("node") or "-",
        _when(fields.get("creationTime")), fields.get("createdBy"),
    ]  # fmt: skip


def _file_row(f: dict[str, Any]) -> list[Any]:
    fields = {**f, **(f.get("properties") or {})}
    kind = "directory" if fields.get("isDirectory") else "file"
    return [f.get("name"), kind, fields.get("contentLength"), _when(fields.get("lastModified"))]


async def token_list(args: argparse.Namespace) -> int:
    header = ["ID", "NAME", "ROLE", "WORKSPACES", "NODE", "CREATED", "CREATED BY"]
    async with _client(args) as api:
        return await _print_list(args, api, "/v1/tokens", header, _token_row)


async def token_revoke(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        status, answer = await api.call("DELETE", f"/v1/tokens/{_named('token id', args.id)}")
    return _print_write(args, status, answer, f"revoked token {args.id}")


# -- events and replay ------------------------------------------------------------------------
def _event_line(e: dict[str, Any]) -> str:
    return (
        f"{e.get('position'):>9}  {e.get('recordedAt')}  {e.get('type'):<26} "
        f"{e.get('stream'):<44} {e.get('actor')}"
    )


async def events_tail(args: argparse.Namespace) -> int:
    show = json.dumps if args.json else _event_line
    async with _client(args) as api:
        after, head = args.after, await _head(api)
        asked_head = after is None  # (the server answered, then)
        if after is None:
            if head is None:
                raise ClientError("the daemon is not ready (starting, or another writer took "
                                  "its log); give --after POSITION")  # fmt: skip
            after = max(0, head - args.lines)
        elif head is not None and after >= head:  # nothing to show (yet): say why, as offline
            print(cli_log.nothing_after(after, head, args.follow), file=sys.stderr)
        if args.follow:
            await _follow(api, after, show, asked_head)
            return 0
        async for event in api.items("/v1/events", after=after, top=1000):
            print(show(event))
    return 0


async def events_export(args: argparse.Namespace) -> int:
    """`events export` through the daemon: the same NDJSON as offline on --store."""
    start, end = cli_replay.export_bounds(args)
    bounds = {"from": start, "to": end}
    query = {k: to_iso(v) for k, v in bounds.items() if v is not None}
    write = sys.stdout.write
    async with _client(args) as api:
        try:
            async for event in api.items("/v1/events", top=1000, stream=args.stream, **query):
                write(json.dumps(event) + "\n")
        except ApiError as exc:
            if exc.status == 404 and args.stream is not None:
                raise ClientError(exc.message) from None  # as offline: no such stream
            raise
    return 0


async def _follow(api: Client, after: int, show: Callable[[dict[str, Any]], str],
                  answered: bool) -> None:  # fmt: skip
    """Print the event stream from `after` on; reconnect (resuming) if the server drops it
    (`answered`: the server has answered this command already)."""
    server = _Reconnecting(api, answered=answered)
    last = after
    headers = {"Accept": "text/event-stream"}

    async def stream() -> None:
        nonlocal last
        async with api.stream(
            "/v1/events/stream", params={"after": str(last)}, headers=headers
        ) as response:
            server.reached()
            async for message in server_events(response):
                event = json.loads(message.data)
                print(show(event), flush=True)
                last = int(message.id) if message.id else event.get("position", last)

    while True:
        await server.call(stream)
        await asyncio.sleep(0.1)


async def _head(api: Client) -> int | None:
    """The log's head, as the daemon has it; None while it is not ready to say (503)."""
    try:
        return (await api.get("/readyz")).get("position", 0)
    except ApiError as exc:
        if exc.status != 503:
            raise
        return None


async def replay(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        try:
            world = await api.get("/v1/replay", at=args.at, position=args.position)
        except ApiError as exc:
            raise _as_option(exc, {"at": "--at", "position": "--position"}) from None
    cli_replay.print_world(world, args.json)
    return 0


def _as_option(exc: ApiError, options: dict[str, str]) -> ClientError:
    """A 400 about one query parameter, as the CLI option the user gave it with (`--at: ...`,
    as offline); any other error as it is."""
    if exc.status != 400 or len(exc.details) != 1:
        return exc
    name, problem = exc.details[0].get("name"), exc.details[0].get("value")
    if name not in options or not isinstance(problem, str):
        return exc
    return ClientError(f"{options[name]}: {problem}")
