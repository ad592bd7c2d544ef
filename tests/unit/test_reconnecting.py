"""The CLI's waiting commands ride out a daemon that is starting (503) as one that is down."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchd.scheduler import client
from batchd.scheduler.cli_api import _Reconnecting
from batchd.scheduler.client import ApiError, ClientError


async def test_a_first_answer_of_a_starting_daemon_is_waited_through():
    asked = []

    class Api:
        cfg = SimpleNamespace(server="http://127.0.0.1:1")

        async def get(self, path: str):
            asked.append(path)
            return {"status": "ready"}

    answers = [ApiError(503, "ServiceUnavailable", "the daemon is starting; retry", []), "job"]

    async def request():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await _Reconnecting(Api()).call(request) == "job"
    assert asked == ["/readyz"]  # it waited for the daemon to be ready, then asked again


async def test_a_server_never_reached_fails_at_once():
    """A mistyped --server is said at once, not after the 30 s a restart is given."""
    tries = []

    class Api:
        cfg = SimpleNamespace(server="http://127.0.0.1:9")

    async def request():
        tries.append(1)
        raise ClientError("cannot reach the batchd server at http://127.0.0.1:9: refused")

    with pytest.raises(ClientError, match="cannot reach"):
        await _Reconnecting(Api()).call(request)
    assert len(tries) == 1  # not tried again


async def test_a_put_the_server_asks_to_send_again_is_sent_again(monkeypatch):
    """A 503 with Retry-After (the log briefly unreachable) is sent again for a PUT, which
    is idempotent; not for a POST, nor a 503 without it (a fenced daemon's)."""
    monkeypatch.setattr(client, "PUT_RETRIES", (0.01, 0.01, 0.01, 0.01))
    asked: list[str] = []
    busy = {"PUT /v1/a": 2, "POST /v1/b": 2, "PUT /v1/c": 9}

    async def handle(request: web.Request) -> web.Response:
        key = f"{request.method} {request.path}"
        asked.append(key)
        if busy[key] > 0:
            busy[key] -= 1
            later = {"Retry-After": "1"} if key != "PUT /v1/c" else {}
            body = {"error": {"code": "ServiceUnavailable", "message": "away", "details": []}}
            return web.json_response(body, status=503, headers=later)
        return web.json_response({"done": key}, status=201)

    app = web.Application()
    app.router.add_route("*", "/v1/{name}", handle)
    async with TestServer(app) as server:
        settings = client.Settings(str(server.make_url("")).rstrip("/"), None, "", None)
        async with client.Client(settings) as api:
            assert await api.call("PUT", "/v1/a", body={}) == (201, {"done": "PUT /v1/a"})
            with pytest.raises(ApiError) as post:
                await api.call("POST", "/v1/b", body={})
            with pytest.raises(ApiError) as fenced:
                await api.call("PUT", "/v1/c", body={})
    assert post.value.retry and not fenced.value.retry
    assert asked == ["PUT /v1/a"] * 3 + ["POST /v1/b", "PUT /v1/c"]


async def test_an_answer_the_server_breaks_off_is_said_plainly():
    """(as the daemon ends an exec or a followed file whose token is revoked meanwhile): one
    line that says the answer was cut off and why it may have been, not the library's words."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        await response.write(b"half")
        request.transport.close()  # unfinished
        return response

    app = web.Application()
    app.router.add_get("/v1/file", handle)
    async with TestServer(app) as server:
        settings = client.Settings(str(server.make_url("")).rstrip("/"), None, "", None)
        async with client.Client(settings) as api:
            with pytest.raises(ClientError) as cut:
                async with api.stream("/v1/file") as response:
                    await response.read()
    said = str(cut.value)
    assert "broke its answer off" in said and "token was revoked" in said, said
    assert "payload" not in said.lower()
