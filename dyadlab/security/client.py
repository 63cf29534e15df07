"""Client-side security: how a client reaches one address (TLS roots, client
certificate, server name, or plaintext) and the bearer token it sends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from dyadlab.config import ConfigError, Settings
from dyadlab.security.addresses import host_of, is_loopback
from dyadlab.security.local_dev import local
from dyadlab.security.pki import _read


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches one address: TLS (roots, client certificate, name to
    verify) or plaintext, and the bearer token it sends."""

    tls: bool = True
    root_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = dataclasses.field(default=None, repr=False)
    server_name: str = ""
    token: str | None = dataclasses.field(default=None, repr=False)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        creds = grpc.ssl_channel_credentials(self.root_pem, self.key_pem, self.cert_pem)
        if self.token:  # call credentials travel over TLS only
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """For plaintext channels (DYADLAB_INSECURE), which carry no call credentials."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _read_token(path: Path) -> str:
    tok = _read(path, "DYADLAB_TOKEN_FILE").decode().strip()
    if not tok:
        raise ConfigError(f"DYADLAB_TOKEN_FILE {path} is empty")
    return tok


def client_security(addr: str, settings: Settings) -> ClientSecurity:
    """What a client of `addr` uses, from the settings (see dyadlab.security's docstring)."""
    loop = is_loopback(host_of(addr))
    L = local(settings)
    token = None
    if settings.token_file:
        token = _read_token(settings.token_file)
    elif loop and L.user_token.is_file():
        token = L.user_token.read_text().strip() or None
    if settings.insecure:
        if not loop and settings.insecure != "any":
            raise ConfigError(
                f"refusing plaintext gRPC to {addr}: DYADLAB_INSECURE=1 allows "
                "plaintext on loopback only (DYADLAB_INSECURE=any for a network "
                "that encrypts)"
            )
        return ClientSecurity(tls=False, token=token)
    roots = b""
    if settings.tls_ca:
        roots += _read(settings.tls_ca, "DYADLAB_TLS_CA")
    if loop and L.ca.is_file():  # the local CA vouches for loopback names only
        roots += (b"\n" if roots else b"") + L.ca.read_bytes()
    cert = key = None
    if settings.tls_client_cert:
        assert settings.tls_client_key is not None  # Settings.from_env checks: set both or neither
        cert = _read(settings.tls_client_cert, "DYADLAB_TLS_CLIENT_CERT")
        key = _read(settings.tls_client_key, "DYADLAB_TLS_CLIENT_KEY")
    elif settings.tls_cert:
        assert settings.tls_key is not None  # Settings.from_env checks: set both or neither
        cert = _read(settings.tls_cert, "DYADLAB_TLS_CERT")
        key = _read(settings.tls_key, "DYADLAB_TLS_KEY")
    return ClientSecurity(
        tls=True,
        root_pem=roots or None,
        cert_pem=cert,
        key_pem=key,
        server_name=settings.tls_server_name,
        token=token,
    )
