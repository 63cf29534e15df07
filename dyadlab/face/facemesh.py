"""MediaPipe's face mesh (Kartynnik et al. 2019): 468 points with relative
depth, fitted in a rotated square region of interest (ROI).

As in MediaPipe's face-landmark graphs:
- a ROI from a detection: the box centre, rotated so the eyes (keypoints 0
  and 1) are level, the box's longer side x 1.5;
- a ROI from the previous frame's mesh: rotated by the line through the
  outer eye corners (points 33 and 263), the points' extent along and across
  that line x 1.5 (MediaPipe uses the axis-aligned extent; ours keeps the
  same face size when the head rolls);
- the ROI is cut out with one affine warp to 192x192 (replicated border for
  faces at the image edge), RGB in [0, 1];
- outputs: 468 x (x, y, z) in crop pixels, z with the same scale as x and
  smaller = nearer the camera, centred on the face; and a face-presence
  logit (sigmoid: the probability that a face fills the crop; MediaPipe
  drops a track below 0.5).
Points are returned in image pixels, z scaled like x and y.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dyadlab.face import registry
from dyadlab.face.blazeface import Detection

SIZE = 192
ROI_SCALE = 1.5
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263  # subject's right / left outer eye corner


@dataclasses.dataclass(frozen=True)
class Roi:
    cx: float
    cy: float
    size: float  # side of the square, image pixels
    angle: float  # radians; the crop's x axis is the image's x axis rotated by this

    def to_image(self) -> np.ndarray:
        """2x3 affine: crop pixel (u, v) -> image pixel."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        k = self.size / SIZE
        return np.array(
            [
                [c * k, -s * k, self.cx - (c * k * SIZE / 2) + (s * k * SIZE / 2)],
                [s * k, c * k, self.cy - (s * k * SIZE / 2) - (c * k * SIZE / 2)],
            ]
        )


@dataclasses.dataclass
class Mesh:
    points: np.ndarray  # (468, 3) image pixels; z relative depth, same scale
    presence: float  # face-presence probability
    roi: Roi


def roi_from_detection(det: Detection) -> Roi:
    (x0, y0, x1, y1), kp = det.box, det.keypoints
    d = kp[1] - kp[0]
    angle = float(np.arctan2(d[1], d[0]))
    return Roi(float(x0 + x1) / 2, float(y0 + y1) / 2, float(max(x1 - x0, y1 - y0)) * ROI_SCALE, angle)


def roi_from_points(pts: np.ndarray) -> Roi:
    p = pts[:, :2]
    d = p[LEFT_EYE_OUTER] - p[RIGHT_EYE_OUTER]
    angle = float(np.arctan2(d[1], d[0]))
    c, s = np.cos(angle), np.sin(angle)
    u = p[:, 0] * c + p[:, 1] * s  # along the eye line
    v = -p[:, 0] * s + p[:, 1] * c  # across it
    mu, mv = (u.min() + u.max()) / 2, (v.min() + v.max()) / 2
    side = max(u.max() - u.min(), v.max() - v.min()) * ROI_SCALE
    return Roi(float(mu * c - mv * s), float(mu * s + mv * c), float(side), angle)


def crop(img: np.ndarray, roi: Roi, size: int = SIZE) -> np.ndarray:
    """The ROI as a size x size image (grey or RGB, as the input)."""
    M = roi.to_image()
    if size != SIZE:
        M = M @ np.diag([SIZE / size, SIZE / size, 1.0])
    return cv2.warpAffine(
        img, M, (size, size), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def fit(img: np.ndarray, roi: Roi) -> Mesh:
    """The mesh in one ROI of a grey (H, W) or RGB (H, W, 3) uint8 image."""
    patch = crop(img, roi)
    if patch.ndim == 2:
        patch = cv2.cvtColor(patch, cv2.COLOR_GRAY2RGB)
    x = patch.astype(np.float32) * (1.0 / 255.0)
    raw, flag = registry.tflite("face_mesh").run(x[None])
    p = raw.reshape(468, 3).astype(np.float64)
    M = roi.to_image()
    out = np.empty_like(p)
    out[:, :2] = p[:, :2] @ M[:, :2].T + M[:, 2]
    out[:, 2] = p[:, 2] * (roi.size / SIZE)
    presence = float(1.0 / (1.0 + np.exp(-float(flag.reshape(-1)[0]))))
    return Mesh(out.astype(np.float32), presence, roi)
