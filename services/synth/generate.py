"""Inference with an exported avLandmarkGAN model: the `Synthesizer`.

    syn = Synthesizer.load("models/synth/synth-128-mask.pt")    # path, bytes or a binary file
    images, target_lm = syn.transform(crops, crop_landmarks, va)
    g = syn.generate(crops, crop_landmarks, va)            # + colour C and attention A
    judged = syn.judge(images)

Pure torch + numpy + OpenCV (no dlib, no gRPC): it runs inside a TorchServe
worker (services/synth/handler.py), a gRPC service or a notebook alike. The
input is what `landmarks.align_face` / `data.prepare` produce: aligned S x S
RGB crops (S = the model's `size`) with their 68 landmarks in crop pixels.

The model file is `train.export`'s format, read with ``weights_only=True``:
``{"format": 1, "config": solver.Config dict, "G_l": ..., "G_i": ...,
"judge": ...}`` (state dicts).

`transform` does what the image stage trained on (solver.image_step):
normalise the face's landmarks (zero mean, unit RMS radius), move them with
G_l(x_l, c_e), draw the target landmarks at the face's own centre and RMS
radius, and run G_i(face, landmark image, c_e) -- on the luminance of the
face for a one-channel model, whose output then carries the input's chroma
(``colour.py``). The target landmarks come back in crop pixels (same
centre/radius as the input face). `generate` also returns the generator's
colour C and attention A, which `paste.paste_back` needs to put the face back
into its photo at full resolution.

Everything runs in eval mode under ``torch.no_grad``; invalid inputs raise
ValueError with a message that says what is wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import threading
from typing import BinaryIO, cast

import numpy as np
import torch

from services.synth import colour as C
from services.synth import data as D
from services.synth import landmarks as L
from services.synth import paste as P
from services.synth import solver as S
from services.synth.model import ImageGenerator

MODEL_FORMAT = 1
N_POINTS = L.N_POINTS
_KEYS = ("config", "G_l", "G_i", "judge")
PASTE_COLOURS = ("generated", "residual")  # Config.paste_colour
#: config settings a caller may override without changing a weight (Synthesizer.from_dict)
SERVING = {"paste_mask": str, "paste_colour": str, "size": int}
OWN_CACHE = 64  # faces whose own rendering C(own) is kept (Synthesizer._own_luma)


def _array(name: str, value, dtype=None) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a numeric array ({e})") from None


def judge_input(crops: np.ndarray, side: int) -> np.ndarray:
    """(B, S, S, 3) uint8 crops at the judge's side (area-averaged when smaller)."""
    if crops.shape[1] == side:
        return crops
    import cv2

    interp = cv2.INTER_AREA if side < crops.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(c, (side, side), interpolation=interp) for c in crops])


@dataclasses.dataclass
class Generated:
    """`Synthesizer.generate`'s result, batch-first arrays (see there)."""

    images: np.ndarray
    landmarks: np.ndarray
    colour: np.ndarray
    attention: np.ndarray | None
    mask: np.ndarray  # the blend weight m (B, S, S) in [0, 1] that made `images` (paste.blend_weight)
    raw: np.ndarray  # the generator's own output crop, unfeathered (ablations, identity)


class Synthesizer:
    """The three serving networks of one exported model (CPU, eval mode)."""

    def __init__(self, cfg: S.Config, G_l: torch.nn.Module, G_i: ImageGenerator, judge: torch.nn.Module):
        self.config = cfg
        self.G_l = G_l.eval()
        self.G_i = G_i.eval()
        self.J = judge.eval()
        self._own: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._own_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, src: str | os.PathLike | bytes | bytearray | BinaryIO, **serving) -> Synthesizer:
        """From a model file path, its bytes, or a readable binary file object
        (`serving`: settings that change no weight, see `from_dict`)."""
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        try:
            blob = torch.load(src, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise ValueError(f"not a synth model file: {e}") from e
        return cls.from_dict(blob, **serving)

    @classmethod
    def from_dict(cls, blob: dict, **serving) -> Synthesizer:
        """From `train.export`'s dict. `serving` overrides settings of its config
        that change no weight (`SERVING`: what is pasted, where; the crop side,
        as G_i is fully convolutional), for comparisons and ablations."""
        if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
            fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"not a synth model (format {fmt!r}; expected {MODEL_FORMAT})")
        missing = [k for k in _KEYS if k not in blob]
        if missing:
            raise ValueError(f"synth model file lacks {missing}")
        unknown = set(serving) - set(SERVING)
        if unknown:
            raise ValueError(f"only {tuple(SERVING)} can be overridden, not {sorted(unknown)}")
        cfg = S.Config.from_dict({**blob["config"], **{k: SERVING[k](v) for k, v in serving.items()}})
        if cfg.paste_colour not in PASTE_COLOURS:
            raise ValueError(
                f"synth model: paste_colour must be one of {PASTE_COLOURS}, got {cfg.paste_colour!r}"
            )
        nets = {
            "G_l": S.build("landmark", cfg)["G"],
            "G_i": S.build("image", cfg)["G"],
            "judge": S.build("judge", cfg)["J"],
        }
        for k, net in nets.items():
            try:
                net.load_state_dict(blob[k])
            except RuntimeError as e:
                raise ValueError(f"synth model: {k} does not match its config: {e}") from e
        return cls(cfg, nets["G_l"], cast("ImageGenerator", nets["G_i"]), nets["judge"])

    @property
    def size(self) -> int:
        """Side of the square crops the model takes and makes (pixels)."""
        return int(self.config.size)

    # -- validation ------------------------------------------------------------------
    def check_crops(self, crops, name: str = "crops") -> np.ndarray:
        a = np.asarray(crops)
        s = self.size
        if a.ndim != 4 or a.shape[1:] != (s, s, 3):
            raise ValueError(
                f"{name} must be (B, {s}, {s}, 3) RGB crops of this model's size, got shape {a.shape}"
            )
        if a.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8, got {a.dtype}")
        return np.ascontiguousarray(a)

    @staticmethod
    def check_va(va, batch: int) -> np.ndarray:
        v = _array("va", va, np.float32)
        if v.shape != (batch, 2):
            raise ValueError(f"va must be (B, 2) = (valence, arousal) with B = {batch}, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("va contains NaN or infinity")
        if (np.abs(v) > 1).any():
            bad = v[(np.abs(v) > 1).any(axis=1)][0]
            raise ValueError(f"valence and arousal must be in [-1, 1], got {bad.tolist()}")
        return v

    @staticmethod
    def check_landmarks(pts, batch: int) -> np.ndarray:
        p = _array("crop_landmarks", pts, np.float32)
        if p.ndim == 2 and p.shape[1] == 2 * N_POINTS:
            p = L.to_points(p).astype(np.float32)
        if p.shape != (batch, N_POINTS, 2):
            raise ValueError(
                f"crop_landmarks must be (B, 68, 2) crop pixels with B = {batch}, got shape {p.shape}"
            )
        if not np.isfinite(p).all():
            raise ValueError("crop_landmarks contain NaN or infinity")
        return p

    # -- inference -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, crops, crop_landmarks, va) -> Generated:
        """Faces moved to the target VA, with what pasting them back needs.

        crops (B, S, S, 3) uint8 aligned RGB crops, crop_landmarks (B, 68, 2)
        in crop pixels (or (B, 136) ``[x.., y..]``), va (B, 2) in [-1, 1]
        -> `Generated`: the output crops (RGB, with the input's chroma), the
        target landmarks in crop pixels, the luma to paste (B, S, S) in
        [0, 255] (the generator's colour C's, or the input's moved by C's
        change, `Config.paste_colour`), the attention A (B, S, S) in [0, 1] (None
        for a model without a mask) and the blend weight m that pasting uses
        (`paste.blend_weight`: 1 - A over the face, or the model's geometric
        `paste_mask` when it has no A).

        The output crop is the input crop with the generated face pasted in
        exactly as `paste.paste_back` pastes it into a photo (the blend
        feathered over the face's hull), so what is judged and shown at
        crop size is what a photo gets."""
        x = self.check_crops(crops)
        b, s = len(x), self.size
        pts = self.check_landmarks(crop_landmarks, b)
        c_e = self.check_va(va, b)
        ch = self.config.channels
        if b == 0:
            empty = np.zeros((0, s, s), np.float32)
            return Generated(
                np.zeros((0, s, s, 3), np.uint8),
                np.zeros((0, N_POINTS, 2), np.float32),
                empty,
                empty if self.config.attention else None,
                empty,
                np.zeros((0, s, s, 3), np.uint8),
            )
        try:
            lm, centres, radii = D.normalised_landmarks(pts)
        except ValueError as e:
            raise ValueError(f"crop_landmarks: {e}") from None
        c = torch.from_numpy(c_e)
        c_l = self.G_l(torch.from_numpy(lm), c).numpy()
        lm_image = D.draw_batch(c_l, s, centres, radii)
        fake, colour, A = self.G_i.parts(C.to_model(x, ch), lm_image, c)
        target = np.stack(
            [L.denormalise(v, s, centres[i], float(radii[i])) for i, v in enumerate(c_l)]
        ).astype(np.float32)
        # what is pasted is luma (the generator's, or the input's moved by the
        # generator's change: `_residual`); the chroma stays the input's
        # (colour.py: most training faces are grey, so a three-channel model's
        # own chroma is mostly grey too)
        col = self._luma(colour)
        if self.config.paste_colour == "residual":
            col = self._residual(x, pts, col, lm, centres, radii)
        att = None if A is None else A[:, 0].numpy().astype(np.float32)
        # the output crop is what pasting back makes of it (paste.py): the
        # generator's blend, feathered over the face, at the crop's size
        mask = np.stack(
            [
                P.blend_weight(None if att is None else att[i], pts[i], target[i], s, self.config.paste_mask)
                for i in range(b)
            ]
        )
        identity = np.eye(2, 3)
        images = np.stack([P.paste_back(x[i], identity, col[i], mask[i]) for i in range(b)])
        return Generated(images, target, col, att, mask, C.from_model(fake, x))

    def _luma(self, colour: torch.Tensor) -> np.ndarray:
        """(B, S, S) luma in [0, 255] of the generator's colour C."""
        col = C.to_unit(colour)
        return col[..., 0] if self.config.channels == 1 else C.luma(col)

    def _residual(self, x: np.ndarray, pts: np.ndarray, col: np.ndarray, lm, centres, radii) -> np.ndarray:
        """The input's luma moved by C(target) - C(own) (`Config.paste_colour` "residual").

        C(own) is the generator asked for the face it was given: its own
        landmarks and its own VA (as judged). Whatever the generator draws
        regardless of the target -- its darker, blurrier rendering of skin
        seen mostly in grey, its checkerboard -- is in both and cancels; what
        is left is the change the target expression makes, added to the
        photo's own luma, whose texture and exposure stay."""
        y = C.luma(x.astype(np.float32))
        return np.clip(y + col - self._own_luma(x, pts, lm, centres, radii), 0.0, 255.0).astype(np.float32)

    def _own_luma(self, x: np.ndarray, pts: np.ndarray, lm, centres, radii) -> np.ndarray:
        """(B, S, S) luma of C(own) for each face, from a small cache keyed by
        the crop and its landmarks: a face driven through many targets (a
        Transfer's frames, a Matrix's cells) costs its own pass once."""
        keys = [hashlib.sha1(x[i].tobytes() + pts[i].tobytes()).digest() for i in range(len(x))]
        with self._own_lock:
            found = {k: self._own[k] for k in keys if k in self._own}
            for k in found:
                self._own.move_to_end(k)
        todo = sorted({keys[i]: i for i in range(len(x)) if keys[i] not in found}.values())
        if todo:
            own_va = torch.from_numpy(self.judge(x[todo]))
            own_image = D.draw_batch(lm[todo], self.size, centres[todo], radii[todo])
            _, own, _ = self.G_i.parts(C.to_model(x[todo], self.config.channels), own_image, own_va)
            found.update(zip((keys[i] for i in todo), self._luma(own)))
            with self._own_lock:
                for i in todo:
                    self._own[keys[i]] = found[keys[i]]
                    self._own.move_to_end(keys[i])
                while len(self._own) > OWN_CACHE:
                    self._own.popitem(last=False)
        return np.stack([found[k] for k in keys])

    def transform(self, crops, crop_landmarks, va) -> tuple[np.ndarray, np.ndarray]:
        """`generate`'s (output crops (B, S, S, 3) uint8, target landmarks (B, 68, 2) crop px)."""
        g = self.generate(crops, crop_landmarks, va)
        return g.images, g.landmarks

    @torch.no_grad()
    def judge(self, crops) -> np.ndarray:
        """(B, S, S, 3) uint8 crops -> (B, 2) valence/arousal from the VA judge
        (resized to the side it was trained on, `Config.judged_size`)."""
        x = self.check_crops(crops)
        if len(x) == 0:
            return np.zeros((0, 2), np.float32)
        return self.J(D.to_tensor_images(judge_input(x, self.config.judged_size))).numpy().astype(np.float32)

    @torch.no_grad()
    def landmarks(self, lm136, va) -> np.ndarray:
        """G_l alone: (B, 136) normalised landmarks + (B, 2) VA -> (B, 136) normalised."""
        x = _array("lm136", lm136, np.float32)
        if x.ndim != 2 or x.shape[1] != 2 * N_POINTS:
            raise ValueError(f"lm136 must be (B, 136) normalised landmarks, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("lm136 contains NaN or infinity")
        c_e = self.check_va(va, len(x))
        if len(x) == 0:
            return np.zeros((0, 2 * N_POINTS), np.float32)
        return self.G_l(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(c_e)).numpy()
