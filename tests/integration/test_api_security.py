"""Who may do what through the API, and what never leaks: tokens, roles, workspace scopes,
agent credentials, paths out of a job's directory, oversized bodies, secrets and tokens in
responses, events and logs."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import os
import uuid
from pathlib import Path

import aiohttp
import multidict
import pytest
import structlog

from batchd.events.envelope import NewEvent
from batchd.events.secrets import Keyring
from batchd.scheduler import auth
from tests.integration.conftest import Client, make_token, settled
from tests.integration.test_api import CLUSTER, EXP, JOB, _sse, seed
from tests.logs import info_logs

SECRET = "hunter2-do-not-show"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def placed_with_output(admin: Client, api, name: str) -> Path:
    """Job `name` submitted and placed (attempt 1), with its empty stdouterr directory."""
    await admin.call("PUT", f"{EXP}/jobs/{name}", JOB)
    job_id = api.models.models.job_ids[f"ws/exp/{name}"][-1]
    tasks = [{"node": "n1", "gpus": [0]}]
    await api.store.append(f"job-{job_id}", [
        NewEvent("JobScheduled", {"jobId": job_id, "attempt": 1, "tasks": tasks})])  # fmt: skip
    out = api.state_dir / f"mounts/logs/ws/exp/{name}/1/stdouterr"
    out.mkdir(parents=True)
    return out


async def test_no_or_unknown_token_is_401(api, session):
    anonymous = Client(session, api.url, None)
    status, error = await anonymous.call("GET", "/v1/workspaces")
    assert status == 401 and error["error"]["code"] == "Unauthorized"
    status, _ = await Client(session, api.url, "bd_not-a-token").call("GET", "/v1/workspaces")
    assert status == 401
    assert (await anonymous.call("GET", "/healthz"))[0] == 200  # probes need no token
    # two Authorization headers (a proxy's and the client's): which to believe? Neither
    headers = multidict.CIMultiDict([("Authorization", f"Bearer {api.admin_token}"),
                                     ("Authorization", "Bearer bd_other")])  # fmt: skip
    for path in ("/v1/workspaces", "/agent/v1/messages"):
        async with session.post(api.url + path, headers=headers, data=b"") as r:
            said = await r.json()
            assert r.status == 400 and "one Authorization header" in said["error"]["message"]


async def test_roles_viewer_reads_operator_runs_jobs_admin_owns_clusters(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    viewer = Client(session, api.url, await make_token(admin, "vera", "viewer"))
    operator = Client(session, api.url, await make_token(admin, "otto", "operator"))
    assert (await viewer.call("GET", f"{EXP}/jobs"))[0] == 200
    status, error = await viewer.call("PUT", f"{EXP}/jobs/mine", JOB)
    assert status == 403 and "needs operator" in error["error"]["message"]
    status, job = await operator.call("PUT", f"{EXP}/jobs/mine", JOB)
    assert status == 201 and job["properties"]["owner"] == "otto"
    assert (await operator.call("POST", f"{EXP}/jobs/mine/terminate"))[0] == 202
    for method, body in (("PUT", CLUSTER), ("PATCH", {"scaleSettings": {}}), ("DELETE", None)):
        status, error = await operator.call(method, "/v1/workspaces/ws/clusters/gpu", body)
        assert status == 403 and "needs admin" in error["error"]["message"]
    assert (await operator.call("POST", "/v1/tokens", {"name": "x", "role": "admin"}))[0] == 403
    # the acting principal is in every event it caused
    events = await api.store.read_all(0, 1000)
    actors = {e.type: e.actor for e in events if e.type.startswith("Job")}
    assert actors["JobSubmitted"] == actors["JobTerminateRequested"] == "user:otto"


async def test_a_workspace_scoped_token_sees_only_its_workspaces(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    await admin.call("PUT", "/v1/workspaces/other", {})
    await admin.call("PUT", "/v1/workspaces/other/experiments/exp", {})
    await admin.call("PUT", "/v1/workspaces/other/clusters/gpu", CLUSTER)
    await admin.call("PUT", "/v1/workspaces/other/experiments/exp/jobs/theirs", JOB)
    await admin.call("PUT", f"{EXP}/jobs/ours", JOB)
    scoped = Client(
        session, api.url, await make_token(admin, "team", "operator", workspaces=["ws"])
    )
    status, listed = await scoped.call("GET", "/v1/workspaces")
    assert [w["name"] for w in listed["value"]] == ["ws"]
    status, listed = await scoped.call("GET", "/v1/jobs")
    assert [j["name"] for j in listed["value"]] == ["ours"]
    for path in ("/v1/workspaces/other", "/v1/workspaces/other/experiments/exp/jobs/theirs",
                 "/v1/workspaces/other/clusters"):  # fmt: skip
        status, error = await scoped.call("GET", path)
        assert status == 403 and "limited to workspaces ws" in error["error"]["message"]
    for path in ("/v1/events", "/v1/replay?position=1", "/v1/events/stream"):
        assert (await scoped.call("GET", path))[0] == 403  # the whole log spans workspaces


async def test_a_scoped_token_cannot_tell_other_workspaces_clusters_nodes_or_jobs(api, session):
    """Asking after a cluster or node of a workspace it may not see is answered as for one
    that does not exist, and a node of its own running another workspace's job does not
    name that job."""
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    await admin.call("PUT", "/v1/workspaces/other", {})
    await admin.call("PUT", "/v1/workspaces/other/experiments/exp", {})
    await admin.call("PUT", "/v1/workspaces/other/clusters/hidden", CLUSTER)
    borrowed = {**JOB, "cluster": "/workspaces/ws/clusters/gpu"}  # an admin may
    assert (await admin.call("PUT", "/v1/workspaces/other/experiments/exp/jobs/secret-x",
                             borrowed))[0] == 201  # fmt: skip
    m = api.models.models
    job_id = m.job_ids["other/exp/secret-x"][-1]
    for node, cluster in (("n-ours", "ws/gpu"), ("n-theirs", "other/hidden")):
        data = {
            "nodeId": node,
            "cluster": m.cluster_ids[cluster],
            "gpus": 4,
            "runtimes": ["docker"],
        }
        await api.store.append(f"node-{node}", [NewEvent("NodeRegistered", data)])
    await api.store.append(f"job-{job_id}", [NewEvent("JobScheduled", {
        "jobId": job_id, "attempt": 1, "tasks": [{"node": "n-ours", "gpus": [0]}]})])  # fmt: skip
    await settled(api)
    scoped = Client(session, api.url, await make_token(admin, "team", "viewer", workspaces=["ws"]))
    for there, nowhere in (("/v1/jobs?cluster=hidden", "/v1/jobs?cluster=nowhere"),
                           ("/v1/nodes?cluster=other/hidden", "/v1/nodes?cluster=other/nowhere"),
                           ("/v1/nodes/n-theirs", "/v1/nodes/n-nowhere")):  # fmt: skip
        status, error = await scoped.call("GET", there)
        unknown = await scoped.call("GET", nowhere)
        assert status == unknown[0] and status in (400, 404), (there, error)
        said = error["error"]["message"]
        assert said == unknown[1]["error"]["message"].replace("nowhere", "hidden").replace(
            "n-hidden", "n-theirs"), (said, unknown)  # fmt: skip
    status, nodes = await scoped.call("GET", "/v1/nodes")
    assert [n["name"] for n in nodes["value"]] == ["n-ours"]
    [held] = nodes["value"][0]["properties"]["allocations"]
    assert held["gpu"] == 0 and held["job"] is None and held["jobName"] is None
    assert "secret-x" not in json.dumps(nodes) and job_id not in json.dumps(nodes)
    status, node = await admin.call("GET", "/v1/nodes/n-ours")  # an unscoped token sees it
    assert node["properties"]["allocations"][0]["jobName"] == "secret-x"


async def test_an_agent_credential_cannot_use_the_user_api(api, session):
    agent_token = auth.new_token()
    await api.control.run(
        lambda m: auth.create_token(m, "node-1", "agent", [], agent_token, "batchd:serve"),
        structural=True,
    )
    agent = Client(session, api.url, agent_token)
    for method, path in (("GET", "/v1/workspaces"), ("PUT", "/v1/workspaces/x"),
                         ("GET", "/v1/events")):  # fmt: skip
        status, error = await agent.call(method, path, {})
        assert status == 403 and "agent" in error["error"]["message"]


async def test_agent_tokens_can_be_bound_to_one_node(api, session):
    admin = Client(session, api.url, api.admin_token)
    body = {"name": "gpu-7", "role": "agent", "node": "gpu-7.cluster.internal"}
    status, made = await admin.call("POST", "/v1/tokens", body)
    assert status == 201 and made["node"] == "gpu-7.cluster.internal"
    listed = (await admin.call("GET", "/v1/tokens"))[1]["value"]
    assert [t.get("node") for t in listed if t["name"] == "gpu-7"] == ["gpu-7.cluster.internal"]
    for bad, rule in (({"name": "v", "role": "viewer", "node": "n"}, "role agent only"),
                      ({"name": "a", "role": "agent", "node": "no spaces"}, "node id"),
                      ({"name": "a", "role": "agent", "node": 7}, "node id")):  # fmt: skip
        status, error = await admin.call("POST", "/v1/tokens", bad)
        assert status == 400 and error["error"]["details"][0]["name"] == "node", error
        assert rule in error["error"]["message"]


async def test_a_workspace_goes_only_once_no_token_is_limited_to_it(api, session):
    """A token limited to a deleted workspace would reach a workspace made later under its
    name: the deletion waits until such tokens are revoked."""
    admin = Client(session, api.url, api.admin_token)
    for ws in ("gone", "kept"):
        assert (await admin.call("PUT", f"/v1/workspaces/{ws}", {}))[0] == 201
    await make_token(admin, "a", "operator", workspaces=["gone"])
    await make_token(admin, "b", "agent", workspaces=["gone", "kept"])
    status, error = await admin.call("DELETE", "/v1/workspaces/gone")
    assert status == 409
    assert error["error"]["message"].startswith("tokens 'a', 'b' are limited to workspace 'gone'")
    _status, listed = await admin.call("GET", "/v1/tokens")
    for token in listed["value"]:
        if token["name"] in ("a", "b"):
            assert (await admin.call("DELETE", f"/v1/tokens/{token['id']}"))[0] == 202
    assert (await admin.call("DELETE", "/v1/workspaces/gone"))[0] == 202
    assert (await admin.call("PUT", "/v1/workspaces/gone", {}))[0] == 201


async def test_a_token_whose_workspaces_are_empty_or_not_a_list_is_refused(api, session):
    """An empty or mistyped `workspaces` (a script's empty variable) is refused, naming the
    field, rather than make a token of every workspace; left out, it does make one."""
    admin = Client(session, api.url, api.admin_token)
    for value, words in (([], "at least one"), ("", "a list"), ({}, "a list"), (0, "a list"),
                         (False, "a list"), (None, "a list"), (["ws", 1], "a list")):  # fmt: skip
        body = {"name": "ci", "role": "operator", "workspaces": value}
        status, error = await admin.call("POST", "/v1/tokens", body)
        assert status == 400 and error["error"]["details"][0]["name"] == "workspaces", value
        assert words in error["error"]["message"]
    listed = (await admin.call("GET", "/v1/tokens"))[1]["value"]
    assert all(t["name"] != "ci" for t in listed)  # nothing was made
    status, made = await admin.call("POST", "/v1/tokens", {"name": "ci", "role": "operator"})
    assert status == 201 and made["workspaces"] == []


async def test_file_paths_cannot_leave_the_jobs_directory(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    out = await placed_with_output(admin, api, "train")
    (out / "stdout.txt").write_text("fine\n")
    (api.state_dir / "mounts/logs/ws/exp/train/1/elsewhere.txt").write_text("OUTSIDE-CONTENT\n")
    (out / "link").symlink_to(api.state_dir / "admin.token")
    base = api.url + f"{EXP}/jobs/train/files"
    attempts = [
        "/../elsewhere.txt",
        "/%2e%2e/elsewhere.txt",
        "/..%2Felsewhere.txt",
        "/%2e%2e%2f%2e%2e%2fadmin.token",
        "/%2Fetc%2Fpasswd",
        "//etc/passwd",
        "/link",
        "?directory=..",
        "?directory=%2e%2e",
        "?directory=/etc",
        "?directory=link/..",
    ]
    for attempt in attempts:
        async with session.get(base + attempt, headers=admin.headers) as r:
            text = await r.text()
            assert r.status in (400, 404), (attempt, r.status, text)
            assert "OUTSIDE-CONTENT" not in text and "root:" not in text
            assert api.admin_token not in text
    async with session.get(base + "/stdout.txt", headers=admin.headers) as r:
        assert (r.status, await r.text()) == (200, "fine\n")


async def test_bodies_over_one_mebibyte_are_refused(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    huge = json.dumps({**JOB, "padding": "x" * (1024 * 1024)}).encode()
    status, error = await admin.call("PUT", f"{EXP}/jobs/big", raw=io.BytesIO(huge),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 413 and error["error"]["code"] == "PayloadTooLarge"
    assert "ws/exp/big" not in api.models.models.job_ids


async def test_bad_documents_get_400_naming_the_field_and_nothing_is_stored(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    await settled(api)
    head = (await api.store.head()).position
    cases = [
        (b"{not json", "body", "not valid JSON"),
        (b'{"nodeCount": ' + b"9" * 5000 + b"}", "body", "a number of 5000 digits"),
        (b'{"nodeCount": 1, "nodeCount": 2}', "nodeCount", "given twice"),  # not the last wins
        (
            b'{"properties": {"inputDirectories": [{"id": "A", "path": "/a"}, {"id": "B", '
            b'"path": "/b", "id": "C"}]}}',
            "properties.inputDirectories[1].id",
            "given twice",
        ),
        (json.dumps({**JOB, "nodeCount": "two"}), "nodeCount", "whole number"),
        (json.dumps({**JOB, "nodeCount": 100}), "nodeCount", "can hold"),
        (json.dumps({**JOB, "colour": "red"}), "colour", "not a known property"),
        (json.dumps({**JOB, "cluster": "nope"}), "cluster", "no cluster 'nope'"),
        (
            json.dumps({**JOB, "constraints": {"maxWallClockTime": "-01:00:00"}}),
            "constraints.maxWallClockTime",
            "negative",
        ),
        (
            json.dumps({"properties": {**JOB, "schedulingPriority": "urgent"}}),
            "properties.schedulingPriority",
            "one of low, normal, high",
        ),
        (  # JSON can escape a lone surrogate, which no UTF-8 (and no log) can hold
            json.dumps({**JOB, "customToolkitSettings": {"commandLine": "echo \ud800"}}),
            "customToolkitSettings.commandLine",
            "valid UTF-8 text",
        ),
    ]
    for body, path, problem in cases:
        status, error = await admin.call("PUT", f"{EXP}/jobs/bad", raw=body)
        assert status == 400, (body, error)
        detail = error["error"]["details"][0]
        assert detail["name"] == path and problem in detail["value"], (path, error)
    for path, field in (
        (f"{EXP}/jobs/%C3%BCn", "job name"),
        (f"{EXP}/jobs/a%20b", "job name"),
        ("/v1/workspaces/ws/clusters/" + "c" * 65, "cluster name"),
        ("/v1/workspaces/w.x/experiments/e", "workspace name"),
        ("/v1/workspaces/ws/experiments/.e/jobs/j", "experiment name"),
    ):
        status, error = await admin.call("PUT", path, JOB)  # no such name can ever exist
        assert status == 400 and error["error"]["details"][0]["name"] == field, (path, error)
    status, error = await admin.call("GET", "/v1/nodes/..%2Fx")
    assert status == 404 and "no node" in error["error"]["message"]
    several = {**JOB, "nodeCount": "two", "colour": "red", "gpusPerNode": -1}
    status, error = await admin.call("PUT", f"{EXP}/jobs/bad", several)
    assert status == 400
    assert {d["name"]: d["value"] for d in error["error"]["details"]} == {
        "nodeCount": "must be a whole number, not a string",
        "colour": "is not a known property",
        "gpusPerNode": "must be at least 0",
    }  # every problem, each by its field
    for path in ("/v1/workspaces/w2", "/v1/workspaces/ws/experiments/e2"):
        for properties in (False, 0, "", [], "x"):  # none of them the {} a workspace has
            status, error = await admin.call("PUT", path, {"properties": properties})
            assert status == 400, (path, properties, error)
            assert error["error"]["details"][0]["name"] == "properties", error
    typo = {"name": "team", "role": "operator", "workspaces": ["ws", "sw"]}
    status, error = await admin.call("POST", "/v1/tokens", typo)  # a token that could use none
    assert status == 400 and error["error"]["details"] == [
        {"name": "workspaces[1]", "value": "no workspace 'sw': create it first"}
    ], error
    assert (await api.store.head()).position == head


async def test_secrets_and_tokens_never_show_in_answers_events_or_logs(api, session):
    admin = Client(session, api.url, api.admin_token)
    with structlog.testing.capture_logs() as logs:
        await seed(admin)
        secret_job = {**JOB, "secrets": [{"name": "WANDB_KEY", "value": SECRET}]}
        status, job = await admin.call("PUT", f"{EXP}/jobs/train", secret_job)
        assert status == 201
        viewer_token = await make_token(admin, "vera", "viewer")
        answers = [json.dumps(job)]
        for path in (f"{EXP}/jobs/train", f"{EXP}/jobs", "/v1/jobs", f"{EXP}/jobs/train/history",
                     "/v1/events?top=1000", "/v1/replay?position=100", "/v1/tokens"):  # fmt: skip
            status, document = await admin.call("GET", path)
            answers.append(json.dumps(document))
        head = (await api.store.head()).position
        streamed = await asyncio.wait_for(_sse(admin, {}, head), 10)
        answers.append(json.dumps(streamed))
        await admin.call("PUT", f"{EXP}/jobs/train", {**secret_job, "nodeCount": 2})  # a 409
    assert '"value": "***"' in answers[0]
    logged = repr(logs)
    for text in [*answers, logged]:
        assert SECRET not in text
        assert api.admin_token not in text and viewer_token not in text
    # stored sealed: not even the log's bytes hold it
    database = (api.state_dir / "events.db").read_bytes()
    assert SECRET.encode() not in database and api.admin_token.encode() not in database


async def test_a_secret_the_daemons_keys_cannot_open_is_named_not_a_bare_500(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    secret_job = {**JOB, "secrets": [{"name": "WANDB_KEY", "value": SECRET}]}
    assert (await admin.call("PUT", f"{EXP}/jobs/sealed", secret_job))[0] == 201
    keyring = api.api.keyring
    api.api.keyring = Keyring.generate()  # another key under the same id
    try:
        status, error = await admin.call("PUT", f"{EXP}/jobs/sealed", secret_job)
    finally:
        api.api.keyring = keyring
    assert status == 500
    message = error["error"]["message"]
    assert "fails to open" in message and "secret keys are not those the log was written" in message
    assert SECRET not in json.dumps(error)


async def test_a_secret_with_no_key_to_seal_it_is_refused_saying_so(api, session):
    """Not said to be a mismatch of keys: there are none."""
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    codec = api.api.store.codec
    keyring, codec.keyring = codec.keyring, None
    try:
        secret_job = {**JOB, "secrets": [{"name": "WANDB_KEY", "value": SECRET}]}
        status, error = await admin.call("PUT", f"{EXP}/jobs/unsealed", secret_job)
    finally:
        codec.keyring = keyring
    assert status == 500
    message = error["error"]["message"]
    assert "holds a secret but no secret key is set" in message
    assert "not those the log was written" not in message and SECRET not in json.dumps(error)
    assert (await admin.call("GET", f"{EXP}/jobs/unsealed"))[0] == 404  # nothing stored


async def test_output_paths_cannot_be_steered_out_of_the_storage(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    for field, value in (
        ("pathSuffix", "../../../../.."),
        ("pathPrefix", "$AZ_BATCHAI_MOUNT_ROOT/../.."),
    ):
        output = {"id": "X", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/out", field: value}
        status, error = await admin.call(
            "PUT", f"{EXP}/jobs/evil", {**JOB, "outputDirectories": [output]}
        )
        assert status == 400 and error["error"]["details"][0]["value"] == "must not contain '..'"
    # a job whose output directory is a link to elsewhere (as a job could make it) is refused
    out = await placed_with_output(admin, api, "linked")
    out.rmdir()
    out.symlink_to(api.state_dir)
    for path in ("/files", "/files/admin.token"):
        status, answer = await admin.call("GET", f"{EXP}/jobs/linked{path}")
        assert status == 400 and "link" in answer["error"]["message"]
    # an absolute prefix off the daemon's storage is not served
    await admin.call("PUT", f"{EXP}/jobs/abs", {**JOB, "stdOutErrPathPrefix": str(api.state_dir)})
    status, _ = await admin.call("GET", f"{EXP}/jobs/abs/files/admin.token")
    assert status == 404


async def test_every_listed_file_can_be_fetched_by_its_download_url(api, session):
    """A name with a line break is served; one that is not UTF-8 (no URL can name it, and
    its link would name another file) is not listed."""
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    out = await placed_with_output(admin, api, "odd")
    (out / "new\nline").write_text("broken\n")
    (out / "bad").write_text("the other file\n")
    with open(os.fsencode(out) + b"/bad\xff", "w") as handle:
        handle.write("latin-1\n")
    _status, listed = await admin.call("GET", f"{EXP}/jobs/odd/files")
    assert sorted(f["name"] for f in listed["value"]) == ["bad", "new\nline"]
    for entry in listed["value"]:
        async with session.get(api.url + entry["downloadUrl"], headers=admin.headers) as r:
            assert r.status == 200, entry
            assert await r.text() == ("broken\n" if entry["name"] == "new\nline"
                                      else "the other file\n")  # fmt: skip


async def test_scoped_tokens_cannot_mint_tokens_or_use_other_workspaces_clusters(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    await admin.call("PUT", "/v1/workspaces/other", {})
    await admin.call("PUT", "/v1/workspaces/other/clusters/theirs", CLUSTER)
    scoped_admin = Client(
        session, api.url, await make_token(admin, "ws-admin", "admin", workspaces=["ws"])
    )
    status, error = await scoped_admin.call("POST", "/v1/tokens", {"name": "up", "role": "admin"})
    assert status == 403 and "manage tokens" in error["error"]["message"]
    assert (await scoped_admin.call("GET", "/v1/tokens"))[0] == 403
    scoped = Client(
        session, api.url, await make_token(admin, "ws-op", "operator", workspaces=["ws"])
    )
    elsewhere = {**JOB, "cluster": "/workspaces/other/clusters/theirs"}
    status, error = await scoped.call("PUT", f"{EXP}/jobs/borrow", elsewhere)
    assert status == 403 and "limited to workspaces ws" in error["error"]["message"]
    status, _ = await admin.call("PUT", f"{EXP}/jobs/borrow", elsewhere)  # an admin may
    assert status == 201


async def test_odd_requests_get_4xx_in_the_error_shape(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    cases = [
        ("PUT", "/v1/workspaces/w%C3%A9", None, None, 400),  # names are ASCII
        ("PUT", f"{EXP}/jobs/deep", "[" * 100_000 + "]" * 100_000, None, 400),
        ("GET", "/v1/events?after=9223372036854775808", None, None, 400),
        ("GET", "/v1/events/stream", None, {"Last-Event-ID": "99999999999999999999"}, 400),
        ("GET", "/v1/events/stream", None, {"Last-Event-ID": "9" * 5000}, 400),
        ("GET", "/v1/events/stream", None, {"Last-Event-ID": "\u00b2"}, 400),  # a digit, not 0-9
        ("GET", "/v1/events/stream", None, {"Last-Event-ID": "\u0661\u0662"}, 400),
        ("GET", "/v1/events?after=1_000", None, None, 400),
        ("GET", "/v1/events?from=soon", None, None, 400),
        ("GET", "/v1/events?stream=job-nope", None, None, 404),
        ("GET", "/v1/events?top=" + "9" * 5000, None, None, 400),
        ("GET", "/v1/nowhere", None, None, 404),
        ("GET", "/v1/events?after=5&after=6", None, None, 400),  # which one?
        ("POST", "/v1/workspaces", None, None, 405),
    ]
    for method, path, raw, headers, expected in cases:
        status, answer = await admin.call(method, path, raw=raw, headers=headers)
        assert status == expected, (path, status, answer)
        assert isinstance(answer, dict) and "message" in answer["error"], (path, answer)
    async with session.post(f"{api.url}/v1/workspaces", headers=admin.headers) as answer:
        assert answer.status == 405 and "GET" in answer.headers["Allow"]  # what it has
    out = await placed_with_output(admin, api, "train")
    (out / "stdout.txt").write_text("0123456789")
    for header, follow, expected in (("bytes=-2", "true", 400), ("bytes=2-4", "true", 400),
                                     ("garbage", "true", 400), ("bytes=5-2", "false", 416),
                                     ("bytes=50-", "false", 416)):  # fmt: skip
        status, answer = await admin.call(
            "GET", f"{EXP}/jobs/train/files/stdout.txt?follow={follow}", headers={"Range": header}
        )
        assert status == expected and answer["error"]["message"], (header, answer)
        if expected == 400:  # a followed file grows: its part has no end
            assert answer["error"]["details"][0]["name"] == "Range", answer
    status, answer = await admin.call("GET", f"{EXP}/jobs/train/files/stdout.txt?follow=maybe")
    assert status == 400 and "follow: must be true or false" in answer["error"]["message"]


async def _raw(url: str, request: bytes) -> tuple[int, dict, bytes]:
    """Send `request` as it is; the answer's status, headers and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head, _, body = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    status_line, *fields = head.decode().split("\r\n")
    headers = dict(field.lower().split(": ", 1) for field in fields)
    return int(status_line.split()[1]), headers, body


async def test_requests_the_server_cannot_parse_get_400_in_the_error_shape_quoting_nothing(
    api, session, caplog
):
    token = api.admin_token
    padding = "x" * 9000
    requests = {  # what is sent -> what the answer says
        f"GET /v1/workspaces?q={padding} HTTP/1.1\r\nHost: a\r\n\r\n": "longer than 8190 bytes",
        f"GET /v1/workspaces HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token} {padding}"
        "\r\n\r\n": "longer than 8190 bytes",
        f"GET /v1/workspaces HTTP/1.1\r\nHost: a\r\nBad Name{token}: 1\r\n\r\n":
            "headers or framing are malformed",
        "GET /v1/workspaces HTTP/2.5\r\nHost: a\r\n\r\n": "request line is malformed",
        "GET /v1/\x00 HTTP/1.1\r\nHost: a\r\n\r\n": "URL is malformed",
        "BREW /v1/workspaces HTTP/1.1\r\nHost: a\r\n\r\n": "TLS sent to an http:// address?",
    }  # fmt: skip
    answered = []
    with info_logs() as logs:
        for request, message in requests.items():
            status, headers, body = await _raw(api.url, request.encode())
            assert status == 400, (request[:40], body)
            assert headers["content-type"].startswith("application/json"), (request[:40], headers)
            error = json.loads(body)["error"]
            assert error["code"] == "BadRequest" and message in error["message"], error
            assert token not in body.decode() and "xxxx" not in body.decode(), body
            answered.append(str(uuid.UUID(headers["x-request-id"])))
    said = [line for line in logs if line["event"] == "api.unparsable_request"]
    assert [line["log_level"] for line in said] == ["warning"] * 5, logs  # (not BREW: a first
    assert [line["request_id"] for line in said] == answered[:5]  # the id a client can quote
    assert len(set(answered)) == len(answered)
    assert token not in repr(logs) and "xxxx" not in repr(logs)  # request that is not HTTP)
    assert not [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    admin = Client(session, api.url, token)  # the server still answers the well-formed
    assert (await admin.call("GET", "/v1/workspaces"))[0] == 200


async def test_undecodable_tokens_and_bodies_get_4xx_not_a_500(api, session, caplog):
    """A header's bytes that are not UTF-8 (anyone can send them, with no token), a body not
    in the coding it names, a coding the server does not decode: answered 401, 400, 415,
    nothing stored, nothing logged as a fault."""
    admin = Client(session, api.url, api.admin_token)
    head = (await api.store.head()).position
    cases = [  # (what is sent, the status)
        (b"GET /v1/workspaces HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + token
         + b"\r\nConnection: close\r\n\r\n", 401)
        for token in (b"\xff", b"abc\xe9")
    ]  # fmt: skip
    for coding, status, body in (("gzip", 400, "{}"), ("deflate", 400, "{}"),
                                 ("gzip", 400, "not gzip"), ("foo", 415, "{}"),
                                 ("gzip, br", 415, "{}"), ("br", 415, "{}"),
                                 ("zstd", 415, "{}")):  # fmt: skip
        cases.append((
            f"PUT /v1/workspaces/w-{status} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            f"{api.admin_token}\r\nContent-Encoding: {coding}\r\nContent-Length: "
            f"{len(body)}\r\nConnection: close\r\n\r\n{body}".encode(), status,
        ))  # fmt: skip
    for query in ("", "?after=1&after=2"):  # a request with no token learns nothing more
        cases.append((
            f"PUT /v1/workspaces/w-anonymous{query} HTTP/1.1\r\nHost: a\r\nContent-Encoding: "
            "foo\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".encode(), 401,
        ))  # fmt: skip
    with info_logs() as logs:
        for request, expected in cases:
            status, headers, body = await _raw(api.url, request)
            assert status == expected, (request[-60:], body)
            assert headers["content-type"].startswith("application/json"), body
            assert json.loads(body)["error"]["message"], body
    assert not [line for line in logs if line["log_level"] == "error"], logs
    faults = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not faults  # (nor by aiohttp: the rest of an unreadable body is not read again)
    assert (await api.store.head()).position == head  # nothing stored
    assert (await admin.call("GET", "/v1/workspaces/w-400"))[0] == 404
    packed = gzip.compress(b"{}")
    status, _ = await admin.call("PUT", "/v1/workspaces/zipped", raw=packed,
                                 headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert status == 201  # a body in gzip is taken


async def test_an_event_stream_ends_when_its_token_is_revoked(api, session):
    """A revoked token's next request fails; its open stream ends there too, before
    anything that happened after the revocation."""
    admin = Client(session, api.url, api.admin_token)
    viewer = await make_token(admin, "dashboards", "viewer")
    _status, tokens = await admin.call("GET", "/v1/tokens")
    [token_id] = [t["id"] for t in tokens["value"] if t["name"] == "dashboards"]
    head = (await api.store.head()).position
    headers = {"Authorization": f"Bearer {viewer}"}
    async with session.get(f"{api.url}/v1/events/stream?after={head}", headers=headers) as r:
        assert r.status == 200
        reading = asyncio.ensure_future(r.read())
        assert (await admin.call("DELETE", f"/v1/tokens/{token_id}"))[0] in (200, 202, 204)
        await admin.call("PUT", "/v1/workspaces/after", {})
        body = await asyncio.wait_for(reading, 10)  # the stream ended
    assert b"WorkspaceCreated" not in body and b"TokenRevoked" not in body


async def test_a_followed_file_stream_is_broken_off_when_its_token_is_revoked(api, session):
    admin = Client(session, api.url, api.admin_token)
    await seed(admin)
    out = await placed_with_output(admin, api, "train")
    (out / "stdout.txt").write_text("first\n")
    viewer = await make_token(admin, "tail", "viewer")
    _status, tokens = await admin.call("GET", "/v1/tokens")
    [token_id] = [t["id"] for t in tokens["value"] if t["name"] == "tail"]
    headers = {"Authorization": f"Bearer {viewer}"}
    url = f"{api.url}{EXP}/jobs/train/files/stdout.txt?follow=true"
    async with session.get(url, headers=headers) as r:
        assert r.status == 200
        assert await r.content.readexactly(6) == b"first\n"
        assert (await admin.call("DELETE", f"/v1/tokens/{token_id}"))[0] in (200, 202, 204)
        with (out / "stdout.txt").open("a") as handle:
            handle.write("after the revocation\n")
        rest = b""
        with pytest.raises(aiohttp.ClientPayloadError):  # unfinished, not a clean end
            async with asyncio.timeout(10):
                while chunk := await r.content.readany():
                    rest += chunk
    assert b"after" not in rest
