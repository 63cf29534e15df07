"""The extractor service: video in the store -> frame table + speech table in the store.

Results are keyed by the video's SHA-256 and the options, so a repeated call
is a cache hit, and published summary-last: the summary JSON is what marks a
result complete, so a crash leaves no result that looks finished. Finished
chunks are kept under work/ while a job runs, so a restarted job resumes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import hashlib
import io
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import prometheus_client as prom
from google.protobuf import json_format

from dyadlab import frames as ft
from dyadlab import log as jsonlog
from dyadlab import openface, rpc, storage, tables, video
from dyadlab.config import Settings
from dyadlab.face import models
from dyadlab.messages import ROLE_ENUM, object_ref
from dyadlab.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc
from services.extractor import au, chunks, frontends, pipeline, speech

log = logging.getLogger("dyadlab.extractor")

FRAMES = prom.Counter("dyadlab_extractor_frames_total", "Video frames analysed")
JOBS = prom.Counter("dyadlab_extractor_jobs_total", "Extraction jobs", ["outcome"])
SPEECH_VERSION = "1"


def video_info(idx: video.VideoIndex) -> extractor_pb2.VideoInfo:
    return extractor_pb2.VideoInfo(
        width=idx.width,
        height=idx.height,
        frames=idx.n_frames,
        duration_s=idx.duration_s,
        avg_fps=idx.avg_fps,
        variable_frame_rate=idx.variable_frame_rate,
        has_audio=idx.has_audio,
        codec=idx.codec,
    )


def face_summaries(faces: list[dict]) -> list[extractor_pb2.FaceSummary]:
    def finite(v) -> float:
        return float(v) if v is not None and np.isfinite(v) else 0.0

    return [
        extractor_pb2.FaceSummary(
            face_id=f["face_id"],
            role=ROLE_ENUM.get(f["role"], common_pb2.ROLE_UNSPECIFIED),
            frames_tracked=f["frames_tracked"],
            mean_confidence=f["mean_confidence"],
            median_iod_px=f["median_iod_px"],
            au12_rest_width=finite(f.get("au12_rest_width")),
            frames_seen=f.get("frames_seen", f["frames_tracked"]),
            au_calibration=au.describe_calibration(f["role"], f["calibration"])
            if f.get("calibration")
            else "",
        )
        for f in faces
    ]


def summarize_table(df) -> list[dict]:
    """Face summaries of any frame table (e.g. an imported OpenFace CSV)."""
    out = []
    for fid in ft.face_ids(df):
        sub = df[df["face_id"] == fid]
        ok = sub["success"] > 0
        eyes = (ft.RIGHT_EYE_OUTER, ft.LEFT_EYE_OUTER)
        iod = 0.0
        if all(f"x_{i}" in sub.columns for i in eyes) and ok.any():
            s = sub[ok]
            iod = float(
                ((s[f"x_{eyes[1]}"] - s[f"x_{eyes[0]}"]) ** 2 + (s[f"y_{eyes[1]}"] - s[f"y_{eyes[0]}"]) ** 2)
                .pow(0.5)
                .median()
            )
        out.append(
            {
                "face_id": fid,
                "role": str(sub[ft.ROLE_COL].iloc[0]) if ft.ROLE_COL in sub else "",
                "frames_tracked": int(ok.sum()),
                "mean_confidence": float(sub.loc[ok, "confidence"].mean()) if ok.any() else 0.0,
                "median_iod_px": iod,
            }
        )
    return out


def _bytes(n: int) -> str:
    """A size for a message: exact bytes below 1 MiB, else MiB or GiB with 2 decimals."""
    if n < 1 << 20:
        return f"{n} bytes"
    return f"{n / 2**20:.2f} MiB" if n < 1 << 30 else f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass
class Keys:
    """Where the results of one (video, options) job live."""

    sha: str
    tag: str

    @property
    def frames(self) -> str:
        return f"frames/{self.sha}/{self.tag}.parquet"

    @property
    def speech(self) -> str:
        return f"speech/{self.sha}/v{SPEECH_VERSION}.parquet"

    @property
    def summary(self) -> str:
        return f"frames/{self.sha}/{self.tag}.json"

    @property
    def work(self) -> str:
        return f"work/extract/{self.sha}/{self.tag}"


class ExtractorService:
    name = "dyadlab.v1.Extractor"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = storage.open_store(settings)
        self.pool: cf.ProcessPoolExecutor | None = None
        self._jobs: dict[str, list] = {}  # key -> [lock, users]: one job per key at a time

    def register(self, server: grpc.aio.Server) -> None:
        extractor_pb2_grpc.add_ExtractorServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        """Ready = every worker process up with dlib's models loaded, and the
        VAD model and face-descriptor network loaded here."""
        n = self.settings.workers
        self.pool = chunks.worker_pool(n)
        loop = asyncio.get_running_loop()
        # n probes that each wait for all n workers: every worker must be up.
        pids = await asyncio.gather(
            *(loop.run_in_executor(self.pool, chunks.warm_up, None) for _ in range(n))
        )
        await asyncio.to_thread(speech.load_model)
        await asyncio.to_thread(models.face_encoder)  # identity joins run here
        log.info("workers ready", extra={"workers": len(set(pids))})

    async def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    # -- the work ---------------------------------------------------------------
    def check_video(self, ref: common_pb2.ObjectRef) -> int:
        size = rpc.object_size(self.store, ref, "video")
        if size == 0:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "the video is empty (0 bytes)")
        if size > self.settings.max_video_bytes:
            raise rpc.UserError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the video is {_bytes(size)}, over the limit of "
                f"{_bytes(self.settings.max_video_bytes)} "
                "(DYADLAB_MAX_VIDEO_BYTES)",
            )
        return size

    def run(
        self, key: str, opts: pipeline.Options, skip_speech: bool, report: rpc.Report
    ) -> extractor_pb2.ExtractResult:
        t0 = time.perf_counter()
        with self.store.local_file(key) as path:
            report("hash", 0, 1, "")
            sha = storage.sha256_file(path)
            keys = Keys(sha, opts.cache_tag())
            if self.store.exists(keys.summary):
                res = json_format.Parse(self.store.get_bytes(keys.summary), extractor_pb2.ExtractResult())
                res.cache_hit, res.seconds = True, 0.0
                if not skip_speech and not res.HasField("speech"):
                    # Cached without speech (an earlier skip_speech call): add only that.
                    report("speech", 0, 1, "")
                    out: dict = {}
                    self._speech(path, keys, out)
                    if "error" in out:
                        raise out["error"]
                    res.speech.CopyFrom(object_ref(out["ref"]))
                    res.notes.extend(out.get("notes", []))
                    self._publish(keys, res)
                log.info("cache hit", extra={"video": jsonlog.short(sha)})
                return res
            report("index", 0, 1, "")
            try:
                idx = video.probe(path)
            except video.VideoError as e:
                raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            report("index", 1, 1, f"{idx.n_frames} frames")
            speech_out: dict = {}
            th = None
            if not skip_speech:
                th = threading.Thread(target=self._speech, args=(path, keys, speech_out), daemon=True)
                th.start()
            try:
                ex = pipeline.extract(
                    str(path),
                    opts,
                    self.pool,
                    index=idx,
                    cache=pipeline.ChunkCache(self.store, keys.work),
                    progress=lambda st, d, t, m: report(st, d, t, m),
                    workers=self.settings.workers,
                )
            finally:
                if th is not None:
                    th.join()  # never leave it reading a file that goes away
            if "error" in speech_out:
                raise speech_out["error"]
            report("write", 0, 1, "")
            frames_ref = self.store.put_bytes(keys.frames, tables.to_bytes(ex.table, "parquet"))
            fe = frontends.get(opts.frontend)
            res = extractor_pb2.ExtractResult(
                frames=object_ref(frames_ref),
                video=video_info(idx),
                faces=face_summaries(ex.faces),
                notes=ex.notes + speech_out.get("notes", []),
                cache_hit=False,
                seconds=time.perf_counter() - t0,
                frontend=f"{fe.name}{fe.version}",
            )
            if "ref" in speech_out:
                res.speech.CopyFrom(object_ref(speech_out["ref"]))
            self._publish(keys, res)
            pipeline.ChunkCache(self.store, keys.work).clear()
            FRAMES.inc(idx.n_frames)
            log.info(
                "extracted",
                extra={
                    "video": jsonlog.short(sha),
                    "frames": idx.n_frames,
                    "faces": len(ex.faces),
                    "seconds": round(res.seconds, 2),
                    "fps": round(idx.n_frames / max(res.seconds, 1e-9), 1),
                },
            )
            return res

    def _publish(self, keys: Keys, res: extractor_pb2.ExtractResult) -> None:
        """Write the summary last: its presence marks the result complete."""
        cached = extractor_pb2.ExtractResult()
        cached.CopyFrom(res)
        cached.cache_hit = False
        self.store.put_bytes(
            keys.summary, json_format.MessageToJson(cached).encode(), content_type="application/json"
        )

    def _speech(self, path: Path, keys: Keys, out: dict) -> None:
        try:
            if self.store.exists(keys.speech):
                # Written by an earlier job that stopped before its summary (killed,
                # or its caller gave up): the notes travel inside the table.
                data = self.store.get_bytes(keys.speech)
                out["notes"] = list(pd.read_parquet(io.BytesIO(data)).attrs.get("notes", []))
                out["ref"] = self.store.ref(keys.speech)
                return
            r = speech.detect_speech(path)
            out["notes"] = list(r.notes)
            out["ref"] = self.store.put_bytes(keys.speech, tables.to_bytes(speech.speech_table(r), "parquet"))
        except Exception as e:  # noqa: BLE001 — re-raised in the job's thread
            out["error"] = e

    def import_openface(self, ref: common_pb2.ObjectRef) -> extractor_pb2.ImportOpenFaceResponse:
        size = rpc.object_size(self.store, ref, "csv", "CSV")
        key = ref.key
        if size > openface.DEFAULT_MAX_BYTES:
            raise rpc.UserError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the CSV is {size / 2**20:.0f} MiB, over the import limit of "
                f"{openface.DEFAULT_MAX_BYTES / 2**20:.0f} MiB",
            )
        data = self.store.get_bytes(key)
        sha = hashlib.sha256(data).hexdigest()
        df, notes = tables.read_frames(data)
        stored = self.store.put_bytes(f"frames/{sha}/imported.parquet", tables.to_bytes(df, "parquet"))
        return extractor_pb2.ImportOpenFaceResponse(
            frames=object_ref(stored), rows=len(df), faces=face_summaries(summarize_table(df)), notes=notes
        )


def options_from(msg: extractor_pb2.ExtractOptions) -> pipeline.Options:
    if not 0 <= msg.max_faces <= 8:
        raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "options.max_faces must be 0..8")
    if not 0 <= msg.detect_every <= 10_000:
        raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "options.detect_every must be 0..10000")
    adult = msg.adult_face_id if msg.HasField("adult_face_id") else -1
    if msg.HasField("adult_face_id") and adult < 0:
        raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "options.adult_face_id must be >= 0")
    if msg.frontend and msg.frontend not in frontends.FRONTENDS:
        raise rpc.UserError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"options.frontend {msg.frontend!r} is not a face front-end; "
            f"choose one of: {', '.join(frontends.FRONTENDS)}",
        )
    return pipeline.Options(
        max_faces=msg.max_faces or 2,
        verify_every=msg.detect_every,
        adult_face_id=adult,
        frontend=msg.frontend or frontends.DEFAULT,
    )


class _Servicer(extractor_pb2_grpc.ExtractorServicer):
    def __init__(self, svc: ExtractorService):
        self.svc = svc

    @rpc.status_errors
    async def Extract(self, request, context):
        self.svc.check_video(request.video)
        opts = options_from(request.options)
        # One job per (video key, options) at a time; a second caller waits and hits the cache.
        key = f"{request.video.key}|{opts.cache_tag()}"
        entry = self.svc._jobs.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                async for kind, value in rpc.progress_stream(
                    lambda report: self.svc.run(request.video.key, opts, request.options.skip_speech, report)
                ):
                    if kind == "progress":
                        yield extractor_pb2.ExtractEvent(progress=rpc.progress(*value))
                    else:
                        JOBS.labels("cache_hit" if value.cache_hit else "done").inc()
                        yield extractor_pb2.ExtractEvent(result=value)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self.svc._jobs.pop(key, None)

    @rpc.status_errors
    async def ImportOpenFace(self, request, context):
        return await asyncio.to_thread(self.svc.import_openface, request.csv)


def main() -> None:
    rpc.run(ExtractorService, lambda s: s.extractor_addr)
