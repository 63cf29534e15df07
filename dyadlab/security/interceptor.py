"""The server interceptor: authenticates and authorizes every call and writes
its line in the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import logging
import time

import grpc

from dyadlab import interceptors
from dyadlab.security.access import OPEN_METHODS, UNAUDITED, AccessTable, Principal, allowed
from dyadlab.security.audit import object_keys


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


#: who the call being handled was made by (set once it is authenticated; None with auth off)
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("dyadlab_caller", default=None)


def caller() -> Principal | None:
    """The authenticated caller of the RPC being handled (in its task and the
    threads it starts with asyncio.to_thread); None when auth is off."""
    return _CALLER.get()


def caller_name() -> str:
    """A name for records that say who did something (a review's reviewer)."""
    p = _CALLER.get()
    return p.name if p is not None and p.name else "anonymous (authentication off)"


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, who: Principal | None = None):
        super().__init__(message)
        self.code, self.who = code, who


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call (health and reflection are open)
    and writes its audit line."""

    def __init__(
        self, access: AccessTable | None, audit: logging.Logger, service: str, client_certs: bool = False
    ):
        self.access, self.audit, self.service = access, audit, service
        #: only a server that verifies client certificates (mutual TLS) believes them
        self.client_certs = client_certs

    def _authenticate(self, token: str | None, context) -> Principal | None:
        assert self.access is not None  # only _check calls it, once it has an access table
        if token is not None:
            p = self.access.by_token(token) if token else None
            if p is None:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
            return p
        ids = peer_identities(context) if self.client_certs else []
        p = self.access.by_identities(ids)
        if p is None and ids:
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {ids[0]!r} has no role on this server",
                Principal(None, ids[0], "cert"),
            )
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
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no credentials: send a bearer token (DYADLAB_TOKEN_FILE) or a client certificate",
            )
        # a principal without a role (None) may call nothing: allowed() has no role None
        if p.role is None or not allowed(p.role, method):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"role {p.role!r} may not call {method}", p)
        return p

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        token = _bearer(details.invocation_metadata)
        audited = method not in UNAUDITED
        return interceptors.wrap_handler(
            handler, lambda request, context: _Call(self, method, token, audited, request, context)
        )

    def write_audit(self, method: str, call) -> None:
        rec = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "service": self.service,
            "method": method,
            "who": call.who.audit()
            if call.who
            else (
                {"role": None, "name": "anonymous", "via": "none"}
                if self.access is not None
                else {"role": None, "name": "anonymous", "via": "auth-off"}
            ),
            "peer": call.peer,
            "keys": call.keys,
            "status": call.status,
            "ms": round((time.perf_counter() - call.t0) * 1000, 1),
        }
        self.audit.info(json.dumps(rec, separators=(",", ":")))


class _Call:
    """One call as the audit log tells it: who, from where, which objects, how
    it ended (the interceptors.CallHooks of AuthInterceptor)."""

    def __init__(
        self, auth: AuthInterceptor, method: str, token: str | None, audited: bool, request, context
    ):
        self.auth, self.method, self.token, self.audited = auth, method, token, audited
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
            self.who = self.auth._check(self.method, self.token, self.context)
        except _Refused as r:
            self.status, self.who = r.code.name, r.who
            await self.context.abort(r.code, str(r))
        _CALLER.set(self.who)

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
        if self.audited:
            self.auth.write_audit(self.method, self)


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001
        return ""
