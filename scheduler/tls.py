"""TLS for the API: a given certificate and key, or a self-signed pair made once and kept in
`<state-dir>/tls/` (cert.pem, key.pem; the key mode 0600). Clients trust the self-signed
certificate by its file (`batchd --cacert`, which defaults to that file on the same machine).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 825


def certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file (ValueError if it holds none, or garbage)."""
    return x509.load_pem_x509_certificates(path.read_bytes())


def names(certificate: x509.Certificate) -> list[str]:
    """The host names and addresses a certificate is valid for (its subject alternative
    names; else its common name)."""
    try:
        alternative = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(attribute.value) for attribute in common]
    return [
        *alternative.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in alternative.get_values_for_type(x509.IPAddress)),
    ]


def name_to_check(cert: Path, host: str) -> str | None:
    """The name an agent reaching the daemon at `host` checks the daemon's certificate
    `cert` against: None (the host itself) if the certificate names it, else the first name
    it has (a certificate issued for `batchd.example.com`, reached at 127.0.0.1)."""
    valid = names(certificates(cert)[0])
    try:
        host = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        host = host.lower()
    if host in (name.lower() for name in valid) or not valid:
        return None
    return valid[0]


def _own_addresses() -> list[str]:
    """The addresses this machine's name resolves to (none if it does not resolve)."""
    try:
        found = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [str(address[4][0]).partition("%")[0] for address in found]


class _Encrypted(Exception):
    """The key asks for a passphrase (which a daemon has nobody to ask)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:  # (without `password`, OpenSSL would ask for a passphrase on the terminal)
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ValueError(f"TLS key {key} is encrypted (protected by a passphrase): give a key "
                         "without one, readable only by batchd's user") from None  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use TLS certificate {cert} with key {key}: {exc}") from None
    return context


def self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """The self-signed pair in `directory`, made on first use for localhost, this machine's
    name and `host` (for a daemon listening on every address, 0.0.0.0 or ::, also this
    machine's addresses, as its name resolves)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = []
    wanted = ["localhost", socket.gethostname(), socket.getfqdn(), "127.0.0.1", "::1", host]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        wanted += _own_addresses()
    for name in dict.fromkeys(wanted):
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchd")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key
