"""Test helpers for synth serving: a model file in train.export's format made
from freshly initialised (seeded) networks, and a synthetic aligned face.

make_model_file(path, size=64, seed=0) -> path
synthetic_face(size=64, seed=0) -> (crop uint8 (S, S, 3), landmarks (68, 2) crop px)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from services.synth import landmarks as L
from services.synth import solver as S

MODEL_FORMAT = 1


def model_bytes(size: int = 64, seed: int = 0, **config) -> bytes:
    """The bytes of a model file: {"format", "config", "G_l", "G_i", "judge"}."""
    cfg = S.Config(size=size, seed=seed, **config)
    torch.manual_seed(seed)
    nets = {
        "G_l": S.build("landmark", cfg)["G"],
        "G_i": S.build("image", cfg)["G"],
        "judge": S.build("judge", cfg)["J"],
    }
    bio = io.BytesIO()
    torch.save(
        {"format": MODEL_FORMAT, "config": cfg.to_dict(), **{k: m.state_dict() for k, m in nets.items()}}, bio
    )
    return bio.getvalue()


def make_model_file(path: str | os.PathLike, size: int = 64, seed: int = 0, **config) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_bytes(size, seed, **config))
    return path


def template_points(size: int = 64) -> np.ndarray:
    """A plausible frontal iBUG-68 layout in an aligned size x size crop (float32 (68, 2))."""
    u = np.zeros((68, 2))
    t = np.linspace(np.pi, 0, 17)  # jaw: a half ellipse
    u[0:17] = np.stack([0.5 + 0.36 * np.cos(t), 0.42 + 0.50 * np.sin(t)], 1)
    u[17:22] = np.stack([np.linspace(0.22, 0.44, 5), [0.24, 0.21, 0.20, 0.21, 0.23]], 1)
    u[22:27] = np.stack([np.linspace(0.56, 0.78, 5), [0.23, 0.21, 0.20, 0.21, 0.24]], 1)
    u[27:31] = np.stack([np.full(4, 0.5), np.linspace(0.32, 0.52, 4)], 1)
    u[31:36] = np.stack([np.linspace(0.43, 0.57, 5), [0.56, 0.57, 0.58, 0.57, 0.56]], 1)
    for start, cx in ((36, 0.34), (42, 0.66)):  # eyes: 6-point ellipses
        a = np.linspace(np.pi, -np.pi, 7)[:6]
        u[start : start + 6] = np.stack([cx + 0.07 * np.cos(a), 0.30 - 0.025 * np.sin(a)], 1)
    a = np.linspace(np.pi, -np.pi, 13)[:12]  # outer lips
    u[48:60] = np.stack([0.5 + 0.14 * np.cos(a), 0.72 - 0.05 * np.sin(a)], 1)
    a = np.linspace(np.pi, -np.pi, 9)[:8]  # inner lips
    u[60:68] = np.stack([0.5 + 0.09 * np.cos(a), 0.72 - 0.02 * np.sin(a)], 1)
    return (u * size - 0.5).astype(np.float32)


def synthetic_face(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A skin-toned face-like crop with the template landmarks, slightly jittered."""
    rng = np.random.default_rng(seed)
    pts = template_points(size) + rng.normal(0, size / 200, (68, 2)).astype(np.float32)
    img = np.full((size, size, 3), (70, 90, 120), np.uint8)
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    cv2.fillConvexPoly(img, hull, (int(rng.integers(170, 230)), 160, 130))
    img = cv2.polylines(
        img,
        [
            np.round(pts[i:j]).astype(np.int32).reshape(-1, 1, 2)
            for i, j in ((17, 22), (22, 27), (36, 42), (42, 48), (48, 60))
        ],
        False,
        (60, 40, 30),
        1,
        cv2.LINE_AA,
    )
    noise = rng.integers(-8, 9, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8), pts


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def to_vector(pts: np.ndarray) -> list[float]:
    return [float(v) for v in L.to_vector(pts)]
