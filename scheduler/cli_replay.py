"""`batchd replay`, `batchd job history` and `batchd events export`: the log's history,
offline and read-only on `--store`.

`--at T` means every event with recordedAt <= T (a time without zone is UTC); `--position N`
includes event N; both rebuild the read models as they stood then (from the newest snapshot
at or before that point, if one fits).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from batchd.events import jsonform
from batchd.events.timeutil import parse_iso
from batchd.projections import history, views
from batchd.projections.model import LIVE_STATES, job_key
from batchd.projections.runner import Runner, moment_note
from batchd.scheduler.cli_log import open_readonly
from batchd.scheduler.cli_text import printable


class NotFound(ValueError):
    """Something the user named is not in the log."""


# -- replay -----------------------------------------------------------------------------------
async def replay(args: argparse.Namespace) -> int:
    at = parse_iso(args.at, "--at") if args.at is not None else None
    store = await open_readonly(args)
    try:
        head = (await store.head()).position
        if at is not None:
            position = await store.position_at(at)
        else:
            position = args.position
            if position > head:
                raise NotFound(f"--position: {position} is beyond the log's head ({head})")
        runner = Runner(store, warn_refused=False)  # (keys: cli_log._keys)
        await runner.restore(upto=position)
        document = views.world(runner.models, await moment_note(store, at, position))
    finally:
        await store.close()
    print_world(document, args.json)
    return 0


def print_world(document: dict[str, Any], as_json: bool) -> None:
    """A replay's world, with its note (if any) on standard error."""
    if document.get("note"):
        print(f"note: {document['note']}", file=sys.stderr)
    print(json.dumps(document) if as_json else world_text(document))


def world_text(w: dict[str, Any]) -> str:
    when = f" ({w['recordedAt']})" if w["recordedAt"] else ""
    lines = [f"as of position {w['position']}{when}", ""]
    lines.append(f"clusters ({len(w['clusters'])})")
    lines += table(
        ["CLUSTER", "VM SIZE", "ALLOCATION", "NODES", "IDLE", "RUNNING", "PREPARING", "UNUSABLE",
         "LEAVING", "FREE GPUS", "MOST ON A NODE", "QUEUED"],
        [[f"{c['workspace']}/{c['name']}" + (" (deleting)" if c.get("deleting") else ""),
          c["vmSize"], c["allocationState"],
          c["currentNodeCount"], *c["nodeStateCounts"].values(), c["freeCapacity"]["freeGpus"],
          c["freeCapacity"]["maxFreeGpusOnNode"], c["queuedJobs"]]
         for c in w["clusters"]],
    )  # fmt: skip
    lines.append("")
    lines.append(f"nodes ({len(w['nodes'])})")
    lines += table(
        ["NODE", "CLUSTER", "STATE", "SINCE", "GPUS", "ALLOCATED"],
        [[n["id"], n["cluster"], n["state"], n["since"], n["gpus"],
          " ".join(f"{'*' if a['gpu'] is None else a['gpu']}:{a['jobName'] or a['job']}"
                   f"#{a['attempt']}" for a in n["allocations"]) or "-"]
         for n in w["nodes"]],
    )  # fmt: skip
    for name, queued in w["queues"].items():
        lines.append("")
        lines.append(f"queue {name} ({len(queued)})")
        lines += table(
            ["#", "JOB", "PRIORITY", "PENDING REASON"],
            [[i, q["name"], q["priority"], history.pending_reason(q["pendingReason"]) or "-"]
             for i, q in enumerate(queued, 1)],
        )  # fmt: skip
    live = [j for j in w["jobs"] if j["state"] in LIVE_STATES]
    lines.append("")
    lines.append(
        f"jobs: {len(live)} live, {len(w['jobs']) - len(live)} ended (--json lists every job)"
    )
    lines += table(
        ["JOB", "WORKSPACE/EXPERIMENT", "STATE", "ATTEMPT", "CLUSTER", "NODES"],
        [[j["name"], f"{j['workspace']}/{j['experiment']}", j["state"], j["attempt"],
          j["cluster"], " ".join(t["node"] for t in j["tasks"]) or "-"] for j in live],
    )  # fmt: skip
    return "\n".join(lines)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [header, *([printable(str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]  # fmt: skip


# -- job history ------------------------------------------------------------------------------
async def job_history(args: argparse.Namespace) -> int:
    from batchd.scheduler.commands import check_name  # (only here: a heavy import)

    for kind, name in (
        ("workspace", args.workspace),
        ("experiment", args.experiment),
        ("job", args.name),
    ):  # refused as the daemon refuses them
        check_name(kind, name)
    store = await open_readonly(args)
    try:
        runner = Runner(store, warn_refused=False)  # (keys: cli_log._keys)
        await runner.restore()
        key = job_key(args.workspace, args.experiment, args.name)
        job_ids = runner.models.job_ids.get(key)
        if not job_ids:
            where = f"{args.workspace}/{args.experiment}"  # (as the daemon says it)
            raise NotFound(f"no job named {args.name!r} in {where}, now or before")
        incarnations = await history.job_timelines(store, job_ids, args.workspace,
                                                   args.experiment)  # fmt: skip
    finally:
        await store.close()
    if args.json:  # as the API answers
        print(json.dumps({"value": incarnations, "nextLink": None}))
        return 0
    print(history_text(key, incarnations))
    return 0


def history_text(key: str, incarnations: list[dict[str, Any]]) -> str:
    """Each incarnation of a job name and its timeline, as tables."""
    lines: list[str] = []
    for n, incarnation in enumerate(incarnations, 1):
        if n > 1:
            lines.append("")
        lines.append(f"job {key} (id {incarnation['id']}, incarnation {n} of {len(incarnations)})")
        rows = [[e["time"], e["event"], e["state"] or "", e["attempt"] or "",
                 " ".join(e["nodes"]) or "", e["actor"],
                 ("(ignored) " if e["ignored"] else "") + (e["reason"] or "")]
                for e in incarnation["timeline"]]  # fmt: skip
        lines += table(["TIME", "EVENT", "STATE", "ATTEMPT", "NODES", "ACTOR", "REASON"], rows)
    return "\n".join(lines)


# -- events export ----------------------------------------------------------------------------
def export_bounds(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """`events export`'s --from and --to in microseconds (None: not given), checked."""
    start = parse_iso(args.from_, "--from", lower=True) if args.from_ is not None else None
    end = parse_iso(args.to, "--to") if args.to is not None else None
    # (compared as given: a --from and --to of one moment between two microseconds are not
    # out of order, though the one is taken up and the other down)
    if start is not None and end is not None and end < parse_iso(args.from_):
        raise ValueError(f"--to {args.to} is before --from {args.from_}")
    return start, end


async def export(args: argparse.Namespace) -> int:
    start, end = export_bounds(args)
    store = await open_readonly(args)
    try:
        write = sys.stdout.write
        if args.stream is not None:
            events = await store.read_stream(args.stream)
            if not events:
                raise NotFound(f"no stream {args.stream!r} in the log")
            for event in events:
                if (start is None or event.recorded_at >= start) and (
                    end is None or event.recorded_at <= end
                ):
                    write(json.dumps(jsonform.to_json(event)) + "\n")
            return 0
        after = 0 if start is None else await store.position_at(start - 1)
        last = (await store.head()).position if end is None else await store.position_at(end)
        async for page in store.read_pages(after, 5000):
            for event in page:
                if event.position > last:
                    return 0
                write(json.dumps(jsonform.to_json(event)) + "\n")
    finally:
        await store.close()
    return 0
