"""Logging: structlog everywhere, JSON lines for the daemon, terse console lines for the CLI."""

from __future__ import annotations

import contextlib
import logging
import sys

import structlog


def configure(*, json: bool, level: int = logging.INFO) -> None:
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(renderer)


def _route_standard_logging(renderer: structlog.types.Processor) -> None:
    """What libraries log through `logging` (APScheduler, asyncio, aiohttp) comes out the
    same way: warnings and worse, one line each, with the library's logger name."""
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _one_line_warnings,
            structlog.processors.format_exc_info,
        ],
    ))  # fmt: skip
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


def _one_line_warnings(_logger: object, _name: str, event: dict) -> dict:
    """A library's warning says its exception (and what caused it) in one line, without
    the traceback: a pool retrying a database that is away for a moment is no fault, and
    it warns at every try. Its errors keep their tracebacks."""
    info = event.get("exc_info")
    error = info[1] if isinstance(info, tuple) else None
    if event.get("level") in ("debug", "info", "warning") and error is not None:
        del event["exc_info"]
        said = f"{type(error).__name__}: {error}"
        cause = error.__cause__ or error.__context__
        if cause is not None:
            said += f" (from {type(cause).__name__}: {cause})"
        event["event"] = f"{event['event']}: {said}"
    return event


class _StderrHandler(logging.StreamHandler):
    """A handler to the standard error of the moment (see _stderr_logger)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _LineLogger(structlog.PrintLogger):
    """Prints each line; a line that cannot be written (the disk of a log file is full, the
    pipe to a supervisor is closed) is dropped. Logging never fails the work it reports on:
    an agent whose log file shares a full disk with its jobs still reports their ends."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: the file is closed
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A logger to the standard error of the moment (not the one at configuration: a test
    harness or a daemon's supervisor may replace it)."""
    return _LineLogger(sys.stderr)
