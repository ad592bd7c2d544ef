"""The job state machine, VM sizes and cluster documents."""

from __future__ import annotations

import pytest

from batchd.projections import lifecycle
from batchd.projections.lifecycle import InvalidTransition, check
from batchd.scheduler.clusterspec import parse_cluster, parse_scale_settings
from batchd.scheduler.schema import DocumentError
from batchd.scheduler.vmsizes import CATALOG

STATES = ["queued", "scheduled", "preparing", "running", "terminating", "succeeded", "failed"]


def test_the_lifecycle_of_design_md():
    assert check("queued", "JobScheduled") == "scheduled"
    assert check("scheduled", "JobPreparing") == "preparing"
    assert check("preparing", "JobStarted") == "running"
    assert check("running", "JobSucceeded") == "succeeded"
    assert check("running", "JobRequeued") == "queued"
    assert check("queued", "JobTerminateRequested") == "terminating"
    assert check("terminating", "JobTerminated") == "failed"
    assert check("failed", "JobDeleted") == "deleted"
    assert check("queued", "JobPendingReasonChanged") == "queued"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", sorted(lifecycle.TRANSITIONS))
def test_every_refusal_names_the_state_and_the_command(state, event):
    if lifecycle.allowed(state, event):
        assert check(state, event) in {*STATES, "deleted"}
        return
    with pytest.raises(InvalidTransition) as refused:
        check(state, event)
    message = str(refused.value)
    assert f"a job that is {state}" in message
    assert message.startswith(f"cannot {lifecycle.COMMAND_OF[event]} ")


def test_terminal_and_terminating_jobs_cannot_go_back_to_the_queue():
    for state in ("terminating", "succeeded", "failed"):
        assert not lifecycle.allowed(state, "JobRequeued")
        assert not lifecycle.allowed(state, "JobScheduled")
    assert not lifecycle.allowed("running", "JobDeleted")


def test_vm_sizes_are_found_without_regard_to_case_and_can_be_overridden():
    size = CATALOG.get("STANDARD_ND96ISR_H100_V5")
    assert (size.gpus, size.gpu_model, size.vcpus) == (8, "NVIDIA H100 80GB HBM3", 96)
    assert CATALOG.get("Standard_D4s_v3").gpus == 0
    local = CATALOG.with_overrides({"Local4": {"gpus": 4, "vcpus": 16, "memory_mb": 65536}})
    assert local.get("local4").gpus == 4 and CATALOG.get("local4") is None
    with pytest.raises(ValueError, match=r"vm_sizes\.Bad"):
        CATALOG.with_overrides({"Bad": {"gpus": 1}})


def test_a_cluster_document_with_or_without_the_envelope():
    document = {"vmSize": "standard_nc24s_v3", "vmPriority": "LowPriority",
                "scaleSettings": {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 8}},
                "userAccountSettings": {"adminUserName": "ann"}}  # fmt: skip
    spec = parse_cluster({"properties": document, "location": "westeurope"})
    assert spec.vm_size.name == "Standard_NC24s_v3" and spec.vm_size.gpus == 4
    assert spec.low_priority and spec.max_nodes == 8 and not spec.preemption
    assert parse_cluster(document) == spec


BAD_CLUSTERS = [  # (a cluster document, the field it names, its rule)
    ({"vmSize": "Standard_XL9000"}, "vmSize", "not a known VM size"),
    ({}, "vmSize", "is required"),
    ({"vmSize": "Standard_NC6", "scaleSettings": {}}, "scaleSettings", "needs one of"),
    ({"vmSize": "Standard_NC6", "scaleSettings": {"manual": {"targetNodeCount": 1},
      "autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 1}}},
     "scaleSettings", "only one of"),
    ({"vmSize": "Standard_NC6", "scaleSettings": {"autoScale": {"minimumNodeCount": 3,
      "maximumNodeCount": 1}}}, "scaleSettings.autoScale", "exceeds"),
    ({"vmSize": "Standard_NC6", "vmPriority": "cheap"}, "vmPriority", "dedicated"),
    ({"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": {"commandLine": "x"}}},
     "nodeSetup.setupTask.stdOutErrPathPrefix", "is required"),
    ({"vmSize": "Standard_NC6", "colour": "red"}, "colour", "not a known property"),
    ({"vmSize": "Standard_NC6", "nodeSetup": {"setupTask": {
        "commandLine": "x", "stdOutErrPathPrefix": "/logs",
        "secrets": [{"name": "K", "valueSecretReference": {"secretUrl": "https://v/s"}}]}}},
     "nodeSetup.setupTask.secrets[0].valueSecretReference", "Key Vault reference"),
]  # fmt: skip


@pytest.mark.parametrize(("document", "where", "rule"), BAD_CLUSTERS)
def test_bad_cluster_documents_are_refused_by_field_path(document, where, rule):
    with pytest.raises(DocumentError) as refused:
        parse_cluster(document)
    assert refused.value.path == where and rule in refused.value.rule


def test_scale_settings_alone_for_a_patch():
    assert parse_scale_settings({"manual": {"targetNodeCount": 3}}) == {
        "manual": {"targetNodeCount": 3}
    }
    with pytest.raises(DocumentError, match=r"scaleSettings\.manual\.targetNodeCount"):
        parse_scale_settings({"manual": {"targetNodeCount": -1}})
