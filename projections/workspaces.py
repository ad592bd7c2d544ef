"""Workspaces and experiments: which exist, since when, created by whom."""

from __future__ import annotations

from batchd.events.envelope import RecordedEvent
from batchd.projections import jobs
from batchd.projections.model import Experiment, ReadModels, Workspace


def workspace_created(m: ReadModels, e: RecordedEvent) -> None:
    name = e.data["workspace"]
    m.workspaces[name] = Workspace(name, e.recorded_at, e.actor)


def workspace_deleted(m: ReadModels, e: RecordedEvent) -> None:
    name = e.data["workspace"]
    m.workspaces.pop(name, None)
    for key in [k for k, x in m.experiments.items() if x.workspace == name]:
        del m.experiments[key]


def experiment_created(m: ReadModels, e: RecordedEvent) -> None:
    ws, exp = e.data["workspace"], e.data["experiment"]
    m.experiments[f"{ws}/{exp}"] = Experiment(ws, exp, e.recorded_at, e.actor)


def experiment_deleted(m: ReadModels, e: RecordedEvent) -> None:
    m.experiments.pop(f"{e.data['workspace']}/{e.data['experiment']}", None)
    jobs.experiment_deleted(m, e.data["workspace"], e.data["experiment"])


HANDLERS = {
    "WorkspaceCreated": workspace_created,
    "WorkspaceDeleted": workspace_deleted,
    "ExperimentCreated": experiment_created,
    "ExperimentDeleted": experiment_deleted,
}
