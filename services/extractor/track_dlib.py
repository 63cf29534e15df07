"""The dlib front-end (kept for comparison: `--frontend dlib`): HOG detection,
68-point shape predictor, head pose by PnP on a generic 3D face
(`dyadlab.face.tracker`, `dyadlab.face.pose`). Frontal faces only; no 3D
landmarks and no appearance channel (those columns stay NaN)."""

from __future__ import annotations

import os
import time

import numpy as np

from dyadlab import video
from dyadlab.face.pose import PoseEstimator
from dyadlab.face.tracker import FaceTracker
from services.extractor.chunks import ChunkResult, TrackInfo, _rect


def warm_up() -> None:
    from dyadlab.face import models

    models.detector(), models.shape_predictor()


def process(
    path: str, index: video.VideoIndex, start: int, stop: int, max_faces: int = 2, verify_every: int = 0
) -> ChunkResult:
    """Track faces in frames [start, stop): landmarks, confidence, head pose."""
    t0 = time.perf_counter()
    tracker = FaceTracker(
        index.width,
        index.height,
        index.avg_fps,
        max_faces=max_faces,
        verify_every=verify_every,
        defer_embeddings_on=start,
    )
    pose = PoseEstimator(index.width, index.height)
    fr, tid, lms, conf, poses = [], [], [], [], []
    spans: dict[int, list] = {}
    decoded = 0
    for no, img in video.frames(path, index, start, stop):
        decoded += 1
        for o in tracker.step(no, img):
            if not np.isfinite(o.lm).all():
                continue
            fr.append(no)
            tid.append(o.tid)
            lms.append(o.lm)
            conf.append(o.confidence)
            poses.append(pose(o.tid, o.lm))
            s = spans.get(o.tid)
            if s is None:
                s = spans[o.tid] = [no, no, _rect(o.lm), None]
            s[1] = no
            s[3] = o.lm
    tracks = []
    for t in tracker.close():
        if t.tid in spans:
            first, last, r0, lm_last = spans[t.tid]
            tracks.append(TrackInfo(t.tid, first, last, r0, _rect(lm_last), t.embedding, t.chip))
    m = len(fr)
    return ChunkResult(
        start,
        stop,
        decoded,
        np.asarray(fr, np.int64),
        np.asarray(tid, np.int64),
        np.asarray(lms, np.float32).reshape(m, 68, 2),
        np.asarray(conf, np.float32),
        np.asarray(poses, np.float32).reshape(m, 6),
        tracks,
        time.perf_counter() - t0,
        dict(tracker.stats, pid=os.getpid()),
    )
