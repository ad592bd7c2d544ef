"""Cluster documents: Batch AI 2018-05-01 cluster properties, validated.

`parse_cluster(document, catalog)` accepts the properties with or without the envelope (as
jobs do) and checks `vmSize` against the VM size catalog. `parse_scale_settings` checks a
PATCH, which may change only `scaleSettings`. batchd adds `preemption` (default false): may
the scheduler preempt running `preemptible` jobs of lower priority on this cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchd.scheduler.jobspec import (
    ENV_NAME,
    ENV_VALUE,
    MOUNT_VOLUMES,
    check_unique_variables,
    checked_variables,
    setup_prefix,
)
from batchd.scheduler.schema import (
    DocumentError,
    boolean,
    choice,
    integer,
    items,
    key_vault_reference,
    obj,
    resource_id,
    string,
    unwrap,
)
from batchd.scheduler.vmsizes import CATALOG, Catalog, VmSize

MAX_NODES = 10_000
_text = string()

SCALE_SETTINGS = obj({
    "manual": obj({
        "targetNodeCount": integer(0, MAX_NODES),
        "nodeDeallocationOption": choice("requeue", "terminate", "waitforjobcompletion"),
    }, required=["targetNodeCount"]),
    "autoScale": obj({
        "minimumNodeCount": integer(0, MAX_NODES), "maximumNodeCount": integer(1, MAX_NODES),
        "initialNodeCount": integer(0, MAX_NODES),
    }, required=["minimumNodeCount", "maximumNodeCount"]),
}, required=["*"], one_of=["manual", "autoScale"])  # fmt: skip

CLUSTER_PROPERTIES = obj({
    "vmSize": _text,
    "vmPriority": choice("dedicated", "lowpriority"),
    "scaleSettings": SCALE_SETTINGS,
    "virtualMachineConfiguration": obj({"imageReference": obj({
        "publisher": _text, "offer": _text, "sku": _text, "version": _text,
        "virtualMachineImageId": _text,
    }, required=["publisher", "offer", "sku"])}),
    "nodeSetup": obj({
        "setupTask": obj({
            "commandLine": _text, "stdOutErrPathPrefix": setup_prefix,
            "environmentVariables": items(obj({"name": ENV_NAME, "value": ENV_VALUE},
                                              required=["name", "value"])),
            "secrets": items(obj({"name": ENV_NAME, "value": ENV_VALUE,
                                  "valueSecretReference": key_vault_reference},
                                 required=["name", "*"], one_of=["value", "valueSecretReference"])),
        }, required=["commandLine", "stdOutErrPathPrefix"]),
        "mountVolumes": MOUNT_VOLUMES,
        "performanceCountersSettings": obj({"appInsightsReference": obj({
            "component": resource_id, "instrumentationKey": _text,
            "instrumentationKeySecretReference": key_vault_reference,
        }, required=["component"])}, required=["appInsightsReference"]),
    }),
    "userAccountSettings": obj({
        "adminUserName": _text, "adminUserSshPublicKey": _text, "adminUserPassword": _text,
    }, required=["adminUserName"]),
    "subnet": resource_id,
    "preemption": boolean,
}, required=["vmSize"])  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    vm_size: VmSize
    low_priority: bool
    scale_settings: dict[str, Any]
    max_nodes: int  # the most nodes the scale settings allow
    preemption: bool
    properties: dict[str, Any]


def max_nodes(scale_settings: dict[str, Any]) -> int:
    if "autoScale" in scale_settings:
        return scale_settings["autoScale"]["maximumNodeCount"]
    return scale_settings.get("manual", {}).get("targetNodeCount", 0)


def parse_scale_settings(value: Any, path: str = "scaleSettings",
                         size: VmSize | None = None) -> dict[str, Any]:  # fmt: skip
    """Checked scale settings, within the most nodes a cluster of VM size `size` may have."""
    settings = SCALE_SETTINGS(value, path)
    auto = settings.get("autoScale")
    if auto is not None:
        low, high = auto["minimumNodeCount"], auto["maximumNodeCount"]
        if low > high:
            raise DocumentError(f"{path}.autoScale", "minimumNodeCount exceeds maximumNodeCount")
        initial = auto.get("initialNodeCount")
        if initial is not None and not low <= initial <= high:
            rule = "must lie between minimumNodeCount and maximumNodeCount"
            raise DocumentError(f"{path}.autoScale.initialNodeCount", rule)
    if size is not None and size.max_nodes is not None and max_nodes(settings) > size.max_nodes:
        field = "autoScale.maximumNodeCount" if auto is not None else "manual.targetNodeCount"
        raise DocumentError(f"{path}.{field}", f"must be at most {size.max_nodes}: the most "
                            f"nodes a cluster of VM size {size.name} may have")  # fmt: skip
    return settings


def parse_cluster(document: Any, catalog: Catalog = CATALOG) -> ClusterSpec:
    """Validate a cluster document; raise DocumentError naming the first field that is wrong."""
    properties, prefix = unwrap(document)
    props = CLUSTER_PROPERTIES(properties, prefix)
    where = f"{prefix}." if prefix else ""
    size = catalog.get(props["vmSize"])
    if size is None:
        raise DocumentError(f"{where}vmSize", f"{props['vmSize']!r} is not a known VM size")
    setup = (props.get("nodeSetup") or {}).get("setupTask") or {}
    checked_variables(setup, f"{where}nodeSetup.setupTask")  # none of batchd's names
    check_unique_variables(setup, f"{where}nodeSetup.setupTask")  # each set once
    scale = props.get("scaleSettings", {"manual": {"targetNodeCount": 0}})
    scale = parse_scale_settings(scale, f"{where}scaleSettings", size)
    return ClusterSpec(
        vm_size=size,
        low_priority=props.get("vmPriority") == "lowpriority",
        scale_settings=scale,
        max_nodes=max_nodes(scale),
        preemption=props.get("preemption", False),
        properties=props,
    )
