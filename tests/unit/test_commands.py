"""Commands: validated against the read models, turned into events; refused with nothing to
append, naming the field or the conflict."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest

from batchd.events.envelope import NewEvent, RecordedEvent
from batchd.projections import fold
from batchd.projections.lifecycle import InvalidTransition
from batchd.projections.model import ReadModels
from batchd.scheduler import commands, retries
from batchd.scheduler.commands import CommandError
from batchd.scheduler.schema import DocumentError
from batchd.scheduler.vmsizes import CATALOG, local_size

RECIPES = sorted((Path(__file__).parents[1] / "data" / "batchai-recipes").glob("*.json"))
JOB = {"nodeCount": 1, "stdOutErrPathPrefix": "/logs",
       "customToolkitSettings": {"commandLine": "python train.py"}}  # fmt: skip
AUTO = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 4}}
CLUSTER = {"vmSize": "Standard_NC24s_v3", "scaleSettings": AUTO}


class World:
    def __init__(self) -> None:
        self.m = ReadModels()
        self.ids = itertools.count(1)

    def do(self, decisions) -> list:
        for stream, event in decisions:
            n = self.m.position + 1
            fold.apply(self.m, RecordedEvent(n, event.event_id, stream, 1, event.type, 1, n,
                                             event.actor, None, None, event.data, b""))  # fmt: skip
        return decisions

    def new_id(self) -> str:
        return f"id-{next(self.ids)}"


@pytest.fixture
def w() -> World:
    w = World()
    w.do(commands.create_workspace(w.m, "ws", "user:ops"))
    w.do(commands.create_experiment(w.m, "ws", "exp", "user:ops"))
    w.do(commands.create_cluster(w.m, "ws", "gpu", CLUSTER, "user:ops", new_id=w.new_id))
    return w


def test_a_job_is_submitted_with_what_the_scheduler_needs(w):
    [(stream, event)] = w.do(commands.submit_job(w.m, "ws", "exp", "train", JOB, "user:ann",
                                                 cluster="gpu", new_id=w.new_id))  # fmt: skip
    assert event.type == "JobSubmitted" and stream == f"job-{event.data['jobId']}"
    assert event.data["cluster"] == "id-1" and event.data["owner"] == "ann"
    assert event.data["gpusPerNode"] == 4  # every GPU of an NC24s_v3 by default
    assert w.m.jobs[event.data["jobId"]].state == "queued"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_accepted_on_a_named_cluster(w, recipe):
    document = json.loads(recipe.read_text())
    [(_s, event)] = commands.submit_job(w.m, "ws", "exp", "r", document, "user:ann", cluster="gpu")
    assert event.data["nodeCount"] == document["properties"]["nodeCount"]


def test_a_batch_ai_resource_id_names_the_cluster(w):
    rid = (
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.BatchAI/workspaces/ws/clusters/gpu"
    )
    [(_s, event)] = commands.submit_job(w.m, "ws", "exp", "j", {**JOB, "cluster": {"id": rid}},
                                        "user:ann")  # fmt: skip
    assert event.data["cluster"] == "id-1"


@pytest.mark.parametrize(("target", "state"), [(2, "resizing"), (0, "steady")])
def test_a_cluster_created_with_nodes_to_come_is_resizing_from_its_creation(w, target, state):
    """The answer to the create says what the next read says: resizing until they join."""
    manual = {**CLUSTER, "scaleSettings": {"manual": {"targetNodeCount": target}}}
    w.do(commands.create_cluster(w.m, "ws", "new", manual, "user:ops", new_id=w.new_id))
    cluster = commands.find_cluster(w.m, "ws", "new")
    assert cluster.allocation_state == state
    assert commands.resize_changes(w.m, "scheduler") == []  # nothing left to say


@pytest.mark.parametrize("reference", [
    "/workspaces/clusters/clusters/gpu",  # batchd's own id, of a workspace named "clusters"
    "/subscriptions/s/resourceGroups/workspaces/providers/Microsoft.BatchAI/workspaces/clusters"
    "/clusters/gpu",
    "/subscriptions/s/resourceGroups/clusters/providers/Microsoft.BatchAI/workspaces/clusters"
    "/clusters/gpu",
])  # fmt: skip
def test_a_resource_id_is_read_from_its_end(reference):
    """A resource group or workspace named "workspaces" or "clusters" does not confuse it."""
    assert commands.cluster_reference(reference, "default", "") == ("clusters", "gpu")


def test_a_2018_03_01_cluster_id_names_a_cluster_of_the_jobs_own_workspace():
    reference = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.BatchAI/clusters/nc6"
    assert commands.cluster_reference(reference, "migrated", "") == ("migrated", "nc6")


@pytest.mark.parametrize("reference", ["/workspaces/ws/clusters/", "/workspaces/ws/gpu",
                                       "/clusters/gpu", "/workspaces//clusters/gpu",
                                       "/workspaces/ws/clusters/gpu/nodes",
                                       "/providers/Microsoft.BatchAI/clusters/"])  # fmt: skip
def test_what_is_not_a_cluster_id_is_refused(reference):
    with pytest.raises(DocumentError, match="neither a cluster name nor"):
        commands.cluster_reference(reference, "default", "")


BAD_JOBS = [  # (a change to JOB, on cluster "gpu" of CLUSTER; the field it names; its rule)
    ({"cluster": "nope"}, "cluster", "no cluster 'nope'"),
    ({"nodeCount": 5}, "nodeCount", "more than cluster 'gpu' can hold (at most 4)"),
    ({"gpusPerNode": 8}, "gpusPerNode", "more than the 4 GPUs of Standard_NC24s_v3"),
    ({"pyTorchSettings": {"pythonScriptFilePath": "x.py"}}, "customToolkitSettings",
     "cannot be given with pyTorchSettings"),
    ({"schedulingPriority": "asap"}, "schedulingPriority", "one of low, normal, high"),
    ({"constraints": {"maxWallClockTime": "-1:00:00"}}, "constraints.maxWallClockTime",
     "negative"),
    ({"magic": True}, "magic", "not a known property"),
    ({"nodeCount": 1e400}, "nodeCount", "whole number, not a number beyond any limit"),
    ({"inputDirectories": [{"id": "A", "path": "/x"}, {"id": "a", "path": "/y"}]},
     "inputDirectories[1].id", "AZ_BATCHAI_INPUT_A is set already, by inputDirectories[0]"),
    ({"outputDirectories": [{"id": "model", "pathPrefix": "/o"},
                            {"id": "MODEL", "pathPrefix": "/p"}]},
     "outputDirectories[1].id", "set already, by outputDirectories[0].id"),
    ({"outputDirectories": [{"id": "STDOUTERR", "pathPrefix": "/o"}]},
     "outputDirectories[0].id", "set already, by the job's stdout and stderr (stdouterr)"),
    ({"stdOutErrPathPrefix": "logs"}, "stdOutErrPathPrefix", "must be an absolute path"),
    ({"outputDirectories": [{"id": "M", "pathPrefix": "out"}]},
     "outputDirectories[0].pathPrefix", "or start with $AZ_BATCHAI_MOUNT_ROOT"),
    ({"outputDirectories": [{"id": "a-b", "pathPrefix": "/o"}]}, "outputDirectories[0].id",
     "letters, digits or '_'"),
    ({"inputDirectories": [{"id": "A", "path": "/x"}, {"id": "A", "path": "/y"}]},
     "inputDirectories[1].id", "AZ_BATCHAI_INPUT_A is set already, by inputDirectories[0].id"),
    ({"environmentVariables": [{"name": "AZ_BATCHAI_OUTPUT_M", "value": "/v"}],
      "outputDirectories": [{"id": "M", "pathPrefix": "/o"}]}, "outputDirectories[0].id",
     "set already, by environmentVariables[0].name"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "where", "rule"), BAD_JOBS)
def test_bad_jobs_are_refused_by_field(w, change, where, rule):
    with pytest.raises(DocumentError) as refused:
        commands.submit_job(w.m, "ws", "exp", "j", {**JOB, **change}, "user:ann", cluster="gpu")
    assert refused.value.path == where and rule in refused.value.rule


def test_names_conflicts_and_lifecycle(w):
    w.do(commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu"))
    with pytest.raises(CommandError, match="exists already") as conflict:
        commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu")
    assert conflict.value.status == 409
    w.do(commands.terminate_job(w.m, "ws", "exp", "j", "user:bob"))  # queued: ends at once
    job_id = w.m.job_ids["ws/exp/j"][-1]
    assert w.m.jobs[job_id].state == "failed"
    assert w.m.jobs[job_id].errors[-1]["code"] == "terminated"
    with pytest.raises(InvalidTransition) as ended:
        commands.terminate_job(w.m, "ws", "exp", "j", "user:bob")
    assert str(ended.value) == ("cannot terminate a job that is failed (only when queued or "
                                "scheduled or preparing or running or terminating)")  # fmt: skip
    w.do(commands.delete_job(w.m, "ws", "exp", "j", "user:ann"))
    w.do(commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu"))  # reused
    assert len(w.m.job_ids["ws/exp/j"]) == 2
    queued = commands.delete_job(w.m, "ws", "exp", "j", "user:ann")  # as Batch AI: terminated
    assert [e.type for _s, e in queued] == [
        "JobDeleteRequested", "JobTerminateRequested", "JobTerminated"]  # fmt: skip
    assert queued[0][1].data["reason"] == "deleted by user:ann"
    w.do(queued)
    assert commands.delete_job(w.m, "ws", "exp", "j", "user:ann") == []  # asked already
    [(_s, deleted)] = w.do(commands.finish_job(w.m, "ws", "exp", "j"))  # (the API, at once)
    assert (deleted.type, deleted.actor) == ("JobDeleted", "user:ann")
    assert commands.current_job(w.m, "ws", "exp", "j") is None
    w.do(commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu"))
    job_id = w.m.job_ids["ws/exp/j"][-1]
    tasks = [{"node": "n1", "gpus": [0]}]
    w.do([(f"job-{job_id}", _event("JobScheduled", jobId=job_id, attempt=1, tasks=tasks)),
          (f"job-{job_id}", _event("JobStarted", jobId=job_id, attempt=1))])  # fmt: skip
    running = w.do(commands.delete_job(w.m, "ws", "exp", "j", "user:ann"))
    assert [e.type for _s, e in running] == ["JobDeleteRequested", "JobTerminateRequested"]
    assert w.m.jobs[job_id].state == "terminating"
    assert w.m.jobs[job_id].delete_requested_by == "user:ann"
    assert commands.delete_job(w.m, "ws", "exp", "j", "user:ann") == []  # asked again
    assert commands.finish_jobs(w.m, "scheduler") == []  # its task still runs
    w.do([(f"job-{job_id}", _event("JobTaskExited", jobId=job_id, attempt=1, task=0,
                                   exitCode=143)),
          (f"job-{job_id}", _event("JobTerminated", jobId=job_id, attempt=1,
                                   reason="deleted by user:ann"))])  # fmt: skip
    [(_s, deleted)] = commands.finish_jobs(w.m, "scheduler")
    assert (deleted.type, deleted.actor) == ("JobDeleted", "user:ann")
    w.do([(_s, deleted)])
    assert commands.current_job(w.m, "ws", "exp", "j") is None
    with pytest.raises(CommandError) as missing:
        commands.terminate_job(w.m, "ws", "exp", "other", "user:bob")
    assert missing.value.status == 404


def test_a_running_job_is_terminating_until_its_node_reports_or_is_lost(w):
    w.do(commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu"))
    job_id = w.m.job_ids["ws/exp/j"][-1]
    tasks = [{"node": "n1", "gpus": [0]}]
    w.do([(f"job-{job_id}", _event("JobScheduled", jobId=job_id, attempt=1, tasks=tasks)),
          (f"job-{job_id}", _event("JobStarted", jobId=job_id, attempt=1))])  # fmt: skip
    w.do(commands.terminate_job(w.m, "ws", "exp", "j", "user:bob"))
    assert w.m.jobs[job_id].state == "terminating"
    assert commands.terminate_job(w.m, "ws", "exp", "j", "user:bob") == []  # asked again
    ended = retries.attempt_ended(w.m, job_id, 1, "node_lost")
    assert [e.type for _s, e in ended] == ["JobTerminated"]
    w.do(ended)
    assert w.m.jobs[job_id].state == "failed"


def test_malformed_cluster_resource_ids_are_refused_by_field(w):
    for reference in ("/x/clusters/c/workspaces", "workspaces/w/clusters", "a/b"):
        with pytest.raises(DocumentError) as refused:
            commands.submit_job(w.m, "ws", "exp", "k", {**JOB, "cluster": reference}, "user:a")
        assert refused.value.path == "cluster" and "resource id" in refused.value.rule


def test_zero_gpus_per_node_asks_for_no_gpu_on_a_gpu_size(w):
    [(_stream, event)] = commands.submit_job(w.m, "ws", "exp", "k", {**JOB, "gpusPerNode": 0},
                                             "user:a", cluster="gpu")  # fmt: skip
    assert event.data["gpusPerNode"] == 0


def _event(type_, **data):
    from batchd.events.envelope import NewEvent

    return NewEvent(type_, data, "scheduler", event_id=uuid.uuid4())


def test_a_cluster_of_a_bounded_vm_size_is_sized_up_to_its_bound_only(w):
    """A local cluster's nodes are processes on the daemon's machine: `[local] max_nodes`."""
    catalog = CATALOG.with_size(local_size(4, 8))
    local = {"vmSize": "local", "scaleSettings": {"manual": {"targetNodeCount": 9}}}
    with pytest.raises(DocumentError, match="at most 8") as refused:
        commands.create_cluster(w.m, "ws", "mine", local, "user:ops", catalog, w.new_id)
    assert refused.value.path == "scaleSettings.manual.targetNodeCount"
    local["scaleSettings"]["manual"]["targetNodeCount"] = 8
    w.do(commands.create_cluster(w.m, "ws", "mine", local, "user:ops", catalog, w.new_id))
    auto = {"scaleSettings": {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 9}}}
    with pytest.raises(DocumentError, match="at most 8") as refused:
        commands.update_scale_settings(w.m, "ws", "mine", auto, "user:ops", catalog)
    assert refused.value.path == "scaleSettings.autoScale.maximumNodeCount"
    auto["scaleSettings"]["autoScale"]["maximumNodeCount"] = 8
    w.do(commands.update_scale_settings(w.m, "ws", "mine", auto, "user:ops", catalog))
    big = {"scaleSettings": {"manual": {"targetNodeCount": 500}}}  # other sizes: no bound
    w.do(commands.update_scale_settings(w.m, "ws", "gpu", big, "user:ops", catalog))


def test_workspaces_experiments_and_clusters(w):
    with pytest.raises(DocumentError, match="workspace name"):
        commands.create_workspace(w.m, "bad name!", "user:ops")
    with pytest.raises(CommandError, match="still holds cluster 'gpu' and experiment 'exp':"):
        commands.delete_workspace(w.m, "ws", "user:ops")
    with pytest.raises(DocumentError, match="only scaleSettings"):
        commands.update_scale_settings(w.m, "ws", "gpu", {"vmSize": "Standard_NC6"}, "user:ops")
    manual = {"manual": {"targetNodeCount": 1}}
    both = {"properties": {"scaleSettings": manual}, "scaleSettings": manual}
    with pytest.raises(DocumentError, match="not a known property") as beside:
        commands.update_scale_settings(w.m, "ws", "gpu", both, "user:ops")
    assert beside.value.path == "scaleSettings"  # beside the envelope: not silently ignored
    grow = {"scaleSettings": {"manual": {"targetNodeCount": 2}}}
    changed = w.do(commands.update_scale_settings(w.m, "ws", "gpu", grow, "user:ops"))
    assert w.m.clusters["id-1"].scale_settings == {"manual": {"targetNodeCount": 2}}
    # the update's own answer shows the cluster resizing toward its two nodes
    assert [e.type for _s, e in changed][1:] == ["ClusterResizeStarted"]
    assert w.m.clusters["id-1"].allocation_state == "resizing"
    none = {"scaleSettings": {"manual": {"targetNodeCount": 0}}}
    changed = w.do(commands.update_scale_settings(w.m, "ws", "gpu", none, "user:ops"))
    assert [e.type for _s, e in changed][1:] == ["ClusterResizeCompleted"]  # it has none
    w.do(commands.update_scale_settings(w.m, "ws", "gpu", grow, "user:ops"))
    w.do(commands.submit_job(w.m, "ws", "exp", "j", JOB, "user:ann", cluster="gpu"))
    deleted = w.do(commands.delete_experiment(w.m, "ws", "exp", "user:ops"))
    assert [e.type for _s, e in deleted] == [
        "JobTerminateRequested",
        "JobTerminated",
        "ExperimentDeleted",
    ]
    decisions = w.do(commands.delete_cluster(w.m, "ws", "gpu", "user:ops"))
    assert [e.type for _s, e in decisions] == ["ClusterDeleteRequested", "ClusterDeleted"]
    assert "ws/gpu" not in w.m.cluster_ids


def test_a_deleted_experiments_jobs_go_with_it_and_a_new_one_starts_empty(w):
    for name in ("queued", "running"):
        w.do(commands.submit_job(w.m, "ws", "exp", name, JOB, "user:ann", cluster="gpu",
                                 new_id=w.new_id))  # fmt: skip
    running = commands.find_job(w.m, "ws", "exp", "running")
    w.do([(f"job-{running.job_id}", event) for event in (
        NewEvent("JobScheduled", {"jobId": running.job_id, "attempt": 1, "tasks": []}),
        NewEvent("JobStarted", {"jobId": running.job_id, "attempt": 1}),
    )])  # fmt: skip
    w.do(commands.delete_experiment(w.m, "ws", "exp", "user:ops"))
    w.do(commands.create_experiment(w.m, "ws", "exp", "user:ops"))
    # the queued job went at once; the running one is terminating, out of sight
    assert [j.name for j in w.m.jobs.values()] == ["running"]
    with pytest.raises(CommandError, match="no job 'running'"):
        commands.find_job(w.m, "ws", "exp", "running")
    # the names are free in the new experiment, but the one of a job still terminating only
    # once it has ended (its output directory is the same)
    w.do(commands.submit_job(w.m, "ws", "exp", "queued", JOB, "user:ann", cluster="gpu",
                             new_id=w.new_id))  # fmt: skip
    with pytest.raises(CommandError, match="still being terminated"):
        commands.submit_job(w.m, "ws", "exp", "running", JOB, "user:ann", cluster="gpu")
    w.do([(f"job-{running.job_id}", NewEvent("JobTerminated", {"jobId": running.job_id}))])
    assert running.job_id not in w.m.jobs  # ended: gone
    w.do(commands.submit_job(w.m, "ws", "exp", "running", JOB, "user:ann", cluster="gpu",
                             new_id=w.new_id))  # fmt: skip
    assert commands.find_job(w.m, "ws", "exp", "running").state == "queued"
    assert len(w.m.job_ids["ws/exp/running"]) == 2  # both incarnations keep their history


def _node(w: World, node_id: str, *states: str) -> None:
    w.do(
        [
            (
                f"node-{node_id}",
                NewEvent("NodeRegistered", {"nodeId": node_id, "cluster": "id-1", "gpus": 4}),
            )
        ]
    )
    for state in states:
        w.do([(f"node-{node_id}", NewEvent(state, {"nodeId": node_id}))])


def test_a_cluster_being_deleted_loses_its_idle_nodes_then_goes_when_the_last_job_ends(w):
    _node(w, "lost", "NodeSetupSucceeded", "NodeSuspected", "NodeLost")
    _node(w, "broken")
    w.do([("node-broken", NewEvent("NodeSetupFailed", {"nodeId": "broken", "exitCode": 1}))])
    _node(w, "idle", "NodeSetupSucceeded")
    _node(w, "busy", "NodeSetupSucceeded")
    [(_s, submitted)] = w.do(commands.submit_job(w.m, "ws", "exp", "train", JOB, "user:ann",
                                                 cluster="gpu", new_id=w.new_id))  # fmt: skip
    job_id = submitted.data["jobId"]
    w.do(
        [
            (
                f"job-{job_id}",
                NewEvent(
                    "JobScheduled",
                    {
                        "jobId": job_id,
                        "attempt": 1,
                        "tasks": [{"node": "busy", "gpus": [0, 1, 2, 3]}],
                    },
                ),
            )
        ]
    )
    assert commands.finish_deletions(w.m, "x") == []
    w.do(commands.update_scale_settings(w.m, "ws", "gpu", {"scaleSettings": {"manual": {
        "targetNodeCount": 4}}}, "user:ops"))  # fmt: skip
    assert w.m.clusters["id-1"].allocation_state == "steady"  # its four nodes are there
    deleted = w.do(commands.delete_cluster(w.m, "ws", "gpu", "user:ops"))
    # its nodes are leaving: resizing, from the delete's own answer on (Batch AI's
    # allocationState; provisioningState says deleting)
    assert [e.type for _s, e in deleted] == ["ClusterDeleteRequested", "ClusterResizeStarted"]
    assert w.m.clusters["id-1"].allocation_state == "resizing"
    assert commands.resize_changes(w.m, "x") == []
    assert commands.finish_deletions(w.m, "x")
    removed = w.do(commands.finish_deletions(w.m, "batchd:serve"))
    assert sorted(e.data["nodeId"] for _s, e in removed) == ["broken", "idle", "lost"]
    assert w.m.clusters["id-1"].nodes == ["busy"] and commands.finish_deletions(w.m, "x") == []
    assert commands.resize_changes(w.m, "x", {"id-1": 1}) == []  # still one node leaving
    w.do([(f"job-{job_id}", NewEvent("JobSucceeded", {"jobId": job_id, "attempt": 1,
                                                       "exitCode": 0}))])  # fmt: skip
    last = w.do(commands.finish_deletions(w.m, "batchd:serve"))
    assert [e.type for _s, e in last] == ["NodeRemoved", "ClusterDeleted"]
    assert "id-1" not in w.m.clusters and commands.finish_deletions(w.m, "x") == []


def test_output_goes_under_an_absolute_path_or_a_mount_root(w):
    for prefix in ("/srv/logs", "$AZ_BATCHAI_MOUNT_ROOT", "${AZ_BATCHAI_JOB_MOUNT_ROOT}/logs"):
        job = {**JOB, "stdOutErrPathPrefix": prefix}
        assert commands.submit_job(w.m, "ws", "exp", "j", job, "user:ann", cluster="gpu")
    for prefix in ("$AZ_BATCHAI_MOUNT_ROOTS/x", "$HOME/logs", "./logs"):
        with pytest.raises(DocumentError, match="must be an absolute path"):
            commands.submit_job(w.m, "ws", "exp", "j", {**JOB, "stdOutErrPathPrefix": prefix},
                                "user:ann", cluster="gpu")  # fmt: skip
    for prefix in ("logs", "$AZ_BATCHAI_JOB_MOUNT_ROOT/logs"):  # a node's setup has no job
        setup = {"setupTask": {"commandLine": "true", "stdOutErrPathPrefix": prefix}}
        with pytest.raises(DocumentError) as refused:
            commands.create_cluster(w.m, "ws", "c2", {**CLUSTER, "nodeSetup": setup}, "user:ops")
        assert refused.value.path == "nodeSetup.setupTask.stdOutErrPathPrefix"
        assert refused.value.rule == "must be an absolute path or start with $AZ_BATCHAI_MOUNT_ROOT"


def test_tensorflow_counts_are_bounded_as_batch_ai_bounded_them(w):
    base = {"nodeCount": 2, "stdOutErrPathPrefix": "/logs"}
    for settings, where, rule in (
        ({"parameterServerCount": 3}, "parameterServerCount", "more than the job's 2 node(s)"),
        ({"workerCount": 9}, "workerCount", "9 is more than the job's 8 GPU(s)"),
    ):
        job = {**base, "tensorFlowSettings": {"pythonScriptFilePath": "t.py", **settings}}
        with pytest.raises(DocumentError) as refused:
            commands.submit_job(w.m, "ws", "exp", "tf", job, "user:ann", cluster="gpu")
        assert refused.value.path == f"tensorFlowSettings.{where}" and rule in refused.value.rule
    fits = {**base, "tensorFlowSettings": {"pythonScriptFilePath": "t.py", "workerCount": 8}}
    assert commands.submit_job(w.m, "ws", "exp", "tf", fits, "user:ann", cluster="gpu")


def test_a_2018_03_01_job_with_its_experiment_name_and_location_is_accepted(w):
    old = {**JOB, "priority": 100, "experimentName": "my experiment", "location": "eastus"}
    [(_stream, event)] = commands.submit_job(w.m, "ws", "exp", "old", {"properties": old},
                                             "user:ann", cluster="gpu")  # fmt: skip
    assert (event.data["experiment"], event.data["priority"]) == ("exp", 100)


def test_a_cluster_being_deleted_is_resizing_while_nodes_leave_whatever_it_wanted(w):
    """Batch AI's allocationState is resizing while nodes are removed: a cluster being deleted
    wants no node, whatever its scale settings or its provider say."""
    _node(w, "a", "NodeSetupSucceeded")
    _node(w, "b", "NodeSetupSucceeded")
    assert commands.resize_changes(w.m, "x") == []  # autoScale, no provider: steady
    w.do([("cluster-ws/gpu", NewEvent("ClusterDeleteRequested", {"clusterId": "id-1"}))])
    for wanted in (None, {"id-1": 2}):  # (what a provider would have wanted before)
        assert [e.type for _s, e in commands.resize_changes(w.m, "x", wanted)] == [
            "ClusterResizeStarted"
        ]
    w.do(commands.resize_changes(w.m, "x"))
    assert w.m.clusters["id-1"].allocation_state == "resizing"
    w.do([("node-a", NewEvent("NodeRemoved", {"nodeId": "a"}))])
    assert commands.resize_changes(w.m, "x") == []  # b is still there


def test_a_workspace_is_not_made_again_for_tokens_of_an_earlier_one():
    """A log of an earlier version may hold a token limited to a workspace since deleted:
    making a workspace of that name waits until the token is revoked."""
    from batchd.projections.model import Token

    m = ReadModels()
    m.tokens["t1"] = Token("t1", "old-ci", "operator", ["ghost"], "h", 0, "admin")
    with pytest.raises(commands.CommandError, match="token 'old-ci' is limited to an earlier"):
        commands.create_workspace(m, "ghost", "admin")
    assert commands.create_workspace(m, "other", "admin")
