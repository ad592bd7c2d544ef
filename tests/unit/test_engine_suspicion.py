"""Which nodes an agent's word that its container engine does not answer makes suspect."""

from __future__ import annotations

import pytest

from batchd.projections.model import Node, ReadModels
from batchd.scheduler import protocol
from batchd.scheduler.nodes import _fault_said, _fault_suspected


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
    m = _node(state, setup, draining)
    decided = _fault_suspected(m, "n1", "engine_unreachable", "its engine is away")
    assert bool(decided) is suspected
    if decided:
        [(stream, event)] = decided
        assert (stream, event.type) == ("node-n1", "NodeSuspected")
        assert event.data["error"]["code"] == "engine_unreachable"


def test_a_node_that_cannot_write_its_scratch_space_is_held_longer_than_for_its_engine():
    """Suspected for a fault its agent reported, a node takes no work for a while (so that
    the retry is placed elsewhere): 4 s for its engine, a minute for a full disk."""
    from batchd.scheduler.nodes import _fault_suspected, _may_recover

    for code, held_s in (("engine_unreachable", 4), ("node_unwritable", 60)):
        m = _node("ready")
        [(_stream, event)] = _fault_suspected(m, "n1", code, "no space left")
        node = m.nodes["n1"]
        node.state, node.since = "suspect", 1_000_000
        node.errors = [{**event.data["error"], "at": node.since}]
        assert _fault_suspected(m, "n1", code, "again") == []  # said once
        assert not _may_recover(node, None, node.since + (held_s - 1) * 1_000_000)
        assert _may_recover(node, None, node.since + held_s * 1_000_000)
        for fault in (("engine_unreachable", "away"), ("node_unwritable", "no space left")):
            assert not _may_recover(node, fault, node.since + 600 * 1_000_000)  # still said
    # held a moment for its engine, then its disk is full too: held the longer for that
    m = _node("ready")
    [(_stream, event)] = _fault_suspected(m, "n1", "engine_unreachable", "away")
    node = m.nodes["n1"]
    node.state, node.since = "suspect", 1_000_000
    node.errors = [{**event.data["error"], "at": node.since}]
    [(_stream, later)] = _fault_suspected(m, "n1", "node_unwritable", "no space left")
    assert later.data["error"]["code"] == "node_unwritable"


def test_what_an_agent_says_of_its_nodes_faults():
    beat = protocol.message("Heartbeat", "n1", 1, running=[])
    assert _fault_said(beat) is None
    said = _fault_said({**beat, "engineDown": "connection refused"})
    assert said == (
        "engine_unreachable",
        "its container engine does not answer: connection refused",
    )
    full = "this node cannot write its own /w/.batchd-probe: No space left on device"
    assert _fault_said({**beat, "scratchUnwritable": full}) == ("node_unwritable", full)
    with pytest.raises(protocol.ProtocolError, match="scratchUnwritable must be a string"):
        _fault_said({**beat, "scratchUnwritable": 3})
