"""The HTTP API through a real daemon: lifecycle, idempotent PUT, conflicts, read-your-writes,
the event stream, output files, TLS."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import ssl
import subprocess
import uuid

import aiohttp
import pytest
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from batchd.events import errors, urls
from batchd.events.envelope import NewEvent
from batchd.projections.runner import Runner
from batchd.scheduler import config, protocol
from batchd.scheduler import daemon as daemon_module
from batchd.scheduler.client import ssl_context
from batchd.scheduler.daemon import Daemon
from tests.integration.conftest import Client, newest_job, start_daemon
from tests.integration.test_cli import assert_one_line_error, batchd
from tests.logs import info_logs
from tests.unit.test_commands import BAD_JOBS
from tests.unit.test_commands import CLUSTER as UNIT_CLUSTER
from tests.unit.test_commands import JOB as UNIT_JOB
from tests.unit.test_lifecycle_and_specs import BAD_CLUSTERS

CLUSTER = {"properties": {"vmSize": "Standard_NC24s_v3",
                          "scaleSettings": {"manual": {"targetNodeCount": 2}}}}  # fmt: skip
JOB = {
    "cluster": "gpu", "nodeCount": 1, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
    "containerSettings": {"imageSourceRegistry": {"image": "pytorch/pytorch:latest"}},
    "customToolkitSettings": {"commandLine": "python train.py"},
    "environmentVariables": [{"name": "EPOCHS", "value": "3"}],
}  # fmt: skip
EXP = "/v1/workspaces/ws/experiments/exp"


@pytest.fixture
async def client(api):
    async with aiohttp.ClientSession() as session:
        yield Client(session, api.url, api.admin_token)


async def seed(client: Client) -> None:
    assert (await client.call("PUT", "/v1/workspaces/ws", {}))[0] == 201
    assert (await client.call("PUT", EXP, {}))[0] == 201
    assert (await client.call("PUT", "/v1/workspaces/ws/clusters/gpu", CLUSTER))[0] == 201


async def test_the_whole_lifecycle_of_workspace_experiment_cluster_and_job(client, api):
    await seed(client)
    status, job = await client.call("PUT", f"{EXP}/jobs/train", JOB)
    assert status == 201
    assert job["id"] == "/workspaces/ws/experiments/exp/jobs/train"
    assert job["properties"]["executionState"] == "queued"
    assert job["properties"]["cluster"] == {"id": "/workspaces/ws/clusters/gpu"}
    assert job["properties"]["gpusPerNode"] == 4  # all of Standard_NC24s_v3's GPUs
    assert job["properties"]["owner"] == "admin"
    assert job["properties"]["toolType"] == "custom"  # Batch AI's read-only fields
    segment = job["properties"]["jobOutputDirectoryPathSegment"]
    assert re.fullmatch(r"ws/experiments/exp/jobs/train/[0-9a-f-]{36}", segment), segment
    # the planner explains why it waits: the cluster's nodes have not joined yet
    for _ in range(50):
        status, job = await client.call("GET", f"{EXP}/jobs/train")
        if job["properties"]["pendingReason"] == {"code": "cluster_scaling"}:
            break
        await asyncio.sleep(0.1)
    assert job["properties"]["pendingReason"] == {"code": "cluster_scaling"}
    status, cluster = await client.call("GET", "/v1/workspaces/ws/clusters/gpu")
    assert cluster["properties"]["allocationState"] == "resizing"
    status, listed = await client.call("GET", "/v1/jobs?state=queued&cluster=gpu")
    assert [j["name"] for j in listed["value"]] == ["train"] and listed["nextLink"] is None
    status, listed = await client.call("GET", "/v1/jobs?state=running&cluster=gpu")
    assert status == 200 and listed["value"] == []  # a cluster with no such job: none
    status, error = await client.call("GET", "/v1/jobs?cluster=gpus")  # mistyped
    assert status == 400 and error["error"]["details"][0]["name"] == "cluster", error
    for field, typo in (("workspace", "sw"), ("experiment", "epx")):  # mistyped, also
        status, error = await client.call("GET", f"/v1/jobs?{field}={typo}")
        assert status == 400 and error["error"]["details"][0]["name"] == field, error
    for query in ("State=queued", "cluster=gpu&stat=queued"):  # not a filter: refused, named
        status, error = await client.call("GET", f"/v1/jobs?{query}")
        assert status == 400, error
        assert error["error"]["details"][0]["name"] == query.split("&")[-1].split("=")[0]
        assert "state" in error["error"]["details"][0]["value"]  # (what it takes)
    status, error = await client.call("GET", "/v1/jobs?=queued")  # a parameter with no name
    assert status == 400 and error["error"]["details"][0]["name"] == "query", error
    status, error = await client.call("GET", "/v1/jobs?state=queued&state=failed")
    assert status == 400 and error["error"]["details"][0]["name"] == "state", error
    status, error = await client.call("GET", f"{EXP}/jobs/train?top=1")  # takes `after` only
    assert status == 400 and error["error"]["details"][0]["name"] == "top", error
    assert (await client.call("GET", f"{EXP}/jobs/train?after=1"))[0] == 200
    status, listed = await client.call("GET", "/v1/jobs?workspace=ws&experiment=exp")
    assert [j["name"] for j in listed["value"]] == ["train"]
    resize = {"scaleSettings": {"manual": {"targetNodeCount": 4}}}
    status, cluster = await client.call("PATCH", "/v1/workspaces/ws/clusters/gpu", resize)
    assert status == 200 and cluster["properties"]["scaleSettings"] == resize["scaleSettings"]
    status, ended = await client.call("POST", f"{EXP}/jobs/train/terminate")
    assert status == 202 and ended["properties"]["state"] == "failed"
    assert ended["properties"]["executionInfo"]["errors"][0]["code"] == "terminated"
    status, hist = await client.call("GET", f"{EXP}/jobs/train/history")
    assert segment.endswith(hist["value"][0]["id"])  # the id its outputs are under
    events = [e["event"] for e in hist["value"][0]["timeline"]]
    assert events[0] == "JobSubmitted" and events[-2:] == ["JobTerminateRequested",
                                                           "JobTerminated"]  # fmt: skip
    assert (await client.call("DELETE", f"{EXP}/jobs/train"))[0] == 202
    assert (await client.call("GET", f"{EXP}/jobs/train"))[0] == 404
    status, hist = await client.call("GET", f"{EXP}/jobs/train/history")  # deleted: still told
    assert hist["value"][0]["timeline"][-1]["event"] == "JobDeleted"
    assert (await client.call("DELETE", EXP))[0] == 202
    assert (await client.call("DELETE", "/v1/workspaces/ws/clusters/gpu"))[0] == 202
    assert (await client.call("DELETE", "/v1/workspaces/ws"))[0] == 202
    status, listed = await client.call("GET", "/v1/workspaces")
    assert listed["value"] == []


async def test_every_bad_document_is_refused_through_the_api_and_nothing_is_appended(client, api):
    """The unit tests' bad jobs and clusters, sent as documents: 400 naming the field and the
    rule, and the log unchanged."""
    await client.call("PUT", "/v1/workspaces/bad", {})
    await client.call("PUT", "/v1/workspaces/bad/experiments/exp", {})
    assert (await client.call("PUT", "/v1/workspaces/bad/clusters/gpu", UNIT_CLUSTER))[0] == 201
    head = (await api.store.head()).position
    sent = [(f"/v1/workspaces/bad/experiments/exp/jobs/j{n}", {**UNIT_JOB, "cluster": "gpu",
                                                                **change}, where, rule)
            for n, (change, where, rule) in enumerate(BAD_JOBS)]  # fmt: skip
    sent += [(f"/v1/workspaces/bad/clusters/c{n}", document, where, rule)
             for n, (document, where, rule) in enumerate(BAD_CLUSTERS)]  # fmt: skip
    for path, document, where, rule in sent:
        raw = json.dumps(document).replace("Infinity", "1e400").encode()  # (JSON's spelling)
        status, error = await client.call("PUT", path, raw=raw)
        assert status == 400, (path, document, error)
        [detail] = error["error"]["details"]
        assert detail["name"] == where and rule in detail["value"], (document, error)
        assert (await client.call("GET", path))[0] == 404
    assert (await api.store.head()).position == head  # nothing appended


async def test_a_cluster_write_answers_the_allocation_state_it_leads_to(client):
    """The answer to a PATCH is what the next GET says (the state was the one before)."""
    await seed(client)  # (manual, 2 nodes that never join here: resizing)
    auto = {"scaleSettings": {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": 4}}}
    status, patched = await client.call("PATCH", "/v1/workspaces/ws/clusters/gpu", auto)
    assert status == 200
    _status, got = await client.call("GET", "/v1/workspaces/ws/clusters/gpu")
    assert patched["properties"]["allocationState"] == "steady"  # no provider scales it
    assert got["properties"]["allocationState"] == "steady"
    manual = {"scaleSettings": {"manual": {"targetNodeCount": 3}}}
    status, patched = await client.call("PATCH", "/v1/workspaces/ws/clusters/gpu", manual)
    assert patched["properties"]["allocationState"] == "resizing"  # 3 to come


async def test_a_jobs_tool_type_is_its_toolkits(client):
    await seed(client)
    horovod = {**JOB, "horovodSettings": {"pythonScriptFilePath": "train.py"}}
    del horovod["customToolkitSettings"]
    assert (await client.call("PUT", f"{EXP}/jobs/hvd", horovod))[0] == 201
    status, job = await client.call("GET", f"{EXP}/jobs/hvd")
    assert status == 200 and job["properties"]["toolType"] == "horovod"


async def test_put_is_idempotent_and_a_different_document_is_a_conflict(client):
    await seed(client)
    assert (await client.call("PUT", "/v1/workspaces/ws/clusters/gpu", CLUSTER))[0] == 200
    bigger = {"properties": {**CLUSTER["properties"], "vmSize": "Standard_ND40rs_v2"}}
    status, error = await client.call("PUT", "/v1/workspaces/ws/clusters/gpu", bigger)
    assert status == 409 and "PATCH" in error["error"]["message"]
    status, first = await client.call("PUT", f"{EXP}/jobs/train", JOB)
    status, again = await client.call("PUT", f"{EXP}/jobs/train", {"properties": JOB})
    assert status == 200 and again["position"] >= first["position"]
    status, hist = await client.call("GET", f"{EXP}/jobs/train/history")
    submitted = [e for e in hist["value"][0]["timeline"] if e["event"] == "JobSubmitted"]
    assert len(hist["value"]) == 1 and len(submitted) == 1  # nothing new was submitted
    status, error = await client.call("PUT", f"{EXP}/jobs/train", {**JOB, "nodeCount": 2})
    assert status == 409 and error["error"]["code"] == "Conflict"
    shown = (await client.call("GET", f"{EXP}/jobs/train"))[1]["properties"]["cluster"]
    rid = (
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.BatchAI/workspaces/ws/clusters/gpu"
    )
    for same in (shown, {"id": rid}):  # the cluster as GET shows it, by Batch AI's id: the same
        assert (await client.call("PUT", f"{EXP}/jobs/train", {**JOB, "cluster": same}))[0] == 200
    assert (await client.call("PUT", "/v1/workspaces/ws/clusters/gpu2", CLUSTER))[0] == 201
    other = {**JOB, "cluster": {"id": "/workspaces/ws/clusters/gpu2"}}
    assert (await client.call("PUT", f"{EXP}/jobs/train", other))[0] == 409
    # secret values are not compared: a PUT cannot test a guess of one (200 or 409)
    secret = {**JOB, "secrets": [{"name": "TOKEN", "value": "right"}]}
    assert (await client.call("PUT", f"{EXP}/jobs/keeps", secret))[0] == 201
    guess = {**JOB, "secrets": [{"name": "TOKEN", "value": "wrong"}]}
    status, shown = await client.call("PUT", f"{EXP}/jobs/keeps", guess)
    assert status == 200 and shown["properties"]["secrets"] == [{"name": "TOKEN", "value": "***"}]
    assert (await client.call("PUT", f"{EXP}/jobs/keeps", JOB))[0] == 409  # no secret: another


async def test_a_cluster_being_deleted_is_not_made_again_until_it_has_gone(client, api):
    await seed(client)
    cluster_id = api.models.models.cluster_ids["ws/gpu"]
    await api.store.append("node-n1", [NewEvent("NodeRegistered", {
        "nodeId": "n1", "cluster": cluster_id, "gpus": 4, "incarnation": 1,
        "runtimes": ["docker", "process"]})])  # fmt: skip
    await client.call("PUT", f"{EXP}/jobs/train", JOB)
    job_id = api.models.models.job_ids["ws/exp/train"][-1]
    [placed] = await api.store.append(f"job-{job_id}", [NewEvent("JobScheduled", {
        "jobId": job_id, "attempt": 1, "tasks": [{"node": "n1", "gpus": [0]}]})])  # fmt: skip
    await api.models.wait_for(placed, 10)  # n1 runs a task: the deletion drains it first
    assert (await client.call("DELETE", "/v1/workspaces/ws/clusters/gpu"))[0] == 202
    status, error = await client.call("PUT", "/v1/workspaces/ws/clusters/gpu", CLUSTER)
    assert status == 409 and "is being deleted" in error["error"]["message"]


async def test_every_write_returns_its_position_and_reads_can_wait_for_it(client, api):
    await seed(client)
    status, job = await client.call("PUT", f"{EXP}/jobs/train", JOB)
    position = job["position"]
    head = (await api.store.head()).position
    assert 0 < position <= head
    # a read after a write sees it: also one that names the position explicitly
    status, found = await client.call("GET", f"{EXP}/jobs/train?after={position}")
    assert status == 200 and found["name"] == "train"
    status, error = await client.call("GET", f"{EXP}/jobs/train?after={head + 1000}")
    assert status == 400 and error["error"]["details"][0]["name"] == "after"


async def test_many_concurrent_submissions_are_all_accepted_once(client, api):
    await seed(client)

    async def submit(n: int):
        return await client.call("PUT", f"{EXP}/jobs/j{n % 20}", JOB)

    results = await asyncio.gather(*(submit(n) for n in range(60)))
    assert sorted(status for status, _ in results).count(201) == 20
    assert all(status in (200, 201) for status, _ in results)
    names = [j.name for j in api.models.models.jobs.values()]
    assert sorted(names) == sorted(f"j{n}" for n in range(20))


async def _sse(client: Client, headers: dict, count: int,
               query: str = "") -> list[tuple[int, str, dict]]:  # fmt: skip
    """The first `count` events of the stream: (id, event type, data)."""
    out: list[tuple[int, str, dict]] = []
    fields: dict[str, str] = {}
    async with client.session.get(client.url + "/v1/events/stream" + query,
                                  headers={**client.headers, **headers}) as response:  # fmt: skip
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            text = line.decode().rstrip("\n")
            if not text:
                if "id" in fields:
                    out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                    if len(out) == count:
                        return out
                fields = {}
            elif not text.startswith(":"):
                key, _, value = text.partition(": ")
                fields[key] = value
    return out


async def test_the_event_stream_resumes_after_last_event_id_without_loss_or_repeats(client, api):
    await seed(client)  # token + 3 events
    first = await asyncio.wait_for(_sse(client, {}, 3), 10)
    assert [p for p, _t, _d in first] == [1, 2, 3]
    for n in range(5):
        await client.call("PUT", f"{EXP}/jobs/j{n}", JOB)
    head = (await api.store.head()).position
    rest = await asyncio.wait_for(_sse(client, {"Last-Event-ID": "3"}, head - 3), 10)
    assert [p for p, _t, _d in rest] == list(range(4, head + 1))
    _status, listed = await client.call("GET", f"/v1/events?after=3&top={len(rest)}")
    assert [(e["position"], e["type"]) for e in listed["value"]] == [(p, t) for p, t, _ in rest]


async def test_one_streams_events_are_paged_in_order_up_to_the_first_pages_head(client, api):
    for n in range(5):  # job-paged's events between other streams'
        await api.store.append("job-paged", [NewEvent("JobStarted", {"jobId": "paged"})], n)
        await api.store.append(f"job-o{n}", [NewEvent("JobStarted", {"jobId": f"o{n}"})], 0)
    mine = [e.position for e in await api.store.read_stream("job-paged")]
    _status, page = await client.call("GET", "/v1/events?stream=job-paged&top=2")
    listed, version = [e["position"] for e in page["value"]], len(mine)
    while page["nextLink"]:
        await api.store.append("job-paged", [NewEvent("JobStarted", {"jobId": "paged"})],
                               version)  # (later: not in this listing)  # fmt: skip
        version += 1
        status, page = await client.call("GET", page["nextLink"])
        assert status == 200, page
        assert all(e["stream"] == "job-paged" for e in page["value"])
        listed += [e["position"] for e in page["value"]]
    assert listed == mine
    end = (await api.store.read_stream("job-paged"))[-1].position
    status, past = await client.call("GET", f"/v1/events?stream=job-paged&after={end}")
    assert status == 200 and past["value"] == []  # (after its end: empty, not missing)
    status, body = await client.call("GET", "/v1/events?stream=job-o9")
    assert status == 404 and "no stream 'job-o9'" in body["error"]["message"]


async def test_a_paged_event_listing_ends_at_the_head_its_first_page_found(client, api):
    """As offline export does: a log growing while it is paged through does not keep the
    listing going (the pages after the first carry the head as `through`)."""
    await seed(client)
    for n in range(3):
        await client.call("PUT", f"{EXP}/jobs/j{n}", JOB)
    head = (await api.store.head()).position
    _status, page = await client.call("GET", "/v1/events?top=2")
    listed = [e["position"] for e in page["value"]]
    through = int(yarl.URL(page["nextLink"]).query["through"])
    while page["nextLink"]:
        await client.call("PUT", f"{EXP}/jobs/late{len(listed)}", JOB)  # the log grows
        status, page = await client.call("GET", page["nextLink"])
        assert status == 200, page
        listed += [e["position"] for e in page["value"]]
    assert through >= head  # (the planner may have logged pending reasons meanwhile)
    assert listed == list(range(1, through + 1))
    assert (await api.store.head()).position > through


async def test_the_event_stream_sends_only_the_types_asked_for(client, api):
    await seed(client)
    for n in range(3):
        await client.call("PUT", f"{EXP}/jobs/j{n}", JOB)
    submitted = await asyncio.wait_for(_sse(client, {}, 3, "?type=JobSubmitted"), 10)
    assert [t for _p, t, _d in submitted] == ["JobSubmitted"] * 3
    assert [d["data"]["name"] for _p, _t, d in submitted] == ["j0", "j1", "j2"]
    for wrong in ("?type=JobExploded", "?type=,"):
        async with client.session.get(client.url + "/v1/events/stream" + wrong,
                                      headers=client.headers) as response:  # fmt: skip
            assert response.status == 400
            assert (await response.json())["error"]["details"][0]["name"] == "type"


async def test_output_files_are_listed_and_read_by_range_as_they_grow(client, api):
    await seed(client)
    await client.call("PUT", f"{EXP}/jobs/train", JOB)
    for path in ("files", "files/stdout.txt"):
        status, answer = await client.call("GET", f"{EXP}/jobs/train/{path}")
        assert (status, answer["error"]["message"]) == (
            404, "job 'train' has not started yet: it has no output")  # fmt: skip
    await client.call("PUT", f"{EXP}/jobs/never", JOB)
    await client.call("POST", f"{EXP}/jobs/never/terminate")
    status, answer = await client.call("GET", f"{EXP}/jobs/never/files/stdout.txt?follow=true")
    assert (status, answer["error"]["message"]) == (
        404, "job 'never' never ran: it has no output")  # fmt: skip
    job_id = api.models.models.job_ids["ws/exp/train"][-1]
    await api.store.append(f"job-{job_id}", [
        NewEvent("JobScheduled", {"jobId": job_id, "attempt": 1,
                                  "tasks": [{"node": "n1", "gpus": [0, 1, 2, 3]}]}),
        NewEvent("JobStarted", {"jobId": job_id, "attempt": 1}),
    ])  # fmt: skip
    out = api.state_dir / "mounts/logs/ws/exp/train/1/stdouterr"
    out.mkdir(parents=True)
    (out / "stdout.txt").write_bytes(b"epoch 1\n")
    status, listed = await client.call("GET", f"{EXP}/jobs/train/files?outputdirectoryid=stdouterr")
    assert status == 200
    assert [(f["name"], f["contentLength"]) for f in listed["value"]] == [("stdout.txt", 8)]
    link = listed["value"][0]["downloadUrl"]
    start = {**client.headers, "Range": "bytes=0-4"}
    async with client.session.get(client.url + link, headers=start) as r:
        assert (r.status, await r.read()) == (206, b"epoch")
    with (out / "stdout.txt").open("ab") as handle:
        handle.write(b"epoch 2\n")
    rest = {**client.headers, "Range": "bytes=8-"}
    async with client.session.get(client.url + link, headers=rest) as r:
        assert (r.status, await r.read()) == (206, b"epoch 2\n")
        etag = r.headers["ETag"]
    unchanged = {**client.headers, "If-None-Match": etag}
    async with client.session.get(client.url + link, headers=unchanged) as r:
        assert (r.status, await r.read()) == (304, b"")  # a cache's copy is current
    stale = {**rest, "If-Range": '"an-older-version"'}
    async with client.session.get(client.url + link, headers=stale) as r:
        assert (r.status, await r.read()) == (200, b"epoch 1\nepoch 2\n")  # all of it, anew
    async with client.session.get(client.url + link, headers={**rest, "If-Range": etag}) as r:
        assert (r.status, await r.read()) == (206, b"epoch 2\n")

    async def finish():
        await asyncio.sleep(0.5)
        with (out / "stdout.txt").open("ab") as handle:
            handle.write(b"done\n")
        await api.store.append(
            f"job-{job_id}",
            [NewEvent("JobSucceeded", {"jobId": job_id, "attempt": 1, "exitCode": 0})],
        )

    finishing = asyncio.create_task(finish())
    async with client.session.get(client.url + f"{EXP}/jobs/train/files/stdout.txt?follow=true",
                                  headers=client.headers) as r:  # fmt: skip
        body = await asyncio.wait_for(r.read(), 10)
    await finishing
    assert body == b"epoch 1\nepoch 2\ndone\n"  # everything, and the stream ended with the job


async def test_replay_over_the_api_shows_a_past_moment(client):
    await seed(client)
    status, job = await client.call("PUT", f"{EXP}/jobs/train", JOB)
    status, world = await client.call("GET", f"/v1/replay?position={job['position'] - 1}")
    assert status == 200 and world["jobs"] == []
    status, world = await client.call("GET", f"/v1/replay?position={job['position']}")
    assert [j["name"] for j in world["jobs"]] == ["train"]
    status, error = await client.call("GET", "/v1/replay?at=yesterday")
    assert status == 400 and error["error"]["details"][0]["name"] == "at"


async def test_a_periodic_job_under_way_when_the_daemon_stops_ends_before_the_log_closes(
    tmp_path, monkeypatch, caplog
):
    """(the check of the leader lock, a snapshot being saved...) The stop waits for it: it
    ends having used the log, before the log closes, and nothing is logged as failed (it
    was cancelled mid-way, and the scheduler logged that with a traceback)."""
    monkeypatch.setattr(daemon_module, "LEAD_CHECK", 0.2)
    under_way, ended = asyncio.Event(), []

    async def slow_check(self) -> None:
        under_way.set()
        await asyncio.sleep(1)  # still under way as the stop begins
        ended.append((await self.store.head()).position)  # the log is still open

    monkeypatch.setattr(Daemon, "_keep_lead", slow_check)
    daemon = await start_daemon(tmp_path / "state")
    try:
        await asyncio.wait_for(under_way.wait(), 10)
    finally:
        with info_logs() as logs:
            await daemon.stop()
    assert len(ended) == 1 and ended[0] > 0
    assert not [line for line in logs if line["event"] == "daemon.periodic_failed"], logs
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("apscheduler")]


async def test_a_periodic_job_that_finds_the_log_away_says_so_in_a_warning(tmp_path, monkeypatch):
    """(PostgreSQL restarting) Not an error with a traceback every 5 s: the log being away
    is expected, and said once a try, in a line."""
    monkeypatch.setattr(daemon_module, "LEAD_CHECK", 0.2)
    tried = asyncio.Event()

    async def away(self) -> None:
        tried.set()
        raise errors.StoreUnavailable("log postgresql://batchd@db/batchd unreachable")

    monkeypatch.setattr(Daemon, "_keep_lead", away)
    daemon = await start_daemon(tmp_path / "state")
    try:
        with info_logs() as logs:
            await asyncio.wait_for(tried.wait(), 10)
            await asyncio.sleep(0.1)
    finally:
        await daemon.stop()
    said = [line for line in logs if line["event"].startswith("daemon.periodic")]
    assert said and {line["event"] for line in said} == {"daemon.periodic_store_unavailable"}
    assert said[0]["log_level"] == "warning" and "unreachable" in said[0]["error"]


async def test_a_leader_unsure_of_its_lock_turns_its_agents_away_and_one_that_lost_it_stops(
    tmp_path, monkeypatch
):
    """(its PostgreSQL cut off, and a standby that reaches it may take the log over) While
    the leader cannot confirm its lock for LEAD_GRACE past a check, its agent channel answers
    503: their leases run out and their tasks stop, rather than run on beside the copies the
    new leader starts. Confirmed again, it serves them; should it find another daemon holding
    the lock, it stops at once, as a fenced daemon does (exit 3), without waiting for an
    append to be fenced."""
    monkeypatch.setattr(daemon_module, "LEAD_CHECK", 0.1)
    monkeypatch.setattr(daemon_module, "LEAD_GRACE", 0.3)
    daemon = await start_daemon(tmp_path / "state")
    held: list[bool | None] = [True]

    async def lock() -> bool:
        if held[0] is None:
            raise errors.StoreUnavailable("log postgresql://batchd@db/batchd unreachable")
        return held[0]

    monkeypatch.setattr(daemon.store, "try_lock_leader", lock)
    bearer = {"Authorization": f"Bearer {daemon.admin_token}"}
    async with aiohttp.ClientSession(headers=bearer) as session:
        made = await Client(session, daemon.url, daemon.admin_token).call(
            "POST", "/v1/tokens", {"name": "fleet", "role": "agent"})  # fmt: skip
        agent = {"Authorization": f"Bearer {made[1]['token']}",
                 "Content-Type": protocol.CONTENT_TYPE}  # fmt: skip
        join = protocol.pack([protocol.message("Register", "n1", 1, cluster="ws/none", gpus=1)])

        async def status() -> int:
            async with session.post(daemon.url + "/agent/v1/messages", data=join,
                                    headers=agent) as r:  # fmt: skip
                return r.status

        try:
            assert await status() == 400  # (no such cluster: heard, and answered)
            with info_logs() as logs:
                held[0] = None  # the database away
                await _within(5, lambda: not daemon._leading())
                assert await status() == 503
                held[0] = True
                await _within(5, daemon._leading)
                assert await status() == 400
            said = [line["event"] for line in logs if "leader_lock" in line["event"]]
            assert said == ["daemon.leader_lock_unconfirmed", "daemon.leader_lock_confirmed"]
            held[0] = False  # another daemon holds the lock now
            await asyncio.wait_for(daemon.stopping.wait(), 5)
            assert daemon.fenced_out
        finally:
            await daemon.stop()


async def _within(seconds: float, check) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_tls_with_a_self_signed_certificate(tmp_path):
    daemon = await start_daemon(tmp_path / "state", tls_self_signed=True)
    try:
        assert daemon.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(tmp_path / "state/tls/cert.pem"))
        async with aiohttp.ClientSession() as session:
            bearer = {"Authorization": f"Bearer {daemon.admin_token}"}
            async with session.get(daemon.url + "/v1/workspaces", ssl=trust, headers=bearer) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(daemon.url + "/healthz")  # not trusted without the cert
            plain = daemon.url.replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):
                await session.get(plain + "/healthz")
    finally:
        await daemon.stop()


async def _local_job_runs(daemon, state, trust: ssl.SSLContext) -> None:
    """The local agent registers with `daemon` (https) and a job runs on it to success."""
    nodes = daemon.models.models.nodes
    for _ in range(300):
        if "local-0" in nodes and nodes["local-0"].state == "ready":
            break
        await asyncio.sleep(0.1)
    else:
        log = (state / "nodes/local-0/agent.log").read_text()
        raise AssertionError(f"the local agent never joined: {log[-2000:]}")
    job = {"cluster": "local", "nodeCount": 1, "gpusPerNode": 1,
           "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
           "customToolkitSettings": {"commandLine": "echo hi"}}  # fmt: skip
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        client = Client(session, daemon.url, daemon.admin_token)
        status, made = await client.call(
            "PUT", "/v1/workspaces/default/experiments/default/jobs/hi", job
        )
        assert status == 201, made
    for _ in range(300):
        ran = newest_job(daemon.models.models, "hi")
        if ran.state in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.1)
    assert ran.state == "succeeded", ran.errors


async def test_local_agents_join_a_daemon_serving_its_self_signed_certificate(tmp_path):
    """The local agents check the daemon's certificate against the daemon's own (their
    --cacert), as a remote agent given it does: they register, and jobs run."""
    state = tmp_path / "state"
    daemon = await start_daemon(state, tls_self_signed=True, local_nodes=1)
    try:
        trust = ssl.create_default_context(cafile=str(state / "tls/cert.pem"))
        await _local_job_runs(daemon, state, trust)
    finally:
        await daemon.stop()


def _issue(directory, name: str, issuer=None, ca: bool = False):
    """A certificate for `name` (a CA's if `ca`), signed by `issuer` ((certificate, key);
    None: self-signed), written to `directory`/`name`.pem with its key; (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    certificate = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return certificate, key


async def test_a_daemon_serving_plain_http_beyond_this_machine_warns(tmp_path):
    for listen, warned in (("127.0.0.1:0", False), ("0.0.0.0:0", True)):
        with info_logs() as logs:
            daemon = await start_daemon(tmp_path / listen.replace(":", "-"), listen=listen)
            await daemon.stop()
        said = [line for line in logs if line["event"] == "server.plaintext"]
        assert bool(said) == warned, listen
        assert not said or "serve TLS" in said[0]["said"]


async def test_a_daemon_says_when_its_token_or_keys_file_can_be_read_by_others(tmp_path):
    state = tmp_path / "state"
    daemon = await start_daemon(state)
    await daemon.stop()
    for name in ("admin.token", "secret.keys"):
        (state / name).chmod(0o644)
    with info_logs() as logs:
        daemon = await start_daemon(state)
        await daemon.stop()
    said = {line["path"] for line in logs if line["event"] == "state.readable_by_others"}
    assert said == {str(state / "admin.token"), str(state / "secret.keys")}


def test_a_passphrase_protected_tls_key_is_refused_in_one_line(tmp_path):
    """A daemon has nobody to type a passphrase: it says so rather than prompt (and, with
    no terminal, fail with "Invalid argument")."""
    _certificate, key = _issue(tmp_path, "locked.example.test")
    (tmp_path / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2")))  # fmt: skip
    done = batchd("serve", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
                  "--tls-cert", str(tmp_path / "locked.example.test.pem"),
                  "--tls-key", str(tmp_path / "locked.key"), stdin=subprocess.DEVNULL)  # fmt: skip
    assert_one_line_error(done, "is encrypted (protected by a passphrase)")


async def test_local_agents_join_a_daemon_serving_a_certificate_a_ca_issued(tmp_path):
    """An operator's certificate, issued through an intermediate CA for a name that is not
    the address the local agents reach the daemon at, served with its chain: they check it
    against that name (--tls-server-name), and jobs run. A client trusts the daemon given
    its root CA, its intermediate, its very certificate alone, or that with its chain; not
    given another CA, nor another certificate alone that the same CA issued."""
    root = _issue(tmp_path, "Example CA", ca=True)
    intermediate = _issue(tmp_path, "Example Intermediate", root, ca=True)
    _issue(tmp_path, "batchd.example.test", intermediate)
    _issue(tmp_path, "other.example.test", intermediate)
    _issue(tmp_path, "Other CA", ca=True)
    chain = tmp_path / "chain.pem"
    chain.write_bytes((tmp_path / "batchd.example.test.pem").read_bytes()
                      + (tmp_path / "Example Intermediate.pem").read_bytes())  # fmt: skip
    state = tmp_path / "state"
    daemon = await start_daemon(state, local_nodes=1, tls_cert=str(chain),
                                tls_key=str(tmp_path / "batchd.example.test.key"))  # fmt: skip
    try:
        trust = ssl_context(tmp_path / "Example CA.pem")
        trust.check_hostname = False  # the test reaches it at 127.0.0.1
        await _local_job_runs(daemon, state, trust)  # their --cacert: the chain file
        async with aiohttp.ClientSession() as session:
            trusts = (("Example CA", True), ("Example Intermediate", True),
                      ("batchd.example.test", True), ("chain", True),
                      ("Other CA", False), ("other.example.test", False))  # fmt: skip
            for cacert, trusted in trusts:
                context = ssl_context(tmp_path / f"{cacert}.pem")
                try:
                    async with session.get(
                        daemon.url + "/healthz", ssl=context, server_hostname="batchd.example.test"
                    ) as r:
                        assert r.status == 200 and trusted, cacert
                except aiohttp.ClientConnectorCertificateError:
                    assert not trusted, cacert
    finally:
        await daemon.stop()


async def test_a_cluster_put_is_the_same_only_for_the_same_document_as_it_stands(client, api):
    async def put(name: str, document: dict) -> int:
        """The PUT's status, once it is clear that it changed nothing (the cluster exists)."""
        path = f"/v1/workspaces/ws/clusters/{name}"
        head, before = (await api.store.head()).position, (await client.call("GET", path))[1]
        status, _answer = await client.call("PUT", path, document)
        assert (await api.store.head()).position == head  # nothing appended
        after = (await client.call("GET", path))[1]
        for key in ("vmSize", "scaleSettings", "nodeSetup"):  # the document as it stands
            assert after["properties"].get(key) == before["properties"].get(key), key
        return status

    await seed(client)
    spelled = {"properties": {**CLUSTER["properties"], "vmSize": "STANDARD_NC24S_V3"}}
    assert await put("gpu", spelled) == 200
    setup = {"setupTask": {"commandLine": "true", "stdOutErrPathPrefix": "/tmp"}}
    more = {"properties": {**CLUSTER["properties"], "nodeSetup": setup}}
    assert await put("gpu", more) == 409
    resize = {"scaleSettings": {"manual": {"targetNodeCount": 3}}}
    await client.call("PATCH", "/v1/workspaces/ws/clusters/gpu", resize)
    resized = {"properties": {**CLUSTER["properties"], **resize}}
    assert await put("gpu", resized) == 200
    assert await put("gpu", CLUSTER) == 409
    # a setup secret's value is not compared: a PUT cannot test guesses of it
    keyed = {"setupTask": {**setup["setupTask"], "secrets": [{"name": "K", "value": "right"}]}}
    made = {"properties": {**CLUSTER["properties"], "nodeSetup": keyed}}
    assert (await client.call("PUT", "/v1/workspaces/ws/clusters/keyed", made))[0] == 201
    keyed["setupTask"]["secrets"][0]["value"] = "wrong"
    assert await put("keyed", made) == 200


async def test_a_task_the_daemon_cannot_run_without_ending_stops_it(api):
    # an event the read models cannot use (a bug in what wrote it) ends their task
    await api.store.append("job-broken", [NewEvent("JobSubmitted", {"jobId": "broken"})])
    await asyncio.wait_for(api.stopping.wait(), 10)
    assert api.failed == ["read-models"]  # and `batchd serve` exits 1 (daemon.main)


async def test_a_daemon_another_writer_took_the_log_from_says_it_is_not_ready(client, api):
    async with aiohttp.ClientSession() as session, session.get(api.url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"
    other = await urls.open_store(api.cfg.store_url)
    try:
        await other.take_leadership()  # e.g. a second daemon on the same log
    finally:
        await other.close()
    async with aiohttp.ClientSession() as session, session.get(api.url + "/readyz") as r:
        body = await r.json()
        assert r.status == 503 and body["status"] == "fenced"
        assert body["logEpoch"] > body["epoch"]
    late = api.url + "/v1/workspaces/late"
    async with (
        aiohttp.ClientSession(headers=client.headers) as session,
        session.put(late, json={}) as r,
    ):
        error = await r.json()
        assert r.status == 503 and "taken over" in error["error"]["message"]  # nothing lands
        assert "Retry-After" not in r.headers  # sending it again would not help
    await asyncio.wait_for(api.stopping.wait(), 10)  # the fenced daemon stops
    assert api.fenced_out  # and `batchd serve` exits FENCED_EXIT (daemon.main)
    async with aiohttp.ClientSession() as session, session.get(api.url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["status"] == "fenced"  # while it stops


async def test_a_daemon_that_is_stopping_says_so_not_starting(tmp_path, monkeypatch):
    """However its stop began (a signal, a failed start), until its port closes."""
    daemon = await start_daemon(tmp_path / "state")
    stop_periodic, held, release = Daemon._stop_periodic, asyncio.Event(), asyncio.Event()

    async def slow(self) -> None:  # (the stop's first step: the API still answers)
        held.set()
        await release.wait()
        await stop_periodic(self)

    monkeypatch.setattr(Daemon, "_stop_periodic", slow)
    stopping = asyncio.create_task(daemon.stop())
    try:
        await asyncio.wait_for(held.wait(), 10)
        async with aiohttp.ClientSession() as session, session.get(daemon.url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "stopping"
    finally:
        release.set()
        await stopping


async def test_the_events_a_request_appends_carry_its_id(client, api):
    await seed(client)
    mine = uuid.uuid4()
    async with client.session.put(
        client.url + f"{EXP}/jobs/traced",
        json=JOB,
        headers={**client.headers, "X-Request-Id": str(mine)},
    ) as r:
        assert r.status == 201 and r.headers["X-Request-Id"] == str(mine)
    async with client.session.get(client.url + f"{EXP}/jobs/traced", headers={
            **client.headers, "X-Request-Id": "not a uuid"}) as r:  # fmt: skip
        assert uuid.UUID(r.headers["X-Request-Id"]) != mine  # one of its own
    for _ in range(100):  # the planner tells why it waits: its own decision, of no request
        events = await api.store.read_all(0, 1000)
        if any(e.type == "JobPendingReasonChanged" for e in events):
            break
        await asyncio.sleep(0.05)
    [submitted] = [e for e in events if e.type == "JobSubmitted"]
    assert submitted.correlation_id == mine
    assert {e.correlation_id for e in events if e.type == "JobPendingReasonChanged"} == {None}


async def test_exec_on_a_task_that_has_ended_says_so(client, api):
    await seed(client)
    await client.call("PUT", f"{EXP}/jobs/mpi", {**JOB, "nodeCount": 2})
    job_id = api.models.models.job_ids["ws/exp/mpi"][-1]
    positions = await api.store.append(f"job-{job_id}", [
        NewEvent("JobScheduled", {"jobId": job_id, "attempt": 1, "tasks": [
            {"node": "n1", "gpus": [0]}, {"node": "n2", "gpus": [0]}]}),
        NewEvent("JobStarted", {"jobId": job_id, "attempt": 1}),
        # a node that only hosts MPI ranks has no command of its own: it ends at once
        NewEvent("JobTaskExited", {"jobId": job_id, "attempt": 1, "task": 1, "exitCode": 0,
                                   "node": "n2"}),
    ])  # fmt: skip
    await api.models.wait_for(positions[-1])
    status, answer = await client.call("POST", f"{EXP}/jobs/mpi/exec",
                                       {"command": "nvidia-smi", "node": 1})  # fmt: skip
    assert status == 409
    message = answer["error"]["message"]
    assert "task 1 of job 'mpi' has ended (exit code 0)" in message and "task 0" in message
    for command, rule in (
        ("a\x00b", "must not contain NUL characters"),
        (["ps"], "must be a string, not"),
        ("  ", "must not be blank"),
    ):
        status, answer = await client.call("POST", f"{EXP}/jobs/mpi/exec", {"command": command})
        assert status == 400, answer  # refused before any agent is asked
        assert answer["error"]["details"][0]["name"] == "command"
        assert rule in answer["error"]["details"][0]["value"]


async def test_a_jobs_history_stays_readable_after_its_workspace_is_deleted(client, api):
    await seed(client)
    assert (await client.call("PUT", "/v1/workspaces/gone", {}))[0] == 201
    assert (await client.call("PUT", "/v1/workspaces/gone/experiments/e", {}))[0] == 201
    job = {**JOB, "cluster": "/workspaces/ws/clusters/gpu"}
    assert (await client.call("PUT", "/v1/workspaces/gone/experiments/e/jobs/old", job))[0] == 201
    for path in ("/v1/workspaces/gone/experiments/e", "/v1/workspaces/gone"):
        status, answer = await client.call("DELETE", path)
        assert status in (200, 202, 204), answer
    status, answer = await client.call("GET", "/v1/workspaces/gone/experiments/e/jobs/old/history")
    assert status == 200, answer
    [incarnation] = answer["value"]
    assert incarnation["timeline"][0]["event"] == "JobSubmitted"


async def test_until_its_read_models_are_restored_the_daemon_answers_503(tmp_path, monkeypatch):
    """Between binding its port and restoring its read models, a starting daemon would
    answer from empty ones (a job that exists: 404): it answers 503 instead, but /healthz."""
    restoring, go = asyncio.Event(), asyncio.Event()
    restore = Runner.restore

    async def slow_restore(self):
        restoring.set()
        await go.wait()
        return await restore(self)

    monkeypatch.setattr(Runner, "restore", slow_restore)
    daemon = Daemon(config.load(None, state=str(tmp_path / "state"), local_nodes=0,
                                listen="127.0.0.1:0"))  # fmt: skip
    starting = asyncio.create_task(daemon.start())
    try:
        await asyncio.wait_for(restoring.wait(), 30)
        async with aiohttp.ClientSession() as session:
            async with session.get(daemon.url + "/v1/workspaces") as r:
                body = await r.json()
                assert r.status == 503 and "starting" in body["error"]["message"]
                assert r.headers["Retry-After"] == "1"  # the CLI sends a PUT again
            async with session.get(daemon.url + "/healthz") as r:
                assert r.status == 200
            go.set()
            await asyncio.wait_for(starting, 30)
            headers = {"Authorization": f"Bearer {daemon.admin_token}"}
            async with session.get(daemon.url + "/v1/workspaces", headers=headers) as r:
                assert r.status == 200
    finally:
        go.set()
        await asyncio.gather(starting, return_exceptions=True)
        await daemon.stop()


async def test_a_log_that_refuses_appends_is_tried_again_ever_more_slowly(client, api, monkeypatch):
    """(its disk full, its database away) The planner keeps trying, without a warning every
    few milliseconds flooding the daemon's own log, and plans again once appends work."""
    await seed(client)
    real, refusing, tries = api._timed_plan, asyncio.Event(), []

    def timed_plan(models):
        if refusing.is_set():
            tries.append(models.position)
            raise errors.StoreUnavailable("log events.db: database or disk is full")
        return real(models)

    monkeypatch.setattr(api, "_timed_plan", timed_plan)
    refusing.set()
    with info_logs() as logs:
        assert (await client.call("PUT", f"{EXP}/jobs/waiting", JOB))[0] == 201
        await asyncio.sleep(2.0)
    warned = [line for line in logs if line["event"] == "planner.store_unavailable"]
    assert 2 <= len(tries) <= 10 and len(warned) == len(tries)  # not one every 20 ms: 100
    refusing.clear()
    for _ in range(100):  # the next try (at most 5 s later) plans the job that came meanwhile
        job = newest_job(api.models.models, "waiting", "ws", "exp")
        if job.pending_reason is not None:
            break
        await asyncio.sleep(0.1)
    assert job.pending_reason is not None
