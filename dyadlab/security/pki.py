"""Credential material: keys and certificates (a CA, certificates it signs;
`cryptography` is imported only to make them), tokens, files only their owner
can read, and reading the configured ones."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dyadlab.config import ConfigError

if TYPE_CHECKING:  # cryptography is imported where certificates are made
    from cryptography import x509


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dyadlab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str, days: int = 3650, loopback_only: bool = False) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, key PEM). `loopback_only`: a name constraint
    limits the DNS names it can sign to localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if loopback_only:
        # DNS names only: gRPC's BoringSSL refuses IP-address name constraints
        # ("unsupported name constraint type"); clients trust this CA for
        # loopback addresses only anyway (client_security).
        b = b.add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName("localhost")], excluded_subtrees=None),
            critical=True,
        )
    cert = b.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    uris: Iterable[str] = (),
    server: bool = True,
    client: bool = True,
    days: int = 397,
) -> tuple[bytes, bytes]:
    """A certificate signed by the CA: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    sans = (
        [x509.DNSName(d) for d in dns]
        + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        + [x509.UniformResourceIdentifier(u) for u in uris]
    )
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]  # a loaded key may be any type; the CA's is EC
            critical=False,
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]  # a loaded key may be any type; the CA's is EC
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file readable by its owner only (created 0600, never wider)."""
    data = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror})") from None
