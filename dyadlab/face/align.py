"""Aligned face crops for the appearance model: one similarity transform
(rotation, scale, shift; no shear) puts the eye centres and the mouth centre
of the 68 iBUG points at fixed places of a square crop.

The same function cuts the training crops (still images) and the video
crops (extractor), so the model sees faces framed the same way.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Template positions in a unit square: right eye, left eye (subject's), mouth centre.
TEMPLATE = np.array([[0.32, 0.36], [0.68, 0.36], [0.50, 0.76]], np.float64)
SIZE = 64


def anchors(lm68: np.ndarray) -> np.ndarray:
    """(3, 2): centres of the subject's right eye (36-41), left eye (42-47), mouth (48-67)."""
    lm = np.asarray(lm68, np.float64)[:, :2]
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[48:68].mean(0)])


def transform(lm68: np.ndarray, size: int = SIZE, margin: float = 0.0) -> np.ndarray | None:
    """2x3 image -> crop affine, or None for degenerate points. `margin`
    widens the crop by that fraction on every side (for augmentation)."""
    src = anchors(lm68)
    if not np.isfinite(src).all():
        return None
    dst = (TEMPLATE + margin) / (1 + 2 * margin) * size
    return similarity(src, dst)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """Least-squares similarity (Umeyama 1991) taking points src to dst, 2x3."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    var = (a**2).sum()
    if var <= 1e-12:
        return None
    # For 2D, the optimal similarity is x -> [[c, -s], [s, c]] x + t.
    c = (a * b).sum() / var
    s = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum() / var
    R = np.array([[c, -s], [s, c]])
    return np.hstack([R, (md - R @ ms)[:, None]])


def crop(img: np.ndarray, lm68: np.ndarray, size: int = SIZE, margin: float = 0.0) -> np.ndarray | None:
    """size x size grey uint8 face crop (RGB input is converted after cutting)."""
    M = transform(lm68, size, margin)
    if M is None:
        return None
    out = cv2.warpAffine(img, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if out.ndim == 3:
        out = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
    return out
