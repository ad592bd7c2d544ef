"""The job state machine (DESIGN.md, "Job lifecycle"), in one place.

`TRANSITIONS` maps each job event to the states it may happen in and the state it leads to.
The scheduler's commands check it before they append (`check`, which names the state and the
command when it refuses); the read models use the same table to ignore what cannot happen
(a late report about an attempt that was already requeued).

    queued -> scheduled -> preparing -> running -> succeeded | failed
    any live state -> terminating -> failed (terminated)
    scheduled | preparing | running -> queued (node lost, evicted, preempted, interrupted, retry)
    succeeded | failed -> deleted
"""

from __future__ import annotations

from batchd.projections.model import (
    ATTEMPT_STATES,
    EXECUTION_STATE,
    FAILED,
    LIVE_STATES,
    PREPARING_JOB,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    TERMINATING,
)

DELETED = "deleted"
PLACED = frozenset({SCHEDULED, PREPARING_JOB, RUNNING})  # an attempt holds GPUs and runs
HOLDING = ATTEMPT_STATES  # an attempt holds GPUs: PLACED and terminating
LIVE = LIVE_STATES
ENDED = frozenset({SUCCEEDED, FAILED})

# event type -> (states it may happen in, state after; None: the state does not change)
TRANSITIONS: dict[str, tuple[frozenset[str], str | None]] = {
    "JobPendingReasonChanged": (frozenset({QUEUED}), None),
    "JobScheduled": (frozenset({QUEUED}), SCHEDULED),
    "JobPreparing": (frozenset({SCHEDULED}), PREPARING_JOB),
    "JobStarted": (frozenset({SCHEDULED, PREPARING_JOB}), RUNNING),
    "JobTaskExited": (HOLDING, None),
    "JobSucceeded": (PLACED, SUCCEEDED),
    "JobFailed": (LIVE, FAILED),  # about an attempt: only while it holds GPUs (HOLDING)
    "JobRequeued": (PLACED, QUEUED),
    "JobPreempted": (PLACED, QUEUED),
    "JobTerminateRequested": (LIVE - {TERMINATING}, TERMINATING),
    "JobTerminated": (LIVE, FAILED),
    "JobDeleted": (ENDED, DELETED),
    "JobDeleteRequested": (LIVE, None),  # deleted while live: deleted once it has ended
}

COMMAND_OF = {  # how people and the API name what an event does
    "JobScheduled": "schedule", "JobPreparing": "prepare", "JobStarted": "start",
    "JobTaskExited": "report a task exit for", "JobSucceeded": "succeed", "JobFailed": "fail",
    "JobRequeued": "requeue", "JobPreempted": "preempt", "JobTerminateRequested": "terminate",
    "JobTerminated": "end the termination of", "JobDeleted": "delete",
    "JobPendingReasonChanged": "set the pending reason of",
    "JobDeleteRequested": "delete",
}  # fmt: skip


# states in which a command is accepted as already done (its event is not appended again)
ACCEPTED_AGAIN = {"JobTerminateRequested": frozenset({TERMINATING})}


class InvalidTransition(ValueError):
    """A command that the job's state does not allow."""

    def __init__(self, state: str, event_type: str) -> None:
        command = COMMAND_OF.get(event_type, event_type)
        allowed = TRANSITIONS[event_type][0] | ACCEPTED_AGAIN.get(event_type, frozenset())
        when = " or ".join(s for s in EXECUTION_STATE if s in allowed)  # in lifecycle order
        super().__init__(f"cannot {command} a job that is {state} (only when {when})")
        self.state = state
        self.event_type = event_type


def allowed(state: str, event_type: str) -> bool:
    return state in TRANSITIONS[event_type][0]


def check(state: str, event_type: str) -> str:
    """The state after `event_type` happens to a job in `state`; InvalidTransition if it may not."""
    states, after = TRANSITIONS[event_type]
    if state not in states:
        raise InvalidTransition(state, event_type)
    return state if after is None else after
