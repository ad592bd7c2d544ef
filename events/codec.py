"""The codec: event data to and from msgpack, with secret sealing and upcasting on read.

`Codec.encode` checks the type against the vocabulary, seals its secret fields and packs the
data; `Codec.decode` unpacks a stored row and runs the upcasters registered for its type and
stored schema, one step at a time, until the data is at the type's current schema. The log is
never rewritten: upcasting happens only on the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from batchd.events import errors, secrets
from batchd.events.envelope import EncodedEvent, NewEvent, RecordedEvent
from batchd.events.types import VOCABULARY, EventType

_unpackb = msgpack.unpackb
_new_tuple = tuple.__new__  # RecordedEvent from a ready tuple, without NamedTuple's __new__

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _default(value: object) -> object:
    if isinstance(value, secrets.Sealed):
        return msgpack.ExtType(secrets.SEALED_EXT, value.payload)
    raise TypeError(f"cannot store a value of type {type(value).__name__} in event data")


def _ext_hook(code: int, payload: bytes) -> object:
    if code == secrets.SEALED_EXT:
        return secrets.Sealed(payload)
    return msgpack.ExtType(code, payload)


def _undecodable(row: Sequence[Any], exc: ValueError) -> errors.StoreCorrupt:
    said = f": {exc}" if str(exc) else ""
    return errors.StoreCorrupt(
        f"event {row[0]} ({row[4]} on {row[2]}): its data cannot be decoded "
        f"({type(exc).__name__}{said}); the log is damaged (`batchd audit verify` checks it)"
    )


class Codec:
    """Encodes NewEvents for storage and decodes stored rows into RecordedEvents."""

    def __init__(
        self,
        keyring: secrets.Keyring | None = None,
        vocabulary: Mapping[str, EventType] = VOCABULARY,
        upcasters: Mapping[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        self.keyring = keyring
        self.vocabulary = dict(vocabulary)
        self.upcasters = dict(upcasters or {})
        self._schemas = {name: spec.schema for name, spec in self.vocabulary.items()}
        self._pack = msgpack.Packer(use_bin_type=True, default=_default).pack

    def register(self, event_type: EventType, upcasters: Mapping[int, Upcaster] = ()) -> None:
        """Add or replace a type, with upcasters keyed by the schema each one upgrades from."""
        self.vocabulary[event_type.name] = event_type
        self._schemas[event_type.name] = event_type.schema
        for from_schema, fn in dict(upcasters).items():
            self.upcasters[(event_type.name, from_schema)] = fn

    def encode(self, event: NewEvent) -> EncodedEvent:
        spec = self.vocabulary.get(event.type)
        if spec is None:
            raise errors.UnknownEventType(f"unknown event type {event.type!r}")
        if not isinstance(event.data, dict):
            raise TypeError(f"{event.type} data must be a dict, not {type(event.data).__name__}")
        data = event.data
        if spec.secret_paths:
            data = secrets.seal_paths(data, spec.secret_paths, self.keyring)
        return EncodedEvent(
            event.event_id,
            event.type,
            spec.schema,
            event.actor,
            event.correlation_id,
            event.causation_id,
            self._pack(data),
        )

    def decode(self, row: Sequence[Any]) -> RecordedEvent:
        """A stored row (data as bytes) as a RecordedEvent with decoded, upcast data.

        `row` is any indexable row in envelope order (a tuple, an asyncpg Record). This is the
        replay hot path: one unpack, one schema comparison, one tuple.
        """
        try:
            data = _unpackb(row[10], raw=False, ext_hook=_ext_hook)
        except ValueError as exc:  # msgpack's errors: the stored bytes were damaged
            raise _undecodable(row, exc) from None
        type_ = row[4]
        schema = row[5]
        if schema < self._schemas.get(type_, schema):
            data, schema = self._upcast(type_, schema, self._schemas[type_], data)
        return _new_tuple(
            RecordedEvent,
            (row[0], row[1], row[2], row[3], type_, schema, row[6], row[7], row[8], row[9], data,
             row[11]),
        )  # fmt: skip

    def _upcast(self, type_: str, schema: int, target: int, data: Any) -> tuple[Any, int]:
        while schema < target:
            step = self.upcasters.get((type_, schema))
            if step is None:
                raise errors.SchemaVersionError(
                    f"no upcaster for {type_} from schema {schema} to {schema + 1}"
                )
            data = step(data)
            schema += 1
        return data, schema
