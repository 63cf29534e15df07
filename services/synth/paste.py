"""Paste a generated face crop back into the photo or frame it came from.

The image converter works on an aligned S x S crop (`landmarks.align`, the
similarity M from image pixels to crop pixels). What it returns is GANimation's
pair: the colour C it drew and its attention A (1 = keep the input). In the
crop its output is ``A * x + (1 - A) * C``. Pasting back does the same blend
at the image's own resolution:

    out = image * (1 - m) + C' * m,     m = W(f * (1 - A)),  C' = W(C)

where W warps a crop-space map into the image through M's inverse (bilinear)
and f is the feather (`feather`): 1 over the face (the convex hull of its input
and target landmarks, widened by `HULL_GROW`), falling smoothly to 0 over
`FEATHER_SIGMA` of the side (Gaussian), and forced to 0 at the crop's own
border, so no seam shows where the crop ends. Wherever the mask keeps the
input, the original pixel survives untouched at full resolution: only what
the expression changed is redrawn, at the crop's resolution.

Colour (`colour.py`): the Synthesizer hands over a luma to paste (the luma of
C, or the crop's own luma moved by what the target changes in C: the model's
`paste_colour`, see generate.py), which replaces only
the image's luma (BT.601 YCrCb); the image's own chroma is kept, so colour in
is colour out and grey stays grey. An RGB C given directly replaces RGB.
A model without a mask (A = None) is treated as A = 0: the feathered face
hull is replaced.

Only the image's region under the crop is touched (`footprint`), so a face in
a large photo costs what the face costs.
"""

from __future__ import annotations

import cv2
import numpy as np

from services.synth import landmarks as L
from services.synth.colour import LUMA

HULL_GROW = 1.12  # the landmarks' hull, scaled about its centroid (covers brows to jaw edges)
FEATHER_SIGMA = 0.03  # of the crop side
EDGE = 0.04  # of the crop side: the feather is 0 this close to the crop's border


def feather(size: int, *point_sets: np.ndarray) -> np.ndarray:
    """(size, size) float32 in [0, 1]: 1 over the grown convex hull of the
    given (68, 2) crop-pixel landmark sets, Gaussian-feathered, 0 at the crop edge."""
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in point_sets])
    c = pts.mean(axis=0)
    hull = cv2.convexHull(((pts - c) * HULL_GROW + c).astype(np.float32)).reshape(-1, 2)
    hull_image = np.zeros((size, size), np.float32)
    shift = 4
    cv2.fillConvexPoly(hull_image, np.round(hull * (1 << shift)).astype(np.int32), 1.0, cv2.LINE_AA, shift)
    return _soften(hull_image, size)


#: the regions an expression moves (0-based iBUG-68 indices) and how far each
#: hull is grown about its centroid: the mouth's to the cheeks and nasolabial
#: folds a smile raises, the eyes' to the brows above them
REGIONS: dict[str, tuple[tuple[int, ...], float]] = {
    "mouth": (tuple(range(48, 68)) + (31, 35), 1.6),
    "right_eye": (tuple(range(17, 22)) + tuple(range(36, 42)), 1.35),
    "left_eye": (tuple(range(22, 27)) + tuple(range(42, 48)), 1.35),
}
PASTE_MASKS = ("face", "regions")


def region_feather(size: int, *point_sets: np.ndarray) -> np.ndarray:
    """Like `feather`, over the expression regions only (`REGIONS`: mouth with
    cheeks, each eye with its brow; input and target points): a geometric
    attention, for generators without a learned one."""
    pts = [np.asarray(p, np.float64).reshape(-1, 2) for p in point_sets]
    img = np.zeros((size, size), np.float32)
    shift = 4
    for idx, grow in REGIONS.values():
        q = np.concatenate([p[list(idx)] for p in pts])
        c = q.mean(axis=0)
        hull = cv2.convexHull(((q - c) * grow + c).astype(np.float32)).reshape(-1, 2)
        cv2.fillConvexPoly(img, np.round(hull * (1 << shift)).astype(np.int32), 1.0, cv2.LINE_AA, shift)
    return _soften(img, size)


def _soften(hull_image: np.ndarray, size: int) -> np.ndarray:
    """Gaussian edge of FEATHER_SIGMA, clipped to [0, 1], zero at the crop border."""
    sigma = max(0.5, FEATHER_SIGMA * size)
    f = cv2.GaussianBlur(hull_image, (0, 0), sigma)
    ramp = np.clip((np.arange(size) - EDGE * size) / (2 * sigma), 0, 1)
    ramp = np.minimum(ramp, ramp[::-1]).astype(np.float32)
    return np.clip(f, 0, 1) * np.minimum(ramp[:, None], ramp[None, :])


def footprint(M: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """The image rectangle (x0, y0, x1, y1), end-exclusive, that the crop
    covers (its corners through M's inverse, one pixel of margin), clipped
    to the image; None when it misses the image."""
    inv = L.invert(M)
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    q = corners @ inv[:, :2].T + inv[:, 2]
    h, w = shape[:2]
    x0, y0 = max(0, int(np.floor(q[:, 0].min())) - 1), max(0, int(np.floor(q[:, 1].min())) - 1)
    x1, y1 = min(w, int(np.ceil(q[:, 0].max())) + 2), min(h, int(np.ceil(q[:, 1].max())) + 2)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def _to_region(crop_map: np.ndarray, M: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A crop-space map warped into the image rectangle `box` (0 outside the crop)."""
    x0, y0, x1, y1 = box
    # region pixel q -> image pixel q + (x0, y0) -> crop pixel M (q + (x0, y0))
    M_box = np.hstack([M[:, :2], (M[:, :2] @ np.array([x0, y0], np.float64) + M[:, 2])[:, None]])
    return cv2.warpAffine(
        np.ascontiguousarray(crop_map, np.float32),
        M_box,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def change_mask(attention: np.ndarray | None, f: np.ndarray) -> np.ndarray:
    """m in crop space: f * (1 - A) (A None: f)."""
    if attention is None:
        return f
    return f * (1.0 - np.asarray(attention, np.float32))


def paste_back(image: np.ndarray, M: np.ndarray, colour: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The image with the generated face blended in (module docstring).

    image (H, W, 3) uint8 RGB; M the 2x3 image -> crop similarity; colour
    the generator's C in [0, 255], (S, S) luma or (S, S, 3) RGB; change the
    crop-space blend weight m (`change_mask`), (S, S) in [0, 1]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    size = int(change.shape[0])
    box = footprint(M, size, img.shape)
    out = img.copy()
    if box is None:
        return out
    x0, y0, x1, y1 = box
    m = _to_region(change, M, box)[..., None]
    region = img[y0:y1, x0:x1].astype(np.float32)
    if np.asarray(colour).ndim == 2:
        # luma: Y' = Y (1 - m) + C' m with the chroma kept. YCrCb is linear in
        # RGB with Y's weights summing to 1, so that is each of R, G, B moved
        # by m (C' - Y): exact, and an untouched pixel (m = 0) stays bit-identical.
        y = region @ np.array(LUMA, np.float32)
        region += m * (_to_region(colour, M, box) - y)[..., None]
    else:
        rgb = np.stack([_to_region(colour[..., k], M, box) for k in range(3)], axis=-1)
        region += m * (rgb - region)
    out[y0:y1, x0:x1] = np.clip(np.rint(region), 0, 255).astype(np.uint8)
    return out


def image_points(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """(68, 2) crop-pixel landmarks -> the image's pixels (M's inverse)."""
    return L.transform_points(points, L.invert(M))


def weight_image(M: np.ndarray, change: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The blend weight m at the image's size, (H, W) uint8 (255: all redrawn)."""
    h, w = shape[:2]
    m = _to_region(change, M, (0, 0, w, h))
    return np.clip(np.rint(m * 255), 0, 255).astype(np.uint8)


def blend_weight(
    attention: np.ndarray | None, crop_landmarks, target, size: int, paste_mask: str
) -> np.ndarray:
    """m in crop space: where the face may change (`paste_mask`: "face", the
    whole face hull; "regions", the expression regions), times the learned
    attention's 1 - A when the generator has one."""
    if paste_mask == "face":
        where = feather(size, crop_landmarks, target)
    elif paste_mask == "regions":
        where = region_feather(size, crop_landmarks, target)
    else:
        raise ValueError(f"paste_mask must be one of {PASTE_MASKS}, got {paste_mask!r}")
    return change_mask(attention, where)


def paste_generated(photo: np.ndarray, M: np.ndarray, out: dict):
    """A synth prediction (`backend.Model.transform`'s dict: the luma to paste as
    "colour" and the blend weight m as "mask") pasted into the photo its crop
    came from. -> (the photo with the new expression, m)."""
    change = np.asarray(out["mask"], np.float32)
    return paste_back(photo, M, out["colour"], change), change
