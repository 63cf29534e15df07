"""Shared positive affect: both smiling at once, and shared-smile episodes.

Over jointly valid frames: ``fraction`` = share of frames where both have
AU12 >= their own threshold, ``expected = p_parent x p_infant`` (the
independence expectation over the same frames) and ``ratio``.  An *episode*
is a *shared run* -- consecutive jointly valid grid frames in which both
persons' smoothed AU12 (centred moving average over ``smooth_s``, valid
frames only, so frame noise does not split a run at the threshold) is at or
above their threshold.  A person's *peaks* are the local maxima of their
smoothed trace with a topographic prominence of at least ``min_prominence``
(0.5 AU12; ``scipy.signal.find_peaks`` per contiguous valid stretch), so
noise wiggles on a flank or a smile's top are not peaks, and a maximum on the
run's edge (one person still rising, or already falling, when the other
crosses the threshold) is not a peak *within* the run.  A person's peak in
the run is their highest peak inside it; the run is an episode when both
have one and the two are at most ``peak_tolerance_s`` apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.signal import find_peaks

from .align import _EPS, Aligned, require_joint


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) index runs of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1))


def _smooth_valid(x: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Centred moving average over k frames using valid frames only; NaN at
    invalid frames."""
    if k <= 1:
        return np.where(valid, x, np.nan)
    ker = np.ones(k)
    num = np.convolve(np.where(valid, x, 0.0), ker, mode="same")
    den = np.convolve(valid.astype(float), ker, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid & (den > 0), num / den, np.nan)


def _peaks(s: np.ndarray, min_prominence: float) -> np.ndarray:
    """Mask of local maxima of s (NaN = invalid) with at least
    ``min_prominence``, found per contiguous valid stretch
    (``scipy.signal.find_peaks``; a plateau gives its middle frame)."""
    pk = np.zeros(len(s), bool)
    for a, b in _runs(np.isfinite(s)):
        if b - a >= 2:
            idx, _ = find_peaks(s[a : b + 1], prominence=min_prominence)
            pk[a + idx] = True
    return pk


EPISODE_COLUMNS = [
    "start_s",
    "end_s",
    "duration_s",
    "parent_peak_s",
    "infant_peak_s",
    "peak_gap_s",
    "parent_peak_au12",
    "infant_peak_au12",
]


def shared_affect(
    aligned: Aligned,
    parent_threshold: float = 1.5,
    infant_threshold: float = 1.5,
    peak_tolerance_s: float = 1.0,
    smooth_s: float = 0.25,
    min_prominence: float = 0.5,
) -> dict:
    """Shared positive affect over jointly valid time (module doc).

    Returns fraction, expected, ratio, p_parent, p_infant, n_joint_frames,
    n_both_frames, n_shared_runs (smoothed, see module doc), n_episodes,
    episodes (DataFrame:
    EPISODE_COLUMNS; peak_gap_s = infant peak - parent peak) and the
    parameters."""
    al = aligned
    require_joint(al)
    J = al.joint
    with np.errstate(invalid="ignore"):
        on_p = J & (al.au12_parent >= parent_threshold)
        on_i = J & (al.au12_infant >= infant_threshold)
    both = on_p & on_i
    nj = al.n_joint
    frac, pp, pi = both.sum() / nj, on_p.sum() / nj, on_i.sum() / nj
    expected = pp * pi
    k = max(1, 2 * int(round((smooth_s * al.rate - 1) / 2)) + 1)
    sp = _smooth_valid(al.au12_parent, al.valid_parent, k)
    si = _smooth_valid(al.au12_infant, al.valid_infant, k)
    pkp, pki = _peaks(sp, min_prominence), _peaks(si, min_prominence)
    with np.errstate(invalid="ignore"):
        runs = _runs(J & (sp >= parent_threshold) & (si >= infant_threshold))
    eps = []
    for a, b in runs:
        cp, ci = a + np.flatnonzero(pkp[a : b + 1]), a + np.flatnonzero(pki[a : b + 1])
        if not len(cp) or not len(ci):
            continue
        jp, ji = cp[np.argmax(sp[cp])], ci[np.argmax(si[ci])]
        gap = (ji - jp) / al.rate
        if abs(gap) <= peak_tolerance_s + _EPS:
            eps.append(
                (
                    al.t[a],
                    al.t[b],
                    (b - a + 1) / al.rate,
                    al.t[jp],
                    al.t[ji],
                    gap,
                    al.au12_parent[jp],
                    al.au12_infant[ji],
                )
            )
    episodes = pd.DataFrame(eps, columns=EPISODE_COLUMNS).astype(float)
    return {
        "fraction": float(frac),
        "expected": float(expected),
        "ratio": float(frac / expected) if expected > 0 else np.nan,
        "p_parent": float(pp),
        "p_infant": float(pi),
        "n_joint_frames": nj,
        "n_both_frames": int(both.sum()),
        "n_shared_runs": len(runs),
        "n_episodes": len(episodes),
        "episodes": episodes,
        "parent_threshold": float(parent_threshold),
        "infant_threshold": float(infant_threshold),
        "peak_tolerance_s": float(peak_tolerance_s),
        "smooth_s": float(smooth_s),
        "min_prominence": float(min_prominence),
    }
