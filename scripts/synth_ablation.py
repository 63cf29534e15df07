"""Ablation table for avLandmarkGAN: the paper's loss weights against variants
with one weight at 0, each trained for the same number of steps from the same
seed and data, evaluated with the same judge on the same validation faces.

    DYADLAB_STORE_DIR=... python scripts/synth_ablation.py --faces synth/faces/<key>.npz \\
        --main r64 --step 1000 --image abl-e0:lambda_e_image=0 abl-l0:lambda_l=0 \\
        --landmark abl-ffc0:lambda_ffc=0

Image-converter variants are compared through the whole model (G_l of the
main run, their own G_i, the main run's judge) at the snapshot `--step`;
landmark-converter variants through the landmark metrics (Fréchet distance
to the target class's real landmarks, mouth sanity, and how far the seven
face-feature centres move: the quantity L_ffc penalises).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyadlab.config import Settings  # noqa: E402
from dyadlab.storage import open_store  # noqa: E402
from services.synth import data as D  # noqa: E402
from services.synth import evaluate as E  # noqa: E402
from services.synth import solver as S  # noqa: E402
from services.synth.generate import Synthesizer  # noqa: E402


def _config(store, run: str) -> S.Config:
    return S.Config.from_dict(json.loads(store.get_bytes(f"synth/runs/{run}/config.json")))


def _nets(store, run, stage, step=None):
    if step is None:
        return S.load_checkpoint(store, run, stage)["nets"]
    return S.load_snapshot(store, run, stage, step)["nets"]


def synthesizer(store, main: str, image_run: str, step: int, landmark_run: str | None = None) -> Synthesizer:
    cfg = _config(store, main)
    return Synthesizer.from_dict(
        {
            "format": 1,
            "config": cfg.to_dict(),
            "G_l": _nets(store, landmark_run or main, "landmark")["G"],
            "G_i": _nets(store, image_run, "image", step)["G"],
            "judge": _nets(store, main, "judge")["J"],
        }
    )


def ffc_shift(syn: Synthesizer, val: D.FaceSet, seed: int = 0) -> float:
    """Mean |group-centre displacement| (normalised units) for class-balanced targets."""
    import torch

    from services.synth.losses import group_centres

    lm = D.normalised_landmarks(val.landmarks)[0]
    va = D.class_balanced_targets(np.random.default_rng(seed), len(lm))
    out = syn.landmarks(lm, va)
    return float((group_centres(torch.from_numpy(out)) - group_centres(torch.from_numpy(lm))).abs().mean())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", required=True)
    ap.add_argument("--main", required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--image", nargs="*", default=[], help="RUN:description")
    ap.add_argument("--landmark", nargs="*", default=[], help="RUN:description")
    ap.add_argument("--json")
    a = ap.parse_args()
    store = open_store(Settings.from_env())
    faces = D.FaceSet.from_bytes(store.get_bytes(a.faces))
    val = faces.split(val=True)
    rows = []
    for run, desc in [(a.main, "paper weights")] + [tuple(x.split(":", 1)) for x in a.image]:
        res = E.evaluate(synthesizer(store, a.main, run, a.step), faces)
        rows.append(
            {
                "converter": "image",
                "variant": desc,
                "run": run,
                **{
                    k: res[k]
                    for k in (
                        "va_rmse_generated",
                        "va_rmse_baseline",
                        "fd_landmarks_generated",
                        "fd_judge_generated",
                        "fd_judge_baseline",
                    )
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for run, desc in [(a.main, "paper weights")] + [tuple(x.split(":", 1)) for x in a.landmark]:
        syn = synthesizer(store, a.main, a.main, a.step, landmark_run=run)
        res = E.evaluate(syn, faces)
        s = res["landmark_sanity"]
        rows.append(
            {
                "converter": "landmark",
                "variant": desc,
                "run": run,
                "fd_landmarks_generated": res["fd_landmarks_generated"],
                "fd_landmarks_baseline": res["fd_landmarks_baseline"],
                "ffc_shift": ffc_shift(syn, val),
                "share_wider_and_lifted": s["share_wider_and_lifted"],
                "va_rmse_generated": res["va_rmse_generated"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(
        "\n| converter | variant | VA RMSE (judge vs target) | FD landmarks | FD judge | group-centre shift | mouth ok |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['converter']} | {r['variant']} | {r['va_rmse_generated']:.3f} | "
            f"{r['fd_landmarks_generated']:.3f} | {r.get('fd_judge_generated', float('nan')):.2f} | "
            f"{r.get('ffc_shift', float('nan')):.4f} | "
            f"{100 * r['share_wider_and_lifted']:.0f} % |"
            if "share_wider_and_lifted" in r
            else f"| {r['converter']} | {r['variant']} | {r['va_rmse_generated']:.3f} | "
            f"{r['fd_landmarks_generated']:.3f} | {r['fd_judge_generated']:.2f} | – | – |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
