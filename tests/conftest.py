"""Shared fixtures. Keep each group in its own section."""

from __future__ import annotations

import uuid

import pytest

from dyadlab.storage import LocalStore, ObjectStore, S3Store

try:  # tests/ as a package, or (pytest's default) on sys.path
    from tests.s3server import SwiftS3Server, SwiftUnavailable
except ImportError:
    from s3server import SwiftS3Server, SwiftUnavailable


# -- object store ---------------------------------------------------------------
def _swift_server(**kw):
    server = SwiftS3Server(**kw)
    try:
        server.start()
    except SwiftUnavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (Swift + s3api, tests/s3server.py) for the whole session."""
    yield from _swift_server()


@pytest.fixture(scope="session")
def s3_server_sse():
    """A second Swift S3 server with its encryption middleware (keymaster +
    encryption): it accepts SSE-S3 and keeps objects encrypted on disk."""
    yield from _swift_server(encryption=True)


@pytest.fixture
def s3_store_factory(s3_server):
    """make(bucket=None, **S3Store kwargs) -> an S3Store on the session server,
    in a fresh bucket unless one is named."""

    def make(bucket: str | None = None, **kw) -> S3Store:
        kw = {
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "secure": s3_server.secure,
            "region": s3_server.region,
            **kw,
        }
        return S3Store(
            kw.pop("endpoint", s3_server.endpoint), bucket=bucket or f"t-{uuid.uuid4().hex[:16]}", **kw
        )

    return make


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    """Each backend in turn; a fresh directory or bucket per test."""
    if request.param == "local":
        return LocalStore(tmp_path / "store", bucket="dyadlab")
    return request.getfixturevalue("s3_store_factory")()


# -- the service stack ----------------------------------------------------------------
import dataclasses  # noqa: E402

from dyadlab import services as registry  # noqa: E402
from dyadlab import stack as stack_mod  # noqa: E402
from dyadlab.config import Settings  # noqa: E402


@dataclasses.dataclass
class RunningStack:
    settings: Settings
    stack: stack_mod.Stack

    @property
    def store(self):
        from dyadlab.storage import open_store

        return open_store(self.settings)

    def addr(self, name: str) -> str:
        return self.stack.addrs[name]

    def assert_serving(self, timeout_s: float = 10.0) -> None:
        """Every service SERVING; an optional one (synth: no TorchServe in an
        embedded stack) must still answer, NOT_SERVING. A service that does
        not answer fails with how its process ended and its log's tail."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from dyadlab import client

        for name, addr in self.stack.addrs.items():
            want = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if registry.get(name).optional
                else health_pb2.HealthCheckResponse.SERVING
            )
            for svc in ("", registry.get(name).grpc_name):
                try:
                    with client.channel(addr) as ch:
                        got = (
                            health_pb2_grpc.HealthStub(ch)
                            .Check(health_pb2.HealthCheckRequest(service=svc), timeout=timeout_s)
                            .status
                        )
                except grpc.RpcError as e:
                    pytest.fail(
                        f"health of {name!r} ({svc!r}): {e.code()} {e.details()}\n" + self.post_mortem(name)
                    )
                assert got == want, (name, svc, self.post_mortem(name))

    def post_mortem(self, name: str, lines: int = 30) -> str:
        """How a service's process is (running / how it ended) and its log's
        tail: for assertion messages, so a CI log says why a service went away."""
        from pathlib import Path

        status = stack_mod.exit_status(self.stack.pids[name]) or "running"
        try:
            tail = Path(self.stack.logs[name]).read_text(errors="replace").splitlines()[-lines:]
        except (OSError, KeyError):
            tail = ["(no log)"]
        return f"{name} (pid {self.stack.pids[name]}): {status}; log tail:\n" + "\n".join(tail)


def _start_stack(home, extra_env: dict[str, str]) -> RunningStack:
    addrs = {n: f"127.0.0.1:{stack_mod.free_port()}" for n in registry.NAMES}
    env = {"DYADLAB_HOME": str(home), **{registry.get(n).addr_env: a for n, a in addrs.items()}, **extra_env}
    settings = Settings.from_env(env)
    return RunningStack(settings, stack_mod.start(settings, addrs, metrics=False, embedded=True))


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Both services as real processes on loopback ports, local-directory store."""
    rs = _start_stack(tmp_path_factory.mktemp("dyadlab-home"), {})
    try:
        yield rs
    finally:
        stack_mod.stop(rs.settings, rs.stack)


@pytest.fixture(scope="session")
def services_s3(tmp_path_factory, s3_server):
    """Both services as real processes, storing in the real S3 server."""
    rs = _start_stack(
        tmp_path_factory.mktemp("dyadlab-home-s3"),
        {
            "DYADLAB_S3_ENDPOINT": s3_server.endpoint,
            "DYADLAB_S3_ACCESS_KEY": s3_server.access_key,
            "DYADLAB_S3_SECRET_KEY": s3_server.secret_key,
            "DYADLAB_S3_SECURE": "true" if s3_server.secure else "false",
            "DYADLAB_S3_REGION": s3_server.region,
            "DYADLAB_BUCKET": "dyadlab-services",
        },
    )
    try:
        yield rs
    finally:
        stack_mod.stop(rs.settings, rs.stack)


# -- TorchServe -----------------------------------------------------------------------
@pytest.fixture
def torchserve_factory(tmp_path_factory):
    """make(model_store, load_models, start=True, **TorchServe kwargs) -> a real
    TorchServe (dyadlab.torchserve) in its own temp dir, on free loopback ports,
    with its own TMPDIR (pid file, worker sockets): a user's TorchServe is untouched.
    Every server made here is stopped at teardown, java and workers included."""
    pytest.importorskip("ts", reason="torchserve is not installed (requirements.lock)")
    from dyadlab import torchserve as ts_mod

    if not ts_mod.java_available():
        pytest.skip("java not found: TorchServe needs a JDK 11+ (apt-get install openjdk-17-jre-headless)")
    made: list = []

    def make(model_store, load_models, *, start: bool = True, **kw):
        ts = ts_mod.TorchServe(tmp_path_factory.mktemp("torchserve"), model_store, load_models, **kw)
        made.append(ts)
        return ts.start() if start else ts

    yield make
    errors = []
    for ts in made:
        try:
            ts.stop()
        except Exception as e:  # noqa: BLE001 - stop every server, then report
            errors.append(e)
    assert not errors, errors
