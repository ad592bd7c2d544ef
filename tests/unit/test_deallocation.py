"""A local cluster's scale-down: which nodes stay (providers.staying_nodes: idle ones go
first, as in Azure Batch), and, honouring its `nodeDeallocationOption` (Batch AI
2018-05-01), what becomes of the jobs on a node that goes (deallocation_option, deallocate)."""

from __future__ import annotations

import asyncio
import os

from batchd.projections.model import LEAVING
from batchd.scheduler import watchdog
from batchd.scheduler.providers import (
    LocalProvider,
    deallocate,
    deallocation_option,
    staying_nodes,
)
from batchd.scheduler.vmsizes import CATALOG, local_size
from tests.unit.test_planner import World, placed


def local_world(*nodes: str) -> World:
    """The embedded cluster `local` (workspace `default`) with `nodes` registered and ready."""
    w = World()
    w.apply("ClusterCreated", clusterId="local", workspace="default", name="local",
            spec={"vmSize": "x"})  # fmt: skip
    for node in nodes:
        w.apply("NodeRegistered", nodeId=node, cluster="local", gpus=4)
        w.apply("NodeSetupSucceeded", nodeId=node)
    return w


def _manual(w: World, target: int, option: str | None = None) -> None:
    manual: dict = {"targetNodeCount": target}
    if option is not None:
        manual["nodeDeallocationOption"] = option
    w.apply("ClusterScaleSettingsChanged", clusterId="local", scaleSettings={"manual": manual})


def _staying(w: World, target: int, running: tuple[str, ...] = ()) -> list[str]:
    return staying_nodes(w.models, w.models.clusters["local"], target, running)


def test_an_idle_node_goes_before_a_busy_one_whatever_their_numbers():
    w = local_world("local-0", "local-1")
    w.run(w.job(gpus=1, cluster="local"), [("local-1", [0])])
    assert _staying(w, 1, ("local-0", "local-1")) == ["local-1"]
    assert _staying(w, 2, ("local-0", "local-1")) == ["local-0", "local-1"]
    assert _staying(w, 0, ("local-0", "local-1")) == []


def test_of_busy_nodes_the_lowest_numbers_stay():
    w = local_world("local-0", "local-1", "local-2")
    for node in ("local-2", "local-1", "local-0"):
        w.run(w.job(gpus=1, cluster="local"), [(node, [0])])
    assert _staying(w, 2) == ["local-0", "local-1"]


def test_ready_idle_nodes_stay_before_the_others_lowest_number_first():
    w = local_world("local-0", "local-1", "local-3")
    w.apply("NodeLost", nodeId="local-0", error={"code": "agent_exited", "message": "gone"})
    w.apply("NodeRegistered", nodeId="local-4", cluster="local", gpus=4)  # its setup runs
    running = ("local-0", "local-1", "local-2", "local-3", "local-4")  # local-2: not registered
    assert _staying(w, 1, running) == ["local-1"]
    assert _staying(w, 2, running) == ["local-1", "local-3"]
    assert _staying(w, 3, running) == ["local-0", "local-1", "local-3"]
    assert _staying(w, 4, running) == ["local-0", "local-1", "local-2", "local-3"]


def test_growing_keeps_the_nodes_still_there_then_takes_the_lowest_free_numbers():
    w = local_world("local-1", "local-3")
    for node in ("local-1", "local-3"):  # both going, still running work
        w.run(w.job(gpus=1, cluster="local"), [(node, [0])])
        w.apply("NodeDrainRequested", nodeId=node)
    assert _staying(w, 1) == ["local-1"]
    assert _staying(w, 3) == ["local-0", "local-1", "local-3"]
    assert _staying(w, 5) == ["local-0", "local-1", "local-2", "local-3", "local-4"]
    assert staying_nodes(w.models, None, 2, ()) == ["local-0", "local-1"]  # the first start


def test_nodes_of_another_name_are_neither_counted_nor_chosen():
    w = local_world("local-0", "box-a", "rack-7")  # joined by hand
    assert _staying(w, 1, ("local-0",)) == ["local-0"]
    assert _staying(w, 2, ("local-0",)) == ["local-0", "local-1"]


def test_the_choice_holds_from_cycle_to_cycle_as_the_nodes_that_go_leave():
    """A node that goes and runs nothing is removed at once; one that runs work drains, and
    is chosen again only in the place of a node that has become idle meanwhile (which goes at
    once): no node comes and goes back and forth."""
    w = local_world("local-0", "local-1", "local-2")
    first, second = w.job(gpus=1, cluster="local"), w.job(gpus=1, cluster="local")
    w.run(first, [("local-0", [0])])
    w.run(second, [("local-1", [0])])
    _manual(w, 1, "waitforjobcompletion")
    assert _staying(w, 1) == ["local-0"]  # local-2, idle, goes at once
    w.apply("NodeRemoved", nodeId="local-2")
    _apply(w, deallocate(w.models, "local-1", "waitforjobcompletion", "batchd:serve"))
    for _cycle in range(3):
        assert _staying(w, 1) == ["local-0"]
    w.apply("JobTaskExited", jobId=first, attempt=1, task=0, exitCode=0, node="local-0")
    w.apply("JobSucceeded", jobId=first, attempt=1)
    assert not w.models.nodes["local-0"].allocations
    assert _staying(w, 1) == ["local-1"]  # the idle local-0 goes now, not the busy one
    w.apply("NodeRemoved", nodeId="local-0")
    w.apply("NodeRecovered", nodeId="local-1")
    for _cycle in range(3):
        assert _staying(w, 1) == ["local-1"]


def test_a_node_whose_work_was_deallocated_stays_gone_when_the_staying_one_goes_idle():
    """With `requeue` or `terminate`, the tasks of the node that goes are still stopping (its
    GPUs held) when the staying node's job ends: the choice does not flip to keep the node
    whose job was just ended and drop the one now idle."""
    for option in ("requeue", "terminate"):
        w = local_world("local-0", "local-1")
        first, second = w.job(gpus=1, cluster="local"), w.job(gpus=1, cluster="local")
        w.run(first, [("local-0", [0])])
        w.run(second, [("local-1", [0])])
        _manual(w, 1, option)
        assert _staying(w, 1) == ["local-0"]
        _apply(w, deallocate(w.models, "local-1", option, "batchd:serve"))
        assert w.models.nodes["local-1"].allocations  # its task is still stopping
        assert w.models.jobs[second].state != "running"
        w.apply("JobTaskExited", jobId=first, attempt=1, task=0, exitCode=0, node="local-0")
        w.apply("JobSucceeded", jobId=first, attempt=1)
        for _cycle in range(3):
            assert _staying(w, 1) == ["local-0"], option


class _Control:
    """Control.run on a World; `meanwhile` is applied before the decision is taken (as if it
    had happened while the provider waited for the node's lock)."""

    def __init__(self, w: World, meanwhile=None) -> None:
        self.w, self.models, self.meanwhile = w, w.models, meanwhile
        self.appended: list = []

    async def run(self, decide, *, structural: bool = False, key: str = "") -> None:
        if self.meanwhile is not None:
            self.meanwhile()
        decided = decide(self.models)
        self.appended += decided
        _apply(self.w, decided)


def _provider(control: _Control) -> LocalProvider:
    provider = LocalProvider(control, "http://127.0.0.1:1", None, 2, 4, "process", None, None)
    provider.processes = dict.fromkeys(("local-0", "local-1"))
    return provider


async def test_the_deallocation_is_decided_for_a_node_that_goes_as_it_is_then():
    w = local_world("local-0", "local-1")
    first, second = w.job(gpus=1, cluster="local"), w.job(gpus=1, cluster="local")
    w.run(first, [("local-0", [0])])
    w.run(second, [("local-1", [0])])
    _manual(w, 1)  # requeue
    control = _Control(w)
    await _provider(control)._deallocate("local-0")  # it stays: nothing
    assert control.appended == []
    await _provider(control)._deallocate("local-1")
    assert [e.type for _s, e in control.appended] == ["NodeDrainRequested", "JobRequeued"]

    def first_ends() -> None:
        w.apply("JobTaskExited", jobId=first, attempt=1, task=0, exitCode=0, node="local-0")
        w.apply("JobSucceeded", jobId=first, attempt=1)

    w = local_world("local-0", "local-1")
    first, second = w.job(gpus=1, cluster="local"), w.job(gpus=1, cluster="local")
    w.run(first, [("local-0", [0])])
    w.run(second, [("local-1", [0])])
    _manual(w, 1)
    control = _Control(w, meanwhile=first_ends)  # local-0 idle: local-1 stays after all
    await _provider(control)._deallocate("local-1")
    assert control.appended == [] and w.models.jobs[second].state == "running"


def _busy(option: str | None = None, nodes: int = 1) -> tuple[World, str]:
    """A cluster of two nodes whose manual settings ask one (with `option`), and a job
    running on the node that goes (and on the other too, with `nodes` 2)."""
    w = World().cluster(nodes=2)
    manual = {"targetNodeCount": 1}
    if option is not None:
        manual["nodeDeallocationOption"] = option
    w.apply("ClusterScaleSettingsChanged", clusterId="c", scaleSettings={"manual": manual})
    job = w.job(gpus=1, nodes=nodes)
    w.run(job, [("c-n1", [0]), ("c-n0", [0])][:nodes])
    return w, job


def _apply(w: World, decided) -> None:
    for _stream, event in decided:
        w.apply(event.type, **event.data)


def test_the_option_is_the_manual_settings_and_requeue_by_default():
    w, _job = _busy()
    cluster = w.models.clusters["c"]
    assert deallocation_option(cluster) == "requeue"  # Batch AI's default
    for option in ("requeue", "terminate", "waitforjobcompletion"):
        w, _job = _busy(option)
        assert deallocation_option(w.models.clusters["c"]) == option


def test_a_cluster_being_deleted_or_scaling_itself_waits_for_its_jobs():
    w, _job = _busy("terminate")
    cluster = w.models.clusters["c"]
    cluster.scale_settings = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 2}}
    assert deallocation_option(cluster) == "waitforjobcompletion"
    w, _job = _busy("terminate")
    w.apply("ClusterDeleteRequested", clusterId="c")
    assert deallocation_option(w.models.clusters["c"]) == "waitforjobcompletion"


def test_requeue_drains_the_node_and_requeues_its_attempt_without_spending_retries():
    w, job = _busy("requeue")
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobRequeued"]
    requeued = decided[1][1].data
    assert requeued["cause"] == "interrupted" and requeued["attempt"] == 1
    assert requeued["error"]["code"] == "node_deallocated"
    assert "c-n1" in requeued["error"]["message"] and "requeue" in requeued["error"]["message"]
    _apply(w, decided)
    assert w.models.nodes["c-n1"].state == LEAVING
    assert w.models.jobs[job].state == "queued" and w.models.jobs[job].retries == {"interrupted": 1}
    assert deallocate(w.models, "c-n1", "requeue", "batchd:serve") == []  # asked once
    # its task stops (the agent killed it): it runs again, on the node that stays
    w.apply("JobTaskExited", jobId=job, attempt=1, task=0, exitCode=143, node="c-n1")
    assert not w.models.nodes["c-n1"].allocations  # the node can go now
    assert placed(w.plan()) == {job: [{"node": "c-n0", "gpus": [0]}]}


def test_terminate_drains_the_node_and_terminates_its_job_with_the_reason():
    w, job = _busy("terminate")
    decided = deallocate(w.models, "c-n1", "terminate", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobTerminateRequested"]
    reason = decided[1][1].data["reason"]
    assert "c-n1" in reason and "terminate" in reason
    _apply(w, decided)
    assert w.models.jobs[job].state == "terminating"
    assert deallocate(w.models, "c-n1", "terminate", "batchd:serve") == []
    w.apply("JobTaskExited", jobId=job, attempt=1, task=0, exitCode=143, node="c-n1")
    w.apply("JobTerminated", jobId=job, attempt=1, reason=reason)
    assert w.models.jobs[job].state == "failed" and not w.models.nodes["c-n1"].allocations


def test_waitforjobcompletion_only_drains_the_node():
    w, job = _busy("waitforjobcompletion")
    decided = deallocate(w.models, "c-n1", "waitforjobcompletion", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested"]
    _apply(w, decided)
    assert w.models.jobs[job].state == "running"
    assert deallocate(w.models, "c-n1", "waitforjobcompletion", "batchd:serve") == []


def test_a_job_being_terminated_on_the_node_is_left_to_end():
    w, job = _busy("requeue")
    w.apply("JobTerminateRequested", jobId=job, reason="terminated by ann")
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested"]


def test_a_multi_node_attempt_on_a_node_that_goes_is_requeued_whole():
    w, job = _busy("requeue", nodes=2)
    decided = deallocate(w.models, "c-n1", "requeue", "batchd:serve")
    assert [e.type for _s, e in decided] == ["NodeDrainRequested", "JobRequeued"]
    _apply(w, decided)
    assert w.models.jobs[job].state == "queued"


class _Exited:
    """An agent process that has exited (nothing to stop)."""

    returncode = 0


async def test_a_node_let_go_before_its_agent_registered_has_its_token_revoked(tmp_path):
    """local-1's agent was started (its token made) but is stopped before it registers: no
    node in the read models, yet its token is revoked and its file deleted all the same."""
    w = local_world("local-0")
    for node in ("local-0", "local-1"):
        w.apply("TokenCreated", tokenId=f"t-{node}", name=f"local-agent-{node}", role="agent",
                workspaces=[], hash=f"h-{node}", node=node)  # fmt: skip
        (tmp_path / "nodes" / node).mkdir(parents=True)
        (tmp_path / "nodes" / node / "agent.token").write_text("secret\n")
    control = _Control(w)
    provider = LocalProvider(control, "http://127.0.0.1:1", tmp_path, 1, 4, "process", None,
                             None)  # fmt: skip
    provider.processes = {"local-0": _Exited(), "local-1": _Exited()}
    assert "local-1" not in w.models.nodes
    await provider._let_go("local-1")
    assert [(e.type, e.data) for _s, e in control.appended] == [
        ("TokenRevoked", {"tokenId": "t-local-1"})
    ]
    assert set(w.models.tokens) == {"t-local-0"} and "local-1" not in provider.processes
    assert not (tmp_path / "nodes" / "local-1" / "agent.token").exists()
    assert (tmp_path / "nodes" / "local-0" / "agent.token").exists()


def test_a_local_cluster_sized_past_its_bound_before_there_was_one_runs_only_that_many():
    """A log from before `[local] max_nodes` may ask for thousands: no more run."""
    w = local_world("local-0", "local-1")
    _manual(w, 10_000)
    catalog = CATALOG.with_size(local_size(4, 3))
    provider = LocalProvider(_Control(w), "http://127.0.0.1:1", None, 2, 4, "process", None,
                             catalog)  # fmt: skip
    assert provider.wanted() == {"local": 3}
    _manual(w, 1)
    assert provider.wanted() == {"local": 1}


async def test_a_node_let_go_has_its_token_revoked_under_a_name_made_unique_too(tmp_path):
    """A node's token is named local-agent-<node>-N where that name was taken."""
    w = local_world("local-0")
    w.apply("TokenCreated", tokenId="t-1", name="local-agent-local-0-1", role="agent",
            workspaces=[], hash="h-1", node="local-0")  # fmt: skip
    control = _Control(w)
    provider = LocalProvider(control, "http://127.0.0.1:1", tmp_path, 1, 4, "process", None,
                             None)  # fmt: skip
    await provider._revoke_credential("local-0")
    assert [(e.type, e.data) for _s, e in control.appended] == [
        ("TokenRevoked", {"tokenId": "t-1"})
    ]


async def test_a_dead_agents_node_is_lost_only_once_its_watchdog_has_let_go(tmp_path):
    """An agent killed outright: its watchdog holds the work directory's lock until it has
    ended the agent's tasks (removing a container takes a moment). The node, and so its
    attempts, are lost only then: the retry never runs beside the old attempt."""
    w = local_world("local-0")
    control = _Control(w)
    provider = LocalProvider(control, "http://127.0.0.1:1", tmp_path, 1, 4, "process", None,
                             None)  # fmt: skip
    died = _Died()
    provider.processes = {"local-0": died}
    held = watchdog.hold_work_dir(tmp_path / "nodes" / "local-0")  # the watchdog, still at work
    watching = asyncio.ensure_future(provider._watch("local-0", died))
    try:
        await asyncio.sleep(0.5)
        assert not watching.done() and control.appended == []  # not lost yet
    finally:
        os.close(held)  # its tasks are ended: it lets go
    await asyncio.wait_for(watching, 10)
    assert [e.type for _s, e in control.appended] == ["NodeLost"]
    # a new agent started meanwhile (it waited for the same lock): its registration, under a
    # new incarnation, loses the old agent's attempts; this watch stops waiting, says nothing
    held = watchdog.hold_work_dir(tmp_path / "nodes" / "local-0")
    try:
        watching = asyncio.ensure_future(provider._watch("local-0", died))
        await asyncio.sleep(0.2)
        provider.processes["local-0"] = _Exited()  # (the next reconcile's)
        await asyncio.wait_for(watching, 10)
    finally:
        os.close(held)
    assert [e.type for _s, e in control.appended] == ["NodeLost"]  # nothing more


class _Died:
    """An agent process that was killed."""

    returncode = -9

    async def wait(self) -> int:
        return self.returncode
