"""AU intensity (OpenFace's 0-5 scale) from 68-point landmark geometry.

No AU model ships in any package we may use, so AU12 (lip corner puller) and
AU6 (cheek raiser) are estimated from geometry, person-specifically
calibrated as OpenFace does (its predictions are shifted so that a low
percentile of each person's video is the neutral level).

Coordinates: each face is put in its own frame — origin between the outer eye
corners (36, 45), x along the eye line, y down, unit = inter-ocular distance
(IOD) — which removes position, in-plane rotation and scale.

AU12. The lip corner puller widens the mouth: w = |P48 − P54| in IOD, and
  AU12 = clip(K · (w − w₀), 0, 5),   K = 1.5 / 0.13
K is the calibration anchor measured against real OpenFace 2.x output on a
held-out video: AU12_r = 1.5 at 0.13 IOD above the person's 10th-percentile
width, and this width trace correlated r = 0.94 with AU12_r over 288 frames
with head motion and talking.
We tried to do better with the corners' lift over the lip line,
c = mean(y48, y54) − (y62 + y66)/2 (at rest −0.02 in all three adults, in
smiles −0.06 to −0.14): on the labelled real clips, width + lift separated
smile from non-smile frames no better than width alone (ROC AUC 0.878 vs
0.901 on the crying/laughing clip, 0.983 vs 0.975 on the talking clip, 1.0
for both on the others; frames at AU12 >= 1.5: 59 % vs 75 % of smile frames
and 3 % vs 5 % of the others on the crying/laughing clip), so AU12 keeps the
anchor's validated width measure; scripts/calibrate_au.py prints both.
Neutral: w₀ = the person's 10th-percentile width (the anchor's definition),
kept inside the anthropometric range of a resting mouth. Adults' mouth width
(cheilion–cheilion) is 0.55–0.62 of their outer-canthal width (exocanthion–
exocanthion; Farkas' norms: about 50–55 mm against 88–91 mm) and all three
adults of the calibration clips rest at 0.585–0.61; a clip spent mostly
pursing or talking with rounded lips would otherwise set w₀ far too low (d5:
0.45) and read rest as a smile. Range: ADULT_REST_WIDTH; for infants and
unknown roles the wider INFANT_REST_WIDTH (a guess: infants' mouths are
relatively narrower; configurable). Like OpenFace's own per-person correction this assumes the person rests some
of the time: someone who smiles through a whole clip scores low.

AU6. The cheek raiser lifts the lower eyelid: its depth below the line of the
eye corners shrinks. d = mean over both eyes of (lower-lid y − corner-line y)
in IOD; Δd = d₀ − d against the median depth over the frames within 0.03
IOD of w₀ (measured: d ≈ 0.018–0.031 at rest, 0.002–0.015 in broad smiles);
AU6 = clip(K6 · Δd, 0, 5). A running median over ~0.25 s removes blinks
(in which dlib's lids meet in the middle). K6 is set so that the broad,
eye-crinkling smiles of the calibration clips reach AU6 ≈ 2.5–3, OpenFace's
usual range for such smiles — a documented scale, not a measured one.

AU25 (lips part) = clip(K25 · inner-lip gap, 0, 5) with the gap |P62 − P66|
in IOD; reported as a rough speech/laughter cue.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter

K_AU12 = 1.5 / 0.13
ADULT_REST_WIDTH = (0.54, 0.64)
INFANT_REST_WIDTH = (0.40, 0.64)
K_AU6 = 140.0
K_AU25 = 12.0
NEUTRAL_PCT = 10.0
MIN_FRAMES = 10
JITTER_OK = 0.015
JITTER_SPAN = 0.02
JITTER_MIN_PX = 1.0
JITTER_FPS = 20.0


def face_coordinates(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 68, 2) image landmarks -> (aligned landmarks in IOD units, IOD in px)."""
    p36, p45 = lm[:, 36], lm[:, 45]
    axis = p45 - p36
    iod = np.linalg.norm(axis, axis=1)
    ex = axis / np.where(iod > 0, iod, np.nan)[:, None]
    ey = np.stack([-ex[:, 1], ex[:, 0]], axis=1)
    rel = lm - ((p36 + p45) / 2)[:, None, :]
    a = np.stack([(rel * ex[:, None, :]).sum(-1), (rel * ey[:, None, :]).sum(-1)], axis=-1)
    return a / iod[:, None, None], iod


def geometry(lm: np.ndarray) -> dict[str, np.ndarray]:
    a, iod = face_coordinates(lm)
    width = np.linalg.norm(a[:, 48] - a[:, 54], axis=1)
    corner = (a[:, 48, 1] + a[:, 54, 1]) / 2 - (a[:, 62, 1] + a[:, 66, 1]) / 2
    lid_r = (a[:, 40, 1] + a[:, 41, 1]) / 2 - (a[:, 36, 1] + a[:, 39, 1]) / 2
    lid_l = (a[:, 46, 1] + a[:, 47, 1]) / 2 - (a[:, 42, 1] + a[:, 45, 1]) / 2
    gap = np.linalg.norm(a[:, 62] - a[:, 66], axis=1)
    return {"width": width, "corner": corner, "lid": (lid_r + lid_l) / 2, "gap": gap, "iod": iod}


def jitter(lm: np.ndarray, fps: float) -> np.ndarray:
    """Landmark instability per frame: mean |second difference| of the mouth
    points (48-67) in IOD units, median-filtered over ~0.3 s.

    Measured on real clips: 0.007-0.011 for visible faces (talking and
    laughing included), 0.023 where a hand covers the mouth and dlib's
    points wander. Used to lower the confidence of such frames.
    """
    a, _ = face_coordinates(lm)
    m = a[:, 48:68]
    j = np.full(len(a), np.nan)
    if len(a) >= 3:
        j[1:-1] = np.linalg.norm(m[1:-1] - (m[:-2] + m[2:]) / 2, axis=2).mean(axis=1)
    finite = np.isfinite(j)
    if finite.sum() >= 3:
        k = max(3, int(round(0.3 * (fps if fps > 0 else 30))) | 1)
        j[finite] = median_filter(j[finite], size=k, mode="nearest")
    return j


def stability(j: np.ndarray, iod_px: np.ndarray, fps: float = 30.0) -> np.ndarray:
    """Confidence factor in [0, 1]: 1 up to jitter JITTER_OK, 0 at OK + SPAN.

    On small faces the threshold never goes below what one pixel of landmark
    noise amounts to (JITTER_MIN_PX / IOD). The thresholds were measured on
    24-30 fps clips; below JITTER_FPS frames are further apart, so real
    movement between them is larger (a lively infant at 14 fps) and the
    thresholds grow with JITTER_FPS / fps. Above it they stay as measured
    (the occlusion they catch at 24 fps must stay caught).
    """
    k = max(1.0, JITTER_FPS / fps) if fps > 0 else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.maximum(JITTER_OK * k, JITTER_MIN_PX / iod_px)
    f = np.clip(1.0 - (j - ok) / (JITTER_SPAN * k), 0.0, 1.0)
    return np.where(np.isfinite(j) & np.isfinite(ok), f, 1.0)


def neutral(g: dict[str, np.ndarray], ok: np.ndarray,
            rest_width: tuple[float, float] = ADULT_REST_WIDTH) -> tuple[float, np.ndarray]:
    """The person's resting width w₀ and the frames near it (rest for AU6)."""
    w0 = float(np.clip(np.percentile(g["width"][ok], NEUTRAL_PCT), *rest_width))
    near = ok & (np.abs(g["width"] - w0) <= 0.03)
    return w0, (near if near.sum() >= 3 else ok)


def estimate(lm: np.ndarray, fps: float, usable: np.ndarray | None = None,
             rest_width: tuple[float, float] = ADULT_REST_WIDTH) -> dict[str, np.ndarray]:
    """AU06_r, AU12_r, AU25_r for one person's frames, in time order, and
    "rest_width": the resting mouth width w₀ (IOD) the AU12 scale used.

    `usable` marks the frames whose landmarks may set the neutral reference
    (tracked with reasonable confidence); all frames get estimates.
    """
    n = len(lm)
    g = geometry(lm)
    ok = np.isfinite(g["width"]) & (np.ones(n, bool) if usable is None else usable)
    out = {k: np.full(n, np.nan) for k in ("AU06_r", "AU12_r", "AU25_r")}
    out["rest_width"] = float("nan")
    if ok.sum() < MIN_FRAMES:
        ok = np.isfinite(g["width"])
        if ok.sum() < 2:
            return out
    w0, rest = neutral(g, ok, rest_width)
    out["rest_width"] = w0
    d0 = float(np.median(g["lid"][rest]))
    out["AU12_r"] = np.clip(K_AU12 * (g["width"] - w0), 0, 5)
    k = max(3, int(round(0.25 * (fps if fps > 0 else 30))) | 1)
    lid = g["lid"].copy()
    finite = np.isfinite(lid)
    lid[finite] = median_filter(lid[finite], size=k, mode="nearest")
    out["AU06_r"] = np.clip(K_AU6 * (d0 - lid), 0, 5)
    out["AU25_r"] = np.clip(K_AU25 * g["gap"], 0, 5)
    return out
