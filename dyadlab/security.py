"""Transport security, authentication, authorization and the audit log.

Everything here follows docs/security.md; the environment variables are in
dyadlab/config.py.

* **TLS** on every gRPC server and client. A server uses DYADLAB_TLS_CERT /
  DYADLAB_TLS_KEY; DYADLAB_TLS_CLIENT_AUTH=require makes it mutual TLS
  (client certificates signed by DYADLAB_TLS_CA). With no certificate
  configured, a server bound to loopback uses the **local development
  credentials**: a per-user CA (its DNS names constrained to localhost), a loopback certificate and two tokens, generated once with
  `cryptography` under DYADLAB_LOCAL_DIR (default ~/.config/dyadlab/local,
  0700, keys and tokens 0600). Clients trust that CA for loopback addresses
  only. A server never listens in plaintext unless DYADLAB_INSECURE says so
  (`1`: loopback only; `any`: any address), and never binds a non-loopback
  address with the local certificate.
* **Authentication**: a bearer token (`authorization: Bearer ...`, from the
  file DYADLAB_TOKEN_FILE names) or, under mutual TLS, the client
  certificate's identity (a DNS/URI SAN or the CN). The server's access file
  (DYADLAB_AUTH_TOKENS) maps credentials to a role:

      # credential                      role      name (shown in the audit log)
      sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  analyst  alice
      Zq3...a-long-random-token          service   smiles
      cert:smiles.dyadlab.svc            service   smiles

  Tokens are compared by SHA-256 digest in constant time and never logged.
* **Authorization**: one table, ROLES (role -> methods). Health and reflection
  stay open (probes, grpcurl). No credentials: UNAUTHENTICATED; a role that
  may not call the method: PERMISSION_DENIED.
* **Audit log**: one JSON line per RPC (health checks excepted) to its own
  stream (DYADLAB_AUDIT_LOG: a file, or stderr): time, service, method, who
  (role, name, how authenticated: never a token), the peer address, the
  object keys asked for (shortened content hashes: never a name or path),
  status and duration.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import grpc

from dyadlab.config import ConfigError, Settings

log = logging.getLogger("dyadlab.security")

# -- roles -------------------------------------------------------------------------------
#: methods anyone may call: probes and API discovery
OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
#: not written to the audit log (probes call them every few seconds)
UNAUDITED = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

_ANALYSIS = frozenset({
    "/dyadlab.v1.Extractor/Extract", "/dyadlab.v1.Extractor/ImportOpenFace",
    "/dyadlab.v1.Smiles/Analyze", "/dyadlab.v1.Smiles/AnalyzeDyad",
    "/dyadlab.v1.Stats/AnalyzeCohort", "/dyadlab.v1.Stats/Simulate",
    "/dyadlab.v1.Synth/Transform", "/dyadlab.v1.Synth/Matrix", "/dyadlab.v1.Synth/Transfer",
})
#: role -> the methods it may call ("*": every method)
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "analyst": _ANALYSIS,
    # what one service calls on another: smiles and synth -> extractor
    "service": frozenset({"/dyadlab.v1.Extractor/Extract", "/dyadlab.v1.Extractor/ImportOpenFace"}),
}


def allowed(role: str, method: str) -> bool:
    methods = ROLES.get(role, frozenset())
    return "*" in methods or method in methods


# -- addresses ---------------------------------------------------------------------------
def host_of(addr: str) -> str:
    """'127.0.0.1:50061' -> '127.0.0.1'; '[::1]:5' -> '::1'; 'dns:///x:5' -> 'x'."""
    a = re.sub(r"^(dns:(//[^/]*)?/|ipv4:|ipv6:)", "", addr.strip())
    if a.startswith("["):
        return a[1:].partition("]")[0]
    if a.count(":") == 1:
        return a.partition(":")[0]
    return a


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- certificates (cryptography is imported only to make them) ------------------------------
def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dyadlab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(common_name: str, days: int = 3650, loopback_only: bool = False) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, key PEM). `loopback_only`: a name constraint
    limits the DNS names it can sign to localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                      content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if loopback_only:
        # DNS names only: gRPC's BoringSSL refuses IP-address name constraints
        # ("unsupported name constraint type"); clients trust this CA for
        # loopback addresses only anyway (client_security).
        b = b.add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName("localhost")],
                                                 excluded_subtrees=None), critical=True)
    cert = b.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue_cert(ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *,
               dns: Iterable[str] = (), ips: Iterable[str] = (), uris: Iterable[str] = (),
               server: bool = True, client: bool = True, days: int = 397) -> tuple[bytes, bytes]:
    """A certificate signed by the CA: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    sans = ([x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            + [x509.UniformResourceIdentifier(u) for u in uris])
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    b = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                      content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
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


# -- the local development credentials -----------------------------------------------------
LOCAL_USER_ROLE = "analyst"      # the person at the keyboard: every analysis RPC
LOCAL_RENEW_DAYS = 30            # regenerate when the certificate expires sooner


@dataclasses.dataclass(frozen=True)
class Local:
    """The per-user local CA, loopback certificate and tokens."""
    dir: Path

    ca = property(lambda self: self.dir / "ca.pem")
    ca_key = property(lambda self: self.dir / "ca.key")
    cert = property(lambda self: self.dir / "server.pem")
    key = property(lambda self: self.dir / "server.key")
    access = property(lambda self: self.dir / "access")
    user_token = property(lambda self: self.dir / "user.token")
    service_token = property(lambda self: self.dir / "service.token")

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.ca, self.ca_key, self.cert, self.key, self.access,
                                         self.user_token, self.service_token))

    def expiring(self) -> bool:
        from cryptography import x509
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError):
            return True
        left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
        return left < dt.timedelta(days=LOCAL_RENEW_DAYS)


def local(settings: Settings) -> Local:
    return Local(settings.local_security_dir)


def _generate_local(d: Path) -> None:
    ca, ca_key = make_ca("dyadlab local development CA", loopback_only=True)
    cert, key = issue_cert(ca, ca_key, "localhost", dns=["localhost"], ips=["127.0.0.1", "::1"])
    user, service = new_token(), new_token()
    L = Local(d)
    L.ca.write_bytes(ca)
    L.cert.write_bytes(cert)
    write_private(L.ca_key, ca_key)
    write_private(L.key, key)
    write_private(L.user_token, user + "\n")
    write_private(L.service_token, service + "\n")
    write_private(L.access, "# generated by dyadlab: local development credentials\n"
                  f"sha256:{token_digest(user)} {LOCAL_USER_ROLE} local-user\n"
                  f"sha256:{token_digest(service)} service local-service\n")


def ensure_local(settings: Settings) -> Local:
    """The local credentials, generated on first use (and renewed before they
    expire). Safe when several processes start at once."""
    L = local(settings)
    if L.complete() and not L.expiring():
        return L
    parent = L.dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(parent / f".{L.dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if L.complete() and not L.expiring():      # another process made them meanwhile
            return L
        tmp = Path(tempfile.mkdtemp(prefix=f".{L.dir.name}-", dir=parent))
        try:
            os.chmod(tmp, 0o700)
            _generate_local(tmp)
            if L.dir.exists():
                shutil.rmtree(L.dir)
            os.rename(tmp, L.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("generated local development TLS credentials and tokens",
             extra={"dir_mode": "0700"})
    return L


# -- the access file -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Principal:
    role: str | None      # None: authenticated (certificate) but without a role
    name: str
    via: str          # "token" | "cert"

    def audit(self) -> dict:
        return {"role": self.role, "name": self.name, "via": self.via}


class AccessTable:
    """Credentials -> roles, from an access file (see the module docstring)."""

    def __init__(self, tokens: list[tuple[bytes, Principal]], certs: dict[str, Principal]):
        self._tokens = tokens
        self._certs = certs

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AccessTable":
        path = Path(path)
        try:
            text = path.read_text()
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"access file {path}: cannot read it ({e.strerror})") from None
        if mode & 0o077:
            log.warning("access file is readable by other users; make it 0600",
                        extra={"mode": oct(mode & 0o777)})
        tokens: list[tuple[bytes, Principal]] = []
        certs: dict[str, Principal] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = re.sub(r"(^|\s)#.*$", "", line).strip()     # comments: '#' after a blank
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2:
                raise ConfigError(f"access file {path}, line {n}: want CREDENTIAL ROLE [NAME]")
            cred, role = parts[0], parts[1]
            name = " ".join(parts[2:])
            if role not in ROLES:
                raise ConfigError(f"access file {path}, line {n}: unknown role {role!r} "
                                  f"(roles: {', '.join(sorted(ROLES))})")
            if cred.startswith("cert:"):
                ident = cred[5:]
                if not ident:
                    raise ConfigError(f"access file {path}, line {n}: empty certificate identity")
                certs[ident] = Principal(role, name or ident, "cert")
            elif cred.startswith("sha256:"):
                hexd = cred[7:].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", hexd):
                    raise ConfigError(f"access file {path}, line {n}: sha256: needs 64 hex digits")
                tokens.append((bytes.fromhex(hexd), Principal(role, name or f"token:{hexd[:8]}", "token")))
            else:
                if len(cred) < 16:      # the message never repeats the token
                    raise ConfigError(f"access file {path}, line {n}: token shorter than 16 "
                                      "characters (make one: python -m dyadlab.security token)")
                d = hashlib.sha256(cred.encode()).digest()
                tokens.append((d, Principal(role, name or f"token:{d.hex()[:8]}", "token")))
        return cls(tokens, certs)

    def by_token(self, token: str) -> Principal | None:
        """Constant time in the token: every entry is compared, digest against digest."""
        d = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, principal in self._tokens:
            if hmac.compare_digest(d, digest) and found is None:
                found = principal
        return found

    def by_identities(self, identities: Iterable[str]) -> Principal | None:
        for ident in identities:
            if ident in self._certs:
                return self._certs[ident]
        return None


# -- servers ---------------------------------------------------------------------------------
@dataclasses.dataclass
class ServerSecurity:
    credentials: grpc.ServerCredentials | None   # None: plaintext
    transport: str                               # "tls", "mtls", "tls (local)", "plaintext"
    access: AccessTable | None                   # None: authentication off
    audit: logging.Logger
    service: str

    def interceptor(self) -> "AuthInterceptor":
        return AuthInterceptor(self.access, self.audit, self.service,
                               client_certs=self.transport == "mtls")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror})") from None


def server_transport(settings: Settings, host: str) -> tuple[grpc.ServerCredentials | None, str]:
    """(credentials, description) of a server on `host`; None = plaintext.
    Raises ConfigError where the settings do not allow listening there."""
    loop = is_loopback(host)
    if settings.insecure:
        if not loop and settings.insecure != "any":
            raise ConfigError(
                f"refusing plaintext gRPC on {host!r}: DYADLAB_INSECURE=1 allows plaintext on "
                "loopback only. Configure TLS (DYADLAB_TLS_CERT / DYADLAB_TLS_KEY), or set "
                "DYADLAB_INSECURE=any if the network itself encrypts (e.g. a service mesh)")
        return None, "plaintext"
    if settings.tls_cert:
        pair = (_read(settings.tls_key, "DYADLAB_TLS_KEY"), _read(settings.tls_cert, "DYADLAB_TLS_CERT"))
        if settings.tls_client_auth == "require":
            return grpc.ssl_server_credentials([pair], _read(settings.tls_ca, "DYADLAB_TLS_CA"),
                                               require_client_auth=True), "mtls"
        return grpc.ssl_server_credentials([pair]), "tls"
    if not loop:
        raise ConfigError(
            f"refusing to listen on {host!r} without TLS: set DYADLAB_TLS_CERT and "
            "DYADLAB_TLS_KEY (the generated local development certificate covers loopback "
            "only), or DYADLAB_INSECURE=any for plaintext inside a network that encrypts")
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
        "an access file (docs/security.md), or DYADLAB_AUTH=off (development only)")


def server_security(settings: Settings, host: str, service: str) -> ServerSecurity:
    """TLS credentials, access table and audit log of a server listening on `host`."""
    creds, transport = server_transport(settings, host)
    access = server_access(settings, host)
    return ServerSecurity(creds, transport, access, audit_logger(settings.audit_log, service), service)


def _bearer(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization":
            v = v.decode("latin-1") if isinstance(v, bytes) else v
            scheme, _, token = v.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def peer_identities(context) -> list[str]:
    """The verified client certificate's SANs and CN (empty without mutual TLS)."""
    try:
        ctx = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context: no identity
        return []
    out = []
    for k in ("x509_subject_alternative_name", "x509_common_name"):
        for v in ctx.get(k, ()):
            s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            if s and s not in out:
                out.append(s)
    return out


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, who: Principal | None = None):
        super().__init__(message)
        self.code, self.who = code, who


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call (health and reflection are open)
    and writes its audit line."""

    def __init__(self, access: AccessTable | None, audit: logging.Logger, service: str,
                 client_certs: bool = False):
        self.access, self.audit, self.service = access, audit, service
        #: only a server that verifies client certificates (mutual TLS) believes them
        self.client_certs = client_certs

    def _authenticate(self, token: str | None, context) -> Principal | None:
        if token is not None:
            p = self.access.by_token(token) if token else None
            if p is None:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
            return p
        ids = peer_identities(context) if self.client_certs else []
        p = self.access.by_identities(ids)
        if p is None and ids:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"client certificate {ids[0]!r} has no role on this server",
                           Principal(None, ids[0], "cert"))
        return p

    def _check(self, method: str, token: str | None, context) -> Principal | None:
        if self.access is None:
            return None
        if method in OPEN_METHODS:
            with contextlib.suppress(_Refused):
                return self._authenticate(token, context)
            return None
        p = self._authenticate(token, context)
        if p is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                           "no credentials: send a bearer token (DYADLAB_TOKEN_FILE) or a client "
                           "certificate")
        if not allowed(p.role, method):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"role {p.role!r} may not call {method}", p)
        return p

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        token = _bearer(details.invocation_metadata)
        audited = method not in UNAUDITED
        me = self

        class Call:
            def __init__(self, request, context):
                self.context = context
                self.t0 = time.perf_counter()
                # The peer is read now, while the handler holds the call: grpc's
                # peer() on a call that was cancelled and released (a client's
                # deadline passing mid-stream) reads freed memory and crashed
                # the extractor (SIGSEGV; grpc/grpc#29927).
                self.peer = _peer(context) if audited else ""
                self.who = None
                self.keys = object_keys(request) if request is not None else []
                self.status = "OK"

            async def enter(self):
                try:
                    self.who = me._check(method, token, self.context)
                except _Refused as r:
                    self.status, self.who = r.code.name, r.who
                    await self.context.abort(r.code, str(r))

            def failed(self, exc: BaseException):
                code = None
                with contextlib.suppress(Exception):
                    code = self.context.code()
                if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
                    self.status = code.name
                elif isinstance(exc, grpc.aio.AbortError):
                    self.status = self.status if self.status != "OK" else "UNKNOWN"
                else:
                    self.status = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"

            def done(self):
                if audited:
                    me.write_audit(method, self)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def uu(request, context):
                c = Call(request, context)
                try:
                    await c.enter()
                    return await inner(request, context)
                except BaseException as e:
                    c.failed(e)
                    raise
                finally:
                    c.done()
            return grpc.unary_unary_rpc_method_handler(
                uu, handler.request_deserializer, handler.response_serializer)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def us(request, context):
                c = Call(request, context)
                try:
                    await c.enter()
                    async for item in _iterate(inner_us(request, context)):
                        yield item
                except BaseException as e:
                    c.failed(e)
                    raise
                finally:
                    c.done()
            return grpc.unary_stream_rpc_method_handler(
                us, handler.request_deserializer, handler.response_serializer)

        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def su(request_iterator, context):
                c = Call(None, context)
                try:
                    await c.enter()
                    return await inner_su(request_iterator, context)
                except BaseException as e:
                    c.failed(e)
                    raise
                finally:
                    c.done()
            return grpc.stream_unary_rpc_method_handler(
                su, handler.request_deserializer, handler.response_serializer)

        inner_ss = handler.stream_stream

        async def ss(request_iterator, context):
            c = Call(None, context)
            try:
                await c.enter()
                async for item in _iterate(inner_ss(request_iterator, context)):
                    yield item
            except BaseException as e:
                c.failed(e)
                raise
            finally:
                c.done()
        return grpc.stream_stream_rpc_method_handler(
            ss, handler.request_deserializer, handler.response_serializer)

    def write_audit(self, method: str, call) -> None:
        rec = {
            "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "service": self.service, "method": method,
            "who": call.who.audit() if call.who else (
                {"role": None, "name": "anonymous", "via": "none"} if self.access is not None
                else {"role": None, "name": "anonymous", "via": "auth-off"}),
            "peer": call.peer, "keys": call.keys, "status": call.status,
            "ms": round((time.perf_counter() - call.t0) * 1000, 1),
        }
        self.audit.info(json.dumps(rec, separators=(",", ":")))


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001
        return ""


async def _iterate(result):
    """A unary-stream / stream-stream behaviour: an async generator, or a coroutine
    that writes with context.write."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result


# -- the audit log ---------------------------------------------------------------------------
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_AUDIT_KEYS = 50


def short_key(key: str) -> str:
    """An object key as the audit log shows it: the content hash it contains,
    shortened; otherwise a hash of the key (a key may carry a name)."""
    m = _HEX64.search(key)
    if m:
        return m.group()[:12]
    return "k:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def object_keys(msg) -> list[str]:
    """Every ObjectRef key in a request message, shortened (see short_key)."""
    out: list[str] = []

    def walk(m, depth=0):
        if depth > 16 or len(out) >= MAX_AUDIT_KEYS:
            return
        if m.DESCRIPTOR.full_name == "dyadlab.v1.ObjectRef":
            if m.key:
                out.append(short_key(m.key))
            return
        for field, value in m.ListFields():
            if field.message_type is None or (field.message_type.GetOptions().map_entry):
                continue
            if _repeated(field):
                for v in value:
                    walk(v, depth + 1)
            else:
                walk(value, depth + 1)

    with contextlib.suppress(Exception):
        walk(msg)
    return out


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):          # protobuf >= 6 (label is gone in 7)
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


class _AppendHandler(logging.Handler):
    """One os.write per line on an O_APPEND descriptor: lines from several
    processes sharing the file never interleave."""

    def __init__(self, path: Path):
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, record):
        try:
            os.write(self.fd, (self.format(record) + "\n").encode())
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


def audit_logger(dest: str, service: str) -> logging.Logger:
    """A server's audit logger: DYADLAB_AUDIT_LOG (a file) or stderr; its own
    logger (not in logging's registry, not propagated): audit lines never mix
    with the service's log, and two servers in one process keep theirs apart."""
    logger = logging.Logger(f"dyadlab.audit.{service}", logging.INFO)
    logger.propagate = False
    if dest and dest.lower() not in ("stderr", "-"):
        handler: logging.Handler = _AppendHandler(Path(dest).expanduser())
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


# -- clients ---------------------------------------------------------------------------------
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
        if self.token:    # call credentials travel over TLS only
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.token))
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
    """What a client of `addr` uses, from the settings (see the module docstring)."""
    loop = is_loopback(host_of(addr))
    L = local(settings)
    token = None
    if settings.token_file:
        token = _read_token(settings.token_file)
    elif loop and L.user_token.is_file():
        token = L.user_token.read_text().strip() or None
    if settings.insecure:
        if not loop and settings.insecure != "any":
            raise ConfigError(f"refusing plaintext gRPC to {addr}: DYADLAB_INSECURE=1 allows "
                              "plaintext on loopback only (DYADLAB_INSECURE=any for a network "
                              "that encrypts)")
        return ClientSecurity(tls=False, token=token)
    roots = b""
    if settings.tls_ca:
        roots += _read(settings.tls_ca, "DYADLAB_TLS_CA")
    if loop and L.ca.is_file():     # the local CA vouches for loopback names only
        roots += (b"\n" if roots else b"") + L.ca.read_bytes()
    cert = key = None
    if settings.tls_client_cert:
        cert = _read(settings.tls_client_cert, "DYADLAB_TLS_CLIENT_CERT")
        key = _read(settings.tls_client_key, "DYADLAB_TLS_CLIENT_KEY")
    elif settings.tls_cert:
        cert = _read(settings.tls_cert, "DYADLAB_TLS_CERT")
        key = _read(settings.tls_key, "DYADLAB_TLS_KEY")
    return ClientSecurity(tls=True, root_pem=roots or None, cert_pem=cert, key_pem=key,
                          server_name=settings.tls_server_name, token=token)


def describe(settings: Settings, audit_log: str = "") -> str:
    """One line for `dyadlab status`: transport, authentication, audit log."""
    if settings.insecure:
        transport = "plaintext (DYADLAB_INSECURE)"
    elif settings.tls_cert:
        transport = "mutual TLS" if settings.tls_client_auth == "require" else "TLS"
    else:
        transport = f"TLS with the local development CA ({local(settings).dir})"
    auth = ("off (DYADLAB_AUTH=off)" if not settings.auth else
            "tokens/certificates from DYADLAB_AUTH_TOKENS" if settings.auth_tokens else
            "local tokens")
    return f"{transport}; authentication {auth}; audit log {audit_log or settings.audit_log or 'stderr'}"


# -- command line: credentials for a deployment ------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """python -m dyadlab.security ca DIR | cert DIR NAME [--dns D ...] [--ip I ...] | token"""
    import argparse
    p = argparse.ArgumentParser(prog="python -m dyadlab.security",
                                description="make TLS certificates and tokens for a deployment")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ca", help="a new CA: DIR/ca.pem, DIR/ca.key (0600)")
    c.add_argument("dir")
    c.add_argument("--days", type=int, default=3650)
    s = sub.add_parser("cert", help="a certificate signed by DIR's CA: DIR/NAME.pem, DIR/NAME.key")
    s.add_argument("dir")
    s.add_argument("name", help="common name, e.g. the service's DNS name")
    s.add_argument("--dns", action="append", default=[])
    s.add_argument("--ip", action="append", default=[])
    s.add_argument("--days", type=int, default=397)
    sub.add_parser("token", help="print a new token and the access-file line for it")
    a = p.parse_args(argv)
    if a.cmd == "ca":
        d = Path(a.dir)
        d.mkdir(parents=True, exist_ok=True)
        cert, key = make_ca("dyadlab CA", days=a.days)
        (d / "ca.pem").write_bytes(cert)
        write_private(d / "ca.key", key)
        print(f"wrote {d / 'ca.pem'} and {d / 'ca.key'}")
    elif a.cmd == "cert":
        d = Path(a.dir)
        cert, key = issue_cert((d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes(), a.name,
                               dns=[a.name, *a.dns], ips=a.ip, days=a.days)
        (d / f"{a.name}.pem").write_bytes(cert)
        write_private(d / f"{a.name}.key", key)
        print(f"wrote {d / (a.name + '.pem')} and {d / (a.name + '.key')}")
    else:
        tok = new_token()
        print(f"token (give it to the client, in the file DYADLAB_TOKEN_FILE names): {tok}")
        print(f"access-file line (server, DYADLAB_AUTH_TOKENS): sha256:{token_digest(tok)} ROLE NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
