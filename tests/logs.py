"""What batchd logs during a test."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog
import structlog.testing


@contextlib.contextmanager
def info_logs() -> Iterator[list[dict]]:
    """The log lines of the block, info ones too (an in-process CLI call earlier in the run
    may have set a higher level), as structlog's captured dicts."""
    config = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logged:
            yield logged
    finally:
        structlog.configure(**config)
