"""Still images for synth: decoding what callers send, PNG in and out of the
model, and finding + aligning the one face in a photograph.

Faces are found with the shared still-image detector (`dyadlab.face.still`)
and aligned with `landmarks.align_face`. An image that cannot be read, or
has no face, is INVALID_ARGUMENT (the message names the input)."""

from __future__ import annotations

import io

import cv2
import numpy as np

from services.synth import landmarks as L
from services.synth.checks import bad

MAX_IMAGE_PIXELS = 40_000_000


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png_rgb(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError("not a PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


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


def find_and_align(rgb: np.ndarray, size: int, what: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(aligned crop (S, S, 3), landmarks (68, 2) crop px, detector stage)."""
    from dyadlab.face.still import find_face

    face = find_face(rgb, cnn_fallback=True)
    if face is None:
        raise bad(
            f"no face found in {what} ({rgb.shape[1]}x{rgb.shape[0]} pixels); "
            "give a photograph with one clearly visible, roughly frontal face"
        )
    try:
        crop, lm = L.align_face(rgb, face.landmarks, size)
    except ValueError:
        raise bad(f"the face in {what} could not be aligned (degenerate landmarks)") from None
    return crop, lm, face.stage
