"""The daemon's HTTP server: aiohttp's, except for requests it cannot parse.

aiohttp answers those (a request line or header over 8,190 bytes, an unknown method, a
malformed header or URL) itself, before any middleware runs: in plain text that quotes the
first 100 bytes of what was sent, and with an error-level traceback in the log. A header
quoted there may be `Authorization`, whose token would then be in the log. batchd answers them
as the API answers any bad request (400, `{"error": {"code": "BadRequest", ...}}`), says what
was wrong without quoting it, and logs one line: a warning, or at debug level for what is not
HTTP at all on a connection's first request (TLS sent to an http:// address, a port scan), as
aiohttp does. Like every answer of the API, it carries a request id (`X-Request-Id`, a new
one: the request's own header was not read), which the log line names too.

This swaps aiohttp's RequestHandler for a subclass through its Server's `__call__`, which is
not public API: constraints.txt pins the aiohttp it was written for, and
tests/integration/test_api_security.py checks every answer above.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from aiohttp import http_exceptions, web, web_protocol, web_server

from batchd.scheduler.api import CONTENT_CODINGS, REQUEST_HEADER

logger = structlog.get_logger(__name__)

LIMIT = 8190  # aiohttp's bound on a request line and on a header, in bytes

_SAID = (  # the first that the error is an instance of (aiohttp's parsers raise these)
    (http_exceptions.LineTooLong,
     f"the request line or a header is longer than {LIMIT} bytes (a long query is better "
     "sent as a body)"),
    (http_exceptions.BadHttpMethod,
     "not an HTTP request: its method is not one HTTP knows (TLS sent to an http:// address?)"),
    (http_exceptions.InvalidURLError, "the request's URL is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.PayloadEncodingError,
     "the body cannot be read: it is not in its Content-Encoding, or was cut short"),
    (http_exceptions.BadHttpMessage, "the request's headers or framing are malformed"),
)  # fmt: skip


_UNDECODABLE = f"the request's Content-Encoding is not one of {', '.join(CONTENT_CODINGS)}"


def said(exc: BaseException | None) -> str:
    """What was wrong with a request that could not be parsed, without quoting it."""
    for kind, message in _SAID:
        if isinstance(exc, kind):
            return message
    return "the request is not valid HTTP"


def _no_decoder(exc: BaseException | None) -> bool:
    """A Content-Encoding aiohttp knows but has no decoder for here (br, zstd): refused as
    the parser reads the headers, before the API's own check of the coding can run."""
    said = str(exc).lower()  # (aiohttp's words: "...: brotli (br)", "...: zstandard (zstd)")
    return isinstance(exc, http_exceptions.ContentEncodingError) and (
        "(br)" in said or "(zstd)" in said
    )


def _unreadable_body(exc: BaseException | None) -> bool:
    """A body not in its Content-Encoding, or cut short (the API has answered 400)."""
    return isinstance(exc, web_protocol.RequestPayloadError | http_exceptions.PayloadEncodingError)


class _Handler(web_protocol.RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:  # fmt: skip
        if status != 400:  # a handler's failure or timeout: aiohttp's own answer and log
            return super().handle_error(request, status, exc, message)
        if _no_decoder(exc):
            status, code, what = 415, "UnsupportedMediaType", _UNDECODABLE
        else:
            code, what = "BadRequest", said(exc)  # (not `message`: that quotes the request)
        log = logger.warning
        if self._request_count == 1 and isinstance(exc, http_exceptions.BadHttpMethod):
            log = logger.debug  # not HTTP at all: TLS on the wrong port, a scanner
        answered = request.writer.output_size == 0  # (else a response has begun)
        request_id = str(uuid.uuid4()) if answered else None  # (the one the client is told)
        log("api.unparsable_request", peer=request.remote, error=what, request_id=request_id)
        if not answered:
            raise ConnectionError("the response has begun: no error can be sent")
        body = {"error": {"code": code, "message": what, "details": []}}
        response = web.json_response(body, status=status, headers={REQUEST_HEADER: request_id})
        response.force_close()  # what follows on the connection cannot be trusted
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body that cannot be read fails again as aiohttp reads what the handler left of
        it, after the API has answered 400: that is the client's error, already told, not a
        fault of the server's to log with a traceback."""
        error = kw.get("exc_info")
        if _unreadable_body(error) or _unreadable_body(getattr(error, "__cause__", None)):
            logger.debug("api.unread_body_dropped", error=str(error))
            return
        super().log_exception(*args, **kw)


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparsable requests as above."""

    async def _make_server(self) -> web_server.Server:
        server: Any = await super()._make_server()
        server.__class__ = _Server  # (the application's own server, its handler class aside)
        return server
