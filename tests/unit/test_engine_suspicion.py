"""Which nodes an agent's word that its container engine does not answer makes suspect."""

from __future__ import annotations

import pytest

from batchd.projections.model import Node, ReadModels
from batchd.scheduler.nodes import _engine_suspected


def _node(state: str, setup: str | None = None, draining: bool = False) -> ReadModels:
    m = ReadModels()
    node = Node("n1", "c1", state, 1, "NodeLost")
    node.setup = {"state": setup} if setup else {}
    node.draining = draining
    m.nodes["n1"] = node
    return m


@pytest.mark.parametrize(
    ("state", "setup", "draining", "suspected"),
    [
        ("ready", None, False, True),
        ("suspect", None, False, True),  # suspect for silence: now for its engine, saying so
        ("lost", None, False, True),  # heard again: it answers, so suspect rather than lost
        ("lost", "succeeded", False, True),
        ("lost", "failed", False, False),  # it would come back unusable: stays as it is
        ("lost", "running", False, False),  # it would come back preparing
        ("lost", None, True, False),  # it would come back leaving (drained)
        ("unusable", "failed", False, False),
        ("leaving", None, True, False),
        ("preparing", "running", False, False),
    ],
)
def test_which_nodes_an_engine_that_does_not_answer_makes_suspect(
    state, setup, draining, suspected
):
    decided = _engine_suspected(_node(state, setup, draining), "n1", "its engine is away")
    assert bool(decided) is suspected
    if decided:
        [(stream, event)] = decided
        assert (stream, event.type) == ("node-n1", "NodeSuspected")
        assert event.data["error"]["code"] == "engine_unreachable"
