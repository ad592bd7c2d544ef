from __future__ import annotations

import os

import msgpack
import pytest

from batchd.events import errors
from batchd.events.codec import Codec
from batchd.events.envelope import NewEvent
from batchd.events.secrets import Keyring, Sealed, redact, seal_paths
from batchd.scheduler import config


def test_sealed_values_open_with_their_key_after_rotation():
    key_2025, key_2026 = os.urandom(32), os.urandom(32)
    old = Keyring({"2025": key_2025}, "2025")
    sealed = old.seal("s3cret")
    assert sealed.key_id == "2025" and b"s3cret" not in sealed.payload
    rotated = Keyring({"2025": key_2025, "2026": key_2026}, "2026")
    assert rotated.open(sealed) == "s3cret"
    assert rotated.seal("new").key_id == "2026"
    with pytest.raises(errors.SecretKeyError, match="'2026', which is not loaded"):
        old.open(rotated.seal("x"))


def test_a_tampered_ciphertext_does_not_open():
    ring = Keyring.generate()
    sealed = ring.seal("value")
    broken = Sealed(sealed.payload[:-1] + bytes([sealed.payload[-1] ^ 1]))
    with pytest.raises(errors.SecretKeyError, match="fails to open"):
        ring.open(broken)


def test_seal_paths_reaches_into_lists_and_leaves_the_rest():
    ring = Keyring.generate()
    data = {"spec": {"secrets": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "environmentVariables": [{"name": "C", "value": "3"}]}}  # fmt: skip
    sealed = seal_paths(data, ("spec.secrets[].value", "spec.missing.value"), ring)
    values = [s["value"] for s in sealed["spec"]["secrets"]]
    assert all(isinstance(v, Sealed) for v in values)
    assert [ring.open(v) for v in values] == ["1", "2"]
    assert sealed["spec"]["environmentVariables"] == [{"name": "C", "value": "3"}]
    assert data["spec"]["secrets"][0]["value"] == "1"  # the input is not modified
    assert redact(sealed)["spec"]["secrets"][1] == {"name": "B", "value": "***"}


def test_the_codec_stores_sealed_values_as_extension_type_1():
    codec = Codec(Keyring.generate())
    spec = {"userAccountSettings": {"adminUserName": "ann", "adminUserPassword": "pw-123"}}
    encoded = codec.encode(NewEvent("ClusterCreated", {"spec": spec}))
    assert b"pw-123" not in encoded.data
    raw = msgpack.unpackb(encoded.data)
    assert raw["spec"]["userAccountSettings"]["adminUserPassword"].code == 1
    assert raw["spec"]["userAccountSettings"]["adminUserName"] == "ann"


def test_keyring_refuses_bad_keys():
    with pytest.raises(errors.SecretKeyError, match="32 bytes"):
        Keyring({"k": b"short"}, "k")
    with pytest.raises(errors.SecretKeyError, match="not among"):
        Keyring({"k": bytes(32)}, "other")
    with pytest.raises(errors.SecretKeyError, match="base64"):
        Keyring.from_base64({"k": "not base64!"}, "k")


def test_the_default_keys_file_is_made_whole_and_kept_if_made_meanwhile(tmp_path, monkeypatch):
    """The key that seals the log's secrets is written whole or not at all (through a synced
    file of its own, linked into place): never an empty file that a crash would leave, and
    never over a key another daemon starting beside this one made first."""
    monkeypatch.delenv(config.KEYS_ENV, raising=False)
    settings = config.Config(state_dir=tmp_path / "state", store_url="memory://x")
    made = config.load_keyring(settings, create=True)
    keys = tmp_path / "state" / "secret.keys"
    assert os.stat(keys).st_mode & 0o777 == 0o600
    assert [p.name for p in keys.parent.iterdir()] == ["secret.keys"]  # nothing left beside
    again = config.load_keyring(settings, create=True)
    assert again.open(made.seal("s3cret")) == "s3cret"  # the same key, read back
    keys.unlink()
    real_link = os.link

    def raced(source, target):  # another daemon links its key first
        keys.write_text("k1:" + "A" * 43 + "=\n")
        real_link(source, target)

    monkeypatch.setattr(os, "link", raced)
    config.load_keyring(settings, create=True)
    assert keys.read_text() == "k1:" + "A" * 43 + "=\n"
    assert [p.name for p in keys.parent.iterdir()] == ["secret.keys"]
