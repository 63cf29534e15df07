"""The synth service: avLandmarkGAN served from TorchServe.

    Transform  a face photo + target VA -> the aligned face moved to that VA (PNG) + landmarks
    Matrix     a face photo + valence/arousal grids -> an avImage matrix (PNG)
    Transfer   a real dyad video + a novel parent face + a novel infant face -> an MP4 in
               which the novel faces follow the real partners' per-frame VA

This process does no deep learning itself: faces are found with the shared
still-image detector (`dyadlab.face.still`) and aligned with
`landmarks.align_face`; generation and the VA judge are TorchServe
predictions (model "synth", handler contract in ``handler.py``: mode
"transform" / "judge"). The real dyad's landmarks come from the extractor
service over gRPC. Pure post-processing and the video writer are in
``transfer.py``, the matrix figure in ``matrix.py``.

Health. SERVING only while TorchServe answers a real prediction: `start`
makes one (a judge prediction on a grey crop), and a monitor repeats it every
DYADLAB_SYNTH_PROBE_S seconds (default 5) and flips the health status both
ways; a failed prediction during a call flips it to NOT_SERVING at once.
(`bind_health` receives the setter from `dyadlab.rpc.serve`, which then
leaves the status to this service.)

Settings: DYADLAB_SYNTH_ADDR, DYADLAB_TORCHSERVE_GRPC (alias
DYADLAB_TORCHSERVE_ADDR), DYADLAB_TORCHSERVE_KEY_FILE (TorchServe's
key_file.json, re-read after PERMISSION_DENIED: a restarted TorchServe has new
keys) and DYADLAB_TORCHSERVE=off (no TorchServe in this stack: NOT_SERVING,
calls FAILED_PRECONDITION) come from `dyadlab.config`; `dyadlab up` sets
DYADLAB_SYNTH_TS_MODEL, the TorchServe model name (default "synth"). This
service's own knobs, from the environment:

| variable                        | default | meaning |
|---------------------------------|---------|---------|
| DYADLAB_SYNTH_PREDICT_TIMEOUT_S | 30      | deadline of one prediction |
| DYADLAB_SYNTH_PROBE_S           | 5       | health probe interval (seconds) |
| DYADLAB_SYNTH_CONCURRENCY       | 4       | predictions in flight per call (TorchServe batches them) |

Statuses: see proto/dyadlab/v1/synth.proto. An image without a face is
INVALID_ARGUMENT (the request can never succeed as sent; the message names
the input), not FAILED_PRECONDITION (which here means the system's state: no
model loaded, no face tracked in the video).

Store keys are content addresses, written once complete (the store publishes
atomically): synth/faces/<sha256>.png, synth/matrices/<sha256>.png,
synth/transfers/<sha256>.csv, then synth/transfers/<sha256>.mp4 last.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import prometheus_client as prom

from dyadlab import client, rpc, storage, video
from dyadlab import frames as ft
from dyadlab.config import ConfigError, Settings
from dyadlab.messages import ROLE_NAME, object_ref
from dyadlab.torchserve import InferenceClient
from dyadlab.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc, synth_pb2, synth_pb2_grpc
from services.synth import landmarks as L
from services.synth import matrix as MX
from services.synth import transfer as TR

log = logging.getLogger("dyadlab.synth")

PREDICTIONS = prom.Counter("dyadlab_synth_predictions_total", "TorchServe predictions",
                           ["mode", "outcome"])
TRANSFER_FRAMES = prom.Counter("dyadlab_synth_transfer_frames_total", "Frames written by Transfer")

DEFAULT_MODEL = os.environ.get("DYADLAB_SYNTH_TS_MODEL", "").strip() or "synth"
DEFAULT_SIZE = 64                 # the model's crop side until a probe says otherwise
MAX_INLINE_BYTES = 2 << 20
MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000
MAX_OUTPUT_SIZE = 1024
DEFAULT_CELL = 128
DEFAULT_MIN_CONFIDENCE = 0.5
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_SIZE_IN_MESSAGE = re.compile(r"must be (\d+)x(\d+)")
ROLES = {"parent": "adult", "infant": "infant"}


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}={raw!r} must be > 0")
    return v


def _bad(msg: str) -> rpc.UserError:
    return rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, msg)


# -- TorchServe ----------------------------------------------------------------------------
class Model:
    """The synth handler in TorchServe, over its gRPC inference API.

    Every call has a deadline; failures become rpc.UserError with the status a
    caller should see (UNAVAILABLE: TorchServe not answering; FAILED_PRECONDITION:
    the model is not loaded or the key is refused)."""

    def __init__(self, addr: str, key_file: str, timeout_s: float, on_down=None, off: bool = False):
        self.addr, self.key_file, self.timeout_s, self.off = addr, key_file, timeout_s, off
        self.on_down = on_down or (lambda: None)
        self._lock = threading.Lock()
        self._client: InferenceClient | None = None
        self._sizes: dict[str, int] = {}

    def _key(self) -> str | None:
        if not self.key_file:
            return None
        try:
            return json.loads(Path(self.key_file).read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None        # no key yet (TorchServe starting): the call says PERMISSION_DENIED

    def _get_client(self, fresh: bool = False) -> InferenceClient:
        with self._lock:
            if fresh and self._client is not None:
                self._client.close()
                self._client = None
            if self._client is None:
                self._client = InferenceClient(self.addr, self._key())
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _error(self, e: grpc.RpcError, model: str) -> rpc.UserError:
        code, details = e.code(), (e.details() or "").strip()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.on_down()
            what = ("did not answer within the deadline" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                    else "is not answering")
            return rpc.UserError(grpc.StatusCode.UNAVAILABLE,
                                 f"TorchServe at {self.addr} {what} ({details[:200] or code.name}); "
                                 "is it running (`dyadlab up`)?")
        if "not found" in details.lower() or code == grpc.StatusCode.NOT_FOUND:
            self.on_down()
            return rpc.UserError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"model {model!r} is not loaded in TorchServe at {self.addr}: "
                                 "train one (`dyadlab synth train`) and publish its archive")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            self.on_down()
            return rpc.UserError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"TorchServe at {self.addr} refused the inference key "
                                 f"(key file: {self.key_file or 'none configured'})")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if _SIZE_IN_MESSAGE.search(details):
                self._sizes.pop(model, None)     # the model was replaced: learn its size again
            return rpc.UserError(grpc.StatusCode.INTERNAL,
                                 f"model {model!r} rejected the service's request: {details[:300]}")
        if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            # e.g. "Worker died." or a full queue: TorchServe restarts workers,
            # so the same request can succeed when retried
            return rpc.UserError(grpc.StatusCode.UNAVAILABLE,
                                 f"TorchServe is temporarily unable to predict ({code.name}: "
                                 f"{details[:200]}); retry")
        return rpc.UserError(grpc.StatusCode.INTERNAL,
                             f"TorchServe error {code.name}: {details[:300]}")

    def predict(self, model: str, fields: dict[str, bytes], mode: str) -> dict:
        """One prediction -> the handler's JSON reply."""
        if self.off:
            raise rpc.UserError(grpc.StatusCode.FAILED_PRECONDITION,
                                "TorchServe is not running in this stack (DYADLAB_TORCHSERVE=off, or "
                                "`dyadlab up` found no java, torchserve or synth model: see its notes "
                                "and DYADLAB_SYNTH_MODEL)")
        for attempt in (0, 1):
            try:
                raw = self._get_client(fresh=attempt > 0).predict(model, fields, timeout=self.timeout_s)
                break
            except grpc.RpcError as e:
                if attempt == 0 and e.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                                 grpc.StatusCode.UNAUTHENTICATED):
                    continue       # TorchServe restarted with new keys: re-read the key file once
                PREDICTIONS.labels(mode, e.code().name).inc()
                raise self._error(e, model) from None
        PREDICTIONS.labels(mode, "OK").inc()
        try:
            out = json.loads(raw)
        except ValueError:
            raise rpc.UserError(grpc.StatusCode.INTERNAL,
                                f"model {model!r} answered something that is not JSON") from None
        if not isinstance(out, dict):
            raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: unexpected reply")
        return out

    # the handler's two modes
    def judge(self, model: str, crop: np.ndarray) -> tuple[float, float]:
        out = self.predict(model, {"mode": b"judge", "crop": png(crop)}, "judge")
        return _va_pair(out.get("va"), model)

    def transform(self, model: str, crop: np.ndarray, lm: np.ndarray, va: tuple[float, float],
                  judge: bool = True) -> dict:
        """-> {"image": (S, S, 3) uint8, "landmarks": (68, 2) crop px, "judged_input", "judged_output"}."""
        fields = {"mode": b"transform", "crop": png(crop),
                  "landmarks": json.dumps([round(float(x), 4) for x in L.to_vector(lm)]).encode(),
                  "valence": repr(float(va[0])).encode(), "arousal": repr(float(va[1])).encode()}
        if judge:
            fields["judge"] = b"1"
        out = self.predict(model, fields, "transform")
        try:
            img = decode_png_rgb(base64.b64decode(out["image_png_b64"], validate=True))
            lm_out = L.to_points(np.asarray(out["landmarks"], np.float32))
        except (KeyError, ValueError, TypeError):
            raise rpc.UserError(grpc.StatusCode.INTERNAL,
                                f"model {model!r}: transform reply lacks a valid image or landmarks") from None
        res = {"image": img, "landmarks": lm_out}
        if judge:
            res["judged_input"] = _va_pair(out.get("judged_input"), model)
            res["judged_output"] = _va_pair(out.get("judged_output"), model)
        return res

    def size(self, model: str) -> int:
        """The model's crop side, learnt with one judge prediction (cached):
        the handler says "crop must be NxN" when a crop has the wrong size."""
        if model in self._sizes:
            return self._sizes[model]
        s = DEFAULT_SIZE
        for _ in range(2):
            try:
                self.judge(model, np.full((s, s, 3), 128, np.uint8))
                self._sizes[model] = s
                return s
            except rpc.UserError as e:
                m = _SIZE_IN_MESSAGE.search(str(e))
                if e.code != grpc.StatusCode.INTERNAL or not m or int(m[1]) == s:
                    raise
                s = int(m[1])
        raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: cannot learn its crop size")

    def probe(self, model: str) -> str | None:
        """None when a real prediction succeeds, else why not."""
        try:
            known = model in self._sizes
            s = self.size(model)           # a judge prediction when the size is not known yet
            if known:
                self.judge(model, np.full((s, s, 3), 128, np.uint8))
            return None
        except rpc.UserError as e:
            return str(e)


def _va_pair(v, model: str) -> tuple[float, float]:
    try:
        a, b = float(v[0]), float(v[1])
        if math.isfinite(a) and math.isfinite(b) and len(v) == 2:
            return a, b
    except (TypeError, ValueError, IndexError):
        pass
    raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: reply lacks a valid VA pair")


# -- images ----------------------------------------------------------------------------------
def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png_rgb(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError("not a PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Any still image Pillow reads -> uint8 RGB (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not data:
        raise _bad(f"{what} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise _bad(f"{what} is {im.width}x{im.height} pixels; at most "
                           f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, np.float64)
                a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
                im = Image.fromarray(a)
            return np.asarray(im.convert("RGB"), np.uint8).copy()
    except UnidentifiedImageError:
        raise _bad(f"{what} could not be read as an image (PNG, JPEG, WebP, ... expected)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(f"{what} could not be read as an image ({type(e).__name__})") from None


def find_and_align(rgb: np.ndarray, size: int, what: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(aligned crop (S, S, 3), landmarks (68, 2) crop px, detector stage)."""
    from dyadlab.face.still import find_face
    face = find_face(rgb, cnn_fallback=True)
    if face is None:
        raise _bad(f"no face found in {what} ({rgb.shape[1]}x{rgb.shape[0]} pixels); "
                   "give a photograph with one clearly visible, roughly frontal face")
    try:
        crop, lm = L.align_face(rgb, face.landmarks, size)
    except ValueError:
        raise _bad(f"the face in {what} could not be aligned (degenerate landmarks)") from None
    return crop, lm, face.stage


def check_va(va: synth_pb2.VA, what: str) -> tuple[float, float]:
    v, a = float(va.valence), float(va.arousal)
    for name, x in (("valence", v), ("arousal", a)):
        if not math.isfinite(x) or not -1.0 <= x <= 1.0:
            raise _bad(f"{what}.{name} = {x} is outside [-1, 1]")
    return v, a


def check_model(name: str) -> str:
    if not name:
        return DEFAULT_MODEL
    if not _MODEL_NAME.match(name):
        raise _bad(f"model name {name!r} is not valid (letters, digits, '_', '.', '-'; at most 64)")
    return name


# -- the service -------------------------------------------------------------------------------
class SynthService:
    name = "dyadlab.v1.Synth"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = storage.open_store(settings)
        self.ts_addr = settings.torchserve_grpc
        self.ts_key_file = str(settings.torchserve_key_path)
        self.probe_s = _env_number("DYADLAB_SYNTH_PROBE_S", 5.0)
        self.concurrency = max(1, int(_env_number("DYADLAB_SYNTH_CONCURRENCY", 4)))
        self.model = Model(self.ts_addr, self.ts_key_file,
                           _env_number("DYADLAB_SYNTH_PREDICT_TIMEOUT_S", 30.0),
                           on_down=self._mark_down, off=settings.torchserve == "off")
        self.pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="predict")
        self.channel: grpc.aio.Channel | None = None
        self._health = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task | None = None
        self._serving: bool | None = None
        self._wake = asyncio.Event()

    def register(self, server: grpc.aio.Server) -> None:
        synth_pb2_grpc.add_SynthServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.channel = client.aio_channel(self.settings.extractor_addr, self.settings)
        why = await asyncio.to_thread(self.model.probe, DEFAULT_MODEL)
        self._monitor = asyncio.create_task(self._watch(first=why))

    def bind_health(self, set_serving) -> None:
        """rpc.serve's hook: synth sets its own health from TorchServe probes."""
        self._health = set_serving

    async def _set(self, why: str | None) -> None:
        """SERVING when `why` is None (a prediction succeeded), else NOT_SERVING."""
        ok = why is None
        await self._health(ok)
        if ok != self._serving:
            log.info("torchserve " + ("answers: SERVING" if ok else "not usable: NOT_SERVING"),
                     extra={"addr": self.ts_addr, **({} if ok else {"reason": why[:300]})})
        self._serving = ok

    async def _watch(self, first: str | None) -> None:
        why = first
        while True:
            await self._set(why)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.probe_s)
            why = await asyncio.to_thread(self.model.probe, DEFAULT_MODEL)

    def _mark_down(self) -> None:
        """Called from worker threads when TorchServe fails: re-probe now."""
        if self._loop is not None and self._monitor is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.channel is not None:
            await self.channel.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()

    # -- inputs --------------------------------------------------------------------------------
    def read_image(self, img: synth_pb2.FaceImage, what: str) -> bytes:
        which = img.WhichOneof("source")
        if which == "data":
            if len(img.data) > MAX_INLINE_BYTES:
                raise _bad(f"{what}: inline images are limited to {MAX_INLINE_BYTES >> 20} MiB; "
                           "put larger ones in the store and send a reference")
            return bytes(img.data)
        if which != "ref" or not img.ref.key:
            raise _bad(f"{what} is missing (give a store reference or the image bytes)")
        self.check_bucket(img.ref, what)
        storage.validate_key(img.ref.key)
        size = self.store.size(img.ref.key)
        if size is None:
            raise rpc.UserError(grpc.StatusCode.NOT_FOUND, f"no {what} at key {img.ref.key!r}")
        if size > MAX_IMAGE_BYTES:
            raise _bad(f"{what} is {size >> 20} MiB; at most {MAX_IMAGE_BYTES >> 20} MiB")
        return self.store.get_bytes(img.ref.key)

    def check_bucket(self, ref: common_pb2.ObjectRef, what: str) -> None:
        if ref.bucket and ref.bucket != self.store.bucket:
            raise _bad(f"{what}: bucket {ref.bucket!r} is not this service's bucket "
                       f"{self.store.bucket!r}")

    def face(self, img: synth_pb2.FaceImage, what: str, size: int):
        rgb = decode_image(self.read_image(img, what), what)
        return find_and_align(rgb, size, what)

    def put_png(self, prefix: str, data: bytes) -> common_pb2.ObjectRef:
        key = f"{prefix}/{hashlib.sha256(data).hexdigest()}.png"
        if self.store.size(key) != len(data):
            return object_ref(self.store.put_bytes(key, data, content_type="image/png"))
        return object_ref(self.store.ref(key, hashlib.sha256(data).hexdigest()))

    def map_pool(self, fn, items: list, report=None) -> list:
        """fn over items on the prediction pool (results in order)."""
        futs = [self.pool.submit(fn, it) for it in items]
        out = []
        try:
            for i, f in enumerate(futs):
                out.append(f.result())
                if report is not None:
                    report(i + 1, len(futs))
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        return out

    # -- Transform / Matrix --------------------------------------------------------------------
    def transform(self, req: synth_pb2.TransformRequest) -> synth_pb2.TransformResponse:
        model = check_model(req.model)
        va = check_va(req.target, "target")
        if not 0 <= req.output_size <= MAX_OUTPUT_SIZE:
            raise _bad(f"output_size must be 0..{MAX_OUTPUT_SIZE}")
        raw = self.read_image(req.image, "image")
        rgb = decode_image(raw, "image")
        size = self.model.size(model)
        crop, lm, stage = find_and_align(rgb, size, "image")
        out = self.model.transform(model, crop, lm, va, judge=True)
        img, pts = out["image"], out["landmarks"].astype(np.float64)
        px = req.output_size or size
        if px != size:
            f = px / size
            img = TR.upscale(img, px)
            pts = (pts + 0.5) * f - 0.5
        res = synth_pb2.TransformResponse(
            image=self.put_png("synth/faces", png(img)),
            landmarks=[float(v) for v in L.to_vector(pts)],
            judged_input=synth_pb2.VA(valence=out["judged_input"][0], arousal=out["judged_input"][1]),
            judged_output=synth_pb2.VA(valence=out["judged_output"][0], arousal=out["judged_output"][1]),
            model_size=size)
        if stage != "as_is":
            res.notes.append(f"face found at detector stage {stage!r}")
        return res

    def matrix(self, req: synth_pb2.MatrixRequest) -> synth_pb2.MatrixResponse:
        model = check_model(req.model)
        vals = list(req.valences) or list(MX.DEFAULT_VALENCES)
        aros = list(req.arousals) or list(MX.DEFAULT_AROUSALS)
        for name, xs in (("valences", vals), ("arousals", aros)):
            bad = [x for x in xs if not (math.isfinite(x) and -1.0 <= x <= 1.0)]
            if bad:
                raise _bad(f"{name} must each be in [-1, 1]; got {bad[0]}")
        vals, aros = MX.grid_order(vals, aros)
        for name, xs in (("valences", vals), ("arousals", aros)):
            if len(xs) > MX.MAX_STEPS:
                raise _bad(f"at most {MX.MAX_STEPS} distinct {name}, got {len(xs)}")
        cell = req.cell_size or DEFAULT_CELL
        if not 16 <= cell <= 512:
            raise _bad("cell_size must be 16..512 (0 = 128)")
        rgb = decode_image(self.read_image(req.image, "image"), "image")
        size = self.model.size(model)
        crop, lm, stage = find_and_align(rgb, size, "image")
        grid = [(a, v) for a in aros for v in vals]
        outs = self.map_pool(lambda av: self.model.transform(model, crop, lm, (av[1], av[0]), True), grid)
        cells = np.stack([TR.upscale(o["image"], cell) for o in outs]).reshape(
            len(aros), len(vals), cell, cell, 3)
        judged = np.array([o["judged_output"] for o in outs]).reshape(len(aros), len(vals), 2)
        data = MX.render(cells, vals, aros, source=TR.upscale(crop, cell), judged=judged,
                         title=f"avImage ({model}, {size} px)")
        res = synth_pb2.MatrixResponse(image=self.put_png("synth/matrices", data), model_size=size)
        for (a, v), o in zip(grid, outs):
            res.cells.append(synth_pb2.MatrixCell(
                target=synth_pb2.VA(valence=v, arousal=a),
                judged=synth_pb2.VA(valence=o["judged_output"][0], arousal=o["judged_output"][1])))
        if stage != "as_is":
            res.notes.append(f"face found at detector stage {stage!r}")
        return res

    # -- Transfer --------------------------------------------------------------------------
    def transfer_inputs(self, req: synth_pb2.TransferRequest) -> dict:
        """Everything checkable before the extraction: the faces, options, the video key."""
        model = check_model(req.model)
        face_px = req.face_size or TR.DEFAULT_FACE_PX
        if not 64 <= face_px <= 1024 or face_px % 2:
            raise _bad("face_size must be an even number of pixels in 64..1024 (0 = 256)")
        smooth = req.smooth_s if req.HasField("smooth_s") else TR.DEFAULT_SMOOTH_S
        if not (math.isfinite(smooth) and 0 <= smooth <= 10):
            raise _bad("smooth_s must be in [0, 10] seconds")
        min_conf = req.min_confidence or DEFAULT_MIN_CONFIDENCE
        if not 0 < min_conf <= 1:
            raise _bad("min_confidence must be in (0, 1] (0 = 0.5)")
        if not req.video.key:
            raise _bad("video.key is empty")
        self.check_bucket(req.video, "video")
        storage.validate_key(req.video.key)
        vsize = self.store.size(req.video.key)
        if vsize is None:
            raise rpc.UserError(grpc.StatusCode.NOT_FOUND, f"no video at key {req.video.key!r}")
        if vsize == 0:
            raise _bad("the video is empty (0 bytes)")
        size = self.model.size(model)
        faces = {}
        for role, img in (("parent", req.parent_face), ("infant", req.infant_face)):
            crop, lm, stage = self.face(img, f"{role}_face", size)
            faces[role] = (crop, lm, stage)
        return {"model": model, "size": size, "face_px": face_px, "smooth": smooth,
                "min_conf": min_conf, "faces": faces}

    @contextlib.contextmanager
    def local_copy(self, key: str):
        if isinstance(self.store, storage.LocalStore):
            yield self.store.local_path(key)
            return
        with tempfile.TemporaryDirectory(prefix="dyadlab-synth-") as d:
            yield self.store.get_file(key, Path(d) / "input")

    def real_landmarks(self, df, n: int, min_conf: float, notes: list[str]) -> dict:
        """role -> {frame index: (68, 2) landmarks} of confident, tracked frames."""
        out = {}
        for role, table_role in ROLES.items():
            frames: dict[int, np.ndarray] = {}
            if ft.ROLE_COL in df.columns and (df[ft.ROLE_COL] == table_role).any():
                sub = df[(df[ft.ROLE_COL] == table_role) & (df["success"] > 0)
                         & (df["confidence"] >= min_conf)]
                xy = sub[ft.LANDMARK_COLS].to_numpy(np.float64)
                for fr, row in zip(sub["frame"].to_numpy(), xy):
                    i = int(fr) - 1
                    if 0 <= i < n and np.isfinite(row).all():
                        frames[i] = L.to_points(row)
            else:
                notes.append(f"the extractor found no {table_role} face: the novel {role} "
                             "stays neutral")
            out[role] = frames
        return out

    def run_transfer(self, req: synth_pb2.TransferRequest, inp: dict,
                     extract: extractor_pb2.ExtractResult, notes: list[str],
                     report: rpc.Report) -> synth_pb2.TransferResult:
        t0 = time.perf_counter()
        model, size, face_px = inp["model"], inp["size"], inp["face_px"]
        report("judge", 0, 1, "reading the frame table")
        df, _ = ft.read_table(self.store.get_bytes(extract.frames.key))
        with self.local_copy(req.video.key) as path:
            try:
                idx = video.probe(path)
            except video.VideoError as e:
                raise _bad(f"video: {e}") from None
            n = idx.n_frames
            lms = self.real_landmarks(df, n, inp["min_conf"], notes)
            if not lms["parent"] and not lms["infant"]:
                raise rpc.UserError(grpc.StatusCode.FAILED_PRECONDITION,
                                    "no face was tracked (with enough confidence) in any frame of "
                                    "the video: there is no expression to transfer")
            # 1. The real partners' VA, frame by frame (judge mode), judged while
            #    decoding with a bounded number of predictions in flight.
            raw = {r: np.full((n, 2), np.nan) for r in ("parent", "infant")}
            wanted = set(lms["parent"]) | set(lms["infant"])
            pending: collections.deque = collections.deque()
            window = 4 * self.concurrency

            def collect(limit: int) -> None:
                while len(pending) > limit:
                    role, i, fut = pending.popleft()
                    raw[role][i] = fut.result()

            report("judge", 0, n, f"{len(wanted)} frames with a face")
            try:
                for i, gray in video.frames(path, idx, 0, n):
                    for role in ("parent", "infant"):
                        pts = lms[role].get(i) if i in wanted else None
                        if pts is None:
                            continue
                        try:
                            crop, _ = L.align_face(gray, pts, size)
                        except ValueError:
                            continue
                        pending.append((role, i, self.pool.submit(self.model.judge, model, crop)))
                        collect(window)
                    if (i + 1) % 10 == 0 or i + 1 == n:
                        report("judge", i + 1, n, "")
                collect(0)
            finally:
                for _, _, fut in pending:
                    fut.cancel()
        total = int(sum(np.isfinite(raw[r]).all(axis=1).sum() for r in raw))
        times = idx.timestamps
        drive = {r: np.clip(TR.smooth_va(TR.hold_va(raw[r]), times, inp["smooth"]), -1, 1)
                 for r in raw}
        # 2. The novel faces at each needed VA (re-used across frames with the same VA).
        keys = {r: [TR.quantise_va(v) for v in drive[r]] for r in drive}
        jobs = sorted({(r, k) for r in keys for k in keys[r]})
        report("generate", 0, len(jobs), "")
        faces = inp["faces"]
        outs = self.map_pool(
            lambda job: self.model.transform(model, faces[job[0]][0], faces[job[0]][1], job[1], True),
            jobs, report=lambda d, t: report("generate", d, t, ""))
        made = {job: o for job, o in zip(jobs, outs)}
        # 3. Post-processing and the video.
        motions = {r: (TR.Motion.none(n) if req.no_motion
                       else TR.motion(times, seed=int(req.seed) * 2 + k))
                   for k, r in enumerate(("parent", "infant"))}
        with tempfile.TemporaryDirectory(prefix="dyadlab-synth-") as d:
            mp4 = Path(d) / "transfer.mp4"
            TR.compose(mp4, idx.pts, idx.time_base, idx.avg_fps,
                       lambda role, k: made[(role, keys[role][k])]["image"], motions, face_px,
                       report=lambda done, tot: report("encode", done, tot, ""))
            check = video.probe(mp4)
            if check.n_frames != n:
                raise rpc.UserError(grpc.StatusCode.INTERNAL,
                                    f"the encoded video has {check.n_frames} frames, not {n}")
            cols = {}
            for r in ("parent", "infant"):
                seen = np.isfinite(raw[r]).all(axis=1)
                cols[f"{r}_seen"] = seen.astype(np.int64)
                cols[f"{r}_valence_judged"] = raw[r][:, 0]
                cols[f"{r}_arousal_judged"] = raw[r][:, 1]
                cols[f"{r}_valence_target"] = np.array([k[0] for k in keys[r]])
                cols[f"{r}_arousal_target"] = np.array([k[1] for k in keys[r]])
                out_va = np.array([made[(r, k)]["judged_output"] for k in keys[r]])
                cols[f"{r}_valence_output"] = out_va[:, 0]
                cols[f"{r}_arousal_output"] = out_va[:, 1]
                cols[f"{r}_rotation_deg"] = motions[r].theta
                cols[f"{r}_scale"] = motions[r].scale
            report("write", 0, 2, "")
            csv = TR.va_table_csv(times, cols)
            csv_ref = self.store.put_bytes(f"synth/transfers/{hashlib.sha256(csv).hexdigest()}.csv",
                                           csv, content_type="text/csv")
            sha = storage.sha256_file(mp4)
            video_ref = self.store.put_file(f"synth/transfers/{sha}.mp4", mp4,
                                            content_type="video/mp4", sha256=sha)
            report("write", 2, 2, "")
        seen = {r: int(np.isfinite(raw[r]).all(axis=1).sum()) for r in raw}
        for r in raw:
            if 0 < seen[r] < n:
                notes.append(f"the real {r}'s VA was judged in {seen[r]} of {n} frames; the other "
                             "frames hold the last VA (neutral before the first)")
        notes.append("the output has no audio track (voices identify people)")
        TRANSFER_FRAMES.inc(n)
        secs = time.perf_counter() - t0
        log.info("transfer done", extra={"frames": n, "seconds": round(secs, 2),
                                         "fps": round(n / max(secs, 1e-9), 1),
                                         "faces_generated": len(jobs), "crops_judged": total})
        return synth_pb2.TransferResult(
            video=object_ref(video_ref), va_table=object_ref(csv_ref), frames=n,
            fps=idx.avg_fps, parent_frames_seen=seen["parent"], infant_frames_seen=seen["infant"],
            seconds=secs, notes=notes)


class _Cancelled(Exception):
    """The Transfer's caller went away: stop the work (nothing is published)."""


def _progress(stage: str, done: int, total: int, message: str) -> common_pb2.Progress:
    return common_pb2.Progress(stage=stage, done=done, total=total, message=message)


class _Servicer(synth_pb2_grpc.SynthServicer):
    def __init__(self, svc: SynthService):
        self.svc = svc

    @rpc.status_errors
    async def Transform(self, request, context):
        return await asyncio.to_thread(self.svc.transform, request)

    @rpc.status_errors
    async def Matrix(self, request, context):
        return await asyncio.to_thread(self.svc.matrix, request)

    @rpc.status_errors
    async def Transfer(self, request, context):
        svc = self.svc
        t0 = time.perf_counter()
        yield synth_pb2.TransferEvent(progress=_progress("faces", 0, 2, "finding the novel faces"))
        inp = await asyncio.to_thread(svc.transfer_inputs, request)
        yield synth_pb2.TransferEvent(progress=_progress("faces", 2, 2, ""))
        opts = extractor_pb2.ExtractOptions()
        opts.CopyFrom(request.extract)
        opts.skip_speech = True              # only the faces are needed
        stub = extractor_pb2_grpc.ExtractorStub(svc.channel)
        call = stub.Extract(extractor_pb2.ExtractRequest(video=request.video, options=opts),
                            timeout=rpc.downstream_timeout(context, svc.settings.rpc_timeout_s))
        extract = None
        try:
            async for ev in call:
                if ev.HasField("progress"):
                    p = ev.progress
                    yield synth_pb2.TransferEvent(progress=_progress(
                        f"extract/{p.stage}", p.done, p.total, p.message))
                else:
                    extract = ev.result
        except grpc.aio.AioRpcError as e:
            raise rpc.UserError(e.code(), f"extractor: {e.details()}") from None
        if extract is None:
            raise rpc.UserError(grpc.StatusCode.UNAVAILABLE, "extractor ended without a result")
        notes = [f"real face {f.face_id} ({ROLE_NAME.get(f.role, 'role unknown')}): tracked in "
                 f"{f.frames_tracked} of {extract.video.frames} frames" for f in extract.faces]
        cancelled = threading.Event()

        def report_or_stop(report):
            def r(stage, done, total, message=""):
                if cancelled.is_set():
                    raise _Cancelled()
                report(stage, done, total, message)
            return r

        try:
            async for kind, value in rpc.progress_stream(
                    lambda report: svc.run_transfer(request, inp, extract, notes,
                                                    report_or_stop(report))):
                if kind == "progress":
                    yield synth_pb2.TransferEvent(progress=_progress(*value))
                else:
                    value.seconds = time.perf_counter() - t0
                    yield synth_pb2.TransferEvent(result=value)
        finally:
            cancelled.set()      # the caller went away (or we are done): the worker stops at its next step


def main() -> None:
    rpc.run(SynthService, lambda s: s.synth_addr)


if __name__ == "__main__":
    main()
