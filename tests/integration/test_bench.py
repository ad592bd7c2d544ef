"""The benchmark commands run end to end and print the fields BENCHMARKS.md quotes."""

from __future__ import annotations

import asyncio
import json

from tests.integration.conftest import IMAGE
from tests.integration.test_cli import batchd


def _json(*args: str) -> dict:
    done = batchd("bench", *args, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_bench_append_compares_with_the_bare_driver(pg_database):
    for store in ([], ["--store", pg_database]):
        result = _json("append", "--events", "2000", "--batch", "100", *store)
        assert result["events"] == 2000 and result["batch"] == 100
        assert result["events_per_s"] > 0 and result["raw_events_per_s"] > 0
        assert result["ratio"] == round(result["events_per_s"] / result["raw_events_per_s"], 4)


def test_bench_append_refuses_a_log_that_holds_events(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    assert _json("append", "--events", "100", "--batch", "10", "--store", url)["events"] == 100
    again = batchd("bench", "append", "--events", "100", "--store", url, timeout=60)
    assert again.returncode == 1 and "holds 100 events" in again.stderr
    assert "Traceback" not in again.stderr
    audit = batchd("audit", "verify", "--store", url)
    assert audit.returncode == 0 and audit.stdout.startswith("ok: 100 events,")  # none added


def test_bench_replay_reports_rebuild_and_restore(tmp_path):
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    none = _json("replay", "--events", "3000", "--store", url)
    assert none["events"] >= 3000 and none["projections"] == "none"
    full = _json("replay", "--projections", "all", "--store", url)
    assert full["events"] == none["events"]  # the log generated above, replayed as it is
    assert full["rebuild_s"] > 0 and full["restore_s"] > 0 and full["none_events_per_s"] > 0
    assert abs(full["ratio"] - full["events_per_s"] / full["none_events_per_s"]) < 0.01
    assert 0 < full["snapshot_position"] < full["events"]
    assert full["snapshot_position"] + full["caught_up"] == full["events"]
    assert full["jobs"] > 400 and full["nodes"] > 0


def test_bench_memory_measures_the_read_models():
    result = _json("memory", "--jobs", "2000", "--nodes", "20")
    assert result["jobs"] == 2000 and result["nodes"] == 20
    assert result["read_models_mib"] >= 0 and result["rss_after_mib"] > 0


def test_bench_schedule_places_every_job_and_checks_each_cycle():
    result = _json("schedule", "--jobs", "600", "--nodes", "40", "--gpus-per-node", "8")
    assert result["jobs"] == 600 and result["checked"] is True
    assert result["cycles"] >= 2 and result["placements_per_s"] > 0
    assert result["cycle_p99_ms"] >= result["cycle_p50_ms"] > 0
    assert result["events"] >= 600  # one JobScheduled per job, and the pending reasons


def test_bench_api_submits_through_a_real_daemon_and_finds_every_job_in_the_log():
    result = _json("api", "--jobs", "300", "--clients", "8")
    assert result["jobs"] == result["in_log"] == 300 and result["clients"] == 8
    assert result["jobs_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0


def test_bench_e2e_runs_every_job_on_real_agents():
    result = _json("e2e", "--jobs", "40", "--nodes", "2", "--gpus-per-node", "4")
    assert (result["jobs"], result["nodes"], result["gpus_per_node"]) == (40, 2, 4)
    assert result["jobs_per_s"] > 0 and result["runtime"] == "process"
    assert result["submit_to_start_p99_ms"] >= result["submit_to_start_p50_ms"] > 0


async def test_bench_e2e_runs_jobs_in_containers_on_the_docker_runtime(proxy):
    host = ("--docker-host", f"unix://{proxy.socket_path}")
    result = await asyncio.to_thread(_json, "e2e", "--jobs", "6", "--nodes", "1",
                                     "--gpus-per-node", "2", "--runtime", "docker",
                                     "--image", IMAGE, *host)  # fmt: skip
    assert result["jobs_per_s"] > 0 and result["runtime"] == "docker"
    creates = proxy.creates()  # each job ran in a container of the image
    assert len(creates) == 6 and {c["Image"] for c in creates} == {IMAGE}
    done = await asyncio.to_thread(batchd, "bench", "e2e", "--jobs", "1", "--runtime", "docker",
                                   "--image", "localhost/no-such-image:1", *host)  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("batchd: error: --runtime docker")
    assert "no-such-image" in done.stderr and "Traceback" not in done.stderr
