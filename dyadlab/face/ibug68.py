"""The face mesh's 468 points -> the 68 iBUG points of OpenFace's columns.

Each iBUG point is a fixed convex combination of at most six mesh vertices,
derived from data by `scripts/derive_ibug68.py` (pairs of dlib 68-point fits
and meshes on frontal faces; non-negative least squares per point; method
and agreement in docs/methods.md) and stored in
`assets/ibug68_from_mesh.json`. The same weights applied to the mesh's depth
give the 3D points. Because the correspondence is fixed on the 3D mesh, a
jaw point stays on the same place of the face when the head turns (dlib's
jaw points slide along the visible outline instead).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from dyadlab.face.registry import ASSETS

MAP_FILE = ASSETS / "ibug68_from_mesh.json"


@functools.cache
def weights() -> np.ndarray:
    """(68, 468) matrix W: iBUG points = W @ mesh points."""
    table = json.loads(MAP_FILE.read_text())["weights"]
    W = np.zeros((68, 468), np.float32)
    for i, row in table.items():
        for j, w in row:
            W[int(i), int(j)] = w
    return W


def _vertices(rows: range) -> np.ndarray:
    return np.flatnonzero(weights()[list(rows)].sum(axis=0) > 0)


#: Mesh vertices behind iBUG points 17-67 (brows, nose, eyes, mouth): the
#: inner face, whose extent is about a BlazeFace detection box.
INNER_VERTICES = _vertices(range(17, 68))


@functools.cache
def _sparse() -> tuple[np.ndarray, np.ndarray]:
    """(68, 6) vertex indices and weights (zero-padded): W without the zeros."""
    W = weights()
    idx = np.zeros((68, 6), np.int64)
    w = np.zeros((68, 6), np.float32)
    for i in range(68):
        nz = np.flatnonzero(W[i])
        idx[i, : len(nz)], w[i, : len(nz)] = nz, W[i, nz]
    return idx, w


def to68(points: np.ndarray) -> np.ndarray:
    """(468, d) or (n, 468, d) mesh points -> (68, d) or (n, 68, d)."""
    idx, w = _sparse()
    p = np.asarray(points)
    return (p[..., idx, :] * w[..., None]).sum(axis=-2)
