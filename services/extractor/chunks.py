"""Split a video into chunks of frames and process one chunk (in a worker process).

Chunks let both cores work on one video (each worker decodes and landmarks
its own stretch from the keyframe before it) and make extraction resumable:
each finished chunk is stored, so a restarted job continues where it stopped.
Face identities are joined across chunks afterwards (`identity.py`).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from dyadlab import video
from dyadlab.face.pose import PoseEstimator
from dyadlab.face.tracker import FaceTracker

CHUNK_FRAMES = 300


def plan(index: video.VideoIndex, chunk_frames: int = CHUNK_FRAMES) -> list[tuple[int, int]]:
    """[start, stop) frame ranges of about `chunk_frames`, starting on keyframes
    when one lies within half a chunk of the target boundary (no wasted decoding)."""
    n = index.n_frames
    keys = np.flatnonzero(index.keyframe)
    bounds = [0]
    while n - bounds[-1] > 1.5 * chunk_frames:
        target = bounds[-1] + chunk_frames
        near = keys[(keys > bounds[-1] + chunk_frames // 2) & (keys < target + chunk_frames // 2)]
        bounds.append(int(near[np.argmin(np.abs(near - target))]) if len(near) else target)
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


@dataclasses.dataclass
class TrackInfo:
    tid: int
    first: int
    last: int
    first_rect: tuple
    last_rect: tuple
    embedding: np.ndarray | None


@dataclasses.dataclass
class ChunkResult:
    start: int
    stop: int
    frames_decoded: int
    frame: np.ndarray        # (m,) frame number of each observation
    tid: np.ndarray          # (m,) chunk-local track id
    landmarks: np.ndarray    # (m, 68, 2) float32
    confidence: np.ndarray   # (m,) float32
    pose: np.ndarray         # (m, 6) float32: Tx Ty Tz Rx Ry Rz
    tracks: list[TrackInfo]
    seconds: float
    stats: dict

    def to_npz(self) -> dict[str, np.ndarray]:
        t = self.tracks
        return {
            "meta": np.array([self.start, self.stop, self.frames_decoded], np.int64),
            "seconds": np.array([self.seconds]),
            "frame": self.frame, "tid": self.tid, "landmarks": self.landmarks,
            "confidence": self.confidence, "pose": self.pose,
            "t_tid": np.array([x.tid for x in t], np.int64),
            "t_span": np.array([(x.first, x.last) for x in t], np.int64).reshape(-1, 2),
            "t_rects": np.array([(*x.first_rect, *x.last_rect) for x in t], np.float64).reshape(-1, 8),
            "t_emb": np.array([x.embedding if x.embedding is not None else np.full(128, np.nan)
                               for x in t], np.float32).reshape(-1, 128),
        }

    @classmethod
    def from_npz(cls, z) -> "ChunkResult":
        tracks = []
        for i, tid in enumerate(z["t_tid"]):
            e = z["t_emb"][i]
            r = z["t_rects"][i]
            tracks.append(TrackInfo(int(tid), int(z["t_span"][i, 0]), int(z["t_span"][i, 1]),
                                    tuple(r[:4]), tuple(r[4:]), None if np.isnan(e).any() else e))
        start, stop, decoded = (int(v) for v in z["meta"])
        return cls(start, stop, decoded, z["frame"], z["tid"], z["landmarks"], z["confidence"],
                   z["pose"], tracks, float(z["seconds"][0]), {})


def _rect(lm: np.ndarray) -> tuple:
    x0, y0 = np.nanmin(lm, axis=0)
    x1, y1 = np.nanmax(lm, axis=0)
    return (float(x0), float(y0), float(x1), float(y1))


def process(path: str, index: video.VideoIndex, start: int, stop: int,
            max_faces: int = 2, verify_every: int = 0) -> ChunkResult:
    """Track faces in frames [start, stop): landmarks, confidence, head pose."""
    t0 = time.perf_counter()
    tracker = FaceTracker(index.width, index.height, index.avg_fps, max_faces=max_faces,
                          verify_every=verify_every)
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
            s = spans.setdefault(o.tid, [no, no, _rect(o.lm), None])
            s[1] = no
            s[3] = o.lm
    tracks = []
    for t in tracker.close():
        if t.tid in spans:
            first, last, r0, lm_last = spans[t.tid]
            tracks.append(TrackInfo(t.tid, first, last, r0, _rect(lm_last), t.embedding))
    m = len(fr)
    return ChunkResult(
        start, stop, decoded,
        np.asarray(fr, np.int64), np.asarray(tid, np.int64),
        np.asarray(lms, np.float32).reshape(m, 68, 2),
        np.asarray(conf, np.float32), np.asarray(poses, np.float32).reshape(m, 6),
        tracks, time.perf_counter() - t0, dict(tracker.stats, pid=os.getpid()))


def warm_up(_: object = None) -> int:
    """Load dlib's models in a worker (the pool's initializer and readiness probe)."""
    from dyadlab.face import models
    models.load_all()
    return os.getpid()
