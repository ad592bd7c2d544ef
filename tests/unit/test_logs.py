"""What batchd's log lines look like when a library logs through `logging`."""

from __future__ import annotations

import io
import json
import logging
import sys

import structlog

from batchd.scheduler import logs


def test_a_librarys_warning_is_one_line_with_its_error_not_a_traceback(monkeypatch):
    """(asyncpg's pool warns, with a traceback, at every try to reach a database that is
    away.) Its errors still come with their tracebacks."""
    config, handlers = structlog.get_config(), logging.getLogger().handlers
    written = io.StringIO()
    try:
        logs.configure(json=True)
        monkeypatch.setattr(sys, "stderr", written)
        pool = logging.getLogger("asyncpg.pool")
        try:
            try:
                raise OSError(-2, "Name or service not known")
            except OSError as dns:
                raise ConnectionRefusedError(111, "Connect call failed") from dns
        except ConnectionRefusedError:
            pool.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
            pool.error("a fault", exc_info=True)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers = handlers
    warning, error = [json.loads(line) for line in written.getvalue().splitlines()]
    assert warning["level"] == "warning" and "exception" not in warning
    said = ("ConnectionRefusedError: [Errno 111] Connect call failed (from OSError: [Errno -2] "
            "Name or service not known)")  # fmt: skip
    assert warning["event"] == f"Failed to restore the pool connection floor; retrying: {said}"
    assert error["level"] == "error" and "Traceback" in error["exception"]
