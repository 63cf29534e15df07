"""The mesh front-end (default): BlazeFace + MediaPipe face mesh
(`dyadlab.face.meshtracker`), the 68 iBUG points and their 3D positions from
the mesh (`ibug68`, `pose.MeshPose`), and the appearance channel
(`dyadlab.face.appearance`) on each measured face, batched at the end of
the chunk.

Confidence of a measured face (success 1), in [0, 1]:

    confidence = presence x (1 - P(mouth occluded)) x yaw factor

- presence: the mesh's own face-presence probability in the tracked ROI
  (near 1 on a face it fits, near 0 in full profile or behind hands);
- P(mouth occluded): the appearance model's second output (a hand or an
  object over the mouth: the mesh still draws a mouth, a guess);
- yaw factor: 1 up to YAW_FULL, falling linearly to 0 at YAW_ZERO (the far
  lip corner hides behind the cheek; the mesh's 3D still places it, but
  from the near half of the face).
Faces tracked but not measurable (box state) get success 0, confidence =
the best presence tried, and no landmarks.
"""

from __future__ import annotations

import os
import time

import dlib
import numpy as np

from dyadlab import video
from dyadlab.face import align, appearance, ibug68, registry
from dyadlab.face.meshtracker import MeshTracker
from dyadlab.face.pose import MeshPose
from services.extractor.chunks import CHIP_PX, ChunkResult, TrackInfo

YAW_FULL = np.radians(50.0)
YAW_ZERO = np.radians(80.0)
CHIP_PADDING = 0.25
CHIP_BETTER_YAW = 0.1  # re-cut a track's identity chip when its yaw is this much smaller
#: dlib's face descriptor is trained on near-frontal faces: a chip cut from a
#: face turned further than this would compare badly even with the same
#: person, so such a track goes without a descriptor (joined by position).
CHIP_MAX_YAW = np.radians(30.0)


def warm_up() -> None:
    for name in ("blazeface_short", "blazeface_full", "face_mesh"):
        registry.tflite(name)
    appearance.model()


def confidence(presence: np.ndarray, p_occluded: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    y = np.abs(np.nan_to_num(yaw, nan=np.pi))
    f_yaw = np.clip((YAW_ZERO - y) / (YAW_ZERO - YAW_FULL), 0.0, 1.0)
    return (presence * (1.0 - np.nan_to_num(p_occluded, nan=0.0)) * f_yaw).astype(np.float32)


def chip(img: np.ndarray, lm68: np.ndarray) -> np.ndarray:
    """dlib's aligned 150x150 RGB face chip from the 68 points (its descriptor's input)."""
    x0, y0 = lm68.min(axis=0)
    x1, y1 = lm68.max(axis=0)
    pts = [dlib.point(int(round(x)), int(round(y))) for x, y in lm68]
    det = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), pts)
    return np.asarray(dlib.get_face_chip(img, det, size=CHIP_PX, padding=CHIP_PADDING))


def process(
    path: str, index: video.VideoIndex, start: int, stop: int, max_faces: int = 2, detect_every: int = 0
) -> ChunkResult:
    t0 = time.perf_counter()
    tracker = MeshTracker(
        index.width, index.height, index.avg_fps, max_faces=max_faces, search_every=detect_every
    )
    pose_of = MeshPose(index.width, index.height)
    fr, tid, ok, boxes, presence, lm2, lm3, mm, poses = ([] for _ in range(9))
    crops: list[np.ndarray] = []
    crop_row: list[int] = []
    spans: dict[int, list] = {}  # tid -> [first, last, first box, last box]
    chips: dict[int, tuple[float, np.ndarray]] = {}  # tid -> (|yaw|, chip)
    nan68_2, nan68_3, nan6 = (np.full(s, np.nan, np.float32) for s in ((68, 2), (68, 3), 6))
    decoded = 0
    for no, img in video.frames(path, index, start, stop, color=True):
        decoded += 1
        for o in tracker.step(no, img):
            fr.append(no)
            tid.append(o.tid)
            boxes.append(o.box)
            presence.append(o.presence)
            s = spans.setdefault(o.tid, [no, no, tuple(map(float, o.box)), None])
            s[1], s[3] = no, tuple(map(float, o.box))
            if o.points is None:
                ok.append(False)
                lm2.append(nan68_2)
                lm3.append(nan68_3)
                mm.append(nan68_3)
                poses.append(nan6)
                continue
            p3 = ibug68.to68(o.points).astype(np.float32)
            pose, xyz = pose_of(o.points, p3)
            ok.append(True)
            lm2.append(p3[:, :2])
            lm3.append(p3)
            mm.append(xyz)
            poses.append(pose)
            c = align.crop(img, p3[:, :2])
            if c is not None:
                crops.append(c)
                crop_row.append(len(fr) - 1)
            yaw = abs(float(pose[4]))
            best = chips.get(o.tid)
            if yaw <= CHIP_MAX_YAW and (best is None or yaw < best[0] - CHIP_BETTER_YAW):
                chips[o.tid] = (yaw, chip(img, p3[:, :2]))
    m = len(fr)
    smile_logit = np.full(m, np.nan, np.float32)
    p_occ = np.full(m, np.nan, np.float32)
    if crops:
        logit, po = appearance.predict(np.stack(crops))
        smile_logit[crop_row], p_occ[crop_row] = logit, po
    pose_a = np.asarray(poses, np.float32).reshape(m, 6)
    success = np.asarray(ok, bool)
    pres = np.asarray(presence, np.float32)
    conf = np.where(success, confidence(pres, p_occ, pose_a[:, 4]), pres).astype(np.float32)
    tracks = []
    for t in tracker.close():
        if t.tid in spans:
            first, last, r0, r1 = spans[t.tid]
            tracks.append(
                TrackInfo(t.tid, first, last, r0, r1, None, chips[t.tid][1] if t.tid in chips else None)
            )
    return ChunkResult(
        start,
        stop,
        decoded,
        np.asarray(fr, np.int64),
        np.asarray(tid, np.int64),
        np.asarray(lm2, np.float32).reshape(m, 68, 2),
        conf,
        pose_a,
        tracks,
        time.perf_counter() - t0,
        dict(tracker.stats, pid=os.getpid()),
        success=success,
        box=np.asarray(boxes, np.float32).reshape(m, 4),
        landmarks3d=np.asarray(lm3, np.float32).reshape(m, 68, 3),
        landmarks_mm=np.asarray(mm, np.float32).reshape(m, 68, 3),
        smile_logit=smile_logit,
        p_occluded=p_occ,
    )
