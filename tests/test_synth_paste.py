"""Pasting a generated face back into its photo (services/synth/paste.py) and
colour in / colour out (services/synth/colour.py), on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from services.synth import colour as C
from services.synth import landmarks as L
from services.synth import paste as P

from media import media_path


def _photo(name: str = "single_face.jpg") -> np.ndarray:
    bgr = cv2.imread(str(media_path(name)))
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def face():
    from services.synth.images import find_and_align

    return find_and_align(_photo(), 128, "photo")


def _ycrcb(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb).astype(np.int16)


def test_a_mask_that_keeps_everything_leaves_the_photo_bit_identical(face):
    colour = np.full((128, 128), 255.0, np.float32)  # a white C, nowhere used
    A = np.ones((128, 128), np.float32)
    change = P.change_mask(A, P.feather(128, face.landmarks))
    out = P.paste_back(face.photo, face.M, colour, change)
    assert out.dtype == np.uint8 and out.shape == face.photo.shape
    assert np.array_equal(out, face.photo)


def test_pasting_the_input_crop_back_changes_the_photo_only_by_resampling(face):
    y = C.luma(face.crop)
    change = P.change_mask(np.zeros((128, 128), np.float32), P.feather(128, face.landmarks))
    out = P.paste_back(face.photo, face.M, y, change)
    d = np.abs(out.astype(np.int16) - face.photo.astype(np.int16))
    x0, y0, x1, y1 = P.footprint(face.M, 128, face.photo.shape)
    outside = np.ones(face.photo.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert d[outside].max() == 0  # nothing outside the crop's footprint is touched
    # inside, the face went through a 128 px crop and back: a resampling blur
    assert d[y0:y1, x0:x1].mean() < 3.0, d[y0:y1, x0:x1].mean()


def test_a_luminance_change_keeps_the_photos_colour(face):
    # the generator makes the face brighter: luma moves, chroma does not
    change = P.change_mask(np.zeros((128, 128), np.float32), P.feather(128, face.landmarks))
    out = P.paste_back(face.photo, face.M, np.clip(C.luma(face.crop) + 40, 0, 255), change)
    w = P.weight_image(face.M, change, face.photo.shape)
    core = (w == 255) & (face.photo.max(axis=2) < 200)  # fully redrawn, not clipped by +40
    assert core.sum() > 1000
    before, after = _ycrcb(face.photo)[core], _ycrcb(out)[core]
    assert np.median(after[:, 0] - before[:, 0]) >= 35  # Y up by ~40
    assert np.abs(after[:, 1:] - before[:, 1:]).max() <= 2  # Cr, Cb kept (8-bit rounding)
    # the photo is in colour, so is the output
    assert np.abs(_ycrcb(out)[core][:, 1:] - 128).mean() > 3


def test_grey_in_grey_out(face):
    grey = np.repeat(C.luma(face.photo)[..., None].round().astype(np.uint8), 3, axis=2)
    change = P.change_mask(np.zeros((128, 128), np.float32), P.feather(128, face.landmarks))
    out = P.paste_back(grey, face.M, np.full((128, 128), 30.0, np.float32), change)
    assert not np.array_equal(out, grey)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_feather_is_one_over_the_face_and_zero_at_the_crop_border(face):
    f = P.feather(128, face.landmarks)
    assert f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1
    assert f[0].max() == 0 and f[-1].max() == 0 and f[:, 0].max() == 0 and f[:, -1].max() == 0
    nose = np.round(face.landmarks[30]).astype(int)
    assert f[nose[1], nose[0]] > 0.99
    mouth = np.round(face.landmarks[48:60].mean(axis=0)).astype(int)
    assert f[mouth[1], mouth[0]] > 0.99


def test_a_face_at_the_photos_edge_is_pasted_without_error(face):
    # cut the photo through the face: the crop reaches outside the photo
    pts = P.image_points(face.landmarks, face.M)
    x_cut = int(pts[:, 0].mean())
    cut = np.ascontiguousarray(face.photo[:, :x_cut])
    change = P.change_mask(np.zeros((128, 128), np.float32), P.feather(128, face.landmarks))
    out = P.paste_back(cut, face.M, np.full((128, 128), 250.0, np.float32), change)
    assert out.shape == cut.shape and not np.array_equal(out, cut)
    # a crop entirely outside the photo changes nothing
    far = face.M.copy()
    far[:, 2] += 10_000
    assert np.array_equal(P.paste_back(cut, far, np.zeros((128, 128), np.float32), change), cut)


def test_image_points_invert_the_alignment(face):
    pts = P.image_points(face.landmarks, face.M)
    np.testing.assert_allclose(L.transform_points(pts, face.M), face.landmarks, atol=1e-4)


def test_the_alignment_matrix_holds_when_a_large_photo_is_shrunk_first(face):
    # 4x the photo: align() area-shrinks before warping; M must still map the
    # big photo's pixels onto the crop
    big = cv2.resize(face.photo, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    pts = (P.image_points(face.landmarks, face.M) + 0.5) * 4 - 0.5
    crop, lm, M = L.align(big, pts, 128)
    np.testing.assert_allclose(L.transform_points(pts, M), lm, atol=1e-3)
    np.testing.assert_allclose(lm, face.landmarks, atol=0.05)
    assert np.abs(crop.astype(int) - face.crop.astype(int)).mean() < 4


def test_colour_round_trip_and_channels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    y = C.to_model(rgb, 1)
    assert y.shape == (2, 1, 16, 16) and -1 <= float(y.min()) and float(y.max()) <= 1
    assert C.to_model(rgb, 3).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="channels must be 1"):
        C.to_model(rgb, 2)
    # the model's own luma back: the input again (up to rounding)
    back = C.from_model(y, rgb)
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1
    assert C.from_model(torch.zeros(2, 3, 16, 16), rgb).shape == rgb.shape


def test_blend_weights_learned_face_and_regions(face):
    from services.synth import paste as P

    lm = face.landmarks
    A = np.ones((128, 128), np.float32)
    A[60:90, 40:90] = 0.0  # the generator redraws a mouth-sized box
    learned = P.blend_weight(A, lm, lm, 128, "face")
    np.testing.assert_allclose(learned, P.feather(128, lm) * (1 - A))
    whole = P.blend_weight(None, lm, lm, 128, "face")
    regions = P.blend_weight(None, lm, lm, 128, "regions")
    assert regions.sum() < 0.6 * whole.sum()  # only the expression regions
    mouth = np.round(lm[48:60].mean(axis=0)).astype(int)
    eye = np.round(lm[36:42].mean(axis=0)).astype(int)
    nose_bridge = np.round(lm[28]).astype(int)
    assert regions[mouth[1], mouth[0]] > 0.99 and regions[eye[1], eye[0]] > 0.8
    assert regions[nose_bridge[1], nose_bridge[0]] < 0.5  # between the eyes: kept
    with pytest.raises(ValueError, match="paste_mask"):
        P.blend_weight(None, lm, lm, 128, "everything")
