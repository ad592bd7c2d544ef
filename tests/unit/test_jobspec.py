"""Job documents: every real Batch AI recipe is accepted; bad ones are refused by field path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from batchd.scheduler.clusterspec import parse_cluster
from batchd.scheduler.jobspec import MAX_WALL_CLOCK_S, parse_job, shm_bytes
from batchd.scheduler.schema import DocumentError

RECIPES = sorted((Path(__file__).parents[1] / "data" / "batchai-recipes").glob("*.json"))
MINIMAL = {
    "nodeCount": 1,
    "stdOutErrPathPrefix": "$AZ_BATCHAI_JOB_MOUNT_ROOT/logs",
    "customToolkitSettings": {"commandLine": "python train.py"},
}


def test_the_recipes_are_there():
    assert len(RECIPES) == 17


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_batch_ai_recipe_is_accepted(recipe):
    document = json.loads(recipe.read_text())
    spec = parse_job(document)
    assert spec.node_count == document["properties"]["nodeCount"]
    assert spec.toolkit in document["properties"]
    assert spec.priority == 0 and spec.max_wall_clock_s == MAX_WALL_CLOCK_S


def test_with_or_without_the_envelope_the_same_job():
    bare = parse_job(MINIMAL)
    wrapped = parse_job({"properties": MINIMAL, "location": "eastus", "name": "x", "tags": {}})
    assert bare == wrapped


@pytest.mark.parametrize(
    ("extra", "priority"),
    [({}, 0), ({"schedulingPriority": "High"}, 500), ({"schedulingPriority": "low"}, -500),
     ({"priority": -1000}, -1000), ({"priority": 250}, 250)],
)  # fmt: skip
def test_priorities_map_to_one_integer(extra, priority):
    assert parse_job({**MINIMAL, **extra}).priority == priority


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.00:00:00", 86400), ("02:30:00", 9000), ("7.00:00:00", 604800), ("PT90M", 5400),
     ("P1DT1H", 90000), ("00:00:00.5", 1), ("00:01:00.0000000", 60), ("PT1.5S", 2),
     ("PT0.25S", 1)],
)  # fmt: skip
def test_wall_clock_limits_in_both_notations(text, seconds):
    spec = parse_job({**MINIMAL, "constraints": {"maxWallClockTime": text}})
    assert spec.max_wall_clock_s == seconds
    assert spec.properties["constraints"]["maxWallClockTime"] == text  # stored as given


@pytest.mark.parametrize("text", ["P1DT", "25:00:00", "PT\u0661H", "\u0661:00:00", "PT1H\n", None])
def test_durations_neither_notation_reads_are_refused(text):
    """Other tools read the stored text: a time part that says nothing, 25 hours without a
    day, digits of other scripts, a trailing newline are neither ISO-8601 nor .NET."""
    with pytest.raises(DocumentError) as refused:
        parse_job({**MINIMAL, "constraints": {"maxWallClockTime": text}})
    assert refused.value.path == "constraints.maxWallClockTime"
    assert refused.value.rule.endswith(", not null" if text is None else repr(text))


VAULT = {
    "sourceVault": {"id": "/subscriptions/s/vaults/v"},
    "secretUrl": "https://v.vault.azure.net/secrets/k",
}


def _broken(path: str, value):
    document = copy.deepcopy({"properties": MINIMAL})
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "where", "rule"),
    [
        ("properties.nodeCount", 0, "properties.nodeCount", "at least 1"),
        ("properties.nodeCount", "2", "properties.nodeCount", "whole number"),
        ("properties.nodeCount", KeyError, "properties.nodeCount", "is required"),
        ("properties.pyTorchSettings", {"pythonScriptFilePath": "t.py"},
         "properties.customToolkitSettings", "cannot be given with pyTorchSettings"),
        ("properties.customToolkitSettings", KeyError, "properties", "needs a command"),
        ("properties.schedulingPriority", "urgent", "properties.schedulingPriority",
         "one of low, normal, high"),
        ("properties.priority", 5000, "properties.priority", "at most 1000"),
        ("properties.constraints.maxWallClockTime", "-01:00:00",
         "properties.constraints.maxWallClockTime", "negative"),
        ("properties.constraints.maxWallClockTime", "8.00:00:00",
         "properties.constraints.maxWallClockTime", "at most 7 days"),
        ("properties.constraints.maxWallClockTime", "soon",
         "properties.constraints.maxWallClockTime", "duration"),
        ("properties.constraints.maxWallClockTime", "00:00:00." + "0" * 5000 + "1",
         "properties.constraints.maxWallClockTime", "5010 characters long"),
        ("properties.frobnicate", 1, "properties.frobnicate", "not a known property"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "x", "tag": "y"}},
         "properties.containerSettings.imageSourceRegistry.tag", "not a known property"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "bad image!!"}},
         "properties.containerSettings.imageSourceRegistry.image", "an image reference"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "Team/Train:1"}},
         "properties.containerSettings.imageSourceRegistry.image", "lower-case path"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "x:"}},
         "properties.containerSettings.imageSourceRegistry.image", "an image reference"),
        ("properties.environmentVariables", [{"name": "1BAD", "value": "x"}],
         "properties.environmentVariables[0].name", "variable name"),
        ("properties.gpusPerNode", -1, "properties.gpusPerNode", "at least 0"),
        ("properties.mountVolumes", {"azureFileShares": [{"azureFileUrl": "u"}]},
         "properties.mountVolumes.azureFileShares[0].relativeMountPath", "is required"),
        ("color", "blue", "color", "not a known property"),
        ("properties.customToolkitSettings", {"commandLine": "echo a\x00b"},
         "properties.customToolkitSettings.commandLine", "NUL"),
        ("properties.environmentVariables", [{"name": "A", "value": "x\x00"}],
         "properties.environmentVariables[0].value", "NUL"),
        ("properties.secrets", [{"name": "TOKEN", "valueSecretReference": VAULT}],
         "properties.secrets[0].valueSecretReference", "Key Vault reference, which batchd"),
        ("properties.containerSettings", {"imageSourceRegistry": {
            "image": "x", "credentials": {"username": "u", "passwordSecretReference": VAULT}}},
         "properties.containerSettings.imageSourceRegistry.credentials.passwordSecretReference",
         "give the value itself"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "x"},
                                          "shmSize": "99999999999g"},
         "properties.containerSettings.shmSize", "at most 1024g"),
        ("properties.containerSettings", {"imageSourceRegistry": {"image": "x"},
                                          "shmSize": "0.0001k"},
         "properties.containerSettings.shmSize", "less than one byte"),
        ("properties.customToolkitSettings", {"commandLine": "echo caf\udce9"},
         "properties.customToolkitSettings.commandLine", "valid UTF-8 text (character 9"),
        ("properties.secrets", [{"name": "K", "value": "\ud800"}],
         "properties.secrets[0].value", "valid UTF-8"),
    ],
)  # fmt: skip
def test_bad_documents_are_refused_by_field_path(path, value, where, rule):
    with pytest.raises(DocumentError) as refused:
        parse_job(_broken(path, value))
    assert refused.value.path == where
    assert rule in refused.value.rule


def test_two_toolkits_are_refused_by_name():
    expected = "horovodSettings: cannot be given with pyTorchSettings"
    with pytest.raises(DocumentError, match=expected):
        parse_job({
            **{k: v for k, v in MINIMAL.items() if k != "customToolkitSettings"},
            "pyTorchSettings": {"pythonScriptFilePath": "a.py"},
            "horovodSettings": {"pythonScriptFilePath": "b.py"},
        })  # fmt: skip


def test_whole_numbers_written_with_a_zero_fraction_are_those_numbers():
    spec = parse_job({**MINIMAL, "nodeCount": 1.0, "gpusPerNode": 1e0, "priority": 100.0})
    assert (spec.properties["nodeCount"], spec.properties["gpusPerNode"]) == (1, 1)
    assert type(spec.properties["nodeCount"]) is int and spec.priority == 100
    with pytest.raises(DocumentError, match="nodeCount: must be a whole number"):
        parse_job({**MINIMAL, "nodeCount": 1.5})


def test_shm_sizes_are_read_as_docker_reads_them():
    sizes = ("2g", "2GB", "2 GiB", "1.5g", "512m", "512MB", "1024", "1024b", "1k", "1t")
    assert [shm_bytes(s) for s in sizes] == [
        2 << 30,
        2 << 30,
        2 << 30,
        3 << 29,
        512 << 20,
        512 << 20,
        1024,
        1024,
        1024,
        1 << 40,
    ]
    assert [shm_bytes(s) for s in ("2x", "g", "-1g", "1..5g", "", None)] == [None] * 6
    container = {"imageSourceRegistry": {"image": "x"}, "shmSize": "8GB"}
    assert parse_job({**MINIMAL, "containerSettings": container}).properties[
        "containerSettings"]["shmSize"] == "8GB"  # fmt: skip


def test_an_environment_variable_may_be_set_empty():
    variables = [{"name": "EMPTY", "value": ""}]
    spec = parse_job({**MINIMAL, "environmentVariables": variables, "secrets": [
        {"name": "BLANK", "value": ""}]})  # fmt: skip
    assert spec.properties["environmentVariables"] == variables
    cluster = {"vmSize": "Standard_NC6", "scaleSettings": {"manual": {"targetNodeCount": 1}},
               "nodeSetup": {"setupTask": {"commandLine": "true", "stdOutErrPathPrefix": "/x",
                                           "environmentVariables": variables}}}  # fmt: skip
    assert parse_cluster(cluster).properties["nodeSetup"]["setupTask"][
        "environmentVariables"] == variables  # fmt: skip


@pytest.mark.parametrize(
    ("name", "nodes", "rule"),
    [
        ("AZ_BATCHAI_JOB_ID", 1, "AZ_BATCHAI_JOB_ID is batchd's to set"),
        ("CUDA_VISIBLE_DEVICES", 1, "the task's GPUs"),
        ("NVIDIA_VISIBLE_DEVICES", 1, "the task's GPUs"),
        ("WORLD_SIZE", 2, "more than one node"),
        ("MASTER_ADDR", 2, "more than one node"),
    ],
)
def test_a_variable_batchd_sets_is_refused_not_silently_replaced(name, nodes, rule):
    for field in ("environmentVariables", "secrets"):
        document = {**MINIMAL, "nodeCount": nodes, field: [{"name": name, "value": "x"}]}
        with pytest.raises(DocumentError) as refused:
            parse_job(document)
        assert (refused.value.path, rule in refused.value.rule) == (f"{field}[0].name", True)


def test_a_setup_task_may_not_set_the_variables_batchd_sets_for_it():
    """Its AZ_BATCHAI_MOUNT_ROOT, NODE_ID, CLUSTER_NAME and WORKSPACE_NAME would be replaced."""
    for field in ("environmentVariables", "secrets"):
        variables = [{"name": "HOME_DIR", "value": "/x"},
                     {"name": "AZ_BATCHAI_MOUNT_ROOT", "value": "/mine"}]  # fmt: skip
        cluster = {"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": {
            "commandLine": "true", "stdOutErrPathPrefix": "/x", field: variables}}}  # fmt: skip
        with pytest.raises(DocumentError) as refused:
            parse_cluster({"properties": cluster})
        assert refused.value.path == f"properties.nodeSetup.setupTask.{field}[1].name"
        assert "AZ_BATCHAI_MOUNT_ROOT is batchd's to set" in refused.value.rule


def test_tf_config_is_batchds_on_a_distributed_tensorflow_job_and_batchd_task_always():
    script = {"pythonScriptFilePath": "train.py"}
    for tensorflow, nodes, refused in (({**script, "workerCount": 2}, 1, True),
                                       (script, 2, True), (script, 1, False)):  # fmt: skip
        document = {**MINIMAL, "nodeCount": nodes, "tensorFlowSettings": tensorflow,
                    "environmentVariables": [{"name": "TF_CONFIG", "value": "{}"}]}  # fmt: skip
        document.pop("customToolkitSettings", None)
        if refused:
            with pytest.raises(DocumentError, match="distributed TensorFlow"):
                parse_job(document)
        else:  # one process: batchd sets no TF_CONFIG, the job may
            parse_job(document)
    with pytest.raises(DocumentError, match="marks the task's processes"):
        parse_job({**MINIMAL, "secrets": [{"name": "BATCHD_TASK", "value": "x"}]})


def test_a_setup_task_sets_each_variable_once():
    for second in ("environmentVariables", "secrets"):
        setup = {"commandLine": "true", "stdOutErrPathPrefix": "/x",
                 "environmentVariables": [{"name": "A", "value": "1"}]}  # fmt: skip
        setup[second] = [*setup.get(second, []), {"name": "A", "value": "2"}]
        cluster = {"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": setup}}
        with pytest.raises(DocumentError) as refused:
            parse_cluster(cluster)
        index = 1 if second == "environmentVariables" else 0
        assert refused.value.path == f"nodeSetup.setupTask.{second}[{index}].name"
        assert "A is set already, by nodeSetup.setupTask.environmentVariables[0].name" in str(
            refused.value
        )


def test_a_single_node_job_may_set_its_own_world_size():
    variables = [{"name": "WORLD_SIZE", "value": "8"}, {"name": "RANK", "value": "0"}]
    assert parse_job({**MINIMAL, "environmentVariables": variables}).properties[
        "environmentVariables"] == variables  # fmt: skip


@pytest.mark.parametrize("relative", ["../../x", ".", "a/./b", "a/..", "..", "/abs"])
def test_a_mount_path_stays_under_its_mount_root(relative):
    shares = {"azureFileShares": [{"azureFileUrl": "u", "relativeMountPath": relative}]}
    with pytest.raises(DocumentError) as refused:
        parse_job({**MINIMAL, "mountVolumes": shares})
    assert refused.value.path == "mountVolumes.azureFileShares[0].relativeMountPath"
    with pytest.raises(DocumentError):
        parse_cluster({"vmSize": "Standard_NC6", "nodeSetup": {"mountVolumes": shares}})
    for fine in ("logs", "a/b.c", ".hidden", "..x"):
        fine_shares = {"azureFileShares": [{"azureFileUrl": "u", "relativeMountPath": fine}]}
        parse_job({**MINIMAL, "mountVolumes": fine_shares})


@pytest.mark.parametrize(
    ("language", "field"),
    [("Python", "configFilePath"), ("BrainScript", "pythonScriptFilePath")],
)
def test_cntk_settings_of_the_other_language_are_refused(language, field):
    document = {**MINIMAL, "cntkSettings": {"languageType": language, field: "train.x"}}
    document.pop("customToolkitSettings")
    with pytest.raises(DocumentError) as refused:
        parse_job(document)
    assert refused.value.path == f"cntkSettings.{field}"
    same = "BrainScript" if language == "Python" else "Python"
    parse_job({**document, "cntkSettings": {"languageType": same, field: "train.x"}})
    parse_job({**document, "cntkSettings": {field: "train.x"}})  # no language: as it says
