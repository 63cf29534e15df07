"""Video -> frame table: index, chunked tracking on worker processes, identity
join, roles, AU estimation. Usable without gRPC (benchmarks, tests).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from dyadlab import frames as ft
from dyadlab import video
from services.extractor import au, chunks, frontends, identity

log = logging.getLogger("dyadlab.extractor")

#: Bump when the assembly of the frame table changes (identity join, roles,
#: AU estimation), so cached tables are not reused. Each front-end has its
#: own version too (`frontends.py`); both are in the cache key.
PIPELINE_VERSION = "4"  # 4: front-ends, 3D columns, appearance channel


@dataclasses.dataclass(frozen=True)
class Options:
    max_faces: int = 2
    verify_every: int = 0
    adult_face_id: int = -1
    chunk_frames: int = chunks.CHUNK_FRAMES
    frontend: str = frontends.DEFAULT

    def cache_tag(self) -> str:
        """What changes the frame table (the chunking does not): the front-end
        and its version, the pipeline version and the options."""
        fe = frontends.get(self.frontend)
        return (
            f"{fe.name}{fe.version}-v{PIPELINE_VERSION}-f{self.max_faces}"
            f"-d{self.verify_every}-a{self.adult_face_id}"
        )


@dataclasses.dataclass
class Extraction:
    table: pd.DataFrame
    index: video.VideoIndex
    notes: list[str]
    faces: list[dict]
    seconds: float
    chunk_seconds: float


ProgressFn = Callable[[str, int, int, str], None]


class ChunkCache:
    """Finished chunks kept in the object store so an interrupted job resumes."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix

    def key(self, start: int, stop: int) -> str:
        return f"{self.prefix}/chunk-{start:08d}-{stop:08d}.npz"

    def get(self, start: int, stop: int) -> chunks.ChunkResult | None:
        if self.store is None or not self.store.exists(self.key(start, stop)):
            return None
        with np.load(io.BytesIO(self.store.get_bytes(self.key(start, stop)))) as z:
            return chunks.ChunkResult.from_npz(z)

    def put(self, res: chunks.ChunkResult) -> None:
        if self.store is None:
            return
        buf = io.BytesIO()
        np.savez(buf, **res.to_npz())  # type: ignore[arg-type]  # numpy's stub: a **dict might name allow_pickle
        self.store.put_bytes(self.key(res.start, res.stop), buf.getvalue())

    def clear(self) -> None:
        if self.store is not None:
            for k in list(self.store.list(self.prefix + "/")):
                self.store.delete(k)


def extract(
    path: str,
    opts: Options,
    executor: cf.Executor | None = None,
    index: video.VideoIndex | None = None,
    cache: ChunkCache | None = None,
    progress: ProgressFn | None = None,
    workers: int = 1,
) -> Extraction:
    """Run the whole pipeline; `workers` = processes behind `executor`."""
    t0 = time.perf_counter()
    progress = progress or (lambda *a: None)
    index = index or video.probe(path)
    # Chunks of the given length, else whole rounds of two per worker process.
    workers = max(1, workers) if executor is not None else 1
    plan = (
        chunks.plan(index, opts.chunk_frames)
        if opts.chunk_frames
        else chunks.plan(index, n_chunks=chunks.chunk_count(index.n_frames, workers))
    )
    cache = cache or ChunkCache(None, "")
    results: dict[int, chunks.ChunkResult] = {}
    todo = []
    for i, (a, b) in enumerate(plan):
        hit = cache.get(a, b)
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    done = sum(results[i].stop - results[i].start for i in results)
    progress("landmarks", done, index.n_frames, f"{len(results)} of {len(plan)} chunks cached")
    if todo:
        own = executor is None
        ex = executor or cf.ThreadPoolExecutor(1)
        futs: dict = {}
        try:
            futs = {
                ex.submit(
                    chunks.process,
                    str(path),
                    index,
                    *plan[i],
                    opts.max_faces,
                    opts.verify_every,
                    opts.frontend,
                ): i
                for i in todo
            }
            for fut in cf.as_completed(futs):
                res = fut.result()
                results[futs[fut]] = res
                cache.put(res)
                done += res.stop - res.start
                progress("landmarks", done, index.n_frames, "")
        except BaseException:
            # Stopped (the call ended, a chunk failed): chunks not yet started are
            # dropped; finished ones stay in the cache for the next attempt.
            for f in futs:
                f.cancel()
            raise
        finally:
            if own:
                ex.shutdown()
    ordered = [results[i] for i in range(len(plan))]
    decoded = sum(r.frames_decoded for r in ordered)
    table, faces, notes = assemble(ordered, index, opts)
    if decoded < index.n_frames:
        notes.append(
            f"{index.n_frames - decoded} of {index.n_frames} frames could not be "
            "decoded (damaged video?); they have success = 0"
        )
    return Extraction(table, index, notes, faces, time.perf_counter() - t0, sum(r.seconds for r in ordered))


def assemble(
    results: list[chunks.ChunkResult], index: video.VideoIndex, opts: Options
) -> tuple[pd.DataFrame, list[dict], list[str]]:
    n = index.n_frames
    person_of = identity.join(results, opts.max_faces)
    n_people = (max(person_of.values()) + 1) if person_of else 0
    conf = np.zeros((n_people, n), np.float32)
    seen = np.zeros((n_people, n), bool)  # tracked (measured or not)
    ok = np.zeros((n_people, n), bool)  # measured: success = 1
    lm = np.full((n_people, n, 68, 2), np.nan, np.float32)
    lm3 = np.full((n_people, n, 68, 3), np.nan, np.float32)
    mm = np.full((n_people, n, 68, 3), np.nan, np.float32)
    pose = np.full((n_people, n, 6), np.nan, np.float32)
    box = np.full((n_people, n, 4), np.nan, np.float32)
    smile_logit = np.full((n_people, n), np.nan, np.float32)
    p_occ = np.full((n_people, n), np.nan, np.float32)
    for ci, r in enumerate(results):
        if len(r.frame) == 0:
            continue
        who = np.array([person_of[(ci, int(t))] for t in r.tid])
        conf[who, r.frame] = r.confidence
        seen[who, r.frame] = True
        ok[who, r.frame] = r.success
        lm[who, r.frame] = r.landmarks
        lm3[who, r.frame] = r.landmarks3d
        mm[who, r.frame] = r.landmarks_mm
        pose[who, r.frame] = r.pose
        box[who, r.frame] = r.box
        smile_logit[who, r.frame] = r.smile_logit
        p_occ[who, r.frame] = r.p_occluded
    keep = [p for p in range(n_people) if seen[p].sum() >= identity.MIN_PERSON_FRAMES]
    notes: list[str] = []
    if n_people > len(keep):
        notes.append(
            f"{n_people - len(keep)} brief detection(s) of under {identity.MIN_PERSON_FRAMES} frames ignored"
        )
    iod, size = {}, {}
    for new, p in enumerate(keep):
        e = lm[p, ok[p]]
        iod[new] = float(np.median(np.linalg.norm(e[:, 45] - e[:, 36], axis=1))) if len(e) else 0.0
        b = box[p, seen[p]]
        size[new] = float(np.nanmedian(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    # The size cue for roles: inter-ocular distance (dlib, as before); the
    # face box for the mesh front-end, which also tracks faces it cannot measure.
    mesh = frontends.get(opts.frontend).multiview
    roles = identity.assign_roles(
        list(range(len(keep))),
        size if mesh else iod,
        opts.adult_face_id,
        {new: int(seen[p].sum()) for new, p in enumerate(keep)} if mesh else None,
    )

    ts = index.timestamps
    blocks, faces = [], []
    for new, p in enumerate(keep):
        role = roles[new]
        if mesh:
            est = au.estimate_mesh(
                lm3[p], smile_logit[p], index.avg_fps, usable=ok[p] & (conf[p] >= 0.5), role=role
            )
        else:
            # Unstable landmarks (occlusion, a face turning away) lower confidence.
            iod_px = np.linalg.norm(lm[p, :, 45] - lm[p, :, 36], axis=1)
            conf[p] *= au.stability(au.jitter(lm[p], index.avg_fps), iod_px, index.avg_fps).astype(np.float32)
            est = au.estimate(
                lm[p],
                index.avg_fps,
                usable=ok[p] & (conf[p] >= 0.5),
                rest_width=au.ADULT_REST_WIDTH if role == "adult" else au.INFANT_REST_WIDTH,
            )
        block = {
            "frame": np.arange(1, n + 1),
            "face_id": np.full(n, new),
            "timestamp": ts,
            "confidence": np.where(seen[p], conf[p], 0.0).astype(np.float64),
            "success": ok[p].astype(np.int64),
            ft.ROLE_COL: np.full(n, role, object),
        }
        for j, c in enumerate(ft.POSE_COLS):
            block[c] = np.where(ok[p], pose[p, :, j], np.nan).astype(np.float64)
        for j in range(68):
            block[f"x_{j}"] = lm[p, :, j, 0].astype(np.float64)
        for j in range(68):
            block[f"y_{j}"] = lm[p, :, j, 1].astype(np.float64)
        for k, axis in enumerate("XYZ"):
            for j in range(68):
                block[f"{axis}_{j}"] = mm[p, :, j, k].astype(np.float64)
        calib = est.pop("calibration")
        for k, v in est.items():
            block[k] = np.where(ok[p], v, np.nan)
        blocks.append(block)
        faces.append(
            {
                "face_id": new,
                "role": role,
                "frames_tracked": int(ok[p].sum()),
                "frames_seen": int(seen[p].sum()),
                "mean_confidence": float(conf[p, ok[p]].mean()) if ok[p].any() else 0.0,
                "median_iod_px": iod[new],
                "au12_rest_width": calib.get("rest_width", np.nan),
                "calibration": calib,
            }
        )
    if not blocks:
        notes.append(f"no face found in any of the {n} frames")
        empty = {
            "frame": np.arange(1, n + 1),
            "face_id": np.zeros(n, np.int64),
            "timestamp": ts,
            "confidence": np.zeros(n),
            "success": np.zeros(n, np.int64),
            ft.ROLE_COL: np.full(n, "", object),
        }
        for c in ft.POSE_COLS + ft.LANDMARK_COLS + ft.LANDMARK3D_COLS + ["AU06_r", "AU12_r", "AU25_r"]:
            empty[c] = np.full(n, np.nan)
        blocks.append(empty)
    return _interleave(blocks), faces, notes


def _interleave(blocks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One table from per-face column blocks (each frames 1..n in order),
    rows ordered by (frame, face_id), columns in OpenFace's order. Built
    column by column, each block's arrays dropped once used: the table is
    copied once (pandas' consolidation), not once per concat/sort/reorder
    step, which kept ~3 tables alive at once on long multi-face videos."""
    cols = ft.column_order(list(blocks[0]))
    data = {}
    for c in cols:
        data[c] = np.stack([b.pop(c) for b in blocks], axis=1).ravel()
    return pd.DataFrame(data)
