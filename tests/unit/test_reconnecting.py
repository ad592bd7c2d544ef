"""The CLI's waiting commands ride out a daemon that is starting (503) as one that is down."""

from __future__ import annotations

from types import SimpleNamespace

from batchd.scheduler.cli_api import _Reconnecting
from batchd.scheduler.client import ApiError


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
