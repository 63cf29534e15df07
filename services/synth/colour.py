"""Colour in, colour out: the image converter works on luminance, chroma comes from the input.

Most training faces are grey (7,739 of the 8,663 expression photos), so a
model trained on RGB learns to make grey faces. The converter therefore sees
and makes one channel, the luma Y of ITU-R BT.601 (Y = 0.299 R + 0.587 G +
0.114 B, as OpenCV's ``COLOR_RGB2YCrCb``), and the input's own chroma (Cr, Cb)
is put back around the new Y (`with_luma`). An expression changes shape and
shading (a smile's cheeks, an open mouth's teeth), which live in Y; skin and
lip colour stay where they were. What this cannot do: a mouth that opens
where the input had closed lips gets the lips' chroma on its teeth, tinted,
not white; with the attention mask the area is small.

Channel-count rule, shared by training and serving: ``channels == 1`` means
the model sees and makes luminance (this module), ``channels == 3`` RGB as it
is. Either way what is pasted into a photo is the generator's luma with the
photo's chroma (`generate.Synthesizer.generate`): a three-channel model
trained on these mostly grey faces makes mostly grey colour too.
"""

from __future__ import annotations

import numpy as np
import torch

#: ITU-R BT.601 luma weights (R, G, B); they sum to 1
LUMA = (0.299, 0.587, 0.114)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 or float RGB -> (...) float32 BT.601 luma in [0, 255]."""
    return np.asarray(rgb, np.float32) @ np.array(LUMA, np.float32)


def to_model(images: np.ndarray, channels: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, channels, S, S) float32 in [-1, 1]."""
    a = np.ascontiguousarray(images)
    if channels == 1:
        t = torch.from_numpy(np.ascontiguousarray(luma(a)))[:, None]
    elif channels == 3:
        t = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    else:
        raise ValueError(f"channels must be 1 (luminance) or 3 (RGB), got {channels}")
    return t.div(127.5).sub(1.0)


def to_unit(t: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) in [-1, 1] -> (B, S, S, C) float32 in [0, 255]."""
    return ((t.detach().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()


def with_luma(rgb: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The RGB image whose luma is `y` and whose chroma is `rgb`'s.

    rgb (..., 3) uint8, y (...) in [0, 255] -> (..., 3) uint8. YCrCb is
    linear in RGB and the luma weights sum to 1, so this is R, G and B each
    moved by y - Y(rgb); a grey input (R = G = B) stays grey."""
    a = np.asarray(rgb, np.float32)
    out = a + (np.asarray(y, np.float32) - luma(a))[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def from_model(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """The model's output (B, C, S, S) in [-1, 1] -> (B, S, S, 3) uint8 RGB;
    with one channel, the chroma of `like` (B, S, S, 3) uint8, the input."""
    u = to_unit(t)
    if u.shape[-1] == 3:
        return np.rint(u).astype(np.uint8)
    return with_luma(like, u[..., 0])
