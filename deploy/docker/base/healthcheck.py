#!/opt/venv/bin/python
"""Container health check: exit 0 when the service answers SERVING.

    dyadlab-healthcheck extractor|smiles|stats|synth   gRPC health of that service, on its
                                                       plaintext DYADLAB_HEALTH_PORT (else the
                                                       port of its DYADLAB_*_ADDR)
    dyadlab-healthcheck grpc HOST:PORT [SERVICE]       gRPC health of any server
    dyadlab-healthcheck torchserve [URL]               TorchServe's /ping answers Healthy
                                                       (with the inference key: token auth)
    dyadlab-healthcheck http URL                       HTTP 200

Docker's HEALTHCHECK runs it inside the container, so it checks 127.0.0.1.
"""

import os
import sys
import urllib.error
import urllib.request

from dyadlab import services as registry  # the service registry: names, ports, health names


def grpc_status(addr: str, service: str, timeout: float = 3.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def http_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status, r.read(4096)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except Exception:  # noqa: BLE001 - any failure is "unhealthy"
        return 0, b""


def torchserve(url: str) -> tuple[bool, str]:
    """TorchServe 0.12 checks tokens on /ping too: send the inference key."""
    import json

    path = os.environ.get("DYADLAB_TORCHSERVE_KEY_FILE") or "/var/lib/torchserve/key_file.json"
    try:
        key = json.loads(open(path, encoding="utf-8").read())["inference"]["key"]
    except (OSError, ValueError, KeyError):
        return False, f"no inference key in {path} (TorchServe not started yet?)"
    code, body = http_status(url, {"Authorization": f"Bearer {key}"})
    try:
        status = json.loads(body).get("status", "") if body else ""
    except ValueError:
        status = ""
    return code == 200 and status == "Healthy", f"HTTP {code} {status}".strip()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "http":
        code, _ = http_status(argv[1])
        ok, state = code == 200, f"HTTP {code}"
    elif argv[0] == "torchserve":
        ok, state = torchserve(argv[1] if len(argv) > 1 else "http://127.0.0.1:8080/ping")
    else:
        if argv[0] == "grpc":
            addr, service = argv[1], argv[2] if len(argv) > 2 else ""
        elif argv[0] in registry.BY_NAME:
            svc = registry.get(argv[0])
            raw, service = os.environ.get(svc.addr_env, ""), svc.grpc_name
            port = int(raw.rsplit(":", 1)[1]) if ":" in raw else svc.port
            # the plaintext health-only port (the service port speaks TLS)
            port = int(os.environ.get("DYADLAB_HEALTH_PORT") or 0) or port
            addr = f"127.0.0.1:{port}"
        else:
            print(f"unknown check {argv[0]!r}\n{__doc__}", file=sys.stderr)
            return 2
        state = grpc_status(addr, service)
        ok = state == "SERVING"
    print(state)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
