"""The `batchd` command line as a user runs it: a real process, real stores."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.metadata
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from batchd.events import urls
from batchd.events.codec import Codec
from batchd.events.envelope import NewEvent
from batchd.events.secrets import Keyring
from batchd.events.urls import parse
from batchd.projections import snapshot
from batchd.projections.runner import Runner
from batchd.scheduler import cli_log, config
from batchd.scheduler.bench import workload
from batchd.scheduler.daemon import Daemon


def batchd(*args: str, env: dict | None = None, timeout: float = 60,
           stdin=None) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "batchd.scheduler.cli", *args], stdin=stdin,
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchd: error: "), done.stderr
    for word in words:
        assert word in lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def write_log(url: str, count: int, keyring: Keyring | None = None) -> None:
    store = await urls.open_store(url, codec=Codec(keyring))
    try:
        for n in range(count):
            await store.append(f"job-{n}", [NewEvent("JobStarted", {"n": n}, actor="user:ann")])
    finally:
        await store.close()


async def test_events_tail_prints_the_last_events_and_json(durable_url):
    await write_log(durable_url, 15)
    done = batchd("events", "tail", "--store", durable_url, "-n", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["13", "14", "15"]
    assert "JobStarted" in lines[0] and "user:ann" in lines[0]
    done = batchd("events", "tail", "--store", durable_url, "--after", "13", "--json")
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["position"] for e in events] == [14, 15]
    assert set(events[0]) == {
        "position", "eventId", "stream", "version", "type", "schema", "recordedAt", "actor",
        "correlationId", "causationId", "data", "hash",
    }  # fmt: skip
    assert events[0]["data"] == {"n": 13} and events[0]["recordedAt"].endswith("Z")
    done = batchd("events", "tail", "--store", durable_url, "--after", "40")
    assert done.returncode == 0 and done.stdout == ""
    assert "no events after position 40 (the log's head is at 15)" in done.stderr
    done = batchd("events", "tail", "--store", durable_url, "--after", "3", "-n", "2")
    assert done.returncode == 2 and "not allowed with argument --after" in done.stderr


async def test_offline_tools_read_the_log_the_daemons_configuration_names(durable_url, tmp_path):
    """An operator checks the log the service runs on with the service's own --config: its
    [store] url, else its state directory's log."""
    await write_log(durable_url, 4)
    toml = tmp_path / "batchd.toml"
    toml.write_text(f'[store]\nurl = "{durable_url}"\n')
    done = batchd("audit", "verify", "--config", str(toml), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["events"] == 4, done
    for command in (["events", "tail"], ["events", "export"]):
        done = batchd(*command, "--config", str(toml), "--state-dir", str(tmp_path / "s"))
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 4, (command, done)
    state = tmp_path / "state"  # no [store]: the log in the file's state directory
    state.mkdir()
    await write_log(config.default_store_url(state), 2)
    toml.write_text(f'state_dir = "{state}"\n')
    elsewhere = {"BATCHD_STATE_DIR": str(tmp_path / "elsewhere")}  # (the file's state_dir wins)
    done = batchd("events", "tail", "--config", str(toml), "--json", env=elsewhere)
    assert [json.loads(line)["position"] for line in done.stdout.splitlines()] == [1, 2], done
    assert_one_line_error(batchd("audit", "verify", "--config", str(tmp_path / "none.toml")),
                          "cannot read configuration", "none.toml")  # fmt: skip
    for command in (["audit", "verify"], ["events", "tail"]):  # not the default log instead
        assert_one_line_error(batchd(*command, "--config", ""), "--config: give the path")
    done = batchd("audit", "verify", "--config", str(toml), "--store", durable_url)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


async def test_events_tail_json_redacts_secrets(tmp_path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = await urls.open_store(url, codec=Codec(Keyring.generate()))
    spec = {"containerSettings": {"imageSourceRegistry": {"credentials": {"password": "pw-XYZ"}}}}
    await store.append("job-1", [NewEvent("JobSubmitted", {"spec": spec})])
    await store.close()
    done = batchd("events", "tail", "--store", url, "--json")
    event = json.loads(done.stdout)
    assert event["data"]["spec"]["containerSettings"]["imageSourceRegistry"]["credentials"] == {
        "password": "***"
    }
    assert b"pw-XYZ" not in (tmp_path / "events.db").read_bytes()
    wal = tmp_path / "events.db-wal"
    assert not wal.exists() or b"pw-XYZ" not in wal.read_bytes()


async def test_events_tail_follow_prints_new_events_as_they_land(tmp_path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    await write_log(url, 2)
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd.scheduler.cli", "events", "tail", "--store", url,
        "--after", "0", "--follow", "--json", stdout=subprocess.PIPE,
    )  # fmt: skip

    async def position() -> int:
        return json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))["position"]

    try:
        assert await position() == 1
        assert await position() == 2
        await write_log(url, 1)
        assert await position() == 3
    finally:
        follower.terminate()
        await asyncio.wait_for(follower.wait(), 10)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://root@localhost/db", ["unsupported store URL", "mysql://"]),
        ("sqlite://relative.db", ["malformed SQLite URL"]),
        ("postgresql://u:s3cret@127.0.0.1:1/db", ["unreachable", "127.0.0.1:1", "u:***@"]),
        ("sqlite:////nonexistent/dir/events.db", ["no batchd log", "/nonexistent/dir/events.db"]),
        ("sqlite:////tmp", ["/tmp: it is a directory", "/tmp/events.db"]),
        ("", ["unsupported store URL ''"]),  # not the daemon's log instead
        ("postgresql://u@127.0.0.1:99999/db", ["port '99999' must be a number from 1 to 65535"]),
        ("postgresql://u:s3cret@x@127.0.0.1/db", ["must be written %40", "u:***@127.0.0.1"]),
    ],
)
def test_bad_store_urls_give_one_line_errors(url, words):
    for command in (["events", "tail"], ["audit", "verify"]):
        done = batchd(*command, "--store", url)
        assert_one_line_error(done, *words)
        assert "s3cret" not in done.stderr


def test_a_daemon_refused_for_its_log_leaves_no_secret_key_behind(tmp_path):
    state = tmp_path / "state"
    done = batchd("serve", "--store", "postgresql://postgres@127.0.0.1:1/db",
                  "--state-dir", str(state), "--listen", "127.0.0.1:0")  # fmt: skip
    assert_one_line_error(done, "unreachable")
    assert not (state / "secret.keys").exists()  # a later start would make a different key


def test_a_corrupted_sqlite_file_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "events.db"
    path.write_bytes(b"this is not a database at all" * 200)
    before = digest(path)
    for command in (["events", "tail", "--store"], ["audit", "verify", "--store"]):
        assert_one_line_error(batchd(*command, f"sqlite:///{path}"), str(path), "not a SQLite")
    state = tmp_path / "state"
    done = batchd("serve", "--store", f"sqlite:///{path}", "--state-dir", str(state),
                  "--listen", "127.0.0.1:0")  # fmt: skip
    assert done.returncode != 0 and "not a SQLite" in done.stderr and "Traceback" not in done.stderr
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db", "state"]


def test_a_log_with_a_damaged_page_is_not_written_to(tmp_path):
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path)
    conn.close()
    done = batchd("bench", "append", "--events", "3000", "--batch", "100",
                  "--store", f"sqlite:///{path}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(path, "r+b") as damaged:  # a page in the middle of the events table
        damaged.seek(4096 * 40)
        damaged.write(b"\xff" * 4096)
    before = digest(path)
    state = tmp_path / "state"
    done = batchd("serve", "--store", f"sqlite:///{path}", "--state-dir", str(state),
                  "--listen", "127.0.0.1:0")  # fmt: skip
    assert_one_line_error(done, str(path), "is damaged")
    assert digest(path) == before


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("DELETE FROM batchd_schema", "batchd_schema table holds no schema version"),
        ("UPDATE batchd_schema SET version = 'abc'", "batchd_schema table holds no schema version"),
        ("DROP TABLE snapshots", "its snapshots table is missing"),
        (
            "DROP TABLE snapshots; CREATE TABLE snapshots (x)",
            "its snapshots table lacks its code_hash column",
        ),
        ("INSERT INTO batchd_schema VALUES (1)", "holds 2 rows, not one version"),
        # a newer batchd's log may have other tables: it says to upgrade, not "damaged"
        ("UPDATE batchd_schema SET version = 2; DROP TABLE snapshots", "upgrade batchd"),
    ],
)
def test_a_log_whose_own_tables_are_damaged_is_refused_untouched(tmp_path, damage, said):
    path = tmp_path / "events.db"
    done = batchd("bench", "append", "--events", "100", "--batch", "10",
                  "--store", f"sqlite:///{path}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(path)
    conn.executescript(damage)
    conn.commit()
    conn.close()
    before = digest(path)
    for command in (["audit", "verify", "--store"], ["events", "tail", "--store"]):
        assert_one_line_error(batchd(*command, f"sqlite:///{path}"), str(path), said)
    done = batchd("serve", "--store", f"sqlite:///{path}", "--state-dir", str(tmp_path / "s"),
                  "--listen", "127.0.0.1:0")  # fmt: skip
    assert_one_line_error(done, str(path), said)
    assert digest(path) == before  # no leadership taken, nothing written


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("DELETE FROM batchd_schema", "batchd_schema table holds no schema version"),
        ("DROP TABLE snapshots", "its snapshots table is missing"),
        ("DROP TABLE batchd_schema", "holds a table named events but no batchd log"),
        (
            "ALTER TABLE snapshots DROP COLUMN code_hash",
            "its snapshots table lacks its code_hash column",
        ),
        ("UPDATE batchd_schema SET version = 2; DROP TABLE snapshots", "upgrade batchd"),
    ],
)
async def test_a_postgres_log_whose_own_tables_are_damaged_is_refused_untouched(
    pg_database, tmp_path, damage, said
):
    done = batchd("bench", "append", "--events", "100", "--batch", "10", "--store", pg_database)
    assert done.returncode == 0, done.stderr
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(damage)
        epoch = await conn.fetchval("SELECT epoch FROM log_head")
        for command in (["audit", "verify", "--store"], ["events", "tail", "--store"]):
            assert_one_line_error(batchd(*command, pg_database), said)
        done = batchd("serve", "--store", pg_database, "--state-dir", str(tmp_path / "s"),
                      "--listen", "127.0.0.1:0")  # fmt: skip
        assert_one_line_error(done, said)
        assert await conn.fetchval("SELECT epoch FROM log_head") == epoch  # no leadership taken
    finally:
        await conn.close()


async def test_a_sqlite_log_reached_through_a_link_has_the_same_leader_lock(tmp_path):
    path = tmp_path / "events.db"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "events.db").symlink_to(path)
    leader = await urls.open_store(f"sqlite:///{path}")
    other = await urls.open_store(f"sqlite:///{tmp_path / 'other' / 'events.db'}")
    try:
        assert await leader.try_lock_leader()
        assert not await other.try_lock_leader()  # it stands by: one leader per log
    finally:
        await other.close()
        await leader.close()


async def _set_schema_version(url: str, version: int) -> int:
    """Set the log's schema version; the one it had."""
    target = parse(url)
    if target.scheme == "sqlite":
        conn = sqlite3.connect(target.target)
        [(was,)] = conn.execute("SELECT version FROM batchd_schema").fetchall()
        conn.execute("UPDATE batchd_schema SET version = ?", (version,))
        conn.commit()
        conn.close()
    else:
        conn = await asyncpg.connect(target.target)
        was = await conn.fetchval("SELECT version FROM batchd_schema")
        await conn.execute("UPDATE batchd_schema SET version = $1", version)
        await conn.close()
    return was


async def test_a_log_at_a_newer_schema_version_is_refused_untouched(durable_url, tmp_path):
    await write_log(durable_url, 3)
    await _set_schema_version(durable_url, 99)
    assert_one_line_error(batchd("events", "tail", "--store", durable_url), "schema version 99")
    done = batchd("serve", "--store", durable_url, "--state-dir", str(tmp_path / "s"),
                  "--listen", "127.0.0.1:0")  # fmt: skip
    assert done.returncode != 0 and "schema version 99" in done.stderr
    assert await _set_schema_version(durable_url, 1) == 99  # left as it was
    store = await urls.open_store(durable_url, readonly=True)
    head = await store.head()
    await store.close()
    assert (head.position, head.epoch) == (3, 1)  # serve took no leadership, wrote nothing


def test_bad_flags_are_usage_errors():
    done = batchd("audit", "verify", "--store", "memory://", "--expect", "12:nothex")
    assert_one_line_error(done, "POSITION:HASH")
    done = batchd("events", "tail", "--after", "-3")
    assert done.returncode == 2 and "must not be negative" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_daemon(state: Path, port: int, *extra: str) -> tuple[subprocess.Popen, dict | None]:
    """`batchd serve` on `state` without the embedded local cluster (a configuration that
    asks for no local nodes), once /readyz says it has started; the process and its /healthz
    answer."""
    config = state.parent / "no-local-nodes.toml"
    config.write_text("[local]\nnodes = 0\n")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "batchd.scheduler.cli", "serve", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", "--config", str(config), *extra],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    health = None
    for _ in range(150):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                health = json.load(r)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return daemon, health  # started: the log is led, the read models restored
        except OSError:  # not listening yet, or 503 starting
            time.sleep(0.1)
    return daemon, health


def test_serve_restores_the_read_models_and_snapshots_them_on_sigterm(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    url = f"sqlite:///{state / 'events.db'}"
    done = batchd("bench", "replay", "--events", "2000", "--store", url)
    assert done.returncode == 0, done.stderr
    keys = state / "secret.keys"  # a daemon leads a log only with keys (none open the bench's:
    # a key under another id, as for a lost key)
    keys.write_text(f"k2:{base64.b64encode(os.urandom(32)).decode()}\n")
    keys.chmod(0o600)
    port = _free_port()
    daemon, health = _start_daemon(state, port)
    try:
        assert health == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            ready = json.load(r)
        # restored (the planner may be appending its first decisions at this very moment)
        assert ready["position"] >= ready["readModelsPosition"] >= 2000
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()

    async def newest_snapshot_and_head():
        store = await urls.open_store(url, readonly=True)
        try:
            return await store.load_snapshot(snapshot.NAME), (await store.head()).position
        finally:
            await store.close()

    saved, head = asyncio.run(newest_snapshot_and_head())
    assert saved.position == head >= ready["position"]  # the whole log, as it stopped
    # (the planner may have appended after /readyz: the bench's jobs cannot be run here)


def _ended_logs(daemon: subprocess.Popen) -> list[dict]:
    """Kill `batchd serve` if it still runs; the JSON lines it logged."""
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait()
    logs = [json.loads(line) for line in daemon.stderr.read().splitlines()]
    daemon.stderr.close()
    return logs


def test_a_daemon_another_one_took_the_log_from_stops_with_exit_3(tmp_path):
    port = _free_port()
    state = tmp_path / "state"
    daemon, _body = _start_daemon(state, port)
    try:

        async def take_over() -> None:
            other = await urls.open_store(f"sqlite:///{state / 'events.db'}")
            try:
                await other.take_leadership()  # a second daemon on the same log
            finally:
                await other.close()

        asyncio.run(take_over())
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/workspaces/late", data=b"{}", method="PUT",
            headers={"Authorization": f"Bearer {(state / 'admin.token').read_text().strip()}",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        refused.value.close()
        assert daemon.wait(30) == 3  # deploy/batchd.service restarts it not (it would fight)
    finally:
        logs = _ended_logs(daemon)
    fenced = next(e for e in logs if e["event"] == "daemon.fenced")
    assert (fenced["epoch"], fenced["log_epoch"]) == (1, 2) and fenced["level"] == "error"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
            return True
    except OSError:  # not listening, or 503
        return False


def _logged(path: Path, event: str) -> bool:
    return path.exists() and f'"event": "{event}"' in path.read_text()


def test_a_second_daemon_on_a_led_log_stands_by_and_takes_over_when_it_frees(tmp_path, durable_url):
    """A stray `batchd serve` on a log another daemon leads must not depose it: it waits,
    serving nothing, and takes over (restoring the read models) once the leader stops."""
    config = tmp_path / "no-local-nodes.toml"
    config.write_text("[local]\nnodes = 0\n")
    keys = {**os.environ, "BATCHD_SECRET_KEYS": f"k1:{base64.b64encode(os.urandom(32)).decode()}"}
    daemons, ports, logs = [], [_free_port(), _free_port()], []
    try:
        for n, port in enumerate(ports):
            logs.append(tmp_path / f"serve-{n}.log")
            with logs[-1].open("w") as log:
                daemons.append(subprocess.Popen(
                    [sys.executable, "-m", "batchd.scheduler.cli", "serve", "--config",
                     str(config), "--state-dir", str(tmp_path / f"state-{n}"), "--store",
                     durable_url, "--listen", f"127.0.0.1:{port}"], stderr=log, env=keys,
                ))  # fmt: skip
            deadline = time.monotonic() + 30
            while not (_ready(port) if n == 0 else _logged(logs[1], "daemon.standby")):
                assert time.monotonic() < deadline and daemons[n].poll() is None
                time.sleep(0.1)
        time.sleep(2)  # the standby's tries of the lock change nothing
        assert _ready(ports[0]) and not _ready(ports[1])
        assert not _logged(logs[0], "daemon.fenced")
        daemons[0].send_signal(signal.SIGTERM)
        assert daemons[0].wait(30) == 0
        deadline = time.monotonic() + 30
        while not _ready(ports[1]):
            assert time.monotonic() < deadline and daemons[1].poll() is None
            time.sleep(0.1)
        assert _logged(logs[1], "daemon.taking_over")
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0


def test_a_daemon_without_the_logs_secret_keys_refuses_to_start_on_it(tmp_path, durable_url):
    """A second daemon (a standby, a new state directory) on a log that holds events needs
    the keys it was written with: a new key under the same id would open none of its
    secrets. It says so at once, before it stands by, and writes nothing."""
    port = _free_port()
    first, _body = _start_daemon(tmp_path / "first", port, "--store", durable_url)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "batchd.scheduler.cli", "serve", "--state-dir",
             str(tmp_path / "second"), "--store", durable_url, "--listen",
             f"127.0.0.1:{_free_port()}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        _ended_logs(first)
    assert second.returncode != 0
    error = second.stderr.strip().splitlines()[-1]
    assert "holds events, but this daemon has no secret keys" in error
    assert "secret.keys" in error and "BATCHD_SECRET_KEYS" in error
    assert "Traceback" not in second.stderr
    assert not (tmp_path / "second" / "secret.keys").exists()  # no key made for it


async def test_a_standby_without_keys_refuses_to_take_over_a_log_written_meanwhile(
    tmp_path, durable_url
):
    """Two daemons first started on an empty log: the one that stood by meanwhile (no keys
    of its own yet) refuses to take the log over once the other has written to it."""
    holder = await urls.open_store(durable_url, codec=Codec(Keyring.generate()))
    try:
        assert await holder.try_lock_leader()
        cfg = config.load(None, state=str(tmp_path / "standby"), store=durable_url,
                          local_nodes=0, listen="127.0.0.1:0")  # fmt: skip
        standby = Daemon(cfg)
        starting = asyncio.ensure_future(standby.start())
        await asyncio.sleep(0.5)
        assert not starting.done()  # standing by
        await holder.take_leadership()
        await holder.append("workspace-w", [NewEvent("WorkspaceCreated", {"workspace": "w"})])
    finally:
        await holder.close()  # the lock frees: the standby tries it within a second
    try:
        with pytest.raises(ValueError, match="holds events, but this daemon has no secret keys"):
            await asyncio.wait_for(starting, 30)
    finally:
        await standby.stop()
    assert not (tmp_path / "standby" / "secret.keys").exists()


async def test_a_daemon_whose_keys_do_not_open_the_logs_secrets_refuses_to_lead(
    tmp_path, durable_url, monkeypatch
):
    """Keys under the log's key id but of other bytes (another daemon's secret.keys): a
    daemon started with them would seal new secrets it alone can open and fail every queued
    job that carries one. It says so at start, before it stands by or leads."""
    key = os.urandom(32)
    written = Keyring({"k1": key}, "k1")
    store = await urls.open_store(durable_url, codec=Codec(written))
    try:
        sealed = {"workspace": "w", "storageKey": written.seal("s3")}  # (a secret it holds)
        await store.append("workspace-w", [NewEvent("WorkspaceCreated", sealed)])
    finally:
        await store.close()
    other = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv(config.KEYS_ENV, f"k1:{other}")
    cfg = config.load(None, state=str(tmp_path / "state"), store=durable_url, local_nodes=0,
                      listen="127.0.0.1:0")  # fmt: skip
    daemon = Daemon(cfg)
    try:
        with pytest.raises(ValueError, match="holds secrets this daemon's keys do not open"):
            await asyncio.wait_for(daemon.start(), 30)
    finally:
        await daemon.stop()
    monkeypatch.setenv(config.KEYS_ENV, f"k1:{base64.b64encode(key).decode()}")
    right = Daemon(cfg)
    try:
        await asyncio.wait_for(right.start(), 30)  # the log's own keys: it leads
        assert right.ready
    finally:
        await right.stop()


def test_serve_answers_healthz_and_stops_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    state = tmp_path / "state"
    daemon, body = _start_daemon(state, port)
    try:
        assert body == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            ready = json.load(r)
        # the first start's one event: the admin token it made (its hash)
        assert ready["epoch"] == 1 and ready["readModelsPosition"] == ready["position"] == 1
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        logs = _ended_logs(daemon)
    assert [e["event"] for e in logs if e["event"].startswith("daemon.")] == [
        "daemon.started", "daemon.stopping", "daemon.stopped",
    ]  # fmt: skip
    anchor = next(e for e in logs if e["event"] == "log.anchor")
    assert anchor["position"] == 1
    assert (state / "events.db").exists()
    assert oct((state / "secret.keys").stat().st_mode & 0o777) == "0o600"
    # job documents and commands are in the log (SQLite gives its WAL the same mode)
    assert oct((state / "events.db").stat().st_mode & 0o777) == "0o600"
    token = (state / "admin.token").read_text().strip()
    assert oct((state / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert token.startswith("bd_") and token not in json.dumps(logs)


def test_a_configuration_with_a_wrong_type_or_unknown_key_is_one_clear_error(tmp_path):
    config = tmp_path / "batchd.toml"
    for text, words in (('server = "x"', ("server", "a table")),
                        ("[server]\nlisten = 8080", ("server.listen", "a string")),
                        ("[local]\nnodes = true", ("local.nodes", "a whole number")),
                        ("[local]\ngpus_per_node = -1", ("gpus_per_node", "give 0 to 64")),
                        ("[local]\nnodes = -1", ("[local] nodes", "give 0 to 10000")),
                        ("[local]\nnodes = 65\nmax_nodes = 8",
                         ("[local] nodes", "more than [local] max_nodes (8)")),
                        ("[local]\nnodes = 1\nmax_nodes = 100000",
                         ("[local] max_nodes", "give 1 to 10000")),
                        ("[vm_sizes.Lab]\ngpus = 2\nvcpus = 0\nmemory_mb = 1",
                         ("[vm_sizes.Lab] vcpus", "at least 1")),
                        ("[vm_sizes.Lab]\ngpus = 2\nvcpus = 8", ("[vm_sizes.Lab] memory_mb",)),
                        ("[vm_sizes.Lab]\ngpus = 2\nvcpus = 8\nmemory_mb = 1\nram = 3",
                         ("[vm_sizes.Lab] ram", "unknown")),
                        ("[vm_sizes.local]\ngpus = 1\nvcpus = 1\nmemory_mb = 1",
                         ("[vm_sizes.Local]", "gpus_per_node")),
                        ("colour = 1", ("unknown key colour",)),
                        ('[store]\nurl = ""', ("store.url", "must not be empty")),
                        (f'[secrets]\nkeys_file = "{tmp_path}/secrets.key"',  # mistyped
                         ("keys_file", "secrets.key does not exist"))):  # fmt: skip
        config.write_text(text + "\n")
        done = batchd("serve", "--config", str(config), "--state-dir", str(tmp_path / "s"))
        assert_one_line_error(done, *words)
    assert not list(tmp_path.glob("secrets.key*"))  # no key made where none was


def test_an_option_a_command_does_not_know_is_told_with_that_commands_usage():
    for args, usage in ((("job", "list", "--clusterx", "a"), "batchd job list"),
                        (("events", "export", "--wat"), "batchd events export")):  # fmt: skip
        done = batchd(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.startswith(f"usage: {usage} "), done.stderr
        unknown = " ".join(args[len(usage.split()) - 1 :])
        assert done.stderr.endswith(f"{usage}: error: unrecognized arguments: {unknown}\n")


def test_an_option_before_the_command_is_named_not_taken_for_a_missing_command():
    for args, usage in ((("--bogus",), "batchd"), (("--bogus", "job", "list"), "batchd"),
                        (("job", "--wat=1", "list"), "batchd job")):  # fmt: skip
        done = batchd(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.startswith(f"usage: {usage} "), done.stderr
        unknown = next(a for a in args if a.startswith("-"))
        assert done.stderr.endswith(f"error: unrecognized option {unknown!r} before the command\n")
    for known in (("--help",), ("--he",), ("job", "--he")):  # argparse's shortened options too
        assert batchd(*known).returncode == 0, known


def test_version_and_help_say_what_a_user_asks():
    done = batchd("--version")
    installed = importlib.metadata.version("batchd")
    assert done.returncode == 0 and done.stdout == f"batchd {installed}\n"
    helped = batchd("experiment", "--help").stdout
    assert "create an experiment" in helped and "a experiment" not in helped


async def test_offline_replay_opens_a_snapshot_with_the_keys_beside_its_sqlite_log(
    tmp_path, monkeypatch
):
    """The keys of the state directory the log lies in, before the default state directory's
    (another daemon's): its sealed snapshot is used, and nothing is said to be amiss."""
    state, other = tmp_path / "state", tmp_path / "home-state"
    keyring = config.load_keyring(config.load(None, state=str(state)), create=True)
    config.load_keyring(config.load(None, state=str(other)), create=True)  # another daemon's
    url = f"sqlite:///{state / 'events.db'}"
    store = await urls.open_store(url, codec=Codec(keyring))
    try:
        for stream, batch in workload.cluster_log(40, 3):
            await store.append(stream, batch)
        runner = Runner(store)
        await runner.restore()
        await runner.save_snapshot()
    finally:
        await store.close()
    monkeypatch.delenv("BATCHD_SECRET_KEYS", raising=False)
    env = {"BATCHD_STATE_DIR": str(other)}
    done = batchd("replay", "--store", url, "--position", "30", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["position"] == 30
    monkeypatch.setenv("BATCHD_STATE_DIR", str(other))  # what the CLI found: those keys
    keys = cli_log._keys(argparse.Namespace(store=url, config=None, state_dir=None))
    reader = await urls.open_store(url, readonly=True, codec=Codec(keys))
    try:
        info = await Runner(reader).restore()
    finally:
        await reader.close()
    assert info.snapshot_position == runner.position and info.discarded is None
    assert "snapshot_refused" not in done.stderr and "seal" not in done.stderr, done.stderr
