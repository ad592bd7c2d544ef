"""Encryption of secret fields (AES-256-GCM), so that secrets are never readable in the log.

A sealed value is stored as msgpack extension type 1 whose payload is

    key-id length (1 byte) || key id (ASCII) || nonce (12 bytes) || ciphertext+tag

The key id travels with the ciphertext, so keys can rotate: new secrets are sealed with the
keyring's active key, and old ones still open with the key they name. Sealed values decode as
`Sealed` objects that show as `***`; only code that must hand the secret to a job calls
`Keyring.open`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from batchd.events import errors

SEALED_EXT = 1  # msgpack extension type code of a sealed value
REDACTED = "***"
_NONCE_BYTES = 12
_SIGNING = b"batchd: signing key"  # (each key's signing key is its own, apart from sealing)
_MAC_BYTES = 32


class Sealed:
    """An encrypted value as stored in the log. It never shows its plaintext."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    @property
    def key_id(self) -> str:
        return self.payload[1 : 1 + self.payload[0]].decode("ascii")

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sealed) and other.payload == self.payload

    def __hash__(self) -> int:
        return hash(self.payload)


class Keyring:
    """Named 256-bit keys; `active` seals, any of them opens."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise errors.SecretKeyError(f"active secret key {active!r} is not among the keys")
        for key_id, key in keys.items():
            if not key_id.isascii() or not 0 < len(key_id) < 256:
                raise errors.SecretKeyError(f"secret key id {key_id!r} must be 1-255 ASCII chars")
            if len(key) != 32:
                raise errors.SecretKeyError(f"secret key {key_id!r} must be 32 bytes")
        self._ciphers = {k: AESGCM(v) for k, v in keys.items()}
        self._signing = {k: hmac.digest(v, _SIGNING, "sha256") for k, v in keys.items()}
        self.active = active

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        return cls({key_id: AESGCM.generate_key(bit_length=256)}, key_id)

    @classmethod
    def from_base64(cls, keys: Mapping[str, str], active: str) -> Keyring:
        try:
            decoded = {k: base64.b64decode(v, validate=True) for k, v in keys.items()}
        except ValueError:
            raise errors.SecretKeyError("secret keys must be base64 (32 bytes each)") from None
        return cls(decoded, active)

    def sign(self, *parts: bytes) -> bytes:
        """A signature of `parts` (taken as one run of bytes) under the active key: its id's
        length and id, then an HMAC-SHA256 that only a holder of that key can make."""
        kid = self.active.encode("ascii")
        mac = hmac.new(self._signing[self.active], digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return bytes([len(kid)]) + kid + mac.digest()

    def verify(self, signature: bytes, *parts: bytes) -> bool:
        """Did a key of these sign `parts` so (`sign`)? False also for a key not loaded."""
        kid = signature[1 : 1 + signature[0]] if signature else b""
        key = self._signing.get(kid.decode("ascii", "replace"))
        if key is None or len(signature) != 1 + len(kid) + _MAC_BYTES:
            return False
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return hmac.compare_digest(signature[1 + len(kid) :], mac.digest())

    @staticmethod
    def signer(signature: bytes) -> str:
        """The id of the key a signature names (see `sign`)."""
        kid = signature[1 : 1 + signature[0]] if signature else b""
        return kid.decode("ascii", "replace")

    @staticmethod
    def signature_length(data: bytes) -> int:
        """The length of the signature `data` begins with (see `sign`)."""
        return 1 + data[0] + _MAC_BYTES if data else 0

    def holds(self, key_id: str) -> bool:
        """Is a key of that id among these?"""
        return key_id in self._ciphers

    def seal(self, plaintext: str) -> Sealed:
        kid = self.active.encode("ascii")
        nonce = os.urandom(_NONCE_BYTES)
        ct = self._ciphers[self.active].encrypt(nonce, plaintext.encode("utf-8"), kid)
        return Sealed(bytes([len(kid)]) + kid + nonce + ct)

    def open(self, sealed: Sealed) -> str:
        key_id = sealed.key_id
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise errors.SecretUnopenable(f"secret sealed with key {key_id!r}, which is not loaded")
        start = 1 + sealed.payload[0]
        nonce = sealed.payload[start : start + _NONCE_BYTES]
        try:
            plain = cipher.decrypt(nonce, sealed.payload[start + _NONCE_BYTES :], key_id.encode())
        except InvalidTag:
            raise errors.SecretUnopenable(
                f"secret sealed with key {key_id!r} fails to open"
            ) from None
        return plain.decode("utf-8")


@functools.cache
def _parse_path(path: str) -> tuple[str, ...]:
    return tuple(part for piece in path.split(".") for part in _split_list(piece))


def _split_list(piece: str) -> list[str]:
    return [piece[:-2], "[]"] if piece.endswith("[]") else [piece]


def sealed_in(value: Any) -> Iterator[Sealed]:
    """Every sealed value in `value` (an event's data: maps and lists, at any depth)."""
    if isinstance(value, Sealed):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from sealed_in(inner)
    elif isinstance(value, list | tuple):
        for inner in value:
            yield from sealed_in(inner)


def seal_paths(data: dict, paths: tuple[str, ...], keyring: Keyring | None) -> dict:
    """Return `data` with the plaintext values at `paths` sealed (the input is not modified)."""
    for path in paths:
        data = _seal(data, _parse_path(path), keyring, path)
    return data


def _seal(node: object, parts: tuple[str, ...], keyring: Keyring | None, path: str) -> object:
    if not parts:
        if node is None or isinstance(node, Sealed):
            return node
        if keyring is None:
            raise errors.SecretKeyError(f"field {path} holds a secret but no secret key is set")
        if not isinstance(node, str):
            raise errors.SecretKeyError(f"field {path} must be a string")
        return keyring.seal(node)
    head, rest = parts[0], parts[1:]
    if head == "[]":
        if not isinstance(node, list):
            return node
        return [_seal(item, rest, keyring, path) for item in node]
    if not isinstance(node, dict) or head not in node:
        return node
    sealed = _seal(node[head], rest, keyring, path)
    if sealed is node[head]:
        return node
    return {**node, head: sealed}


class _Mask:
    """Stands in for a keyring where secrets are to be hidden, not sealed."""

    def seal(self, plaintext: str) -> str:
        return REDACTED


def mask_paths(data: dict, paths: tuple[str, ...]) -> dict:
    """Return `data` with the plaintext values at `paths` as `***` (the input is not
    modified): how a request's own secrets are shown back to it."""
    for path in paths:
        data = _seal(data, _parse_path(path), _Mask(), path)  # type: ignore[arg-type]
    return data


def redact(value: object) -> object:
    """A JSON-ready copy of decoded event data: sealed values as `***`, bytes as base64."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, Sealed):
        return REDACTED
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value
