"""The HTTP API under /v1 (docs/api.md): resources in ARM's shape, bearer tokens, writes
through `Control`, read-your-writes with `?after=`, events as JSON and Server-Sent Events.

Handlers are thin: authorise, parse, run a command from scheduler/commands.py (or read the
read models), shape the answer with scheduler/resources.py. Every error is JSON in the error
shape, with the field paths at fault in `details`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from aiohttp import hdrs, web

from batchd.events import errors, jsonform
from batchd.events.envelope import RecordedEvent
from batchd.events.secrets import Keyring, mask_paths
from batchd.events.store import MAX_POSITION, EventStore
from batchd.events.timeutil import parse_iso, to_iso
from batchd.events.types import CLUSTER_SECRET_PATHS, JOB_SECRET_PATHS, VOCABULARY
from batchd.projections import history, lifecycle, views
from batchd.projections.model import (
    EXECUTION_STATE,
    LIVE_STATES,
    RUNNING,
    Job,
    ReadModels,
    job_key,
)
from batchd.projections.runner import Runner, moment_note
from batchd.scheduler import auth, commands, files, openapi, resources
from batchd.scheduler.auth import AuthError, Principal
from batchd.scheduler.clusterspec import parse_cluster
from batchd.scheduler.commands import CommandError
from batchd.scheduler.control import REQUEST, Control
from batchd.scheduler.jobspec import parse_job
from batchd.scheduler.schema import (
    DocumentError,
    DuplicateKey,
    NumberTooLong,
    integer,
    loads,
    string,
    unwrap,
)
from batchd.scheduler.vmsizes import Catalog

logger = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024  # bytes
_DIGITS = re.compile(r"-?[0-9]{1,20}")  # a whole number of a length a query could mean
READ_WAIT = 10.0  # seconds a read with ?after= waits for the read models
PAGE = 100
MAX_PAGE = 1000
SSE_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream
FOLLOW_POLL = 0.25  # seconds between looks at a followed file
EXEC_TIMEOUT = 600.0  # seconds an exec may go without output before it is given up
EXEC_CHECK = 1.0  # seconds between looks at an exec's node, job and caller while it is quiet
POSITION_HEADER = "Batchd-Position"
STATES = tuple(EXECUTION_STATE)  # batchd's job states, in lifecycle order


class Api:
    """What the handlers share: the log, the read models, the write path, the settings."""

    def __init__(self, store: EventStore, runner: Runner, control: Control,
                 keyring: Keyring | None, mount_root: Path,
                 catalog: Catalog) -> None:  # fmt: skip
        self.store = store
        self.catalog = catalog  # the VM sizes clusters may have
        self.runner = runner
        self.control = control
        self.keyring = keyring
        self.mount_root = mount_root
        self.closing = asyncio.Event()  # set when the daemon stops: streams end
        self.serving = False  # the daemon has started (its read models restored): see starting
        self.heard_from: dict[str, float] = {}  # node id -> monotonic time of its last message
        self.nodes: Any = None  # the agent channel (scheduler/nodes.py), for exec
        # the daemon's update of clusters' allocation states, run after a cluster's write so
        # that its answer shows the state that write leads to (None: none to run)
        self.resize_changes: Callable[[], Awaitable[int | None]] | None = None

    @property
    def models(self) -> ReadModels:
        return self.runner.models


API_KEY = web.AppKey("api", Api)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)
REQUEST_KEY = web.RequestKey("request_id", uuid.UUID)


# -- errors ------------------------------------------------------------------------------------
def error_response(status: int, code: str, message: str,
                   details: list[dict[str, str]] | None = None) -> web.Response:  # fmt: skip
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return web.json_response(body, status=status)


def retry_soon(message: str) -> web.Response:
    """503 for what passes by itself (a daemon starting, its log briefly unreachable, its
    read models behind): `Retry-After` tells clients to send the request again."""
    response = error_response(503, "ServiceUnavailable", message)
    response.headers["Retry-After"] = "1"
    return response


_CODES = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 409: "Conflict", 413: "PayloadTooLarge",
    415: "UnsupportedMediaType", 416: "RangeNotSatisfiable", 503: "ServiceUnavailable",
}  # fmt: skip


def _code(status: int) -> str:
    return _CODES.get(status, "Error")


def _status_of(exc: Exception) -> int | None:
    """The HTTP status of an error a request may meet (None: a bug, 500)."""
    if isinstance(exc, CommandError | AuthError):
        return exc.status
    simple = {lifecycle.InvalidTransition: 409, files.FileNotFound: 404,
              RangeNotSatisfiable: 416, TimeoutError: 503}  # fmt: skip
    return next((status for kind, status in simple.items() if isinstance(exc, kind)), None)


REQUEST_HEADER = "X-Request-Id"


@web.middleware
async def request_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """Each request has an id, the client's `X-Request-Id` when it is a UUID, else a new one:
    answered in the same header, and the correlation id of every event the request leads to."""
    try:
        request_id = uuid.UUID(request.headers.get(REQUEST_HEADER, ""))
    except ValueError:
        request_id = uuid.uuid4()
    request[REQUEST_KEY] = request_id
    token = REQUEST.set(request_id)
    try:
        return await handler(request)
    finally:
        REQUEST.reset(token)


async def _answer_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_KEY in request:
        response.headers[REQUEST_HEADER] = str(request[REQUEST_KEY])


@web.middleware
async def starting_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """Until the daemon has started (leading the log, its read models restored), every
    request but /healthz and /readyz is answered 503: the read models would answer wrong
    (a job not found that exists)."""
    if request.app[API_KEY].serving or request.path in ("/healthz", "/readyz"):
        return await handler(request)
    return retry_soon("the daemon is starting; retry")


# what the server decodes (a body in any other coding would be taken as it is: refused)
CONTENT_CODINGS = ("identity", "gzip", "deflate")


@web.middleware
async def input_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """What every request's input must be, whichever handler reads it: each query parameter
    given once (else 400: which one counts?) and one the OpenAPI document names for the
    request (else 400); a body in a coding the server decodes (else
    415), and in the coding it names, whole (else 400)."""
    twice = next((k for k in request.query if len(request.query.getall(k)) > 1), None)
    if twice is not None:
        raise DocumentError(twice, "is given twice in the query")
    unknown, known = _unknown_query(request)
    if unknown is not None:  # (a mistyped filter would otherwise list everything)
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        if not unknown:
            raise DocumentError("query", f"names a parameter with no name ({takes})")
        raise DocumentError(unknown, f"is not a query parameter of this request ({takes})")
    coding = request.headers.get("Content-Encoding")
    if coding is not None and coding.strip().lower() not in CONTENT_CODINGS:
        message = f"Content-Encoding {coding!r} is not one of {', '.join(CONTENT_CODINGS)}"
        return error_response(415, _code(415), message)
    try:
        return await handler(request)
    except web.RequestPayloadError:
        message = "the body cannot be read: it is not in its Content-Encoding, or was cut short"
        return error_response(400, "BadRequest", message)


def _unknown_query(request: web.Request) -> tuple[str | None, frozenset[str]]:
    """A query parameter the request's operation does not take, if any, and those it takes
    (routes outside the OpenAPI document, such as the agents', are not looked at)."""
    route = request.match_info.route.resource
    if route is None or not request.path.startswith("/v1/"):  # (probes: whatever they add)
        return None, frozenset()
    method = "GET" if request.method == "HEAD" else request.method  # (aiohttp's, for a GET)
    known = _query_names().get(openapi.route_key(method, route.canonical))
    if known is None:
        return None, frozenset()
    return next((k for k in request.query if k not in known), None), known


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx (no route, a method the path has not, a body too large) in the
    API's error shape; a 405 keeps its Allow header, which names the methods the path has."""
    message = exc.reason if exc.status != 413 else f"the body is over {MAX_BODY} bytes"
    response = error_response(exc.status, _code(exc.status), message)
    if hdrs.ALLOW in exc.headers:
        response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    try:
        return await handler(request)
    except DocumentError as exc:
        details = [{"name": path or "body", "value": rule} for path, rule in exc.problems]
        return error_response(400, "BadRequest", str(exc), details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except errors.FencedError:
        message = "another daemon has taken over the event log; this one is stopping"
        return error_response(503, "ServiceUnavailable", message)
    except errors.StoreUnavailable as exc:
        logger.warning("api.store_unavailable", error=str(exc))
        return retry_soon("the event log is unavailable; retry")
    except errors.SecretKeyError as exc:  # the daemon's keys: its operators' to mend
        logger.error("api.secret_key", method=request.method, path=request.path, error=str(exc))
        message = str(exc)
        if isinstance(exc, errors.SecretUnopenable):
            message += ": this daemon's secret keys are not those the log was written with"
        message += ' (docs/event-log.md, "Secrets")'
        return error_response(500, "InternalError", message)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        status = _status_of(exc)
        if status is None:
            logger.exception("api.failed", method=request.method, path=request.path)
            return error_response(500, "InternalError", "the request failed; see the daemon's log")
        if status == 503:
            return retry_soon("the read models are behind; retry")
        return _refused(exc, status)


def _refused(exc: Exception, status: int) -> web.Response:
    """The answer to a request refused with `exc`, and the headers its status asks for."""
    response = error_response(status, _code(status), str(exc))
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="batchd"'
    if isinstance(exc, RangeNotSatisfiable) and exc.size is not None:
        response.headers["Content-Range"] = f"bytes */{exc.size}"
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """Every /v1 request but the OpenAPI document names a token (an agent's is refused)."""
    if request.path.startswith("/v1/") and request.path != "/v1/openapi.json":
        principal = auth.authenticate(request.app[API_KEY].models,
                                      request.headers.getall("Authorization", []))  # fmt: skip
        if principal.role == "agent":
            raise AuthError("an agent credential cannot use the user API", 403)
        request[PRINCIPAL_KEY] = principal
    return await handler(request)


@web.middleware
async def after_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """`?after=N` on a read: answer once the read models have reached position N."""
    if (
        request.method == "GET"
        and "after" in request.query
        and (
            not request.path.startswith("/v1/events")  # there, `after` is where the events start
        )
    ):
        after = _int_query(request, "after", 0)
        runner = request.app[API_KEY].runner
        if runner.position < after:
            head = (await request.app[API_KEY].store.head()).position
            if after > head:
                raise DocumentError("after", f"is beyond the log's head ({head})")
            await runner.wait_for(after, READ_WAIT)
    return await handler(request)


@web.middleware
async def names_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> Any:
    """The names in a resource path follow the naming rule, or the request is refused (400)
    naming which: a name nothing could ever have been created under is bad input, not a
    missing resource."""
    info = request.match_info
    if "ws" in info:
        commands.check_name("workspace", info["ws"])
    if "exp" in info:
        commands.check_name("experiment", info["exp"])
    if "name" in info:
        route = info.route.resource.canonical if info.route.resource is not None else ""
        commands.check_name("cluster" if "/clusters/" in route else "job", info["name"])
    return await handler(request)


# -- request helpers ---------------------------------------------------------------------------
def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL_KEY]


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DocumentError("body", f"is not valid JSON ({exc})") from None
    except DuplicateKey as exc:
        raise DocumentError(exc.key, "is given twice in one object") from None
    except NumberTooLong as exc:
        raise DocumentError("body", str(exc)) from None
    except RecursionError:
        raise DocumentError("body", "is nested too deeply") from None


def _int_query(request: web.Request, name: str, default: int, low: int = 0,
               high: int = MAX_POSITION) -> int:  # fmt: skip
    text = request.query.get(name)
    return default if text is None else _whole(text, name, low, high)


def _bool_query(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise DocumentError(name, f"must be true or false, not {text[:40]!r}")
    return text in ("true", "1")


def _whole(text: str, name: str, low: int, high: int) -> int:
    """A query parameter or header as a whole number from `low` to `high`, in ASCII digits
    (Python's int() also takes other scripts' digits, `_` and blanks)."""
    if not _DIGITS.fullmatch(text):
        shown = text if len(text) <= 40 else f"{text[:40]}..."
        raise DocumentError(name, f"must be a whole number, not {shown!r}")
    value = int(text)
    if value < low:
        raise DocumentError(name, f"must be at least {low}")
    if value > high:
        raise DocumentError(name, f"must be at most {high}")
    return value


def _written(document: dict[str, Any], position: int | None, request: web.Request,
             status: int = 200) -> web.Response:  # fmt: skip
    if position is None:
        position = request.app[API_KEY].runner.position
    return web.json_response({**document, "position": position}, status=status,
                             headers={POSITION_HEADER: str(position)})  # fmt: skip


def _page(request: web.Request, items: list[Any],
          shape: Callable[[Any], Any] | None = None) -> web.Response:  # fmt: skip
    """A list page: `top` items from `skiptoken` on (each through `shape`, if given: only
    the page's items are shaped), and the link to the next page."""
    top = _int_query(request, "top", PAGE, 1, MAX_PAGE)
    start = _int_query(request, "skiptoken", 0)
    chunk = items[start : start + top]
    if shape is not None:
        chunk = [shape(item) for item in chunk]
    next_link = None
    if start + top < len(items):
        query = {**request.query, "skiptoken": str(start + top), "top": str(top)}
        next_link = str(request.rel_url.with_query(query))
    return web.json_response({"value": chunk, "nextLink": next_link})


def _ws(request: web.Request, role: str = "viewer") -> str:
    workspace = request.match_info["ws"]
    _principal(request).require(role, workspace)
    return workspace


# -- workspaces and experiments ----------------------------------------------------------------
def _plain_body(document: Any) -> None:
    """A workspace or experiment body: `{}`, or Batch AI's envelope with empty properties."""
    properties, prefix = unwrap(document)
    if properties is None:  # (`"properties": null`, as some clients send it)
        return
    if not isinstance(properties, dict):  # (false, 0, "" and [] too: not the {} it stands for)
        raise DocumentError(prefix or "body", "must be a JSON object")
    if properties:
        raise DocumentError(f"{prefix}.{next(iter(properties))}".lstrip("."),
                            "is not a known property")  # fmt: skip


async def list_workspaces(request: web.Request) -> web.Response:
    principal = _principal(request)
    principal.require("viewer")
    m = request.app[API_KEY].models
    items = [resources.workspace(w) for name, w in sorted(m.workspaces.items())
             if principal.sees(name)]  # fmt: skip
    return _page(request, items)


async def put_workspace(request: web.Request) -> web.Response:
    ws = _ws(request, "admin")
    _plain_body(await _body(request))
    api = request.app[API_KEY]
    created = await api.control.run(
        lambda m: [] if ws in m.workspaces else commands.create_workspace(m, ws, _actor(request)),
        structural=True,
    )
    return _written(resources.workspace(api.models.workspaces[ws]), created, request,
                    201 if created else 200)  # fmt: skip


async def get_workspace(request: web.Request) -> web.Response:
    ws = _ws(request)
    found = request.app[API_KEY].models.workspaces.get(ws)
    if found is None:
        raise CommandError(f"no workspace {ws!r}", 404)
    return web.json_response(resources.workspace(found))


async def delete_workspace(request: web.Request) -> web.Response:
    ws = _ws(request, "admin")
    return await _structural(request, lambda m: commands.delete_workspace(m, ws, _actor(request)))


def _actor(request: web.Request) -> str:
    return _principal(request).actor


async def _structural(request: web.Request, decide, status: int = 202) -> web.Response:
    """Run a structural command (it runs alone) and answer with the position it reached."""
    position = await request.app[API_KEY].control.run(decide, structural=True)
    return _written({}, position, request, status)


async def list_experiments(request: web.Request) -> web.Response:
    ws = _ws(request)
    m = request.app[API_KEY].models
    commands.find_workspace(m, ws)
    items = [resources.experiment(x) for key, x in sorted(m.experiments.items())
             if x.workspace == ws]  # fmt: skip
    return _page(request, items)


async def put_experiment(request: web.Request) -> web.Response:
    ws = _ws(request, "operator")
    exp = request.match_info["exp"]
    _plain_body(await _body(request))
    api = request.app[API_KEY]
    key = f"{ws}/{exp}"
    created = await api.control.run(
        lambda m: [] if key in m.experiments
        else commands.create_experiment(m, ws, exp, _actor(request)),
        structural=True,
    )  # fmt: skip
    return _written(resources.experiment(api.models.experiments[key]), created, request,
                    201 if created else 200)  # fmt: skip


async def get_experiment(request: web.Request) -> web.Response:
    ws = _ws(request)
    exp = request.match_info["exp"]
    m = request.app[API_KEY].models
    commands.find_experiment(m, ws, exp)
    return web.json_response(resources.experiment(m.experiments[f"{ws}/{exp}"]))


async def delete_experiment(request: web.Request) -> web.Response:
    ws = _ws(request, "operator")
    exp = request.match_info["exp"]
    return await _structural(
        request, lambda m: commands.delete_experiment(m, ws, exp, _actor(request))
    )


# -- clusters ----------------------------------------------------------------------------------
async def list_clusters(request: web.Request) -> web.Response:
    ws = _ws(request)
    m = request.app[API_KEY].models
    commands.find_workspace(m, ws)
    items = [resources.cluster(m, c) for c in m.clusters.values() if c.workspace == ws]
    return _page(request, sorted(items, key=lambda c: c["name"]))


async def put_cluster(request: web.Request) -> web.Response:
    ws = _ws(request, "admin")
    name = request.match_info["name"]
    document = await _body(request)
    api = request.app[API_KEY]

    async def decide(m: ReadModels):
        existing = m.cluster_ids.get(f"{ws}/{name}")
        if existing is None:
            return commands.create_cluster(m, ws, name, document, _actor(request), api.catalog)
        cluster = m.clusters[existing]
        if cluster.deleting:  # its name is free again once it has gone
            raise CommandError(f"cluster {name!r} is being deleted: create it again once it "
                               "has gone")  # fmt: skip
        stored = resources.opened(await resources.cluster_spec(api.store, cluster), api.keyring)
        stored["scaleSettings"] = cluster.scale_settings  # as PATCH left it
        wanted = commands.cluster_properties(parse_cluster(document, api.catalog))
        if _masked(wanted, CLUSTER_SECRET_PATHS) == _masked(stored, CLUSTER_SECRET_PATHS):
            return []  # (secret values not compared: see _masked)
        raise CommandError(f"cluster {name!r} exists with another document: only its "
                           "scaleSettings may change (PATCH)")  # fmt: skip

    created = await api.control.run(decide, structural=True)
    return await _cluster_answer(request, ws, name, created, 201 if created else 200)


async def _cluster_answer(request: web.Request, ws: str, name: str, position: int | None,
                          status: int) -> web.Response:  # fmt: skip
    api = request.app[API_KEY]
    if position is not None and api.resize_changes is not None:  # (a write: its state now)
        position = await api.resize_changes() or position
    found = commands.find_cluster(api.models, ws, name)
    spec = await resources.cluster_spec(api.store, found)
    return _written(resources.cluster(api.models, found, spec), position, request, status)


async def get_cluster(request: web.Request) -> web.Response:
    ws = _ws(request)
    api = request.app[API_KEY]
    found = commands.find_cluster(api.models, ws, request.match_info["name"])
    spec = await resources.cluster_spec(api.store, found)
    return web.json_response(resources.cluster(api.models, found, spec))


async def patch_cluster(request: web.Request) -> web.Response:
    ws = _ws(request, "admin")
    name = request.match_info["name"]
    document = await _body(request)
    api = request.app[API_KEY]
    position = await api.control.run(
        lambda m: commands.update_scale_settings(
            m, ws, name, document, _actor(request), api.catalog
        ),
        structural=True,
    )
    return await _cluster_answer(request, ws, name, position, 200)


async def delete_cluster(request: web.Request) -> web.Response:
    ws = _ws(request, "admin")
    name = request.match_info["name"]
    return await _structural(
        request, lambda m: commands.delete_cluster(m, ws, name, _actor(request))
    )


# -- jobs --------------------------------------------------------------------------------------
def _job_filters(request: web.Request, m: ReadModels, jobs: list[Job]) -> list[Job]:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise DocumentError("state", f"must be one of {', '.join(STATES)}")
    cluster = request.query.get("cluster")
    out = []
    for j in jobs:
        if state is not None and j.state != state:
            continue
        if cluster is not None and not _on_cluster(m, j, cluster):
            continue
        out.append(j)
    known = cluster is None or out or _known_cluster(m, jobs, cluster, _principal(request))
    if not known:
        raise DocumentError("cluster", f"no cluster {cluster!r}, nor a job that ran on one of "
                            "that name (a mistyped name lists nothing)")  # fmt: skip
    return out


def _on_cluster(m: ReadModels, job: Job, cluster: str) -> bool:
    """Is `cluster` the job's cluster, by id or name?"""
    where = views.job_cluster(m, job)
    return cluster in (job.cluster, where[1] if where else None)


def _known_cluster(m: ReadModels, jobs: list[Job], cluster: str, principal: Principal) -> bool:
    """Does `cluster` name (or id) a cluster the principal may see, or one that `jobs` ran
    on (since deleted)? (Others' clusters are as unknown to it as those that never were.)"""
    seen = [c for c in m.clusters.values() if principal.sees(c.workspace)]
    return any(cluster in (c.name, c.cluster_id) for c in seen) or any(
        _on_cluster(m, j, cluster) for j in jobs
    )


async def list_jobs(request: web.Request) -> web.Response:
    ws = _ws(request)
    exp = request.match_info["exp"]
    m = request.app[API_KEY].models
    commands.find_experiment(m, ws, exp)
    jobs = [j for j in m.jobs.values()
            if j.workspace == ws and j.experiment == exp and not j.detached]  # fmt: skip
    chosen = _job_filters(request, m, jobs)
    return _page(request, chosen, lambda j: resources.job(m, j))


async def list_all_jobs(request: web.Request) -> web.Response:
    principal = _principal(request)
    principal.require("viewer")
    m = request.app[API_KEY].models
    workspace = request.query.get("workspace")
    experiment = request.query.get("experiment")
    jobs = [j for j in m.jobs.values() if principal.sees(j.workspace) and not j.detached
            and (workspace is None or j.workspace == workspace)
            and (experiment is None or j.experiment == experiment)]  # fmt: skip
    if workspace is not None and not (workspace in m.workspaces and principal.sees(workspace)):
        raise DocumentError("workspace", f"no workspace {workspace!r} (a mistyped name lists "
                                         "nothing)")  # fmt: skip
    if experiment is not None and not any(
        x.name == experiment and (workspace is None or x.workspace == workspace)
        and principal.sees(x.workspace) for x in m.experiments.values()
    ):  # fmt: skip
        raise DocumentError("experiment", f"no experiment {experiment!r} (a mistyped name lists "
                                          "nothing)")  # fmt: skip
    chosen = _job_filters(request, m, jobs)
    return _page(request, chosen, lambda j: resources.job(m, j))


async def put_job(request: web.Request) -> web.Response:
    ws = _ws(request, "operator")
    exp, name = request.match_info["exp"], request.match_info["name"]
    document = await _body(request)
    api = request.app[API_KEY]
    reference = parse_job(document).cluster
    if reference:  # a cluster of another workspace: the token must reach that one too
        where = "properties." if "properties" in document else ""
        cluster_ws = commands.cluster_workspace(reference, ws, where)
        try:
            _principal(request).require("operator", cluster_ws)
        except AuthError as exc:  # (the request's own workspace passed: say what did not)
            raise AuthError(f"{exc}: {where}cluster names a cluster of workspace "
                            f"{cluster_ws!r}", exc.status) from None  # fmt: skip

    async def decide(m: ReadModels):
        existing = commands.current_job(m, ws, exp, name)
        if existing is None:
            return commands.submit_job(m, ws, exp, name, document, _actor(request),
                                       catalog=api.catalog)  # fmt: skip
        stored = resources.opened(await resources.job_spec(api.store, existing), api.keyring)
        wanted = parse_job(document)
        target = commands.resolve_cluster(m, wanted.cluster, ws, "")
        # the cluster compared as the one it names (a name, its id as GET shows it, a Batch
        # AI resource id), the rest as written, but for secret values: were they compared,
        # whoever may PUT the job could test guesses of them (200 or 409)
        same = _comparable(stored) == _comparable(wanted.properties)
        if same and target == existing.cluster:
            return []
        raise CommandError(f"job {name!r} exists already in {ws}/{exp} with another document")

    created = await api.control.run(decide, key=job_key(ws, exp, name))
    found = commands.find_job(api.models, ws, exp, name)
    if created:  # the document just accepted: no need to read it back
        submitted = {"spec": parse_job(document).properties}  # as JobSubmitted holds it
        spec = mask_paths(submitted, JOB_SECRET_PATHS)["spec"]
    else:
        spec = await resources.job_spec(api.store, found)
    return _written(resources.job(api.models, found, spec), created, request,
                    201 if created else 200)  # fmt: skip


def _comparable(properties: dict[str, Any]) -> dict[str, Any]:
    """A job document without its cluster and with its secret values as ***."""
    spec = _masked(properties, JOB_SECRET_PATHS)
    return {k: v for k, v in spec.items() if k != "cluster"}


def _masked(properties: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """A document with the values at `paths` (`spec.`...) as ***: a PUT again that compared
    them would let whoever may make it test guesses of them by the answer (200 or 409)."""
    return mask_paths({"spec": properties}, paths)["spec"]


async def get_job(request: web.Request) -> web.Response:
    ws = _ws(request)
    api = request.app[API_KEY]
    found = commands.find_job(api.models, ws, request.match_info["exp"], request.match_info["name"])
    spec = await resources.job_spec(api.store, found)
    return web.json_response(resources.job(api.models, found, spec))


async def terminate_job(request: web.Request) -> web.Response:
    ws = _ws(request, "operator")
    exp, name = request.match_info["exp"], request.match_info["name"]
    api = request.app[API_KEY]
    position = await api.control.run(
        lambda m: commands.terminate_job(m, ws, exp, name, _actor(request)),
        key=job_key(ws, exp, name),
    )
    found = commands.find_job(api.models, ws, exp, name)
    return _written(resources.job(api.models, found), position, request, 202)


async def delete_job(request: web.Request) -> web.Response:
    ws = _ws(request, "operator")
    exp, name = request.match_info["exp"], request.match_info["name"]
    api = request.app[API_KEY]
    position = await api.control.run(
        lambda m: commands.delete_job(m, ws, exp, name, _actor(request)),
        key=job_key(ws, exp, name),
    )
    done = await api.control.run(
        lambda m: commands.finish_job(m, ws, exp, name), key=job_key(ws, exp, name)
    )  # (a queued one: deleted now)
    position = done or position
    left = commands.current_job(api.models, ws, exp, name)  # a live one: terminating first
    return _written(resources.job(api.models, left) if left else {}, position, request, 202)


EXEC_FIELDS = {"command", "node"}


EXEC_COMMAND = string()  # as long as a job's command line may be
EXEC_TASK = integer(0)


def _exec_asked(api: Api, job: Job, body: Any) -> tuple[str, int]:
    """The command and task index an exec asks for, checked against the job."""
    if not isinstance(body, dict):
        raise DocumentError("body", "must be a JSON object")
    unknown = [k for k in body if k not in EXEC_FIELDS]
    if unknown:
        raise DocumentError(unknown[0], "is not a known property")
    command, task = body.get("command"), body.get("node", 0)
    if command is None:
        raise DocumentError("command", "is required: the command line to run")
    EXEC_COMMAND(command, "command")  # a string, with no NUL, of UTF-8
    if not command.strip():
        raise DocumentError("command", "must not be blank: the command line to run")
    task = EXEC_TASK(task, "node")  # a task index (0 and up)
    if job.state != RUNNING or api.nodes is None:
        raise CommandError(f"job {job.name!r} is {job.state}: only a running job takes exec")
    if task >= len(job.tasks):
        raise DocumentError("node", f"the job runs {len(job.tasks)} task(s): 0 to "
                                    f"{len(job.tasks) - 1}")  # fmt: skip
    if str(task) in job.task_exits:
        code = job.task_exits[str(task)]
        hint = ("; only task 0 runs the job's command (an MPI job's mpirun, a custom toolkit's "
                "command line), the other nodes' tasks end at once: exec on task 0"
                ) if task and code == 0 else ""  # fmt: skip
        raise CommandError(f"task {task} of job {job.name!r} has ended (exit code {code}){hint}")
    return command, task


async def exec_in_job(request: web.Request) -> web.StreamResponse:
    """Run a command beside a running job's task, in its environment, through its node's
    agent; the answer streams NDJSON lines: `{"stdout": ...}`, `{"stderr": ...}`, and last
    `{"exitCode": N}` (with `error` if it could not run)."""
    ws = _ws(request, "operator")
    api = request.app[API_KEY]
    job = commands.find_job(api.models, ws, request.match_info["exp"], request.match_info["name"])
    command, task = _exec_asked(api, job, await _body(request))
    exec_id, output = api.nodes.exec(job, task, command)
    node_id, attempt = job.tasks[task][0], job.attempt
    token_id = _principal(request).token_id
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    quiet = 0.0  # seconds without a word from the node
    try:
        while True:
            if token_id not in api.models.tokens:  # revoked: the command stops, and the
                api.nodes.cancel_exec(exec_id, job, task)  # answer breaks off unfinished,
                _break_off(request)  # as a followed file does
                return response
            try:
                msg = await asyncio.wait_for(output.get(), EXEC_CHECK)
            except TimeoutError:
                quiet += EXEC_CHECK
                if request.transport is None or request.transport.is_closing():
                    api.nodes.cancel_exec(exec_id, job, task)  # its caller went away
                    break
                gone = ("the daemon is stopping" if api.closing.is_set()
                        else api.nodes.exec_gone(job.job_id, attempt, node_id))  # fmt: skip
                if gone is None and quiet < EXEC_TIMEOUT:
                    continue
                api.nodes.cancel_exec(exec_id, job, task)  # if it runs on, it ends
                msg = _exec_unanswered(gone)
            quiet = 0.0
            line = {k: msg[k] for k in ("stdout", "stderr", "exitCode", "error") if k in msg}
            await response.write((json.dumps(line) + "\n").encode())
            if "exitCode" in msg:
                break
        await response.write_eof()
    except (ConnectionResetError, OSError):
        api.nodes.cancel_exec(exec_id, job, task)
    finally:
        api.nodes.exec_done(exec_id)
    return response


def _exec_unanswered(gone: str | None) -> dict[str, Any]:
    """The last line of an exec that no answer will end: its node is lost, its job's attempt
    ended or the daemon stops (`gone`), or the node has been silent for EXEC_TIMEOUT."""
    if gone:
        return {"exitCode": None, "error": {"code": "node_unreachable", "message": gone}}
    message = f"no word from the node in {EXEC_TIMEOUT:.0f} s"
    return {"exitCode": None, "error": {"code": "exec_timeout", "message": message}}


async def job_history(request: web.Request) -> web.Response:
    ws = _ws(request)
    exp, name = request.match_info["exp"], request.match_info["name"]
    api = request.app[API_KEY]
    job_ids = api.models.job_ids.get(job_key(ws, exp, name))
    if not job_ids:
        raise CommandError(f"no job named {name!r} in {ws}/{exp}, now or before", 404)
    incarnations = await history.job_timelines(api.store, job_ids, ws, exp)
    return web.json_response({"value": incarnations, "nextLink": None})


# -- files -------------------------------------------------------------------------------------
async def _output_dir(request: web.Request,
                      waits: bool = False) -> tuple[Job, Path, list[str] | None]:  # fmt: skip
    """The job, its output directory, and the nodes to ask for it (None: the daemon reads it
    on its own storage), the node of the file's task first (files.task_of: task k's own
    stdouterr files are on its node), then the attempt's other nodes in task order; for a
    reused name, only those whose directory is marked as this job's. A job never placed has
    none: FileNotFound, unless the request `waits` for its output (a follow) and the job
    may still run."""
    ws = _ws(request)
    api = request.app[API_KEY]
    job = commands.find_job(api.models, ws, request.match_info["exp"], request.match_info["name"])
    if not job.attempt and not (waits and job.state not in lifecycle.ENDED):
        when = "never ran" if job.state in lifecycle.ENDED else "has not started yet"
        raise files.FileNotFound(f"job {job.name!r} {when}: it has no output")
    directory_id = request.query.get("outputdirectoryid", files.STDOUTERR)
    attempt = _int_query(request, "attempt", max(job.attempt, 1), 1, max(job.attempt, 1))
    spec = await resources.job_spec(api.store, job)
    try:
        base, nodes = files.output_dir(spec, job, directory_id, attempt, api.mount_root), None
    except files.OffStorage as off:
        base, nodes = off.path, await _nodes_of(api, job, attempt)
        if not nodes or api.nodes is None:
            raise files.FileNotFound(f"{off}, and no node ran attempt {attempt}") from None
    if nodes is not None:
        task = files.task_of(directory_id, request.match_info.get("path", "."))
        if 0 < task < len(nodes):
            nodes = [nodes[task], *nodes[:task], *nodes[task + 1 :]]
        nodes = list(dict.fromkeys(nodes))
    if directory_id.lower() == files.STDOUTERR and views.name_reused(api.models, job):
        nodes = await _owning(api, job, attempt, base, nodes)  # not the earlier job's output
    return job, base, nodes


async def _owning(api: Api, job: Job, attempt: int, directory: Path,
                  nodes: list[str] | None) -> list[str] | None:  # fmt: skip
    """Of `nodes` (None: the daemon's storage), those where the stdouterr `directory` of a
    reused name is marked as `job`'s (each task marks its own node's: files.claim); until
    one is, FileNotFound (naming the nodes that could not say)."""
    if nodes is None:
        if await asyncio.to_thread(files.owner, directory) != job.job_id:
            raise files.FileNotFound(f"attempt {attempt} has written no output yet")
        return None
    marker = str(directory / files.OWNER)
    answers = await asyncio.gather(*(api.nodes.read_remote(n, marker) for n in nodes))
    asked = list(zip(nodes, answers, strict=True))
    owning = [n for n, answer in asked if _marked(answer) == job.job_id]
    if not owning:
        said = [(n, answer.get("error") or {}) for n, answer in asked]
        unanswered = [f"node {n}: {error.get('message')}" for n, error in said
                      if error.get("code") not in (None, "not_found")]  # fmt: skip
        why = f" ({'; '.join(unanswered)})" if unanswered else ""
        raise files.FileNotFound(f"attempt {attempt} has written no output yet{why}")
    return owning


def _marked(answer: dict[str, Any]) -> str:
    """The job id in a node's answer for an owner marker (files.OWNER)."""
    return (answer.get("data") or b"").decode(errors="replace").strip()


async def _nodes_of(api: Api, job: Job, attempt: int) -> list[str]:
    """The nodes of the tasks of `attempt`, in task order (from the log: ended jobs hold no
    tasks)."""
    for event in await api.store.read_stream(f"job-{job.job_id}"):
        if event.type == "JobScheduled" and event.data.get("attempt") == attempt:
            return [task["node"] for task in event.data.get("tasks") or ()]
    return []


async def _remote(api: Api, node: str, path: Path, field: str,
                  **options: Any) -> dict[str, Any]:  # fmt: skip
    """A node's answer for a file or directory it has (nodes.read_remote)."""
    return _checked(await api.nodes.read_remote(node, str(path), **options), node, field)


def _checked(answer: dict[str, Any], node: str, field: str) -> dict[str, Any]:
    """A node's answer; its error as the API's (a link on the way: 400 naming `field`)."""
    error = answer.get("error")
    if error is not None:
        if error.get("code") == "refused":
            raise DocumentError(field, files.LINKED)
        raise files.FileNotFound(f"node {node}: {error.get('message')}")
    return answer


def _open_local(base: Path, relative: str, field: str, mount_root: Path) -> int | None:
    """A descriptor of `base / relative` on the daemon's storage, no link on the way
    (files.open_inside): everything served is read from it. None: there is none (yet)."""
    try:
        return files.open_inside(base, relative, field, mount_root)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise CommandError(f"the daemon may not read {relative!r}", 403) from None


@contextlib.contextmanager
def _opened(base: Path, relative: str, field: str, mount_root: Path,
            missing: str) -> Iterator[int]:  # fmt: skip
    """`_open_local`'s descriptor, closed after; 404 `missing` if there is none."""
    fd = _open_local(base, relative, field, mount_root)
    if fd is None:
        raise files.FileNotFound(missing)
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(request: web.Request, entries: list[dict[str, Any]]) -> web.Response:
    prefix = request.query.get("directory", ".").strip("/")
    query = {k: v for k, v in request.query.items() if k in ("outputdirectoryid", "attempt")}
    for entry in entries:
        path = entry["name"] if prefix in ("", ".") else f"{prefix}/{entry['name']}"
        entry["lastModified"] = to_iso(int(entry["lastModified"] * 1_000_000))
        if not entry["isDirectory"]:
            link = request.rel_url.with_path(f"{request.path}/{path}").with_query(query)
            entry["downloadUrl"] = str(link)
    return _page(request, entries)


async def list_files(request: web.Request) -> web.Response:
    job, base, nodes = await _output_dir(request)
    api = request.app[API_KEY]
    relative = request.query.get("directory", ".")
    if nodes is not None:
        directory = files.joined(base, relative, "directory")
        return _entries(request, await _merged_listing(api, nodes, directory))
    yet = " (yet)" if job.state in LIVE_STATES else ""  # (an ended job writes no more)
    with _opened(base, relative, "directory", api.mount_root, f"no such directory{yet}") as fd:
        return _entries(request, files.listing(fd))


async def _merged_listing(api: Api, nodes: list[str], directory: Path) -> list[dict[str, Any]]:
    """A directory's entries on all of `nodes` (asked at once), by name: the tasks of a
    multi-node job on nodes of their own each write their own files there; a name on
    several nodes is listed as the first of them has it. A node that cannot answer adds
    nothing (reading one of its files names its error); when none can, the first node's
    error."""
    answers = await asyncio.gather(
        *(api.nodes.read_remote(node, str(directory), listing=True) for node in nodes)
    )
    listed = [answer for answer in answers if answer.get("error") is None]
    if not listed:
        _checked(answers[0], nodes[0], "directory")  # raises: the first node's error
    entries: dict[str, dict[str, Any]] = {}
    for answer in listed:
        for entry in answer.get("entries") or ():
            entries.setdefault(entry["name"], entry)
    return [entries[name] for name in sorted(entries)]


async def get_file(request: web.Request) -> web.StreamResponse:
    follow = _bool_query(request, "follow")
    start = _follow_start(request) if follow else 0  # (checked whether the attempt runs or not)
    job, base, nodes = await _output_dir(request, waits=follow)
    api = request.app[API_KEY]
    relative = request.match_info["path"]
    if follow and _followed_ended(request, job):
        follow = False  # its attempt writes no more: the file as it is, or 404 if there is none
    if nodes is not None:
        path = files.joined(base, relative, "path")
        if follow:  # (on one node: the file's task's)
            return await _follow(request, job, start, _remote_reader(api, nodes[0], path))
        return await _remote_file_of(request, nodes, path)
    if follow:
        return await _follow(request, job, start, _local_reader(base, relative, api.mount_root))
    wanted = _wanted_range(request)
    yet = " (yet)" if job.state in LIVE_STATES else ""  # (an ended job writes no more)
    with _opened(base, relative, "path", api.mount_root, f"no file {relative!r}{yet}") as fd:
        info = files.regular(fd, relative)

        async def read(offset: int, most: int) -> bytes:
            return await asyncio.to_thread(os.pread, fd, most, offset)

        headers = {"Last-Modified": _http_date(info.st_mtime),
                   "ETag": f'"{info.st_mtime_ns:x}-{info.st_size:x}"'}  # fmt: skip
        if _etags(request.headers.get("If-None-Match", "")) & {headers["ETag"], "*"}:
            return web.Response(status=304, headers=headers)  # the client's copy is current
        if request.headers.get("If-Range", headers["ETag"]) not in headers.values():
            wanted = None  # the part asked is of another version: all of this one
        return await _send_bytes(request, wanted, info.st_size, read, headers)


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compared as strong: a file's
    tag is its modification time and size)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


async def _remote_file_of(request: web.Request, nodes: list[str],
                          path: Path) -> web.StreamResponse:  # fmt: skip
    """`_remote_file` from the first of `nodes` that has the file (each task of a multi-node
    job writes its own files on its node): the first node is asked alone, and if it has no
    such file or does not answer, the others all at once (`_first_having`). The first
    node's error if none has it."""
    api = request.app[API_KEY]
    wanted = _wanted_range(request)
    start = wanted[0] if wanted else 0
    node, first = nodes[0], await api.nodes.read_remote(nodes[0], str(path), offset=start)
    if _may_fall_back(first) and len(nodes) > 1:
        asked = [api.nodes.read_remote(n, str(path), offset=start) for n in nodes[1:]]
        found = await _first_having(nodes[1:], asked)
        if found is not None:
            node, first = found
    return await _remote_file(request, node, path, wanted, _checked(first, node, "path"))


FALLBACK_GRACE = 0.5  # seconds nodes listed earlier may still answer once a later one has it


async def _first_having(nodes: list[str], asked: list[Awaitable[dict[str, Any]]]
                        ) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
    """The first of `nodes` (in their order) whose answer is not a miss, with that answer;
    None if all of them miss. Once some node has the file, only the nodes before it are
    waited for, and for FALLBACK_GRACE more at most, not the whole read timeout a silent
    node costs; the nodes after it are not waited for at all."""
    tasks = [asyncio.ensure_future(a) for a in asked]
    clock = asyncio.get_running_loop().time
    try:
        deadline = None
        while True:
            hit = next((i for i, t in enumerate(tasks)
                        if t.done() and not _may_fall_back(t.result())), None)  # fmt: skip
            before = [t for t in tasks[: len(tasks) if hit is None else hit] if not t.done()]
            if not before:
                return None if hit is None else (nodes[hit], tasks[hit].result())
            if hit is not None and deadline is None:
                deadline = clock() + FALLBACK_GRACE
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                return nodes[hit], tasks[hit].result()
            await asyncio.wait(before, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _may_fall_back(answer: dict[str, Any]) -> bool:
    """Is a node's answer for a file a miss that another node may make good? (Not a refusal:
    a link in the file's place is the request's error.)"""
    error = answer.get("error")
    return error is not None and error.get("code") != "refused"


async def _remote_file(request: web.Request, node: str, path: Path,
                       wanted: tuple[int, int | None] | None,
                       first: dict[str, Any]) -> web.StreamResponse:  # fmt: skip
    """A file the job's node has, or the part a Range header asks for (`wanted`), in chunks;
    `first` is the node's answer for the chunk at its start (its size is the file's)."""
    api = request.app[API_KEY]
    ahead = {wanted[0] if wanted else 0: first.get("data") or b""}

    async def read(offset: int, _most: int) -> bytes:
        if offset in ahead:
            return ahead.pop(offset)
        return (await _remote(api, node, path, "path", offset=offset)).get("data") or b""

    return await _send_bytes(request, wanted, int(first.get("size", 0)), read)


# what makes a file unreadable from then on: a link or directory in its place, no file, its
# node unreachable or refusing
_UNREADABLE = (DocumentError, files.FileNotFound, CommandError)
SEND_CHUNK = 256 * 1024  # bytes of a file on the daemon's storage read at a time
MAX_OFFSET = 1 << 62  # a Range start beyond this is past the end of any file


async def _send_bytes(request: web.Request, wanted: tuple[int, int | None] | None, size: int,
                      read: Callable[[int, int], Awaitable[bytes]],
                      headers: dict[str, str] | None = None) -> web.StreamResponse:  # fmt: skip
    """A file of `size` bytes (`read(offset, most)` gives bytes from an offset): all of it
    (200), or the bytes a Range header asks for (206 with Content-Range), as aiohttp's
    FileResponse answers. One that cannot be read to the end is broken off, unfinished."""
    start, stop = _span(wanted, size)
    response = web.StreamResponse(status=200 if wanted is None else 206, headers={
        "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **(headers or {})
    })  # fmt: skip
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response.content_length = stop - start
    await response.prepare(request)
    offset = start if request.method != "HEAD" else stop  # (HEAD: the headers alone)
    try:
        while offset < stop:
            data = await read(offset, min(SEND_CHUNK, stop - offset))
            if not data:
                raise files.FileNotFound("the file has shrunk")
            await response.write(data[: stop - offset])
            offset += len(data)
    except _UNREADABLE:
        _break_off(request)
        return response
    except ConnectionResetError:
        return response  # the client went away
    await response.write_eof()
    return response


def _break_off(request: web.Request) -> None:
    """End an answer whose status is sent short, so that its client sees it is unfinished
    (a clean end would pass for all of it)."""
    if request.transport is not None:
        request.transport.close()


def _http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def _wanted_range(request: web.Request) -> tuple[int, int | None] | None:
    """The bytes a Range header asks for: (start, stop; None for the end), None without one
    or with one of a form not served (another unit, several ranges, the last N bytes: the
    header is ignored, as RFC 9110 lets a server, and the whole file sent); 416 in the error
    shape for one that cannot be served."""
    header = request.headers.get(hdrs.RANGE)
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec or spec.strip()[:1] == "-":
        return None
    try:
        wanted = request.http_range
    except ValueError:
        raise _unsatisfiable("the Range header is not bytes=START-[END]") from None
    if wanted.start is None or wanted.start < 0:
        raise _unsatisfiable("only ranges from a start offset are served")
    if wanted.start > MAX_OFFSET:
        raise _unsatisfiable(f"the range starts past {MAX_OFFSET} bytes")
    return wanted.start, wanted.stop


def _span(wanted: tuple[int, int | None] | None, size: int) -> tuple[int, int]:
    """The bytes [start, stop) of a file of `size` bytes to send; 416 past its end."""
    if wanted is None:
        return 0, size
    start, stop = wanted
    if start >= size:
        raise _unsatisfiable(f"the file has {size} bytes", size)
    return start, size if stop is None else min(stop, size)


def _remote_reader(api: Api, node: str, path: Path) -> Callable[[int], Awaitable[bytes]]:
    """Reads of a file on the job's node from an offset (b"": nothing there yet)."""

    async def read(offset: int) -> bytes:
        answer = await api.nodes.read_remote(node, str(path), offset=offset)
        if (answer.get("error") or {}).get("code") == "not_found":
            return b""
        return _checked(answer, node, "path").get("data") or b""

    return read


def _local_reader(base: Path, relative: str,
                  mount_root: Path) -> Callable[[int], Awaitable[bytes]]:  # fmt: skip
    """Reads of a file on the daemon's storage from an offset (b"": nothing there yet), each
    opening it afresh with no link on the way."""

    def read(offset: int) -> bytes:
        fd = _open_local(base, relative, "path", mount_root)
        if fd is None:
            return b""
        try:
            files.regular(fd, relative)
            return os.pread(fd, SEND_CHUNK, offset)
        finally:
            os.close(fd)

    return functools.partial(asyncio.to_thread, read)


class RangeNotSatisfiable(ValueError):
    """A Range header that cannot be served (416); `size`, where known, the file's (its
    answer then says `Content-Range: bytes */SIZE`, as RFC 9110 asks)."""

    def __init__(self, message: str, size: int | None = None) -> None:
        super().__init__(message)
        self.size = size


def _unsatisfiable(message: str, size: int | None = None) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(message, size)


def _follow_start(request: web.Request) -> int:
    """Where a follow starts: its Range's start (bytes=START-); 400 naming Range for any
    other Range, also once the attempt has ended (the answer is then the file as it is)."""
    wanted = _wanted_range(request)
    if request.headers.get(hdrs.RANGE) is not None and (wanted is None or wanted[1] is not None):
        raise DocumentError("Range", "with follow=true, only bytes=START- is served (a growing "
                                     "file's part has no end)")  # fmt: skip
    return wanted[0] if wanted else 0


async def _follow(request: web.Request, job: Job, offset: int,
                  read: Callable[[int], Awaitable[bytes]]) -> web.StreamResponse:  # fmt: skip
    """A file from `offset` (its Range's start: _follow_start) as it grows, answered 200
    (`read(offset)` gives what follows an offset), until the job has ended and everything
    written is sent, the client has gone, or
    the daemon stops. A first read that fails answers with its error; a later one breaks the
    answer off, unfinished (the file became a link or a directory, its node cannot be
    reached), as does the revocation of the token it was asked with."""
    api = request.app[API_KEY]
    token_id = _principal(request).token_id
    ended = _followed_ended(request, job)
    chunk = await read(offset)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    try:
        while request.method != "HEAD":  # (HEAD: the headers alone)
            if chunk:
                await response.write(chunk)
                offset += len(chunk)
            if not chunk or api.closing.is_set():
                transport = request.transport
                if ended or api.closing.is_set() or transport is None or transport.is_closing():
                    break
                await asyncio.sleep(FOLLOW_POLL)
            ended = _followed_ended(request, job)
            if token_id not in api.models.tokens:  # revoked: as its next request would fail
                _break_off(request)
                return response
            try:
                chunk = await read(offset)
            except _UNREADABLE:
                _break_off(request)
                return response
        await response.write_eof()
    except (ConnectionResetError, OSError):
        pass  # the client went away
    return response


def _followed_ended(request: web.Request, job: Job) -> bool:
    """Has the attempt a follow reads (`?attempt=`, else the job's current one) ended? (The
    job has ended or was deleted, or a later attempt runs now.)"""
    followed = _int_query(request, "attempt", max(job.attempt, 1), 1, max(job.attempt, 1))
    current = request.app[API_KEY].models.jobs.get(job.job_id)
    return current is None or current.state in lifecycle.ENDED or current.attempt > followed


# -- nodes -------------------------------------------------------------------------------------
def _node_answer(api: Api, node, principal: Principal) -> dict[str, Any]:
    """The node; for a token limited to workspaces, the jobs of others that hold its GPUs
    (a cluster may take other workspaces' jobs) are not named."""
    heard = api.heard_from.get(node.node_id)
    answer = resources.node(api.models, node, None if heard is None else time.monotonic() - heard)
    if principal.workspaces:
        for held in answer["properties"]["allocations"]:
            job = api.models.jobs.get(held["job"])
            if job is None or not principal.sees(job.workspace):
                held["job"] = held["jobName"] = None
    return answer


def _node_workspace(m: ReadModels, node) -> str | None:
    cluster = m.clusters.get(node.cluster)
    return cluster.workspace if cluster else None


async def list_nodes(request: web.Request) -> web.Response:
    principal = _principal(request)
    principal.require("viewer")
    api = request.app[API_KEY]
    m = api.models
    wanted = request.query.get("cluster")  # WORKSPACE/NAME
    cluster_id = m.cluster_ids.get(wanted) if wanted else None
    if wanted and (cluster_id is None or not principal.sees(m.clusters[cluster_id].workspace)):
        raise CommandError(f"no cluster {wanted!r} (WORKSPACE/NAME)", 404)  # (or not its to see)
    items = [_node_answer(api, n, principal)
             for n in sorted(m.nodes.values(), key=lambda n: n.node_id)
             if (cluster_id is None or n.cluster == cluster_id)
             and principal.sees(_node_workspace(m, n) or "")]  # fmt: skip
    return _page(request, items)


async def get_node(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    principal = _principal(request)
    principal.require("viewer")
    node = api.models.nodes.get(request.match_info["id"])
    if node is None or not principal.sees(_node_workspace(api.models, node) or ""):
        raise CommandError(f"no node {request.match_info['id']!r}", 404)  # (or not its to see)
    return web.json_response(_node_answer(api, node, principal))


async def delete_node(request: web.Request) -> web.Response:
    api = request.app[API_KEY]
    principal = _principal(request)
    node_id = request.match_info["id"]
    node = api.models.nodes.get(node_id)
    workspace = _node_workspace(api.models, node) if node is not None else None
    if node is None or not principal.sees(workspace or ""):
        raise CommandError(f"no node {node_id!r}", 404)  # (or not its to see)
    principal.require("admin", workspace)

    def decide(m: ReadModels) -> list:  # the node, and the agent tokens bound to it
        bound = [t.token_id for t in m.tokens.values() if t.node == node_id]
        return [*commands.remove_node(m, node_id, _actor(request)),
                *(d for t in bound for d in auth.revoke_token(m, t, _actor(request)))]  # fmt: skip

    return await _structural(request, decide)


# -- tokens ------------------------------------------------------------------------------------
TOKEN_FIELDS = {"name", "role", "workspaces", "node"}


async def create_token(request: web.Request) -> web.Response:
    _principal(request).require_unscoped("admin", "manage tokens")
    body = await _body(request)
    if not isinstance(body, dict):
        raise DocumentError("body", "must be a JSON object")
    for key in body:
        if key not in TOKEN_FIELDS:
            raise DocumentError(key, "is not a known property")
    for key in ("name", "role"):
        if key not in body:
            raise DocumentError(key, "is required")
        if not isinstance(body[key], str):
            raise DocumentError(key, "must be a string")
    workspaces = body.get("workspaces", [])  # left out (only): a token of every workspace
    if not isinstance(workspaces, list) or not all(isinstance(w, str) for w in workspaces):
        raise DocumentError("workspaces", "must be a list of workspace names")
    if "workspaces" in body and not workspaces:  # (an empty variable: not every workspace)
        raise DocumentError("workspaces", "must name at least one workspace; leave it out "
                                          "for a token of every workspace")  # fmt: skip
    node = body.get("node")
    if node is not None and not isinstance(node, str):
        raise DocumentError("node", "must be a node id (a string)")
    secret = auth.new_token()
    api = request.app[API_KEY]
    position = await api.control.run(
        lambda m: auth.create_token(m, body["name"], body["role"], workspaces, secret,
                                    _actor(request), node),
        structural=True,
    )  # fmt: skip
    token_id = api.models.token_hashes[auth.digest(secret)]
    document = {**resources.token(api.models.tokens[token_id]), "token": secret}
    return _written(document, position, request, 201)


async def list_tokens(request: web.Request) -> web.Response:
    _principal(request).require_unscoped("admin", "manage tokens")
    m = request.app[API_KEY].models
    return _page(request, [resources.token(t) for t in sorted(m.tokens.values(),
                                                              key=lambda t: t.name)])  # fmt: skip


async def revoke_token(request: web.Request) -> web.Response:
    _principal(request).require_unscoped("admin", "manage tokens")
    token_id = request.match_info["id"]
    return await _structural(request, lambda m: auth.revoke_token(m, token_id, _actor(request)))


# -- the log -----------------------------------------------------------------------------------
async def list_events(request: web.Request) -> web.Response:
    """Events after `after`, `top` a page; `from`/`to` (ISO-8601, inclusive) bound their
    recordedAt, `stream` keeps one stream's (404 if the log has none of it). The pages end
    at the log's head as the first page found it: `nextLink` carries it as `through` (a
    position), so a paged listing of a growing log ends where it stood."""
    _principal(request).require_whole_log()
    after = _int_query(request, "after", 0)
    top = _int_query(request, "top", PAGE, 1, MAX_PAGE)
    start, end = _time_query(request, "from", lower=True), _time_query(request, "to")
    api = request.app[API_KEY]
    if start is not None:
        after = max(after, await api.store.position_at(start - 1))
    last = _int_query(request, "through", 0) or (await api.store.head()).position
    if end is not None:
        last = min(last, await api.store.position_at(end))
    stream = request.query.get("stream")
    if stream is not None:
        events = await api.store.read_stream_page(stream, after, last, top)
        if not events and not await _stream_exists(api.store, stream):
            raise CommandError(f"no stream {stream!r} in the log", 404)
    else:
        events = [e for e in await api.store.read_all(after, top) if e.position <= last]
    items = [jsonform.to_json(e) for e in events]
    next_link = None
    if len(events) == top and events[-1].position < last:
        query = {**request.query, "after": str(events[-1].position), "top": str(top),
                 "through": str(last)}  # fmt: skip
        next_link = str(request.rel_url.with_query(query))
    return web.json_response({"value": items, "nextLink": next_link})


async def _stream_exists(store: EventStore, stream: str) -> bool:
    return bool(await store.read_stream_page(stream, 0, MAX_POSITION, 1))


def _time_query(request: web.Request, name: str, lower: bool = False) -> int | None:
    """An ISO-8601 query parameter in microseconds (None: not given; `lower`: a lower bound,
    see parse_iso)."""
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return parse_iso(text, lower=lower)
    except ValueError as exc:
        raise DocumentError(name, str(exc)) from None


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events from `Last-Event-ID` (or `?after=`): each event once, in order."""
    principal = _principal(request)
    principal.require_whole_log()
    resume = request.headers.get("Last-Event-ID")
    if resume is not None:
        after = _whole(resume, "Last-Event-ID", 0, MAX_POSITION)
    else:
        after = _int_query(request, "after", 0)
    wanted = _event_types(request)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
    })  # fmt: skip
    await response.prepare(request)
    api = request.app[API_KEY]
    pages = api.store.subscribe_pages(after).__aiter__()
    pending: asyncio.Task | None = None
    closing = asyncio.ensure_future(api.closing.wait())
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(pages.__anext__())
            done, _ = await asyncio.wait(
                {pending, closing}, timeout=SSE_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
            )
            if closing in done or principal.token_id not in api.models.tokens:
                break  # (a revoked token: the stream ends, as its next request would fail)
            if not done:
                await response.write(b": keep-alive\n\n")
                continue
            events, revoked = _before_revocation(pending.result(), principal.token_id)
            pending = None
            text = "".join(_sse(e) for e in events if wanted is None or e.type in wanted)
            if text:
                await response.write(text.encode())
            if revoked:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        closing.cancel()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        with contextlib.suppress(Exception):
            await pages.aclose()
    return response


def _before_revocation(events: list[RecordedEvent], token_id: str) -> tuple[list, bool]:
    """The events before the one revoking the token `token_id`, and whether it came."""
    for index, event in enumerate(events):
        if event.type == "TokenRevoked" and event.data.get("tokenId") == token_id:
            return events[:index], True
    return events, False


def _event_types(request: web.Request) -> frozenset[str] | None:
    """`?type=A,B`: only events of those types (None: every event)."""
    given = request.query.get("type")
    if given is None:
        return None
    names = frozenset(n.strip() for n in given.split(",") if n.strip())
    unknown = sorted(n for n in names if n not in VOCABULARY)
    if not names or unknown:
        raise DocumentError("type", f"unknown event types {unknown}" if unknown else
                            "name one event type or more, comma-separated")  # fmt: skip
    return names


def _sse(event) -> str:
    data = json.dumps(jsonform.to_json(event), separators=(",", ":"))
    return f"id: {event.position}\nevent: {event.type}\ndata: {data}\n\n"


async def replay(request: web.Request) -> web.Response:
    _principal(request).require_whole_log()
    api = request.app[API_KEY]
    head = (await api.store.head()).position
    if ("at" in request.query) == ("position" in request.query):
        raise DocumentError("at", "give either at (ISO-8601) or position, not both or neither")
    at = _time_query(request, "at")
    if at is not None:
        position = await api.store.position_at(at)
    else:
        position = _int_query(request, "position", 0)
        if position > head:  # (as the offline replay says it)
            raise DocumentError("position", f"{position} is beyond the log's head ({head})")
    past = Runner(api.store, use_snapshots=True)
    await past.restore(upto=position)
    return web.json_response(views.world(past.models, await moment_note(api.store, at, position)))


# -- service -----------------------------------------------------------------------------------
@functools.cache
def _query_names() -> dict[tuple[str, str], frozenset[str]]:
    return openapi.query_parameters()


@functools.cache
def _openapi_body() -> bytes:
    return json.dumps(openapi.document()).encode()  # the same for the daemon's whole life


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=_openapi_body(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    ws = "/v1/workspaces/{ws}"  # names_middleware checks each name against the rule
    exp = f"{ws}/experiments/{{exp}}"
    job = f"{exp}/jobs/{{name}}"
    cluster = f"{ws}/clusters/{{name}}"
    r = app.router
    r.add_get("/v1/openapi.json", openapi_document)
    r.add_get("/v1/workspaces", list_workspaces)
    r.add_put(ws, put_workspace)
    r.add_get(ws, get_workspace)
    r.add_delete(ws, delete_workspace)
    r.add_get(ws + "/clusters", list_clusters)
    r.add_put(cluster, put_cluster)
    r.add_get(cluster, get_cluster)
    r.add_patch(cluster, patch_cluster)
    r.add_delete(cluster, delete_cluster)
    r.add_get(ws + "/experiments", list_experiments)
    r.add_put(exp, put_experiment)
    r.add_get(exp, get_experiment)
    r.add_delete(exp, delete_experiment)
    r.add_get(exp + "/jobs", list_jobs)
    r.add_put(job, put_job)
    r.add_get(job, get_job)
    r.add_delete(job, delete_job)
    r.add_post(job + "/terminate", terminate_job)
    r.add_get(job + "/history", job_history)
    r.add_post(job + "/exec", exec_in_job)
    r.add_get(job + "/files", list_files)
    r.add_get(job + "/files/{path:[\\s\\S]+}", get_file)  # (a name may hold a line break)
    r.add_get("/v1/jobs", list_all_jobs)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/nodes/{id}", get_node)
    r.add_delete("/v1/nodes/{id}", delete_node)
    r.add_post("/v1/tokens", create_token)
    r.add_get("/v1/tokens", list_tokens)
    r.add_delete("/v1/tokens/{id}", revoke_token)
    r.add_get("/v1/events", list_events)
    r.add_get("/v1/events/stream", event_stream)
    r.add_get("/v1/replay", replay)


def build(api: Api, extra: Callable[[web.Application], None] | None = None) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[request_middleware, starting_middleware, errors_middleware, auth_middleware,
                     input_middleware, names_middleware, after_middleware],
    )  # fmt: skip
    app.on_response_prepare.append(_answer_request_id)
    app[API_KEY] = api
    add_routes(app)
    if extra is not None:
        extra(app)
    return app
