"""API tokens: which exist, their role and workspaces, found by the SHA-256 of the secret.

Only the hash is ever logged; the token itself is shown once, to whoever created it.
"""

from __future__ import annotations

from batchd.events.envelope import RecordedEvent
from batchd.projections.model import ReadModels, Token


def token_created(m: ReadModels, e: RecordedEvent) -> None:
    d = e.data
    token = Token(d["tokenId"], d["name"], d["role"], list(d.get("workspaces") or ()),
                  d["hash"], e.recorded_at, e.actor, d.get("node"))  # fmt: skip
    m.tokens[token.token_id] = token
    m.token_hashes[token.hash] = token.token_id


def token_revoked(m: ReadModels, e: RecordedEvent) -> None:
    token = m.tokens.pop(e.data["tokenId"], None)
    if token is not None:
        m.token_hashes.pop(token.hash, None)


HANDLERS = {"TokenCreated": token_created, "TokenRevoked": token_revoked}
