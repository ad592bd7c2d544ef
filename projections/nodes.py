"""Nodes: resources (GPUs, CPUs, memory, runtimes), state and its last transition.

A node appears with NodeProvisioning (a provider asked for it) or, for nodes that join by
themselves, with NodeRegistered. Its GPU allocations are kept by projections/allocation.py.
"""

from __future__ import annotations

from batchd.events.envelope import RecordedEvent
from batchd.projections import allocation
from batchd.projections.model import (
    LEAVING,
    LOST,
    PREPARING,
    PROVISIONING,
    READY,
    SUSPECT,
    UNUSABLE,
    Node,
    ReadModels,
)

MAX_ERRORS = 10  # newest node errors kept


def _node(m: ReadModels, e: RecordedEvent, state: str) -> Node | None:
    """Move the event's node to `state` (if it is known) and return it."""
    node = m.nodes.get(e.data["nodeId"])
    if node is not None:
        node.state, node.since, node.last_event = state, e.recorded_at, e.type
    return node


def provisioning(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    if d["nodeId"] in m.nodes or d["cluster"] not in m.clusters:
        return
    m.nodes[d["nodeId"]] = Node(d["nodeId"], d["cluster"], PROVISIONING, e.recorded_at, e.type)
    m.clusters[d["cluster"]].nodes.append(d["nodeId"])


def registered(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    node = m.nodes.get(d["nodeId"])
    if node is None:
        provisioning(m, e)
        node = m.nodes.get(d["nodeId"])
        if node is None:
            return
    if node.incarnation not in (0, d.get("incarnation", 0)):  # a new agent: the old one's
        allocation.forget_stopped(m, node)  # tasks were killed (earlier attempts' too)
    if node.state == PROVISIONING:  # re-registering (a reconnect) leaves the state alone
        node.state, node.since = PREPARING, e.recorded_at
    node.last_event = e.type
    node.gpus, node.gpu_model = d.get("gpus", 0), d.get("gpuModel", "")
    node.gpu_memory_mb = d.get("gpuMemoryMb", 0)
    node.cpus, node.memory_mb = d.get("cpus", 0), d.get("memoryMb", 0)
    node.runtimes = list(d.get("runtimes", ("process",)))  # one that does not say runs processes
    node.agent_version, node.incarnation = d.get("agentVersion", ""), d.get("incarnation", 0)
    node.address = d.get("address", "")


def setup_started(m: ReadModels, e: RecordedEvent) -> None:
    node = _node(m, e, PREPARING)
    if node is not None and "outputDir" in e.data:
        node.setup = {"state": "running", "outputDir": e.data["outputDir"]}


def _setup_ended(node: Node, e: RecordedEvent, state: str) -> None:
    if node.setup:
        node.setup = {**node.setup, "state": state, "exitCode": e.data.get("exitCode"),
                      "tail": e.data.get("tail", "")}  # fmt: skip


def _usable(m: ReadModels, e: RecordedEvent) -> str:
    """The state of the event's node once it can run work: ready, or leaving if it was asked
    to drain (a draining node that was lost and comes back still takes no new work)."""
    node = m.nodes.get(e.data["nodeId"])
    return LEAVING if node is not None and node.draining else READY


def setup_succeeded(m: ReadModels, e: RecordedEvent) -> None:
    node = _node(m, e, _usable(m, e))
    if node is not None:
        _setup_ended(node, e, "succeeded")


def setup_failed(m: ReadModels, e: RecordedEvent) -> None:
    """Unusable: its setup task failed, or it was found unfit before any ran (fewer GPUs than
    its VM size): its preparation failed either way, and stays so after a silence."""
    node = _node(m, e, UNUSABLE)
    if node is None:
        return
    if node.setup is None:
        node.setup = {"state": "failed"}
    else:
        _setup_ended(node, e, "failed")
    _error(node, e)


def _error(node: Node, e: RecordedEvent) -> None:
    """The event's `error`, if it has one, among the node's newest errors."""
    if "error" in e.data:
        node.errors.append({**e.data["error"], "at": e.recorded_at})
        del node.errors[:-MAX_ERRORS]


def suspected(m: ReadModels, e: RecordedEvent) -> None:
    node = _node(m, e, SUSPECT)
    if node is not None:
        _error(node, e)  # why, where it was said (silence says nothing)


def lost(m: ReadModels, e: RecordedEvent) -> None:
    node = _node(m, e, LOST)
    if node is not None:
        allocation.forget_stopped(m, node)
        _error(node, e)  # why (logs of earlier versions do not say)


def recovered(m: ReadModels, e: RecordedEvent) -> None:
    """Back from silence (to what it was: still running its setup task, unusable after it
    failed, else ready), or, for a draining node, wanted again (ready)."""
    node = m.nodes.get(e.data["nodeId"])
    if node is None:
        return
    if node.state == LEAVING:
        node.draining = False
    setup = (node.setup or {}).get("state")
    if setup == "running":
        _node(m, e, PREPARING)
    elif setup == "failed":
        _node(m, e, UNUSABLE)
    else:
        _node(m, e, _usable(m, e))


def leaving(m: ReadModels, e: RecordedEvent) -> None:
    _node(m, e, LEAVING)


def drain_requested(m: ReadModels, e: RecordedEvent) -> None:
    node = _node(m, e, LEAVING)
    if node is not None:
        node.draining = True


def removed(m: ReadModels, e: RecordedEvent) -> None:
    node = m.nodes.get(e.data["nodeId"])
    if node is None:
        return
    allocation.forget_stopped(m, node)
    del m.nodes[node.node_id]
    cluster = m.clusters.get(node.cluster)
    if cluster is not None:
        cluster.nodes.remove(node.node_id)


HANDLERS = {
    "NodeProvisioning": provisioning,
    "NodeRegistered": registered,
    "NodeSetupStarted": setup_started,
    "NodeSetupSucceeded": setup_succeeded,
    "NodeSetupFailed": setup_failed,
    "NodeSuspected": suspected,
    "NodeLost": lost,
    "NodeRecovered": recovered,
    "NodePreempted": leaving,
    "NodeDrainRequested": drain_requested,
    "NodeRemoved": removed,
}
