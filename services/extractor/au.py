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


def neutral(
    g: dict[str, np.ndarray], ok: np.ndarray, rest_width: tuple[float, float] = ADULT_REST_WIDTH
) -> tuple[float, np.ndarray]:
    """The person's resting width w₀ and the frames near it (rest for AU6)."""
    w0 = float(np.clip(np.percentile(g["width"][ok], NEUTRAL_PCT), *rest_width))
    near = ok & (np.abs(g["width"] - w0) <= 0.03)
    return w0, (near if near.sum() >= 3 else ok)


def estimate(
    lm: np.ndarray,
    fps: float,
    usable: np.ndarray | None = None,
    rest_width: tuple[float, float] = ADULT_REST_WIDTH,
) -> dict[str, np.ndarray]:
    """AU06_r, AU12_r, AU25_r for one person's frames, in time order, and
    "calibration": what the scale used (the resting mouth width w₀ in IOD).

    `usable` marks the frames whose landmarks may set the neutral reference
    (tracked with reasonable confidence); all frames get estimates.
    """
    n = len(lm)
    g = geometry(lm)
    ok = np.isfinite(g["width"]) & (np.ones(n, bool) if usable is None else usable)
    out: dict = {k: np.full(n, np.nan) for k in ("AU06_r", "AU12_r", "AU25_r")}
    out["calibration"] = {
        "rest_width": float("nan"),
        "rest_width_range": list(rest_width),
        "channels": "geometry (2D mouth width)",
    }
    if ok.sum() < MIN_FRAMES:
        ok = np.isfinite(g["width"])
        if ok.sum() < 2:
            return out
    w0, rest = neutral(g, ok, rest_width)
    out["calibration"].update(rest_width=w0, neutral="10th percentile of the person's width")
    d0 = float(np.median(g["lid"][rest]))
    out["AU12_r"] = np.clip(K_AU12 * (g["width"] - w0), 0, 5)
    k = max(3, int(round(0.25 * (fps if fps > 0 else 30))) | 1)
    lid = g["lid"].copy()
    finite = np.isfinite(lid)
    lid[finite] = median_filter(lid[finite], size=k, mode="nearest")
    out["AU06_r"] = np.clip(K_AU6 * (d0 - lid), 0, 5)
    out["AU25_r"] = np.clip(K_AU25 * g["gap"], 0, 5)
    return out


# -- the mesh front-end: pose-robust 3D geometry fused with appearance -----------------
#
# Geometry channel (3D). The mesh's 68 points in 3D (image pixels + depth):
#   w = |P48 - P54| / |P36 - P45|  (3D lengths: a turned head shortens both alike)
#   g12 = clip(K_AU12 · (w - w0), 0, 5)           (the calibration anchor, as in 2D)
# w0, the neutral mouth, comes from the frames the appearance channel calls
# not smiling (a12 < NEUTRAL_A12, below): their NEUTRAL_PCT-th percentile
# (the anchor's definition), kept in the role's anthropometric range
# (adults ADULT_REST_WIDTH, infants INFANT_REST_WIDTH). A person with fewer
# than MIN_FRAMES such frames (who smiles through the whole clip) is
# measured against the role's population rest width (PRIOR_REST_WIDTH)
# instead of against her own smile.
# Appearance channel: the CNN's smile logit z (median-filtered over ~0.2 s)
# grows with the smile's breadth. Its scale is pinned by three logits
# measured on the held-out expression photos when the model was trained
# (`appearance.calibration()`): z_m, the median neutral face; z_n, the
# 90th-percentile neutral face, reads AU12 = 0; z_h, the median posed happy
# face (a clear, broad smile), reads the paper's threshold 1.5:
#   a12 = clip(1.5 · (z - z_n) / (z_h - z_n), 0, 5).
# Fusion: geometry measures, appearance vetoes and rescues:
#   AU12 = max(v · g12, a12),   v = clip((z - z_m) / (z_n - z_m), 0, 1).
# - geometry (the paper's calibrated width) gives the intensity wherever the
#   face does not look clearly unsmiling: v = 1 from the 90th-percentile
#   neutral look up, falling to 0 at the median neutral look (a mouth that is
#   wide but unsmiling: speech, a pressed or stretched mouth);
# - appearance takes over where it is sure of a smile that width
#   underestimates: a laugh whose jaw drops (the mouth opens more than it
#   widens), or a face that smiles through the whole clip (no neutral width).
# Measured on the real clips (docs/methods.md): the mean of the two channels
# missed subtle and one-sided smiles (appearance, trained on broad posed
# smiles, reads them near 0); geometry alone read pressed lips and a
# grimace as smiles. Known limit: the appearance model was trained on posed
# photos without cry faces, and a cry's stretched lips with squeezed eyes
# read as a weak smile to both channels.
# AU6 (cheek raiser) narrows the eye from below: eye aperture
#   e = mean over both eyes of |mid upper lid - mid lower lid| / IOD  (3D),
# relative narrowing against the neutral frames' median e0,
#   AU6 = clip(K_AU6_MESH · (e0 - e) / e0, 0, 5),
# with a ~0.25 s running median against blinks. K_AU6_MESH puts the broad
# smiles of the calibration clips (12-15 % narrower) at AU6 2.5-3, OpenFace's
# usual range for them: a documented scale, not a measured one.

NEUTRAL_A12 = 0.5
PRIOR_REST_WIDTH = {"adult": 0.59, "infant": 0.50}
K_AU6_MESH = 20.0
APP_SMOOTH_S = 0.2


def rest_range(role: str) -> tuple[float, float]:
    return ADULT_REST_WIDTH if role == "adult" else INFANT_REST_WIDTH


def geometry3d(lm3: np.ndarray) -> dict[str, np.ndarray]:
    """Mouth width, inner-lip gap and eye aperture in 3D inter-ocular units."""
    P = lambda i: lm3[:, i].astype(np.float64)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        iod = np.linalg.norm(P(45) - P(36), axis=1)
        width = np.linalg.norm(P(48) - P(54), axis=1) / iod
        gap = np.linalg.norm(P(62) - P(66), axis=1) / iod
        eye = (
            (
                np.linalg.norm((P(37) + P(38)) / 2 - (P(41) + P(40)) / 2, axis=1)
                + np.linalg.norm((P(43) + P(44)) / 2 - (P(47) + P(46)) / 2, axis=1)
            )
            / 2
            / iod
        )
    return {"width": width, "gap": gap, "eye": eye, "iod": iod}


def _running_median(x: np.ndarray, k: int) -> np.ndarray:
    out = x.copy()
    f = np.isfinite(x)
    if f.sum() >= 3 and k > 1:
        out[f] = median_filter(x[f], size=k, mode="nearest")
    return out


def _calibration() -> tuple[float, float, float]:
    from dyadlab.face import appearance

    return appearance.calibration()


def appearance_au12(smile_logit: np.ndarray) -> np.ndarray:
    """The appearance channel on the AU scale: a12 (module text)."""
    _, z_n, z_h = _calibration()
    return np.clip(1.5 * (np.asarray(smile_logit, np.float64) - z_n) / (z_h - z_n), 0, 5)


def appearance_weight(smile_logit: np.ndarray) -> np.ndarray:
    """How far the appearance lets geometry speak: v (module text)."""
    z_m, z_n, _ = _calibration()
    return np.clip((np.asarray(smile_logit, np.float64) - z_m) / (z_n - z_m), 0, 1)


def estimate_mesh(
    lm3: np.ndarray,
    smile_logit: np.ndarray,
    fps: float,
    usable: np.ndarray | None = None,
    role: str = "adult",
) -> dict:
    """AU06_r, AU12_r, AU25_r for one person's frames (time order) from the
    mesh front-end, and "calibration": what the scales used (module text)."""
    n = len(lm3)
    g = geometry3d(lm3)
    ok = np.isfinite(g["width"]) & (np.ones(n, bool) if usable is None else usable)
    out: dict = {k: np.full(n, np.nan) for k in ("AU06_r", "AU12_r", "AU25_r")}
    lo, hi = rest_range(role)
    calib = {
        "role": role or "unknown",
        "rest_width_range": [lo, hi],
        "channels": "3D mouth width where the appearance does not veto it, or the appearance "
        "channel where it reads higher",
        "rest_width": float("nan"),
        "neutral": "",
        "neutral_frames": 0,
    }
    out["calibration"] = calib
    if not np.isfinite(g["width"]).any():
        return out
    k = max(1, int(round(APP_SMOOTH_S * (fps if fps > 0 else 30))) | 1)
    z = _running_median(np.asarray(smile_logit, np.float64), k)
    a12, veto = appearance_au12(z), appearance_weight(z)
    neutral = ok & (a12 < NEUTRAL_A12)
    if neutral.sum() >= MIN_FRAMES:
        w0 = float(np.clip(np.percentile(g["width"][neutral], NEUTRAL_PCT), lo, hi))
        calib["neutral"] = (
            f"{NEUTRAL_PCT:g}th percentile of the mouth width in the "
            f"{int(neutral.sum())} frames the appearance channel calls not smiling"
        )
        e0 = float(np.nanmedian(g["eye"][neutral]))
    else:
        w0 = PRIOR_REST_WIDTH.get(role, PRIOR_REST_WIDTH["infant"])
        calib["neutral"] = (
            f"population rest width of the role (only {int(neutral.sum())} "
            "not-smiling frames: the face smiles throughout)"
        )
        e0 = float(np.nanpercentile(g["eye"][ok], 90)) if ok.any() else np.nan
    calib.update(rest_width=w0, neutral_frames=int(neutral.sum()))
    g12 = np.clip(K_AU12 * (g["width"] - w0), 0, 5)
    out["AU12_r"] = np.where(np.isfinite(z), np.maximum(veto * g12, a12), g12)
    eye = _running_median(g["eye"], max(3, int(round(0.25 * (fps if fps > 0 else 30))) | 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out["AU06_r"] = np.clip(K_AU6_MESH * (e0 - eye) / e0, 0, 5)
    out["AU25_r"] = np.clip(K_AU25 * g["gap"], 0, 5)
    return out


def describe_calibration(role: str, c: dict) -> str:
    """One sentence for a person: which scale this face's AUs are on."""
    who = role or "unknown role"
    w0 = c.get("rest_width", float("nan"))
    lo, hi = c.get("rest_width_range", (float("nan"),) * 2)
    w0s = f"{w0:.3f}" if w0 == w0 else "unknown"
    return (
        f"{who}: AU12 = {c.get('channels', '')}; neutral mouth width {w0s} IOD "
        f"({c.get('neutral', '') or 'no usable frames'}; {who} range {lo:.2f}-{hi:.2f}); "
        f"AU12 1.5 = {1.5 / K_AU12:.2f} IOD wider than neutral"
    )
