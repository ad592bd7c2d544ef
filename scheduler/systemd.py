"""Telling systemd how the daemon is doing (`Type=notify`, deploy/batchd.service).

Under systemd with `Type=notify`, `$NOTIFY_SOCKET` names a datagram socket (a path, or an
abstract name written with a leading `@`). The daemon sends `READY=1` once it serves (or
once it stands by, waiting for another daemon's log), `STATUS=...` lines saying which,
`STOPPING=1` as it begins to stop, and, with `WatchdogSec=` set (`$WATCHDOG_USEC`),
`WATCHDOG=1` from its event loop at half that period: a daemon whose event loop hangs is
restarted. Outside systemd (no `$NOTIFY_SOCKET`) nothing is sent.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

logger = structlog.get_logger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(name: str) -> str | bytes:
    """The socket address of `$NOTIFY_SOCKET` (`@name`: Linux's abstract namespace)."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def notify(*fields: str) -> bool:
    """Send `fields` (`READY=1`, `STATUS=...`) to systemd; False outside systemd or when the
    socket cannot be reached (logged once: systemd's view is then stale, the daemon itself
    runs on)."""
    name = os.environ.get(SOCKET_ENV)
    if not name or not fields:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _address(name))
    except OSError as exc:
        if name not in _unreachable:  # said once: the watchdog would repeat it every few seconds
            _unreachable.add(name)
            logger.warning("systemd.notify_failed", socket=name, error=exc.strerror or str(exc))
        return False
    return True


_unreachable: set[str] = set()  # notify sockets a send failed to


def watchdog_interval() -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of `WatchdogSec=` (None: no watchdog, or one
    meant for another process)."""
    text = os.environ.get(WATCHDOG_ENV)
    owner = os.environ.get(WATCHDOG_PID_ENV)
    if not text or (owner and owner != str(os.getpid())):
        return None
    try:
        usec = int(text)
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def keep_watchdog_fed(interval: float) -> None:
    """Ping the watchdog every `interval` seconds, for ever (cancel to stop): from the event
    loop, so a loop that stops turning stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
