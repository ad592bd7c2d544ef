"""The event vocabulary: every transition batchd logs, with its schema and its secret fields.

Names are in the past tense and keep one meaning for ever: a later release may add types and
raise a type's `schema` (with an upcaster for the old one), never change what a name means.
`secret_paths` name the fields whose values are encrypted before they are stored (see
events/secrets.py); a path is dotted keys, with `[]` standing for every item of a list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventType:
    name: str
    schema: int = 1
    secret_paths: tuple[str, ...] = ()


_MOUNT_KEYS = (
    "mountVolumes.azureFileShares[].credentials.accountKey",
    "mountVolumes.azureBlobFileSystems[].credentials.accountKey",
)

JOB_SECRET_PATHS = (
    "spec.secrets[].value",
    "spec.containerSettings.imageSourceRegistry.credentials.password",
    *(f"spec.{p}" for p in _MOUNT_KEYS),
)

CLUSTER_SECRET_PATHS = (
    "spec.userAccountSettings.adminUserPassword",
    "spec.nodeSetup.setupTask.secrets[].value",
    "spec.nodeSetup.performanceCountersSettings.appInsightsReference.instrumentationKey",
    *(f"spec.nodeSetup.{p}" for p in _MOUNT_KEYS),
)

_TYPES = [
    # workspaces and experiments
    EventType("WorkspaceCreated"),
    EventType("WorkspaceDeleted"),
    EventType("ExperimentCreated"),
    EventType("ExperimentDeleted"),
    # clusters
    EventType("ClusterCreated", secret_paths=CLUSTER_SECRET_PATHS),
    EventType("ClusterScaleSettingsChanged"),
    EventType("ClusterResizeStarted"),
    EventType("ClusterResizeCompleted"),
    EventType("ClusterErrorRecorded"),
    EventType("ClusterDeleteRequested"),
    EventType("ClusterDeleted"),
    # nodes
    EventType("NodeProvisioning"),
    EventType("NodeRegistered"),
    EventType("NodeSetupStarted"),
    EventType("NodeSetupSucceeded"),
    EventType("NodeSetupFailed"),
    EventType("NodeSuspected"),
    EventType("NodeLost"),
    EventType("NodeRecovered"),
    EventType("NodePreempted"),
    EventType("NodeDrainRequested"),
    EventType("NodeRemoved"),
    # jobs
    EventType("JobSubmitted", secret_paths=JOB_SECRET_PATHS),
    EventType("JobPendingReasonChanged"),
    EventType("JobScheduled"),
    EventType("JobPreparing"),
    EventType("JobStarted"),
    EventType("JobTaskExited"),
    EventType("JobSucceeded"),
    EventType("JobFailed"),
    EventType("JobRequeued"),
    EventType("JobPreempted"),
    EventType("JobTerminateRequested"),
    EventType("JobTerminated"),
    EventType("JobDeleted"),
    EventType("JobDeleteRequested"),  # deleted while live: it is deleted once it has ended
    # access
    EventType("TokenCreated"),
    EventType("TokenRevoked"),
]

VOCABULARY: dict[str, EventType] = {t.name: t for t in _TYPES}
