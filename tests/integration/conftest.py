"""`api`: a real daemon (HTTP API, planner, read models) in the test's event loop, on a
SQLite log in a temporary state directory, listening on a free port of 127.0.0.1."""

from __future__ import annotations

import aiohttp
import pytest

from batchd.scheduler import config
from batchd.scheduler.daemon import Daemon
from tests.conftest import service_missing

ENGINE = "/run/podman/podman.sock"  # a Docker Engine API (tests/services/ensure.sh)
IMAGE = "localhost/busybox:test"  # made there from busybox: no registry can be reached


async def start_daemon(state_dir, **options) -> Daemon:
    options.setdefault("local_nodes", 0)  # no embedded cluster unless a test asks for one
    options.setdefault("listen", "127.0.0.1:0")
    cfg = config.load(None, state=str(state_dir), **options)
    daemon = Daemon(cfg)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    return daemon


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
    if not any(IMAGE in (i.get("RepoTags") or ()) for i in images):
        service_missing(f"the image {IMAGE} (tests/services/ensure.sh makes it)")
    return ENGINE
