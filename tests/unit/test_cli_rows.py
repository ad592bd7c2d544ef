"""What `batchd node list` shows of a node."""

from __future__ import annotations

from batchd.scheduler.cli_api import _node_row

ERRORS = [{"code": "node_lost", "message": "no word from its agent for 10 s"}]


def _node(state: str) -> dict:
    cluster = {"id": "/workspaces/ws/clusters/c"}
    return {
        "name": "n0",
        "properties": {"state": state, "gpus": 4, "errors": ERRORS, "cluster": cluster},
    }


def test_a_node_that_is_not_ready_shows_its_last_error_and_a_recovered_one_does_not():
    assert _node_row(_node("lost"))[-1] == "no word from its agent for 10 s"
    assert _node_row(_node("ready"))[-1] is None
