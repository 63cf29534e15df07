"""Client helpers: channels with retries, readiness waits, deadlines everywhere.

Calls retry on UNAVAILABLE through gRPC's own retry policy (service config):
a call that failed before the server sent anything is sent again, with
backoff. Every call made with these channels passes a deadline.
"""
from __future__ import annotations

import json
import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_MESSAGE_BYTES = 4 << 20  # messages carry references, never bulk data

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
