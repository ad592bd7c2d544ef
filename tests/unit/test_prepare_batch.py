"""The pure batch decision shared by every backend."""

from __future__ import annotations

import uuid

from batchd.events import errors
from batchd.events.envelope import EMPTY_HEAD, GENESIS_HASH, EncodedEvent, Head, chain_hash
from batchd.events.store import AppendRequest, prepare_batch


def enc() -> EncodedEvent:
    return EncodedEvent(uuid.uuid4(), "JobStarted", 1, "scheduler", None, None, b"\x80")


def req(stream: str, events: list[EncodedEvent], expected: int | None) -> AppendRequest:
    return AppendRequest(stream, events, expected, future=None)  # the decision never touches it


def test_requests_take_consecutive_positions_and_chain_their_hashes():
    a, b = [enc(), enc()], [enc()]
    plan = prepare_batch([req("s-1", a, 0), req("s-2", b, None)], EMPTY_HEAD, {}, {}, now=50)
    assert plan.outcomes == [[1, 2], [3]]
    assert [(r[0], r[2], r[3]) for r in plan.rows] == [(1, "s-1", 1), (2, "s-1", 2), (3, "s-2", 1)]
    previous = GENESIS_HASH
    for row in plan.rows:
        assert row[11] == chain_hash(previous, row)
        previous = row[11]
    assert plan.head == Head(3, previous, 50, 0)


def test_a_version_conflict_fails_alone_and_versions_advance_within_the_batch():
    requests = [
        req("s", [enc()], 4),
        req("s", [enc()], 4),
        req("s", [enc()], 5),
        req("t", [enc()], 0),
    ]
    plan = prepare_batch(requests, Head(10, b"h" * 32, 7, 2), {"s": 4}, {}, now=5)
    assert plan.outcomes[0] == [11]
    assert isinstance(plan.outcomes[1], errors.ConcurrencyError)
    assert plan.outcomes[1].actual == 5
    assert plan.outcomes[2:] == [[12], [13]]
    assert plan.head.recorded_at == 7  # never before the head's time
    assert plan.head.epoch == 2


def test_known_event_ids_answer_with_their_positions_or_fail():
    old = enc()
    existing = {old.event_id: (4, "s")}
    plan = prepare_batch(
        [req("s", [old], 0), req("t", [old], 0), req("s", [old, enc()], None)],
        Head(9, GENESIS_HASH, 0, 1), {"s": 1}, existing, now=1,
    )  # fmt: skip
    assert plan.outcomes[0] == [4]
    assert all(isinstance(o, errors.DuplicateEventError) for o in plan.outcomes[1:])
    assert plan.rows == []
