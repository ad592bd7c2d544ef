"""Bearer tokens: who is calling, and what their role lets them do.

A token is random (`bd_` and 43 URL-safe characters, 256 bits); the log keeps only its
SHA-256 (`TokenCreated`), so neither the log nor a replay can give one away. Roles are
ordered: a viewer reads, an operator also creates, terminates and deletes experiments and
jobs, an admin may do everything. An `agent` token is a node's credential: it gets nothing
on the user API. A token may be limited to some workspaces; it then sees only those, and
may not read the whole log (events, replay).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from batchd.events.envelope import NewEvent
from batchd.projections.model import ReadModels, Token
from batchd.scheduler import protocol
from batchd.scheduler.commands import CommandError, check_name
from batchd.scheduler.planner import Decision
from batchd.scheduler.schema import DocumentError

ROLES = ("viewer", "operator", "admin", "agent")
_RANK = {"viewer": 1, "operator": 2, "admin": 3}  # agent: 0, no user API at all
PREFIX = "bd_"


class AuthError(Exception):
    """401 (who are you?) or 403 (not allowed): `status` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    name: str
    role: str
    workspaces: tuple[str, ...]  # empty: every workspace
    node: str | None = None  # an agent bound to one node

    def require_node(self, node_id: str) -> None:
        """AuthError 403 if this agent credential is bound to another node."""
        if self.node is not None and self.node != node_id:
            raise AuthError(f"token {self.name!r} speaks for node {self.node} only", 403)

    @property
    def actor(self) -> str:
        return f"user:{self.name}"

    def require(self, role: str, workspace: str | None = None) -> None:
        """AuthError 403 unless this principal has `role` (or higher) in `workspace`."""
        if _RANK.get(self.role, 0) < _RANK[role]:
            raise AuthError(f"token {self.name!r} is {self.role}: this needs {role}", 403)
        if self.workspaces and workspace is not None and workspace not in self.workspaces:
            raise AuthError(
                f"token {self.name!r} is limited to workspaces {', '.join(self.workspaces)}", 403
            )

    def require_unscoped(self, role: str, what: str) -> None:
        """AuthError 403 unless this principal has `role` over every workspace (the whole
        log, tokens: things that span workspaces)."""
        self.require(role)
        if self.workspaces:
            raise AuthError(f"token {self.name!r} is limited to workspaces: it cannot {what}", 403)

    def require_whole_log(self) -> None:
        self.require_unscoped("viewer", "read the whole log")

    def sees(self, workspace: str) -> bool:
        return not self.workspaces or workspace in self.workspaces


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def authenticate(m: ReadModels, headers: list[str]) -> Principal:
    """The principal of a request's `Authorization: Bearer <token>` header (`headers`: each
    it has); AuthError 401 if none, 400 if more than one (which to believe?)."""
    if len(headers) > 1:
        raise AuthError("give one Authorization header, not several", 400)
    scheme, _, token = (headers[0] if headers else "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("this needs a token: Authorization: Bearer <token>", 401)
    # (no token is other than ASCII; bytes that are not UTF-8 come as lone surrogates)
    token_id = m.token_hashes.get(digest(token)) if token.isascii() else None
    if token_id is None:
        raise AuthError("the token is not valid (unknown or revoked)", 401)
    return principal_of(m.tokens[token_id])


def principal_of(token: Token) -> Principal:
    return Principal(token.token_id, token.name, token.role, tuple(token.workspaces),
                     token.node)  # fmt: skip


def create_token(
    m: ReadModels, name: str, role: str, workspaces: list[str], token: str, actor: str,
    node: str | None = None,
) -> list[Decision]:  # fmt: skip
    """TokenCreated for `token` (its hash only); `node` binds an agent token to one node."""
    check_name("token", name)
    if role not in ROLES:
        raise DocumentError("role", f"must be one of {', '.join(ROLES)}")
    for index, workspace in enumerate(workspaces):
        check_name("workspace", workspace, f"workspaces[{index}]")
        if workspace not in m.workspaces:  # (a typo would make a token that can use nothing)
            raise DocumentError(f"workspaces[{index}]",
                                f"no workspace {workspace!r}: create it first")  # fmt: skip
    if node is not None:
        if role != "agent":
            raise DocumentError("node", "binds an agent token: give it with role agent only")
        if not protocol.NODE_ID.fullmatch(node):
            raise DocumentError("node", f"must be a node id: {protocol.NODE_ID_RULE}")
    if any(t.name == name for t in m.tokens.values()):
        raise CommandError(f"a token named {name!r} exists already")
    data = {"tokenId": str(uuid.uuid4()), "name": name, "role": role,
            "workspaces": list(workspaces), "hash": digest(token)}  # fmt: skip
    if node is not None:
        data["node"] = node
    return [(f"token-{data['tokenId']}", NewEvent("TokenCreated", data, actor))]


def revoke_token(m: ReadModels, token_id: str, actor: str) -> list[Decision]:
    if token_id not in m.tokens:
        raise CommandError(f"no token {token_id!r}", 404)
    return [(f"token-{token_id}", NewEvent("TokenRevoked", {"tokenId": token_id}, actor))]
