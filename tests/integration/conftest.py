"""`api`: a real daemon (HTTP API, planner, read models) in the test's event loop, on a
SQLite log in a temporary state directory, listening on a free port of 127.0.0.1. `engine`
and `proxy`: the Docker Engine API of tests/services (podman), and a proxy in front of it that
records what was asked of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile

import aiohttp
import pytest
from aiohttp import web

from batchd.projections.model import Job, ReadModels, job_key
from batchd.scheduler import commands, config
from batchd.scheduler.daemon import Daemon
from tests.conftest import service_missing

ENGINE = "/run/podman/podman.sock"  # a Docker Engine API (tests/services/ensure.sh)
IMAGE = "localhost/busybox:test"  # made there from busybox: no registry can be reached
ENTRYPOINT_IMAGE = "localhost/busybox-entrypoint:test"  # the same, with an ENTRYPOINT and CMD
USER_IMAGE = "localhost/busybox-user:test"  # the same, run as USER trainer (uid 1000)


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None) -> None:
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body=None, headers=None, raw=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        async with self.session.request(
            method, self.url + path, data=data, headers={**self.headers, **(headers or {})}
        ) as response:
            text = await response.text()
            try:
                document = json.loads(text) if text else None
            except json.JSONDecodeError:
                document = text
            return response.status, document


@contextlib.asynccontextmanager
async def admin_client(daemon: Daemon):
    """A Client of `daemon`'s API with its admin token, on a session of its own."""
    async with aiohttp.ClientSession() as session:
        yield Client(session, daemon.url, daemon.admin_token)


async def start_daemon(state_dir, config_file=None, **options) -> Daemon:
    options.setdefault("local_nodes", 0)  # no embedded cluster unless a test asks for one
    options.setdefault("listen", "127.0.0.1:0")
    cfg = config.load(config_file and str(config_file), state=str(state_dir), **options)
    daemon = Daemon(cfg)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    return daemon


def newest_job(
    models: ReadModels, name: str, workspace: str = "default", experiment: str = "default"
) -> Job | None:
    """The read models' newest job called `name` (None before one is submitted)."""
    ids = models.job_ids.get(job_key(workspace, experiment, name))
    return models.jobs[ids[-1]] if ids else None


async def settled(daemon: Daemon, seconds: float = 5.0) -> None:
    """Wait until the daemon's own bookkeeping of what a test set up has landed (a new
    cluster's resizing state), so that the log's head stays where the test reads it."""
    for _ in range(int(seconds / 0.05)):
        if not commands.resize_changes(daemon.models.models, ""):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon did not settle")


async def make_token(client, name: str, role: str, **fields) -> str:
    """A new API token made through `client` (an admin's), with the body's other `fields`."""
    status, made = await client.call("POST", "/v1/tokens", {"name": name, "role": role, **fields})
    assert status == 201, made
    return made["token"]


@pytest.fixture
async def local(tmp_path, monkeypatch):
    """A daemon with the embedded local cluster of two nodes, both ready; and an admin
    client."""
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    daemon = await start_daemon(tmp_path / "state", local_nodes=2)
    try:
        async with admin_client(daemon) as client:
            nodes = daemon.models.models.nodes
            for _ in range(600):  # 30 s
                if sum(1 for n in nodes.values() if n.state == "ready") == 2:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the local nodes did not get ready in 30 s")
            yield daemon, client
    finally:
        await daemon.stop()


@pytest.fixture
async def api(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    daemon = await start_daemon(tmp_path / "state")
    try:
        yield daemon
    finally:
        await daemon.stop()


@pytest.fixture
async def engine():
    """The engine's socket, once it answers and holds the test image."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(ENGINE)) as s,
            s.get("http://d/v1.41/images/json") as r,
        ):
            images = await r.json()
    except (aiohttp.ClientError, OSError) as exc:
        service_missing(f"a Docker Engine API at {ENGINE} ({exc})")
    for image in (IMAGE, ENTRYPOINT_IMAGE, USER_IMAGE):
        if not any(image in (i.get("RepoTags") or ()) for i in images):
            service_missing(f"the image {image} (tests/services/ensure.sh makes it)")
    return ENGINE


GPU_FIELDS = ("Devices", "DeviceRequests")


class RecordingProxy:
    """Forwards every request to the engine and keeps what was asked. The engine here has no
    GPUs, so the GPU attachment is recorded and then left out of what is forwarded."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.requests: list[tuple[str, str, object]] = []
        self.pulls: list[tuple[dict[str, str], str | None]] = []  # query, X-Registry-Auth
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(ENGINE))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        document = json.loads(body) if body and request.content_type == "application/json" else None
        self.requests.append((request.method, request.path, document))
        if request.path.endswith("/images/create"):
            self.pulls.append((dict(request.query), request.headers.get("X-Registry-Auth")))
        if request.path.endswith("/containers/create") and isinstance(document, dict):
            host = {k: v for k, v in document.get("HostConfig", {}).items() if k not in GPU_FIELDS}
            body = json.dumps({**document, "HostConfig": host}).encode()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}  # fmt: skip
        forever = aiohttp.ClientTimeout(total=None)  # `wait` answers when the container exits
        async with self.session.request(request.method, f"http://d{request.path_qs}",
                                        data=body or None, headers=headers,
                                        timeout=forever) as upstream:  # fmt: skip
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
            })  # fmt: skip
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    def creates(self) -> list[dict]:
        return [d for m, p, d in self.requests if p.endswith("/containers/create")]


@pytest.fixture
async def proxy(engine):
    """A recording proxy in front of the engine (its socket in a short path: a unix socket's
    path has at most 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="batchd-engine-")
    recording = RecordingProxy(f"{folder}/engine.sock")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recording.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, recording.socket_path).start()
    try:
        yield recording
    finally:
        await runner.cleanup()
        await recording.session.close()
        shutil.rmtree(folder, ignore_errors=True)
