"""dyadlab.torchserve against a real TorchServe 0.12.0 (java + Python workers).

The model here is a fixture for the serving infrastructure: a 1-layer torch
model saved as a state_dict and a real handler that loads it and returns JSON.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from dyadlab import torchserve as T

HANDLER = textwrap.dedent('''
    """Test handler: Linear(3, 2) from a state_dict; input "x" = JSON list of 3 floats."""
    import json
    import os

    import torch

    _model = None


    def handle(data, context):
        global _model
        if _model is None:                      # TorchServe calls handle(None, ctx) first
            path = os.path.join(context.system_properties["model_dir"],
                                context.manifest["model"]["serializedFile"])
            model = torch.nn.Linear(3, 2)
            model.load_state_dict(torch.load(path, weights_only=True))
            _model = model.eval()
        if data is None:
            return None
        out = []
        for row in data:                        # one dict of bytes per request
            x = json.loads(bytes(row["x"]))
            with torch.no_grad():
                y = _model(torch.tensor(x, dtype=torch.float32))
            out.append(json.dumps({"y": y.tolist()}))
        return out
''')

BROKEN_HANDLER = textwrap.dedent("""
    def handle(data, context):
        raise RuntimeError("this worker never loads")
""")


@dataclasses.dataclass
class TinyModel:
    store: Path
    model: torch.nn.Linear

    def expected(self, x: list[float]) -> list[float]:
        with torch.no_grad():
            return self.model(torch.tensor(x)).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModel:
    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    src = tmp_path_factory.mktemp("tiny-src")
    torch.manual_seed(7)
    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), src / "tiny.pt")
    (src / "tiny_handler.py").write_text(HANDLER)
    (src / "broken_handler.py").write_text(BROKEN_HANDLER)
    (src / "labels.json").write_text('["a", "b"]')
    store = tmp_path_factory.mktemp("model-store")
    T.build_mar("tiny", "1.0", src / "tiny.pt", src / "tiny_handler.py", [src / "labels.json"], store)
    T.build_mar("broken", "1.0", src / "tiny.pt", src / "broken_handler.py", [], store)
    return TinyModel(store, model)


def _x(values) -> dict[str, bytes]:
    return {"x": json.dumps(values).encode()}


def _http_status(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _system_pid_file() -> tuple[bool, float | None, str | None]:
    """The machine-wide pid file a user's `torchserve --start` would use."""
    p = Path(tempfile.gettempdir()) / T.PID_FILE
    return (True, p.stat().st_mtime, p.read_text()) if p.exists() else (False, None, None)


# -- without a server ---------------------------------------------------------------
def test_build_mar_packs_handler_weights_and_extra_files(tiny):
    with zipfile.ZipFile(tiny.store / "tiny.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"tiny.pt", "tiny_handler.py", "labels.json"} <= names
    assert manifest["model"]["modelName"] == "tiny"
    assert manifest["model"]["modelVersion"] == "1.0"
    assert manifest["model"]["serializedFile"] == "tiny.pt"
    assert manifest["model"]["handler"] == "tiny_handler.py"
    with pytest.raises(ValueError):
        T.build_mar("bad name", "1", None, "x.py", (), tiny.store)


def test_config_is_loopback_token_auth_and_store_only(tmp_path):
    store = tmp_path / "my store.v1"
    store.mkdir()
    ports = T.Ports(18080, 18081, 18082, 17070, 17071)
    ts = T.TorchServe(tmp_path / "w", store, {"tiny": "tiny.mar"}, ports=ports)
    text = ts.write_config().read_text(encoding="latin-1")
    props = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"] == "http://127.0.0.1:18081"
    assert props["metrics_address"] == "http://127.0.0.1:18082"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("17070", "17071")
    assert props["metrics_mode"] == "prometheus"
    assert props["disable_token_authorization"] == "false"
    assert props["default_workers_per_model"] == "1"
    assert props["load_models"] == "tiny=tiny.mar"
    assert props["enable_model_api"] == "false"
    # java.util.Properties turns "\\Q" into "\Q": a quoted regex of the store path only
    assert props["allowed_urls"] == f"file://\\\\Q{store.resolve()}\\\\E/.*"
    import re

    java_regex = props["allowed_urls"].replace("\\\\", "\\")
    py_regex = re.sub(r"\\Q(.*?)\\E", lambda m: re.escape(m.group(1)), java_regex)
    assert re.fullmatch(py_regex, f"file://{store.resolve()}/tiny.mar")
    assert not re.fullmatch(py_regex, "file:///etc/passwd")
    assert not re.fullmatch(py_regex, "https://example.org/x.mar")
    off = T.TorchServe(tmp_path / "w2", store, ["tiny=tiny.mar"], token_auth=False)
    assert "disable_token_authorization=true" in off.write_config().read_text()
    assert off.models == ["tiny"]


# -- a real server ----------------------------------------------------------------
def test_start_predict_auth_metrics_stop(tiny, torchserve_factory, capsys):
    before = _system_pid_file()
    t0 = time.monotonic()
    ts = torchserve_factory(tiny.store, {"tiny": "tiny.mar"})
    t_ready = time.monotonic() - t0
    # readiness means a READY worker: a prediction right away works
    out = ts.predict("tiny", _x([1.0, 2.0, 3.0]), timeout=30)
    t_first = time.monotonic() - t0
    assert json.loads(out)["y"] == pytest.approx(tiny.expected([1.0, 2.0, 3.0]), abs=1e-5)
    with capsys.disabled():
        print(f"\n[torchserve] start->ready {t_ready:.2f} s, start->first prediction {t_first:.2f} s")
    assert t_first < 90

    keys = ts.keys()
    assert keys.inference and keys.management and keys.inference != keys.management
    assert (ts.workdir / "key_file.json").stat().st_mode & 0o077 == 0  # owner-only
    assert ts.ready_workers("tiny") == 1
    assert ts.model_status("tiny")[0]["workers"][0]["status"] == "READY"
    assert json.loads(ts.ping())["status"] == "Healthy"

    # gRPC: the key goes in the metadata as "authorization: Bearer <key>"
    addr = ts.grpc_inference_addr
    assert T.predict(addr, keys.inference, "tiny", _x([0, 0, 1])) == ts.predict("tiny", _x([0, 0, 1]))
    for key in (None, "not-the-key", keys.management):
        with pytest.raises(grpc.RpcError) as e:
            T.predict(addr, key, "tiny", _x([1, 2, 3]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, key
    with pytest.raises(grpc.RpcError) as e:
        T.ping(addr, None)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:  # unknown model: 0.12.0 says INTERNAL
        ts.predict("nope", _x([1, 2, 3]))
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "Model not found: nope" in e.value.details()
    with ts.client() as c:  # one channel, many calls
        ys = [json.loads(c.predict("tiny", _x([i, i, i])))["y"] for i in range(5)]
    assert ys[3] == pytest.approx(tiny.expected([3.0, 3.0, 3.0]), abs=1e-5)

    # REST: the same tokens; the management API wants the management key
    assert _http_status(f"{ts.management_url}/models/tiny") == 400
    assert _http_status(f"{ts.management_url}/models/tiny", keys.inference) == 400
    assert _http_status(f"{ts.management_url}/models/tiny", keys.management) == 200
    assert _http_status(f"{ts.inference_url}/ping") == 400
    assert _http_status(f"{ts.inference_url}/ping", keys.inference) == 200

    # metrics: Prometheus text that counts this model's requests
    metrics = ts.metrics()
    lines = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("ts_inference_requests_total{") and 'model_name="tiny"' in ln
    ]
    assert lines, metrics[:2000]
    assert float(lines[0].rsplit(" ", 1)[1]) >= 8  # 3 + 5 successful predictions
    assert "# TYPE ts_inference_requests_total counter" in metrics

    # the server's own files are in its working dir, not in the caller's cwd or /tmp
    assert (ts.workdir / "logs" / "ts_log.log").exists()
    assert (ts.tmp_dir / T.PID_FILE).read_text().strip() == str(ts.pid)

    procs = ts.processes()
    assert [p.name() for p in procs][0] == "java" and len(procs) >= 2  # java + a worker
    ts.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert not ts.running() and ts.processes() == []
    assert all(T.port_free(p) for p in dataclasses.astuple(ts.ports))
    assert not ts.key_file.exists()
    assert _system_pid_file() == before  # the machine-wide pid file untouched
    with pytest.raises(grpc.RpcError) as e:
        T.predict(addr, keys.inference, "tiny", _x([1, 2, 3]), timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_two_servers_side_by_side_stop_one(tiny, torchserve_factory):
    """What a user's TorchServe next to the tests needs: separate pid files, sockets, ports."""
    a = torchserve_factory(tiny.store, {"tiny": "tiny.mar"})
    b = torchserve_factory(tiny.store, {"tiny": "tiny.mar"})
    assert a.pid != b.pid and a.tmp_dir != b.tmp_dir
    assert a.keys().inference != b.keys().inference
    for ts in (a, b):
        assert json.loads(ts.predict("tiny", _x([1, 1, 1])))["y"] == pytest.approx(
            tiny.expected([1.0, 1.0, 1.0]), abs=1e-5
        )
    # a's key does not open b
    with pytest.raises(grpc.RpcError) as e:
        T.predict(b.grpc_inference_addr, a.keys().inference, "tiny", _x([1, 1, 1]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    a_procs = a.processes()
    a.stop()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in a_procs)
    assert b.running()
    assert json.loads(b.predict("tiny", _x([2, 2, 2])))["y"] == pytest.approx(
        tiny.expected([2.0, 2.0, 2.0]), abs=1e-5
    )
    # another process can attach to b by its working dir and stop it
    b2 = T.TorchServe.attach(b.workdir)
    assert b2.pid == b.pid and b2.grpc_inference_addr == b.grpc_inference_addr
    b_procs = b.processes()
    b2.stop()
    assert not b.running()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in b_procs)


def test_not_ready_while_no_worker_loads(tiny, torchserve_factory):
    """The JVM runs and answers, but the model's worker dies at load: start() must
    not report ready; it fails with the worker's error and leaves nothing behind."""
    ts = torchserve_factory(tiny.store, {"broken": "broken.mar"}, start=False)
    with pytest.raises(T.TorchServeError) as e:
        ts.start(timeout=12)
    assert "not ready" in str(e.value) and "broken" in str(e.value)
    assert "this worker never loads" in str(e.value)  # from logs/model_log.log
    assert not ts.running()
    assert all(T.port_free(p) for p in dataclasses.astuple(ts.ports))
