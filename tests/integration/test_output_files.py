"""A job's output files over the API, on the daemon's storage and on the job's node: a job
that swaps its output for a link never gets the daemon to serve what the link leads to,
links are never listed as files, large files read whole, and Range requests answer alike
wherever the file lies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from batchd.scheduler import api as api_module
from batchd.scheduler import files
from tests.integration.conftest import Client, newest_job
from tests.integration.test_agents import EXP, _ended, _out, _run, _until

ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
SWAPPER = """
import os, sys
out, token, stop = sys.argv[1:]
os.makedirs(os.path.join(out, "tmp"), exist_ok=True)
link, plain = os.path.join(out, "tmp", "l"), os.path.join(out, "tmp", "f")
while not os.path.exists(stop):
    os.symlink(token, link)
    os.replace(link, os.path.join(out, "swap.txt"))
    with open(plain, "w") as handle:
        handle.write("plain\\n")
    os.replace(plain, os.path.join(out, "swap.txt"))
"""


def _where(daemon, tmp_path: Path, where: str) -> tuple[dict, Path]:
    """The job fields that put stdouterr on the daemon's storage or on the node's own disk,
    and the directory that holds the jobs' output there."""
    if where == "storage":
        return {}, daemon.state_dir / "mounts/logs/default/default"
    node_disk = tmp_path / "node-disk"
    return {"stdOutErrPathPrefix": str(node_disk)}, node_disk / "default/default"


async def _get(client: Client, path: str, **headers: str) -> tuple[int, bytes, dict]:
    async with client.session.get(client.url + f"{EXP}/jobs/{path}",
                                  headers={**client.headers, **headers}) as r:  # fmt: skip
        return r.status, await r.read(), dict(r.headers)


async def _ended_job_with(daemon, client, tmp_path, where: str, name: str) -> Path:
    """A job that has run and ended, and its stdouterr directory."""
    fields, base = _where(daemon, tmp_path, where)
    await _run(client, name, "echo hello", **fields)
    assert (await _ended(daemon, client, name))["properties"]["state"] == "succeeded"
    return base / f"{name}/1/stdouterr"


@pytest.mark.parametrize("where", ["storage", "node"])
async def test_a_job_swapping_its_output_for_a_link_never_gets_the_admin_token_served(
    local, tmp_path, where
):
    daemon, client = local
    token = daemon.state_dir / "admin.token"
    secret = token.read_bytes().strip()
    script, stop = tmp_path / "swap.py", tmp_path / "stop"
    script.write_text(SWAPPER)
    fields, base = _where(daemon, tmp_path, where)
    command = f'{sys.executable} {script} "$AZ_BATCHAI_STDOUTERR_DIR" {token} {stop}'
    await _run(client, "swapper", command, **fields)
    out = base / "swapper/1/stdouterr/swap.txt"
    await _until(lambda: os.path.lexists(out), 30)
    try:
        answers = await _read_swapped(client, secret)
    finally:
        stop.touch()
    assert not [answer for answer in answers if secret in answer[2]]
    link = b"leads through a link, outside the job's output directory"
    allowed = {"": (200, b"plain\n"), "bytes=0-": (206, b"plain\n"), "bytes=1-3": (206, b"lai")}
    for asked, status, body in answers:
        if asked == "follow":
            assert body in (b"", b"plain\n") or link in body, body
        else:
            assert (status, body) == allowed[asked] or (status == 400 and link in body), (
                asked, status, body)  # fmt: skip
    assert {status for _asked, status, _body in answers} >= {200, 206, 400}
    await _ended(daemon, client, "swapper")


async def _read_swapped(client: Client, secret: bytes) -> list[tuple[str, int, bytes]]:
    """(Range asked or "follow", status, body) of many reads of the swapped file; the first
    that shows the secret, or never ends, is the last."""
    answers: list[tuple[str, int, bytes]] = []
    asks = ["", "bytes=0-", "bytes=1-3"] * 150 + ["follow"] * 15
    for asked in asks:
        if asked == "follow":
            status, body = 0, await _followed_briefly(client, "swapper/files/swap.txt?follow=1")
        else:
            headers = {"Range": asked} if asked else {}
            try:
                status, body, _ = await asyncio.wait_for(
                    _get(client, "swapper/files/swap.txt", **headers), 5
                )
            except TimeoutError:  # (an answer that never ends is wrong too)
                status, body = 0, b"no answer"
        answers.append((asked, status, body))
        if secret in body or body == b"no answer":
            break
    return answers


async def _followed_briefly(client: Client, path: str) -> bytes:
    """What a follow of a file sends in its first moments (an answer that breaks off counts
    with what it sent)."""
    got, deadline = b"", time.monotonic() + 0.5
    try:
        async with (
            asyncio.timeout(5),
            client.session.get(client.url + f"{EXP}/jobs/{path}", headers=client.headers) as r,
        ):
            while time.monotonic() < deadline:
                got += await asyncio.wait_for(r.content.readany(), 0.3)
    except (TimeoutError, aiohttp.ClientPayloadError):
        pass
    return got


@pytest.mark.parametrize("where", ["storage", "node"])
async def test_links_in_the_output_directory_are_not_listed_and_not_followed(
    local, tmp_path, where
):
    daemon, client = local
    out = await _ended_job_with(daemon, client, tmp_path, where, "linky")
    (out / "dangling").symlink_to(tmp_path / "nothing-here")
    (out / "secret").symlink_to(daemon.state_dir / "admin.token")
    (out / "elsewhere").symlink_to(daemon.state_dir)
    status, listed = await client.call("GET", f"{EXP}/jobs/linky/files")
    assert status == 200, listed
    assert sorted(f["name"] for f in listed["value"]) == ["stderr.txt", "stdout.txt"]
    for path in ("dangling", "secret", "elsewhere/admin.token"):
        status, answer = await client.call("GET", f"{EXP}/jobs/linky/files/{path}")
        assert status == 400 and "leads through a link" in answer["error"]["message"], answer
    status, answer = await client.call("GET", f"{EXP}/jobs/linky/files?directory=elsewhere")
    assert status == 400 and answer["error"]["details"][0]["name"] == "directory", answer


async def test_a_large_file_on_the_node_reads_whole(local, tmp_path):
    daemon, client = local
    out = await _ended_job_with(daemon, client, tmp_path, "node", "big")
    data = os.urandom(2_000_000)
    (out / "big.bin").write_bytes(data)
    status, body, _ = await _get(client, "big/files/big.bin")
    assert (status, len(body), body == data) == (200, len(data), True)
    status, body, headers = await _get(client, "big/files/big.bin", Range="bytes=1000000-")
    assert (status, body == data[1_000_000:]) == (206, True)
    assert headers["Content-Range"] == "bytes 1000000-1999999/2000000"


async def test_a_large_file_on_the_node_can_be_followed_while_it_is_written(local, tmp_path):
    daemon, client = local
    go = tmp_path / "go"
    writer = "import sys; sys.stdout.write('0123456789' * 200_000)"
    command = f'{sys.executable} -c "{writer}"; while [ ! -e {go} ]; do sleep 0.05; done'
    await _run(client, "bigger", command, stdOutErrPathPrefix=str(tmp_path / "node-disk"))
    out = tmp_path / "node-disk/default/default/bigger/1/stdouterr/stdout.txt"
    await _until(lambda: out.exists() and out.stat().st_size == 2_000_000, 30)
    url = client.url + f"{EXP}/jobs/bigger/files/stdout.txt?follow=true"
    async with client.session.get(url, headers=client.headers) as r:
        assert r.status == 200
        body = await asyncio.wait_for(r.content.readexactly(2_000_000), 30)
        go.touch()
        assert await asyncio.wait_for(r.read(), 30) == b""
    assert body == b"0123456789" * 200_000
    await _ended(daemon, client, "bigger")


async def test_a_follow_whose_node_stops_answering_ends_with_an_error(local, tmp_path, monkeypatch):
    daemon, client = local
    go = tmp_path / "go"
    await _run(client, "cut-off", f"echo line 1; while [ ! -e {go} ]; do sleep 0.05; done",
               stdOutErrPathPrefix=str(tmp_path / "node-disk"))  # fmt: skip
    out = tmp_path / "node-disk/default/default/cut-off/1/stdouterr/stdout.txt"
    await _until(lambda: out.exists() and out.read_text() == "line 1\n", 30)
    read_remote = daemon.nodes.read_remote

    async def failing(node_id, path, **options):
        if path.endswith("stdout.txt"):
            return {"error": {"code": "unreadable", "message": "the disk is gone"}}
        return await read_remote(node_id, path, **options)

    url = client.url + f"{EXP}/jobs/cut-off/files/stdout.txt?follow=true"
    try:
        async with client.session.get(url, headers=client.headers) as r:
            assert await asyncio.wait_for(r.content.readline(), 10) == b"line 1\n"
            monkeypatch.setattr(daemon.nodes, "read_remote", failing)
            with pytest.raises(aiohttp.ClientPayloadError):  # not a clean, complete end
                await asyncio.wait_for(r.read(), 10)
        status, answer = await client.call("GET", f"{EXP}/jobs/cut-off/files/stdout.txt?follow=1")
        assert status == 404 and "the disk is gone" in answer["error"]["message"], answer
    finally:
        go.touch()
    await _ended(daemon, client, "cut-off")


@pytest.mark.parametrize("where", ["storage", "node"])
async def test_range_requests_answer_alike_wherever_the_file_lies(local, tmp_path, where):
    daemon, client = local
    out = await _ended_job_with(daemon, client, tmp_path, where, "ranged")
    (out / "abc.txt").write_bytes(ALPHABET)
    path = "ranged/files/abc.txt"
    for asked, body, content_range in (
        ("bytes=2-3", b"cd", "bytes 2-3/26"),
        ("bytes=20-", b"uvwxyz", "bytes 20-25/26"),
        ("bytes=0-100", ALPHABET, "bytes 0-25/26"),
        ("bytes=0-", ALPHABET, "bytes 0-25/26"),
        ("bytes=25-25", b"z", "bytes 25-25/26"),
    ):
        status, got, headers = await _get(client, path, Range=asked)
        assert (status, got, headers.get("Content-Range")) == (206, body, content_range), asked
        assert headers["Content-Length"] == str(len(body))
    status, got, headers = await _get(client, path)
    assert (status, got, headers.get("Content-Range")) == (200, ALPHABET, None)
    for asked, words in (("bytes=500-", "the file has 26 bytes"),
                         ("bytes=26-", "the file has 26 bytes"),
                         ("bytes=5-2", "not bytes=START-[END]")):  # fmt: skip
        status, answer = await client.call("GET", f"{EXP}/jobs/{path}", headers={"Range": asked})
        assert status == 416 and words in answer["error"]["message"], (asked, answer)
        assert answer["error"]["code"] == "RangeNotSatisfiable"
    status, _got, headers = await _get(client, path, Range="bytes=26-")
    assert (status, headers.get("Content-Range")) == (416, "bytes */26")  # (RFC 9110)
    for ignored in ("pages=1-2", "bytes=-3", "bytes=0-1,3-4", "garbage"):  # the whole file
        status, got, headers = await _get(client, path, Range=ignored)
        assert (status, got, headers.get("Content-Range")) == (200, ALPHABET, None), ignored
    status, answer = await client.call("GET", f"{EXP}/jobs/{path}?follow=true",
                                       headers={"Range": "bytes=2-3"})  # fmt: skip
    assert status == 400 and answer["error"]["details"][0]["name"] == "Range"  # ended or not


async def _pair(daemon, client, disk: Path) -> tuple[str, list[str]]:
    """A two-node job `pair` whose stdouterr is under `disk`, run to its end: its id, and
    its nodes in task order."""
    status, created = await client.call("PUT", f"{EXP}/jobs/pair", {
        "cluster": "local", "nodeCount": 2, "gpusPerNode": 1, "stdOutErrPathPrefix": str(disk),
        "pyTorchSettings": {  # runs on every node: `/bin/sh -c '...'`
            "pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
            "commandLineArgs": "'echo task $AZ_BATCHAI_TASK_INDEX'",
        },
    })  # fmt: skip
    assert status == 201, created
    assert (await _ended(daemon, client, "pair"))["properties"]["state"] == "succeeded"
    job_id = newest_job(daemon.models.models, "pair").job_id
    events = await daemon.store.read_stream(f"job-{job_id}")
    scheduled = next(e for e in events if e.type == "JobScheduled")
    nodes = [task["node"] for task in scheduled.data["tasks"]]
    assert len(set(nodes)) == 2
    return job_id, nodes


def _own_disks(daemon, monkeypatch, tmp_path: Path, nodes: list[str]) -> Path:
    """From now on, task 1's node reads `disk-1` where task 0's reads `disk-0`, as nodes on
    separate machines would: the stdouterr directory of `pair` on `disk-1`, made."""
    read_remote = daemon.nodes.read_remote

    async def on_own_disk(node_id, path, **options):
        if node_id == nodes[1]:
            path = path.replace(str(tmp_path / "disk-0"), str(tmp_path / "disk-1"))
        return await read_remote(node_id, path, **options)

    monkeypatch.setattr(daemon.nodes, "read_remote", on_own_disk)
    other = tmp_path / "disk-1/default/default/pair/1/stdouterr"
    other.mkdir(parents=True)
    return other


def _unreachable(daemon, monkeypatch, node: str) -> None:
    read_remote = daemon.nodes.read_remote

    async def gone(node_id, path, **options):
        if node_id == node:
            return {"error": {"code": "node_unreachable", "message": "the node is gone"}}
        return await read_remote(node_id, path, **options)

    monkeypatch.setattr(daemon.nodes, "read_remote", gone)


async def test_each_task_of_a_multi_node_job_has_its_files_read_on_its_own_node(
    local, tmp_path, monkeypatch
):
    daemon, client = local
    _job_id, nodes = await _pair(daemon, client, tmp_path / "disk-0")
    out = tmp_path / "disk-0/default/default/pair/1/stdouterr"
    other = _own_disks(daemon, monkeypatch, tmp_path, nodes)
    for name in ("stdout-1.txt", "stderr-1.txt"):
        (out / name).rename(other / name)
    (out / "stdout-1.txt").write_text("not task 1's: task 1 wrote on its own node\n")
    (other / "only-on-1.txt").write_text("written by task 1\n")
    (other / "checkpoints").mkdir()
    (other / "checkpoints/epoch-1.pt").write_text("weights\n")
    for name, body in (("stdout.txt", b"task 0\n"), ("stdout-1.txt", b"task 1\n"),
                       ("only-on-1.txt", b"written by task 1\n"),
                       ("checkpoints/epoch-1.pt", b"weights\n")):  # fmt: skip
        assert (await _get(client, f"pair/files/{name}"))[:2] == (200, body), name
    status, listing = await client.call("GET", f"{EXP}/jobs/pair/files")
    names = [entry["name"] for entry in listing["value"]]
    assert status == 200 and names == sorted(names), listing
    assert {"stdout.txt", "stdout-1.txt", "stderr-1.txt", "only-on-1.txt", "checkpoints"} <= set(
        names
    )
    status, answer = await client.call("GET", f"{EXP}/jobs/pair/files/nowhere.txt")
    assert status == 404 and nodes[0] in answer["error"]["message"], answer

    _unreachable(daemon, monkeypatch, nodes[0])
    assert (await _get(client, "pair/files/stdout-1.txt"))[:2] == (200, b"task 1\n")
    followed = await _get(client, "pair/files/stdout-1.txt?follow=true")  # (the job has ended:
    assert followed[:2] == (200, b"task 1\n")  # the file as it is)
    status, listing = await client.call("GET", f"{EXP}/jobs/pair/files")
    assert status == 200 and "stdout-1.txt" in [e["name"] for e in listing["value"]], listing
    status, answer = await client.call("GET", f"{EXP}/jobs/pair/files/stdout.txt")
    assert status == 404 and "the node is gone" in answer["error"]["message"], answer


async def test_task_ks_file_is_followed_on_task_ks_node_while_the_job_runs(
    local, tmp_path, monkeypatch
):
    daemon, client = local
    go = tmp_path / "go"
    status, created = await client.call("PUT", f"{EXP}/jobs/pair", {
        "cluster": "local", "nodeCount": 2, "gpusPerNode": 1,
        "stdOutErrPathPrefix": str(tmp_path / "disk-0"),
        "pyTorchSettings": {  # runs on every node until `go`
            "pythonInterpreterPath": "/bin/sh", "pythonScriptFilePath": "-c",
            "commandLineArgs": f"'echo task $AZ_BATCHAI_TASK_INDEX; "
                               f"while [ ! -e {go} ]; do sleep 0.05; done'",
        },
    })  # fmt: skip
    assert status == 201, created
    await _until(lambda: newest_job(daemon.models.models, "pair").state == "running", 30)
    job = newest_job(daemon.models.models, "pair")
    nodes = [node for node, _gpus in job.tasks]
    other = _own_disks(daemon, monkeypatch, tmp_path, nodes)
    (other / "stdout-1.txt").write_text("task 1, on its own disk\n")
    url = client.url + f"{EXP}/jobs/pair/files/stdout-1.txt?follow=true"
    try:
        async with client.session.get(url, headers=client.headers) as r:
            assert r.status == 200
            line = await asyncio.wait_for(r.content.readline(), 10)
            assert line == b"task 1, on its own disk\n"  # not task 1's file on task 0's disk
            with (other / "stdout-1.txt").open("a") as handle:
                handle.write("more\n")
            assert await asyncio.wait_for(r.content.readline(), 10) == b"more\n"
            go.touch()
            assert await asyncio.wait_for(r.read(), 30) == b""  # it ends with the job
    finally:
        go.touch()
    await _ended(daemon, client, "pair")


async def test_a_silent_node_holds_up_a_read_once_not_once_for_each_node_after_it(
    local, tmp_path, monkeypatch
):
    """The file is on the third node of three, and the second does not answer: once the
    first has said it has no such file, the others are asked at once: the third is asked
    while the second still keeps silent, and served without waiting out the second's read
    timeout; a refusal from the second, answered in time, still wins over the third's file."""
    daemon, client = local
    _job_id, nodes = await _pair(daemon, client, tmp_path / "disk-0")
    other = _own_disks(daemon, monkeypatch, tmp_path, nodes)
    (other / "only-on-1.txt").write_text("written by task 1\n")
    silent, third_asked = "a-silent-node", asyncio.Event()
    monkeypatch.setattr(api_module, "_nodes_of", _returning([nodes[0], silent, nodes[1]]))
    read_remote = daemon.nodes.read_remote
    overlapped = []

    async def asked(node_id, path, **options):
        if node_id == silent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(third_asked.wait(), 5)
            overlapped.append(third_asked.is_set())
            return {"error": {"code": "node_unreachable", "message": "did not answer"}}
        if node_id == nodes[1]:
            third_asked.set()
        return await read_remote(node_id, path, **options)

    monkeypatch.setattr(daemon.nodes, "read_remote", asked)
    assert (await _get(client, "pair/files/only-on-1.txt"))[:2] == (200, b"written by task 1\n")
    assert overlapped == [True]  # the third node was asked while the second kept silent

    released, answered = asyncio.Event(), []

    async def hung(node_id, path, **options):  # the second keeps silent until released
        if node_id == silent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), 8)
            answered.append(node_id)
            return {"error": {"code": "node_unreachable", "message": "did not answer"}}
        return await read_remote(node_id, path, **options)

    monkeypatch.setattr(daemon.nodes, "read_remote", hung)
    try:  # the third's file is served without waiting for the second's timeout
        assert (await _get(client, "pair/files/only-on-1.txt"))[:2] == (200, b"written by task 1\n")
        assert answered == []
        # a silent node after the one that has the file is not waited for at all, however
        # long nodes before it would be
        monkeypatch.setattr(api_module, "FALLBACK_GRACE", 60.0)
        monkeypatch.setattr(api_module, "_nodes_of", _returning([nodes[0], nodes[1], silent]))
        assert (await _get(client, "pair/files/only-on-1.txt"))[:2] == (200, b"written by task 1\n")
        assert answered == []
    finally:
        released.set()
    monkeypatch.setattr(api_module, "_nodes_of", _returning([nodes[0], silent, nodes[1]]))

    async def linked(node_id, path, **options):  # the second has a link in the file's place
        if node_id == silent:
            return {"error": {"code": "refused", "message": "a link on the way"}}
        return await read_remote(node_id, path, **options)

    monkeypatch.setattr(daemon.nodes, "read_remote", linked)
    status, body, _headers = await _get(client, "pair/files/only-on-1.txt")
    assert status == 400 and b"link" in body, body  # refused, not served from the third


def _returning(value):
    async def returns(*_args):
        return value

    return returns


async def test_a_reused_name_shows_on_each_node_only_what_its_own_job_wrote(
    local, tmp_path, monkeypatch
):
    daemon, client = local
    disk = tmp_path / "disk-0"
    earlier, _nodes = await _pair(daemon, client, disk)
    assert (await client.call("DELETE", f"{EXP}/jobs/pair"))[0] in (200, 202, 204)
    job_id, nodes = await _pair(daemon, client, disk)
    assert job_id != earlier
    out = disk / "default/default/pair/1/stdouterr"
    (out / "stdout-1.txt").unlink()
    other = _own_disks(daemon, monkeypatch, tmp_path, nodes)
    (other / files.OWNER).write_text(earlier)  # node 1 still holds the earlier job's output
    (other / "stdout-1.txt").write_text("the earlier job's\n")
    (other / "earlier.txt").write_text("the earlier job's\n")
    status, answer = await client.call("GET", f"{EXP}/jobs/pair/files/stdout-1.txt")
    assert status == 404, answer
    status, listing = await client.call("GET", f"{EXP}/jobs/pair/files")
    assert status == 200 and "earlier.txt" not in [e["name"] for e in listing["value"]]
    assert "stdout.txt" in [e["name"] for e in listing["value"]]

    (other / files.OWNER).write_text(job_id)  # task 1 has claimed its node's directory
    (other / "stdout-1.txt").write_text("task 1\n")
    _unreachable(daemon, monkeypatch, nodes[0])
    assert (await _get(client, "pair/files/stdout-1.txt"))[:2] == (200, b"task 1\n")
    _unreachable(daemon, monkeypatch, nodes[1])
    status, answer = await client.call("GET", f"{EXP}/jobs/pair/files/stdout-1.txt")
    assert status == 404 and "the node is gone" in answer["error"]["message"], answer


async def test_a_command_runs_in_bash_as_batch_ai_ran_it(local):
    daemon, client = local
    command = "source /dev/null; words=(a b); [[ ${words[1]} == b ]] && echo ok"
    await _run(client, "bashism", command)
    job = await _ended(daemon, client, "bashism")
    assert job["properties"]["state"] == "succeeded"
    assert _out(daemon, "bashism") == "ok\n"


@pytest.mark.parametrize("where", ["storage", "node"])
async def test_a_long_file_list_pages_through_the_links_the_server_gives(local, tmp_path, where):
    """Every nextLink and downloadUrl the server builds is one it takes (a link refused as
    an unknown parameter broke `job file list` past 100 files)."""
    daemon, client = local
    fields, _base = _where(daemon, tmp_path, where)
    await _run(client, "many", 'for i in $(seq 105); do : > "$AZ_BATCHAI_STDOUTERR_DIR/f$i"; '
               "done", **fields)  # fmt: skip
    assert (await _ended(daemon, client, "many"))["properties"]["state"] == "succeeded"
    names, link = [], f"{client.url}{EXP}/jobs/many/files?top=40"
    while link:
        async with client.session.get(link, headers=client.headers) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        names += [f["name"] for f in page["value"]]
        link = page["nextLink"] and client.url + page["nextLink"]  # (a path on this server)
    assert len(names) == 107 and len(set(names)) == 107  # f1..f105, stdout and stderr
    download = page["value"][-1]["downloadUrl"]
    async with client.session.get(client.url + download, headers=client.headers) as r:
        assert r.status == 200
    async with client.session.head(f"{client.url}{EXP}/jobs/many/files?bogus=1",
                                   headers=client.headers) as r:  # fmt: skip
        assert r.status == 400  # as a GET
