"""The one JSON form of an event, used by `events tail --json`, `events export`, `/v1/events`
and the SSE stream: envelope fields in camelCase, `data` as JSON with secrets as "***", the
hash in hex, `recordedAt` as ISO-8601 UTC with microseconds.
"""

from __future__ import annotations

from typing import Any

from batchd.events.envelope import RecordedEvent
from batchd.events.secrets import redact
from batchd.events.timeutil import to_iso


def to_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "eventId": str(event.event_id),
        "stream": event.stream,
        "version": event.version,
        "type": event.type,
        "schema": event.schema,
        "recordedAt": to_iso(event.recorded_at),
        "actor": event.actor,
        "correlationId": _opt(event.correlation_id),
        "causationId": _opt(event.causation_id),
        "data": redact(event.data),
        "hash": event.hash.hex(),
    }


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
