"""The embedded local cluster over time, as a tester drives it: its scale settings lowered
under a queued gang, and its deletion while jobs run (a real daemon and its local agents)."""

from __future__ import annotations

import asyncio
import time

from batchd.scheduler.providers import work_dir
from tests.integration.conftest import Client, admin_client, newest_job, start_daemon
from tests.integration.test_agents import EXP, _run, _until

CLUSTER = "/v1/workspaces/default/clusters/local"


async def _auto(client: Client, high: int) -> None:
    auto = {"autoScale": {"minimumNodeCount": 0, "maximumNodeCount": high}}
    status, answer = await client.call("PATCH", CLUSTER, {"scaleSettings": auto})
    assert status == 200, answer


async def test_a_gang_wider_than_the_lowered_maximum_keeps_no_idle_node(local):
    """autoScale 0..3, a gang of 3 nodes queued, the maximum lowered to 2: the gang waits
    with cluster_too_small, and the idle nodes go (they stayed, 2 of them, for ever)."""
    daemon, client = local
    models = daemon.models.models
    await _auto(client, 3)
    await _run(client, "b3", "sleep 600", nodeCount=3, gpusPerNode=4)
    await _auto(client, 2)
    await _until(lambda: (job := newest_job(models, "b3")) is not None
                 and job.pending_reason == {"code": "cluster_too_small", "need_nodes": 3},
                 30)  # fmt: skip
    await _until(lambda: not models.nodes, 30)
    cluster = models.clusters[models.cluster_ids["default/local"]]
    await _until(lambda: cluster.allocation_state == "steady", 10)
    assert newest_job(models, "b3").state == "queued"


async def test_a_cluster_being_deleted_is_resizing_while_its_nodes_leave(local):
    daemon, client = local
    models = daemon.models.models
    for name in ("one", "two"):
        await _run(client, name, "sleep 600", gpusPerNode=4)
    await _until(lambda: all(newest_job(models, n).state == "running" for n in ("one", "two")),
                 30)  # fmt: skip
    status, answer = await client.call("DELETE", CLUSTER)
    assert status == 202, answer
    status, body = await client.call("GET", CLUSTER)
    assert status == 200, body
    shown = body["properties"]
    assert (shown["provisioningState"], shown["allocationState"]) == ("deleting", "resizing")
    for name in ("one", "two"):
        await client.call("POST", f"{EXP}/jobs/{name}/terminate")
    await _until(lambda: "default/local" not in models.cluster_ids, 30)


async def test_a_local_agent_that_cannot_start_says_why_among_the_clusters_errors(tmp_path):
    """Local nodes whose agents exit before they register (here: their container engine is
    not there) are started again and again; the cluster's errors say why, once per node,
    however many nodes fail."""
    config = tmp_path / "batchd.toml"
    config.write_text('[local]\nnodes = 4\nruntimes = "docker,process"\n'
                      'docker_host = "unix:///nonexistent/docker.sock"\n')  # fmt: skip
    daemon = await start_daemon(tmp_path / "state", config, local_nodes=None)
    try:
        async with admin_client(daemon) as client:

            async def errors() -> list[dict]:
                return (await client.call("GET", CLUSTER))[1]["properties"]["errors"]

            deadline = time.monotonic() + 30
            while len(await errors()) < 4:
                assert time.monotonic() < deadline, f"not 4 errors in 30 s: {await errors()}"
                await asyncio.sleep(0.2)
            told = await errors()
            assert {e["code"] for e in told} == {"agent_exited"}
            by_message = sorted(told, key=lambda e: e["message"])
            for node, error in zip([f"local-{i}" for i in range(4)], by_message, strict=True):
                assert f"the agent of node {node} exited" in error["message"]
                assert "before it registered" in error["message"]
                assert "cannot use the container engine at unix:///nonexistent" in error["message"]
                assert "agent.log" in error["message"]

            [provider] = daemon.providers

            def failed_again(node: str) -> bool:
                """Its agent was started again, failed again, and that was dealt with."""
                log = work_dir(daemon.state_dir, node) / "agent.log"
                starts = log.read_text().count("cannot use the container engine")
                return starts >= 3 or (starts == 2 and provider.watchers[node].done())

            await _until(lambda: all(failed_again(f"local-{i}") for i in range(4)), 60)
            assert len(await errors()) == 4  # told once each
            assert not daemon.models.models.nodes
    finally:
        await daemon.stop()
