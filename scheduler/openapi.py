"""The OpenAPI 3 document of the HTTP API (docs/api.md), served at `/v1/openapi.json`.

`document()` builds it afresh from small helpers, the same every time. Request bodies declare
the Batch AI 2018-05-01 properties that scheduler/jobspec.py and scheduler/clusterspec.py
accept, with their types; rules the server checks against the read models (a known VM size,
a cluster that can hold `nodeCount` nodes, one toolkit per job) are left to it, and it
answers 400 naming the field. Responses are ARM-shaped: a resource `{"id", "name", "type",
"properties"}` (writes add `position`), a list `{"value", "nextLink"}`, an error
`{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from batchd.events.store import MAX_POSITION
from batchd.scheduler.jobspec import IMAGE_PATTERN
from batchd.scheduler.protocol import NODE_ID
from batchd.scheduler.toolkits import TOOL_TYPES

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
NAME_PATTERN = r"^[-A-Za-z0-9_]{1,64}$"  # what the log takes in stream names: ASCII
STATES = ("queued", "scheduled", "preparing", "running", "terminating", "succeeded", "failed")
EXECUTION_STATES = ("queued", "running", "terminating", "succeeded", "failed")
ROLES = ("viewer", "operator", "admin", "agent")
MAX_TOP = 1000

_WS = "/v1/workspaces/{workspace}"
_EXP = _WS + "/experiments/{experiment}"
_JOB = _EXP + "/jobs/{job}"


# -- schema helpers ---------------------------------------------------------------------------
def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def text() -> Schema:
    """A non-empty string, as the document validators require."""
    return string(minLength=1)


def integer(minimum: int | None = None, maximum: int | None = None) -> Schema:
    out: Schema = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def position() -> Schema:
    """A log position: positions are 64-bit signed integers in every store."""
    return integer(0, MAX_POSITION)


def boolean() -> Schema:
    return {"type": "boolean"}


def enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def array(item: Schema, max_items: int | None = None, min_items: int | None = None) -> Schema:
    out: Schema = {"type": "array", "items": item}
    if max_items is not None:
        out["maxItems"] = max_items
    if min_items is not None:
        out["minItems"] = min_items
    return out


def nullable(schema: Schema) -> Schema:
    """The schema or null (OpenAPI 3.1: JSON Schema's type list)."""
    if "type" not in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [schema["type"], "null"]}


def obj(
    properties: dict[str, Schema], required: tuple[str, ...] = (), *, closed: bool = False
) -> Schema:
    """An object with these properties; `closed`: no others (the server refuses unknown ones)."""
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out


def any_object() -> Schema:
    return {"type": "object", "additionalProperties": True}


def name() -> Schema:
    return string(pattern=NAME_PATTERN, minLength=1, maxLength=64)


# -- request documents ------------------------------------------------------------------------
def resource_reference() -> Schema:
    """A name, a resource id, or Batch AI's `{"id": ...}`."""
    return {"oneOf": [text(), obj({"id": text()}, ("id",), closed=True)]}


def secret_reference() -> Schema:
    """Batch AI's Key Vault reference, which batchd refuses (schema.key_vault_reference)."""
    return {"not": {}, "description": "An Azure Key Vault reference: refused, since batchd "
            "resolves no vault (give the value itself; batchd stores it encrypted)"}  # fmt: skip


def _resource_reference() -> Schema:
    return ref("ResourceReference")


def _secret_reference() -> Schema:
    return ref("SecretReference")


def _credentials() -> Schema:
    return obj(
        {"accountKey": text(), "accountKeySecretReference": _secret_reference()}, closed=True
    )


def _name_value(secret: bool = False) -> Schema:
    fields = {"name": string(minLength=1, maxLength=256), "value": text()}
    if secret:
        fields["valueSecretReference"] = _secret_reference()
        return obj(fields, ("name",), closed=True)
    return obj(fields, ("name", "value"), closed=True)


def mount_volumes() -> Schema:
    path = string(minLength=1, maxLength=512)
    share = {"accountName": text(), "credentials": _credentials(), "relativeMountPath": path}
    return obj({
        "azureFileShares": array(obj({
            **share, "azureFileUrl": text(), "fileMode": text(), "directoryMode": text(),
        }, ("azureFileUrl", "relativeMountPath"), closed=True)),
        "azureBlobFileSystems": array(obj({
            **share, "containerName": text(), "mountOptions": text(),
        }, ("accountName", "containerName", "relativeMountPath"), closed=True)),
        "fileServers": array(obj({
            "fileServer": _resource_reference(), "sourceDirectory": text(),
            "relativeMountPath": path, "mountOptions": text(),
        }, ("fileServer", "relativeMountPath"), closed=True)),
        "unmanagedFileSystems": array(obj(
            {"mountCommand": text(), "relativeMountPath": path},
            ("mountCommand", "relativeMountPath"), closed=True,
        )),
    }, closed=True)  # fmt: skip


def _envelope(properties: Schema, component: str, example: Schema) -> Schema:
    """Batch AI's documents come bare or inside `{"properties": ...}` (the `component`),
    whose `$schema`, `location`, `tags`, `id`, `name` and `type` are ignored."""
    ignored = {k: {} for k in ("$schema", "location", "tags", "id", "name", "type")}
    wrapped = obj({"properties": ref(component), **ignored}, ("properties",), closed=True)
    bare = copy.deepcopy(properties)
    bare["properties"].update(ignored)
    return {"anyOf": [bare, wrapped], "examples": [example]}


def plain_document() -> Schema:
    """A workspace's or experiment's body: `{}`, `{"location": ...}`, or the envelope with
    empty properties."""
    ignored = {k: {} for k in ("$schema", "location", "tags", "id", "name", "type")}
    return obj({"properties": obj({}, closed=True), **ignored}, closed=True)


def _toolkits() -> dict[str, Schema]:
    script = {
        "pythonScriptFilePath": text(), "pythonInterpreterPath": text(),
        "commandLineArgs": text(),
    }  # fmt: skip
    processes = {"processCount": integer(1, 10_000)}
    required = ("pythonScriptFilePath",)
    return {
        "cntkSettings": obj({**script, **processes, "languageType": enum("BrainScript", "Python"),
                             "configFilePath": text()}, closed=True),
        "pyTorchSettings": obj({**script, **processes,
                                "communicationBackend": enum("TCP", "Gloo", "MPI")},
                               required, closed=True),
        "tensorFlowSettings": obj({
            "pythonScriptFilePath": text(), "pythonInterpreterPath": text(),
            "masterCommandLineArgs": text(), "workerCommandLineArgs": text(),
            "parameterServerCommandLineArgs": text(), "workerCount": integer(1, 10_000),
            "parameterServerCount": integer(0, 10_000),
        }, required, closed=True),
        "caffeSettings": obj({**script, **processes, "configFilePath": text()}, closed=True),
        "caffe2Settings": obj(script, required, closed=True),
        "chainerSettings": obj({**script, **processes}, required, closed=True),
        "horovodSettings": obj({**script, **processes}, required, closed=True),
        "customMpiSettings": obj({"commandLine": text(), **processes}, ("commandLine",),
                                 closed=True),
        "customToolkitSettings": obj({"commandLine": text()}, ("commandLine",), closed=True),
    }  # fmt: skip


def job_properties() -> Schema:
    """Batch AI 2018-05-01 job properties and batchd's additions (scheduler/jobspec.py)."""
    registry = obj({
        "image": string(pattern=f"^{IMAGE_PATTERN}$", minLength=1, maxLength=512),
        "serverUrl": text(),
        "credentials": obj({"username": text(), "password": text(),
                            "passwordSecretReference": _secret_reference()},
                           ("username",), closed=True),
    }, ("image",), closed=True)  # fmt: skip
    return obj({
        "cluster": _resource_reference(),
        "nodeCount": integer(1, 10_000),
        "schedulingPriority": enum("low", "normal", "high"),
        "priority": integer(-1000, 1000),
        "experimentName": text(), "location": text(),  # 2018-03-01's, meaning nothing here
        "containerSettings": obj({"imageSourceRegistry": registry, "shmSize": text()},
                                 ("imageSourceRegistry",), closed=True),
        **_toolkits(),
        "jobPreparation": obj({"commandLine": text()}, ("commandLine",), closed=True),
        "inputDirectories": array(obj({"id": name(), "path": text()}, ("id", "path"),
                                      closed=True)),
        "outputDirectories": array(obj({
            "id": name(), "pathPrefix": text(), "pathSuffix": text(), "type": text(),
            "createNew": boolean(),
        }, ("id", "pathPrefix"), closed=True)),
        "stdOutErrPathPrefix": text(),
        "environmentVariables": array(_name_value()),
        "secrets": array(_name_value(secret=True)),
        "mountVolumes": ref("MountVolumes"),
        "constraints": obj({"maxWallClockTime": text()}, closed=True),
        "gpusPerNode": integer(0, 64),
        "maxRetries": integer(0, 100),
        "maxNodeFailureRetries": integer(0, 100),
        "preemptible": boolean(),
    }, ("nodeCount", "stdOutErrPathPrefix"), closed=True)  # fmt: skip


def scale_settings() -> Schema:
    nodes = integer(0, 10_000)
    return obj({
        "manual": obj({
            "targetNodeCount": nodes,
            "nodeDeallocationOption": enum("requeue", "terminate", "waitforjobcompletion"),
        }, ("targetNodeCount",), closed=True),
        "autoScale": obj({
            "minimumNodeCount": nodes, "maximumNodeCount": integer(1, 10_000),
            "initialNodeCount": nodes,
        }, ("minimumNodeCount", "maximumNodeCount"), closed=True),
    }, closed=True)  # fmt: skip


def cluster_properties() -> Schema:
    """Batch AI 2018-05-01 cluster properties and batchd's `preemption`
    (scheduler/clusterspec.py)."""
    setup_task = obj({
        "commandLine": text(), "stdOutErrPathPrefix": text(),
        "environmentVariables": array(_name_value()), "secrets": array(_name_value(secret=True)),
    }, ("commandLine", "stdOutErrPathPrefix"), closed=True)  # fmt: skip
    insights = obj({
        "component": _resource_reference(), "instrumentationKey": text(),
        "instrumentationKeySecretReference": _secret_reference(),
    }, ("component",), closed=True)  # fmt: skip
    image = obj({
        "publisher": text(), "offer": text(), "sku": text(), "version": text(),
        "virtualMachineImageId": text(),
    }, ("publisher", "offer", "sku"), closed=True)  # fmt: skip
    return obj({
        "vmSize": text(),
        "vmPriority": enum("dedicated", "lowpriority"),
        "scaleSettings": ref("ScaleSettings"),
        "virtualMachineConfiguration": obj({"imageReference": image}, closed=True),
        "nodeSetup": obj({
            "setupTask": setup_task, "mountVolumes": ref("MountVolumes"),
            "performanceCountersSettings": obj({"appInsightsReference": insights},
                                               ("appInsightsReference",), closed=True),
        }, closed=True),
        "userAccountSettings": obj({
            "adminUserName": text(), "adminUserSshPublicKey": text(), "adminUserPassword": text(),
        }, ("adminUserName",), closed=True),
        "subnet": _resource_reference(),
        "preemption": boolean(),
    }, ("vmSize",), closed=True)  # fmt: skip


JOB_EXAMPLE = {
    "properties": {
        "cluster": "gpu",
        "nodeCount": 1,
        "gpusPerNode": 1,
        "stdOutErrPathPrefix": "$AZ_BATCHAI_JOB_MOUNT_ROOT/logs",
        "customToolkitSettings": {"commandLine": "python train.py"},
    }
}
CLUSTER_EXAMPLE = {
    "properties": {
        "vmSize": "STANDARD_NC6",
        "vmPriority": "dedicated",
        "scaleSettings": {"manual": {"targetNodeCount": 2}},
    }
}


# -- response documents -----------------------------------------------------------------------
def error_schema() -> Schema:
    detail = obj({"name": string(), "value": string()}, ("name", "value"))
    return obj(
        {"error": obj({"code": text(), "message": string(), "details": array(detail)},
                      ("code", "message", "details"))},
        ("error",),
    )  # fmt: skip


def resource(properties: Schema) -> Schema:
    fields = {"id": text(), "name": text(), "type": text(), "properties": properties}
    return obj(fields, ("id", "name", "type", "properties"))


def written(component: str) -> Schema:
    """A write's answer: the resource and, beside its fields, the position of its last event."""
    return {"allOf": [ref(component), ref("Written")]}


def page(item: Schema) -> Schema:
    return obj({"value": array(item), "nextLink": nullable(string())}, ("value", "nextLink"))


def _common_properties() -> dict[str, Schema]:
    return {
        "creationTime": nullable(string(format="date-time")),
        "createdBy": nullable(string()),
        "provisioningState": string(),
    }


def workspace_view() -> Schema:
    return obj({**_common_properties(), "location": nullable(string())})


def cluster_view() -> Schema:
    counts = obj({k: integer(0) for k in ("idle", "running", "preparing", "unusable", "leaving")})
    return obj({
        **cluster_properties()["properties"],
        **_common_properties(),
        "vmSize": string(),
        "allocationState": string(),
        "currentNodeCount": integer(0),
        "nodeStateCounts": counts,
        "freeCapacity": any_object(),
        "errors": array(any_object()),
        "vmPriority": string(),
        "scaleSettings": any_object(),
    })  # fmt: skip


def node_view() -> Schema:
    return obj({
        "cluster": obj({"id": string()}, ("id",)), "state": string(),
        "since": nullable(string(format="date-time")), "lastTransition": string(),
        "gpus": integer(0), "gpuModel": string(), "gpuMemoryMb": integer(0), "cpus": integer(0),
        "memoryMb": integer(0), "runtimes": array(string()), "agentVersion": string(),
        "address": string(), "allocations": array(any_object()), "errors": array(any_object()),
        "heartbeatAgeSeconds": nullable({"type": "number"}),
    })  # fmt: skip


def job_view() -> Schema:
    info = obj({
        "startTime": nullable(string(format="date-time")),
        "endTime": nullable(string(format="date-time")),
        "exitCode": nullable(integer()), "errors": array(any_object()),
    })  # fmt: skip
    return obj({
        **{k: {} for k in job_properties()["properties"]},
        **_common_properties(),
        "cluster": obj({"id": string()}, ("id",)),
        "state": string(),
        "executionState": enum(*EXECUTION_STATES),
        "executionInfo": info,
        "pendingReason": nullable(any_object()),
        "pendingReasonSince": nullable(string(format="date-time")),
        "scheduledTime": nullable(string(format="date-time")),
        "priority": integer(),
        "nodeCount": integer(1),
        "gpusPerNode": nullable(integer(0)),
        "attempt": integer(0),
        "retries": {"type": "object", "additionalProperties": integer(0)},
        "tasks": array(obj({"node": string(), "gpus": array(integer(0))})),
        "owner": nullable(string()),
        "jobOutputDirectoryPathSegment": string(),
        "toolType": enum(*TOOL_TYPES.values(), "custom"),
    })  # fmt: skip


def event_schema() -> Schema:
    return obj({
        "position": integer(1), "eventId": string(), "stream": string(), "version": integer(),
        "type": string(), "schema": integer(), "recordedAt": string(), "actor": nullable(string()),
        "correlationId": nullable(string()), "causationId": nullable(string()), "data": {},
        "hash": string(),
    }, ("position", "type", "stream", "data"))  # fmt: skip


def sse_event() -> Schema:
    """One Server-Sent Event: `id:` the position, `event:` the type, `data:` the JSON form."""
    data = string(contentMediaType="application/json", contentSchema=ref("Event"))
    return obj({"id": string(pattern=r"^[0-9]+$"), "event": text(), "data": data},
               ("id", "event", "data"))  # fmt: skip


def history_schema() -> Schema:
    entry = obj({
        "position": integer(1), "time": string(format="date-time"), "event": string(),
        "state": nullable(string()), "actor": nullable(string()), "attempt": nullable(integer()),
        "nodes": nullable(array(string())), "reason": nullable(string()), "ignored": boolean(),
    }, ("position", "event"))  # fmt: skip
    incarnation = obj({"id": string(), "timeline": array(entry)}, ("id", "timeline"))
    return obj({"value": array(incarnation), "nextLink": {"type": "null"}}, ("value",))


def file_schema() -> Schema:
    return obj({
        "name": text(), "isDirectory": boolean(), "contentLength": integer(0),
        "lastModified": string(format="date-time"), "downloadUrl": string(),
    }, ("name", "isDirectory"))  # fmt: skip


def token_request() -> Schema:
    return obj(
        {
            "name": name(),
            "role": enum(*ROLES),
            "workspaces": array(name(), min_items=1),
            "node": string(pattern=f"^{NODE_ID.pattern}$"),  # role agent only: that node
        },
        ("name", "role"),
        closed=True,
    )


def token_view() -> Schema:
    """A token as listed: never its secret."""
    return obj({
        "id": text(), "name": string(), "role": enum(*ROLES), "workspaces": array(string()),
        "creationTime": nullable(string(format="date-time")), "createdBy": nullable(string()),
        "node": string(),
    }, ("id", "name", "role", "workspaces"))  # fmt: skip


def new_token() -> Schema:
    """A created token: the secret, shown this once, and the position of its event."""
    return {"allOf": [ref("Token"), obj({"token": text()}, ("token",)), ref("Written")]}


def replay_schema() -> Schema:
    return obj({
        "position": integer(0), "recordedAt": nullable(string()),
        "workspaces": array(string()), "experiments": array(string()),
        "clusters": array(any_object()), "nodes": array(any_object()),
        "queues": any_object(), "jobs": array(any_object()), "note": nullable(string()),
    }, ("position", "clusters", "jobs"))  # fmt: skip


def components() -> Schema:
    job, cluster = job_properties(), cluster_properties()
    return {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {n: json_response(s, ref("Error")) for s, n in ERROR_NAMES.items()},
        "schemas": {
            "Error": error_schema(),
            "WorkspaceDocument": plain_document(),
            "ExperimentDocument": plain_document(),
            "ClusterDocument": _envelope(cluster, "ClusterProperties", CLUSTER_EXAMPLE),
            "ClusterProperties": cluster,
            "ScaleSettingsPatch": obj({"scaleSettings": ref("ScaleSettings")},
                                      ("scaleSettings",), closed=True),
            "ScaleSettings": scale_settings(),
            "MountVolumes": mount_volumes(),
            "ResourceReference": resource_reference(),
            "SecretReference": secret_reference(),
            "JobDocument": _envelope(job, "JobProperties", JOB_EXAMPLE),
            "JobProperties": job,
            "TokenRequest": token_request(),
            "ExecRequest": obj({"command": string(minLength=1), "node": integer(0)},
                               ("command",), closed=True),
            "Workspace": resource(workspace_view()),
            "Experiment": resource(workspace_view()),
            "Cluster": resource(cluster_view()),
            "Job": resource(job_view()),
            "Token": token_view(),
            "WrittenWorkspace": written("Workspace"),
            "WrittenExperiment": written("Experiment"),
            "WrittenCluster": written("Cluster"),
            "WrittenJob": written("Job"),
            "Written": obj({"position": integer(0)}, ("position",)),
            "NewToken": new_token(),
            "WorkspaceList": page(ref("Workspace")),
            "ExperimentList": page(ref("Experiment")),
            "ClusterList": page(ref("Cluster")),
            "JobList": page(ref("Job")),
            "TokenList": page(ref("Token")),
            "Node": resource(node_view()),
            "NodeList": page(ref("Node")),
            "EventList": page(ref("Event")),
            "FileList": page(file_schema()),
            "Event": event_schema(),
            "History": history_schema(),
            "Replay": replay_schema(),
            "Health": obj({"status": string()}, ("status",)),
            "Ready": obj({"status": string(enum=["ready", "starting", "fenced"]),
                          "position": integer(0), "epoch": nullable(integer()),
                          "logEpoch": integer(),
                          "readModelsPosition": integer(0)}, ("status",)),
        },
    }  # fmt: skip


# -- parameters and responses -----------------------------------------------------------------
def path_param(param: str, description: str) -> Schema:
    return {"name": param, "in": "path", "required": True, "description": description,
            "schema": name()}  # fmt: skip


def query(param: str, schema: Schema, description: str) -> Schema:
    return {"name": param, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


def header(param: str, schema: Schema, description: str) -> Schema:
    return {"name": param, "in": "header", "required": False, "description": description,
            "schema": schema}  # fmt: skip


WORKSPACE = path_param("workspace", "the workspace's name")
EXPERIMENT = path_param("experiment", "the experiment's name")
CLUSTER = path_param("cluster", "the cluster's name")
JOB = path_param("job", "the job's name")
AFTER = query("after", position(), "answer once the read models have reached this position")
TOP = query("top", integer(1, MAX_TOP), "page size (100 by default)")
SKIPTOKEN = query("skiptoken", string(), "where the page starts, from nextLink")
STATE = query("state", enum(*STATES), "only jobs in this state")
CLUSTER_FILTER = query("cluster", name(), "only jobs on this cluster (a name)")
ATTEMPT = query("attempt", integer(1), "which attempt's files (the latest by default)")
OUTPUT_DIRECTORY = query("outputdirectoryid", string(), "`stdouterr` or an output directory id")
POSITION_HEADER = {
    "description": "the position of the write's last event",
    "schema": integer(0),
}

ERROR_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    413: "PayloadTooLarge",
    416: "RangeNotSatisfiable",
    503: "Unavailable",
}
_MESSAGES = {
    200: "OK",
    201: "created",
    202: "accepted",
    206: "part of the file (Range)",
    400: "bad request: the error names each field and its problem",
    401: "missing or unknown token",
    403: "the token's role or workspaces do not allow this",
    404: "not found",
    409: "conflicts with what exists",
    413: "request body over 1 MiB",
    416: "Range not satisfiable",
    503: "the read models did not reach `after` in time, or the daemon is not ready",
}


def json_response(status: int, schema: Schema, *, written: bool = False) -> Schema:
    out: Schema = {"description": _MESSAGES[status], "content": {"application/json": {
        "schema": schema}}}  # fmt: skip
    if written:
        out["headers"] = {"Batchd-Position": POSITION_HEADER}
    return out


def errors(*statuses: int) -> dict[str, Schema]:
    return {str(s): {"$ref": f"#/components/responses/{ERROR_NAMES[s]}"} for s in statuses}


def _read_errors() -> tuple[int, ...]:
    return (400, 401, 403, 404, 503)


def operation(
    op_id: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    params: tuple[Schema, ...] = (),
    body: str | None = None,
    public: bool = False,
) -> Schema:
    out: Schema = {"operationId": op_id, "summary": summary}
    if params:
        out["parameters"] = list(params)
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": ref(body)}}}  # fmt: skip
    out["responses"] = dict(sorted(responses.items()))
    if public:
        out["security"] = []
    return out


def read(op_id: str, summary: str, schema: str, params: tuple[Schema, ...] = ()) -> Schema:
    responses = {"200": json_response(200, ref(schema)), **errors(*_read_errors())}
    return operation(op_id, summary, responses, params=(*params, AFTER))


def listing(op_id: str, summary: str, schema: str, params: tuple[Schema, ...] = ()) -> Schema:
    return read(op_id, summary, schema, (*params, TOP, SKIPTOKEN))


def put(op_id: str, summary: str, body: str, written: str) -> Schema:
    responses = {
        "200": json_response(200, ref(written), written=True),
        "201": json_response(201, ref(written), written=True),
        **errors(400, 401, 403, 404, 409, 413),
    }
    return operation(op_id, summary, responses, body=body)


def write(op_id: str, summary: str, status: int, schema: str, body: str | None = None) -> Schema:
    responses = {
        str(status): json_response(status, ref(schema), written=True),
        **errors(400, 401, 403, 404, 409, *((413,) if body else ())),
    }
    return operation(op_id, summary, responses, body=body)


# -- paths ------------------------------------------------------------------------------------
def _with_params(item: Schema, *params: Schema) -> Schema:
    return {"parameters": list(params), **item}


def workspace_paths() -> dict[str, Schema]:
    return {
        "/v1/workspaces": {"get": listing("listWorkspaces", "list workspaces", "WorkspaceList")},
        _WS: _with_params({
            "put": put("createWorkspace", "create a workspace", "WorkspaceDocument",
                       "WrittenWorkspace"),
            "get": read("getWorkspace", "a workspace", "Workspace"),
            "delete": write("deleteWorkspace", "delete an empty workspace", 202, "Written"),
        }, WORKSPACE),
        _WS + "/experiments": _with_params({
            "get": listing("listExperiments", "list a workspace's experiments",
                           "ExperimentList"),
        }, WORKSPACE),
        _EXP: _with_params({
            "put": put("createExperiment", "create an experiment", "ExperimentDocument",
                       "WrittenExperiment"),
            "get": read("getExperiment", "an experiment", "Experiment"),
            "delete": write("deleteExperiment", "delete an experiment, terminating its jobs",
                            202, "Written"),
        }, WORKSPACE, EXPERIMENT),
    }  # fmt: skip


def cluster_paths() -> dict[str, Schema]:
    return {
        _WS + "/clusters": _with_params({
            "get": listing("listClusters", "list a workspace's clusters", "ClusterList"),
        }, WORKSPACE),
        _WS + "/clusters/{cluster}": _with_params({
            "put": put("createCluster", "create a cluster from a Batch AI cluster document",
                       "ClusterDocument", "WrittenCluster"),
            "get": read("getCluster", "a cluster", "Cluster"),
            "patch": write("resizeCluster", "change a cluster's scaleSettings", 200,
                           "WrittenCluster", body="ScaleSettingsPatch"),
            "delete": write("deleteCluster", "delete a cluster", 202, "Written"),
        }, WORKSPACE, CLUSTER),
    }  # fmt: skip


def _file_operations() -> dict[str, Schema]:
    directory = query("directory", string(), "a directory under the output directory")
    follow = query("follow", boolean(), "stream until the job ends")
    range_header = header("Range", string(pattern=r"^bytes=\d*-\d*$"), "`bytes=a-b`")
    octets = {"application/octet-stream": {"schema": string(format="binary")}}
    content = {
        "200": {"description": "the file's bytes", "content": octets},
        "206": {"description": _MESSAGES[206], "content": octets},
        **errors(400, 401, 403, 404, 416, 503),
    }
    return {
        _JOB + "/files": _with_params({
            "get": listing("listJobFiles", "list a job's output files", "FileList",
                           (OUTPUT_DIRECTORY, directory, ATTEMPT)),
        }, WORKSPACE, EXPERIMENT, JOB),
        _JOB + "/files/{path}": _with_params({
            "get": operation("getJobFile", "a job's output file", content,
                             params=(OUTPUT_DIRECTORY, ATTEMPT, follow, range_header, AFTER)),
        }, WORKSPACE, EXPERIMENT, JOB, {
            "name": "path", "in": "path", "required": True, "schema": text(),
            "description": "the file's path under the output directory",
        }),
    }  # fmt: skip


def job_paths() -> dict[str, Schema]:
    terminate = write("terminateJob", "terminate a job", 202, "WrittenJob")
    return {
        _EXP + "/jobs": _with_params({
            "get": listing("listJobs", "list an experiment's jobs", "JobList",
                           (STATE, CLUSTER_FILTER)),
        }, WORKSPACE, EXPERIMENT),
        _JOB: _with_params({
            "put": put("createJob", "submit a Batch AI job document", "JobDocument",
                       "WrittenJob"),
            "get": read("getJob", "a job", "Job"),
            "delete": write("deleteJob", "delete a job (a live one is terminated first, and "
                            "answered with the job, provisioningState deleting)", 202,
                            "Written"),
        }, WORKSPACE, EXPERIMENT, JOB),
        _JOB + "/terminate": _with_params({"post": terminate}, WORKSPACE, EXPERIMENT, JOB),
        _JOB + "/exec": _with_params({"post": operation(
            "execInJob", "run a command beside a running job's task, in its environment", {
                "200": {"description": "NDJSON lines: {stdout}, {stderr}, last {exitCode}",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                **errors(400, 401, 403, 404, 409, 413),
            }, body="ExecRequest")}, WORKSPACE, EXPERIMENT, JOB),
        _JOB + "/history": _with_params({
            "get": read("getJobHistory", "a job's incarnations and their timelines", "History"),
        }, WORKSPACE, EXPERIMENT, JOB),
        **_file_operations(),
        "/v1/jobs": {"get": listing("listAllJobs", "every job the token can see", "JobList", (
            STATE, CLUSTER_FILTER, query("workspace", name(), "only this workspace"),
            query("experiment", name(), "only this experiment"),
        ))},
        "/v1/nodes": {"get": listing("listNodes", "every node the token can see", "NodeList", (
            query("cluster", string(pattern=r"^[-A-Za-z0-9_]{1,64}/[-A-Za-z0-9_]{1,64}$"),
                  "only this cluster's nodes (WORKSPACE/NAME)"),
        ))},
        "/v1/nodes/{id}": {
            "get": read("getNode", "a node: state, GPUs, runtimes, heartbeat age, errors", "Node"),
            "delete": write("removeNode", "remove a lost node that holds no GPU", 202,
                            "Written"),
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "description": "the node's id",
                            "schema": string(pattern=r"^[A-Za-z0-9][-.:A-Za-z0-9_]{0,199}$")}],
        },
    }  # fmt: skip


def admin_paths() -> dict[str, Schema]:
    stream = {
        "200": {"description": "Server-Sent Events: `id:` position, `event:` type, `data:` the "
                               "event's JSON form",
                "content": {"text/event-stream": {"schema": sse_event()}}},
        **errors(400, 401, 403),
    }  # fmt: skip
    last_event = header("Last-Event-ID", string(pattern=r"^[0-9]{1,19}$"), "resume after this")
    replay_params = (
        query("at", string(format="date-time"), "the world as of this time (ISO-8601)"),
        query("position", position(), "the world as of this position"),
    )
    return {
        "/v1/tokens": {
            "post": write("createToken", "create a token (shown once)", 201, "NewToken",
                          body="TokenRequest"),
            "get": listing("listTokens", "list tokens, without secrets", "TokenList"),
        },
        "/v1/tokens/{token}": _with_params({
            "delete": write("revokeToken", "revoke a token", 202, "Written"),
        }, {"name": "token", "in": "path", "required": True, "schema": text(),
            "description": "the token's id"}),
        "/v1/events": {"get": read("listEvents", "events after a position", "EventList", (
            TOP,
            query("from", string(format="date-time"), "none recorded before this (ISO-8601)"),
            query("to", string(format="date-time"), "none recorded after this (ISO-8601)"),
            query("stream", text(), "only this stream's (404 if the log has none of it)"),
            query("through", position(), "none after this position (nextLink sets it: the "
                                         "head the first page found)"),
        ))},
        "/v1/events/stream": {"get": operation(
            "streamEvents", "events as Server-Sent Events", stream,
            params=(query("after", position(), "start after this position"), last_event,
                    query("type", text(), "only events of these types (comma-separated)")),
        )},
        "/v1/replay": {"get": read("replay", "the world as of a time or position", "Replay",
                                   replay_params)},
    }  # fmt: skip


def health_paths() -> dict[str, Schema]:
    ready = {"200": json_response(200, ref("Ready")), "503": json_response(503, ref("Ready"))}
    return {
        "/healthz": {"get": operation("healthz", "liveness", {
            "200": json_response(200, ref("Health"))}, public=True)},
        "/readyz": {"get": operation("readyz", "readiness, with positions", ready,
                                     public=True)},
        "/v1/openapi.json": {"get": operation("openapi", "this document", {
            "200": json_response(200, {"type": "object", "required": ["openapi", "paths"]})},
            public=True)},
    }  # fmt: skip


_PATH_NAME = re.compile(r"\{[^}]*\}")


def route_key(method: str, path: str) -> tuple[str, str]:
    """A route as `query_parameters` knows it: its method, and its path with each name in
    it as `{}` (the document's `{workspace}` is the server's `{ws}`)."""
    return method.upper(), _PATH_NAME.sub("{}", path)


def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """The query parameters of each operation of the document, by `route_key`."""
    out = {}
    for path, item in document()["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                params = (*item.get("parameters", ()), *op.get("parameters", ()))
                names = frozenset(p["name"] for p in params if p["in"] == "query")
                out[route_key(method, path)] = names
    return out


def document() -> dict[str, Any]:
    """The OpenAPI document, built afresh (callers may change their copy)."""
    paths = {
        **health_paths(), **workspace_paths(), **cluster_paths(), **job_paths(),
        **admin_paths(),
    }  # fmt: skip
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "batchd",
            "version": API_VERSION,
            "description": "An event-sourced GPU training scheduler with Azure Batch AI's "
            "documents (2018-05-01). See docs/api.md.",
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": components(),
    }
