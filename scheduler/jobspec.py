"""Job documents: Batch AI 2018-05-01 job properties (and 2018-03-01's integer `priority`),
validated and reduced to what the scheduler decides with.

`parse_job(document)` accepts the properties with or without the `{"properties": ...}`
envelope; the envelope's `$schema`, `location`, `tags`, `id`, `name` and `type` are ignored;
any other unknown property is refused by its path. Checks that need the cluster (does it
exist, can it ever hold `nodeCount` nodes, does its VM size have `gpusPerNode` GPUs) belong to
the submit command, which has the read models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from batchd.scheduler.schema import (
    DocumentError,
    Validator,
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
from batchd.scheduler.toolkits import tf_distributed

PRIORITY_OF = {"low": -500, "normal": 0, "high": 500}  # schedulingPriority -> stored integer
MAX_WALL_CLOCK_S = 7 * 24 * 3600  # Batch AI's default and maximum: 7 days
TOOLKITS = (
    "cntkSettings", "pyTorchSettings", "tensorFlowSettings", "caffeSettings", "caffe2Settings",
    "chainerSettings", "horovodSettings", "customMpiSettings", "customToolkitSettings",
)  # fmt: skip

_text = string()
_name = string(max_len=64, pattern=r"[-\w]+", what="1-64 letters, digits, '-' or '_'")
# an image reference, as Docker's and podman's parsers take it: [host[:port]/]path[:tag][@digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
IMAGE_PATTERN = (
    rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?"
)
_image = string(max_len=512, pattern=IMAGE_PATTERN,
                what="an image reference such as 'pytorch/pytorch:2.3.0' or "
                     "'registry.example.com:5000/team/train@sha256:<digest>' (a lower-case "
                     "path, an optional tag and digest)")  # fmt: skip


def _storage_path(value: Any, path: str) -> str:
    """A path prefix or suffix of job output: text without `..`, NUL or backslashes."""
    text = _text(value, path)
    if "\x00" in text or "\\" in text:
        raise DocumentError(path, "must not contain NUL or backslashes")
    if ".." in text.split("/"):
        raise DocumentError(path, "must not contain '..'")
    return text


def _rooted(roots: str) -> Validator:
    """A storage path that is absolute or starts with one of the mount root variables
    `roots` (a regex alternation), as `$NAME` or `${NAME}`; a relative one would land
    wherever a node's agent runs."""
    pattern = re.compile(rf"/|\$({roots}|\{{({roots})\}})(/|$)")
    allowed = " or ".join(f"${name}" for name in roots.split("|"))

    def check(value: Any, path: str) -> str:
        text = _storage_path(value, path)
        if not pattern.match(text):
            raise DocumentError(path, f"must be an absolute path or start with {allowed}")
        return text

    return check


# where a job's output goes (`stdOutErrPathPrefix`, an output directory's `pathPrefix`)
storage_prefix = _rooted("AZ_BATCHAI_MOUNT_ROOT|AZ_BATCHAI_JOB_MOUNT_ROOT")
# where a node's setup task writes its output (no job, so no job mount root)
setup_prefix = _rooted("AZ_BATCHAI_MOUNT_ROOT")
_dir_id = string(max_len=64, pattern=r"[A-Za-z0-9_]+",
                 what="1-64 letters, digits or '_' (it names AZ_BATCHAI_INPUT_<id> "
                      "or AZ_BATCHAI_OUTPUT_<id>)")  # fmt: skip
ENV_NAME = string(max_len=256, pattern=r"[A-Za-z_][A-Za-z0-9_]*", what="a variable name")
ENV_VALUE = string(max_len=32_768, empty=True)  # "" is a value: the variable is set, empty
_count = integer(1, 10_000)


_DURATION = "a duration such as '1.00:00:00' or 'P1D'"


def timespan_seconds(value: Any, path: str) -> int:
    """`maxWallClockTime` in whole seconds: .NET `[d.]hh:mm:ss[.fffffff]` (as Batch AI wrote
    it) or ISO-8601 `P[nD]T[nH][nM][n[.f]S]`; more than zero and at most 7 days. A fraction
    of a second counts as a whole one (a limit is never cut short)."""
    if not isinstance(value, str):
        raise DocumentError(path, f"must be {_DURATION}, not {json.dumps(value)[:64]}")
    text = value.strip(" ")
    if text.startswith("-"):
        raise DocumentError(path, "must not be negative")
    if len(text) > 64:
        raise DocumentError(path, f"must be {_DURATION}, not {len(text)} characters long")
    # (ASCII digits only; hours of a .NET timespan below 24, as .NET reads them)
    dotnet = re.fullmatch(r"(?:(\d+)\.)?([01]?\d|2[0-3]):([0-5]?\d):([0-5]?\d)(\.\d+)?", text,
                          re.ASCII)  # fmt: skip
    iso = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(\.\d+)?S)?)?", text,
                       re.I | re.ASCII)  # fmt: skip
    if dotnet:
        match = dotnet
    elif iso and text.upper() != "P" and not text.upper().endswith("T"):  # (a T says a time)
        match = iso
    else:
        raise DocumentError(path, f"must be {_DURATION}, not {value!r}")
    days, hours, minutes, seconds = (int(x or 0) for x in match.groups()[:4])
    fraction = match.group(5)
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    total += 1 if fraction and fraction.strip(".0") else 0
    if total <= 0:
        raise DocumentError(path, "must be more than zero")
    if total > MAX_WALL_CLOCK_S:
        raise DocumentError(path, "must be at most 7 days")
    return total


def _timespan(value: Any, path: str) -> str:
    timespan_seconds(value, path)
    return value


# Docker's sizes (as `docker run --shm-size` reads them): "2g", "2GB", "2 GiB", "1.5g", "1024"
_SHM = re.compile(r"(\d{1,16}(?:\.\d{1,16})?) ?([kmgtp]?)i?b?", re.IGNORECASE)
MAX_SHM = 1 << 40  # 1 TiB: more than any GPU node's memory


def shm_bytes(text: str | None) -> int | None:
    """Batch AI's `shmSize` ("2g", "512m", "1024") in bytes (None: none, or not a size)."""
    match = _SHM.fullmatch(text.strip()) if text else None
    if match is None:
        return None
    unit = 1024 ** " kmgtp".index((match.group(2) or " ").lower())
    return int(float(match.group(1)) * unit)


def _shm_size(value: Any, path: str) -> str:
    size = shm_bytes(value) if isinstance(value, str) else None
    if size is None:
        raise DocumentError(path, f"must be a size such as '2g' or '512m', not {value!r}")
    if size > MAX_SHM:
        raise DocumentError(path, "must be at most 1024g")
    if size == 0 and float(_SHM.fullmatch(value.strip()).group(1)) > 0:
        raise DocumentError(path, f"{value!r} is less than one byte (0 is the engine's default)")
    return value


_credentials = obj(
    {"accountKey": _text, "accountKeySecretReference": key_vault_reference},
    one_of=["accountKey", "accountKeySecretReference"],
)
_PART = r"(?!\.\.?(?:/|$))[\w.-]+"  # a path's part, not "." or ".."
_mount_path = string(max_len=512, pattern=rf"{_PART}(?:/{_PART})*",
                     what="a relative path, without '.' or '..' parts")  # fmt: skip
MOUNT_VOLUMES = obj({
    "azureFileShares": items(obj({
        "accountName": _text, "azureFileUrl": _text, "credentials": _credentials,
        "relativeMountPath": _mount_path, "fileMode": _text, "directoryMode": _text,
    }, required=["azureFileUrl", "relativeMountPath"])),
    "azureBlobFileSystems": items(obj({
        "accountName": _text, "containerName": _text, "credentials": _credentials,
        "relativeMountPath": _mount_path, "mountOptions": _text,
    }, required=["accountName", "containerName", "relativeMountPath"])),
    "fileServers": items(obj({
        "fileServer": resource_id, "sourceDirectory": _text, "relativeMountPath": _mount_path,
        "mountOptions": _text,
    }, required=["fileServer", "relativeMountPath"])),
    "unmanagedFileSystems": items(obj(
        {"mountCommand": _text, "relativeMountPath": _mount_path},
        required=["mountCommand", "relativeMountPath"],
    )),
})  # fmt: skip

_script = {"pythonScriptFilePath": _text, "pythonInterpreterPath": _text, "commandLineArgs": _text}
_process_count = {"processCount": _count}
_TOOLKIT_FIELDS = {
    "cntkSettings": obj({
        **_script, **_process_count, "languageType": choice("BrainScript", "Python"),
        "configFilePath": _text,
    }, one_of=["configFilePath", "pythonScriptFilePath"], required=["*"]),
    "pyTorchSettings": obj({
        **_script, **_process_count, "communicationBackend": choice("TCP", "Gloo", "MPI"),
    }, required=["pythonScriptFilePath"]),
    "tensorFlowSettings": obj({
        "pythonScriptFilePath": _text, "pythonInterpreterPath": _text,
        "masterCommandLineArgs": _text, "workerCommandLineArgs": _text,
        "parameterServerCommandLineArgs": _text, "workerCount": _count,
        "parameterServerCount": integer(0, 10_000),
    }, required=["pythonScriptFilePath"]),
    "caffeSettings": obj({**_script, **_process_count, "configFilePath": _text},
                         one_of=["configFilePath", "pythonScriptFilePath"], required=["*"]),
    "caffe2Settings": obj(_script, required=["pythonScriptFilePath"]),
    "chainerSettings": obj({**_script, **_process_count}, required=["pythonScriptFilePath"]),
    "horovodSettings": obj({**_script, **_process_count}, required=["pythonScriptFilePath"]),
    "customMpiSettings": obj({"commandLine": _text, **_process_count}, required=["commandLine"]),
    "customToolkitSettings": obj({"commandLine": _text}, required=["commandLine"]),
}  # fmt: skip

_registry_credentials = obj(
    {"username": _text, "password": _text, "passwordSecretReference": key_vault_reference},
    required=["username"],
    one_of=["password", "passwordSecretReference"],
)
JOB_PROPERTIES = obj({
    "cluster": resource_id,
    "nodeCount": _count,
    "schedulingPriority": choice("low", "normal", "high"),
    "priority": integer(-1000, 1000),
    # 2018-03-01's, kept as given and meaning nothing here: a job belongs to the experiment
    # it is created in, and runs where its cluster is
    "experimentName": _text, "location": _text,
    "containerSettings": obj({
        "imageSourceRegistry": obj({
            "image": _image, "serverUrl": _text,
            "credentials": _registry_credentials,
        }, required=["image"]),
        "shmSize": _shm_size,
    }, required=["imageSourceRegistry"]),
    **_TOOLKIT_FIELDS,
    "jobPreparation": obj({"commandLine": _text}, required=["commandLine"]),
    "inputDirectories": items(obj({"id": _dir_id, "path": _text}, required=["id", "path"])),
    "outputDirectories": items(obj({
        "id": _dir_id, "pathPrefix": storage_prefix, "pathSuffix": _storage_path, "type": _text,
        "createNew": boolean,
    }, required=["id", "pathPrefix"])),
    "stdOutErrPathPrefix": storage_prefix,
    "environmentVariables": items(obj({"name": ENV_NAME, "value": ENV_VALUE},
                                      required=["name", "value"])),
    "secrets": items(obj({"name": ENV_NAME, "value": ENV_VALUE,
                          "valueSecretReference": key_vault_reference},
                         required=["name", "*"], one_of=["value", "valueSecretReference"])),
    "mountVolumes": MOUNT_VOLUMES,
    "constraints": obj({"maxWallClockTime": _timespan}),
    # batchd's additions
    "gpusPerNode": integer(0, 64),
    "maxRetries": integer(0, 100),
    "maxNodeFailureRetries": integer(0, 100),
    "preemptible": boolean,
}, required=["nodeCount", "stdOutErrPathPrefix"])  # fmt: skip


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the scheduler decides with, and the validated properties as given."""

    cluster: str | None  # a name or a resource id; None: the caller names it
    node_count: int
    gpus_per_node: int | None  # None: every GPU of the VM size
    priority: int
    max_retries: int
    max_node_failure_retries: int
    preemptible: bool
    max_wall_clock_s: int
    toolkit: str
    properties: dict[str, Any]


def parse_job(document: Any) -> JobSpec:
    """Validate a job document; raise DocumentError naming the first field that is wrong."""
    properties, prefix = unwrap(document)
    props = JOB_PROPERTIES(properties, prefix)
    toolkits = [k for k in TOOLKITS if k in props]
    where = prefix  # "" is reported as "the document"
    if not toolkits:
        raise DocumentError(where, f"needs a command: customToolkitSettings.commandLine or one of "
                                   f"{', '.join(TOOLKITS[:-1])}")  # fmt: skip
    if len(toolkits) > 1:
        first, second = toolkits[0], toolkits[1]
        if "customToolkitSettings" in toolkits:
            first = "customToolkitSettings"
            second = next(k for k in toolkits if k != first)
            rule = f"cannot be given with {second}: a job has either a command line or a toolkit"
        else:
            rule = f"cannot be given with {first}: a job has only one toolkit"
            first = second
        raise DocumentError(f"{prefix}.{first}".lstrip("."), rule)
    if "schedulingPriority" in props and "priority" in props:
        raise DocumentError(where, "give schedulingPriority or priority, not both")
    check_unique_variables(props, prefix)
    _check_reserved_variables(props, prefix)
    _check_cntk_language(props.get("cntkSettings"), f"{prefix}.cntkSettings".lstrip("."))
    priority = props.get("priority", PRIORITY_OF[props.get("schedulingPriority", "normal")])
    return JobSpec(
        cluster=props.get("cluster"),
        node_count=props["nodeCount"],
        gpus_per_node=props.get("gpusPerNode"),
        priority=priority,
        max_retries=props.get("maxRetries", 0),
        max_node_failure_retries=props.get("maxNodeFailureRetries", 3),
        preemptible=props.get("preemptible", False),
        max_wall_clock_s=_wall_clock(props, prefix),
        toolkit=toolkits[0],
        properties=props,
    )


_SETS_VARIABLE = (  # (field, what names the variable an item sets, the variable's prefix)
    ("environmentVariables", "name", ""), ("secrets", "name", ""),
    ("inputDirectories", "id", "AZ_BATCHAI_INPUT_"),
    ("outputDirectories", "id", "AZ_BATCHAI_OUTPUT_"),
)  # fmt: skip


def check_unique_variables(props: dict[str, Any], prefix: str) -> None:
    """Each environment variable is set once: by one environmentVariables or secrets entry,
    or one input or output directory's id (a second would silently replace the first). A
    directory's variable has its id in capitals, as Batch AI named it: ids that differ
    only in case set one variable (and the files API finds output directories by id
    without regard to case); `stdouterr` names the job's stdout and stderr there."""
    first = {"AZ_BATCHAI_OUTPUT_STDOUTERR": "the job's stdout and stderr (stdouterr)"}
    for field, key, variable in _SETS_VARIABLE:
        for index, item in enumerate(props.get(field, ())):
            path = f"{prefix}.{field}[{index}].{key}".lstrip(".")
            name = variable + (item[key].upper() if variable else item[key])
            earlier = first.setdefault(name, path)
            if earlier != path:
                raise DocumentError(path, f"{name} is set already, by {earlier}")


_DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")  # set on multi-node jobs
TASK_VARIABLE = "BATCHD_TASK"  # in every task's environment: <jobId>.<attempt>.<task>


def checked_variables(props: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    """(name, its field's path) of each of environmentVariables and secrets in `props`,
    refusing the AZ_BATCHAI_ names: batchd sets them (for a job's tasks, or a node's setup
    task), so a value of the document's would be silently replaced, and all of them are
    kept for batchd, also those it does not set yet."""
    names = []
    for field in ("environmentVariables", "secrets"):
        for index, item in enumerate(props.get(field, ())):
            name, path = item["name"], f"{prefix}.{field}[{index}].name".lstrip(".")
            if name.startswith("AZ_BATCHAI_"):
                raise DocumentError(path, f"{name} is batchd's to set (the AZ_BATCHAI_ names "
                                          "tell every task of its job and node)")  # fmt: skip
            names.append((name, path))
    return names


def _check_reserved_variables(props: dict[str, Any], prefix: str) -> None:
    """A variable batchd sets for the job's tasks is not the job's to set: its value would be
    silently replaced (and `job show` would still list it)."""
    tensorflow = props.get("tensorFlowSettings")
    for name, path in checked_variables(props, prefix):
        if name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):  # (the latter: which
            # GPUs NVIDIA's container runtime attaches, where the engine's default is it)
            raise DocumentError(path, f"{name} is batchd's to set: the task's GPUs")
        if name == TASK_VARIABLE:
            raise DocumentError(path, f"{name} is batchd's to set: it marks the task's processes")
        if name == "TF_CONFIG" and tensorflow and tf_distributed(tensorflow, props["nodeCount"]):
            raise DocumentError(path, f"{name} is batchd's to set on a distributed TensorFlow "
                                      "job (each process's part of the cluster)")  # fmt: skip
        if name in _DISTRIBUTED and props["nodeCount"] > 1:
            raise DocumentError(path, f"{name} is batchd's to set on a job of more than "
                                      "one node (its master, size and ranks)")  # fmt: skip


def _check_cntk_language(settings: dict[str, Any] | None, where: str) -> None:
    """CNTK's configFilePath is for BrainScript, its pythonScriptFilePath for Python: a job
    that names the other language would run what it did not ask for."""
    language = (settings or {}).get("languageType")
    for field, its in (("configFilePath", "BrainScript"), ("pythonScriptFilePath", "Python")):
        if language is not None and language != its and field in settings:
            raise DocumentError(f"{where}.{field}", f"is for languageType {its}, and the job "
                                                    f"gives languageType {language}")  # fmt: skip


def _wall_clock(props: dict[str, Any], prefix: str) -> int:
    limit = props.get("constraints", {}).get("maxWallClockTime")
    if limit is None:
        return MAX_WALL_CLOCK_S
    return timespan_seconds(limit, f"{prefix}.constraints.maxWallClockTime".lstrip("."))
