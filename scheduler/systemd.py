"""Telling systemd how the daemon is doing (`Type=notify`, deploy/batchd.service).

Under systemd with `Type=notify`, `$NOTIFY_SOCKET` names a datagram socket (a path, or an
abstract name written with a leading `@`). The daemon sends `READY=1` once it serves (or
once it stands by, waiting for another daemon's log), `STATUS=...` lines saying which,
`STOPPING=1` as it begins to stop, and, with `WatchdogSec=` set (`$WATCHDOG_USEC`),
`WATCHDOG=1` from its event loop at half that period: a daemon whose event loop hangs is
restarted. Outside systemd (no `$NOTIFY_SOCKET`) nothing is sent. The variables are taken
out of the environment when read, so the processes the daemon starts (local agents) do
not speak for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

import structlog

logger = structlog.get_logger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
LEAST_PING = 0.05  # seconds: the shortest time between watchdog pings


@dataclass(slots=True)
class Notifier:
    """Where to tell systemd (None: nowhere) and how often to ping its watchdog (None:
    never)."""

    socket: str | None = None
    watchdog: float | None = None
    failed: bool = False  # a send failed (said once: the pings would repeat it)

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier of this process's systemd variables, which it takes out of the
        environment."""
        name = os.environ.pop(SOCKET_ENV, None) or None
        usec = os.environ.pop(WATCHDOG_ENV, None)
        owner = os.environ.pop(WATCHDOG_PID_ENV, None)
        return cls(name, _watchdog(usec, owner) if name else None)

    def notify(self, *fields: str) -> bool:
        """Send `fields` (`READY=1`, `STATUS=...`); False outside systemd or when the socket
        cannot be reached (logged once: systemd's view is then stale, the daemon runs on)."""
        if self.socket is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), _address(self.socket))
        except (OSError, ValueError) as exc:
            if not self.failed:
                self.failed = True
                logger.warning("systemd.notify_failed", socket=self.socket, error=str(exc))
            return False
        return True

    async def feed_watchdog(self) -> None:
        """Ping the watchdog (there is one: `watchdog` is set) for ever (cancel to stop), from
        the event loop: a loop that stops turning stops the pings."""
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)


def _watchdog(usec: str | None, owner: str | None) -> float | None:
    """Seconds between pings: half of `WatchdogSec=` (None: no watchdog, or one meant for
    another process)."""
    if not usec or (owner and owner != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return max(value / 2_000_000, LEAST_PING) if value > 0 else None


def _address(name: str) -> str | bytes:
    """The socket address of `$NOTIFY_SOCKET` (`@name`: Linux's abstract namespace)."""
    return b"\0" + os.fsencode(name[1:]) if name.startswith("@") else name
