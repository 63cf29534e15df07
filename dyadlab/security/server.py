"""A server's security from the settings: its TLS credentials (or plaintext
where DYADLAB_INSECURE allows it), its access table and its audit log."""

from __future__ import annotations

import dataclasses
import logging

import grpc

from dyadlab.config import ConfigError, Settings
from dyadlab.security.access import AccessTable
from dyadlab.security.addresses import is_loopback
from dyadlab.security.audit import audit_logger
from dyadlab.security.interceptor import AuthInterceptor
from dyadlab.security.local_dev import ensure_local
from dyadlab.security.pki import _read


@dataclasses.dataclass
class ServerSecurity:
    credentials: grpc.ServerCredentials | None  # None: plaintext
    transport: str  # "tls", "mtls", "tls (local)", "plaintext"
    access: AccessTable | None  # None: authentication off
    audit: logging.Logger
    service: str

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.access, self.audit, self.service, client_certs=self.transport == "mtls")


def server_transport(settings: Settings, host: str) -> tuple[grpc.ServerCredentials | None, str]:
    """(credentials, description) of a server on `host`; None = plaintext.
    Raises ConfigError where the settings do not allow listening there."""
    loop = is_loopback(host)
    if settings.insecure:
        if not loop and settings.insecure != "any":
            raise ConfigError(
                f"refusing plaintext gRPC on {host!r}: DYADLAB_INSECURE=1 allows plaintext on "
                "loopback only. Configure TLS (DYADLAB_TLS_CERT / DYADLAB_TLS_KEY), or set "
                "DYADLAB_INSECURE=any if the network itself encrypts (e.g. a service mesh)"
            )
        return None, "plaintext"
    if settings.tls_cert:
        assert settings.tls_key is not None  # Settings.from_env checks: TLS_CERT comes with TLS_KEY
        pair = (_read(settings.tls_key, "DYADLAB_TLS_KEY"), _read(settings.tls_cert, "DYADLAB_TLS_CERT"))
        if settings.tls_client_auth == "require":
            assert settings.tls_ca is not None  # Settings.from_env checks: require needs TLS_CA
            return grpc.ssl_server_credentials(
                [pair], _read(settings.tls_ca, "DYADLAB_TLS_CA"), require_client_auth=True
            ), "mtls"
        return grpc.ssl_server_credentials([pair]), "tls"
    if not loop:
        raise ConfigError(
            f"refusing to listen on {host!r} without TLS: set DYADLAB_TLS_CERT and "
            "DYADLAB_TLS_KEY (the generated local development certificate covers loopback "
            "only), or DYADLAB_INSECURE=any for plaintext inside a network that encrypts"
        )
    L = ensure_local(settings)
    return grpc.ssl_server_credentials([(L.key.read_bytes(), L.cert.read_bytes())]), "tls (local)"


def server_access(settings: Settings, host: str) -> AccessTable | None:
    """The access table of a server on `host` (None: DYADLAB_AUTH=off)."""
    if not settings.auth:
        return None
    if settings.auth_tokens:
        return AccessTable.load(settings.auth_tokens)
    if is_loopback(host):
        return AccessTable.load(ensure_local(settings).access)
    raise ConfigError(
        f"authentication is on but DYADLAB_AUTH_TOKENS is not set: a server on {host!r} needs "
        "an access file (docs/security.md), or DYADLAB_AUTH=off (development only)"
    )


def server_security(settings: Settings, host: str, service: str) -> ServerSecurity:
    """TLS credentials, access table and audit log of a server listening on `host`."""
    creds, transport = server_transport(settings, host)
    access = server_access(settings, host)
    return ServerSecurity(creds, transport, access, audit_logger(settings.audit_log, service), service)
