"""Emotion transfer's pure parts: per-frame VA of the real partners, the
paper's rotation/resize post-processing, and the side-by-side MP4.

The service (``service.py``) does the I/O -- the extractor's frame table, the
judge and the generator in TorchServe, the store -- and hands this module
arrays and callables, so everything here runs without a network.

VA per frame (`hold_va`, `smooth_va`)
    Frames in which a partner's face was not judged (not tracked, low
    confidence, undecodable) keep the last judged VA; frames before the first
    judged one are neutral (Wang et al.'s Table II neutral point). The judge
    is noisy from frame to frame, so the held series is then smoothed with a
    centred moving average over `smooth_s` seconds of the frames' real
    timestamps (variable frame rate safe).

Post-processing (`motion`), after Wang et al. 2021 (avLandmarkGAN), to give
the generated faces a head's natural sway:

* rotation  theta(i) = (sin(a*i) + sin(b*i)) / 2 * m   (degrees), with
  a, b drawn from [-2, -1] U [1, 2] and m from [0, 10]; when theta returns
  to 0 (changes sign, or is exactly 0 after the start) a, b and m are drawn
  again and i restarts at 0, so theta stays continuous;
* resize    s(i) = 1 - |sin(c*i) + sin(d*i)| / 2 * n, with c, d drawn like a,
  b and n from [0, 0.2]; re-drawn likewise when sin(c*i) + sin(d*i) returns
  to 0 (s back at 1);
* the largest scale at which the frame rotated by theta still fits inside
  the frame: s_r = tan|theta| / ((1 + tan|theta|) * sin|theta|)
  = 1 / (cos|theta| + sin|theta|) (1 at theta = 0; the paper writes theta,
  |theta| makes it symmetric for negative angles);
* each frame is rotated by theta about its centre and scaled by
  min(s, s_r) <= 1; uncovered corners take the face image's border colour.

  The clock i: the time in seconds since the segment's last re-draw. Counted
  in frames, a, b in [1, 2] rad per step would swing the head at 5-10 Hz
  (4-6 frames per period); in seconds a period is 3-6 s, a head's sway.
  `I_PER_SECOND` sets the scale. Everything is drawn from one
  ``numpy.random.default_rng(seed)``: the same seed and frame times give the
  same motion.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from services.synth.data import TABLE_II

#: Table II's neutral point: the VA a face has before it is first seen.
NEUTRAL = TABLE_II["neutral"]
#: units of the post-processing's clock i per second of video
I_PER_SECOND = 1.0
M_MAX = 10.0  # degrees
N_MAX = 0.2
FREQ_RANGE = (1.0, 2.0)
DEFAULT_SMOOTH_S = 0.3
MAX_PANEL_HEIGHT = 1080  # default panel height: the photos' own, at most this


# -- VA per frame -----------------------------------------------------------------------
def hold_va(va: np.ndarray, neutral: tuple[float, float] = NEUTRAL) -> np.ndarray:
    """(N, 2) VA with NaN rows where the face was not judged -> every row
    filled with the last judged VA (`neutral` before the first)."""
    a = np.asarray(va, np.float64).reshape(-1, 2).copy()
    last = np.asarray(neutral, np.float64)
    for i in range(len(a)):
        if np.isfinite(a[i]).all():
            last = a[i]
        else:
            a[i] = last
    return a


def smooth_va(va: np.ndarray, times_s: np.ndarray, window_s: float) -> np.ndarray:
    """Centred moving average of (N, 2) VA over `window_s` seconds of frame time."""
    a = np.asarray(va, np.float64).reshape(-1, 2)
    t = np.asarray(times_s, np.float64)
    if window_s <= 0 or len(a) < 2:
        return a.copy()
    half = window_s / 2
    lo = np.searchsorted(t, t - half, side="left")
    hi = np.searchsorted(t, t + half, side="right")
    csum = np.vstack([np.zeros((1, 2)), np.cumsum(a, axis=0)])
    return (csum[hi] - csum[lo]) / (hi - lo)[:, None]


def quantise_va(va: Sequence[float], step: float = 0.01) -> tuple[float, float]:
    """VA rounded to `step` and clipped to [-1, 1]: the key under which a
    generated face is re-used (far finer than the judge's own error)."""
    v = np.clip(np.round(np.asarray(va, np.float64) / step) * step, -1.0, 1.0)
    return float(round(v[0], 6)), float(round(v[1], 6))


# -- post-processing ------------------------------------------------------------------------
def fit_scale(theta_deg) -> np.ndarray:
    """s_r = tan|t| / ((1 + tan|t|) sin|t|) = 1 / (cos|t| + sin|t|); 1 at t = 0."""
    t = np.abs(np.radians(np.asarray(theta_deg, np.float64)))
    with np.errstate(invalid="ignore", divide="ignore"):
        tan, sin = np.tan(t), np.sin(t)
        sr = tan / ((1.0 + tan) * sin)
    return np.where(t < 1e-9, 1.0, sr)


def _draw_freq(rng: np.random.Generator) -> float:
    """Uniform on [-2, -1] U [1, 2]."""
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(*FREQ_RANGE))


@dataclasses.dataclass
class Motion:
    """Per-frame post-processing of one face stream."""

    theta: np.ndarray  # degrees
    s: np.ndarray  # the resize term
    s_r: np.ndarray  # the rotation-fit term
    theta_redraws: list[int]  # frames at which (a, b, m) were drawn (the first is 0)
    scale_redraws: list[int]  # frames at which (c, d, n) were drawn
    params: list[tuple]  # (frame, "theta"|"scale", (f1, f2, amplitude)) per draw

    @property
    def scale(self) -> np.ndarray:
        return np.minimum(self.s, self.s_r)

    @classmethod
    def none(cls, n: int) -> Motion:
        z = np.zeros(n)
        return cls(z, np.ones(n), np.ones(n), [], [], [])


def _oscillator(
    clock: np.ndarray, rng: np.random.Generator, amp_max: float, kind: str, params: list
) -> tuple[np.ndarray, list[int]]:
    """(sin(f1*i) + sin(f2*i)) / 2 * amp per frame, re-drawn (and i restarted)
    whenever it returns to 0. `clock` is each frame's time in units of i."""
    n = len(clock)
    out = np.zeros(n)
    redraws: list[int] = []
    k = 0
    while k < n:
        f1, f2, amp = _draw_freq(rng), _draw_freq(rng), float(rng.uniform(0.0, amp_max))
        redraws.append(k)
        params.append((k, kind, (f1, f2, amp)))
        t0 = clock[k]
        out[k] = 0.0
        prev = 0.0
        j = k + 1
        while j < n:
            i = clock[j] - t0
            v = (math.sin(f1 * i) + math.sin(f2 * i)) / 2.0
            if v == 0.0 or (prev != 0.0 and math.copysign(1.0, v) != math.copysign(1.0, prev)):
                break  # back at 0: re-draw from this frame (where the value restarts at 0)
            out[j] = v * amp
            prev = v
            j += 1
        k = j
    return out, redraws


def motion(
    times_s: Sequence[float] | np.ndarray,
    seed: int,
    m_max: float = M_MAX,
    n_max: float = N_MAX,
    i_per_second: float = I_PER_SECOND,
) -> Motion:
    """The rotation/resize track of one face for frames at `times_s` (seconds)."""
    t = np.asarray(times_s, np.float64)
    if len(t) and not (np.diff(t) > 0).all():
        raise ValueError("frame times must increase")
    clock = (t - (t[0] if len(t) else 0.0)) * i_per_second
    rng = np.random.default_rng(seed)
    params: list = []
    theta, t_red = _oscillator(clock, rng, m_max, "theta", params)
    osc, s_red = _oscillator(clock, rng, 1.0, "scale", params)
    # The resize term is 1 - |sin(c i) + sin(d i)| / 2 * n: the oscillator gives
    # (sin + sin) / 2 * amp with amp ~ U[0, 1]; scale amp to n ~ U[0, n_max].
    s = 1.0 - np.abs(osc) * n_max
    return Motion(theta, s, fit_scale(theta), t_red, s_red, params)


def border_colour(img: np.ndarray) -> tuple[int, ...]:
    """Median colour of the image's one-pixel border."""
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).reshape(-1, img.shape[2])
    return tuple(int(v) for v in np.median(edge, axis=0))


def apply_motion(img: np.ndarray, theta_deg: float, scale: float) -> np.ndarray:
    """Rotate `img` by theta (degrees, counter-clockwise) about its centre and
    scale it by `scale`; uncovered pixels take the border colour."""
    if theta_deg == 0.0 and scale == 1.0:
        return img
    h, w = img.shape[:2]
    M = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(theta_deg), float(scale))
    return cv2.warpAffine(
        img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border_colour(img)
    )


def panel_sizes(shapes: dict[str, tuple[int, ...]], height: int = 0) -> dict[str, tuple[int, int]]:
    """role -> (width, height) of its panel: every panel `height` pixels high
    (0: the smallest photo's height, at most MAX_PANEL_HEIGHT), each photo's
    aspect kept; sides rounded to even numbers (yuv420p)."""
    h = height or min(MAX_PANEL_HEIGHT, min(int(sh[0]) for sh in shapes.values()))
    h = max(2, h - h % 2)
    out = {}
    for role, sh in shapes.items():
        w = max(2, int(round(sh[1] * h / sh[0])))
        out[role] = (w - w % 2, h)
    return out


def upscale(img: np.ndarray, px: int) -> np.ndarray:
    if img.shape[0] == px and img.shape[1] == px:
        return img
    return cv2.resize(img, (px, px), interpolation=cv2.INTER_CUBIC if px > img.shape[0] else cv2.INTER_AREA)


def fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` at (width, height) (area-averaged down, cubic up)."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if size[0] < w else cv2.INTER_CUBIC)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([left, right], axis=1))


# -- the video ---------------------------------------------------------------------------
class Mp4Writer:
    """H.264 MP4 (yuv420p) whose frames carry given presentation times, so a
    variable-frame-rate input keeps its exact timing and frame count."""

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        time_base: float,
        avg_fps: float,
        crf: int = 20,
    ):
        import av

        if width % 2 or height % 2:
            raise ValueError("width and height must be even for yuv420p")
        self.tb = fractions.Fraction(time_base).limit_denominator(1 << 30)
        self._c: av.container.OutputContainer | None = av.open(str(path), "w", format="mp4")
        rate = fractions.Fraction(avg_fps).limit_denominator(1001) if avg_fps > 0 else 25
        s = self._c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.time_base = self.tb
        s.codec_context.time_base = self.tb
        s.options = {"crf": str(crf), "preset": "veryfast"}
        self._s = s
        self._last: int | None = None
        self.frames = 0

    def write(self, rgb: np.ndarray, pts: int) -> None:
        import av

        pts = int(pts)
        if self._last is not None and pts <= self._last:
            raise ValueError("frame times must increase")
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        f.pts, f.time_base = pts, self.tb
        for pk in self._s.encode(f):
            assert self._c is not None  # written to before close()
            self._c.mux(pk)
        self._last = pts
        self.frames += 1

    def close(self) -> None:
        if self._c is None:
            return
        try:
            for pk in self._s.encode():
                self._c.mux(pk)
        finally:
            self._c.close()
            self._c = None

    def abort(self) -> None:
        if self._c is not None:
            try:
                self._c.close()
            except Exception:  # noqa: BLE001 - the file is discarded anyway
                pass
            self._c = None


def compose(
    out: str | os.PathLike,
    pts: np.ndarray,
    time_base: float,
    avg_fps: float,
    render: Callable[[str, int], np.ndarray],
    motions: dict[str, Motion],
    sizes: dict[str, tuple[int, int]],
    report: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Write the side-by-side video: frame k = [parent | infant], each
    `render(role, k)` (an RGB image, resized to its panel's (width, height)
    in `sizes` if it is not already) moved by its Motion. `pts` are the
    frames' presentation times in `time_base` units."""
    n = len(pts)
    heights = {h for _, h in sizes.values()}
    if len(heights) != 1:
        raise ValueError(f"panels must share one height, got {sizes}")
    width = sum(w for w, _ in sizes.values())
    w = Mp4Writer(out, width, heights.pop(), time_base, avg_fps)
    try:
        for k in range(n):
            panels = []
            for role in ("parent", "infant"):
                m = motions[role]
                img = fit(render(role, k), sizes[role])
                panels.append(apply_motion(img, m.theta[k], float(m.scale[k])))
            w.write(side_by_side(*panels), pts[k] - pts[0])
            report(k + 1, n)
        w.close()
    except BaseException:
        w.abort()
        Path(out).unlink(missing_ok=True)
        raise
    return w.frames


def va_table_csv(times_s: np.ndarray, columns: dict[str, np.ndarray]) -> bytes:
    """CSV bytes: frame (1-based), timestamp, then the given columns in order."""
    import pandas as pd

    df = pd.DataFrame({"frame": np.arange(1, len(times_s) + 1), "timestamp": np.round(times_s, 4)})
    for k, v in columns.items():
        v = np.asarray(v)
        df[k] = np.round(v, 4) if v.dtype.kind == "f" else v
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode()
