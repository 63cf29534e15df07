"""synth's pure parts: the paper's rotation/resize post-processing, VA hold and
smoothing, the side-by-side MP4 writer, the avImage figure, and the service's
input checks (image decoding, face finding on real photographs).

No TorchServe here: the MP4 test renders coloured squares through
`transfer.compose`'s render callable (a pure function of role and frame).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from dyadlab import rpc
from services.synth import matrix as MX
from services.synth import transfer as TR

from media import media_path, shared_expression


def pyfeat_image(name: str) -> Path:
    return media_path(name)


def expression_image(name: str = "Aaron_Guiel_0001.jpg") -> Path:
    return shared_expression(name)


def times(n: int, fps: float = 30.0) -> np.ndarray:
    return np.arange(n) / fps


# -- s_r ------------------------------------------------------------------------------------------
def test_fit_scale_is_the_papers_formula_and_fits_the_rotated_frame():
    th = np.array([0.5, 1.0, 5.0, 10.0, 30.0])
    t = np.radians(th)
    paper = np.tan(t) / ((1 + np.tan(t)) * np.sin(t))
    np.testing.assert_allclose(TR.fit_scale(th), paper, rtol=1e-12)
    np.testing.assert_allclose(TR.fit_scale(th), 1 / (np.cos(t) + np.sin(t)), rtol=1e-12)
    np.testing.assert_allclose(TR.fit_scale(-th), TR.fit_scale(th))  # symmetric
    assert TR.fit_scale(0.0) == 1.0  # the 0/0 limit
    # A unit square rotated by theta and scaled by s_r has a bounding box of exactly 1.
    for a in t:
        box = TR.fit_scale(np.degrees(a)) * (abs(math.cos(a)) + abs(math.sin(a)))
        assert box == pytest.approx(1.0)


# -- the motion track ------------------------------------------------------------------------------
def _segment_values(m: TR.Motion, kind: str, clock: np.ndarray):
    """Recompute each segment's raw oscillator from the recorded draws."""
    draws = [(k, p) for k, knd, p in m.params if knd == kind]
    bounds = [k for k, _ in draws] + [len(clock)]
    for (k, (f1, f2, amp)), end in zip(draws, bounds[1:]):
        i = clock[k : end + 1] - clock[k]  # one frame past the segment: where it re-drew
        yield k, end, (np.sin(f1 * i) + np.sin(f2 * i)) / 2, amp, (f1, f2)


def test_theta_redraws_exactly_when_it_returns_to_zero():
    n = 900
    t = times(n)
    m = TR.motion(t, seed=3)
    assert m.theta_redraws[0] == 0 and len(m.theta_redraws) > 3, m.theta_redraws
    for k, end, raw, amp, (f1, f2) in _segment_values(m, "theta", t * TR.I_PER_SECOND):
        assert 1 <= abs(f1) <= 2 and 1 <= abs(f2) <= 2 and 0 <= amp <= TR.M_MAX
        assert m.theta[k] == 0.0  # starts at 0
        seg = raw[1 : end - k]
        np.testing.assert_allclose(m.theta[k + 1 : end], seg * amp)  # the formula, unchanged
        assert (np.sign(seg) == np.sign(seg[0])).all()  # never back at 0 inside
        if end < n:  # ... and re-drawn when it is
            assert raw[end - k] == 0 or np.sign(raw[end - k]) != np.sign(seg[-1])
    assert np.abs(m.theta).max() <= TR.M_MAX


def test_resize_redraws_and_scale_is_min_of_s_and_s_r():
    t = times(900)
    m = TR.motion(t, seed=11)
    assert len(m.scale_redraws) > 3
    for k, end, raw, amp, _ in _segment_values(m, "scale", t * TR.I_PER_SECOND):
        n_ = amp * TR.N_MAX
        assert 0 <= n_ <= TR.N_MAX
        np.testing.assert_allclose(m.s[k + 1 : end], 1 - np.abs(raw[1 : end - k]) * n_)
        assert m.s[k] == 1.0
    assert (m.s <= 1).all() and (m.s >= 1 - TR.N_MAX).all()
    np.testing.assert_array_equal(m.scale, np.minimum(m.s, m.s_r))
    assert (m.scale <= 1.0).all()
    assert (m.scale < m.s).any() and (m.scale < m.s_r).any()  # both terms bind somewhere


def test_motion_is_seeded():
    t = np.cumsum(np.r_[0, np.random.default_rng(0).uniform(0.05, 0.1, 299)])  # VFR times
    a, b, c = TR.motion(t, seed=7), TR.motion(t, seed=7), TR.motion(t, seed=8)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.scale, b.scale)
    assert a.params == b.params
    assert not np.array_equal(a.theta, c.theta)


def test_motion_edge_cases():
    assert len(TR.motion([], seed=0).theta) == 0
    one = TR.motion([0.0], seed=0)
    assert one.theta.tolist() == [0.0] and one.scale.tolist() == [1.0]
    with pytest.raises(ValueError):
        TR.motion([0.0, 0.0], seed=0)
    none = TR.Motion.none(4)
    assert none.theta.tolist() == [0] * 4 and none.scale.tolist() == [1] * 4


# -- VA per frame ------------------------------------------------------------------------------------
def test_hold_va_keeps_the_last_and_starts_neutral():
    nan = np.nan
    va = np.array([[nan, nan], [0.5, 0.1], [nan, nan], [nan, 0.3], [-0.2, 0.4]])
    held = TR.hold_va(va)
    np.testing.assert_allclose(held, [TR.NEUTRAL, [0.5, 0.1], [0.5, 0.1], [0.5, 0.1], [-0.2, 0.4]])
    np.testing.assert_allclose(TR.hold_va(np.full((3, 2), nan)), [TR.NEUTRAL] * 3)


def test_smooth_va_uses_frame_times():
    t = np.array([0.0, 0.1, 0.2, 1.0, 1.1])
    va = np.array([[0, 0], [1, 1], [0, 0], [1, 0], [1, 0]], float)
    np.testing.assert_array_equal(TR.smooth_va(va, t, 0.0), va)
    s = TR.smooth_va(va, t, 0.25)
    np.testing.assert_allclose(s[1], [1 / 3, 1 / 3])  # 0.0..0.2 averaged
    np.testing.assert_allclose(s[3], [1, 0])  # the gap keeps 0.2 s out
    const = np.tile([0.3, -0.2], (5, 1))
    np.testing.assert_allclose(TR.smooth_va(const, t, 2.0), const)


def test_quantise_va():
    assert TR.quantise_va((0.123456, -0.9999)) == (0.12, -1.0)
    assert TR.quantise_va((1.2, -3)) == (1.0, -1.0)


# -- images and the video ---------------------------------------------------------------------------
def test_apply_motion_rotates_scales_and_fills_with_the_border_colour():
    img = np.full((64, 64, 3), (10, 200, 30), np.uint8)
    img[16:48, 16:48] = 250
    assert TR.apply_motion(img, 0.0, 1.0) is img
    out = TR.apply_motion(img, 10.0, float(TR.fit_scale(10.0)))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (10, 200, 30)  # uncovered corner: border colour
    assert abs(int(out[32, 32, 0]) - 250) <= 1  # centre stays the centre


def _coloured(role: str, k: int) -> np.ndarray:
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0 if role == "parent" else 2] = (k * 37) % 256
    return img


def test_compose_keeps_frame_count_and_variable_timing(tmp_path):
    rng = np.random.default_rng(1)
    tb = 1 / 90000
    pts = np.cumsum(np.r_[1234, rng.integers(3000, 9000, 44)]).astype(np.int64)  # VFR, offset start
    t = (pts - pts[0]) * tb
    motions = {"parent": TR.motion(t, 0), "infant": TR.motion(t, 1)}
    out = tmp_path / "v.mp4"
    reports = []
    n = TR.compose(
        out,
        pts,
        tb,
        len(pts) / (t[-1] + 0.06),
        _coloured,
        motions,
        {"parent": (128, 128), "infant": (96, 128)},  # panels keep their photos' aspects
        report=lambda d, tot: reports.append((d, tot)),
    )
    assert n == len(pts) and reports[-1] == (len(pts), len(pts))
    with av.open(str(out)) as c:
        vs = c.streams.video[0]
        frames = list(c.decode(vs))
        assert vs.codec_context.name == "h264" and not c.streams.audio
    assert len(frames) == len(pts)
    assert (frames[0].width, frames[0].height) == (224, 128)
    got = np.array([f.pts * float(f.time_base) for f in frames])
    np.testing.assert_allclose(got - got[0], t, atol=1e-4)
    # The left half is the parent (red channel), the right the infant (blue).
    rgb = frames[5].to_ndarray(format="rgb24")
    assert rgb[64, 64, 0] > rgb[64, 64, 2] and rgb[64, 176, 2] > rgb[64, 176, 0]


def test_panel_sizes_keep_each_photos_aspect_at_one_even_height():
    shapes = {"parent": (1200, 900, 3), "infant": (481, 641, 3)}
    # default: the smaller photo's height (even), each aspect kept
    assert TR.panel_sizes(shapes) == {"parent": (360, 480), "infant": (640, 480)}
    assert TR.panel_sizes(shapes, 200) == {"parent": (150, 200), "infant": (266, 200)}
    # at most MAX_PANEL_HEIGHT by default
    big = {"parent": (4000, 3000, 3), "infant": (3000, 3000, 3)}
    assert TR.panel_sizes(big) == {"parent": (810, 1080), "infant": (1080, 1080)}


def test_compose_removes_a_partial_file_on_failure(tmp_path):
    def boom(role, k):
        if k == 3:
            raise RuntimeError("render failed")
        return _coloured(role, k)

    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError):
        TR.compose(
            out,
            np.arange(10) * 3000,
            1 / 90000,
            30.0,
            boom,
            {"parent": TR.Motion.none(10), "infant": TR.Motion.none(10)},
            {"parent": (64, 64), "infant": (64, 64)},
        )
    assert not out.exists()


def test_va_table_csv():
    import pandas as pd

    data = TR.va_table_csv(
        np.array([0.0, 0.07]),
        {"parent_seen": np.array([1, 0]), "parent_valence_judged": np.array([0.123456, np.nan])},
    )
    df = pd.read_csv(io.BytesIO(data))
    assert list(df.columns) == ["frame", "timestamp", "parent_seen", "parent_valence_judged"]
    assert df["frame"].tolist() == [1, 2] and df["parent_valence_judged"][0] == 0.1235


# -- the avImage figure --------------------------------------------------------------------------
def test_matrix_render_and_grid_order():
    import cv2

    vals, aros = MX.grid_order([0.5, -1, 0.5, 1], [-1, 1, 0])
    assert vals == [-1.0, 0.5, 1.0] and aros == [1.0, 0.0, -1.0]
    cells = np.zeros((3, 3, 32, 32, 3), np.uint8)
    for r in range(3):
        for c in range(3):
            cells[r, c] = (80 * r, 80 * c, 255)
    data = MX.render(
        cells, vals, aros, source=np.full((32, 32, 3), 128, np.uint8), judged=np.zeros((3, 3, 2))
    )
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 96 and img.shape[1] > 96
    with pytest.raises(ValueError):
        MX.render(cells[:2], vals, aros)


# -- the service's input checks ------------------------------------------------------------------
def _status(fn, *a):
    with pytest.raises(rpc.UserError) as ei:
        fn(*a)
    return ei.value


def test_decode_image_rejects_non_images_precisely():
    from services.synth import images as S

    e = _status(S.decode_image, b"%PDF-1.4 not an image", "image")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "could not be read as an image" in str(e)
    e = _status(S.decode_image, b"", "parent_face")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "parent_face is empty" in str(e)
    e = _status(S.decode_image, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image")  # a truncated PNG
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_check_va_and_model_name():
    from dyadlab.v1 import synth_pb2
    from services.synth import checks as S

    assert S.check_va(synth_pb2.VA(valence=1.0, arousal=-1.0), "target") == (1.0, -1.0)
    for v, a in ((1.01, 0), (0, -1.5), (math.nan, 0), (math.inf, 0)):
        e = _status(S.check_va, synth_pb2.VA(valence=v, arousal=a), "target")
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "outside [-1, 1]" in str(e)
    assert S.check_model("") == "synth"
    assert _status(S.check_model, "../x").code == grpc.StatusCode.INVALID_ARGUMENT


def test_find_and_align_on_real_faces_and_a_faceless_image():
    from dyadlab.face.still import find_face
    from services.synth import images as S
    from services.synth import landmarks as L

    for path in (pyfeat_image("single_face.jpg"), expression_image("Aaron_Guiel_0001.jpg")):
        rgb = S.decode_image(path.read_bytes(), path.name)
        face = S.find_and_align(rgb, 128, path.name)
        crop, lm = face.crop, face.landmarks
        assert crop.shape == (128, 128, 3) and lm.shape == (68, 2) and face.photo is rgb
        eyes = lm[36:42].mean(0), lm[42:48].mean(0)
        assert abs(eyes[0][1] - eyes[1][1]) < 1.0  # aligned: eyes level
        assert 0 < lm[:, 0].min() and lm[:, 0].max() < 128
        # M maps the photo's own landmarks onto the crop's (also when the
        # photo was shrunk before the warp), and back
        found = find_face(rgb, cnn_fallback=True)
        assert found is not None
        np.testing.assert_allclose(L.transform_points(found.landmarks, face.M), lm, atol=1e-3)
        np.testing.assert_allclose(L.transform_points(lm, L.invert(face.M)), found.landmarks, atol=1e-3)
        # the photo resized: the same face under the resized M
        small = face.resized(rgb.shape[1] // 2, rgb.shape[0] // 2)
        f = (small.photo.shape[1] / rgb.shape[1], small.photo.shape[0] / rgb.shape[0])
        q = (found.landmarks + 0.5) * f - 0.5
        np.testing.assert_allclose(L.transform_points(q, small.M), lm, atol=1e-3)
    rgb = S.decode_image(pyfeat_image("free-mountain-vector-01.jpg").read_bytes(), "image")
    e = _status(S.find_and_align, rgb, 64, "infant_face")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "no face found in infant_face" in str(e)
