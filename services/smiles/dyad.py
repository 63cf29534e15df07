"""Dyad measures: how a parent's and an infant's smiles answer each other.

Neither seed paper measures the serve-and-return dynamic; this module does,
as a pure numpy/pandas library (no service, no I/O).  Every measure works on
an :class:`Aligned` pair of AU12 traces and uses **only jointly valid time**
(both faces found with enough confidence).

Conventions
-----------
* **Clock.**  Everything is on the *parent's* clock.  Two videos: the infant
  table keeps its own clock and ``infant time + offset_s = parent time``.
  Infant smile onsets are likewise given in the infant's own clock (as
  ``segment_smiles`` of the infant table returns them); ``offset_s`` is added
  here.  One video with two faces: ``offset_s = 0`` (see :func:`split_faces`).
* **Lag sign.**  ``r(lag)`` correlates ``parent[t]`` with ``infant[t + lag]``.
  A **positive lag means the infant follows the parent** (parent leads); a
  negative lag means the parent follows the infant.
* **Directions.**  ``parent_to_infant`` = the infant answering the parent:
  P(an infant smile begins within ``(0, W]`` s after a parent smile begins).
  ``infant_to_parent`` = the parent answering the infant (roles swapped).

1. Alignment (:func:`align`)
   Both traces are resampled onto one uniform grid from the later start to
   the earlier end of the two recordings, at ``rate`` Hz (default: the
   parent's median frame rate, rounded).  Grid point ``k`` is at
   ``t0 + k / rate``.  A person's frame is *valid* when ``success == 1``,
   ``confidence >= min_confidence`` (set per person: infant faces are often
   detected with lower confidence) and AU12 is finite.  AU12 at a grid point
   is linearly interpolated between the nearest valid frames on either side
   (an exact hit takes that frame) when those two are at most
   ``max_gap_factor`` (1.5) x ``max(grid step, that person's own median frame
   interval)`` apart, and NaN otherwise -- so a dropped or low-confidence
   frame (a 2-step hole at the grid rate) is a hole on the grid too, while a
   15 fps infant video on a 30 Hz grid is still interpolated.  Timestamps,
   not frame counts, are used throughout: VFR video works.

2. Smile onsets (:func:`onset_indices`)
   A smile's onset is its ``start_s`` (the start of the rise).  Onset times
   go to the nearest grid index; onsets outside the grid or at frames that
   are not jointly valid are dropped, and duplicates merge.

3. Contingency (:func:`contingency`)
   Observed: the fraction of trigger onsets followed by a responder onset
   within ``(0, W]`` s (``w = round(W * rate)`` grid frames, real time).
   Null: the **infant's** onset series is circularly shifted (the same shifts
   serve both directions; in ``parent_to_infant`` it moves the responses, in
   ``infant_to_parent`` the triggers).  The shift runs over the *compressed*
   jointly valid timeline: the jointly valid frames are numbered
   ``0..n-1``, an onset at number ``q`` moves to ``(q + s) mod n`` and is
   then mapped back to its real grid index, where the window is applied in
   real time.  So a shifted onset never lands in time where one face is
   missing (where no onset could have been seen), and the observed and null
   statistics are computed the same way.  Shifts ``s`` are uniform integers
   in ``[m, n - m]`` (``m`` = ``min_shift_s`` in frames, default
   ``2 W``): ``|shift| >= min_shift_s`` circularly, in both directions.
   ``p = (1 + #(null >= observed)) / (1 + shifts)``.

4. Synchrony (:func:`synchrony`)
   Exact masked Pearson ``r(lag)`` for ``lag = -L..L`` grid frames: for each
   lag only pairs ``(parent[t], infant[t + lag])`` valid in both enter, with
   their own means and variances.  The six sums (pair count, sums, sums of
   squares, cross products) are cross-correlations of zero-filled series
   and masks, computed with zero-padded real FFTs (no wrap-around).  Peak =
   argmax r.  Windowed TLCC: windows of ``window_s`` every ``step_s``; the
   parent window is fixed and the infant window slides by the lag (Boker et
   al. 2002); a cell is NaN with fewer than half a window of valid pairs or
   a flat trace.  Surrogates: the infant trace *with its mask* is circularly
   shifted over the whole grid (gaps keep their place in the infant's own
   series) by uniform shifts with ``|s| > 2L``; each surrogate's statistic is
   ``max |r(lag)|``.  ``threshold`` = its 95th percentile;
   ``significant = peak_r > threshold`` and
   ``p = (1 + #(null >= peak_r)) / (1 + valid surrogates)``.  Comparing the
   signed peak with a null of absolute maxima is conservative.

5. Shared positive affect (:func:`shared_affect`)
   Over jointly valid frames: ``fraction`` = share of frames where both have
   AU12 >= their own threshold, ``expected = p_parent x p_infant`` (the
   independence expectation over the same frames) and ``ratio``.  An
   *episode* is a *shared run* -- consecutive jointly valid grid frames in
   which both persons' smoothed AU12 (centred moving average over
   ``smooth_s``, valid frames only, so frame noise does not split a run at
   the threshold) is at or above their threshold.  A person's *peaks* are
   the local maxima of their smoothed trace with a topographic prominence of
   at least ``min_prominence`` (0.5 AU12; ``scipy.signal.find_peaks`` per
   contiguous valid stretch), so noise wiggles on a flank or a smile's top
   are not peaks, and a maximum on the run's edge (one person still rising,
   or already falling, when the other crosses the threshold) is not a peak
   *within* the run.  A person's peak in the run is their highest peak
   inside it; the run is an episode when both have one and the two are at
   most ``peak_tolerance_s`` apart.

Too little jointly valid time (``< min_joint_s``, default 2 s) raises
:class:`DyadError` naming the counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import fft as sfft
from scipy.signal import find_peaks

from dyadlab.frames import MIN_CONFIDENCE, TableError, select_face

#: Jointly valid time needed before any measure is computed (s).
MIN_JOINT_S = 2.0
#: Neighbouring valid frames further apart than this x max(grid step, the
#: person's median interval) are not interpolated across.
MAX_GAP_FACTOR = 1.5

_EPS = 1e-9
_VAR_EPS = 1e-9          # variance (of z-scored traces) below this: flat, r undefined
_CHUNK = 4_000_000       # elements per batched array (memory bound)


class DyadError(ValueError):
    """The two recordings cannot be measured as a dyad; the message says why."""


# --------------------------------------------------------------------------
# 1. alignment
# --------------------------------------------------------------------------

@dataclass
class Aligned:
    """Two AU12 traces on one uniform grid (parent's clock).

    ``au12_*`` are NaN where ``valid_*`` is False; ``joint`` = both valid."""
    t: np.ndarray
    au12_parent: np.ndarray
    au12_infant: np.ndarray
    valid_parent: np.ndarray
    valid_infant: np.ndarray
    joint: np.ndarray
    rate: float
    offset_s: float = 0.0
    parent_min_confidence: float = MIN_CONFIDENCE
    infant_min_confidence: float = MIN_CONFIDENCE
    min_joint_s: float = MIN_JOINT_S

    @property
    def n(self) -> int:
        return len(self.t)

    @property
    def step(self) -> float:
        return 1.0 / self.rate

    @property
    def n_joint(self) -> int:
        return int(self.joint.sum())

    def counts(self) -> dict:
        return {"n_grid_frames": self.n, "n_valid_parent": int(self.valid_parent.sum()),
                "n_valid_infant": int(self.valid_infant.sum()), "n_joint_frames": self.n_joint}


def align(parent_df: pd.DataFrame, infant_df: pd.DataFrame, offset_s: float = 0.0,
          rate: float | None = None, *,
          parent_min_confidence: float = MIN_CONFIDENCE,
          infant_min_confidence: float = MIN_CONFIDENCE,
          max_gap_factor: float = MAX_GAP_FACTOR,
          min_joint_s: float = MIN_JOINT_S) -> Aligned:
    """Resample one parent and one infant frame table onto one grid (module
    doc, 1).  ``infant time + offset_s = parent time``.  Raises TableError
    for unusable tables and DyadError when the recordings do not overlap or
    share less than ``min_joint_s`` of jointly valid time."""
    tp, ap, okp = _person(parent_df, "parent", parent_min_confidence, 0.0)
    ti, ai, oki = _person(infant_df, "infant", infant_min_confidence, float(offset_s))
    if rate is None:
        dt = _median_interval(tp)
        if not np.isfinite(dt):
            raise DyadError("cannot infer the frame rate: the parent table has fewer "
                            "than two distinct timestamps; pass rate=")
        rate = float(max(1, round(1.0 / dt)))
    rate = float(rate)
    if not rate > 0:
        raise ValueError(f"rate must be > 0 Hz, got {rate}")
    t0, t1 = max(tp[0], ti[0]), min(tp[-1], ti[-1])
    if t1 < t0:
        raise DyadError(
            f"the recordings do not overlap: parent {tp[0]:.3f}-{tp[-1]:.3f} s, infant "
            f"{ti[0]:.3f}-{ti[-1]:.3f} s on the parent's clock (offset_s={offset_s:g}); "
            "check offset_s (infant time + offset_s = parent time)")
    n = int(math.floor((t1 - t0) * rate + 1e-6)) + 1
    t = t0 + np.arange(n) / rate
    step = 1.0 / rate
    xp = _resample(tp[okp], ap[okp], t, max_gap_factor * max(step, _median_interval(tp)))
    xi = _resample(ti[oki], ai[oki], t, max_gap_factor * max(step, _median_interval(ti)))
    vp, vi = np.isfinite(xp), np.isfinite(xi)
    al = Aligned(t=t, au12_parent=xp, au12_infant=xi, valid_parent=vp, valid_infant=vi,
                 joint=vp & vi, rate=rate, offset_s=float(offset_s),
                 parent_min_confidence=float(parent_min_confidence),
                 infant_min_confidence=float(infant_min_confidence),
                 min_joint_s=float(min_joint_s))
    require_joint(al)
    return al


def aligned_from_arrays(au12_parent, au12_infant, rate: float, t0: float = 0.0,
                        min_joint_s: float = MIN_JOINT_S) -> Aligned:
    """An Aligned pair from traces already on one grid (NaN = invalid)."""
    xp = np.asarray(au12_parent, float).copy()
    xi = np.asarray(au12_infant, float).copy()
    if xp.shape != xi.shape or xp.ndim != 1:
        raise ValueError(f"traces must be 1-D and equally long, got {xp.shape} and {xi.shape}")
    vp, vi = np.isfinite(xp), np.isfinite(xi)
    al = Aligned(t=t0 + np.arange(len(xp)) / float(rate), au12_parent=xp, au12_infant=xi,
                 valid_parent=vp, valid_infant=vi, joint=vp & vi, rate=float(rate),
                 min_joint_s=float(min_joint_s))
    require_joint(al)
    return al


def require_joint(al: Aligned) -> None:
    """Raise DyadError unless at least ``min_joint_s`` of jointly valid frames."""
    need = max(1, int(math.ceil(al.min_joint_s * al.rate - 1e-6)))
    c = al.counts()
    if c["n_joint_frames"] < need:
        raise DyadError(
            f"too little jointly valid time: parent valid in {c['n_valid_parent']} frames, "
            f"infant in {c['n_valid_infant']}, jointly in {c['n_joint_frames']} "
            f"(of {c['n_grid_frames']} grid frames at {al.rate:g} Hz); need at least "
            f"{need} ({al.min_joint_s:g} s)")


def split_faces(df: pd.DataFrame, parent="adult", infant="infant"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(parent table, infant table) from one video's frame table with two
    faces; selectors are roles ("adult"/"infant") or face_ids."""
    fp, fi = select_face(df, parent), select_face(df, infant)
    if fp == fi:
        raise TableError(f"parent and infant resolve to the same face_id {fp}")
    return df[df["face_id"] == fp], df[df["face_id"] == fi]


def _person(df: pd.DataFrame, who: str, min_conf: float, shift: float):
    need = ["timestamp", "confidence", "success", "AU12_r"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TableError(f"{who} table is missing columns: " + ", ".join(missing))
    if "face_id" in df.columns and df["face_id"].nunique() > 1:
        raise TableError(f"{who} table has several faces {sorted(df['face_id'].unique())}; "
                         "select one (split_faces)")
    if not 0 <= min_conf <= 1:
        raise ValueError(f"{who} min_confidence must lie in [0, 1], got {min_conf}")
    t = df["timestamp"].to_numpy(float) + shift
    order = np.argsort(t, kind="stable")
    t = t[order]
    au = df["AU12_r"].to_numpy(float)[order]
    ok = ((df["success"].to_numpy(float)[order] == 1)
          & (df["confidence"].to_numpy(float)[order] >= min_conf) & np.isfinite(au))
    keep = np.isfinite(t)
    t, au, ok = t[keep], au[keep], ok[keep]
    if not len(t):
        raise DyadError(f"the {who} table has no frames with a timestamp")
    return t, au, ok


def _median_interval(t: np.ndarray) -> float:
    d = np.diff(t)
    d = d[d > 0]
    return float(np.median(d)) if len(d) else float("nan")


def _resample(tv: np.ndarray, yv: np.ndarray, grid: np.ndarray, max_gap: float) -> np.ndarray:
    """Linear interpolation of valid samples (tv sorted) onto grid; NaN where
    the bracketing valid samples are more than max_gap apart."""
    out = np.full(len(grid), np.nan)
    if not len(tv):
        return out
    tv, first = np.unique(tv, return_index=True)        # duplicate stamps: keep first
    yv = yv[first]
    lo = np.searchsorted(tv, grid + _EPS, side="right") - 1    # last sample <= g
    hi = np.searchsorted(tv, grid - _EPS, side="left")         # first sample >= g
    ok = (lo >= 0) & (hi < len(tv))
    lo_c, hi_c = np.clip(lo, 0, len(tv) - 1), np.clip(hi, 0, len(tv) - 1)
    tl, tr = tv[lo_c], tv[hi_c]
    ok &= (tr - tl) <= max_gap + _EPS
    span = tr - tl
    w = np.where(span > _EPS, (grid - tl) / np.where(span > _EPS, span, 1.0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    val = yv[lo_c] + w * (yv[hi_c] - yv[lo_c])
    out[ok] = val[ok]
    return out


# --------------------------------------------------------------------------
# 2. onsets
# --------------------------------------------------------------------------

def onset_times(onsets) -> np.ndarray:
    """Onset times (s) from a list of Smile (``start_s``) or of numbers."""
    if onsets is None:
        return np.zeros(0)
    if isinstance(onsets, np.ndarray):
        return onsets.astype(float).ravel()
    vals = [getattr(o, "start_s", o) for o in onsets]
    return np.asarray(vals, float).ravel()


def onset_indices(al: Aligned, onsets, person: str = "parent") -> np.ndarray:
    """Sorted unique grid indices of the onsets that fall on jointly valid
    frames.  Infant onsets are in the infant's own clock (``offset_s`` is
    added)."""
    return _onsets(al, onsets, person)[0]


def _onsets(al: Aligned, onsets, person: str) -> tuple[np.ndarray, int]:
    if person not in ("parent", "infant"):
        raise ValueError(f"person must be 'parent' or 'infant', got {person!r}")
    t = onset_times(onsets)
    t = t[np.isfinite(t)]
    if person == "infant":
        t = t + al.offset_s
    k = np.rint((t - al.t[0]) * al.rate).astype(np.int64) if len(t) else np.zeros(0, np.int64)
    inside = (k >= 0) & (k < al.n)
    k = k[inside]
    k = k[al.joint[k]]
    return np.unique(k), len(t)


# --------------------------------------------------------------------------
# 3. contingency
# --------------------------------------------------------------------------

def draw_shifts(n: int, min_shift: int, shifts: int, rng: np.random.Generator) -> np.ndarray:
    """``shifts`` circular shifts uniform on ``[min_shift, n - min_shift]``
    (|shift| >= min_shift either way round a circle of n)."""
    min_shift = max(1, int(min_shift))
    if n - min_shift < min_shift:
        raise DyadError(f"the timeline ({n} frames) is too short for circular shifts of "
                        f"at least {min_shift} frames each way; need {2 * min_shift} frames")
    return rng.integers(min_shift, n - min_shift + 1, size=int(shifts))


def shift_onsets(joint: np.ndarray, onset_idx: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(len(shifts), len(onset_idx)) real grid indices of the onsets shifted
    circularly over the compressed jointly valid timeline (module doc, 3).
    Onsets must lie on jointly valid frames."""
    J = np.flatnonzero(joint)
    q = np.searchsorted(J, onset_idx)
    if len(onset_idx) and not np.array_equal(J[np.minimum(q, len(J) - 1)], onset_idx):
        raise ValueError("onsets must lie on jointly valid frames")
    return J[(q[None, :] + np.asarray(shifts)[:, None]) % len(J)]


def _responded(trig: np.ndarray, csum: np.ndarray, w: int) -> np.ndarray:
    """For trigger indices (any shape; csum's leading dims broadcast), True if a
    responder onset lies in (i, i + w].  ``csum[..., k]`` = onsets at <= k."""
    T = csum.shape[-1]
    hi = np.minimum(trig + w, T - 1)
    if csum.ndim == 1:
        return csum[hi] - csum[trig] > 0
    return np.take_along_axis(csum, hi, -1) - np.take_along_axis(csum, trig, -1) > 0


def contingency(aligned: Aligned, parent_onsets_s, infant_onsets_s, window_s: float = 2.0,
                shifts: int = 1000, seed: int = 0, min_shift_s: float | None = None) -> dict:
    """Serve-and-return contingency in both directions with a circular-shift
    null over jointly valid time (module doc, 3).

    Returns ``parent_to_infant`` and ``infant_to_parent`` dicts (observed,
    null_mean, null_sd, p, n_triggers, n_responded, null) and n_onsets_parent,
    n_onsets_infant (kept), n_onsets_*_given, n_joint_frames, window_s,
    window_frames, shifts, min_shift_s, seed."""
    al = aligned
    require_joint(al)
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if shifts < 1:
        raise ValueError(f"shifts must be >= 1, got {shifts}")
    min_shift_s = 2.0 * window_s if min_shift_s is None else float(min_shift_s)
    p_idx, p_given = _onsets(al, parent_onsets_s, "parent")
    i_idx, i_given = _onsets(al, infant_onsets_s, "infant")
    T, w = al.n, max(1, int(round(window_s * al.rate)))
    m = int(math.ceil(min_shift_s * al.rate - 1e-6))
    rng = np.random.default_rng(seed)
    s = draw_shifts(al.n_joint, m, shifts, rng)
    shifted_i = shift_onsets(al.joint, i_idx, s)                 # (shifts, n_i)

    csum_p = np.cumsum(np.bincount(p_idx, minlength=T))
    csum_i = np.cumsum(np.bincount(i_idx, minlength=T))

    # parent -> infant: triggers fixed (parent), responses shifted (infant)
    obs_pi = _responded(p_idx, csum_i, w).mean() if len(p_idx) else np.nan
    null_pi = np.full(len(s), np.nan)
    if len(p_idx):
        rows = max(1, _CHUNK // max(T, 1))
        for a in range(0, len(s), rows):
            blk = shifted_i[a:a + rows]
            ind = np.zeros((len(blk), T), np.int32)
            np.put_along_axis(ind, blk, 1, axis=1)     # duplicates collapse: fine for "any"
            cs = np.cumsum(ind, axis=1, out=ind)
            trig = np.broadcast_to(p_idx, (len(blk), len(p_idx)))
            null_pi[a:a + rows] = _responded(trig, cs, w).mean(axis=1)
    # infant -> parent: triggers shifted (infant), responses fixed (parent)
    obs_ip = _responded(i_idx, csum_p, w).mean() if len(i_idx) else np.nan
    null_ip = (_responded(shifted_i, csum_p, w).mean(axis=1) if len(i_idx)
               else np.full(len(s), np.nan))

    def direction(obs, null, trig):
        ok = len(trig) > 0
        return {"observed": float(obs), "null_mean": float(np.mean(null)) if ok else np.nan,
                "null_sd": float(np.std(null, ddof=1)) if ok and len(null) > 1 else np.nan,
                "p": float((1 + np.sum(null >= obs - 1e-12)) / (1 + len(null))) if ok else np.nan,
                "n_triggers": int(len(trig)),
                "n_responded": int(round(obs * len(trig))) if ok else 0, "null": null}

    return {"parent_to_infant": direction(obs_pi, null_pi, p_idx),
            "infant_to_parent": direction(obs_ip, null_ip, i_idx),
            "n_onsets_parent": int(len(p_idx)), "n_onsets_infant": int(len(i_idx)),
            "n_onsets_parent_given": p_given, "n_onsets_infant_given": i_given,
            "n_joint_frames": al.n_joint, "window_s": float(window_s), "window_frames": w,
            "shifts": int(shifts), "min_shift_s": min_shift_s, "seed": seed}


# --------------------------------------------------------------------------
# 4. synchrony
# --------------------------------------------------------------------------

def _zscore(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    v = x[valid]
    sd = float(np.std(v)) if len(v) else 0.0
    z = np.zeros(len(x))
    if sd > 0:
        z[valid] = (v - v.mean()) / sd
    return z


def _pearson(N, Sx, Sy, Sxx, Syy, Sxy, min_pairs):
    """Pearson r from pair sums; NaN with < min_pairs pairs or a flat side."""
    with np.errstate(invalid="ignore", divide="ignore"):
        N = np.rint(N)
        mx, my = Sx / N, Sy / N
        vx, vy = Sxx / N - mx * mx, Syy / N - my * my
        r = (Sxy / N - mx * my) / np.sqrt(vx * vy)
    bad = (N < min_pairs) | ~(vx > _VAR_EPS) | ~(vy > _VAR_EPS)
    return np.clip(np.where(bad, np.nan, r), -1.0, 1.0)


def _lagged_r(a_side, b_side, nfft, lags, min_pairs):
    """r(lag) for a = (x0, x0^2, mx) spectra (1-D) and b = (y0, y0^2, my)
    spectra (..., nfft//2+1).  c[lag] = sum_t a[t] b[t + lag]."""
    X, X2, MX = (np.conj(v) for v in a_side)
    Y, Y2, MY = b_side
    cols = lags % nfft

    def xc(A, B):
        return sfft.irfft(A * B, nfft, axis=-1, workers=-1)[..., cols]

    return _pearson(xc(MX, MY), xc(X, MY), xc(MX, Y), xc(X2, MY), xc(MX, Y2), xc(X, Y),
                    min_pairs)


def synchrony(aligned: Aligned, window_s: float = 4.0, step_s: float = 0.5,
              max_lag_s: float = 3.0, shifts: int = 1000, seed: int = 0,
              min_shift_s: float | None = None, alpha: float = 0.05) -> dict:
    """Lagged AU12 cross-correlation, windowed TLCC and circular-shift
    surrogates (module doc, 4).  Positive lag = the infant follows.

    Returns lags (frames), lags_s, r, n_pairs, peak_lag_frames, peak_lag_s,
    peak_r, null_max_abs (per surrogate), threshold, significant, p,
    n_surrogates; tlcc (windows x lags), window_start_s, window_center_s;
    and the parameters (window_s, step_s, max_lag_s, max_lag_frames, shifts,
    min_shift_frames, seed, alpha, n_joint_frames)."""
    al = aligned
    require_joint(al)
    n = al.n
    L = max(0, int(round(max_lag_s * al.rate)))
    if L >= n:
        raise DyadError(f"max_lag_s={max_lag_s:g} ({L} frames) is not shorter than the "
                        f"grid ({n} frames)")
    lags = np.arange(-L, L + 1)
    vp, vi = al.valid_parent, al.valid_infant
    x, y = _zscore(al.au12_parent, vp), _zscore(al.au12_infant, vi)
    mx, my = vp.astype(float), vi.astype(float)
    nfft = sfft.next_fast_len(n + L, real=True)
    min_pairs = max(3, int(math.ceil(al.min_joint_s * al.rate - 1e-6)))

    a_side = [sfft.rfft(v, nfft) for v in (x, x * x, mx)]
    b_obs = [sfft.rfft(v, nfft) for v in (y, y * y, my)]
    r = _lagged_r(a_side, b_obs, nfft, lags, min_pairs)
    n_pairs = np.rint(sfft.irfft(np.conj(a_side[2]) * b_obs[2], nfft)[lags % nfft]).astype(int)
    if np.all(np.isnan(r)):
        k, peak_r = None, np.nan
    else:
        k = int(np.nanargmax(r))
        peak_r = float(r[k])

    # surrogates: infant trace + mask circularly shifted together, batched FFTs
    m = 2 * L + 1 if min_shift_s is None else int(math.ceil(min_shift_s * al.rate - 1e-6))
    rng = np.random.default_rng(seed)
    s = draw_shifts(n, m, shifts, rng)
    null = np.empty(len(s))
    rows = max(1, _CHUNK // nfft)
    base = np.arange(n)
    for a in range(0, len(s), rows):
        idx = (base[None, :] - s[a:a + rows, None]) % n          # y_s[t] = y[t - s]
        ys, ms = y[idx], my[idx]
        b = [sfft.rfft(v, nfft, axis=-1, workers=-1) for v in (ys, ys * ys, ms)]
        rr = _lagged_r(a_side, b, nfft, lags, min_pairs)
        mx_abs = np.max(np.where(np.isnan(rr), -1.0, np.abs(rr)), axis=1)
        null[a:a + rows] = np.where(mx_abs < 0, np.nan, mx_abs)
    fin = null[np.isfinite(null)]
    threshold = float(np.percentile(fin, 100 * (1 - alpha))) if len(fin) else np.nan
    p = float((1 + np.sum(fin >= peak_r - 1e-12)) / (1 + len(fin))) \
        if len(fin) and np.isfinite(peak_r) else np.nan

    tl, starts = _tlcc(x, y, vp, vi, L, max(2, int(round(window_s * al.rate))),
                       max(1, int(round(step_s * al.rate))))
    win = max(2, int(round(window_s * al.rate)))
    return {"lags": lags, "lags_s": lags / al.rate, "r": r, "n_pairs": n_pairs,
            "peak_lag_frames": int(lags[k]) if k is not None else None,
            "peak_lag_s": float(lags[k] / al.rate) if k is not None else np.nan,
            "peak_r": peak_r, "null_max_abs": null, "threshold": threshold,
            "significant": bool(np.isfinite(peak_r) and np.isfinite(threshold)
                                and peak_r > threshold),
            "p": p, "n_surrogates": int(len(fin)),
            "tlcc": tl, "window_start_s": al.t[starts] if len(starts) else np.zeros(0),
            "window_center_s": (al.t[starts] + (win - 1) / (2 * al.rate)) if len(starts)
            else np.zeros(0),
            "window_s": float(window_s), "step_s": float(step_s), "max_lag_s": float(max_lag_s),
            "max_lag_frames": L, "shifts": int(shifts), "min_shift_frames": int(max(1, m)),
            "seed": seed, "alpha": alpha, "n_joint_frames": al.n_joint}


def _tlcc(x, y, vp, vi, L, win, step):
    """(windows, lags) windowed lagged r: parent window [w0, w0+win) fixed,
    infant at t + lag; NaN with < win/2 valid pairs (module doc, 4)."""
    n = len(x)
    starts = np.arange(0, n - win + 1, step)
    out = np.full((len(starts), 2 * L + 1), np.nan)
    if not len(starts):
        return out, starts
    x0, mx = np.where(vp, x, 0.0), vp.astype(float)
    pad = lambda v: np.concatenate([np.zeros(L), np.where(vi, v, 0.0), np.zeros(L)])  # noqa: E731
    yp, my = pad(y), pad(np.ones(n))
    # lagged views: row j = lag (j - L), column t -> infant[t + lag] (0 outside)
    Yv = np.lib.stride_tricks.sliding_window_view(yp, n)
    Mv = np.lib.stride_tricks.sliding_window_view(my, n)
    rows = max(1, _CHUNK // (n + 1) // 6)
    lo, hi = starts, starts + win
    for a in range(0, 2 * L + 1, rows):
        Yl, Ml = Yv[a:a + rows], Mv[a:a + rows]
        stats = []
        for v in (Ml * mx, Ml * x0, Yl * mx, Ml * x0 * x0, Yl * Yl * mx, Yl * x0):
            c = np.zeros((v.shape[0], n + 1))
            np.cumsum(v, axis=1, out=c[:, 1:])
            stats.append((c[:, hi] - c[:, lo]).T)            # (windows, lags in chunk)
        out[:, a:a + rows] = _pearson(*stats, min_pairs=win / 2)
    return out, starts


# --------------------------------------------------------------------------
# 5. shared positive affect
# --------------------------------------------------------------------------

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
            idx, _ = find_peaks(s[a:b + 1], prominence=min_prominence)
            pk[a + idx] = True
    return pk


EPISODE_COLUMNS = ["start_s", "end_s", "duration_s", "parent_peak_s", "infant_peak_s",
                   "peak_gap_s", "parent_peak_au12", "infant_peak_au12"]


def shared_affect(aligned: Aligned, parent_threshold: float = 1.5,
                  infant_threshold: float = 1.5, peak_tolerance_s: float = 1.0,
                  smooth_s: float = 0.25, min_prominence: float = 0.5) -> dict:
    """Shared positive affect over jointly valid time (module doc, 5).

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
        cp, ci = a + np.flatnonzero(pkp[a:b + 1]), a + np.flatnonzero(pki[a:b + 1])
        if not len(cp) or not len(ci):
            continue
        jp, ji = cp[np.argmax(sp[cp])], ci[np.argmax(si[ci])]
        gap = (ji - jp) / al.rate
        if abs(gap) <= peak_tolerance_s + _EPS:
            eps.append((al.t[a], al.t[b], (b - a + 1) / al.rate, al.t[jp], al.t[ji], gap,
                        al.au12_parent[jp], al.au12_infant[ji]))
    episodes = pd.DataFrame(eps, columns=EPISODE_COLUMNS).astype(float)
    return {"fraction": float(frac), "expected": float(expected),
            "ratio": float(frac / expected) if expected > 0 else np.nan,
            "p_parent": float(pp), "p_infant": float(pi), "n_joint_frames": nj,
            "n_both_frames": int(both.sum()), "n_shared_runs": len(runs),
            "n_episodes": len(episodes), "episodes": episodes,
            "parent_threshold": float(parent_threshold),
            "infant_threshold": float(infant_threshold),
            "peak_tolerance_s": float(peak_tolerance_s), "smooth_s": float(smooth_s),
            "min_prominence": float(min_prominence)}


# --------------------------------------------------------------------------
# 6. summary
# --------------------------------------------------------------------------

def measure(aligned: Aligned, parent_onsets_s, infant_onsets_s, *,
            contingency_window_s: float = 2.0, min_shift_s: float | None = None,
            sync_window_s: float = 4.0, sync_step_s: float = 0.5, max_lag_s: float = 3.0,
            shifts: int = 1000, seed: int = 0, parent_threshold: float = 1.5,
            infant_threshold: float = 1.5, peak_tolerance_s: float = 1.0,
            dyad_id=None) -> dict:
    """All measures: {"summary": row, "contingency", "synchrony", "shared_affect"}."""
    al = aligned
    require_joint(al)
    c = contingency(al, parent_onsets_s, infant_onsets_s, window_s=contingency_window_s,
                    shifts=shifts, seed=seed, min_shift_s=min_shift_s)
    s = synchrony(al, window_s=sync_window_s, step_s=sync_step_s, max_lag_s=max_lag_s,
                  shifts=shifts, seed=seed)
    a = shared_affect(al, parent_threshold, infant_threshold, peak_tolerance_s)
    row = {} if dyad_id is None else {"dyad_id": dyad_id}
    row.update(al.counts())
    row.update({
        "joint_fraction": al.n_joint / al.n, "rate_hz": al.rate,
        "duration_s": al.n / al.rate, "offset_s": al.offset_s,
        "parent_onsets": c["n_onsets_parent"], "infant_onsets": c["n_onsets_infant"],
        "parent_onsets_dropped": c["n_onsets_parent_given"] - c["n_onsets_parent"],
        "infant_onsets_dropped": c["n_onsets_infant_given"] - c["n_onsets_infant"],
    })
    for key, d in (("p2i", c["parent_to_infant"]), ("i2p", c["infant_to_parent"])):
        row[f"contingency_{key}_observed"] = d["observed"]
        row[f"contingency_{key}_null_mean"] = d["null_mean"]
        row[f"contingency_{key}_p"] = d["p"]
    row.update({
        "peak_lag_frames": (s["peak_lag_frames"] if s["peak_lag_frames"] is not None
                            else np.nan),
        "peak_lag_s": s["peak_lag_s"],
        "peak_r": s["peak_r"], "sync_threshold": s["threshold"],
        "sync_significant": s["significant"], "sync_p": s["p"],
        "shared_fraction": a["fraction"], "shared_expected": a["expected"],
        "shared_ratio": a["ratio"], "shared_episodes": a["n_episodes"],
        "parent_threshold": float(parent_threshold), "infant_threshold": float(infant_threshold),
        "parent_min_confidence": al.parent_min_confidence,
        "infant_min_confidence": al.infant_min_confidence,
        "contingency_window_s": float(contingency_window_s), "min_shift_s": c["min_shift_s"],
        "sync_window_s": float(sync_window_s), "sync_step_s": float(sync_step_s),
        "max_lag_s": float(max_lag_s), "peak_tolerance_s": float(peak_tolerance_s),
        "shifts": int(shifts), "seed": seed,
    })
    return {"summary": row, "contingency": c, "synchrony": s, "shared_affect": a}


def summary(aligned: Aligned, parent_onsets_s, infant_onsets_s, **params) -> dict:
    """One flat row per dyad (keys: see :func:`measure`; p2i = the infant
    answering the parent, i2p = the parent answering the infant)."""
    return measure(aligned, parent_onsets_s, infant_onsets_s, **params)["summary"]


def analyse_dyad(parent_df: pd.DataFrame, infant_df: pd.DataFrame, offset_s: float = 0.0, *,
                 rate: float | None = None, parent_min_confidence: float = MIN_CONFIDENCE,
                 infant_min_confidence: float = MIN_CONFIDENCE, parent_smile_params=None,
                 infant_smile_params=None, **params) -> dict:
    """Align two frame tables, segment each person's smiles (``segment_smiles``
    with that person's min_confidence; needs the landmark columns) and
    measure.  Returns :func:`measure`'s dict plus "aligned" and "smiles"."""
    from .segment import SmileParams, segment_smiles

    al = align(parent_df, infant_df, offset_s, rate,
               parent_min_confidence=parent_min_confidence,
               infant_min_confidence=infant_min_confidence)
    pp = replace(parent_smile_params or SmileParams(), min_confidence=parent_min_confidence)
    ip = replace(infant_smile_params or SmileParams(), min_confidence=infant_min_confidence)
    sp, si = segment_smiles(parent_df, pp), segment_smiles(infant_df, ip)
    out = measure(al, sp, si, **params)
    out["aligned"], out["smiles"] = al, {"parent": sp, "infant": si}
    return out


# --------------------------------------------------------------------------
# synthetic dyads (tests, benchmarks, demos)
# --------------------------------------------------------------------------

@dataclass
class SimulatedDyad:
    parent_df: pd.DataFrame
    infant_df: pd.DataFrame
    parent_onsets_s: np.ndarray      # parent's clock
    infant_onsets_s: np.ndarray      # infant's own clock


def smile_bumps(t: np.ndarray, onsets, amps, durs) -> np.ndarray:
    """Sum of raised-cosine AU12 bumps starting at ``onsets`` (s)."""
    t = np.asarray(t, float)
    out = np.zeros(len(t))
    for o, a, d in zip(onsets, amps, durs):
        u = (t - o) / d
        inside = (u >= 0) & (u <= 1)
        out[inside] += a * 0.5 * (1 - np.cos(2 * np.pi * u[inside]))
    return out


def _random_onsets(rng, duration_s, mean_gap_s, min_gap_s, dur_range):
    on, t = [], rng.uniform(0, mean_gap_s)
    while t < duration_s:
        on.append(t)
        t += min_gap_s + rng.exponential(mean_gap_s - min_gap_s)
    on = np.asarray(on)
    return on, rng.uniform(2.0, 4.0, len(on)), rng.uniform(*dur_range, len(on))


def simulate_dyad(duration_s: float = 180.0, fps: float = 30.0, *, lag_s: float | None = 0.8,
                  follower: str = "infant", noise_sd: float = 0.2, jitter: float = 0.0,
                  infant_fps: float | None = None, infant_offset_s: float = 0.0,
                  mean_gap_s: float = 8.0, seed: int = 0) -> SimulatedDyad:
    """Synthetic AU12 frame tables (no landmarks) for one dyad.

    Each person's AU12 is a train of raised-cosine smile bumps (amplitude
    2-4, 2-4.5 s long, onsets at least 3 s apart, mean gap ``mean_gap_s``)
    plus Gaussian noise, clipped to [0, 5].  ``lag_s`` given: the follower's
    bumps are the leader's delayed by ``lag_s`` (onsets too); ``lag_s=None``:
    independent bump trains.  ``jitter`` (fraction of a frame) makes VFR
    timestamps.  The infant's recording may start ``infant_offset_s`` later
    on the parent's clock and have its own ``infant_fps``; its table and
    onsets use its own clock (infant time + infant_offset_s = parent time)."""
    if follower not in ("infant", "parent"):
        raise ValueError(f"follower must be 'infant' or 'parent', got {follower!r}")
    rng = np.random.default_rng(seed)
    lead = _random_onsets(rng, duration_s, mean_gap_s, 3.0, (2.0, 4.5))
    if lag_s is None:
        other = _random_onsets(rng, duration_s, mean_gap_s, 3.0, (2.0, 4.5))
    else:
        other = (lead[0] + lag_s, lead[1], lead[2])
    p_b, i_b = (lead, other) if follower == "infant" else (other, lead)

    def stamps(f, length):
        k = np.arange(int(math.floor(length * f)) + 1)
        t = k / f + (rng.uniform(-jitter, jitter, len(k)) / f if jitter else 0.0)
        return np.sort(np.maximum(t, 0.0))

    def table(t_own, t_clock, b, fid):
        au = smile_bumps(t_clock, *b) + rng.normal(0, noise_sd, len(t_own))
        return pd.DataFrame({"frame": np.arange(len(t_own)), "face_id": fid,
                             "timestamp": t_own, "confidence": 0.98, "success": 1,
                             "AU12_r": np.clip(au, 0, 5)})

    tp = stamps(fps, duration_s)
    ti = stamps(infant_fps or fps, duration_s - infant_offset_s)
    pdf = table(tp, tp, p_b, 0)
    idf = table(ti, ti + infant_offset_s, i_b, 1)
    pdf["role"], idf["role"] = "adult", "infant"
    keep_p = p_b[0][p_b[0] < duration_s]
    keep_i = i_b[0][(i_b[0] >= infant_offset_s) & (i_b[0] < duration_s)] - infant_offset_s
    return SimulatedDyad(pdf, idf, keep_p, keep_i)
