"""Landmark geometry for synth: face alignment, normalisation, mirroring, drawing.

Numpy + OpenCV only, so serving (TorchServe handler, transfer) can import it
without the dataset code.

Conventions (shared with ``model.py`` / ``losses.py``):

* 0-based iBUG-68 points; a landmark *vector* is 136 floats laid out like
  OpenFace's columns, ``[x_0 .. x_67, y_0 .. y_67]``.
* Pixel coordinates have the centre of pixel (i, j) at (j, i) (dlib's and
  OpenCV's convention), so a horizontal flip of a W-wide image maps x to
  W - 1 - x.

Alignment (`alignment_matrix`, `align_face`): a similarity transform
(rotation, uniform scale, translation) that

* makes the eyes horizontal: the line through the two eye centres (means of
  points 36-41 and 42-47) becomes horizontal;
* scales the face so its reference length d is `IOD_FRACTION` (0.32) of the
  crop side, where d = max(IOD, EM / EM_PER_IOD): IOD = distance between the
  eye centres, EM = distance from their midpoint to the mid-point of the mouth
  corners (48, 54), EM_PER_IOD = 1.04 its median on frontal faces of the
  expression set. Frontal faces are thus scaled by their IOD; a face turned
  sideways (IOD foreshortened while EM is not) by EM, so it does not blow up;
* puts the eye midpoint at x = (size - 1) / 2, y = `EYE_Y` (0.30) of the side.

At 0.32 IOD per side the whole 68-point face (brows at ~0.18, chin at ~0.94
of the side, jaw from ~0.13 to ~0.87) fits with a small margin; regions
outside the source image are filled by replicating its border.

Normalisation (`normalise_landmarks`): the 68 points (crop pixels) minus their
centroid, divided by their RMS radius sqrt(mean_i |p_i - c|^2), then laid out
as a 136-vector: zero mean, unit RMS radius, independent of crop size.
`denormalise` maps back with a given centre and radius, by default the
canonical ones of aligned crops (`CANON_CENTER`, `CANON_RMS`, fractions of the
side measured on the expression set), so generated landmarks can be drawn
without a source face.
"""

from __future__ import annotations

import cv2
import numpy as np

N_POINTS = 68
IOD_FRACTION = 0.32  # eye-centre distance / crop side (frontal faces)
EYE_Y = 0.30  # eye midpoint height / crop side
EM_PER_IOD = 1.04  # median eye-midpoint-to-mouth-corners distance / IOD
# Median centroid (x, y) and RMS radius of the 68 points in aligned crops, as
# fractions of the crop side (measured on the expression set's found faces).
CANON_CENTER = (0.5, 0.508)
CANON_RMS = 0.287

# Horizontal mirror of the iBUG-68 scheme: MIRROR[i] is the point that lands
# where point i was (and vice versa) when the face is flipped left/right.
_PAIRS = (
    [(i, 16 - i) for i in range(8)]  # jaw
    + [(17 + i, 26 - i) for i in range(5)]  # brows
    + [(31, 35), (32, 34)]  # nostrils
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    + [(60, 64), (61, 63), (65, 67)]
)  # inner lips
MIRROR = np.arange(N_POINTS)
for _a, _b in _PAIRS:
    MIRROR[_a], MIRROR[_b] = _b, _a
MIRROR.setflags(write=False)

# Polylines drawn by `draw_landmarks`: (indices, closed).
CONTOURS = (
    (range(0, 17), False),  # jaw
    (range(17, 22), False),  # right brow
    (range(22, 27), False),  # left brow
    (range(27, 31), False),  # nose bridge
    (range(31, 36), False),  # nostrils
    (range(36, 42), True),  # right eye
    (range(42, 48), True),  # left eye
    (range(48, 60), True),  # outer lips
    (range(60, 68), True),  # inner lips
)


# -- layouts ----------------------------------------------------------------------
def to_vector(points: np.ndarray) -> np.ndarray:
    """(..., 68, 2) -> (..., 136) ``[x_0..x_67, y_0..y_67]``."""
    p = np.asarray(points)
    return np.concatenate([p[..., 0], p[..., 1]], axis=-1)


def to_points(vector: np.ndarray) -> np.ndarray:
    """(..., 136) ``[x_0..x_67, y_0..y_67]`` -> (..., 68, 2)."""
    v = np.asarray(vector)
    if v.shape[-1] != 2 * N_POINTS:
        raise ValueError(f"expected 136 landmark coordinates, got shape {v.shape}")
    return np.stack([v[..., :N_POINTS], v[..., N_POINTS:]], axis=-1)


def _points(lm) -> np.ndarray:
    p = np.asarray(lm, dtype=np.float64)
    if p.shape[-1] == 2 * N_POINTS and p.shape[-2:] != (N_POINTS, 2):
        p = to_points(p)
    if p.shape[-2:] != (N_POINTS, 2):
        raise ValueError(f"expected (68, 2) points or a 136-vector, got shape {p.shape}")
    return p


# -- alignment ----------------------------------------------------------------------
def alignment_matrix(points: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity transform from image pixels to the aligned size x size crop."""
    p = _points(points)
    right_eye, left_eye = p[36:42].mean(axis=0), p[42:48].mean(axis=0)  # subject's right = image left
    eye_mid = (right_eye + left_eye) / 2
    eye_vec = left_eye - right_eye
    iod = float(np.hypot(*eye_vec))
    em = float(np.hypot(*((p[48] + p[54]) / 2 - eye_mid)))
    d = max(iod, em / EM_PER_IOD)
    if not np.isfinite(d) or d <= 0:
        raise ValueError("degenerate landmarks: cannot align")
    angle = np.arctan2(eye_vec[1], eye_vec[0])
    s = IOD_FRACTION * size / d
    c, si = s * np.cos(-angle), s * np.sin(-angle)
    A = np.array([[c, -si], [si, c]])
    target = np.array([(size - 1) / 2.0, EYE_Y * size - 0.5])
    t = target - A @ eye_mid
    return np.hstack([A, t[:, None]])


def transform_points(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    p = _points(points)
    return p @ M[:, :2].T + M[:, 2]


def align(image: np.ndarray, points: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop (size, size, 3) uint8 RGB, landmarks (68, 2) float32 crop
    pixels, M): `align_face` plus the 2x3 similarity M from the *given*
    image's pixels to the crop's (what `paste.paste_back` inverts)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    pts = _points(points)
    M = alignment_matrix(pts, size)
    M_image = M
    # Shrinking a lot: area-average first so the warp does not alias.
    s = float(np.hypot(M[0, 0], M[1, 0]))
    if s < 0.5:
        h, w = img.shape[:2]
        nw, nh = max(1, round(w * 2 * s)), max(1, round(h * 2 * s))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        fx, fy = nw / w, nh / h
        pts = np.stack([(pts[:, 0] + 0.5) * fx - 0.5, (pts[:, 1] + 0.5) * fy - 0.5], axis=1)
        M = alignment_matrix(pts, size)
        M_image = on_resized(M, 1 / fx, 1 / fy)  # the same map from the original pixels
    lm = transform_points(pts, M)
    crop = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if crop.ndim == 2:
        crop = np.repeat(crop[:, :, None], 3, axis=2)
    elif crop.shape[2] == 4:
        crop = crop[:, :, :3]
    return np.ascontiguousarray(crop, dtype=np.uint8), lm.astype(np.float32), M_image


def align_face(image: np.ndarray, points: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 RGB crop (grey input replicated) and the (68, 2)
    float32 landmarks in crop pixels."""
    crop, lm, _ = align(image, points, size)
    return crop, lm


def on_resized(M: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """The 2x3 map M, for the image resized by (fx, fy): M'(q) = M(p) where
    q = (p + 0.5) f - 0.5 (pixel centres, as cv2.resize maps them)."""
    A = np.asarray(M, np.float64)[:, :2] / np.array([fx, fy])
    t = np.asarray(M, np.float64)[:, :2] @ np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5]) + M[:, 2]
    return np.hstack([A, t[:, None]])


def invert(M: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine map (crop pixels -> image pixels)."""
    return cv2.invertAffineTransform(np.asarray(M, np.float64))


# -- normalisation ---------------------------------------------------------------------
def normalise_landmarks(points, return_params: bool = False):
    """(68, 2) points or a 136-vector -> 136-vector with zero mean and unit RMS
    radius (float32); with `return_params`, also (centre (2,), rms radius)."""
    p = _points(points)
    c = p.mean(axis=0)
    r = float(np.sqrt(((p - c) ** 2).sum(axis=1).mean()))
    if not np.isfinite(r) or r <= 0:
        raise ValueError("degenerate landmarks: zero spread")
    v = to_vector((p - c) / r).astype(np.float32)
    return (v, c.astype(np.float32), r) if return_params else v


def denormalise(lm136, size: int, center=None, scale: float | None = None) -> np.ndarray:
    """Normalised 136-vector -> (68, 2) crop pixels. `center` (pixels) and
    `scale` (RMS radius, pixels) default to the canonical aligned face."""
    p = to_points(np.asarray(lm136, dtype=np.float64))
    if center is None:
        center = (CANON_CENTER[0] * size - 0.5, CANON_CENTER[1] * size - 0.5)
    if scale is None:
        scale = CANON_RMS * size
    return p * float(scale) + np.asarray(center, dtype=np.float64)


def flip_normalised(lm136) -> np.ndarray:
    """Landmarks of the horizontally mirrored face, in normalised coordinates:
    x -> -x, then each point takes its mirror partner's place (MIRROR)."""
    p = to_points(np.asarray(lm136, dtype=np.float32)).copy()
    p[..., 0] *= -1
    return to_vector(p[..., MIRROR, :])


def flip_points(points: np.ndarray, width: int) -> np.ndarray:
    """(68, 2) pixel landmarks of the image flipped left/right (x -> W-1-x, mirrored indices)."""
    p = _points(points).copy()
    p[..., 0] = width - 1 - p[..., 0]
    return p[..., MIRROR, :]


# -- drawing ------------------------------------------------------------------------------
_SHIFT = 4  # sub-pixel drawing precision: 1/16 px


def draw_points(points: np.ndarray, size: int, lines: bool = True) -> np.ndarray:
    """(68, 2) crop pixel landmarks drawn black on a white (size, size) uint8 image."""
    p = _points(points)
    if not np.isfinite(p).all():
        raise ValueError("landmarks contain NaN or infinity")
    img = np.full((size, size), 255, np.uint8)
    q = np.round(p * (1 << _SHIFT)).astype(np.int64)
    q = np.clip(q, -(1 << 20), 1 << 20).astype(np.int32)
    if lines:
        for idx, closed in CONTOURS:
            cv2.polylines(img, [q[list(idx)].reshape(-1, 1, 2)], closed, 0, 1, cv2.LINE_AA, _SHIFT)
    for x, y in q:
        cv2.circle(img, (int(x), int(y)), 0, 0, -1, cv2.LINE_8, _SHIFT)
    return img


def draw_landmarks(
    lm136, size: int = 64, center=None, scale: float | None = None, lines: bool = True
) -> np.ndarray:
    """The image converter's landmark input: normalised landmarks (136-vector)
    placed in a size x size crop (`denormalise`: canonical face position and
    size unless `center` / `scale` are given), drawn as dark contours (jaw,
    brows, nose, eyes, lips; `lines=False`: the 68 points only) on a white
    single-channel uint8 image."""
    return draw_points(denormalise(lm136, size, center, scale), size, lines)
