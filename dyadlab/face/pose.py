"""Head pose from 2D landmarks, in OpenFace's conventions.

A generic rigid 3D face (six points: nose tip 30, chin 8, outer eye corners
36/45, lip corners 48/54; the widely used model of Mallick, LearnOpenCV 2016,
scaled to millimetres so the outer eye corners are 90 mm apart) is fitted to
the 2D landmarks with OpenCV's solvePnP. Camera intrinsics follow OpenFace's
defaults when none are known: fx = fy = 500 * (w/640 + h/480) / 2, principal
point at the image centre.

Output: pose_Tx, pose_Ty, pose_Tz (mm, camera coordinates: x right, y down,
z away from the camera) and pose_Rx (pitch), pose_Ry (yaw), pose_Rz (roll) in
radians, Euler angles of R = Rx·Ry·Rz as OpenFace writes them. A frontal face
looking into the camera has Rx ≈ Ry ≈ Rz ≈ 0.
"""

from __future__ import annotations

import cv2
import numpy as np

POSE_POINTS = [30, 8, 36, 45, 48, 54]
# LearnOpenCV's model has y up and z towards the viewer; flip both into
# OpenCV/OpenFace camera axes, then scale (its eye corners are 450 units apart).
_MODEL = (
    np.array(
        [
            (0.0, 0.0, 0.0),  # nose tip
            (0.0, -330.0, -65.0),  # chin
            (-225.0, 170.0, -135.0),  # subject's right eye, outer corner (36)
            (225.0, 170.0, -135.0),  # subject's left eye, outer corner (45)
            (-150.0, -150.0, -125.0),  # right lip corner (48)
            (150.0, -150.0, -125.0),  # left lip corner (54)
        ]
    )
    * np.array([1.0, -1.0, -1.0])
    * (90.0 / 450.0)
)


def camera_matrix(width: int, height: int) -> np.ndarray:
    f = 500.0 * (width / 640.0 + height / 480.0) / 2.0
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1.0]])


def euler_xyz(R: np.ndarray) -> tuple[float, float, float]:
    """Angles (rx, ry, rz) with R = Rx(rx) @ Ry(ry) @ Rz(rz) (OpenFace's RotationMatrix2Euler)."""
    ry = float(np.arcsin(np.clip(R[0, 2], -1.0, 1.0)))
    rx = float(np.arctan2(-R[1, 2], R[2, 2]))
    rz = float(np.arctan2(-R[0, 1], R[0, 0]))
    return rx, ry, rz


class PoseEstimator:
    """Per-face pose with the previous solution as the starting guess (stable, fast)."""

    def __init__(self, width: int, height: int):
        self.K = camera_matrix(width, height)
        self.dist = np.zeros(4)
        self._guess: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, key: int, landmarks: np.ndarray) -> np.ndarray:
        """[Tx, Ty, Tz, Rx, Ry, Rz] for one face's (68, 2) landmarks."""
        img = np.ascontiguousarray(landmarks[POSE_POINTS], dtype=np.float64)
        guess = self._guess.get(key)
        if guess is None:  # a first estimate, refined below like a tracked face's
            ok, rvec, tvec = cv2.solvePnP(_MODEL, img, self.K, self.dist, flags=cv2.SOLVEPNP_EPNP)
        else:
            ok, rvec, tvec = True, guess[0].copy(), guess[1].copy()
        if ok:
            ok, rvec, tvec = cv2.solvePnP(
                _MODEL,
                img,
                self.K,
                self.dist,
                rvec,
                tvec,
                useExtrinsicGuess=True,
                flags=cv2.SOLVEPNP_ITERATIVE,
            )
        if not ok or tvec[2, 0] <= 0:
            self._guess.pop(key, None)
            return np.full(6, np.nan)
        self._guess[key] = (rvec, tvec)
        R, _ = cv2.Rodrigues(rvec)
        return np.array([*tvec[:, 0], *euler_xyz(R)])


#: Outer-eye-corner distance (exocanthion to exocanthion, Farkas' adult
#: norms ~88-91 mm) that sets the millimetre scale of mesh faces. Infants'
#: is ~65-70 mm, so their depth (pose_Tz, Z_*) reads ~30 % too far.
EYE_CORNERS_MM = 90.0


class MeshPose:
    """Head pose and OpenFace's 3D landmarks (X_*, Y_*, Z_*, mm, camera
    coordinates) from a face mesh (468 points: image pixels + depth in
    pixels, weak perspective).

    Rotation: the least-squares rotation (Kabsch, with scale) that carries
    the canonical frontal mesh (`assets/canonical_mesh.npy`, derived by
    scripts/derive_mesh_tables.py, eye corners one unit apart) onto the
    centred mesh, as Euler angles R = Rx·Ry·Rz (OpenFace's convention).
    Scale s (pixels per canonical unit) gives millimetres per pixel at the
    face, m = EYE_CORNERS_MM / s, and its depth Tz = f·m (the camera of
    `camera_matrix`); Tx, Ty = the mesh centroid's offset from the
    principal point x m. A landmark with depth z (pixels, relative to the
    centroid) lies at Z = Tz + z·m, X = (x − cx)·Z/f, Y = (y − cy)·Z/f.
    """

    def __init__(self, width: int, height: int):
        from dyadlab.face.registry import ASSETS

        self.K = camera_matrix(width, height)
        self.canon = np.load(ASSETS / "canonical_mesh.npy").astype(np.float64)
        self.canon -= self.canon.mean(axis=0)

    def __call__(self, points: np.ndarray, lm68_3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pose [Tx, Ty, Tz, Rx, Ry, Rz], (68, 3) landmarks in mm)."""
        P = np.asarray(points, np.float64)
        c = P.mean(axis=0)
        Q = P - c
        H = self.canon.T @ Q
        U, S, Vt = np.linalg.svd(H)
        d = np.sign(np.linalg.det(Vt.T @ U.T))
        D = np.diag([1.0, 1.0, d])
        R = Vt.T @ D @ U.T
        s = float((S * np.diag(D)).sum() / (self.canon**2).sum())
        if not np.isfinite(s) or s <= 0:
            return np.full(6, np.nan), np.full((68, 3), np.nan)
        f, cx, cy = self.K[0, 0], self.K[0, 2], self.K[1, 2]
        m = EYE_CORNERS_MM / s
        Tz = f * m
        pose = np.array([(c[0] - cx) * m, (c[1] - cy) * m, Tz, *euler_xyz(R)])
        L = np.asarray(lm68_3d, np.float64)
        Z = Tz + (L[:, 2] - c[2]) * m
        X = (L[:, 0] - cx) * Z / f
        Y = (L[:, 1] - cy) * Z / f
        return pose, np.stack([X, Y, Z], axis=1)
