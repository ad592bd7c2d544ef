"""The CLI's waiting commands ride out a daemon that is starting (503) as one that is down."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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
