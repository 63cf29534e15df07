"""Client helpers: channels with retries, readiness waits, deadlines everywhere.

Unary calls retry on UNAVAILABLE through gRPC's own retry policy (service
config); streamed calls are not retried automatically because they may have
side effects half-way — the callers here are idempotent (content-addressed
results), so `call_stream` retries the whole call on UNAVAILABLE.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dyadlab.rpc import MAX_MESSAGE_BYTES

_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{}],  # every method
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.2s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
]

#: Deadline of short calls (health, imports of small tables).
SHORT_TIMEOUT_S = 30.0


def channel(addr: str) -> grpc.Channel:
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


def aio_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


def health_status(addr: str, service: str = "", timeout_s: float = 2.0) -> str:
    """SERVING / NOT_SERVING / UNKNOWN / UNREACHABLE, never raises."""
    with channel(addr) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                  grpc.StatusCode.DEADLINE_EXCEEDED) else e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_ready(addr: str, timeout_s: float = 60.0, service: str = "",
               alive: Callable[[], bool] | None = None) -> None:
    """Block until the service reports SERVING; raise TimeoutError with the last state."""
    deadline = time.monotonic() + timeout_s
    state = "UNREACHABLE"
    while time.monotonic() < deadline:
        state = health_status(addr, service)
        if state == "SERVING":
            return
        if alive is not None and not alive():
            raise RuntimeError(f"service at {addr} exited before it was ready (last state {state})")
        time.sleep(0.1)
    raise TimeoutError(f"service at {addr} not ready after {timeout_s:.0f} s (last state {state})")


def call_stream(start: Callable[[], Iterator], attempts: int = 3,
                backoff_s: float = 1.0) -> Iterator:
    """Iterate a server stream, restarting it on UNAVAILABLE before the first
    result arrives (safe because our long calls are idempotent)."""
    for attempt in range(attempts):
        try:
            yield from start()
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(backoff_s * (2 ** attempt))
