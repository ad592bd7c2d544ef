"""A job's audit timeline, from the events of its stream: each transition with its time,
actor, node, attempt and reason. Pure: the caller reads the stream (deleted jobs keep theirs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from batchd.events.envelope import RecordedEvent
from batchd.events.timeutil import to_iso
from batchd.projections import fold
from batchd.projections.model import ReadModels

# Events that record something without moving the job to another state.
_NOT_TRANSITIONS = frozenset({"JobSubmitted", "JobPendingReasonChanged", "JobTaskExited"})


def timeline(events: Iterable[RecordedEvent]) -> list[dict[str, Any]]:
    """One entry per event of a job's stream. `state` is the job's state after the event, as
    the read models have it (the same handlers fold the stream); an event the read models
    ignore (about an older attempt, or too late) says so in `ignored`."""
    models = ReadModels()
    entries = []
    nodes: list[str] = []  # the current attempt's nodes
    for e in events:
        d = e.data if isinstance(e.data, dict) else {}
        before = _state(models, d)
        fold.apply(models, e)
        after = _state(models, d) or ("deleted" if e.type == "JobDeleted" else None)
        if e.type == "JobScheduled" and after == "scheduled":
            nodes = [t["node"] for t in d.get("tasks", ())]
        entries.append({
            "position": e.position, "time": to_iso(e.recorded_at), "event": e.type,
            "state": after, "actor": e.actor, "attempt": d.get("attempt"),
            "nodes": _nodes(e, d, nodes), "reason": _reason(e.type, d),
            "ignored": e.type not in _NOT_TRANSITIONS and before == after,
        })  # fmt: skip
    return entries


def _state(models: ReadModels, d: dict[str, Any]) -> str | None:
    job = models.jobs.get(d.get("jobId"))
    return None if job is None else job.state


def _nodes(e: RecordedEvent, d: dict[str, Any], scheduled: list[str]) -> list[str]:
    if e.type == "JobScheduled":
        return scheduled
    if e.actor.startswith("agent:"):
        return [e.actor.removeprefix("agent:")]
    if "attempt" in d and e.type != "JobSubmitted":
        return scheduled
    return []


def _reason(type_: str, d: dict[str, Any]) -> str | None:
    if type_ == "JobPendingReasonChanged":
        return pending_reason(d.get("reason"))
    if type_ in ("JobRequeued", "JobPreempted"):
        return d.get("cause", "preempted")
    if type_ == "JobFailed":
        error = d.get("error") or {}
        return error.get("message") or f"exit code {d.get('exitCode')}"
    if type_ in ("JobSucceeded", "JobTaskExited"):
        return f"exit code {d.get('exitCode')}"
    if type_ in ("JobTerminateRequested", "JobTerminated", "JobDeleted"):
        return d.get("reason")
    return None


def pending_reason(reason: dict[str, Any] | None) -> str | None:
    """`{"code": "gang_incomplete", "need_nodes": 4}` -> `gang_incomplete{need_nodes=4}`: a
    pending reason as people read it."""
    if not reason:
        return None
    params = ", ".join(f"{k}={v}" for k, v in reason.items() if k != "code")
    return f"{reason.get('code')}{{{params}}}" if params else str(reason.get("code"))
