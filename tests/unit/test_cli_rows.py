"""What `batchd node list` shows of a node, and `show` of a resource."""

from __future__ import annotations

from batchd.scheduler.cli_api import _flatten, _job_row, _node_row
from batchd.scheduler.cli_replay import world_text

ERRORS = [
    {
        "code": "node_lost",
        "message": "no word from its agent for 10 s",
        "at": "2026-11-27T10:00:00.000000Z",
    }
]


def _node(state: str, since: str = "2026-11-27T10:00:00.000000Z") -> dict:
    cluster = {"id": "/workspaces/ws/clusters/c"}
    properties = {"state": state, "since": since, "gpus": 4, "errors": ERRORS}
    return {"name": "n0", "properties": {**properties, "cluster": cluster}}


def test_a_node_that_is_not_ready_shows_its_last_error_and_a_recovered_one_does_not():
    assert _node_row(_node("lost"))[-1] == "no word from its agent for 10 s"
    assert _node_row(_node("ready"))[-1] is None


def test_an_error_from_before_the_nodes_present_state_is_not_shown_as_its_last():
    assert _node_row(_node("leaving", since="2026-11-27T10:05:00.000000Z"))[-1] is None


def test_show_prints_values_as_json_has_them():
    shown = dict(_flatten({"properties": {"preemption": True, "tags": {}, "n": 2}}, ""))
    assert shown == {"properties.preemption": "true", "properties.tags": "{}",
                     "properties.n": "2"}  # fmt: skip


def test_replay_names_gpus_held_by_a_deleted_jobs_stopping_task_by_its_id():
    node = {"id": "n0", "cluster": "ws/c", "state": "ready", "since": "-", "gpus": 2,
            "allocations": [{"gpu": 0, "job": "j-1", "jobName": None, "attempt": 1, "task": 0},
                            {"gpu": 1, "job": "j-2", "jobName": "train", "attempt": 2,
                             "task": 0}]}  # fmt: skip
    world = {"position": 9, "recordedAt": None, "clusters": [], "nodes": [node], "queues": {},
             "jobs": [], "note": None}  # fmt: skip
    text = world_text(world)
    assert "0:j-1#1 1:train#2" in text and "None" not in text


def test_a_jobs_cluster_of_another_workspace_is_named_with_it():
    def job(cluster: str) -> dict:
        return {"id": "/workspaces/default/experiments/e/jobs/j", "name": "j",
                "properties": {"state": "running", "cluster": {"id": cluster}}}  # fmt: skip

    assert _job_row(job("/workspaces/default/clusters/c1"))[2] == "c1"
    assert _job_row(job("/workspaces/ws1/clusters/c1"))[2] == "ws1/c1"
