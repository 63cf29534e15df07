"""Multi-face tracking with dlib: detect rarely, verify cheaply, landmark every frame.

Per frame and tracked face:
1. The detection box is predicted from the previous frame's landmarks, using
   the box-to-landmark relation measured at the face's last detection (dlib's
   shape predictor expects boxes like its detector's).
2. The 68 landmarks are fitted in that box (small faces on an upscaled crop,
   which gives the integer-valued dlib points sub-pixel precision).
3. Appearance check: normalised cross-correlation (NCC) of a 24x24 patch of the
   inner face with the patch at the last verification. A scene cut or an
   occlusion drops it at once.
4. Verification: every `verify_every` frames, or at once when the NCC drops,
   the HOG detector runs on a small crop around the face. Its score feeds the
   confidence and its box resets landmark drift. A face that fails
   verification for `lost_after` frames, or whose appearance broke, is lost.
5. Search: while fewer than `max_faces` faces are tracked, the whole frame is
   searched every `search_every` frames (~1 s). One exception: while some face
   is tracked and this tracker has never held two faces at once (a
   single-person recording, so far), the search for a second face runs every
   `search_every_alone` frames (~3 s). A full-frame HOG search costs as much
   as ~15-20 landmark fits; in a single-person video the 1 s search was a
   quarter of all the work and never found anything. As soon as two faces
   have been tracked together, the 1 s cadence applies to re-finding either.

Confidence in [0, 1] = logistic(2.5·(s + 0.45)) · clip((NCC − 0.3)/0.3, 0, 1),
with s the running mean (EMA, weight 0.5) of the verification scores (dlib
HOG margin: frontal faces score 0.5–2.5 → 0.92–1.0; a borderline detection
at 0 → 0.76; a failed verification sets s = −1 → 0.20). The appearance term only bites below the
NCC that triggers verification (0.6): an open-mouthed laugh changes the patch
too, and is no evidence of a lost face.
"""

from __future__ import annotations

import dataclasses
import threading

import cv2
import dlib
import numpy as np

from dyadlab.face import boxes, models

PATCH = 24
NCC_SUSPECT = 0.6
UPSCALE_BELOW_PX = 150.0  # fit landmarks on an upscaled crop below this box size
FIT_SIZE_PX = 200.0
VERIFY_FACE_PX = 110.0  # face size in the verification crop (HOG needs >= 80)
FAILED_SCORE = -1.0
REFIT_BELOW_IOU = 0.7
SCORE_EMA = 0.5
SEARCH_THRESHOLD = -0.3  # HOG margin for new faces (weak ones get low confidence)
CHIP_PX, CHIP_PADDING = 150, 0.25  # dlib's face descriptor input (its defaults)


def confidence(score: float, ncc: float) -> float:
    c_det = 1.0 / (1.0 + np.exp(-2.5 * (score + 0.45)))
    c_app = min(1.0, max(0.0, (ncc - 0.3) / (NCC_SUSPECT - 0.3)))
    return float(c_det * c_app)


def _center_scale(lm: np.ndarray) -> tuple[np.ndarray, float]:
    c = lm.mean(axis=0)
    return c, float(np.sqrt(((lm - c) ** 2).sum(axis=1).mean()))


@dataclasses.dataclass
class Track:
    tid: int
    lm: np.ndarray  # (68, 2) float32, image pixels
    rel: np.ndarray  # box centre offset (2) and half-side (1), in landmark-scale units
    template: np.ndarray  # (PATCH*PATCH,) zero-mean unit-norm
    score: float  # last verification score
    last_verified: int
    ncc: float = 1.0
    embedding: np.ndarray | None = None
    first_frame: int = 0
    chip: np.ndarray | None = None  # aligned grey face chip, when the descriptor is deferred

    def rect(self) -> tuple[float, float, float, float]:
        c, s = _center_scale(self.lm)
        cx, cy = c + self.rel[:2] * s
        h = self.rel[2] * s
        return (cx - h, cy - h, cx + h, cy + h)


@dataclasses.dataclass
class Observation:
    tid: int
    lm: np.ndarray
    confidence: float
    score: float


class FaceTracker:
    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        max_faces: int = 2,
        verify_every: int = 0,
        search_every: int = 0,
        lost_after_s: float = 1.5,
        min_face_px: float = 0.0,
        with_embeddings: bool = True,
        defer_embeddings_on: int | None = None,
    ):
        self.w, self.h = width, height
        fps = fps if fps > 0 else 30.0
        self.max_faces = max_faces
        self.verify_every = verify_every or max(1, round(fps / 3))
        self.search_every = search_every or max(1, round(fps))
        self.search_every_alone = 3 * self.search_every
        self.lost_after = max(self.verify_every, round(lost_after_s * fps))
        # Whole-frame search runs on a copy no larger than 640 px unless small
        # faces are asked for (HOG finds faces of >= 80 px at its scale).
        scale = min(1.0, 640.0 / max(width, height))
        if min_face_px > 0:
            scale = max(scale, min(1.0, 80.0 / min_face_px))
        self.search_scale = scale
        self.with_embeddings = with_embeddings
        # Faces found on this frame keep their aligned face chip instead of the
        # descriptor (~85 ms each), for `describe` to compute only if needed:
        # the extractor passes a chunk's first frame, whose faces are nearly
        # always joined to the previous chunk's by position, never by descriptor.
        self.defer_embeddings_on = defer_embeddings_on
        self.detector = models.detector()
        self.predictor = models.shape_predictor()
        self.tracks: list[Track] = []
        self.finished: list[Track] = []
        self._next_id = 0
        self._last_search = -(10**9)
        self._held_several = False  # two or more faces tracked at once, ever
        self.stats = {"searches": 0, "verifications": 0, "fits": 0}

    # -- the per-frame step ----------------------------------------------------
    def step(self, no: int, img: np.ndarray) -> list[Observation]:
        for tr in list(self.tracks):
            self._follow(no, img, tr)
        if len(self.tracks) < self.max_faces:
            every = self.search_every if self._held_several or not self.tracks else self.search_every_alone
            if no - self._last_search >= every:
                self._search(no, img)
                self._held_several |= len(self.tracks) > 1
        return [Observation(t.tid, t.lm, confidence(t.score, t.ncc), t.score) for t in self.tracks]

    def close(self) -> list[Track]:
        self.finished.extend(self.tracks)
        self.tracks = []
        return self.finished

    # -- internals -------------------------------------------------------------
    def _follow(self, no: int, img: np.ndarray, tr: Track) -> None:
        rect = tr.rect()
        if rect[2] < 0 or rect[3] < 0 or rect[0] > self.w or rect[1] > self.h:
            self._lose(tr)
            return
        tr.lm = self._fit(img, rect)
        tr.ncc = self._ncc(img, tr.lm, tr.template)
        suspect = tr.ncc < NCC_SUSPECT
        if suspect or no - tr.last_verified >= self.verify_every:
            found = self._verify(img, tr)
            if found is not None:
                score, det = found
                self._reset(img, tr, det, score, no)
            else:
                tr.score = FAILED_SCORE
                if suspect or no - tr.last_verified >= self.lost_after:
                    self._lose(tr)

    def _lose(self, tr: Track) -> None:
        self.tracks.remove(tr)
        self.finished.append(tr)

    def _reset(self, img, tr: Track, det, score: float, no: int) -> None:
        # Re-fit from the detector's box only when the tracked box has drifted.
        if boxes.iou(det, tr.rect()) < REFIT_BELOW_IOU or not np.isfinite(tr.lm).all():
            tr.lm = self._fit(img, det)
            tr.rel = self._relation(tr.lm, det)
        tr.template = self._patch(img, tr.lm)
        tr.ncc = 1.0
        # HOG margins fluctuate from frame to frame on a steady face: average
        # the recent ones (a failed verification resets the average).
        tr.score = score if tr.score == FAILED_SCORE else SCORE_EMA * score + (1 - SCORE_EMA) * tr.score
        tr.last_verified = no

    def _search(self, no: int, img: np.ndarray) -> None:
        self._last_search = no
        self.stats["searches"] += 1
        s = self.search_scale
        small = img if s == 1.0 else cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self.detector.run(small, 0, SEARCH_THRESHOLD)
        cands = sorted(zip(scores, rects), key=lambda p: -p[0])
        for score, r in cands:
            if len(self.tracks) >= self.max_faces:
                break
            det = (r.left() / s, r.top() / s, r.right() / s, r.bottom() / s)
            if any(boxes.iou(det, t.rect()) > 0.2 for t in self.tracks):
                continue
            lm = self._fit(img, det)
            tr = Track(
                self._next_id,
                lm,
                self._relation(lm, det),
                self._patch(img, lm),
                float(score),
                no,
                first_frame=no,
            )
            self._next_id += 1
            if self.with_embeddings:
                tr.chip = self._chip(img, lm)
                if tr.chip is not None and no != self.defer_embeddings_on:
                    tr.embedding, tr.chip = describe(tr.chip), None
            self.tracks.append(tr)

    def _verify(self, img: np.ndarray, tr: Track):
        """Best HOG detection near the track, on a crop where the face is ~110 px."""
        self.stats["verifications"] += 1
        x0, y0, x1, y1 = tr.rect()
        side = max(x1 - x0, 1.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        L, T = int(max(0, cx - side)), int(max(0, cy - side))
        R, B = int(min(self.w, cx + side)), int(min(self.h, cy + side))
        if R - L < 8 or B - T < 8:
            return None
        f = VERIFY_FACE_PX / side
        crop = cv2.resize(
            img[T:B, L:R],
            (max(1, round((R - L) * f)), max(1, round((B - T) * f))),
            interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR,
        )
        rects, scores, _ = self.detector.run(crop, 0, -0.6)
        best = None
        for score, r in zip(scores, rects):
            det = (L + r.left() / f, T + r.top() / f, L + r.right() / f, T + r.bottom() / f)
            if boxes.iou(det, (x0, y0, x1, y1)) > 0.3 and (best is None or score > best[0]):
                best = (float(score), det)
        return best

    def _fit(self, img: np.ndarray, rect) -> np.ndarray:
        self.stats["fits"] += 1
        x0, y0, x1, y1 = rect
        side = x1 - x0
        if side >= UPSCALE_BELOW_PX:
            r = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
            shape = self.predictor(img, r)
            return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        # Small face: fit on a crop scaled so the box is FIT_SIZE_PX wide.
        m = 0.25 * side
        L, T = int(max(0, x0 - m)), int(max(0, y0 - m))
        R, B = int(min(self.w, x1 + m + 1)), int(min(self.h, y1 + m + 1))
        if R - L < 2 or B - T < 2:
            return np.full((68, 2), np.nan, np.float32)
        f = FIT_SIZE_PX / max(side, 1.0)
        crop = cv2.resize(
            img[T:B, L:R], (round((R - L) * f), round((B - T) * f)), interpolation=cv2.INTER_LINEAR
        )
        r = dlib.rectangle(
            int(round((x0 - L) * f)),
            int(round((y0 - T) * f)),
            int(round((x1 - L) * f)),
            int(round((y1 - T) * f)),
        )
        shape = self.predictor(crop, r)
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return pts / f + np.array([L, T], np.float32)

    @staticmethod
    def _relation(lm: np.ndarray, rect) -> np.ndarray:
        c, s = _center_scale(lm)
        s = max(s, 1e-3)
        bc = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
        return np.array([*(bc - c) / s, (rect[2] - rect[0]) / 2 / s])

    def _patch(self, img: np.ndarray, lm: np.ndarray) -> np.ndarray:
        inner = lm[17:]
        if not np.isfinite(inner).all():
            return np.zeros(PATCH * PATCH, np.float32)
        x0, y0 = np.floor(inner.min(axis=0)).astype(int)
        x1, y1 = np.ceil(inner.max(axis=0)).astype(int)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.w), min(y1, self.h)
        if x1 - x0 < 4 or y1 - y0 < 4:
            return np.zeros(PATCH * PATCH, np.float32)
        p = cv2.resize(img[y0:y1, x0:x1], (PATCH, PATCH), interpolation=cv2.INTER_AREA)
        p = p.astype(np.float32).ravel()
        p -= p.mean()
        n = np.linalg.norm(p)
        return p / n if n > 0 else p

    def _ncc(self, img, lm, template) -> float:
        return float(self._patch(img, lm) @ template)

    def _chip(self, img: np.ndarray, lm: np.ndarray) -> np.ndarray | None:
        """The face aligned by its landmarks, 150x150 grey: dlib's descriptor input."""
        if not np.isfinite(lm).all():
            return None
        x0, y0 = lm.min(axis=0)
        x1, y1 = lm.max(axis=0)
        m = 0.5 * max(x1 - x0, y1 - y0)
        L, T = int(max(0, x0 - m)), int(max(0, y0 - m))
        R, B = int(min(self.w, x1 + m)), int(min(self.h, y1 + m))
        crop = np.ascontiguousarray(img[T:B, L:R])
        pts = [dlib.point(int(round(x - L)), int(round(y - T))) for x, y in lm]
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, R - L - 1, B - T - 1), pts)
        return dlib.get_face_chip(crop, shape, size=CHIP_PX, padding=CHIP_PADDING)


_describe_lock = threading.Lock()


def describe(chip: np.ndarray) -> np.ndarray:
    """128-D dlib descriptor of a face chip, grey (replicated to RGB) or RGB;
    identical to `compute_face_descriptor(image, landmarks)`, which cuts the
    same chip. Serialised: a dlib network is not safe to run from two
    threads at once."""
    rgb = np.ascontiguousarray(chip if chip.ndim == 3 else np.repeat(chip[:, :, None], 3, axis=2))
    with _describe_lock:
        return np.asarray(models.face_encoder().compute_face_descriptor(rgb), np.float32)
