"""Evaluation of an exported avLandmarkGAN model on the fixed validation split
(the paper's Sec. IV-B, adapted to what runs offline).

* **Judge RMSE** -- the ResNet-18 VA judge against the validation faces' own
  VA (how far the instrument itself can be trusted).
* **VA RMSE of generated faces** -- every validation face is moved to each
  target class's Table II VA; the judge's VA of the result is compared with
  the target. The *no-change baseline* judges the input face against the
  same targets. A model that does nothing scores the baseline.
* **Fréchet distance** (Heusel et al. 2017's formula,
  ``|mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``) between the generated set
  for a target class and the real faces of that class, on (a) the 136
  normalised landmark coordinates and (b) the judge's pooled features (no
  downloaded Inception weights); the baseline is the unchanged inputs.
  Reported per class and as the mean over classes with at least
  `MIN_CLASS` real faces.
* **Landmark sanity** -- G_l with target valence -0.8, 0 and +0.8 (arousal
  0): mean mouth width (corners 48-54, in inter-ocular distances) and lip
  corner lift (mouth-centre y minus corner y, IODs; positive = up), and the
  share of faces for which both rise with valence.

`python -m services.synth.evaluate MODEL --faces STORE_KEY` prints the tables
as JSON and Markdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
from scipy import linalg

from services.synth import data as D
from services.synth.generate import Synthesizer, judge_input

if TYPE_CHECKING:
    from services.synth.model import VAJudge

MIN_CLASS = 100  # real faces a class needs to be a Fréchet reference
EVAL_CLASSES = ("neutral", "happy", "sad", "surprise", "anger", "disgust")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, d) sample sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(len(s1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def _batched(fn, *arrays, batch: int = 128):
    outs = [fn(*(x[i : i + batch] for x in arrays)) for i in range(0, len(arrays[0]), batch)]
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*outs))
    return np.concatenate(outs)


def judge_features(syn: Synthesizer, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    judge = cast("VAJudge", syn.J)  # a Synthesizer's judge network is a VAJudge
    side = syn.config.judged_size
    with torch.no_grad():
        return np.concatenate(
            [
                judge.features(D.to_tensor_images(judge_input(crops[i : i + batch], side))).numpy()
                for i in range(0, len(crops), batch)
            ]
        )


def mouth_geometry(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 68, 2) -> (mouth width, lip-corner lift), both in inter-ocular distances."""
    iod = np.linalg.norm(points[:, 42:48].mean(1) - points[:, 36:42].mean(1), axis=1)
    width = np.linalg.norm(points[:, 54] - points[:, 48], axis=1) / iod
    centre_y = (points[:, 51, 1] + points[:, 57, 1]) / 2
    lift = (centre_y - (points[:, 48, 1] + points[:, 54, 1]) / 2) / iod
    return width, lift


def landmark_sanity(syn: Synthesizer, val: D.FaceSet, valences=(-0.8, 0.0, 0.8)) -> dict:
    lm, _, _ = D.normalised_landmarks(val.landmarks)
    widths, lifts = [], []
    for v in valences:
        out = syn.landmarks(lm, np.tile([[v, 0.0]], (len(lm), 1)).astype(np.float32))
        w, lift = mouth_geometry(D.L.to_points(out))
        widths.append(w)
        lifts.append(lift)
    both = (widths[-1] > widths[0]) & (lifts[-1] > lifts[0])
    return {
        "valence": list(valences),
        "mouth_width_iod": [float(w.mean()) for w in widths],
        "corner_lift_iod": [float(lift.mean()) for lift in lifts],
        "share_wider_and_lifted": float(both.mean()),
    }


def evaluate(syn: Synthesizer, faces: D.FaceSet, max_per_class: int = 300, seed: int = 0) -> dict:
    """All metrics on the validation split of `faces` (the set the model trained
    beside), resized to the model's crop size if they are not at it."""
    faces = faces.resized(syn.size)
    val = faces.split(val=True)
    train = faces.split(val=False)
    res: dict = {"n_val": int(len(val.va))}
    judged = _batched(syn.judge, val.images)
    res["judge_rmse_val"] = rmse(judged, val.va)
    res["judge_rmse_val_valence"] = rmse(judged[:, 0], val.va[:, 0])
    res["judge_rmse_val_arousal"] = rmse(judged[:, 1], val.va[:, 1])

    rng = np.random.default_rng(seed)
    names = list(D.CLASSES)
    per_class = {}
    gen_err, base_err = [], []
    for cname in EVAL_CLASSES:
        k = names.index(cname)
        target = np.array(D.TABLE_II[cname], np.float32)
        src = np.flatnonzero(val.label != k)
        if len(src) > max_per_class:
            src = rng.choice(src, max_per_class, replace=False)
        va = np.tile(target, (len(src), 1))
        imgs, lms = _batched(syn.transform, val.images[src], val.landmarks[src], va)
        j_gen = _batched(syn.judge, imgs)
        j_in = judged[src]
        gen_err.append(j_gen - target)
        base_err.append(j_in - target)
        row = {"n": int(len(src)), "rmse_generated": rmse(j_gen, target), "rmse_baseline": rmse(j_in, target)}
        real = faces.label == k
        if real.sum() >= MIN_CLASS:
            ref_lm = D.normalised_landmarks(faces.landmarks[real])[0]
            row["fd_landmarks_generated"] = frechet_distance(D.normalised_landmarks(lms)[0], ref_lm)
            row["fd_landmarks_baseline"] = frechet_distance(
                D.normalised_landmarks(val.landmarks[src])[0], ref_lm
            )
            ref_f = judge_features(syn, faces.images[real])
            row["fd_judge_generated"] = frechet_distance(judge_features(syn, imgs), ref_f)
            row["fd_judge_baseline"] = frechet_distance(judge_features(syn, val.images[src]), ref_f)
        per_class[cname] = row
    res["per_class"] = per_class
    g, b = np.concatenate(gen_err), np.concatenate(base_err)
    res["va_rmse_generated"] = float(np.sqrt((g**2).mean()))
    res["va_rmse_baseline"] = float(np.sqrt((b**2).mean()))
    for key in ("fd_landmarks", "fd_judge"):
        rows = [r for r in per_class.values() if f"{key}_generated" in r]
        res[f"{key}_generated"] = float(np.mean([r[f"{key}_generated"] for r in rows]))
        res[f"{key}_baseline"] = float(np.mean([r[f"{key}_baseline"] for r in rows]))
    res["landmark_sanity"] = landmark_sanity(syn, val)
    res["n_train"] = int(len(train.va))
    return res


def markdown(res: dict) -> str:
    lines = [
        f"Validation faces: {res['n_val']} (training faces: {res['n_train']})",
        "",
        f"Judge RMSE on validation VA: {res['judge_rmse_val']:.3f} "
        f"(valence {res['judge_rmse_val_valence']:.3f}, arousal {res['judge_rmse_val_arousal']:.3f})",
        "",
        "| target | n | VA RMSE generated | VA RMSE no-change | FD landmarks gen / no-change | FD judge gen / no-change |",
        "|---|---|---|---|---|---|",
    ]
    for c, r in res["per_class"].items():
        fdl = (
            f"{r['fd_landmarks_generated']:.3f} / {r['fd_landmarks_baseline']:.3f}"
            if "fd_landmarks_generated" in r
            else "–"
        )
        fdj = (
            f"{r['fd_judge_generated']:.2f} / {r['fd_judge_baseline']:.2f}"
            if "fd_judge_generated" in r
            else "–"
        )
        lines.append(
            f"| {c} | {r['n']} | {r['rmse_generated']:.3f} | {r['rmse_baseline']:.3f} | {fdl} | {fdj} |"
        )
    lines.append(
        f"| **all** | | **{res['va_rmse_generated']:.3f}** | **{res['va_rmse_baseline']:.3f}** | "
        f"{res['fd_landmarks_generated']:.3f} / {res['fd_landmarks_baseline']:.3f} | "
        f"{res['fd_judge_generated']:.2f} / {res['fd_judge_baseline']:.2f} |"
    )
    s = res["landmark_sanity"]
    lines += [
        "",
        "Landmark sanity (G_l, arousal 0):",
        "",
        "| target valence | " + " | ".join(f"{v:+.1f}" for v in s["valence"]) + " |",
        "|---|" + "---|" * len(s["valence"]),
        "| mouth width (IOD) | " + " | ".join(f"{w:.3f}" for w in s["mouth_width_iod"]) + " |",
        "| lip-corner lift (IOD) | " + " | ".join(f"{w:+.3f}" for w in s["corner_lift_iod"]) + " |",
        "",
        f"Faces whose mouth both widens and lifts from -0.8 to +0.8: "
        f"{100 * s['share_wider_and_lifted']:.0f} %",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    from dyadlab.config import Settings
    from dyadlab.storage import open_store

    ap = argparse.ArgumentParser(prog="python -m services.synth.evaluate")
    ap.add_argument("model", help="exported model file")
    ap.add_argument("--faces", required=True, help="store key of the prepared faces (synth/faces/...npz)")
    ap.add_argument("--json", help="write the metrics here")
    a = ap.parse_args(argv)
    store = open_store(Settings.from_env())
    res = evaluate(Synthesizer.load(a.model), D.FaceSet.from_bytes(store.get_bytes(a.faces)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
