"""Fuzzing the HTTP API with schemathesis against the document it serves at `/v1/openapi.json`.

Every operation gets schemathesis' coverage cases (boundary and just-out-of-range values of
each parameter and body field, sampled) and generated requests, valid and invalid (positive
and negative modes), as the admin. Requests go to generated names (mostly 404s) and to a
seeded workspace, experiment, cluster, job, token and output file, so they reach the deep paths
and the validators behind them; valid documents are also sent for new names under the seeded
parents. No answer may be a 5xx, and each must conform to the document: a documented status
code and content type, a body matching its schema, documented headers.

The daemon runs in the test's event loop, so schemathesis (synchronous, on requests) runs in a
worker thread. Generation is derandomized and bounded; deletions of the seeded resources run
last. Findings are collected rather than raised at the first one, so one run lists each
(operation, problem) once, with the request that showed it. `-s` prints the answers counted
by operation and status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.core.parameters import ParameterLocation
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from batchd.scheduler.openapi import document

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 20  # generated requests per operation, mode and naming
COVERAGE_CASES = 80  # coverage cases per operation, evenly sampled from all of them
STREAM_EXAMPLES = 3  # the event stream waits out its timeout when no event comes
STREAM_COVERAGE = 20
TIMEOUT = 10.0  # seconds per request
STREAM_TIMEOUT = 0.5
CONFIG = {
    "generation": {"with-security-parameters": False},  # the admin token goes on every request
    "phases": {"coverage": {"unexpected-methods": []}},
    "max-stream-events": 3,
}
SEEDED = {"workspace": "fuzz", "experiment": "exp", "cluster": "gpu", "job": "job1"}
CLUSTER = {"vmSize": "STANDARD_NC6", "scaleSettings": {"manual": {"targetNodeCount": 1}}}
JOB = {
    "cluster": SEEDED["cluster"],
    "nodeCount": 1,
    "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
    "customToolkitSettings": {"commandLine": "echo hi"},
}
VALID_BODIES = {  # by operationId: a body the server accepts, for a new name
    "createWorkspace": {},
    "createExperiment": {"properties": {}},
    "createCluster": {"properties": CLUSTER},
    "resizeCluster": {"scaleSettings": {"manual": {"targetNodeCount": 2}}},
    "createJob": JOB,
}
EDGES = [  # (operationId, the case's fields): values generation rarely hits, sent as they are
    ("createWorkspace", {"path_parameters": {"workspace": "m\u00b2"}, "body": {}}),
    ("createExperiment", {"path_parameters": {**SEEDED, "experiment": "\u00e9"}, "body": {}}),
    ("createJob", {"path_parameters": {**SEEDED, "job": "\u00e9"}, "body": JOB}),
    ("listEvents", {"query": {"after": 2**63}}),
    ("replay", {"query": {"position": 2**63}}),
    ("getWorkspace", {"path_parameters": SEEDED, "query": {"after": 2**63}}),
    ("streamEvents", {"headers": {"Last-Event-ID": str(2**63)}}),
    ("streamEvents", {"query": {"after": 2**63}}),
    ("getJobFile", {"path_parameters": {**SEEDED, "path": "stdout.txt"},
                    "headers": {"Range": "bytes=100000-"}}),
    ("getJobFile", {"path_parameters": {**SEEDED, "path": "stdout.txt"},
                    "headers": {"Range": "bytes=10-19"}}),
    ("getJobFile", {"path_parameters": {**SEEDED, "path": "../../../admin.token"}}),
]  # fmt: skip
DELETE_ORDER = (
    "/v1/nodes/", "/v1/tokens/", "/jobs/", "/experiments/", "/clusters/", "/workspaces/",
)  # fmt: skip
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@dataclass
class Fuzzer:
    url: str
    token: str
    mounts: Path  # the daemon's $AZ_BATCHAI_MOUNT_ROOT
    session: requests.Session = field(default_factory=requests.Session)
    seeded: dict[str, str] = field(default_factory=dict)
    findings: dict[tuple[str, str], str] = field(default_factory=dict)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.session.request(method, self.url + path, json=body, headers=self.headers,
                                    timeout=TIMEOUT)  # fmt: skip

    def seed(self) -> None:
        """A workspace, experiment, cluster, job, token and output file to find."""
        ws, exp, job = SEEDED["workspace"], SEEDED["experiment"], SEEDED["job"]
        for path, body in [
            (f"/v1/workspaces/{ws}", {}),
            (f"/v1/workspaces/{ws}/experiments/{exp}", {}),
            (f"/v1/workspaces/{ws}/clusters/{SEEDED['cluster']}", CLUSTER),
            (f"/v1/workspaces/{ws}/experiments/{exp}/jobs/{job}", JOB),
        ]:
            answer = self.request("PUT", path, body)
            assert answer.status_code == 201, (path, answer.status_code, answer.text)
        answer = self.request("POST", "/v1/tokens", {"name": "fuzz", "role": "viewer"})
        assert answer.status_code == 201, answer.text
        output = self.mounts / "logs" / ws / exp / job / "1" / "stdouterr"  # attempt 1's
        output.mkdir(parents=True)
        (output / "stdout.txt").write_bytes(b"epoch 1: loss 0.5\n" * 100)
        self.seeded = {**SEEDED, "token": answer.json()["id"], "path": "stdout.txt", "id": "node-1"}

    def send(self, case: Any) -> None:
        """Send `case` as the admin and record how its answer breaks the document."""
        label = case.operation.label
        stream = case.operation.path.endswith("/stream")
        if isinstance(case.query, dict) and str(case.query.get("follow")).lower() in ("true", "1"):
            case.query["follow"] = "false"  # it would stream until the (queued) job ends
        try:
            response = case.call(base_url=self.url, session=self.session, headers=self.headers,
                                 timeout=STREAM_TIMEOUT if stream else TIMEOUT)  # fmt: skip
        except requests.RequestException as exc:
            sent = f"{case.formatted_path} query={case.query} headers={dict(case.headers or {})}"
            self.findings.setdefault((label, type(exc).__name__), f"{sent}: {exc}")
            return
        self.statuses[label, response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=self.headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (label, f"{failure.title} [{response.status_code}]")
                self.findings.setdefault(key, _describe(case, response, failure))

    def fuzz(self, operation: Any, mode: GenerationMode, params: dict[str, str],
             body: Any = NOT_SET) -> None:  # fmt: skip
        """Generated requests to `operation`: `params` fixes path parameters (the others are
        generated), `body` the request body."""
        stream = operation.path.endswith("/stream")
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=params, body=body)

        @hypothesis.settings(SETTINGS, max_examples=STREAM_EXAMPLES if stream else EXAMPLES)
        @hypothesis.given(case=strategy)
        def run(case: Any) -> None:
            self.send(case)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to make invalid

    def cover(self, schema: Any, operation: Any, params: dict[str, str]) -> None:
        """Schemathesis' coverage cases (what `st run` sends first), evenly sampled; those
        that do not test a path parameter go to the seeded names `params`."""
        cases = list(schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=operation),
        ))  # fmt: skip
        most = STREAM_COVERAGE if operation.path.endswith("/stream") else COVERAGE_CASES
        step = max(1, -(-len(cases) // most))
        for case in cases[::step]:
            data = case.meta.phase.data if case.meta is not None else None
            if params and getattr(data, "parameter_location", None) != ParameterLocation.PATH:
                case.path_parameters = {**(case.path_parameters or {}), **params}
            self.send(case)

    def plan(self, operation: Any) -> list[tuple[GenerationMode, dict[str, str], Any]]:
        """Generated names (mostly 404s), then the seeded ones (the validators and the read
        models behind them), then a valid body on a new name under the seeded parents."""
        names = [p.name for p in operation.path_parameters]
        both = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        seeded = {name: self.seeded[name] for name in names}
        if operation.method == "delete":
            return [(mode, seeded, NOT_SET) for mode in reversed(both)]
        out = [(mode, {}, NOT_SET) for mode in both]
        if names:
            out += [(mode, seeded, NOT_SET) for mode in both]
        valid = VALID_BODIES.get(operation.definition.raw.get("operationId"))
        if valid is not None:
            parents = seeded if operation.method == "patch" else dict(list(seeded.items())[:-1])
            out.append((GenerationMode.POSITIVE, parents, valid))
        return out

    def run_all(self) -> None:
        schema = schemathesis.openapi.from_url(
            f"{self.url}/v1/openapi.json",
            config=schemathesis.Config.from_dict(CONFIG),
            headers=self.headers,
            timeout=TIMEOUT,
        )
        schema.validate()
        operations = [result.ok() for result in schema.get_all_operations()]
        deletions = sorted(
            (op for op in operations if op.method == "delete"),
            key=lambda op: next(i for i, part in enumerate(DELETE_ORDER) if part in op.path),
        )
        by_id = {op.definition.raw.get("operationId"): op for op in operations}
        for operation_id, fields in EDGES:
            self.send(by_id[operation_id].Case(**fields))
        for operation in [op for op in operations if op.method != "delete"] + deletions:
            names = [p.name for p in operation.path_parameters]
            self.cover(schema, operation, {name: self.seeded[name] for name in names})
            for mode, params, body in self.plan(operation):
                self.fuzz(operation, mode, params, body)


def _describe(case: Any, response: requests.Response, failure: Exception) -> str:
    request = response.request
    headers = {k: v for k, v in request.headers.items()
               if k in ("Range", "Last-Event-ID", "Content-Type")}  # fmt: skip
    sent = (request.body or b"")[:200]
    answer = response.content[:300].decode("utf-8", "replace")
    message = getattr(failure, "message", str(failure)).strip().replace("\n", " ")[:400]
    return (
        f"{request.method} {request.url} {headers or ''} {sent!r} -> {response.status_code} "
        f"{response.headers.get('Content-Type')} {answer!r}: {message}"
    )


def test_document_is_valid_and_deterministic() -> None:
    doc = document()
    assert json.dumps(doc) == json.dumps(document())
    schemathesis.openapi.from_dict(doc).validate()
    paths = set(doc["paths"])
    for path in [
        "/v1/workspaces", "/v1/workspaces/{workspace}", "/v1/workspaces/{workspace}/clusters",
        "/v1/workspaces/{workspace}/clusters/{cluster}",
        "/v1/workspaces/{workspace}/experiments/{experiment}/jobs/{job}/files/{path}",
        "/v1/jobs", "/v1/tokens", "/v1/tokens/{token}", "/v1/events", "/v1/events/stream",
        "/v1/replay", "/healthz", "/readyz",
    ]:  # fmt: skip
        assert path in paths, path
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


@pytest.mark.timeout(180)
async def test_fuzz_api_conforms_to_its_document(api) -> None:
    fuzzer = Fuzzer(api.url, api.admin_token, api.cfg.mounts)
    started = time.monotonic()
    await asyncio.to_thread(fuzzer.seed)
    await asyncio.to_thread(fuzzer.run_all)
    took = time.monotonic() - started
    calls = sum(fuzzer.statuses.values())
    print(f"{calls} requests in {took:.1f} s; answers by operation and status:")
    for (label, status), count in sorted(fuzzer.statuses.items()):
        print(f"  {label} {status}: {count}")
    report = "\n".join(f"{op} {what}:\n    {example}"
                       for (op, what), example in sorted(fuzzer.findings.items()))  # fmt: skip
    assert not fuzzer.findings, (
        f"{len(fuzzer.findings)} findings in {calls} requests ({took:.0f} s):\n{report}"
    )
