"""The work of synth's three RPCs, blocking (the servicer in ``server.py``
runs it in threads):

    Transform  a face photo + target VA -> the photo with its face moved to that VA (PNG),
               the landmarks and the mask of what changed
    Matrix     a face photo + valence/arousal grids -> an avImage matrix (PNG)
    Transfer   a real dyad video (its landmarks from the extractor) + a novel parent face +
               a novel infant face -> an MP4 in which the novel faces follow the real
               partners' per-frame VA

Generation and the VA judge are TorchServe predictions (``backend.py``);
faces are found and aligned in ``images.py`` and the generated faces pasted
back into their photos by ``paste.py``. Pure post-processing and the
video writer are in ``transfer.py``, the matrix figure in ``matrix.py``.

This service's own knobs, from the environment:

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
atomically): synth/faces/<sha256>.png, synth/masks/<sha256>.png, synth/matrices/<sha256>.png,
synth/transfers/<sha256>.csv, then synth/transfers/<sha256>.mp4 last.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import logging
import math
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import prometheus_client as prom

from dyadlab import frames as ft
from dyadlab import rpc, storage, tables, video
from dyadlab.config import Settings
from dyadlab.messages import object_ref
from dyadlab.v1 import common_pb2, extractor_pb2, synth_pb2
from services.synth import landmarks as L
from services.synth import matrix as MX
from services.synth import paste as P
from services.synth import transfer as TR
from services.synth.backend import Model
from services.synth.checks import bad, check_model, check_va
from services.synth.images import decode_image, find_and_align, png

log = logging.getLogger("dyadlab.synth")

TRANSFER_FRAMES = prom.Counter("dyadlab_synth_transfer_frames_total", "Frames written by Transfer")

MAX_INLINE_BYTES = 2 << 20
MAX_IMAGE_BYTES = 32 << 20
MAX_OUTPUT_SIZE = 1024
DEFAULT_CELL = 128
DEFAULT_MIN_CONFIDENCE = 0.5
ROLES = {"parent": "adult", "infant": "infant"}


def role_faces(req: synth_pb2.TransferRequest) -> tuple[tuple[str, synth_pb2.FaceImage], ...]:
    """(role, novel face photo) of a Transfer request, parent first."""
    return (("parent", req.parent_face), ("infant", req.infant_face))


class Synth:
    """The store, the TorchServe model and the prediction pool, and what the
    RPCs do with them. `on_down` is called (from worker threads) when
    TorchServe fails a prediction."""

    def __init__(self, settings: Settings, on_down=None):
        self.settings = settings
        self.store = storage.open_store(settings)
        self.ts_addr = settings.torchserve_grpc
        self.ts_key_file = str(settings.torchserve_key_path)
        self.probe_s = settings.synth_probe_s
        self.concurrency = settings.synth_concurrency
        self.default_model = settings.synth_ts_model
        self.model = Model(
            self.ts_addr,
            self.ts_key_file,
            settings.synth_predict_timeout_s,
            on_down=on_down,
            off=settings.torchserve == "off",
        )
        self.pool = cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="predict")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()

    # -- inputs --------------------------------------------------------------------------------
    def read_image(self, img: synth_pb2.FaceImage, what: str) -> bytes:
        which = img.WhichOneof("source")
        if which == "data":
            if len(img.data) > MAX_INLINE_BYTES:
                raise bad(
                    f"{what}: inline images are limited to {MAX_INLINE_BYTES >> 20} MiB; "
                    "put larger ones in the store and send a reference"
                )
            return bytes(img.data)
        if which != "ref" or not img.ref.key:
            raise bad(f"{what} is missing (give a store reference or the image bytes)")
        size = rpc.object_size(self.store, img.ref, what)
        if size > MAX_IMAGE_BYTES:
            raise bad(f"{what} is {size >> 20} MiB; at most {MAX_IMAGE_BYTES >> 20} MiB")
        return self.store.get_bytes(img.ref.key)

    def face(self, img: synth_pb2.FaceImage, what: str, size: int):
        rgb = decode_image(self.read_image(img, what), what)
        return find_and_align(rgb, size, what)

    def put_png(self, prefix: str, data: bytes) -> common_pb2.ObjectRef:
        return object_ref(
            storage.put_content_bytes(self.store, data, "image.png", prefix, content_type="image/png")
        )

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
        model = check_model(req.model, self.default_model)
        va = check_va(req.target, "target")
        if not 0 <= req.output_size <= MAX_OUTPUT_SIZE:
            raise bad(f"output_size must be 0..{MAX_OUTPUT_SIZE}")
        if req.output_size and not req.face_only:
            raise bad("output_size is for face_only; the whole photo keeps its own size")
        raw = self.read_image(req.image, "image")
        rgb = decode_image(raw, "image")
        size = self.model.size(model)
        face = find_and_align(rgb, size, "image")
        out = self.model.transform(model, face.crop, face.landmarks, va, judge=True)
        if req.face_only:
            img, pts = out["image"], out["landmarks"].astype(np.float64)
            mask = np.clip(np.rint(out["mask"] * 255), 0, 255).astype(np.uint8)
            px = req.output_size or size
            if px != size:
                f = px / size
                img, mask = TR.upscale(img, px), TR.upscale(mask, px)
                pts = (pts + 0.5) * f - 0.5
        else:
            img, change = P.paste_generated(face.photo, face.M, out)
            mask = P.weight_image(face.M, change, img.shape)
            pts = P.image_points(out["landmarks"], face.M)
        res = synth_pb2.TransformResponse(
            image=self.put_png("synth/faces", png(img)),
            landmarks=[float(v) for v in L.to_vector(pts)],
            judged_input=synth_pb2.VA(valence=out["judged_input"][0], arousal=out["judged_input"][1]),
            judged_output=synth_pb2.VA(valence=out["judged_output"][0], arousal=out["judged_output"][1]),
            model_size=size,
            mask=self.put_png("synth/masks", png(mask)),
        )
        if face.stage != "as_is":
            res.notes.append(f"face found at detector stage {face.stage!r}")
        return res

    def matrix(self, req: synth_pb2.MatrixRequest) -> synth_pb2.MatrixResponse:
        model = check_model(req.model, self.default_model)
        vals = list(req.valences) or list(MX.DEFAULT_VALENCES)
        aros = list(req.arousals) or list(MX.DEFAULT_AROUSALS)
        for name, xs in (("valences", vals), ("arousals", aros)):
            outside = [x for x in xs if not (math.isfinite(x) and -1.0 <= x <= 1.0)]
            if outside:
                raise bad(f"{name} must each be in [-1, 1]; got {outside[0]}")
        vals, aros = MX.grid_order(vals, aros)
        for name, xs in (("valences", vals), ("arousals", aros)):
            if len(xs) > MX.MAX_STEPS:
                raise bad(f"at most {MX.MAX_STEPS} distinct {name}, got {len(xs)}")
        cell = req.cell_size or DEFAULT_CELL
        if not 16 <= cell <= 512:
            raise bad("cell_size must be 16..512 (0 = 128)")
        rgb = decode_image(self.read_image(req.image, "image"), "image")
        size = self.model.size(model)
        face = find_and_align(rgb, size, "image")
        grid = [(a, v) for a in aros for v in vals]
        outs = self.map_pool(
            lambda av: self.model.transform(model, face.crop, face.landmarks, (av[1], av[0]), True), grid
        )
        # each cell: the face of the pasted-back photo, aligned at the cell's
        # size from the photo's own resolution (colour and detail kept)
        pts = P.image_points(face.landmarks, face.M)
        cells = np.stack(
            [L.align_face(P.paste_generated(face.photo, face.M, o)[0], pts, cell)[0] for o in outs]
        ).reshape(len(aros), len(vals), cell, cell, 3)
        judged = np.array([o["judged_output"] for o in outs]).reshape(len(aros), len(vals), 2)
        data = MX.render(
            cells,
            vals,
            aros,
            source=L.align_face(face.photo, pts, cell)[0],
            judged=judged,
            title=f"avImage ({model}, {size} px)",
        )
        res = synth_pb2.MatrixResponse(image=self.put_png("synth/matrices", data), model_size=size)
        for (a, v), o in zip(grid, outs):
            res.cells.append(
                synth_pb2.MatrixCell(
                    target=synth_pb2.VA(valence=v, arousal=a),
                    judged=synth_pb2.VA(valence=o["judged_output"][0], arousal=o["judged_output"][1]),
                )
            )
        if face.stage != "as_is":
            res.notes.append(f"face found at detector stage {face.stage!r}")
        return res

    # -- Transfer --------------------------------------------------------------------------
    def transfer_inputs(self, req: synth_pb2.TransferRequest) -> dict:
        """Everything checkable before the extraction: the faces, options, the video key."""
        model = check_model(req.model, self.default_model)
        height = req.panel_height
        if height and (not 64 <= height <= 2160 or height % 2):
            raise bad("panel_height must be an even number of pixels in 64..2160 (0 = the photos' own)")
        smooth = req.smooth_s if req.HasField("smooth_s") else TR.DEFAULT_SMOOTH_S
        if not (math.isfinite(smooth) and 0 <= smooth <= 10):
            raise bad("smooth_s must be in [0, 10] seconds")
        min_conf = req.min_confidence or DEFAULT_MIN_CONFIDENCE
        if not 0 < min_conf <= 1:
            raise bad("min_confidence must be in (0, 1] (0 = 0.5)")
        vsize = rpc.object_size(self.store, req.video, "video")
        if vsize == 0:
            raise bad("the video is empty (0 bytes)")
        size = self.model.size(model)
        faces = {role: self.face(img, f"{role}_face", size) for role, img in role_faces(req)}
        sizes = TR.panel_sizes({r: f.photo.shape for r, f in faces.items()}, height)
        # each photo at its panel's size once; the faces are pasted into these
        faces = {r: f.resized(*sizes[r]) for r, f in faces.items()}
        return {
            "model": model,
            "size": size,
            "sizes": sizes,
            "smooth": smooth,
            "min_conf": min_conf,
            "faces": faces,
        }

    def real_landmarks(self, df, n: int, min_conf: float, notes: list[str]) -> dict:
        """role -> {frame index: (68, 2) landmarks} of confident, tracked frames."""
        out = {}
        for role, table_role in ROLES.items():
            frames: dict[int, np.ndarray] = {}
            if ft.ROLE_COL in df.columns and (df[ft.ROLE_COL] == table_role).any():
                sub = df[
                    (df[ft.ROLE_COL] == table_role) & (df["success"] > 0) & (df["confidence"] >= min_conf)
                ]
                xy = sub[ft.LANDMARK_COLS].to_numpy(np.float64)
                for fr, row in zip(sub["frame"].to_numpy(), xy):
                    i = int(fr) - 1
                    if 0 <= i < n and np.isfinite(row).all():
                        frames[i] = L.to_points(row)
            else:
                notes.append(f"the extractor found no {table_role} face: the novel {role} stays neutral")
            out[role] = frames
        return out

    def run_transfer(
        self,
        req: synth_pb2.TransferRequest,
        inp: dict,
        extract: extractor_pb2.ExtractResult,
        notes: list[str],
        report: rpc.Report,
    ) -> synth_pb2.TransferResult:
        t0 = time.perf_counter()
        model, size = inp["model"], inp["size"]
        report("judge", 0, 1, "reading the frame table")
        df, _ = tables.read_frames(self.store.get_bytes(extract.frames.key))
        with self.store.local_file(req.video.key) as path:
            try:
                idx = video.probe(path)
            except video.VideoError as e:
                raise bad(f"video: {e}") from None
            n = idx.n_frames
            lms = self.real_landmarks(df, n, inp["min_conf"], notes)
            if not lms["parent"] and not lms["infant"]:
                raise rpc.UserError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "no face was tracked (with enough confidence) in any frame of "
                    "the video: there is no expression to transfer",
                )
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
        drive = {r: np.clip(TR.smooth_va(TR.hold_va(raw[r]), times, inp["smooth"]), -1, 1) for r in raw}
        # 2. The novel faces at each needed VA (re-used across frames with the same VA).
        keys = {r: [TR.quantise_va(v) for v in drive[r]] for r in drive}
        jobs = sorted({(r, k) for r in keys for k in keys[r]})
        report("generate", 0, len(jobs), "")
        faces = inp["faces"]
        outs = self.map_pool(
            lambda job: self.model.transform(
                model, faces[job[0]].crop, faces[job[0]].landmarks, job[1], True
            ),
            jobs,
            report=lambda d, t: report("generate", d, t, ""),
        )
        made = {job: o for job, o in zip(jobs, outs)}

        @functools.lru_cache(maxsize=16)
        def panel(role: str, key: tuple[float, float]) -> np.ndarray:
            f = faces[role]
            return P.paste_generated(f.photo, f.M, made[(role, key)])[0]

        # 3. Post-processing and the video.
        motions = {
            r: (TR.Motion.none(n) if req.no_motion else TR.motion(times, seed=int(req.seed) * 2 + k))
            for k, r in enumerate(("parent", "infant"))
        }
        with tempfile.TemporaryDirectory(prefix="dyadlab-synth-") as d:
            mp4 = Path(d) / "transfer.mp4"
            TR.compose(
                mp4,
                idx.pts,
                idx.time_base,
                idx.avg_fps,
                lambda role, k: panel(role, keys[role][k]),
                motions,
                inp["sizes"],
                report=lambda done, tot: report("encode", done, tot, ""),
            )
            check = video.probe(mp4)
            if check.n_frames != n:
                raise rpc.UserError(
                    grpc.StatusCode.INTERNAL, f"the encoded video has {check.n_frames} frames, not {n}"
                )
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
            csv_ref = self.store.put_bytes(
                f"synth/transfers/{hashlib.sha256(csv).hexdigest()}.csv", csv, content_type="text/csv"
            )
            sha = storage.sha256_file(mp4)
            video_ref = self.store.put_file(
                f"synth/transfers/{sha}.mp4", mp4, content_type="video/mp4", sha256=sha
            )
            report("write", 2, 2, "")
        seen = {r: int(np.isfinite(raw[r]).all(axis=1).sum()) for r in raw}
        for r in raw:
            if 0 < seen[r] < n:
                notes.append(
                    f"the real {r}'s VA was judged in {seen[r]} of {n} frames; the other "
                    "frames hold the last VA (neutral before the first)"
                )
        notes.append("the output has no audio track (voices identify people)")
        TRANSFER_FRAMES.inc(n)
        secs = time.perf_counter() - t0
        log.info(
            "transfer done",
            extra={
                "frames": n,
                "seconds": round(secs, 2),
                "fps": round(n / max(secs, 1e-9), 1),
                "faces_generated": len(jobs),
                "crops_judged": total,
            },
        )
        return synth_pb2.TransferResult(
            video=object_ref(video_ref),
            va_table=object_ref(csv_ref),
            frames=n,
            fps=idx.avg_fps,
            parent_frames_seen=seen["parent"],
            infant_frames_seen=seen["infant"],
            seconds=secs,
            notes=notes,
        )
