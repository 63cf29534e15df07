"""Client helpers: channels with retries, readiness waits, deadlines everywhere.

Calls retry on UNAVAILABLE through gRPC's own retry policy (service config):
a call that failed before the server sent anything is sent again, with
backoff. Every call made with these channels has a deadline: the caller's, or
else Settings.rpc_timeout_s (DYADLAB_RPC_TIMEOUT_S), filled in by an
interceptor, so a hung dependency can never hang a caller forever.

Every channel is made here, secured as dyadlab.security.client_security says
for its address: TLS (the configured CA, or the local development CA for
loopback addresses), the client certificate under mutual TLS, and the bearer
token as call credentials; plaintext only under DYADLAB_INSECURE. `settings`
defaults to the process's environment (Settings.from_env()).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_MESSAGE_BYTES = 4 << 20  # messages carry references, never bulk data

# round_robin: against a headless Kubernetes Service (DNS returns every pod)
# calls are spread over the replicas instead of pinned to the first one.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],  # every method
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
]

if TYPE_CHECKING:
    from dyadlab.config import Settings
    from dyadlab.security import ClientSecurity


def security_for(addr: str, settings: Settings | None = None) -> ClientSecurity:
    from dyadlab import security
    from dyadlab.config import Settings

    return security.client_security(addr, settings or Settings.from_env())


def channel(
    addr: str, settings: Settings | None = None, security: ClientSecurity | None = None
) -> grpc.Channel:
    settings = settings or _env_settings()
    sec = security or security_for(addr, settings)
    opts = CHANNEL_OPTIONS + sec.options()
    if sec.tls:
        ch = grpc.secure_channel(addr, sec.channel_credentials(), options=opts)
    else:
        ch = grpc.insecure_channel(addr, options=opts)
    md = () if sec.tls else sec.metadata()  # under TLS the token rides call credentials
    return grpc.intercept_channel(ch, _Defaults(md, settings.rpc_timeout_s))


def aio_channel(
    addr: str, settings: Settings | None = None, security: ClientSecurity | None = None
) -> grpc.aio.Channel:
    """An asyncio channel: what a service uses to call another service."""
    settings = settings or _env_settings()
    sec = security or security_for(addr, settings)
    opts = CHANNEL_OPTIONS + sec.options()
    md = () if sec.tls else sec.metadata()
    icpt = [_AioUnaryUnary(md, settings.rpc_timeout_s), _AioUnaryStream(md, settings.rpc_timeout_s)]
    if sec.tls:
        return grpc.aio.secure_channel(addr, sec.channel_credentials(), options=opts, interceptors=icpt)
    return grpc.aio.insecure_channel(addr, options=opts, interceptors=icpt)


def _env_settings() -> Settings:
    from dyadlab.config import Settings

    return Settings.from_env()


class _Defaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Per call: the default deadline when the caller gave none, and the token
    as metadata on a plaintext channel (DYADLAB_INSECURE)."""

    def __init__(self, md, timeout_s: float):
        self.md, self.timeout_s = md, timeout_s

    def _details(self, d):
        return _CallDetails(
            d.method,
            self.timeout_s if d.timeout is None else d.timeout,
            list(d.metadata or ()) + list(self.md),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, md, timeout_s: float):
        self.md, self.timeout_s = md, timeout_s

    async def intercept_unary_unary(self, continuation, d, request):
        return await continuation(_aio_details(d, self.md, self.timeout_s), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, md, timeout_s: float):
        self.md, self.timeout_s = md, timeout_s

    async def intercept_unary_stream(self, continuation, d, request):
        return await continuation(_aio_details(d, self.md, self.timeout_s), request)


def _aio_details(d, md, timeout_s: float):
    return grpc.aio.ClientCallDetails(
        d.method,
        timeout_s if d.timeout is None else d.timeout,
        list(d.metadata or ()) + list(md),
        d.credentials,
        d.wait_for_ready,
    )


def health_status(
    addr: str, service: str = "", timeout_s: float = 2.0, settings: Settings | None = None
) -> str:
    """SERVING / NOT_SERVING / UNKNOWN / UNREACHABLE, never raises (health is
    open: no token needed, but the channel is TLS like every other)."""
    with channel(addr, settings) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            return (
                "UNREACHABLE"
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else e.code().name
            )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_ready(
    addr: str,
    timeout_s: float = 60.0,
    service: str = "",
    alive: Callable[[], bool] | None = None,
    settings: Settings | None = None,
) -> None:
    """Block until the service reports SERVING; raise TimeoutError with the last state."""
    deadline = time.monotonic() + timeout_s
    state = "UNREACHABLE"
    while time.monotonic() < deadline:
        state = health_status(addr, service, settings=settings)
        if state == "SERVING":
            return
        if alive is not None and not alive():
            raise RuntimeError(f"service at {addr} exited before it was ready (last state {state})")
        time.sleep(0.1)
    raise TimeoutError(f"service at {addr} not ready after {timeout_s:.0f} s (last state {state})")
