"""Snapshots of the read models: the whole state as msgpack, exactly restorable.

A snapshot is stored with its `format` (this module's layout) and a `code_hash` of the source
of every module that decides the state (projections/model.py and the handlers). A snapshot
whose format or code hash differs from the running code's is discarded and the read models
are rebuilt from the log: a handler change must never be mixed with state an older handler
made (see docs/projections.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from pathlib import Path

import msgpack

from batchd.events.secrets import Keyring
from batchd.projections import allocation, fold, lifecycle, model, queue
from batchd.projections.model import (
    Cluster,
    Experiment,
    Job,
    Node,
    ReadModels,
    Token,
    Workspace,
)

FORMAT = 2  # 2: sealed (`seal`); 1 was not
NAME = "read-models"  # the projection name snapshots are stored under

_ENTITIES = (  # (ReadModels attribute, entity class, key of an entity)
    ("workspaces", Workspace, lambda x: x.name),
    ("experiments", Experiment, lambda x: f"{x.workspace}/{x.name}"),
    ("clusters", Cluster, lambda x: x.cluster_id),
    ("nodes", Node, lambda x: x.node_id),
    ("jobs", Job, lambda x: x.job_id),
    ("tokens", Token, lambda x: x.token_id),
)
_INDEXES = ("cluster_ids", "job_ids", "queues", "token_hashes")
_NAMES = {cls: [f.name for f in dataclasses.fields(cls)] for _attribute, cls, _key in _ENTITIES}
_ROW = {cls: operator.attrgetter(*names) for cls, names in _NAMES.items()}


def _code_hash() -> str:
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for module in (model, lifecycle, allocation, queue, fold, *fold.MODULES):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


CODE_HASH = _code_hash()


class KeyNotLoaded(ValueError):
    """A sealed snapshot whose key is not among those loaded (nothing says it was changed)."""


def seal(state: bytes, keyring: Keyring, position: int, anchor: bytes) -> bytes:
    """`state` signed with the daemon's secret key, bound to its position and to the hash of
    the log's event there (`anchor`): no one without the key can change a stored snapshot,
    nor move one to another position or log, unseen."""
    return keyring.sign(_bound(position, anchor), state) + state


def unseal(sealed: bytes, keyring: Keyring, position: int, anchor: bytes) -> bytes:
    """The state a sealed snapshot holds; ValueError if its signature does not verify."""
    cut = Keyring.signature_length(sealed)
    state = sealed[cut:]
    signer = Keyring.signer(sealed[:cut])
    if signer and not keyring.holds(signer):
        raise KeyNotLoaded(f"it was sealed with key {signer!r}, which is not loaded here")
    if not keyring.verify(sealed[:cut], _bound(position, anchor), state):
        raise ValueError("its seal does not verify: it was changed since it was stored, or "
                         "sealed with keys this daemon does not hold")  # fmt: skip
    return state


def _bound(position: int, anchor: bytes) -> bytes:
    return f"{NAME}\0{position}\0{FORMAT}\0{CODE_HASH}\0".encode() + anchor


def encode(models: ReadModels) -> bytes:
    return msgpack.packb(_rows(models), use_bin_type=True)


def _rows(models: ReadModels) -> list:
    plain = [models.position, models.recorded_at]
    for attribute, cls, _key in _ENTITIES:
        row = _ROW[cls]
        plain.append([row(x) for x in getattr(models, attribute).values()])
    plain.extend(getattr(models, index) for index in _INDEXES)
    return plain


def decode(data: bytes) -> ReadModels:
    plain = msgpack.unpackb(data, raw=False, strict_map_key=False)
    models = ReadModels(position=plain[0], recorded_at=plain[1])
    for (attribute, cls, key), rows in zip(_ENTITIES, plain[2 : 2 + len(_ENTITIES)], strict=True):
        entities = [cls(*row) for row in rows]
        setattr(models, attribute, {key(x): x for x in entities})
    for index, value in zip(_INDEXES, plain[2 + len(_ENTITIES) :], strict=True):
        setattr(models, index, value)
    return models


def plain(models: ReadModels) -> dict:
    """A deep copy of the state as plain, order-insensitive data (each entity a dict of its
    fields): what tests compare. A tuple stays a tuple (a snapshot would make it a list:
    state that holds one differs from the state restored from a snapshot)."""
    packed = msgpack.packb(_rows(models), use_bin_type=True, strict_types=True, default=_tuple)
    copied = msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=_untuple)
    out = {"position": copied[0], "recorded_at": copied[1]}
    for (attribute, cls, _key), rows in zip(_ENTITIES, copied[2:], strict=False):
        names = _NAMES[cls]
        keyed = zip(getattr(models, attribute).keys(), rows, strict=True)
        out[attribute] = {k: dict(zip(names, row, strict=True)) for k, row in keyed}
    out.update(zip(_INDEXES, copied[2 + len(_ENTITIES) :], strict=True))
    return out


def _tuple(value: object) -> msgpack.ExtType:
    if not isinstance(value, tuple):
        raise TypeError(f"read models hold a {type(value).__name__}: {value!r}")
    return msgpack.ExtType(1, msgpack.packb(list(value), use_bin_type=True, strict_types=True,
                                            default=_tuple))  # fmt: skip


def _untuple(code: int, data: bytes) -> tuple:
    return tuple(msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_untuple))
