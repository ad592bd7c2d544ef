"""`audit.verify` and the head's `recorded_at` on a memory log (the durable stores are tested
in tests/integration/test_crash_and_tamper.py)."""

from __future__ import annotations

import uuid

import pytest

from batchd.events import audit, errors, urls
from batchd.events.envelope import NewEvent


async def test_a_memory_log_whose_last_batch_stored_nothing_still_verifies():
    # A retried append and a conflicting one store no row: the head stays (as in the durable
    # logs), so its time is still the last event's.
    store = await urls.open_store(f"memory://{uuid.uuid4().hex}")
    try:
        event = NewEvent("JobStarted", {})
        await store.append("job-1", [event], 0)
        await store.append("job-1", [event], 0)  # the same event again: a retry
        with pytest.raises(errors.ConcurrencyError):
            await store.append("job-1", [NewEvent("JobStarted", {})], 0)
        result = await audit.verify(store)
        assert result.ok, result.problem
        assert result.count == 1
    finally:
        await store.close()
