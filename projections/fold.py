"""Folding the log into the read models: one dispatch table over every projection.

Each projection module (workspaces, clusters, nodes, jobs, tokens) maps event types to
handlers `handler(models, event) -> None`: deterministic, no I/O, no clock, no logging.
`apply` looks the event's type up once and runs that type's handlers; types no projection
reads only move the position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from batchd.events.envelope import RecordedEvent
from batchd.projections import clusters, jobs, nodes, tokens, workspaces
from batchd.projections.model import ReadModels

Handler = Callable[[ReadModels, RecordedEvent], None]

# The modules whose code decides the read models: their source is in the snapshot code hash.
MODULES = (workspaces, clusters, nodes, jobs, tokens)


def _dispatch() -> dict[str, Handler]:
    table: dict[str, Handler] = {}
    for module in MODULES:
        for type_, handler in module.HANDLERS.items():
            if type_ in table:
                raise RuntimeError(f"two projections handle {type_}")  # one writer per type
            table[type_] = handler
    return table


DISPATCH = _dispatch()


class ProjectionError(ValueError):
    """A stored event whose data the read models cannot use (a bug in what wrote it)."""

    def __init__(self, event: RecordedEvent, exc: Exception) -> None:
        super().__init__(
            f"event {event.position} ({event.type} on {event.stream}) cannot be applied to the "
            f"read models: {type(exc).__name__} {exc}"
        )


_BAD_DATA = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def apply(models: ReadModels, event: RecordedEvent) -> None:
    """Fold one event (the next after `models.position`) into `models`."""
    handler = DISPATCH.get(event.type)
    if handler is not None:
        try:
            handler(models, event)
        except _BAD_DATA as exc:
            raise ProjectionError(event, exc) from None
    models.position = event.position
    models.recorded_at = event.recorded_at


def apply_page(models: ReadModels, events: Iterable[RecordedEvent]) -> None:
    """`apply` for many events: the replay loop, with its lookups hoisted."""
    get = DISPATCH.get
    last = None
    for event in events:
        handler = get(event.type)
        if handler is not None:
            try:
                handler(models, event)
            except _BAD_DATA as exc:
                raise ProjectionError(event, exc) from None
        last = event
    if last is not None:
        models.position = last.position
        models.recorded_at = last.recorded_at


def rebuild(events: Iterable[RecordedEvent]) -> ReadModels:
    """The read models from scratch."""
    models = ReadModels()
    apply_page(models, events)
    return models
