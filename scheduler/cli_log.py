"""`batchd events tail` and `batchd audit verify`: offline, read-only views of the log."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from batchd.events import audit, errors, jsonform, urls
from batchd.events.codec import Codec
from batchd.events.envelope import RecordedEvent
from batchd.events.secrets import Keyring
from batchd.events.store import EventStore
from batchd.events.timeutil import to_iso
from batchd.scheduler import config


async def open_readonly(args: argparse.Namespace) -> EventStore:
    url = args.store  # ("" is a bad URL, not the default one)
    if url is None and args.config is not None:  # the daemon's: [store] url, or its state dir
        if not args.config:
            raise ValueError("--config: give the path of the daemon's configuration file")
        url = config.load(args.config, state=args.state_dir).store_url
    elif url is None:
        url = config.default_store_url(config.state_dir(args.state_dir))
    if urls.parse(url).scheme == "memory":
        raise ValueError("a memory:// log lives only inside one process: give a file or database")
    return await urls.open_store(url, readonly=True, codec=Codec(_keys(args)))


def _keys(args: argparse.Namespace) -> Keyring | None:
    """The daemon's secret keys where this user can read them: $BATCHD_SECRET_KEYS; for a
    SQLite --store, the keys beside it; else the configuration's keys file, or
    `<state-dir>/secret.keys`. `replay` then starts from the newest snapshot whose seal they
    verify; without them it rebuilds from the log."""
    try:
        target = urls.parse(args.store) if args.store else None
        if target is not None and target.scheme == "sqlite" and not os.environ.get(config.KEYS_ENV):
            beside = Path(target.target).parent  # a state directory's log: its keys there
            keyring = config.load_keyring(config.load(None, state=str(beside)), create=False)
            if keyring is not None:
                return keyring
        cfg = config.load(args.config or None, state=args.state_dir)
        return config.load_keyring(cfg, create=False)
    except (config.ConfigError, ValueError, OSError, errors.SecretKeyError):
        return None


def nothing_after(after: int, head: int, follow: bool) -> str:
    """What `events tail --after N` says (on stderr) when the log holds nothing after N, offline
    and through the daemon alike."""
    then = "; waiting for newer ones" if follow else ""
    return f"batchd: no events after position {after} (the log's head is at {head}){then}"


def _line(event: RecordedEvent) -> str:
    when = to_iso(event.recorded_at)
    return f"{event.position:>9}  {when}  {event.type:<26} {event.stream:<44} {event.actor}"


async def tail(args: argparse.Namespace) -> int:
    store = await open_readonly(args)
    try:
        after = args.after
        head = (await store.head()).position
        if after is None:
            after = max(0, head - args.lines)
        elif after >= head:  # nothing to show (yet): say why, not silence
            print(nothing_after(after, head, args.follow), file=sys.stderr)
        show = (lambda e: json.dumps(jsonform.to_json(e))) if args.json else _line
        if args.follow:
            async for event in store.subscribe(after):
                print(show(event), flush=True)
        else:
            while events := await store.read_all(after):
                for event in events:
                    print(show(event))
                after = events[-1].position
    finally:
        await store.close()
    return 0


async def verify(args: argparse.Namespace) -> int:
    expect = audit.Anchor.parse(args.expect) if args.expect else None
    store = await open_readonly(args)
    try:
        result = await audit.verify(store, expect)
    finally:
        await store.close()
    if args.json:
        print(json.dumps({
            "ok": result.ok, "events": result.count,
            "head": str(result.head) if result.head else None,
            "badPosition": result.bad_position, "problem": result.problem,
        }))  # fmt: skip
    elif result.ok:
        print(f"ok: {result.count} events, head {result.head or '0:(empty)'}")
    else:
        print(f"FAILED at position {result.bad_position}: {result.problem}", file=sys.stderr)
        print(
            f"last good: {result.head or 'none'} ({result.count} events verified)", file=sys.stderr
        )
    return 0 if result.ok else 1
