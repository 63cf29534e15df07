"""Every face model dyadlab knows, in one table: where its file is, its
SHA-256, where it came from and under which licence.

Nothing is downloaded at run time. The MediaPipe models were unzipped from the
pinned PyPI wheel `mediapipe==0.10.21` (`mediapipe/modules/...`) and are
committed in `dyadlab/face/assets/` with the wheel's Apache-2.0 licence; the
smile CNN was trained by this project (`services/extractor/train_smile.py`,
model card `dyadlab/face/assets/MODEL_CARD.md`); dlib's models come from the
pinned `face-recognition-models` wheel (`models.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MEDIAPIPE = "mediapipe==0.10.21 wheel (PyPI), Apache-2.0 (assets/LICENSE.mediapipe-Apache-2.0)"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    name: str
    file: str
    sha256: str
    source: str
    what: str

    @property
    def path(self) -> Path:
        return ASSETS / self.file


MODELS: dict[str, ModelFile] = {
    m.name: m
    for m in [
        ModelFile(
            "blazeface_short",
            "face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            MEDIAPIPE + "; mediapipe/modules/face_detection/face_detection_short_range.tflite",
            "BlazeFace short-range face detector: 128x128 input, 896 SSD anchors, "
            "box + 6 keypoints (faces within ~2 m of the camera)",
        ),
        ModelFile(
            "blazeface_full",
            "face_detection_full_range_sparse.tflite",
            "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
            MEDIAPIPE + "; mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
            "BlazeFace full-range face detector: 192x192 input, 2,304 anchors (small and far faces)",
        ),
        ModelFile(
            "face_mesh",
            "face_landmark.tflite",
            "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
            MEDIAPIPE + "; mediapipe/modules/face_landmark/face_landmark.tflite",
            "MediaPipe face mesh: 192x192 face crop -> 468 points (x, y, relative depth) "
            "and a face-presence score",
        ),
        ModelFile(
            "appearance",
            "appearance-v1.pt",
            "a7981d49df92bf91a1224599bc42f1f5f6ac9933820751f1ea4e43a70804ec83",
            "trained by dyadlab on the expression images (services/extractor/train_appearance.py); "
            "model card assets/MODEL_CARD.md",
            "appearance channel: aligned 64x64 grey face -> P(smile), P(mouth occluded); TorchScript",
        ),
    ]
}


class ModelFileError(RuntimeError):
    """A registered model file is missing or is not the file we registered."""


@functools.cache
def checked_path(name: str) -> Path:
    """The file of model `name`, after checking its SHA-256 (once per process)."""
    m = MODELS[name]
    if not m.path.is_file():
        raise ModelFileError(f"model file {m.file} is missing from {ASSETS}")
    digest = hashlib.sha256(m.path.read_bytes()).hexdigest()
    if digest != m.sha256:
        raise ModelFileError(
            f"model file {m.file} has SHA-256 {digest[:12]}..., "
            f"expected {m.sha256[:12]}... (damaged or replaced)"
        )
    return m.path


@functools.cache
def tflite(name: str):
    """The process's LiteRT interpreter for model `name`."""
    from dyadlab.face.litert import TFLiteModel

    return TFLiteModel(checked_path(name))
