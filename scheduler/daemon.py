"""`batchd serve`: the daemon.

One asyncio process owns the log (it takes leadership, so any older writer is fenced),
restores the read models (newest snapshot, then catch-up) and follows the log with them,
runs the planner whenever the log moves, runs periodic work on APScheduler (wall-clock
limits, read-model snapshots, the head anchor: a log line `log.anchor` an operator can keep
elsewhere for `batchd audit verify --expect`), and serves the HTTP API (scheduler/api.py),
`GET /healthz` and `GET /readyz`. If a task it cannot run without ends, it stops with exit 1;
once another daemon has taken the log over (an append was fenced), it stops with exit 3.
Periodic work that fails is logged (`daemon.periodic_failed`) and runs again at its next time.
On SIGTERM or SIGINT it stops gracefully: stop accepting, let in-flight requests and appends
finish, save a read-model snapshot, close the log, exit 0.

On first start it creates an admin token and writes it to `<state-dir>/admin.token` (mode
0600), which the CLI on the same machine uses when given no token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from batchd.events import errors, urls
from batchd.events.codec import Codec
from batchd.events.secrets import Keyring, sealed_in
from batchd.events.store import EventStore
from batchd.projections.model import job_key
from batchd.projections.runner import SNAPSHOT_INTERVAL, Runner
from batchd.scheduler import api, commands, config, httpserver, planner, systemd, tls
from batchd.scheduler.control import Control, token_file
from batchd.scheduler.nodes import NodeService
from batchd.scheduler.providers import LocalProvider, Provider, retire_local_tokens

logger = structlog.get_logger(__name__)

ANCHOR_INTERVAL = 60.0  # seconds between head-anchor log lines
OVERDUE_INTERVAL = 5.0  # seconds between wall-clock checks
SWEEP_INTERVAL = 1.0  # seconds between looks for silent nodes
TASK_STOP_TIMEOUT = 10.0  # seconds the daemon waits for its tasks to end when it stops
# seconds a stopping daemon waits for a periodic job under way (a snapshot: the stop saves
# one anyway) before it cancels it: the rest of the stop must fit systemd's TimeoutStopSec
PERIODIC_STOP_TIMEOUT = 3.0
FOLD_AT_STOP = 5.0  # seconds it waits for the read models to take in the log before its snapshot
PLAN_IDLE = 10.0  # seconds between planner cycles while the log stands still
PLAN_GAP = 0.02  # least seconds between two planner cycles: a busy log is planned in batches
PLAN_RETRY_MAX = 5.0  # most seconds between planner cycles while the log refuses appends
ADMIN_TOKEN_FILE = "admin.token"
KEY_CHECK_EVENTS = 5_000  # the newest events in which a start looks for a secret to open
LEAD_CHECK = 1.0  # seconds between checks that the leader lock is held still
# seconds a leader may go unable to confirm its lock (its database away) before its agents are
# refused (503), so that their leases run out and their tasks stop: a standby that reaches the
# database may have taken the log over, and will run those jobs again
LEAD_GRACE = 3.0
STANDBY_POLL = 1.0  # seconds between a standby's tries of the leader lock
FENCED_EXIT = 3  # exit status of a daemon another one took the log over from (see deploy/)
ACTOR = "batchd:serve"  # the actor of what the daemon itself logs
DAEMON_KEY = web.AppKey("daemon", object)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once started and while this daemon is the log's writer (503 `starting` before;
    503 `fenced` once another writer took the leadership: it can append nothing more;
    503 `stopping` once it stops for any other reason)."""
    daemon: Daemon = request.app[DAEMON_KEY]  # type: ignore[assignment]
    head = await daemon.store.head()
    if daemon.fenced_out or (daemon.store.epoch is not None and head.epoch != daemon.store.epoch):
        status = "fenced"
    elif daemon.stopping.is_set():
        status = "stopping"
    else:
        status = "ready" if daemon.ready else "starting"
    return web.json_response({
        "status": status, "position": head.position,
        "epoch": daemon.store.epoch, "logEpoch": head.epoch,
        "readModelsPosition": daemon.models.position,
    }, status=200 if status == "ready" else 503)  # fmt: skip


def _now_us() -> int:
    return time.time_ns() // 1000


class Daemon:
    """The running daemon; `start()` then `stop()`, or `run()` until a signal."""

    def __init__(self, cfg: config.Config, notifier: systemd.Notifier | None = None) -> None:
        self.cfg = cfg
        self.systemd = notifier or systemd.Notifier()  # (none: systemd is not told)
        self.stopping = asyncio.Event()
        self.failed: list[str] = []  # names of tasks that ended on their own
        self.fenced_out = False  # another daemon took the log over: this one stops
        self.lead_confirmed_at = time.monotonic()  # the leader lock last seen held
        self.lead_doubted = False  # the lock could not be confirmed at the last check
        self.url = ""
        self.admin_token = ""
        self.cert: Path | None = None  # the certificate it serves https with
        self.ready = False  # started: leading the log, read models restored (/readyz)
        self.store: EventStore = None  # type: ignore[assignment]
        self.models: Runner = None  # type: ignore[assignment]
        self.control: Control = None  # type: ignore[assignment]
        self._web: web.AppRunner | None = None
        self.api: api.Api | None = None
        self.nodes: NodeService = None  # type: ignore[assignment]
        self.providers: list[Provider] = []  # those this configuration has
        self._periodic = AsyncIOScheduler()
        self._periodic_running: set[asyncio.Task] = set()  # its jobs under way
        self._periodic_closed = False
        self._tasks: list[asyncio.Task] = []
        self._plan_seconds = 0.0  # how long the last planner cycle took

    @property
    def state_dir(self) -> Path:
        return self.cfg.state_dir

    async def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keyring = config.load_keyring(cfg, create=False)
        ssl_context = self._tls()
        self.store = await urls.open_store(cfg.store_url, codec=Codec(keyring))
        await self._keys_for_the_log(keyring)  # at once: a standby learns it now, not at takeover
        if self.systemd.watchdog is not None:
            self._task(self.systemd.feed_watchdog(), "watchdog")
        if not await self._stand_by():
            return  # stopped while standing by
        if keyring is None:  # made only now: a start refused for its log leaves no key behind
            await self._keys_for_the_log(keyring)  # (another daemon wrote it meanwhile)
            keyring = self.store.codec.keyring = config.load_keyring(cfg, create=True)
        self.models = Runner(self.store)
        self.control = Control(self.store, self.models)
        self.api = service = api.Api(self.store, self.models, self.control, keyring, cfg.mounts,
                                         cfg.catalog)  # fmt: skip
        self.nodes = NodeService(self.store, self.models, self.control, cfg.mounts,
                                 cfg.state_dir, cfg.catalog)  # fmt: skip
        self.nodes.leading = self._leading
        service.heard_from = self.nodes.seen
        service.resize_changes = self._resize_changes
        service.nodes = self.nodes
        app = api.build(service, self._add_service_routes)
        self._web = httpserver.AppRunner(app, access_log=None, handle_signals=False)
        await self._web.setup()
        site = web.TCPSite(self._web, cfg.listen_host, cfg.listen_port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:  # bind first: a daemon that cannot serve must not fence another
            where = f"{cfg.listen_host}:{cfg.listen_port}"
            raise ValueError(f"cannot listen on {where}: {exc.strerror}") from None
        port = site._server.sockets[0].getsockname()[1]  # the port, also when asked for 0
        host = cfg.listen_host if ":" not in cfg.listen_host else f"[{cfg.listen_host}]"
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
        if ssl_context is None and not config.is_loopback(cfg.listen_host):
            logger.warning("server.plaintext", listen=cfg.listen_host,
                           said="tokens, and the secrets agents are given to start tasks, "
                                "cross the network in clear: serve TLS (--tls-cert and "
                                "--tls-key, or --tls-self-signed)")  # fmt: skip
        await self.store.take_leadership()
        restored = await self.models.restore()
        logger.info("projections.restored", position=self.models.position,
                    snapshot=restored.snapshot_position, replayed=restored.replayed)  # fmt: skip
        # What was restored lives long: later collections need not walk it again (with
        # 175,000 jobs, one full collection would hold the event loop for about 0.35 s);
        # stop() lets the collector see it again.
        gc.freeze()
        self._task(self.models.follow(), "read-models")
        if cfg.local_nodes:  # (made before this start's first event: see restarted)
            self.providers.append(LocalProvider(
                self.control, self.url, cfg.state_dir, cfg.local_nodes, cfg.local_gpus,
                cfg.local_runtimes, cfg.local_docker_host, cfg.catalog, self.cert))  # fmt: skip
        self.admin_token = await self._admin_token()
        if not cfg.local_nodes:  # no local agent runs: none of their tokens is of use any more
            await retire_local_tokens(self.control, cfg.state_dir)
        for provider in self.providers:
            await provider.bootstrap()
        self._task(self._plan_loop(), "planner")
        self._task(self._watch_fence(), "fence")
        for job, seconds in ((self.models.save_snapshot, SNAPSHOT_INTERVAL),
                             (self._publish_anchor, ANCHOR_INTERVAL),
                             (self._enforce_wall_clock, OVERDUE_INTERVAL),
                             (self._finish_jobs, OVERDUE_INTERVAL),
                             (self.nodes.sweep, SWEEP_INTERVAL),
                             (self._keep_lead, LEAD_CHECK)):  # fmt: skip
            self._periodic.add_job(self._periodic_job(job), "interval", seconds=seconds,
                                   name=job.__qualname__)  # fmt: skip
        self.lead_confirmed_at = time.monotonic()  # (held since it was taken: checked from now)
        self._periodic.start()
        await self._publish_anchor()
        self.ready = service.serving = True
        logger.info("daemon.started", url=self.url, store=str(urls.parse(cfg.store_url)),
                    state_dir=str(cfg.state_dir))  # fmt: skip
        self.systemd.notify("READY=1", f"STATUS=serving on {self.url}, leading the log")

    async def _keys_for_the_log(self, keyring: Keyring | None) -> None:
        """Refuse to lead a log that holds events with no secret keys: a new key would seal
        under the same id as the keys it was written with, and open none of their secrets
        (jobs that carry some would fail). A daemon needs the keys of the log it leads; with
        keys, the newest secret of the log's last KEY_CHECK_EVENTS events must open with
        them, if it is of a key id they hold (keys of the same id but other bytes: another
        daemon's)."""
        head = (await self.store.head()).position
        if head == 0:
            return
        if keyring is not None:
            await self._keys_open_the_log(keyring, head)
            return
        where = self.cfg.keys_file or self.cfg.state_dir / "secret.keys"
        raise ValueError(
            f"the log {urls.parse(self.cfg.store_url)} holds events, but this daemon has no "
            f"secret keys ({where} does not exist, ${config.KEYS_ENV} is not set): give it the "
            "keys the log was written with (the other daemon's secret.keys, or the same "
            f'${config.KEYS_ENV}); docs/event-log.md, "Secrets"'
        )

    async def _keys_open_the_log(self, keyring: Keyring, head: int) -> None:
        events = await self.store.read_all(max(0, head - KEY_CHECK_EVENTS), KEY_CHECK_EVENTS)
        # (one sealed with a key id it has not: a lost key, replaced under a new id, see
        # docs/event-log.md; its secrets stay shut, and the daemon may start)
        newest = next((v for e in reversed(events) for v in sealed_in(e.data)
                       if keyring.holds(v.key_id)), None)  # fmt: skip
        if newest is None:
            return
        try:
            keyring.open(newest)
        except errors.SecretUnopenable as exc:
            raise ValueError(
                f"the log {urls.parse(self.cfg.store_url)} holds secrets this daemon's keys do "
                f"not open ({exc}): give it the keys the log was written with (the other "
                f"daemon's secret.keys, or the same ${config.KEYS_ENV}); docs/event-log.md, "
                '"Secrets"'
            ) from None

    async def _stand_by(self) -> bool:
        """Hold the log's leader lock, waiting as a standby while another daemon leads the
        log; False if stopped meanwhile. A standby serves nothing (its port stays free) and
        takes over, restoring the read models, when the lock frees."""
        if await self.store.try_lock_leader():
            return True
        where = str(urls.parse(self.cfg.store_url))
        message = "another daemon leads this log; this one waits to take over"
        logger.warning("daemon.standby", store=where, message=message)
        self.systemd.notify("READY=1", f"STATUS=standby: {message}")  # (started, as a standby)
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), STANDBY_POLL)
            if self.stopping.is_set():
                break
            try:
                if await self.store.try_lock_leader():
                    self.lead_confirmed_at = time.monotonic()
                    logger.info("daemon.taking_over", store=where)
                    self.systemd.notify("STATUS=taking the log over: restoring the read models")
                    return True
            except errors.StoreUnavailable as exc:  # a blip of the database: wait on
                logger.warning("daemon.standby_unavailable", error=str(exc))
        return False

    async def _keep_lead(self) -> None:
        """Hold the leader lock still, taking it again if its connection was lost (a
        PostgreSQL restart). If another daemon took it meanwhile, stop at once, as a fenced
        daemon does (exit 3), rather than run work until an append is fenced. While the lock
        cannot be confirmed (the database away, or hanging), see `_leading`."""
        try:
            held = await self.store.try_lock_leader()
        except errors.StoreUnavailable as exc:
            if not self.lead_doubted:  # (said once, not at every check)
                self.lead_doubted = True
                logger.warning("daemon.leader_lock_unconfirmed", error=str(exc),
                               agents_refused_after=LEAD_GRACE)  # fmt: skip
            return
        if not held:
            logger.error("daemon.leader_lock_lost", message="another daemon holds this log's "
                         "leader lock and takes the log over")  # fmt: skip
            self._fenced(None)
            return
        self.lead_confirmed_at = time.monotonic()
        if self.lead_doubted:
            self.lead_doubted = False
            logger.info("daemon.leader_lock_confirmed")

    def _leading(self) -> bool:
        """Does this daemon lead the log still, as far as it can tell? Not once another took
        it over, nor when it has not confirmed its lock for LEAD_GRACE past a check."""
        unconfirmed = time.monotonic() - self.lead_confirmed_at > LEAD_CHECK + LEAD_GRACE
        return not (self.fenced_out or unconfirmed)

    def _tls(self):
        """The server's TLS context (None: plain HTTP); `self.cert` its certificate, which
        the local agents check the daemon against."""
        cfg = self.cfg
        if cfg.tls_self_signed:
            self.cert, key = tls.self_signed(cfg.state_dir / "tls", cfg.listen_host)
            return tls.server_context(self.cert, key)
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            self.cert = cfg.tls_cert
            return tls.server_context(cfg.tls_cert, cfg.tls_key)
        return None

    def _add_service_routes(self, app: web.Application) -> None:
        app[DAEMON_KEY] = self
        self.nodes.add_routes(app)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)

    def _task(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._stopped_early)
        self._tasks.append(task)

    def _stopped_early(self, task: asyncio.Task) -> None:
        """A task the daemon cannot run without ended: log why and stop the daemon (exit 1;
        FENCED_EXIT if another daemon has taken the log over)."""
        if task.cancelled():
            return
        error = task.exception()
        if self.store.fenced.is_set() or isinstance(error, errors.FencedError):
            self._fenced(error)
            return
        self.ready = False
        self.failed.append(task.get_name())
        logger.error("daemon.task_failed", task=task.get_name(),
                     error=repr(error) if error else "returned", exc_info=error)  # fmt: skip
        self.stopping.set()

    async def _watch_fence(self) -> None:
        """Stop at once when an append finds that another daemon has taken the log over: this
        one can append nothing more (its API answers 503 meanwhile)."""
        await self.store.fenced.wait()
        self._fenced(None)

    def _fenced(self, error: BaseException | None) -> None:
        if self.fenced_out:
            return
        self.fenced_out = True
        self.ready = False
        current = self.store.fenced_by
        if current is None and isinstance(error, errors.FencedError):
            current = error.current
        logger.error("daemon.fenced", epoch=self.store.epoch, log_epoch=current,
                     message="another daemon has taken over the log; this one stops "
                     f"(exit {FENCED_EXIT}) and is not to be restarted over it")  # fmt: skip
        self.stopping.set()

    async def _admin_token(self) -> str:
        """The admin token of `<state-dir>/admin.token`, made (and logged as a hash) when the
        file is missing or holds a token the log does not know."""
        path = self.cfg.state_dir / ADMIN_TOKEN_FILE
        token = await token_file(self.control, path, "admin", "admin", ACTOR)
        logger.info("auth.admin_token", path=str(path))
        for secret in (path, self.cfg.keys_file or self.cfg.state_dir / "secret.keys"):
            _warn_if_readable(secret)
        return token

    async def _plan_loop(self) -> None:
        """A planner cycle whenever the log has moved (or every PLAN_IDLE seconds)."""
        planned_at = -1
        last = 0.0
        refused = 0  # cycles in a row the log refused (its disk full, its database away)
        while True:
            position = self.models.position
            if position != planned_at or time.monotonic() - last >= PLAN_IDLE:
                planned_at, last = position, time.monotonic()
                gap = PLAN_GAP
                try:
                    # first: a job its cluster grows for is told cluster_scaling at once
                    await self._resize_changes()
                    await self.control.run(lambda m: self._timed_plan(m))
                    await self.nodes.dispatch()
                    for provider in self.providers:
                        await provider.reconcile()
                    if commands.finish_deletions(self.models.models, ACTOR):  # any due?
                        await self.control.run(lambda m: commands.finish_deletions(m, ACTOR),
                                               structural=True)  # fmt: skip
                    refused = 0
                except errors.StoreUnavailable as exc:  # plan again once it is back
                    logger.warning("planner.store_unavailable", error=str(exc))
                    planned_at = -1
                    refused += 1  # tried again ever more slowly: a log line every 5 s at most
                    gap = min(PLAN_RETRY_MAX, PLAN_GAP * 2**refused)
                # a long cycle (a long queue) waits longer: planning takes at most a quarter
                await asyncio.sleep(max(gap, 3 * self._plan_seconds))
            with contextlib.suppress(TimeoutError):
                await self.models.wait_for(planned_at + 1, 1.0)

    async def _resize_changes(self) -> int | None:
        """Each cluster's allocation state, against the node counts its provider wants (by
        the planner loop, and at once after a cluster's write: api.Api.resize_changes); the
        position of what it appended, if anything."""
        if not commands.resize_changes(self.models.models, ACTOR, self._wanted()):  # any due?
            return None
        return await self.control.run(  # (one at a time, on the counts wanted as it decides)
            lambda m: commands.resize_changes(m, ACTOR, self._wanted()), key="allocation-states"
        )

    def _wanted(self) -> dict[str, int]:
        """The node counts the providers want, by cluster id."""
        wanted: dict[str, int] = {}
        for provider in self.providers:
            wanted.update(provider.wanted())
        return wanted

    def _timed_plan(self, models) -> list:
        started = time.perf_counter()
        decisions = planner.plan(models, _now_us())
        self._plan_seconds = time.perf_counter() - started
        return decisions

    async def _enforce_wall_clock(self) -> None:
        await self.control.run(lambda m: planner.overdue(m, _now_us()))

    async def _finish_jobs(self) -> None:
        """`commands.finish_jobs`, one job at a time under the job's own lock (the API's and
        the agent channel's for it): decided twice at once, its events would be too."""
        due = {event.data["jobId"] for _s, event in commands.finish_jobs(self.models.models,
                                                                        ACTOR)}  # fmt: skip
        for job_id in due:  # (rarely any)
            job = self.models.models.jobs.get(job_id)
            if job is None:
                continue
            key = job_key(job.workspace, job.experiment, job.name)
            await self.control.run(lambda m, j=job_id: commands.finish_one(m, j, ACTOR), key=key)

    async def _publish_anchor(self) -> None:
        head = await self.store.head()
        logger.info("log.anchor", position=head.position, hash=head.hash.hex(), epoch=head.epoch)

    def _periodic_job(self, job: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
        """A periodic job whose failure is logged (structured) and does not stop the next
        run (a fenced append is the fence watcher's to act on: see _watch_fence); each run
        is known while under way, so that a stopping daemon ends it before the log closes."""

        async def run() -> None:
            if self._periodic_closed:  # (started as the daemon stopped)
                return
            task = asyncio.current_task()
            self._periodic_running.add(task)
            try:
                await job()
            except errors.FencedError:
                pass
            except errors.StoreUnavailable as exc:  # the log away for now: said in a line
                logger.warning("daemon.periodic_store_unavailable", job=job.__qualname__,
                               error=str(exc))  # fmt: skip
            except Exception:
                logger.exception("daemon.periodic_failed", job=job.__qualname__)
            finally:
                self._periodic_running.discard(task)

        return run

    async def _stop_periodic(self) -> None:
        """No more periodic runs; the ones under way (a snapshot being saved, a check of the
        leader lock) end first, waited for up to PERIODIC_STOP_TIMEOUT, then cancelled."""
        self._periodic_closed = True
        self._periodic.remove_all_jobs()
        running = list(self._periodic_running)
        if running:
            _done, late = await asyncio.wait(running, timeout=PERIODIC_STOP_TIMEOUT)
            await self._cancel(list(late))
        with contextlib.suppress(Exception):  # (never started: a start that failed early)
            self._periodic.shutdown(wait=False)  # (which cancels what still runs)

    async def _cancel(self, tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:  # a failure, if any, was logged when it happened
            _done, stuck = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT)
            for task in stuck:
                logger.warning("daemon.task_did_not_stop", task=task.get_name())

    def _stopping_status(self) -> str:
        """What systemd's status says while the daemon stops: why, where it is not asked to."""
        if self.fenced_out:
            return f"stopping: fenced, another daemon took the log over (exit {FENCED_EXIT})"
        if self.failed:
            return f"stopping: {', '.join(self.failed)} ended on its own (exit 1)"
        return "stopping"

    async def stop(self) -> None:
        self.ready = False
        self.stopping.set()  # (also after a failed start: /readyz says stopping, not starting)
        started = bool(self.url)  # a daemon that failed to start says so once, not "stopping"
        if started:
            logger.info("daemon.stopping")
        self.systemd.notify("STOPPING=1", f"STATUS={self._stopping_status()}")
        await self._stop_periodic()
        if self.api is not None:
            self.api.closing.set()  # streams end
        if self.nodes is not None:
            self.nodes.close()  # long-polls answer at once
        for provider in self.providers:
            await provider.stop()  # the local one's agents stop their tasks
        if self._web is not None:
            await self._web.cleanup()  # stops accepting; lets in-flight requests finish
        following = [t for t in self._tasks if t.get_name() == "read-models"]
        await self._cancel([t for t in self._tasks if t not in following])
        if following and not following[0].done():  # the snapshot takes in all that was written
            with contextlib.suppress(TimeoutError, errors.StoreError):
                await self.store.drain(FOLD_AT_STOP)
                head = (await self.store.head()).position
                await self.models.wait_for(head, FOLD_AT_STOP)
        await self._cancel(following)
        if self.models is not None and self.models.position and not self.fenced_out:
            try:
                await self.models.save_snapshot()
                await self._publish_anchor()  # the last word: what stopping appended too
            except errors.StoreError as exc:
                logger.warning("projections.snapshot_failed", error=str(exc))
        if self.store is not None:
            await self.store.close()
        gc.unfreeze()  # what start froze may be garbage now (a process may start another)
        if started:
            logger.info("daemon.stopped")


async def main(args: argparse.Namespace) -> int:
    cfg = config.load(
        args.config, state=args.state_dir, store=args.store, listen=args.listen,
        tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
        tls_self_signed=getattr(args, "tls_self_signed", False),
    )  # fmt: skip
    daemon = Daemon(cfg, systemd.Notifier.from_environment())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    try:
        await daemon.start()
        await daemon.stopping.wait()
    finally:
        await daemon.stop()
    if daemon.fenced_out:
        return FENCED_EXIT
    return 1 if daemon.failed else 0


def _warn_if_readable(path: Path) -> None:
    """Say so (`state.readable_by_others`) when a file of secrets (the admin token, the
    secret keys) may be read by others than batchd's user: its mode was changed by hand."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:  # (no keys file: the keys come from the environment)
        return
    if mode & 0o077:
        logger.warning("state.readable_by_others", path=str(path), mode=f"{mode:04o}",
                       fix=f"chmod 600 {path}")  # fmt: skip
