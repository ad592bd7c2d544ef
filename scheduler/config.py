"""Daemon and CLI configuration: state directory, store URL, secret keys.

The state directory is `--state-dir`, else `$BATCHD_STATE_DIR`, else `~/.local/state/batchd`;
the store defaults to `sqlite:///<state-dir>/events.db`. Secret keys come from
`$BATCHD_SECRET_KEYS` (`id:base64[,id:base64...]`, the last one seals) or from the file named by
`[secrets] keys_file` in the TOML configuration, else `<state-dir>/secret.keys`, which the
daemon creates (mode 0600) with one fresh key on first start.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from batchd.events.secrets import Keyring
from batchd.scheduler.clusterspec import MAX_NODES
from batchd.scheduler.protocol import RUNTIMES
from batchd.scheduler.vmsizes import (
    CATALOG,
    DEFAULT_LOCAL_MAX_NODES,
    LOCAL,
    Catalog,
    local_size,
)

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_LOCAL_NODES = 2
MAX_LOCAL_GPUS = 64  # simulated GPUs a local node may have
KEYS_ENV = "BATCHD_SECRET_KEYS"


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names it."""


@dataclass
class Config:
    state_dir: Path
    store_url: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    keys_file: Path | None = None
    mount_root: Path | None = None  # where the daemon reads $AZ_BATCHAI_MOUNT_ROOT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_self_signed: bool = False
    local_nodes: int = 0  # agents of the embedded cluster default/local (0: none)
    local_gpus: int = 4  # simulated GPUs on each
    local_runtimes: str = "process"  # their runtimes: process, or docker,process
    local_docker_host: str | None = None  # the engine of their docker runtime (else $DOCKER_HOST)
    catalog: Catalog = CATALOG  # VM sizes: built in, [vm_sizes], and the local shape
    raw: dict = field(default_factory=dict)

    @property
    def mounts(self) -> Path:
        return (self.mount_root or self.state_dir / "mounts").absolute()

    @property
    def tls(self) -> bool:
        return self.tls_self_signed or self.tls_cert is not None


def state_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("BATCHD_STATE_DIR"):
        return Path(os.environ["BATCHD_STATE_DIR"])
    return Path.home() / ".local" / "state" / "batchd"


def default_store_url(directory: Path) -> str:
    return f"sqlite:///{directory.absolute() / 'events.db'}"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen address {text!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def load(
    config_file: str | None,
    *,
    state: str | None = None,
    store: str | None = None,
    listen: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_self_signed: bool = False,
    local_nodes: int | None = None,
) -> Config:
    """Build the configuration: flags override the TOML file, which overrides the defaults."""
    raw: dict = {}
    if config_file:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration {config_file} is not valid TOML: {exc}") from None
    _check_types(raw, config_file or "")
    directory = state_dir(state or raw.get("state_dir"))
    host, port = parse_listen(listen or raw.get("server", {}).get("listen", DEFAULT_LISTEN))
    keys_file = raw.get("secrets", {}).get("keys_file")
    server = raw.get("server", {})
    cert = tls_cert or server.get("tls_cert")
    key = tls_key or server.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    self_signed = tls_self_signed or bool(server.get("tls_self_signed", False))
    if cert and self_signed:
        raise ConfigError("give either a TLS certificate and key or --tls-self-signed, not both")
    mount_root = raw.get("storage", {}).get("mount_root")
    local = raw.get("local", {})
    if local_nodes is None:  # the embedded default has 2 simulated nodes; a file says how many
        local_nodes = int(local.get("nodes", 0 if config_file else DEFAULT_LOCAL_NODES))
    if not 0 <= local_nodes <= MAX_NODES:
        raise ConfigError(f"[local] nodes: {local_nodes}: give 0 to {MAX_NODES}")
    # (unset: at least `nodes`, so a configuration of an earlier version still starts)
    local_max = int(local.get("max_nodes", max(DEFAULT_LOCAL_MAX_NODES, local_nodes)))
    if not 1 <= local_max <= MAX_NODES:
        raise ConfigError(f"[local] max_nodes: {local_max}: give 1 to {MAX_NODES}")
    if local_nodes > local_max:
        raise ConfigError(f"[local] nodes: {local_nodes}: more than [local] max_nodes "
                          f"({local_max})")  # fmt: skip
    local_gpus = int(local.get("gpus_per_node", 4))
    if not 0 <= local_gpus <= MAX_LOCAL_GPUS:
        raise ConfigError(f"[local] gpus_per_node: {local_gpus}: give 0 to {MAX_LOCAL_GPUS}")
    sizes = raw.get("vm_sizes", {})
    if any(name.lower() == LOCAL.lower() for name in sizes):
        raise ConfigError(f"[vm_sizes.{LOCAL}]: {LOCAL} is the local nodes' shape: set "
                          "[local] gpus_per_node instead")  # fmt: skip
    try:
        catalog = CATALOG.with_overrides(sizes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Config(
        state_dir=directory,
        store_url=store or raw.get("store", {}).get("url") or default_store_url(directory),
        listen_host=host,
        listen_port=port,
        keys_file=Path(keys_file) if keys_file else None,
        mount_root=Path(mount_root) if mount_root else None,
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        tls_self_signed=self_signed,
        local_nodes=local_nodes,
        local_gpus=local_gpus,
        local_runtimes=_runtimes(local.get("runtimes", "process")),
        local_docker_host=local.get("docker_host"),
        catalog=catalog.with_size(local_size(local_gpus, local_max)),
        raw=raw,
    )


# the configuration's tables and the type of each key in them ("" is the top level)
_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"state_dir": str, "server": dict, "store": dict, "secrets": dict, "storage": dict,
         "local": dict, "vm_sizes": dict},
    "server": {"listen": str, "tls_cert": str, "tls_key": str, "tls_self_signed": bool},
    "store": {"url": str},
    "secrets": {"keys_file": str},
    "storage": {"mount_root": str},
    "local": {"nodes": int, "max_nodes": int, "gpus_per_node": int, "runtimes": str,
              "docker_host": str},
}  # fmt: skip


_KIND_NAMES = {str: "a string", dict: "a table", int: "a whole number", bool: "true or false"}


def _runtimes(value: str) -> str:
    names = [r.strip() for r in value.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNTIMES]
    if not names or unknown:
        raise ConfigError(f"[local] runtimes: {value!r}: give process, docker or both "
                          "(comma-separated)")  # fmt: skip
    return ",".join(names)


def _check_types(raw: dict, where: str) -> None:
    """ConfigError naming the key whose value has the wrong type, or that is unknown."""
    for table, keys in _TYPES.items():
        values = raw if not table else raw.get(table, {})
        for key, value in values.items():
            name = f"{table}.{key}" if table else key
            if key not in keys:
                raise ConfigError(f"configuration {where}: unknown key {name}")
            wanted = keys[key]
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                kind = _KIND_NAMES.get(wanted, "value")
                raise ConfigError(f"configuration {where}: {name} must be {kind}")
            if value == "":  # (not silently the default)
                raise ConfigError(f"configuration {where}: {name} must not be empty: leave "
                                  "it out for the default")  # fmt: skip


def load_keyring(config: Config, *, create: bool) -> Keyring | None:
    """The secret keys from the environment or the keys file. The default one,
    `<state-dir>/secret.keys`, is created if `create`; a keys file the configuration names
    must exist (a mistyped path would otherwise get a new key under the same id, and the
    secrets sealed so far would not open)."""
    if os.environ.get(KEYS_ENV):
        return _parse_keys(os.environ[KEYS_ENV].replace(",", "\n"), KEYS_ENV)
    path = config.keys_file or config.state_dir / "secret.keys"
    try:
        if not path.exists():
            if config.keys_file is not None:
                raise ConfigError(f"[secrets] keys_file {path} does not exist (create it "
                                  "beforehand: lines of ID:BASE64, mode 0600; deploy/batchd."
                                  "toml shows how)")  # fmt: skip
            if not create:
                return None
            key = base64.b64encode(os.urandom(32)).decode("ascii")
            _create_durably(path, f"k1:{key}\n")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"secret keys file {path}: {exc.strerror} (create it beforehand: "
                          "lines of ID:BASE64, mode 0600, readable by the daemon's user; or "
                          f"set ${KEYS_ENV})") from None  # fmt: skip
    return _parse_keys(text, str(path))


def _create_durably(path: Path, text: str) -> None:
    """Create `path` (mode 0600) holding `text`, whole or not at all, and on disk before it
    is used: a key that seals secrets in the log must outlive a crash or a power cut as the
    log does. Written to a file of its own, synced, then linked into place (which fails if
    `path` exists: a daemon starting beside this one keeps the key that one made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    spare = Path(name)  # (a name of its own, mode 0600: no other daemon writes to it)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(spare, path)
    finally:
        spare.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _parse_keys(text: str, where: str) -> Keyring:
    keys: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key_id, sep, value = line.strip().partition(":")
            if not sep:
                raise ConfigError(f"secret keys in {where} must be lines of ID:BASE64")
            keys[key_id] = value
    if not keys:
        raise ConfigError(f"no secret keys in {where}")
    try:
        return Keyring.from_base64(keys, active=list(keys)[-1])
    except Exception as exc:
        raise ConfigError(f"secret keys in {where}: {exc}") from None


def is_loopback(host: str) -> bool:
    """Does `host` (an address, a host name, an IPv6 address with or without its brackets)
    reach only this machine: 127.0.0.0/8, ::1 or localhost?"""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to any address
        return False
