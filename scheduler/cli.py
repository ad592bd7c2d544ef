"""The `batchd` command line.

Every command prints a one-line `batchd: error: ...` and exits non-zero on bad input or an
unusable store; no traceback reaches the user. Read-only commands (`events`, `audit`) open the
store read-only with `--store URL`, so they never create or change a log.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence

from batchd.events import errors
from batchd.scheduler import config, logs

EXIT_FAILURE = 1  # the command ran and found a problem (audit verify) or could not finish
EXIT_USAGE = 2  # bad flags or values


class CliError(Exception):
    """A user-facing error: printed as one line, exit non-zero."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description="A self-hosted GPU scheduler.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", help="state directory (default $BATCHD_STATE_DIR or ~/.local/state/batchd)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--store", help="event log URL (default: SQLite in the state directory)")
    serve.add_argument("--listen", help="HOST:PORT for the API (default 127.0.0.1:8080)")

    events = commands.add_parser("events", help="read the event log")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    tail = events_sub.add_parser(
        "tail", parents=[common], help="print events (the last 10, or after --after N)"
    )
    _store_flag(tail)
    tail.add_argument("--after", type=_non_negative, help="print events after this position")
    tail.add_argument(
        "-n", "--lines", type=_positive, default=10, help="how many of the last events"
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")

    export = events_sub.add_parser(
        "export", parents=[common], help="print events as NDJSON (secrets redacted)"
    )
    _store_flag(export)
    export.add_argument("--from", dest="from_", metavar="ISO", help="events recorded at or after")
    export.add_argument("--to", metavar="ISO", help="events recorded at or before")
    export.add_argument("--stream", help="only this stream (e.g. job-<id>, cluster-<ws>/<name>)")

    replay = commands.add_parser(
        "replay", parents=[common], help="the clusters, nodes, queues and jobs at a past moment"
    )
    _store_flag(replay)
    moment = replay.add_mutually_exclusive_group(required=True)
    moment.add_argument("--at", metavar="ISO", help="as of this time (UTC if no zone is given)")
    moment.add_argument(
        "--position", type=_non_negative, help="as of this log position (inclusive)"
    )
    replay.add_argument("--json", action="store_true", help="print one JSON document")

    job = commands.add_parser("job", help="jobs")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND")
    job_history = job_sub.add_parser(
        "history", parents=[common], help="a job's timeline (deleted jobs and reused names too)"
    )
    job_history.add_argument("name", help="the job's name")
    _store_flag(job_history)
    job_history.add_argument("-w", "--workspace", default="default", help="(default: default)")
    job_history.add_argument("-e", "--experiment", default="default", help="(default: default)")
    job_history.add_argument("--json", action="store_true", help="print one JSON document")

    audit = commands.add_parser("audit", help="check the log's integrity")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_sub.add_parser("verify", parents=[common], help="verify the hash chain")
    _store_flag(verify)
    verify.add_argument("--expect", metavar="POSITION:HASH", help="an anchor kept elsewhere")
    verify.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="measure batchd")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    append = bench_sub.add_parser("append", help="append throughput against the bare driver")
    _bench_store_flag(append)
    append.add_argument(
        "--batch", type=_positive, default=500, help="events per append (default 500)"
    )
    append.add_argument(
        "--writers", type=_positive, default=1, help="concurrent appenders (default 1)"
    )
    append.add_argument(
        "--events", type=_positive, default=100_000, help="events in all (default 100000)"
    )
    append.add_argument("--json", action="store_true", help="print one JSON line")
    replay = bench_sub.add_parser("replay", help="replay throughput (generates a log if empty)")
    _bench_store_flag(replay)
    replay.add_argument(
        "--events", type=_positive, default=200_000, help="events to generate if empty"
    )
    replay.add_argument("--projections", choices=("none", "all"), default="none")
    replay.add_argument("--json", action="store_true", help="print one JSON line")
    schedule = bench_sub.add_parser("schedule", help="placement throughput of the planner")
    _bench_store_flag(schedule)
    schedule.add_argument("--jobs", type=_positive, default=10_000, help="(default 10000)")
    schedule.add_argument("--nodes", type=_positive, default=1000, help="(default 1000)")
    schedule.add_argument("--gpus-per-node", type=_positive, default=8, help="(default 8)")
    schedule.add_argument("--json", action="store_true", help="print one JSON line")
    memory = bench_sub.add_parser("memory", help="memory of the read models of N jobs, M nodes")
    memory.add_argument("--jobs", type=_positive, default=100_000, help="(default 100000)")
    memory.add_argument("--nodes", type=_positive, default=1000, help="(default 1000)")
    memory.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="event log URL, read-only (default: the state directory's log)"
    )


def _bench_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="event log URL (default: a fresh temporary SQLite file)")


def _dispatch(args: argparse.Namespace):
    from batchd.scheduler import cli_log, cli_replay, daemon
    from batchd.scheduler.bench import append, memory, replay, schedule

    if args.command == "serve":
        return daemon.main(args)
    if args.command == "events":
        return cli_log.tail(args) if args.events_command == "tail" else cli_replay.export(args)
    if args.command == "replay":
        return cli_replay.replay(args)
    if args.command == "job":
        return cli_replay.job_history(args)
    if args.command == "audit":
        return cli_log.verify(args)
    benches = {
        "append": append.main, "replay": replay.main, "memory": memory.main,
        "schedule": schedule.main,
    }  # fmt: skip
    return benches[args.bench_command](args)


# Collect young objects after 50,000 net allocations instead of CPython's 700. Reading the log
# allocates several objects per event, nearly all of them garbage within a page or kept for
# good in the read models; with the default, collections take a third of replay time.
GC_THRESHOLDS = (50_000, 20, 20)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)
    serving = args.command == "serve"
    logs.configure(json=serving, level=logging.INFO if serving else logging.WARNING)
    try:
        result = _dispatch(args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else int(result or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (CliError, config.ConfigError, errors.StoreError, ValueError) as exc:
        print(f"batchd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a file or directory the command needs (state dir, keys, output)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"batchd: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
