"""The one table of dyadlab's services.

Everything that needs to know a service — the settings (its address variable
and default port), the local stack (the module it runs, its metrics port,
its health name), the container images and their health check, the security
roles (its proto), the tests — reads it here. Adding a service is a row.

| name      | module             | port  | metrics | health-only port | gRPC service         |
|-----------|--------------------|-------|---------|------------------|----------------------|
| extractor | services.extractor | 50061 | 9461    | 50071            | dyadlab.v1.Extractor |
| smiles    | services.smiles    | 50062 | 9462    | 50072            | dyadlab.v1.Smiles    |
| stats     | services.stats     | 50063 | 9463    | 50073            | dyadlab.v1.Stats     |
| synth     | services.synth     | 50064 | 9464    | 50074            | dyadlab.v1.Synth     |

This module imports nothing heavy (no grpc, no protobuf): the container health
check and the CLI's start-up read it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Service:
    #: short name: the CLI's, the logs', the images' (dyadlab/<name>)
    name: str
    #: what `python -m` runs
    module: str
    #: default gRPC port (on DYADLAB_BIND / 127.0.0.1)
    port: int
    #: Prometheus port under `dyadlab up` and in the images
    metrics_port: int
    #: plaintext health-only port in the images (DYADLAB_HEALTH_PORT)
    health_port: int
    #: the proto service: file under proto/dyadlab/v1/ (without .proto) and service name
    proto: str
    proto_service: str
    #: NOT_SERVING is an expected state (synth without TorchServe): the stack is still healthy
    optional: bool = False
    #: a module with the process this service relies on, which the local stack starts
    #: before it (synth: TorchServe); its interface: see dyadlab.stack.Companion
    companion: str | None = None

    @property
    def grpc_name(self) -> str:
        """Fully-qualified gRPC service name, as registered for health and reflection."""
        return f"dyadlab.v1.{self.proto_service}"

    @property
    def addr_env(self) -> str:
        """The environment variable with its address (host:port)."""
        return f"DYADLAB_{self.name.upper()}_ADDR"

    @property
    def addr_field(self) -> str:
        """The Settings attribute holding its address."""
        return f"{self.name}_addr"

    @property
    def default_addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pb2(self) -> str:
        """The generated module of its proto (descriptors: RPC names for roles and tests)."""
        return f"dyadlab.v1.{self.proto}_pb2"


SERVICES: tuple[Service, ...] = (
    Service("extractor", "services.extractor", 50061, 9461, 50071, "extractor", "Extractor"),
    Service("smiles", "services.smiles", 50062, 9462, 50072, "smiles", "Smiles"),
    Service("stats", "services.stats", 50063, 9463, 50073, "stats", "Stats"),
    Service(
        "synth",
        "services.synth",
        50064,
        9464,
        50074,
        "synth",
        "Synth",
        optional=True,
        companion="services.synth.companion",
    ),
)

BY_NAME: dict[str, Service] = {s.name: s for s in SERVICES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def get(name: str) -> Service:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown service {name!r} (known: {', '.join(NAMES)})") from None


def by_grpc_name(grpc_name: str) -> Service:
    for s in SERVICES:
        if s.grpc_name == grpc_name:
            return s
    raise KeyError(f"no dyadlab service is called {grpc_name!r}")


#: the health name under which a service says which store it uses (dyadlab.rpc.serve)
STORE_HEALTH_PREFIX = "dyadlab.store."


def store_health_name(store_id: str) -> str:
    return STORE_HEALTH_PREFIX + store_id
