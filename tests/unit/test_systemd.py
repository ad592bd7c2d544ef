"""The systemd notifier: read once from the environment (and taken out of it, so the
processes the daemon starts do not speak for it), abstract socket names, a watchdog meant
for another process ignored, a socket that is gone said once, and the stopping status
saying why."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
import structlog

from batchd.scheduler import config, systemd
from batchd.scheduler.daemon import FENCED_EXIT, Daemon


@pytest.fixture
def abstract_socket():
    name = f"batchd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        yield sock, f"@{name}"
    finally:
        sock.close()


def test_the_variables_are_read_once_and_taken_out_of_the_environment(monkeypatch, abstract_socket):
    sock, name = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = systemd.Notifier.from_environment()
    assert (notifier.socket, notifier.watchdog) == (name, 15.0)
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    assert notifier.notify("READY=1", "STATUS=serving")
    assert sock.recv(100) == b"READY=1\nSTATUS=serving"  # through the abstract namespace


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("30000000", None, 15.0),
    ("30000000", "1", None),  # another process's watchdog
    ("1", None, systemd.LEAST_PING),  # never a busy loop
    ("0", None, None), ("soon", None, None),
])  # fmt: skip
def test_the_watchdog_interval_is_half_its_period_for_this_process_only(
    monkeypatch, usec, pid, interval
):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert systemd.Notifier.from_environment().watchdog == interval


def test_outside_systemd_nothing_is_sent_and_no_watchdog_runs(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # (without a socket, nobody to ping)
    notifier = systemd.Notifier.from_environment()
    assert (notifier.socket, notifier.watchdog) == (None, None)
    assert notifier.notify("READY=1") is False


def test_a_socket_that_is_gone_is_said_once_and_the_daemon_runs_on(tmp_path):
    notifier = systemd.Notifier(str(tmp_path / "gone.sock"))
    with structlog.testing.capture_logs() as logs:
        assert [notifier.notify("WATCHDOG=1") for _ in range(3)] == [False] * 3
        assert notifier.notify("READY=1") is False
        assert systemd.Notifier("@bad\ud800").notify("READY=1") is False  # not encodable
    said = [entry for entry in logs if entry["event"] == "systemd.notify_failed"]
    assert len(said) == 2 and said[0]["socket"] == str(tmp_path / "gone.sock")


def test_the_stopping_status_says_why_when_the_daemon_was_not_asked_to_stop(tmp_path):
    daemon = Daemon(config.load(None, state=str(tmp_path / "state"), local_nodes=0))
    assert daemon._stopping_status() == "stopping"
    daemon.failed.append("planner")
    assert daemon._stopping_status() == "stopping: planner ended on its own (exit 1)"
    daemon.fenced_out = True
    assert daemon._stopping_status() == (
        f"stopping: fenced, another daemon took the log over (exit {FENCED_EXIT})"
    )
