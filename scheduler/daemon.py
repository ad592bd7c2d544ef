"""`batchd serve`: the daemon.

For now the daemon owns the log (taking leadership, so any older writer is fenced), restores
the read models (newest snapshot, then catch-up) and follows the log with them, publishes the
log's head anchor periodically (a log line `log.anchor` an operator can keep elsewhere for
`batchd audit verify --expect`), and serves `GET /healthz` and `GET /readyz`. It stops
gracefully on SIGTERM or SIGINT: stop accepting, finish in-flight appends, save a read-model
snapshot, close the log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from batchd.events import errors, urls
from batchd.events.codec import Codec
from batchd.events.store import EventStore
from batchd.projections.runner import SNAPSHOT_INTERVAL, Runner
from batchd.scheduler import config

logger = structlog.get_logger(__name__)

ANCHOR_INTERVAL = 60.0  # seconds between head-anchor log lines
STORE_KEY = web.AppKey("store", EventStore)
MODELS_KEY = web.AppKey("models", Runner)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    head = await store.head()
    return web.json_response({
        "status": "ready", "position": head.position, "epoch": store.epoch,
        "readModelsPosition": request.app[MODELS_KEY].position,
    })  # fmt: skip


def build_app(store: EventStore, models: Runner) -> web.Application:
    app = web.Application()
    app[STORE_KEY] = store
    app[MODELS_KEY] = models
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _stopped_early(task: asyncio.Task, stop: asyncio.Event, failed: list[str]) -> None:
    """A task the daemon cannot run without ended: log why and stop the daemon (exit 1)."""
    if task.cancelled():
        return
    error = task.exception()
    failed.append(task.get_name())
    logger.error("daemon.task_failed", task=task.get_name(),
                 error=repr(error) if error else "returned")  # fmt: skip
    stop.set()


async def publish_anchor(store: EventStore) -> None:
    head = await store.head()
    logger.info("log.anchor", position=head.position, hash=head.hash.hex(), epoch=head.epoch)


async def main(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, state=args.state_dir, store=args.store, listen=args.listen)
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keyring = config.load_keyring(cfg, create=True)
    store = await urls.open_store(cfg.store_url, codec=Codec(keyring))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = Runner(store)
    runner = web.AppRunner(build_app(store, models), access_log=None)
    periodic = AsyncIOScheduler()
    following = None
    failed: list[str] = []  # names of tasks that ended on their own
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, cfg.listen_host, cfg.listen_port).start()
        except OSError as exc:  # bind first: a daemon that cannot serve must not fence another
            where = f"{cfg.listen_host}:{cfg.listen_port}"
            raise ValueError(f"cannot listen on {where}: {exc.strerror}") from None
        await store.take_leadership()
        restored = await models.restore()
        logger.info("projections.restored", position=models.position,
                    snapshot=restored.snapshot_position, replayed=restored.replayed)  # fmt: skip
        following = asyncio.create_task(models.follow(), name="read-models")
        following.add_done_callback(lambda task: _stopped_early(task, stop, failed))
        periodic.add_job(models.save_snapshot, "interval", seconds=SNAPSHOT_INTERVAL)
        periodic.add_job(publish_anchor, "interval", args=[store], seconds=ANCHOR_INTERVAL)
        periodic.start()
        await publish_anchor(store)
        logger.info("daemon.started", listen=f"{cfg.listen_host}:{cfg.listen_port}",
                    store=str(urls.parse(cfg.store_url)), state_dir=str(cfg.state_dir))  # fmt: skip
        await stop.wait()
        logger.info("daemon.stopping")
    finally:
        with contextlib.suppress(Exception):
            periodic.shutdown(wait=False)
        await runner.cleanup()
        if following is not None:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following  # its failure, if any, was logged when it happened
            try:
                await models.save_snapshot()
            except errors.StoreError as exc:
                logger.warning("projections.snapshot_failed", error=str(exc))
        await store.close()
    logger.info("daemon.stopped")
    return 1 if failed else 0
