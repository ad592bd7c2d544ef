"""The hash chain as an auditor recomputes it from the documented bytes, independently."""

from __future__ import annotations

import hashlib
import struct
import uuid

from batchd.events.envelope import (
    GENESIS_HASH,
    canonical_bytes,
    chain_hash,
    new_event_id,
    uuid7,
    uuid_of_bytes,
)


def _mp(value) -> bytes:
    """A minimal msgpack encoder written from the spec (smallest forms), not batchd's."""
    if value is None:
        return b"\xc0"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        for code, fmt, limit in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16),
                                 (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):  # fmt: skip
            if value < limit:
                return bytes([code]) + struct.pack(fmt, value)
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) < 32:
            return bytes([0xA0 | len(raw)]) + raw
        return b"\xd9" + bytes([len(raw)]) + raw
    if isinstance(value, bytes):
        return b"\xc4" + bytes([len(value)]) + value
    if isinstance(value, list):
        return bytes([0x90 | len(value)]) + b"".join(_mp(v) for v in value)
    raise TypeError(value)


def test_the_chain_matches_the_documented_bytes():
    eid, corr = uuid.uuid4(), uuid.uuid4()
    data = b"\x81\xa5jobId\xa3j-1"
    row = (1, eid, "job-1", 1, "JobSubmitted", 1, 1_795_712_426_079_213, "user:ann", corr, None,
           data)  # fmt: skip
    fields = [1, eid.bytes, "job-1", 1, "JobSubmitted", 1, 1_795_712_426_079_213, "user:ann",
              corr.bytes, None, data]  # fmt: skip
    assert canonical_bytes(row) == _mp(fields)
    first = chain_hash(GENESIS_HASH, row)
    assert first == hashlib.sha256(bytes(32) + _mp(fields)).digest()
    second_row = (2, uuid.uuid4(), "job-1", 2, "JobStarted", 1, 1_795_712_426_079_300, "scheduler",
                  None, None, b"\x80")  # fmt: skip
    assert (
        chain_hash(first, second_row)
        == hashlib.sha256(first + canonical_bytes(second_row)).digest()
    )


def test_every_field_is_covered_by_the_hash():
    row = (7, uuid.uuid4(), "node-a", 3, "NodeLost", 1, 100, "scheduler", None, None, b"\x80")
    base = chain_hash(GENESIS_HASH, row)
    for index, changed in enumerate([8, uuid.uuid4(), "node-b", 4, "NodeRemoved", 2, 101, "x",
                                     uuid.uuid4(), uuid.uuid4(), b"\x81"]):  # fmt: skip
        altered = (*row[:index], changed, *row[index + 1 :])
        assert chain_hash(GENESIS_HASH, altered) != base, f"field {index} is not hashed"
    assert chain_hash(b"\x01" * 32, row) != base


def test_new_event_ids_are_ordinary_time_ordered_version_7_uuids():
    first, second = new_event_id(), new_event_id()
    for made in (first, second):
        assert made.version == 7 and made.variant == uuid.RFC_4122
        same = uuid.UUID(str(made))  # equal, hashed and shown like one the uuid module made
        assert made == same and hash(made) == hash(same) and made.bytes == same.bytes
        assert uuid_of_bytes(made.bytes) == made and {made: 1}[same] == 1
    assert first.int >> 80 <= second.int >> 80  # milliseconds first: they sort by time
    assert uuid7(1, 5) < uuid7(2, 0)
