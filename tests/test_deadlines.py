"""Every gRPC call has a deadline (issue 6): statically, every stub call in the
code names one; dynamically, a channel from dyadlab.client fills in
DYADLAB_RPC_TIMEOUT_S for a call that names none, so a hung server cannot hang
a caller. (The hung-extractor fault in tests/test_faults.py shows the same
end to end, smiles -> extractor.)"""

from __future__ import annotations

import ast
import asyncio
import re
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import grpc_health.v1.health_pb2_grpc
import pytest

from dyadlab import client
from dyadlab.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CODE = ("dyadlab", "services", "scripts")


def rpc_method_names() -> set[str]:
    """Every RPC method name of every stub the code can make: our protos,
    TorchServe's, and gRPC health."""
    files = [p for p in ROOT.joinpath("dyadlab").rglob("*_pb2_grpc.py")]
    files.append(Path(grpc_health.v1.health_pb2_grpc.__file__))
    names = set()
    for f in files:
        names |= set(re.findall(r"self\.(\w+) = channel\.\w+\(", f.read_text()))
    return names


def stub_calls():
    """(file, line, method, has_timeout) of every call `<x>.<RpcMethod>(...)`
    (also `.future(...)` / `.with_call(...)`) outside generated code."""
    names = rpc_method_names()
    for root in CODE:
        for p in sorted(ROOT.joinpath(root).rglob("*.py")):
            if p.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for n in ast.walk(ast.parse(p.read_text(), str(p))):
                if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                    continue
                f, method = n.func, n.func.attr
                if method in ("future", "with_call") and isinstance(f.value, ast.Attribute):
                    method = f.value.attr
                if method in names:
                    kws = {k.arg for k in n.keywords}
                    # **kwargs forwarding counts only if the caller's dict names a timeout
                    yield p.relative_to(ROOT), n.lineno, method, "timeout" in kws


def test_the_audit_sees_the_calls_it_must():
    """Guards the audit itself: it finds the known calls (smiles -> extractor,
    synth -> TorchServe, the health probe), so an empty scan cannot pass."""
    assert {"Extract", "Analyze", "Predictions", "Check", "Transfer"} <= rpc_method_names()
    found = {(str(f), m) for f, _, m, _ in stub_calls()}
    for want in [
        ("services/smiles/server.py", "Extract"),
        ("services/synth/server.py", "Extract"),
        ("dyadlab/torchserve/client.py", "Predictions"),
        ("dyadlab/client.py", "Check"),
        ("dyadlab/cohort.py", "Analyze"),
    ]:
        assert want in found, want
    assert len(found) >= 15


def test_every_stub_call_in_the_code_names_a_deadline():
    missing = [f"{f}:{line} {m}" for f, line, m, ok in stub_calls() if not ok]
    assert not missing, "gRPC calls without timeout=: " + ", ".join(missing)


# -- the channel's default deadline, against a server that never answers ---------------
SLOW = "/dyadlab.test.Slow/Hang"


@pytest.fixture
def hung_server():
    """A real gRPC server on a loopback socket whose one method blocks until the
    test ends (a hung dependency)."""
    release = threading.Event()

    def hang(request, context):
        release.wait(60)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "dyadlab.test.Slow",
                {
                    "Hang": grpc.unary_unary_rpc_method_handler(
                        hang, request_deserializer=None, response_serializer=None
                    )
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    release.set()
    server.stop(0)


def _settings(timeout_s: int) -> Settings:
    return Settings.from_env({"DYADLAB_INSECURE": "1", "DYADLAB_RPC_TIMEOUT_S": str(timeout_s)})


def test_call_without_deadline_gets_the_default(hung_server):
    with client.channel(hung_server, _settings(1)) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SLOW)(b"")  # no timeout= on purpose
        took = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < took < 5, took


def test_callers_own_deadline_wins(hung_server):
    with client.channel(hung_server, _settings(30)) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SLOW)(b"", timeout=0.3)
        took = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 3, took


def test_aio_channel_without_deadline_gets_the_default(hung_server):
    async def call():
        async with client.aio_channel(hung_server, _settings(1)) as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(SLOW)(b"")
            return ei.value.code(), time.monotonic() - t0

    code, took = asyncio.run(call())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.9 < took < 5, took


# -- deadline propagation: smiles -> extractor ------------------------------------------------
def test_smiles_passes_its_callers_deadline_on_to_the_extractor(tmp_path):
    """A real smiles process whose extractor is a server that records the
    deadline it was given and never answers. A client allowing 3 s: the
    extractor call gets what is left of those 3 s (not smiles' own hour), and
    the client hears DEADLINE_EXCEEDED on time."""
    import os
    import subprocess
    import sys

    from dyadlab.stack import free_port
    from dyadlab.v1 import common_pb2, smiles_pb2, smiles_pb2_grpc

    seen: list[float] = []
    release = threading.Event()

    def extract(request, context):
        seen.append(context.time_remaining())
        release.wait(30)
        return iter(())

    fake = grpc.server(futures.ThreadPoolExecutor(4))
    fake.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "dyadlab.v1.Extractor", {"Extract": grpc.unary_stream_rpc_method_handler(extract)}
            )
        ]
    )
    ex_port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    addr = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        DYADLAB_HOME=str(tmp_path),
        DYADLAB_INSECURE="1",
        DYADLAB_SMILES_ADDR=addr,
        DYADLAB_EXTRACTOR_ADDR=f"127.0.0.1:{ex_port}",
        DYADLAB_RPC_TIMEOUT_S="3600",
        DYADLAB_METRICS_PORT="0",
    )
    log = open(tmp_path / "smiles.log", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "services.smiles"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        settings = Settings.from_env(env)
        client.wait_ready(addr, 60, "dyadlab.v1.Smiles", alive=lambda: p.poll() is None, settings=settings)
        with client.channel(addr, settings) as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                list(
                    smiles_pb2_grpc.SmilesStub(ch).Analyze(
                        smiles_pb2.AnalyzeRequest(video=common_pb2.ObjectRef(key="inputs/x.mp4")), timeout=3
                    )
                )
            took = time.monotonic() - t0
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 5, took
        assert len(seen) == 1 and 2.0 < seen[0] <= 3.0, seen
    finally:
        release.set()
        p.terminate()
        p.wait(20)
        fake.stop(0)
        log.close()
