"""Snapshots of the read models: the whole state as msgpack, exactly restorable.

A snapshot is stored with its `format` (this module's layout) and a `code_hash` of the source
of every module that decides the state (projections/model.py and the handlers). A snapshot
whose format or code hash differs from the running code's is discarded and the read models
are rebuilt from the log: a handler change must never be mixed with state an older handler
made (see docs/projections.md).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import operator
from pathlib import Path

import msgpack

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

FORMAT = 1
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
_ROW = {
    cls: operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))
    for _attribute, cls, _key in _ENTITIES
}


def _code_hash() -> str:
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for module in (model, lifecycle, allocation, queue, fold, *fold.MODULES):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


CODE_HASH = _code_hash()


def encode(models: ReadModels) -> bytes:
    plain = [models.position, models.recorded_at]
    for attribute, cls, _key in _ENTITIES:
        row = _ROW[cls]
        plain.append([row(x) for x in getattr(models, attribute).values()])
    plain.extend(getattr(models, index) for index in _INDEXES)
    return msgpack.packb(plain, use_bin_type=True)


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
    """A deep copy of the state as plain, order-insensitive data: what tests compare."""
    out = {"position": models.position, "recorded_at": models.recorded_at}
    for attribute, _cls, _key in _ENTITIES:
        out[attribute] = {k: dataclasses.asdict(v) for k, v in getattr(models, attribute).items()}
    for index in _INDEXES:
        out[index] = copy.deepcopy(getattr(models, index))
    return out
