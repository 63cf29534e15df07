"""BlazeFace face detection (Bazarevsky et al. 2019), MediaPipe's models run with LiteRT.

The image is letterboxed (aspect kept, zero padding) to the model's square
input, scaled to [-1, 1]. The model regresses, for each SSD anchor, a box
(centre offset, width, height) and six keypoints (subject's right eye, left
eye, nose tip, mouth centre, right and left ear tragion), in input pixels
relative to the anchor centre, and a logit. Decoding follows MediaPipe's
`face_detection_short_range` / `face_detection_full_range` graphs:

- anchors (`SsdAnchorsCalculator`, fixed anchor size, so only centres matter):
  short range: strides 8, 16, 16, 16 on 128x128 -> a 16x16 grid with 2
  anchors per cell and an 8x8 grid with 6 (896); full range: stride 4 on
  192x192 -> 48x48 x 1 (2,304);
- score = sigmoid(clip(logit, -100, 100)), kept above `min_score`
  (MediaPipe: 0.5 short range, 0.6 full range);
- weighted non-maximum suppression, IoU 0.3: overlapping boxes are averaged,
  weighted by score (steadier boxes than plain NMS).
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from dyadlab.face import registry

KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")


@dataclasses.dataclass(frozen=True)
class Spec:
    model: str
    size: int
    strides: tuple[int, ...]
    anchors_per_layer: int
    min_score: float


SHORT = Spec("blazeface_short", 128, (8, 16, 16, 16), 2, 0.5)
FULL = Spec("blazeface_full", 192, (4,), 1, 0.6)
NMS_IOU = 0.3


@dataclasses.dataclass(eq=False)
class Detection:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in image pixels
    keypoints: np.ndarray  # (6, 2) image pixels, in KEYPOINTS order
    score: float

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@functools.cache
def anchors(spec: Spec) -> np.ndarray:
    """(n, 2) anchor centres in [0, 1], MediaPipe's order (layers of equal
    stride share one grid; per cell, every anchor of those layers)."""
    out = []
    i = 0
    while i < len(spec.strides):
        stride = spec.strides[i]
        j = i
        while j < len(spec.strides) and spec.strides[j] == stride:
            j += 1
        per_cell = (j - i) * spec.anchors_per_layer
        g = int(np.ceil(spec.size / stride))
        ys, xs = np.mgrid[0:g, 0:g]
        c = np.stack([(xs + 0.5) / g, (ys + 0.5) / g], axis=-1).reshape(-1, 1, 2)
        out.append(np.repeat(c, per_cell, axis=1).reshape(-1, 2))
        i = j
    return np.concatenate(out).astype(np.float32)


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """(size x size x 3 float input in [-1, 1], scale, pad_x, pad_y)."""
    h, w = img.shape[:2]
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[py : py + nh, px : px + nw] = small.astype(np.float32) * (2.0 / 255.0) - 1.0
    return canvas, s, float(px), float(py)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (n, 4)."""
    x0 = np.maximum(a[0], b[:, 0])
    y0 = np.maximum(a[1], b[:, 1])
    x1 = np.minimum(a[2], b[:, 2])
    y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(ua > 0, inter / np.maximum(ua, 1e-12), 0.0)


def weighted_nms(
    boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    order = np.argsort(-scores)
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    alive = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > iou)
        group[i] = True
        w = scores[group][:, None]
        box = (boxes[group] * w).sum(0) / w.sum()
        kp = (kps[group] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kp, float(scores[i])))
        alive &= ~group
    return out


def detect(img: np.ndarray, spec: Spec = SHORT, min_score: float | None = None) -> list[Detection]:
    """Faces in an image (grey or RGB uint8), best first."""
    x, s, px, py = letterbox(img, spec.size)
    raw, logits = registry.tflite(spec.model).run(x[None])
    raw = raw.reshape(-1, 16)
    score = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    keep = score >= (spec.min_score if min_score is None else min_score)
    if not keep.any():
        return []
    a = anchors(spec)[keep] * spec.size
    r = raw[keep]
    cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
    bw, bh = r[:, 2], r[:, 3]
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
    out = []
    for box, kp, sc in weighted_nms(boxes, kps, score[keep]):
        box = (box - [px, py, px, py]) / s
        kp = (kp - [px, py]) / s
        out.append(Detection(box.astype(np.float32), kp.astype(np.float32), sc))
    return out
