"""The appearance channel: a small CNN that looks at an aligned grey face crop
(`align.crop`, 64x64) and says how likely the face smiles and how likely its
mouth is hidden (a hand, a cloth, a toy).

Trained by this project on the expression images (`services/extractor/
train_appearance.py`; model card `assets/MODEL_CARD.md`), exported as
TorchScript and run in-process (no server, no download). Each crop is
normalised by its own mean and standard deviation first, so lighting and
contrast matter less.

The smile logit is kept, not only P(smile): on faces it grows with how
broad the smile is (held-out posed photos: neutral median -3.7, happy
median 6.1; on video a closed-mouth smile reads ~5, a broad laugh 10-15).
`calibration()` gives the three logits the AU scale is pinned to (measured
on the validation split when the model was trained, stored inside the model).

Architecture (~5 M multiply-adds per face, ~0.2 ms in a batch on one core):
conv5x5/2 (16) - pool - conv3x3 (32) - pool - conv3x3 (64) - conv3x3 (64) -
pool - FC 64 - FC 2, batch norm and ReLU after each convolution. Outputs two
logits: smile and mouth-occluded.
"""

from __future__ import annotations

import functools

import numpy as np

from dyadlab.face import registry

CROP = 64


def build(width: int = 16):
    import torch
    from torch import nn

    def conv(i, o, k, s=1):
        return [nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    class AppearanceNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.features = nn.Sequential(
                *conv(1, w, 5, 2),
                nn.MaxPool2d(2),
                *conv(w, 2 * w, 3),
                nn.MaxPool2d(2),
                *conv(2 * w, 4 * w, 3),
                *conv(4 * w, 4 * w, 3),
                nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(0.3),
                nn.Linear(4 * w * 16, 64),
                nn.ReLU(inplace=True),
                nn.Linear(64, 2),
            )
            # smile logits of the validation split's median and 90th-percentile
            # neutral face and median happy face; set by the training script.
            self.register_buffer("calibration", torch.tensor([-1.0, 0.0, 1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """x: (n, 1, 64, 64) float in [0, 1] -> (n, 2) logits (smile, occluded)."""
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            s = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(0.02)
            return self.head(self.features((x - m) / s))

    return AppearanceNet()


@functools.cache
def _load():
    """(inference model, calibration) from the committed TorchScript file.
    For inference the module is frozen and its batch norms folded into the
    convolutions (`torch.jit.optimize_for_inference`): the same outputs to
    ~1e-5, 2.3x faster on one core."""
    import torch

    m = torch.jit.load(str(registry.checked_path("appearance")), map_location="cpu")
    m.eval()
    calib = tuple(float(v) for v in m.calibration)
    return torch.jit.optimize_for_inference(torch.jit.freeze(m)), calib


def model():
    """The committed model, frozen for inference on the CPU."""
    return _load()[0]


def calibration() -> tuple[float, float, float]:
    """Smile logits of the held-out validation faces: (median neutral,
    90th-percentile neutral, median happy), the points the appearance
    channel's AU scale is pinned to (services/extractor/au.py)."""
    mid, lo, hi = _load()[1]
    return mid, lo, hi


def logits(crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """(n, 64, 64) uint8 crops -> (n, 2) logits (smile, mouth occluded)."""
    import torch

    n = len(crops)
    out = np.empty((n, 2), np.float32)
    m = model()
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = torch.from_numpy(np.ascontiguousarray(crops[i : i + batch], np.float32) / 255.0)
            out[i : i + batch] = m(x[:, None]).numpy()
    return out


def predict(crops: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64, 64) uint8 crops -> (smile logit, P(mouth occluded)), each (n,)."""
    if len(crops) == 0:
        return np.zeros(0), np.zeros(0)
    z = logits(crops, batch).astype(np.float64)
    return z[:, 0], 1.0 / (1.0 + np.exp(-z[:, 1]))
