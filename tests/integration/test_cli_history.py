"""`batchd replay`, `batchd job history` and `batchd events export` as a user runs them."""

from __future__ import annotations

import asyncio
import json

import pytest

from batchd.events import urls
from batchd.events.envelope import NewEvent
from batchd.events.timeutil import to_iso
from batchd.scheduler.bench import workload
from tests.conftest import sealing_codec
from tests.integration.test_cli import assert_one_line_error, batchd

SECRET = "hunter2-very-secret"


def _submitted(job_id: str, name: str) -> NewEvent:
    return NewEvent("JobSubmitted", {
        "jobId": job_id, "workspace": "ws", "experiment": "exp", "name": name,
        "cluster": "c-1", "owner": "ann", "priority": 0, "nodeCount": 1, "gpusPerNode": 1,
        "spec": {"secrets": [{"name": "TOKEN", "value": SECRET}]},
    }, actor="user:ann")  # fmt: skip


async def _build(url: str) -> dict:
    store = await urls.open_store(url, codec=sealing_codec())
    try:
        for stream, batch in workload.cluster_log(400, seed=5):
            await store.append(stream, batch)
        middle = (await store.head()).position
        await store.append("job-a1", [_submitted("a1", "train")])
        await store.append("job-a1", [NewEvent("JobTerminateRequested", {"jobId": "a1"},
                                               actor="user:bob")])  # fmt: skip
        await store.append("job-a1", [NewEvent("JobTerminated", {"jobId": "a1"})])
        await store.append("job-a1", [NewEvent("JobDeleted", {"jobId": "a1"}, actor="user:ann")])
        await store.append("job-a2", [_submitted("a2", "train")])
        events = await store.read_all(0, 100_000)
    finally:
        await store.close()
    return {"middle": middle, "first": events[0], "events": events}


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> dict:
    url = f"sqlite:///{tmp_path_factory.mktemp('history') / 'events.db'}"
    return {"url": url, **asyncio.run(_build(url))}


def test_replay_at_a_position_shows_that_moment(log):
    done = batchd("replay", "--store", log["url"], "--position", str(log["middle"]), "--json")
    assert done.returncode == 0, done.stderr
    world = json.loads(done.stdout)
    assert world["position"] == log["middle"]
    assert {c["name"] for c in world["clusters"]} == {"nc24-a", "nc24-b", "nc24-c"}
    assert all(j["name"] != "train" for j in world["jobs"])  # submitted after that moment
    for queued in world["queues"].values():
        keys = [(-q["priority"]) for q in queued]
        assert keys == sorted(keys)
    text = batchd("replay", "--store", log["url"], "--position", str(log["middle"]))
    assert text.returncode == 0 and "queue vision/nc24-a" in text.stdout


def test_replay_at_a_time_includes_events_recorded_at_that_time(log):
    last = log["events"][-1]
    done = batchd("replay", "--store", log["url"], "--at", to_iso(last.recorded_at), "--json")
    world = json.loads(done.stdout)
    assert world["position"] == last.position
    assert [j["state"] for j in world["jobs"] if j["name"] == "train"] == ["queued"]


def test_a_time_without_a_zone_is_utc_whatever_the_local_zone(log):
    event = log["events"][len(log["events"]) // 2]
    naive = to_iso(event.recorded_at).removesuffix("Z")
    done = batchd("replay", "--store", log["url"], "--at", naive, "--json",
                  env={"TZ": "America/New_York"})  # fmt: skip
    assert json.loads(done.stdout)["position"] == event.position


def test_replay_before_the_first_event_is_empty_with_a_note(log):
    done = batchd("replay", "--store", log["url"], "--at", "2001-01-01T00:00:00", "--json")
    assert done.returncode == 0
    world = json.loads(done.stdout)
    assert world["position"] == 0 and world["clusters"] == [] and world["jobs"] == []
    assert "before the first event" in done.stderr and "before the first event" in world["note"]
    done = batchd("replay", "--store", log["url"], "--position", "0", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["jobs"] == []
    assert "position 0 is before the first event" in json.loads(done.stdout)["note"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--at", "last tuesday"], ["--at: 'last tuesday'", "ISO-8601"]),
        (["--at", ""], ["--at: ''", "ISO-8601"]),
        (["--position", "999999"], ["--position: 999999 is beyond the log's head"]),
        (
            ["--at", "0001-01-01T00:00:00+01:00"],
            ["--at: '0001-01-01T00:00:00+01:00'", "out of range"],
        ),
    ],
)
def test_replay_refuses_bad_moments(log, args, words):
    assert_one_line_error(batchd("replay", "--store", log["url"], *args), *words)


def test_job_history_lists_each_incarnation_of_a_reused_name(log):
    done = batchd("job", "history", "train", "-w", "ws", "-e", "exp", "--store", log["url"],
                  "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    history = json.loads(done.stdout)  # the API's document, as through the daemon
    first, second = history["value"]
    assert [e["event"] for e in first["timeline"]] == [
        "JobSubmitted", "JobTerminateRequested", "JobTerminated", "JobDeleted",
    ]  # fmt: skip
    assert first["timeline"][1]["actor"] == "user:bob"
    assert [e["state"] for e in second["timeline"]] == ["queued"]
    text = batchd("job", "history", "train", "-w", "ws", "-e", "exp", "--store", log["url"])
    assert "incarnation 2 of 2" in text.stdout and "user:bob" in text.stdout


def test_job_history_of_a_scheduled_job_names_its_nodes_and_attempts(log):
    scheduled = next(e for e in log["events"] if e.type == "JobScheduled")
    submitted = next(
        e for e in log["events"]
        if e.type == "JobSubmitted" and e.data["jobId"] == scheduled.data["jobId"]
    )  # fmt: skip
    d = submitted.data
    done = batchd("job", "history", d["name"], "-w", d["workspace"], "-e", d["experiment"],
                  "--store", log["url"], "--json")  # fmt: skip
    timeline = json.loads(done.stdout)["value"][0]["timeline"]
    entry = next(e for e in timeline if e["event"] == "JobScheduled")
    assert entry["attempt"] == 1
    assert entry["nodes"] == [t["node"] for t in scheduled.data["tasks"]]


def test_job_history_of_an_unknown_job_is_an_error(log):
    assert_one_line_error(
        batchd("job", "history", "nope", "--store", log["url"]), "nope", "no job named"
    )
    for args, said in ((["a/b"], "job name: must be"), (["j", "-w", "x y"], "workspace name")):
        assert_one_line_error(  # a name nothing could have, as the daemon says it
            batchd("job", "history", *args, "--store", log["url"]), said
        )


def test_export_is_ndjson_in_the_event_json_form_with_secrets_redacted(log):
    done = batchd("events", "export", "--store", log["url"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(log["events"])
    assert SECRET not in done.stdout and '"***"' in done.stdout
    assert json.loads(lines[0])["position"] == 1
    stream = batchd("events", "export", "--store", log["url"], "--stream", "job-a1")
    assert [json.loads(x)["type"] for x in stream.stdout.splitlines()][-1] == "JobDeleted"


def test_export_between_two_times_is_inclusive(log):
    events = log["events"]
    start, end = events[10].recorded_at, events[-3].recorded_at
    done = batchd("events", "export", "--store", log["url"], "--from", to_iso(start),
                  "--to", to_iso(end))  # fmt: skip
    got = [json.loads(x)["position"] for x in done.stdout.splitlines()]
    want = [e.position for e in events if start <= e.recorded_at <= end]
    assert got == want
    assert_one_line_error(
        batchd("events", "export", "--store", log["url"], "--from", "soon"), "--from: 'soon'"
    )
    assert_one_line_error(
        batchd("events", "export", "--store", log["url"], "--stream", "job-nope"), "job-nope"
    )
    empty = batchd("events", "export", "--store", log["url"], "--stream", "")  # "$UNSET"
    assert_one_line_error(empty, "no stream ''")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from", "2026-11-28T10:00:00Z", "--to", "garbage"], ["--to: 'garbage'", "ISO-8601"]),
        (["--from", ""], ["--from: ''", "ISO-8601"]),  # an unset "$FROM": not all events
        (
            ["--to", "9999-12-31T23:59:59-01:00"],
            ["--to: '9999-12-31T23:59:59-01:00'", "out of range"],
        ),
        (
            ["--from", "2026-11-28T10:00:00Z", "--to", "2026-11-27T10:00:00Z"],
            ["--to 2026-11-27T10:00:00Z is before --from"],
        ),
    ],
)
def test_export_names_the_option_of_a_bad_time(log, args, words):
    done = batchd("events", "export", "--store", log["url"], *args)
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line_error(done, *words)


async def test_replay_text_shows_a_cluster_being_deleted(log, tmp_path):
    created = [e for e in log["events"] if e.type == "ClusterCreated"][:2]
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = await urls.open_store(url)
    try:
        for e in created:
            await store.append(e.stream, [NewEvent(e.type, e.data, e.actor)])
        gone = created[0]
        await store.append(
            gone.stream,
            [
                NewEvent(
                    "ClusterDeleteRequested",
                    {"clusterId": gone.data["clusterId"]},
                    actor="user:ann",
                )
            ],
        )
    finally:
        await store.close()
    done = await asyncio.to_thread(batchd, "replay", "--store", url, "--position", "3")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    deleting, kept = (f"{e.data['workspace']}/{e.data['name']}" for e in created)
    assert rows[deleting].split()[1] == "(deleting)"
    assert "deleting" not in rows[kept]
    as_json = json.loads(batchd("replay", "--store", url, "--position", "3", "--json").stdout)
    assert [c["deleting"] for c in as_json["clusters"]] == [True, False]


async def test_each_event_of_a_gang_attempt_shows_all_its_nodes(local):
    """A 2-node job that fails twice: the events its agents report (JobStarted, the requeue,
    the failure) show both nodes of their attempt, through the daemon and offline alike; a
    task's exit shows its own task's node."""
    daemon, _client = local
    env = {"BATCHD_SERVER": daemon.url, "BATCHD_TOKEN": daemon.admin_token}

    async def run(*args: str):
        return await asyncio.to_thread(batchd, *args, env=env)

    done = await run("job", "create", "gang", "--cluster", "local", "--command", "sleep 1; exit 1",
                     "--nodes", "2", "--gpus-per-node", "2", "--max-retries", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    waited = await run("job", "wait", "gang", "--timeout", "60")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    online = await run("job", "history", "gang", "--json")
    offline = await run("job", "history", "gang", "--store", daemon.cfg.store_url, "--json")
    assert online.returncode == 0 and offline.returncode == 0, online.stderr + offline.stderr
    [incarnation] = json.loads(online.stdout)["value"]
    assert json.loads(offline.stdout)["value"] == [incarnation]
    timeline = incarnation["timeline"]
    placed = {e["attempt"]: e["nodes"] for e in timeline if e["event"] == "JobScheduled"}
    assert sorted(placed) == [1, 2] and all(sorted(n) == ["local-0", "local-1"]
                                            for n in placed.values())  # fmt: skip
    by_agents = [e for e in timeline if e["actor"].startswith("agent:")]
    assert {e["event"] for e in by_agents} >= {"JobStarted", "JobTaskExited", "JobRequeued",
                                               "JobFailed"}  # fmt: skip
    for e in timeline:
        if e["event"] == "JobTaskExited":
            assert len(e["nodes"]) == 1 and e["nodes"][0] in placed[e["attempt"]], e
        elif e["attempt"] is not None:
            assert e["nodes"] == placed[e["attempt"]], e
    text = await run("job", "history", "gang")
    started = next(line for line in text.stdout.splitlines() if "JobStarted" in line)
    assert " ".join(placed[1]) in started, text.stdout
