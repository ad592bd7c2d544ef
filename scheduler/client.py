"""The CLI's side of the HTTP API: where the server is, which token to send, and requests whose
failures become one plain message.

Settings come from flags, then the environment, then the local state directory:
`--server` / `$BATCHD_SERVER` (default http://127.0.0.1:8080); `--token` / `$BATCHD_TOKEN`, else
`<state-dir>/admin.token`, which `batchd serve` writes, for a server at a loopback address only;
`--cacert` / `$BATCHD_CACERT`, else
`<state-dir>/tls/cert.pem` when the server is https and that file exists.

The token is sent in the Authorization header and appears in no message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from batchd.scheduler import config

DEFAULT_SERVER = "http://127.0.0.1:8080"
REQUEST_TIMEOUT = 60.0  # seconds for one ordinary request
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
PUT_RETRIES = (0.5, 1.0, 2.0, 4.0)  # seconds before a PUT answered 503 is sent again


class ClientError(Exception):
    """The server could not be asked, or its answer could not be read: one line for the user."""


class ApiError(ClientError):
    """The server answered with an error document."""

    def __init__(self, status: int, code: str, message: str, details: list[dict],
                 retry: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry = retry  # the server said to send it again (503 with Retry-After)

    def lines(self) -> list[str]:
        """The message, then one `  <path>: <problem>` line per detail (but one that only
        repeats the message)."""
        out = [self.message]
        for detail in self.details:
            name, value = detail.get("name"), detail.get("value")
            line = f"{name}: {value}" if name else str(value)
            if line != self.message:
                out.append(f"  {line}")
        return out


@dataclass(frozen=True, slots=True)
class Settings:
    server: str
    token: str | None
    token_source: str  # where the token came from, for messages (never the token)
    cacert: Path | None


def settings(args: argparse.Namespace) -> Settings:
    server = getattr(args, "server", None) or os.environ.get("BATCHD_SERVER") or DEFAULT_SERVER
    server = server.rstrip("/")
    if not server.startswith(("http://", "https://")):
        raise ClientError(f"server {server!r} must be an http:// or https:// URL")
    if urlsplit(server).path.rstrip("/").endswith("/v1"):  # each request adds /v1 itself
        raise ClientError(f"server {server!r} must be the daemon's address without /v1 "
                          f"(such as {DEFAULT_SERVER})")  # fmt: skip
    state = config.state_dir(getattr(args, "state_dir", None))
    token, source = _token(args, state, server)
    return Settings(server, token, source, _cacert(args, state, server))


def _token(args: argparse.Namespace, state: Path, server: str) -> tuple[str | None, str]:
    """The token given, else the daemon's admin token file, for a server on this machine
    only (the file is this machine's daemon's: another server, or one posing as it, is not
    given it). One given empty (an unset variable in `--token "$T"`) is an error, never a
    fall back to the admin token."""
    given = getattr(args, "token", None)
    for token, source in ((given, "--token"), (os.environ.get("BATCHD_TOKEN"), "$BATCHD_TOKEN")):
        if token is not None:
            if not token.strip():
                raise ClientError(f"{source} is empty: give a token (unset $BATCHD_TOKEN and "
                                  "leave --token out to use the daemon's admin.token)")  # fmt: skip
            return token.strip(), source
    path = state / "admin.token"
    if not _on_this_machine(server):
        return None, ""
    try:
        return path.read_text().strip() or None, str(path)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        raise ClientError(f"cannot read the token file {path}: {exc.strerror}") from None


def _on_this_machine(server: str) -> bool:
    """Is `server` (a URL) reached at a loopback address (config.is_loopback)?"""
    return config.is_loopback(urlsplit(server).hostname or "")


def _cacert(args: argparse.Namespace, state: Path, server: str) -> Path | None:
    given = getattr(args, "cacert", None) or os.environ.get("BATCHD_CACERT")
    if given:
        return Path(given)
    local = state / "tls" / "cert.pem"
    return local if server.startswith("https://") and local.is_file() else None


def ssl_context(cacert: Path | None) -> ssl.SSLContext | bool:
    """How a client checks the server's certificate: against the system's CAs (True), or
    against the certificates of the file `cacert`, each trusted as it is: a CA's, an
    intermediate CA's (with what it issued), or the server's own (a self-signed one, or a
    CA-issued leaf: alone in the file, that certificate only). ClientError if unusable."""
    if cacert is None:
        return True
    try:
        context = ssl.create_default_context(cafile=str(cacert))
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ClientError(f"cannot use CA certificate {cacert}: {why}") from None
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def segment(name: str) -> str:
    """A name as one path segment ("a/b" cannot reach another resource)."""
    return quote(name, safe="")


class Client:
    """One aiohttp session to the server; use as `async with Client(settings) as api:`."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        headers = {"Accept": "application/json", "User-Agent": "batchd-cli"}
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        connector = aiohttp.TCPConnector(ssl=ssl_context(self.cfg.cacert))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        self._session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.cfg.server + path

    async def call(
        self, method: str, path: str, *, body: Any = None, params: dict | None = None
    ) -> tuple[int, Any]:
        """One request; the status and the decoded JSON answer, or ApiError/ClientError.
        A PUT the daemon asks to send again (503 with Retry-After: its log briefly
        unreachable, the daemon starting) is sent again after each of PUT_RETRIES: a PUT is
        idempotent (the same document once more changes nothing, also when the first was
        stored after all)."""
        for pause in PUT_RETRIES:
            try:
                return await self._call(method, path, body=body, params=params)
            except ApiError as exc:
                if not (exc.retry and method == "PUT"):
                    raise
            await asyncio.sleep(pause)
        return await self._call(method, path, body=body, params=params)

    async def _call(
        self, method: str, path: str, *, body: Any = None, params: dict | None = None
    ) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        async with self._open(method, path, body=body, params=params, timeout=timeout) as r:
            text = await r.text()
        if not text:
            return r.status, {}
        try:
            return r.status, json.loads(text)
        except ValueError:
            raise ClientError(f"{method} {path}: the server's answer is not JSON") from None

    async def get(self, path: str, **params: Any) -> Any:
        return (await self.call("GET", path, params=_params(params)))[1]

    async def items(self, path: str, **params: Any) -> AsyncIterator[dict]:
        """Every item of a list, page after page (following `nextLink`)."""
        url: str | None = path
        query: dict | None = _params(params)
        while url:
            _, page = await self.call("GET", url, params=query)
            for item in page.get("value", ()):
                yield item
            url, query = page.get("nextLink"), None

    def stream(
        self, path: str, *, params: dict | None = None, headers: dict | None = None,
        method: str = "GET", body: Any = None,
    ) -> _Request:  # fmt: skip
        """A request whose answer is read as it comes (no overall time limit)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        return self._open(method, path, params=params, headers=headers, timeout=timeout,
                          body=body)  # fmt: skip

    def _open(self, method: str, path: str, **options: Any) -> _Request:
        assert self._session is not None, "use Client as an async context manager"
        return _Request(self, method, path, **options)


class _Request:
    """A request as an async context manager that turns every failure into ClientError."""

    def __init__(self, client: Client, method: str, path: str, *, body: Any = None,
                 params: dict | None = None, headers: dict | None = None,
                 timeout: aiohttp.ClientTimeout) -> None:  # fmt: skip
        self.client = client
        self.method = method
        self.path = path
        self.options = {"params": params, "headers": headers, "timeout": timeout}
        if body is not None:
            self.options["json"] = body
        self._context: Any = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        session = self.client._session
        assert session is not None
        self._context = session.request(self.method, self.client.url(self.path), **self.options)
        try:
            response = await self._context.__aenter__()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self.client_error(exc) from None
        if response.status >= 400:
            try:
                error = await _api_error(response)
            finally:
                await self._context.__aexit__(None, None, None)
            if error.status == 401 and not self.client.cfg.token:
                error.message += (
                    " (no token: give --token or $BATCHD_TOKEN, or run where the daemon's "
                    "<state-dir>/admin.token can be read, with a --server at a loopback "
                    "address: 127.0.0.1, ::1, localhost)"
                )
            raise error
        return response

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        await self._context.__aexit__(kind, exc, tb)
        if isinstance(exc, (aiohttp.ClientError, TimeoutError)):
            raise self.client_error(exc) from None

    def client_error(self, exc: BaseException) -> ClientError:
        return ClientError(describe(exc, self.client.cfg.server))


NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def describe(exc: BaseException, server: str) -> str:
    """A one-line account of a failed request that names the server."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        if getattr(exc.certificate_error, "verify_code", None) in NAME_MISMATCH:
            return (
                f"the TLS certificate of the batchd server at {server} is not for that "
                f"address: {exc.certificate_error.verify_message}; give --server (or "
                f"$BATCHD_SERVER) with a host name or address the certificate holds"
            )
        return (
            f"cannot verify the TLS certificate of the batchd server at {server}: "
            f"{exc.certificate_error}; give its CA with --cacert or $BATCHD_CACERT"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS with the batchd server at {server} failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        known = (
            isinstance(error.errno, int)
            and error.errno > 0
            and not isinstance(error, socket.gaierror)
        )
        why = os.strerror(error.errno) if known else (error.strerror or str(error))
        return f"cannot reach the batchd server at {server}: {(why or 'failed').lower()}"
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return f"the batchd server at {server} did not answer in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"the batchd server at {server} closed the connection"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"invalid server URL {server!r}"
    if isinstance(exc, aiohttp.ClientPayloadError):  # an answer the server broke off
        return (f"the batchd server at {server} broke its answer off, unfinished (its token "
                "was revoked, the node it reads from was lost, or the server stopped)")  # fmt: skip
    return f"request to the batchd server at {server} failed: {exc}"


async def _api_error(response: aiohttp.ClientResponse) -> ApiError:
    text = await response.text(errors="replace")
    retry = response.status == 503 and "Retry-After" in response.headers
    try:
        error = json.loads(text)["error"]
        message = str(error.get("message") or error.get("code") or response.reason)
        details = [d for d in error.get("details") or () if isinstance(d, dict)]
        return ApiError(response.status, str(error.get("code", "")), message, details, retry)
    except (ValueError, KeyError, TypeError, AttributeError):
        message = f"the server answered {response.status} {response.reason or ''}".rstrip()
        return ApiError(response.status, str(response.status), message, [])


def _params(params: dict[str, Any]) -> dict[str, str] | None:
    kept = {k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in params.items() if v is not None}  # fmt: skip
    return kept or None


@dataclass(frozen=True, slots=True)
class ServerEvent:
    id: str | None
    event: str
    data: str


async def server_events(response: aiohttp.ClientResponse) -> AsyncIterator[ServerEvent]:
    """The events of a `text/event-stream` body as they arrive (comments skipped)."""
    event_id: str | None = None
    kind, data = "message", []
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event_id, kind, "\n".join(data))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)
