"""The `batchd` command line.

Every command prints a one-line `batchd: error: ...` and exits non-zero on bad input or an
unusable store; no traceback reaches the user. Read-only commands (`events`, `audit`) open the
store read-only with `--store URL`, so they never create or change a log.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import logging
import math
import os
import sys
from collections.abc import Sequence

from batchd.events import errors
from batchd.scheduler import client, config, logs
from batchd.scheduler.cli_text import error_text
from batchd.scheduler.protocol import RUNTIMES

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
    if value > MAX_WHOLE:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {MAX_WHOLE})")
    return value


MAX_WHOLE = 2**63 - 1  # log positions are 64-bit; no count here comes near it


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _priority(text: str) -> str | int:
    """`--priority`: low, normal, high, or a whole number (the server checks its range)."""
    if text in ("low", "normal", "high"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not low, normal, high or a whole number"
        ) from None


def _env_pair(text: str) -> tuple[str, str]:
    """`--env NAME=VALUE`."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


class _Parser(argparse.ArgumentParser):
    """Arguments a command does not know are told with that command's usage (argparse's own
    parser leaves them to the top level, which shows `batchd COMMAND ...`)."""

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None:
            self._check_leading_options(sys.argv[1:] if args is None else list(args))
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a command's own parser: nothing below it
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _check_leading_options(self, args: list[str]) -> None:
        """An option before the command that this level does not know is named (argparse
        would only say that COMMAND is required, or name it after the command's usage)."""
        for arg in args:
            if not arg.startswith("-") or arg == "--":
                return
            if not self._known_option(arg.split("=", 1)[0]):
                self.error(f"unrecognized option {arg!r} before the command")

    def _known_option(self, name: str) -> bool:
        """Is `name` one of this level's options, or what argparse takes for one: a long
        option shortened (`--he`), a short one with more joined to it (`-hx`)?"""
        options = self._option_string_actions
        if name in options:
            return True
        if name.startswith("--"):
            return any(option.startswith(name) for option in options)
        return name[:2] in options


def _version() -> str:
    """The installed package's version."""
    try:
        return importlib.metadata.version("batchd")
    except importlib.metadata.PackageNotFoundError:  # (run from a tree not installed)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchd", description="A self-hosted GPU scheduler.")
    parser.add_argument("--version", action="version", version=f"batchd {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", help="state directory (default $BATCHD_STATE_DIR or ~/.local/state/batchd)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--store", help="event log URL (default: SQLite in the state directory)")
    serve.add_argument("--listen", help="HOST:PORT for the API (default 127.0.0.1:8080)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve https with this certificate")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    serve.add_argument(
        "--tls-self-signed", action="store_true",
        help="serve https with a generated self-signed pair (<state-dir>/tls/)",
    )  # fmt: skip
    agent = commands.add_parser("agent", help="run a node agent")
    agent.add_argument("--server", required=True, help="the daemon's URL")
    agent.add_argument("--token-file", required=True, help="file holding the agent credential")
    agent.add_argument("--node-id", help="this node's id (default: the host name)")
    agent.add_argument(
        "--cluster", default="default/local", help="WORKSPACE/CLUSTER to join (default %(default)s)"
    )
    agent.add_argument("--runtimes", default="process", help="(default %(default)s)")
    agent.add_argument("--gpus", default="auto", help="auto, or N to simulate N GPUs")
    agent.add_argument("--work-dir", default=".", help="where tasks run (default: here)")
    agent.add_argument("--cacert", help="the CA certificate (or the daemon's own certificate) "
                       "to check an https --server with (default: $BATCHD_CACERT, else the "
                       "system's CAs)")  # fmt: skip
    agent.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name to check the daemon's certificate against, when the "
        "--server URL reaches it by another (default: the URL's host)",
    )
    agent.add_argument(
        "--address",
        help="how the other nodes of a multi-node job reach this one (default: the address "
        "the daemon sees this agent connect from)",
    )
    agent.add_argument(
        "--docker-host",
        default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        help="the container engine's API for the docker runtime (default $DOCKER_HOST)",
    )
    agent.add_argument(
        "--gpu-attach", choices=("auto", "always", "never"), default="auto",
        help="attach GPUs to containers: auto (real GPUs only), always, never",
    )  # fmt: skip
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--server", help="the API's URL (default $BATCHD_SERVER or http://127.0.0.1:8080)"
    )
    connection.add_argument(
        "--token",
        help="bearer token (default $BATCHD_TOKEN, or <state-dir>/admin.token for a "
        "--server at a loopback address)",
    )
    connection.add_argument(
        "--cacert", metavar="FILE",
        help="CA of an https server (default $BATCHD_CACERT or <state-dir>/tls/cert.pem)",
    )  # fmt: skip
    client = argparse.ArgumentParser(add_help=False, parents=[connection])
    client.add_argument("--json", action="store_true", help="print the API's JSON")
    api = [common, client]
    _resource_commands(commands, api)

    events = commands.add_parser("events", help="read the event log")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    tail = events_sub.add_parser(
        "tail", parents=api, help="print events (the last 10, or after --after N)"
    )
    _store_flag(tail, offline=True)
    where = tail.add_mutually_exclusive_group()  # from a position, or the last few
    where.add_argument("--after", type=_non_negative, help="print events after this position")
    where.add_argument(
        "-n", "--lines", type=_positive, default=10, help="how many of the last events"
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    tail.set_defaults(api="events_tail")

    export = events_sub.add_parser(
        "export", parents=[common, connection], help="print events as NDJSON (secrets redacted)"
    )
    _store_flag(export, offline=True)
    export.set_defaults(api="events_export")
    export.add_argument("--from", dest="from_", metavar="ISO", help="events recorded at or after")
    export.add_argument("--to", metavar="ISO", help="events recorded at or before")
    export.add_argument("--stream", help="only this stream (e.g. job-<id>, cluster-<ws>/<name>)")

    replay = commands.add_parser(
        "replay", parents=api, help="the clusters, nodes, queues and jobs at a past moment"
    )
    _store_flag(replay, offline=True)
    moment = replay.add_mutually_exclusive_group(required=True)
    moment.add_argument("--at", metavar="ISO", help="as of this time (UTC if no zone is given)")
    moment.add_argument(
        "--position", type=_non_negative, help="as of this log position (inclusive)"
    )
    replay.set_defaults(api="replay")

    _job_commands(commands, api)

    audit = commands.add_parser("audit", help="check the log's integrity")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_sub.add_parser("verify", parents=[common], help="verify the hash chain")
    _store_flag(verify)
    verify.add_argument("--expect", metavar="POSITION:HASH", help="an anchor kept elsewhere")
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")

    bench = commands.add_parser("bench", help="measure batchd")
    bench_jobs = _bench_count(BENCH_MAX_JOBS)
    bench_nodes, bench_gpus = _bench_count(BENCH_MAX_NODES), _bench_count(BENCH_MAX_GPUS)
    bench_concurrent = _bench_count(BENCH_MAX_CONCURRENT)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    append = bench_sub.add_parser("append", help="append throughput against the bare driver")
    _bench_store_flag(append)
    append.add_argument(
        "--batch",
        type=_bench_count(BENCH_MAX_BATCH),
        default=500,
        help="events per append (default 500)",
    )
    append.add_argument(
        "--writers", type=bench_concurrent, default=1, help="concurrent appenders (default 1)"
    )
    append.add_argument(
        "--events", type=_bench_count(BENCH_MAX_APPEND), default=100_000,
        help=f"events in all, at most {BENCH_MAX_APPEND:,}, held in memory: about 3 KB each "
        "(default 100000)",
    )  # fmt: skip
    append.add_argument("--json", action="store_true", help="print one JSON line")
    replay = bench_sub.add_parser("replay", help="replay throughput (generates a log if empty)")
    _bench_store_flag(replay)
    replay.add_argument(
        "--events", type=_bench_count(BENCH_MAX_EVENTS), default=200_000,
        help=f"events to generate if empty, at most {BENCH_MAX_EVENTS:,} (default 200000)",
    )  # fmt: skip
    replay.add_argument("--projections", choices=("none", "all"), default="none")
    replay.add_argument("--json", action="store_true", help="print one JSON line")
    schedule = bench_sub.add_parser("schedule", help="placement throughput of the planner")
    _bench_store_flag(schedule)
    schedule.add_argument("--jobs", type=bench_jobs, default=10_000, help="(default 10000)")
    schedule.add_argument("--nodes", type=bench_nodes, default=1000, help="(default 1000)")
    schedule.add_argument("--gpus-per-node", type=bench_gpus, default=8, help="(default 8)")
    schedule.add_argument("--json", action="store_true", help="print one JSON line")
    api = bench_sub.add_parser("api", help="job submission through a real daemon's API")
    api.add_argument("--jobs", type=bench_jobs, default=10_000, help="(default 10000)")
    api.add_argument("--clients", type=bench_concurrent, default=32, help="(default 32)")
    api.add_argument("--json", action="store_true", help="print one JSON line")
    e2e = bench_sub.add_parser("e2e", help="trivial jobs through a real daemon and agents")
    e2e.add_argument("--jobs", type=bench_jobs, default=500, help="(default 500)")
    e2e.add_argument("--nodes", type=_bench_count(BENCH_MAX_AGENTS), default=4,
                     help=f"agents to start, at most {BENCH_MAX_AGENTS} (default 4)")  # fmt: skip
    e2e.add_argument("--gpus-per-node", type=bench_gpus, default=8, help="(default 8)")
    e2e.add_argument("--runtime", choices=RUNTIMES, default="process")
    e2e.add_argument(
        "--image",
        default="busybox",
        help="docker: the image to run, already in the engine (default %(default)s)",
    )
    e2e.add_argument(
        "--docker-host", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        help="docker: the container engine's API (default $DOCKER_HOST)",
    )  # fmt: skip
    e2e.add_argument("--json", action="store_true", help="print one JSON line")
    memory = bench_sub.add_parser("memory", help="memory of the read models of N jobs, M nodes")
    memory.add_argument("--jobs", type=bench_jobs, default=100_000, help="(default 100000)")
    memory.add_argument("--nodes", type=bench_nodes, default=1000, help="(default 1000)")
    memory.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def _names(parser: argparse.ArgumentParser, *, experiment: bool = False) -> None:
    parser.add_argument("-w", "--workspace", default="default", help="(default: default)")
    if experiment:
        parser.add_argument("-e", "--experiment", default="default", help="(default: default)")


def _subcommands(commands, name: str, help: str, parents: list) -> tuple:
    """`batchd NAME create|list|show|delete`: the parsers of each, named NAME_<verb>."""
    group = commands.add_parser(name, help=help)
    verbs = group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    made = {}
    a = "an" if name[0] in "aeiou" else "a"
    for verb, text in (("create", f"create {a} {name}"), ("list", f"list {name}s"),
                       ("show", f"show {a} {name}"), ("delete", f"delete {a} {name}")):  # fmt: skip
        made[verb] = verbs.add_parser(verb, parents=parents, help=text)
        made[verb].set_defaults(api=f"{name}_{verb}")
        if verb != "list":
            made[verb].add_argument("name", help=f"the {name}'s name")
    return verbs, made


def _resource_commands(commands, api: list) -> None:
    _subcommands(commands, "workspace", "workspaces", api)

    _, experiment = _subcommands(commands, "experiment", "experiments (groups of jobs)", api)
    for parser in experiment.values():
        _names(parser)

    verbs, cluster = _subcommands(commands, "cluster", "clusters of GPU nodes", api)
    cluster["resize"] = verbs.add_parser("resize", parents=api, help="set a cluster's node count")
    cluster["resize"].set_defaults(api="cluster_resize")
    cluster["resize"].add_argument("name", help="the cluster's name")
    cluster["resize"].add_argument("--nodes", type=_non_negative, required=True,
                                   help="target node count (manual scale)")  # fmt: skip
    cluster["resize"].add_argument(
        "--node-deallocation-option", choices=("requeue", "terminate", "waitforjobcompletion"),
        help="what becomes of the jobs on nodes that go: requeued (Batch AI's default), "
             "terminated, or run to their end first (default: the cluster's, else requeue)",
    )  # fmt: skip
    for parser in cluster.values():
        _names(parser)
    create = cluster["create"]
    create.add_argument("-f", "--config-file", help="a Batch AI cluster JSON file")
    create.add_argument("-s", "--vm-size", help="VM size (overrides the file)")
    create.add_argument("--vm-priority", choices=("dedicated", "lowpriority"))
    create.add_argument("--nodes", type=_non_negative, help="target node count (manual scale)")

    node = commands.add_parser("node", help="a cluster's nodes")
    verbs = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    listing = verbs.add_parser("list", parents=api, help="nodes: state, GPUs, heartbeat age")
    listing.set_defaults(api="node_list")
    listing.add_argument("--cluster", metavar="[WORKSPACE/]NAME",
                         help="only this cluster's (a bare NAME is in -w's workspace)")  # fmt: skip
    _names(listing)
    show = verbs.add_parser("show", parents=api, help="one node, all it is known by")
    show.set_defaults(api="node_show")
    show.add_argument("id", help="the node's id")
    remove = verbs.add_parser("remove", parents=api,
                              help="remove a lost node (its machine gone for good)")  # fmt: skip
    remove.set_defaults(api="node_remove")
    remove.add_argument("id", help="the node's id")

    token = commands.add_parser("token", help="API tokens")
    verbs = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = verbs.add_parser("create", parents=api, help="create a token (printed once)")
    create.set_defaults(api="token_create")
    create.add_argument("--role", required=True, choices=("viewer", "operator", "admin", "agent"))
    create.add_argument("--name", dest="token_name", required=True, help="who or what it is for")
    create.add_argument("-w", "--workspace", dest="scopes", action="append", metavar="WORKSPACE",
                        help="limit it to this workspace (repeatable)")  # fmt: skip
    create.add_argument("--node", help="(role agent) bind it to this node id: it speaks for "
                                       "that node only")  # fmt: skip
    verbs.add_parser("list", parents=api, help="list tokens").set_defaults(api="token_list")
    revoke = verbs.add_parser("revoke", parents=api, help="revoke a token")
    revoke.set_defaults(api="token_revoke")
    revoke.add_argument("id", help="the token's id (token list)")


def _job_commands(commands, api: list) -> None:
    verbs, job = _subcommands(commands, "job", "jobs", api)
    for verb, text in (
        ("terminate", "terminate a job"), ("wait", "wait for a job to end"),
        ("history", "a job's timeline (deleted jobs and reused names too)"),
    ):  # fmt: skip
        job[verb] = verbs.add_parser(verb, parents=api, help=text)
        job[verb].set_defaults(api=f"job_{verb}")
        job[verb].add_argument("name", help="the job's name")
    _store_flag(job["history"], offline=True)
    job["wait"].description = (
        "Wait for the job to end, riding out a restart of the daemon, and exit with the job's "
        "exit code (1 if it failed without one); 124 when --timeout runs out, 125 when "
        "batchd cannot tell how the job ended: the server cannot be reached (for 30 s once it "
        "has answered, at once if it never has: a mistyped --server), refuses the wait (no "
        "such job, a token revoked), or the job is deleted (a new job of its name is not "
        "taken for it)."
    )
    job["wait"].add_argument("--timeout", type=_seconds, metavar="S",
                             help="give up after S seconds (exit 124)")  # fmt: skip
    create = job["create"]
    create.add_argument("--cluster", help="the cluster's name (or resource id)")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("-f", "--config-file", help="a Batch AI job JSON file")
    source.add_argument(
        "--command",
        help="the command line to run (Batch AI's "
        "customToolkitSettings: on the job's first node; the other nodes "
        "of a multi-node job are held for it, as an MPI job's are)",
    )
    create.add_argument("--image", help="container image")
    create.add_argument("--nodes", type=_positive, help="node count")
    create.add_argument("--gpus-per-node", type=_non_negative, help="GPUs on each node")
    create.add_argument("--priority", type=_priority, help="low, normal, high or -1000..1000")
    create.add_argument("--max-retries", type=_non_negative, help="retries after a failure")
    create.add_argument("--env", type=_env_pair, action="append", metavar="NAME=VALUE",
                        help="an environment variable (repeatable)")  # fmt: skip
    job["list"].add_argument("--state", help="only jobs in this state (queued, running, ...)")
    job["list"].add_argument("--cluster", help="only jobs on this cluster")

    run = verbs.add_parser("exec", parents=api, help="run a command beside a running job")
    run.set_defaults(api="job_exec")
    run.add_argument("name", help="the job's name")
    run.add_argument("--node", type=_non_negative, default=0,
                     help="the job's task (node) index (default 0)")  # fmt: skip
    run.add_argument("cmd", nargs="*", metavar="-- CMD",
                     help="the command and its arguments, after --")  # fmt: skip
    job["exec"] = run

    file = verbs.add_parser("file", help="a job's output files")
    file_verbs = file.add_subparsers(dest="file_command", required=True, metavar="COMMAND")
    listing = file_verbs.add_parser("list", parents=api, help="list a job's files")
    listing.set_defaults(api="job_file_list")
    listing.add_argument("--directory", default=".", help="(default: .)")
    stream = file_verbs.add_parser("stream", parents=api, help="print a file as it grows")
    stream.set_defaults(api="job_file_stream")
    stream.add_argument("--file", default="stdout.txt", help="(default: stdout.txt)")
    for parser in (listing, stream):
        parser.add_argument("name", help="the job's name")
        parser.add_argument("--attempt", type=_positive, help="(default: the latest)")
        parser.add_argument("--output-directory-id", default="stdouterr",
                            help="(default: stdouterr)")  # fmt: skip
    for parser in (*job.values(), listing, stream):
        _names(parser, experiment=True)


def _store_flag(parser: argparse.ArgumentParser, *, offline: bool = False) -> None:
    which = parser.add_mutually_exclusive_group()
    if offline:  # without --store or --config the command asks the server
        which.add_argument("--store", help="read this event log URL offline, read-only")
    else:
        which.add_argument(
            "--store", help="event log URL, read-only (default: the state directory's log)"
        )
    which.add_argument(
        "--config", metavar="FILE",
        help="read the event log the daemon's TOML configuration names ([store] url, else its "
             "state directory's), offline, read-only",
    )  # fmt: skip


def _bench_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="event log URL (default: a fresh temporary SQLite file)")


# The benches build their inputs in memory: bound what they are asked for, so that a typo
# fails at once instead of eating the machine's memory.
BENCH_MAX_APPEND = 10_000_000  # bench append: every event is held (plan and rows), ~3 KB each
BENCH_MAX_EVENTS = 100_000_000  # bench replay: the generated log is streamed into the store
BENCH_MAX_JOBS = 10_000_000  # --jobs of bench schedule, api, e2e and memory
BENCH_MAX_NODES = 100_000  # --nodes of bench schedule and memory (simulated, in memory)
BENCH_MAX_AGENTS = 64  # --nodes of bench e2e: an agent process each, on this machine
BENCH_MAX_GPUS = 64  # --gpus-per-node (the largest GPU VM sizes have 8 or 16)
BENCH_MAX_BATCH = 100_000  # --batch of bench append: events in one append
BENCH_MAX_CONCURRENT = 1_000  # --writers of bench append, --clients of bench api


def _bench_count(limit: int):
    """An argparse type: a whole number from 1 to `limit`."""

    def count(text: str) -> int:
        value = _positive(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text} is too large (at most {limit:,})")
        return value

    return count


def _dispatch(args: argparse.Namespace):
    from batchd.scheduler import cli_log, cli_replay, daemon
    from batchd.scheduler.bench import api as bench_api
    from batchd.scheduler.bench import append, e2e, memory, replay, schedule

    if args.command == "serve":
        return daemon.main(args)
    if args.command == "agent":
        from batchd.scheduler import agent

        return agent.main(args)
    offline = {"events_tail": cli_log.tail, "events_export": cli_replay.export,
               "replay": cli_replay.replay, "job_history": cli_replay.job_history}  # fmt: skip
    if getattr(args, "api", None):
        read_offline = getattr(args, "store", None) is not None or (
            getattr(args, "config", None) is not None
        )
        if read_offline and args.api in offline:  # (--store "" too: a bad URL, said so)
            return offline[args.api](args)
        from batchd.scheduler import cli_api

        return getattr(cli_api, args.api)(args)
    if args.command == "audit":
        return cli_log.verify(args)
    benches = {
        "append": append.main, "replay": replay.main, "memory": memory.main,
        "schedule": schedule.main, "api": bench_api.main, "e2e": e2e.main,
    }  # fmt: skip
    return benches[args.bench_command](args)


# Collect young objects after 50,000 net allocations instead of CPython's 700. Reading the log
# allocates several objects per event, nearly all of them garbage within a page or kept for
# good in the read models; with the default, collections take a third of replay time.
GC_THRESHOLDS = (50_000, 20, 20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    if argv[:2] == ["job", "exec"] and "--" in argv:  # the command is all that follows --
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if command is not None:
        args.cmd = command
    if args.command == "serve":
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        if args.tls_self_signed and args.tls_cert:
            parser.error("give --tls-cert and --tls-key, or --tls-self-signed, not both")
    gc.set_threshold(*GC_THRESHOLDS)
    serving = args.command in ("serve", "agent")
    logs.configure(json=serving, level=logging.INFO if serving else logging.WARNING)
    try:
        result = _dispatch(args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else int(result or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except client.ApiError as exc:  # the server's message, then each field path and problem
        print(error_text(exc.lines()), file=sys.stderr)
        return EXIT_FAILURE
    except (CliError, client.ClientError, config.ConfigError, errors.StoreError,
            ValueError) as exc:  # fmt: skip
        print(f"batchd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # a file or directory the command needs (state dir, keys, output)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"batchd: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # python -m batchd.scheduler.cli: run the package's own copy, whose
    # exception classes are those the rest of batchd raises (this one is `__main__`'s)
    from batchd.scheduler.cli import main as package_main

    sys.exit(package_main())
