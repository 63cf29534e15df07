"""Still images for synth: decoding what callers send, PNG in and out of the
model, and finding + aligning the one face in a photograph.

Faces are found with the shared still-image detector (`dyadlab.face.still`)
and aligned with `landmarks.align_face`. An image that cannot be read, or
has no face, is INVALID_ARGUMENT (the message names the input)."""

from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np

from services.synth import landmarks as L
from services.synth.checks import bad

MAX_IMAGE_PIXELS = 40_000_000


def png(img: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) RGB or an (H, W) grey uint8 image."""
    a = np.ascontiguousarray(img)
    ok, buf = cv2.imencode(".png", a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png_rgb(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError("not a PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_png_as_is(data: bytes) -> np.ndarray:
    """A PNG with its own channel count: grey -> (H, W), colour -> (H, W, 3) RGB (8-bit only)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if (
        img is None
        or img.dtype != np.uint8
        or img.ndim not in (2, 3)
        or (img.ndim == 3 and img.shape[2] != 3)
    ):
        raise ValueError("not an 8-bit grey or RGB PNG")
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Any still image Pillow reads -> uint8 RGB (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise bad(f"{what} is empty (0 bytes)")
    im: Image.Image  # the opened file, then images made from it
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise bad(
                    f"{what} is {im.width}x{im.height} pixels; at most "
                    f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, np.float64)
                a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
                im = Image.fromarray(a)
            return np.asarray(im.convert("RGB"), np.uint8).copy()
    except UnidentifiedImageError:
        raise bad(f"{what} could not be read as an image (PNG, JPEG, WebP, ... expected)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad(f"{what} could not be read as an image ({type(e).__name__})") from None


@dataclasses.dataclass
class Face:
    """The one face of a photo: the photo (H, W, 3) uint8 RGB, its aligned
    crop (S, S, 3), the crop's landmarks (68, 2), the similarity M from the
    photo's pixels to the crop's, and the detector stage that found it."""

    photo: np.ndarray
    crop: np.ndarray
    landmarks: np.ndarray
    M: np.ndarray
    stage: str

    def resized(self, width: int, height: int) -> Face:
        """The same face in the photo resized to width x height (area-averaged)."""
        h, w = self.photo.shape[:2]
        if (w, h) == (width, height):
            return self
        interp = cv2.INTER_AREA if width < w else cv2.INTER_CUBIC
        photo = cv2.resize(self.photo, (width, height), interpolation=interp)
        return dataclasses.replace(self, photo=photo, M=L.on_resized(self.M, width / w, height / h))


def find_and_align(rgb: np.ndarray, size: int, what: str) -> Face:
    """The one face of `rgb`, aligned to a size x size crop (`Face`)."""
    from dyadlab.face.still import find_face

    face = find_face(rgb, cnn_fallback=True)
    if face is None:
        raise bad(
            f"no face found in {what} ({rgb.shape[1]}x{rgb.shape[0]} pixels); "
            "give a photograph with one clearly visible, roughly frontal face"
        )
    try:
        crop, lm, M = L.align(rgb, face.landmarks, size)
    except ValueError:
        raise bad(f"the face in {what} could not be aligned (degenerate landmarks)") from None
    return Face(rgb, crop, lm, M, face.stage)
