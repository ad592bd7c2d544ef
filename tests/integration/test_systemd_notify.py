"""Under systemd (`Type=notify`), the daemon says READY=1 once it serves, or once it stands by
for another daemon's log, says what it is doing in STATUS lines, feeds the watchdog from its
event loop, and says STOPPING=1 as it stops. Real `batchd serve` processes, with a datagram
socket standing in for systemd's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_cli import _free_port


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()


def _serve(state: Path, port: int, notify: Path, **env: str) -> subprocess.Popen:
    config = state.parent / "no-local-nodes.toml"
    config.write_text("[local]\nnodes = 0\n")
    return subprocess.Popen(
        [sys.executable, "-m", "batchd.scheduler.cli", "serve", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", "--config", str(config)],
        stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        env={**_without_systemd(), "NOTIFY_SOCKET": str(notify), **env},
    )  # fmt: skip


def _without_systemd() -> dict[str, str]:
    """This environment without the systemd variables of whatever runs the tests."""
    return {k: v for k, v in os.environ.items() if k not in systemd_variables}


systemd_variables = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _messages(sock: socket.socket, until: str, seconds: float = 30) -> list[dict[str, str]]:
    """The messages received until one holds `until` (a field such as READY=1)."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append(dict(line.split("=", 1) for line in data.splitlines()))
        if until in data.splitlines():
            return got
    raise AssertionError(f"no {until} within {seconds} s; got {got}")


def _ready(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
        return answer.status


def test_ready_once_it_serves_status_lines_watchdog_and_stopping(tmp_path, notify_socket):
    sock, path = notify_socket
    port = _free_port()
    daemon = _serve(tmp_path / "state", port, path, WATCHDOG_USEC="400000")
    try:
        messages = _messages(sock, "READY=1")
        assert _ready(port) == 200  # ready when it said so: the log led, the models restored
        ready = messages[-1]
        assert ready["STATUS"] == f"serving on http://127.0.0.1:{port}, leading the log", ready
        for _ in range(3):  # pinged again and again (every 0.2 s: half of WatchdogSec)
            assert _messages(sock, "WATCHDOG=1", 10)[-1] == {"WATCHDOG": "1"}
        daemon.send_signal(signal.SIGTERM)
        stopping = _messages(sock, "STOPPING=1", 15)[-1]
        assert stopping == {"STOPPING": "1", "STATUS": "stopping"}
        assert daemon.wait(15) == 0
    finally:
        daemon.kill()
        daemon.wait()


def test_a_standby_is_ready_as_a_standby_and_says_so_again_when_it_takes_over(
    tmp_path, notify_socket
):
    sock, path = notify_socket
    leader_port, standby_port = _free_port(), _free_port()
    state = tmp_path / "state"
    leader = _serve(state, leader_port, path)
    standby = None
    try:
        _messages(sock, "READY=1")
        standby = _serve(state, standby_port, path)
        ready = _messages(sock, "READY=1")[-1]
        assert ready["STATUS"].startswith("standby: another daemon leads this log"), ready
        with pytest.raises(OSError):  # a standby serves nothing
            _ready(standby_port)
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(15) == 0
        taken = _messages(sock, "READY=1")
        statuses = [m.get("STATUS", "") for m in taken]
        assert any(s.startswith("taking the log over") for s in statuses), taken
        assert statuses[-1] == f"serving on http://127.0.0.1:{standby_port}, leading the log"
        assert _ready(standby_port) == 200
        assert json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{standby_port}/healthz", timeout=2).read()
        ) == {"status": "ok"}
    finally:
        for daemon in (leader, standby):
            if daemon is not None:
                daemon.kill()
                daemon.wait()


def test_without_systemd_or_with_its_socket_gone_the_daemon_runs_on(tmp_path):
    port = _free_port()
    daemon = _serve(tmp_path / "state", port, tmp_path / "no-such.sock", WATCHDOG_USEC="200000")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _ready(port) == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the daemon did not get ready"
                time.sleep(0.1)
        time.sleep(0.5)  # watchdog pings that find no socket
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        daemon.kill()
        daemon.wait()
