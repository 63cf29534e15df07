"""Face boxes (x0, y0, x1, y1), image pixels: overlap and distance, shared by
the trackers and the extractor's identity join."""

from __future__ import annotations

import numpy as np


def iou(a, b) -> float:
    """Intersection over union of two boxes."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def size(box) -> float:
    """The box's longer side (at least 1e-6)."""
    return float(max(box[2] - box[0], box[3] - box[1], 1e-6))


def centre(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float64)


def distance(a, b, unit: float | None = None) -> float:
    """Distance of the boxes' centres in units of `unit` (default: b's size)."""
    return float(np.linalg.norm(centre(a) - centre(b)) / (unit or size(b)))
