"""The service registry (dyadlab/services.py) is the one place a service's
name, module, ports and health name are decided: everything else that spells
them out — settings, images, compose, Kubernetes, the configuration docs —
must agree with it, and a service whose proto or module is missing fails here."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from dyadlab import config, services, stack
from dyadlab.config import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("svc", services.SERVICES, ids=services.NAMES)
def test_registry_names_a_real_module_and_proto_service(svc):
    assert importlib.util.find_spec(svc.module) is not None, svc.module
    assert importlib.util.find_spec(svc.module + ".__main__") is not None, (
        f"`python -m {svc.module}` needs a __main__"
    )
    pb2 = importlib.import_module(svc.pb2)
    assert pb2.DESCRIPTOR.services_by_name[svc.proto_service].full_name == svc.grpc_name
    if svc.companion:
        mod = importlib.import_module(svc.companion)
        for fn in ("unavailable", "start", "wait_ready", "env", "alive", "describe", "stop"):
            assert callable(getattr(mod, fn)), f"{svc.companion}.{fn}"
        assert issubclass(mod.CompanionError, Exception)


def test_ports_are_distinct():
    ports = [p for s in services.SERVICES for p in (s.port, s.metrics_port, s.health_port)]
    assert len(ports) == len(set(ports))


def test_every_service_has_an_address_setting():
    s = Settings.from_env({"DYADLAB_HOME": "/nonexistent"})
    assert s.addrs() == {n: services.get(n).default_addr for n in services.NAMES}
    moved = Settings.from_env({"DYADLAB_HOME": "/x", "DYADLAB_SMILES_ADDR": "10.0.0.1:1"})
    assert moved.addr("smiles") == "10.0.0.1:1" and moved.to_env()["DYADLAB_SMILES_ADDR"] == "10.0.0.1:1"
    assert stack.configured_addrs(moved) == moved.addrs()
    with pytest.raises(KeyError, match="unknown service"):
        services.get("nope")


def test_settings_table_covers_every_field_once():
    fields = {f.name for f in config.dataclasses.fields(Settings)}
    table = {v.field for v in config.VARS} | {v.field + "_file" for v in config.VARS if v.secret}
    assert fields == table
    assert len({v.name for v in config.VARS}) == len(config.VARS)


def test_settings_round_trip_through_a_child_environment(tmp_path):
    key = tmp_path / "secret"
    key.write_text("s3cr3t\n")
    s = Settings.from_env(
        {
            "DYADLAB_HOME": str(tmp_path),
            "DYADLAB_S3_ENDPOINT": "s3:9000",
            "DYADLAB_S3_ACCESS_KEY": "AK",
            "DYADLAB_S3_SECRET_KEY_FILE": str(key),
            "DYADLAB_INSECURE": "1",
            "DYADLAB_AUTH": "off",
            "DYADLAB_WORKERS": "3",
            "DYADLAB_SYNTH_PREDICT_TIMEOUT_S": "2.5",
        }
    )
    env = s.to_env()
    assert "s3cr3t" not in env.values() and env["DYADLAB_S3_SECRET_KEY_FILE"] == str(key)
    assert Settings.from_env(env) == s
    assert s.synth_predict_timeout_s == 2.5 and s.workers == 3 and s.insecure == "loopback"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"DYADLAB_WORKERS": "0"}, "DYADLAB_WORKERS=0 must be >= 1"),
        ({"DYADLAB_SYNTH_PROBE_S": "-1"}, "DYADLAB_SYNTH_PROBE_S='-1' must be > 0"),
        ({"DYADLAB_TORCHSERVE": "maybe"}, "use auto or off"),
        ({"DYADLAB_STATS_ADDR": "stats"}, "DYADLAB_STATS_ADDR='stats' is not host:port"),
        ({"DYADLAB_AUTH": "perhaps"}, "not a boolean"),
    ],
)
def test_bad_settings_say_which_variable(env, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        Settings.from_env({"DYADLAB_HOME": "/x", **env})


def test_configuration_docs_are_generated_from_the_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == config.markdown(), (
        "docs/configuration.md is stale: python -m dyadlab.config --markdown > docs/configuration.md"
    )


@pytest.mark.parametrize("svc", services.SERVICES, ids=services.NAMES)
def test_image_agrees_with_the_registry(svc):
    df = (ROOT / "deploy" / "docker" / svc.name / "Dockerfile").read_text()
    assert f"{svc.addr_env}=0.0.0.0:{svc.port}" in df
    assert f"DYADLAB_METRICS_PORT={svc.metrics_port}" in df
    assert f"DYADLAB_HEALTH_PORT={svc.health_port}" in df
    assert f"EXPOSE {svc.port} {svc.metrics_port} {svc.health_port}" in df
    assert f'"dyadlab-healthcheck", "{svc.name}"' in df
    assert f'CMD ["python", "-m", "{svc.module}"]' in df


@pytest.mark.parametrize("svc", services.SERVICES, ids=services.NAMES)
def test_kubernetes_manifest_agrees_with_the_registry(svc):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / f"{svc.name}.yaml").read_text()))
    dep = next(d for d in docs if d and d["kind"] == "Deployment" and d["metadata"]["name"] == svc.name)
    ctr = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == svc.name)
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert (ports["grpc"], ports["metrics"], ports["health"]) == (svc.port, svc.metrics_port, svc.health_port)
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    assert env.get("DYADLAB_METRICS_PORT") == str(svc.metrics_port)
    assert env.get("DYADLAB_HEALTH_PORT") == str(svc.health_port)
    probe = ctr["readinessProbe"]["grpc"]
    assert probe == {"port": svc.health_port, "service": svc.grpc_name}


def test_compose_agrees_with_the_registry():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    text = (ROOT / "docker-compose.yml").read_text()
    for svc in services.SERVICES:
        assert f"{svc.addr_env}: {svc.name}:{svc.port}" in text
        assert svc.name in compose["services"]
