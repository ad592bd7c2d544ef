"""A job's audit timeline, from the events of its stream: each transition with its time,
actor, node, attempt and reason. `timeline` is pure (the caller reads the stream: deleted jobs
keep theirs); `job_timelines` reads the streams of each incarnation of a job name.

A job removed with its experiment (ExperimentDeleted) has no JobDeleted of its own: the
experiment's deletion is shown in its timeline instead, where it happened.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from batchd.events.envelope import RecordedEvent
from batchd.events.store import EventStore
from batchd.events.timeutil import to_iso
from batchd.projections import fold
from batchd.projections.model import LIVE_STATES, Job, ReadModels

# Events that record something without moving the job to another state.
_NOT_TRANSITIONS = frozenset({"JobSubmitted", "JobPendingReasonChanged", "JobTaskExited",
                              "JobDeleteRequested"})  # fmt: skip


async def job_timelines(
    store: EventStore, job_ids: Sequence[str], workspace: str, experiment: str
) -> list[dict[str, Any]]:
    """`{"id", "timeline"}` for each incarnation of a job name, oldest first."""
    deletions = [e for e in await store.read_stream(f"experiment-{workspace}/{experiment}")
                 if e.type == "ExperimentDeleted"]  # fmt: skip
    out = []
    for job_id in job_ids:
        events = await store.read_stream(f"job-{job_id}")
        first = events[0].position if events else 0
        removal = next((d for d in deletions if d.position > first), None)
        out.append({"id": job_id, "timeline": timeline(events, removal)})
    return out


def timeline(
    events: Iterable[RecordedEvent], removal: RecordedEvent | None = None
) -> list[dict[str, Any]]:
    """One entry per event of a job's stream. `state` is the job's state after the event, as
    the read models have it (the same handlers fold the stream); an event the read models
    ignore (about an older attempt, or too late) says so in `ignored`. `removal`: the
    ExperimentDeleted that removed the job, shown where it happened."""
    models = ReadModels()
    entries = []
    nodes: dict[Any, list[str]] = {}  # each attempt's nodes, by task index
    state = None
    for e in events:
        if removal is not None and removal.position < e.position:
            if state != "deleted":  # (a job deleted on its own before shows no removal)
                entries.append(_removed(removal, state))
            removal = None
        d = e.data if isinstance(e.data, dict) else {}
        before = _state(_job(models, d))
        fold.apply(models, e)
        job = _job(models, d)
        after = _state(job) or ("deleted" if e.type == "JobDeleted" else None)
        state = after
        if e.type == "JobScheduled" and after == "scheduled":
            nodes[d.get("attempt")] = [t["node"] for t in d.get("tasks", ())]
        if e.type in _NOT_TRANSITIONS:  # a report about an attempt that has moved on
            ignored = "attempt" in d and (job is None or d["attempt"] != job.attempt)
        else:
            ignored = before == after
        entries.append({
            "position": e.position, "time": to_iso(e.recorded_at), "event": e.type,
            "state": after, "actor": e.actor, "attempt": d.get("attempt"),
            "nodes": _nodes(e, d, nodes), "reason": _reason(e.type, d), "ignored": ignored,
        })  # fmt: skip
    if removal is not None and state != "deleted":
        entries.append(_removed(removal, state))
    return entries


def _removed(e: RecordedEvent, state: str | None) -> dict[str, Any]:
    """The entry of the experiment deletion that removed the job (a live job ends first)."""
    experiment = (e.data or {}).get("experiment")
    return {
        "position": e.position, "time": to_iso(e.recorded_at), "event": e.type,
        "state": state if state in LIVE_STATES else "deleted", "actor": e.actor,
        "attempt": None, "nodes": [], "reason": f"experiment {experiment} deleted",
        "ignored": False,
    }  # fmt: skip


def _job(models: ReadModels, d: dict[str, Any]) -> Job | None:
    return models.jobs.get(d.get("jobId"))


def _state(job: Job | None) -> str | None:
    return None if job is None else job.state


def _nodes(e: RecordedEvent, d: dict[str, Any], nodes: dict[Any, list[str]]) -> list[str]:
    """The nodes an event is about: those of its attempt (all of them, whichever agent
    reported it: the actor names that one), or for a task's exit that task's node."""
    if e.type == "JobTaskExited":
        if isinstance(d.get("node"), str):  # the event names the node of its task
            return [d["node"]]
        placed = nodes.get(d.get("attempt"), [])
        task = d.get("task")
        return [placed[task]] if isinstance(task, int) and 0 <= task < len(placed) else placed
    if "attempt" not in d or e.type == "JobSubmitted":
        return []
    placed = nodes.get(d["attempt"])
    if placed is None and e.actor.startswith("agent:"):  # the attempt's placement unknown
        return [e.actor.removeprefix("agent:")]
    return placed or []


def _reason(type_: str, d: dict[str, Any]) -> str | None:
    if type_ == "JobPendingReasonChanged":
        return pending_reason(d.get("reason"))
    if type_ in ("JobRequeued", "JobPreempted"):  # the cause, and what happened
        error = d.get("error") if isinstance(d.get("error"), dict) else {}
        cause = d.get("cause", "preempted")
        return f"{cause}: {error['message']}" if error.get("message") else cause
    if type_ == "JobFailed":
        error = d.get("error") or {}
        return error.get("message") or f"exit code {d.get('exitCode')}"
    if type_ in ("JobSucceeded", "JobTaskExited"):
        code = d.get("exitCode")
        return f"exit code {code}" if code is not None else "no exit code: not seen to run"
    if type_ in ("JobTerminateRequested", "JobTerminated", "JobDeleted", "JobDeleteRequested"):
        return d.get("reason")
    return None


def pending_reason(reason: dict[str, Any] | None) -> str | None:
    """`{"code": "gang_incomplete", "need_nodes": 4}` -> `gang_incomplete{need_nodes=4}`: a
    pending reason as people read it."""
    if not reason:
        return None
    shown = dict(reason)
    if "victimNames" in shown:  # (preempting: the names people know, not the ids)
        shown["victims"] = shown.pop("victimNames")
    params = ", ".join(f"{k}={v}" for k, v in shown.items() if k != "code")
    return f"{reason.get('code')}{{{params}}}" if params else str(reason.get("code"))
