"""TorchServe's gRPC inference API, with token auth.

Auth. Token authorization stays on unless asked otherwise: TorchServe writes
key_file.json (inference, management and API keys) into its cwd, and every
REST call needs "Authorization: Bearer <key>", every gRPC call the metadata
("authorization", "Bearer <key>"): the inference key for inference/metrics,
the management key for management. A gRPC call without it fails with
PERMISSION_DENIED, a REST call with HTTP 400. The metrics API (Prometheus text,
metrics_mode=prometheus) does not check tokens in 0.12.0; it listens on loopback.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc


def auth_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for TorchServe's token auth ('' / None: none)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


class InferenceClient:
    """TorchServe's gRPC inference API on `addr` (host:port) with the inference key."""

    def __init__(self, addr: str, key: str | None = None, *, max_message_mb: int = 64):
        from dyadlab.torchserve_grpc import inference_pb2_grpc

        opts = [
            ("grpc.max_send_message_length", max_message_mb << 20),
            ("grpc.max_receive_message_length", max_message_mb << 20),
        ]
        self.addr, self.key = addr, key
        self._channel = grpc.insecure_channel(addr, options=opts)
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def ping(self, timeout: float = 10.0) -> str:
        """The server's health text, e.g. '{"status": "Healthy"}'."""
        from google.protobuf import empty_pb2

        return self._stub.Ping(empty_pb2.Empty(), timeout=timeout, metadata=auth_metadata(self.key)).health

    def predict(
        self, model: str, inputs: Mapping[str, bytes], timeout: float = 60.0, version: str = ""
    ) -> bytes:
        """One prediction: the handler sees `inputs` as one request (a dict of bytes).
        Raises grpc.RpcError: PERMISSION_DENIED without a valid key; INTERNAL for
        an unknown model ("Model not found: ...") or a failing handler; ..."""
        from dyadlab.torchserve_grpc import inference_pb2

        req = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input={k: bytes(v) for k, v in inputs.items()}
        )
        return self._stub.Predictions(req, timeout=timeout, metadata=auth_metadata(self.key)).prediction

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def predict(
    addr: str,
    key: str | None,
    model: str,
    inputs: Mapping[str, bytes],
    timeout: float = 60.0,
    version: str = "",
) -> bytes:
    """One gRPC prediction on a fresh channel (see InferenceClient.predict)."""
    with InferenceClient(addr, key) as c:
        return c.predict(model, inputs, timeout=timeout, version=version)


def ping(addr: str, key: str | None, timeout: float = 10.0) -> str:
    with InferenceClient(addr, key) as c:
        return c.ping(timeout=timeout)
