"""Smile segmentation after "Behind the Smile" (Sec. III, smile extraction).

Input is a frame table (``dyadlab.frames``) for ONE face.  The steps, with the
paper's formulas, are:

1. **High-confidence frames**: ``confidence >= 0.8`` and ``success == 1`` (and
   AU12 and the three landmarks used below finite).  Rows are sorted by
   ``timestamp``.  A *segment* is a run of consecutive high-confidence rows;
   it breaks at a low-confidence row, and wherever the time step between two
   rows is ``<= 0`` or ``> 1.5 x`` the table's median frame interval (dropped
   frames; VFR video is handled through timestamps, no fps is assumed).

2. **Smile existence**: AU12 >= 1.5 at least twice within one second of
   consecutive high-confidence frames.  A frame is *active* if
   ``AU12_r >= au12_threshold``; a *seed* is an active frame with at least
   ``min_activations - 1`` further active frames of the same segment in
   ``(t, t + activation_window_s]`` (with the defaults: another active frame
   at most 1 s after it).

3. **Smile window** (what the paper leaves implicit, exactly as implemented):

   AU12 here is passed through a running median over ``smooth_window_s``
   (``despike``), so a valley is a real return towards rest and not one frame
   of estimator noise; a running median leaves ramps and plateaus exactly as
   they are.

   * *start*: from the first eligible seed (see cursor below), step back while the
     previous frame's AU12 is strictly lower (``AU12[k-1] < AU12[k]``), never
     before the cursor.  This is the preceding AU12 valley; a plateau stops
     the scan, so a flat baseline gives its last frame before the rise.
   * *active period*: from the seed, follow the active frames while each next
     active frame is at most ``activation_window_s`` after the previous one
     and AU12 does not fall back to rest in between (below ``release_level``,
     0.75 = half the threshold: the face has relaxed, so what follows is a new
     smile, not a dip within this one); ``e`` is the last active frame of
     that chain.
   * *end*: from ``e`` step forward while the next frame's AU12 is strictly
     lower (``AU12[k+1] < AU12[k]``), never past the segment end.  If the scan
     is stopped by the segment end rather than by a valley (and AU12 there is
     not already 0, OpenFace's floor), the smile is *cut*: it is reported
     with ``complete=False`` and no offset.  Symmetrically, a start scan
     that ends on the first frame of the segment (first smile of the
     segment, AU12 there above 0) marks the smile ``start_cut``: its onset
     may be truncated.

   The cursor starts at the segment start, where the first seed may lie.
   After a smile it moves to the offset's end (``complete``) or to the window
   end (otherwise); the next seed must lie strictly after it, and the next
   window may start at it (a shared valley frame).

4. **Radius** (paper's formulas, nostril point N = landmark 34, the inner left
   nostril): ``RT = P48 - N``, ``L = P54 - N``,
   ``IR = sqrt((RT_x - L_x)^2 + (RT_y - L_y)^2) / 2`` and
   ``r = sqrt(RT_x^2 + RT_y^2) / IR``.  IR is taken "at the start of the
   smile": to resist landmark jitter it is the mean of the per-frame
   ``|RT - L| / 2`` over the first ``ir_frames`` (3) frames of the window.
   The left corner gets the same treatment, ``r_left = |L| / IR``, for the
   symmetry feature.

5. **Smoothing**: landmark traces jitter, so ``|RT|`` and ``|L|`` are smoothed
   per segment with a Savitzky-Golay filter (``scipy.signal.savgol_filter``,
   polyorder ``smooth_polyorder``=2, ``mode='interp'``) before runs are
   sought.  Samples are treated as sequential (no resampling); the window is
   the odd number of frames nearest ``smooth_window_s / median_dt``, at least
   5, capped at the segment length, and smoothing is skipped when that leaves
   no more frames than ``smooth_polyorder`` or when ``smooth_window_s <= 0``.
   Speeds (in ``features``) use the real timestamps.  Side effect worth
   knowing: the filter's corner overshoot widens each run by about 2 frames
   at 30 fps on a noise-free piecewise-linear trace (tests pin this).

6. **Phases**: onset = the longest strictly increasing run of smoothed r in the
   window (length counted in frames; earliest on ties); offset = the longest
   strictly decreasing run starting at or after the onset's end; apex = from
   onset end to offset start.  A window with no increasing run is not a smile
   (the cursor moves to its end).  No decreasing run, or a cut window, gives
   ``complete=False`` with the offset left undefined (NaN).

7. After an offset the cursor moves to the offset's end, so the next seed
   starts a new smile with a new IR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter
from scipy.signal import savgol_filter

from dyadlab.frames import (
    INNER_LEFT_NOSTRIL,
    LEFT_LIP_CORNER,
    MIN_CONFIDENCE,
    RIGHT_LIP_CORNER,
    TableError,
    median_interval,
)

#: Tolerance for time comparisons (s), so 1.0 s written as 30 frames at
#: 30 fps counts as "within one second" despite float rounding.
TIME_EPS = 1e-9


@dataclass(frozen=True)
class SmileParams:
    """Every constant of the method, defaults from the paper or this module."""

    au12_threshold: float = 1.5  # AU12_r counted as an activation
    min_activations: int = 2  # activations needed ...
    activation_window_s: float = 1.0  # ... within this time; also the active period's max gap
    min_confidence: float = MIN_CONFIDENCE
    smooth_window_s: float = 0.25  # Savitzky-Golay window; <= 0 disables smoothing
    smooth_polyorder: int = 2
    ir_frames: int = 3  # frames averaged for the initial radius IR
    release_level: float = 0.75  # AU12 back below this between activations: the smile ended
    max_gap_factor: float = 1.5  # time step > this x median interval breaks a segment


@dataclass
class Smile:
    """One smile.  Phase boundaries are given as frame numbers (the table's
    ``frame`` column), timestamps (s) and positions in the window arrays.

    ``start`` is the onset start; ``end`` is the offset end, or the last
    window frame when ``complete`` is False (then the offset fields are
    None / NaN).  The arrays cover the whole smile window (see module doc).
    """

    start_frame: int
    onset_end_frame: int
    offset_start_frame: int | None
    end_frame: int
    start_s: float
    onset_end_s: float
    offset_start_s: float
    end_s: float
    ir: float  # initial radius IR, pixels
    complete: bool
    start_cut: bool  # window start hit the segment start without a valley
    onset: tuple[int, int]  # window positions, inclusive
    offset: tuple[int, int] | None
    rows: np.ndarray  # positions (iloc) of the window rows in the input table
    frames: np.ndarray
    t: np.ndarray
    au12: np.ndarray
    r_raw: np.ndarray  # |RT| / IR, unsmoothed
    r: np.ndarray  # smoothed, used for phases and features
    r_left_raw: np.ndarray  # |L| / IR
    r_left: np.ndarray

    @property
    def end_pos(self) -> int:
        """Window position of ``end``."""
        return self.offset[1] if self.offset is not None else len(self.t) - 1


def segment_smiles(df: pd.DataFrame, params: SmileParams = SmileParams()) -> list[Smile]:
    """All smiles of one face's frame table, in time order (module doc, 1-7)."""
    _check(df)
    order = np.argsort(df["timestamp"].to_numpy(float), kind="stable")
    df = df.iloc[order]
    t = df["timestamp"].to_numpy(float)
    au12 = df["AU12_r"].to_numpy(float)
    rt = _dist(df, RIGHT_LIP_CORNER, INNER_LEFT_NOSTRIL)  # |RT|
    lt = _dist(df, LEFT_LIP_CORNER, INNER_LEFT_NOSTRIL)  # |L|
    width = _dist(df, RIGHT_LIP_CORNER, LEFT_LIP_CORNER)  # |RT - L|
    ok = high_confidence(df, params) & np.isfinite(au12 + rt + lt + width)
    dt = median_interval(t)
    cols = _Cols(order, df["frame"].to_numpy(), t, au12, rt, lt, width)
    smiles: list[Smile] = []
    for lo, hi in segments(t, ok, params.max_gap_factor * dt):
        smiles += _segment(cols, lo, hi, dt, params)
    return smiles


@dataclass
class _Cols:
    """The sorted table's columns as arrays."""

    rows: np.ndarray  # positions in the caller's table
    frame: np.ndarray
    t: np.ndarray
    au12: np.ndarray
    rt: np.ndarray  # |RT| = |P48 - N|
    lt: np.ndarray  # |L| = |P54 - N|
    width: np.ndarray  # |RT - L| = |P48 - P54|


def _segment(c: _Cols, lo: int, hi: int, dt: float, p: SmileParams) -> list[Smile]:
    """Smiles of one segment (rows lo..hi inclusive), steps 2-7."""
    rt_s = smooth(c.rt[lo : hi + 1], dt, p)
    lt_s = smooth(c.lt[lo : hi + 1], dt, p)
    # Valleys are sought on median-filtered AU12: frame-to-frame noise would
    # otherwise end a window at the first jitter dip.
    au = np.full(len(c.au12), np.nan)
    au[lo : hi + 1] = despike(c.au12[lo : hi + 1], dt, p)
    active = lo + np.flatnonzero(c.au12[lo : hi + 1] >= p.au12_threshold)
    ta = c.t[active]
    # seed: >= min_activations - 1 more active frames in (t, t + window]
    later = np.searchsorted(ta, ta + p.activation_window_s + TIME_EPS, side="right")
    is_seed = later - np.arange(len(active)) - 1 >= p.min_activations - 1
    smiles: list[Smile] = []
    cursor, first_seed = lo, lo
    while True:
        k = np.searchsorted(active, first_seed)
        cand = np.flatnonzero(is_seed[k:])
        if not len(cand):
            return smiles
        q = k + cand[0]  # position of the seed in `active`
        start = active[q]
        while start > cursor and au[start - 1] < au[start]:
            start -= 1
        while (
            q + 1 < len(active)
            and ta[q + 1] - ta[q] <= p.activation_window_s + TIME_EPS
            and np.nanmin(au[active[q] : active[q + 1] + 1]) >= p.release_level
        ):
            q += 1
        end = active[q]
        while end < hi and au[end + 1] < au[end]:
            end += 1
        cut = end == hi and au[end] > 0
        start_cut = start == lo and cursor == lo and au[start] > 0
        smile = _phases(
            c, start, end, cut, start_cut, rt_s[start - lo : end - lo + 1], lt_s[start - lo : end - lo + 1], p
        )
        if smile is None:
            cursor = end
        else:
            smiles.append(smile)
            cursor = start + smile.end_pos
        first_seed = cursor + 1


def _phases(
    c: _Cols, a: int, b: int, cut: bool, start_cut: bool, rt_s: np.ndarray, lt_s: np.ndarray, p: SmileParams
) -> Smile | None:
    """Radius traces and onset/apex/offset for the window rows a..b (steps 4, 6)."""
    ir = float(np.mean(c.width[a : min(a + p.ir_frames, b + 1)])) / 2
    if not ir > 0:
        return None
    r = rt_s / ir
    onset = longest_run(r, +1)
    if onset is None:
        return None
    offset = None if cut else longest_run(r, -1, first=onset[1])
    return _smile(c, a, b, onset, offset, ir, r, lt_s, start_cut)


def _smile(
    c: _Cols,
    a: int,
    b: int,
    onset: tuple[int, int],
    offset: tuple[int, int] | None,
    ir: float,
    r: np.ndarray,
    lt_s: np.ndarray,
    start_cut: bool,
) -> Smile:
    """The Smile of window rows a..b with its phases (window positions)."""
    w = slice(a, b + 1)
    frames, t = c.frame[w], c.t[w]
    end = offset[1] if offset is not None else b - a
    return Smile(
        start_frame=int(frames[onset[0]]),
        onset_end_frame=int(frames[onset[1]]),
        offset_start_frame=int(frames[offset[0]]) if offset is not None else None,
        end_frame=int(frames[end]),
        start_s=float(t[onset[0]]),
        onset_end_s=float(t[onset[1]]),
        offset_start_s=float(t[offset[0]]) if offset is not None else float("nan"),
        end_s=float(t[end]),
        ir=ir,
        complete=offset is not None,
        start_cut=start_cut,
        onset=onset,
        offset=offset,
        rows=c.rows[w],
        frames=frames,
        t=t,
        au12=c.au12[w],
        r_raw=c.rt[w] / ir,
        r=r,
        r_left_raw=c.lt[w] / ir,
        r_left=lt_s / ir,
    )


def smile_in_window(
    df: pd.DataFrame, start_s: float, end_s: float, params: SmileParams = SmileParams()
) -> Smile:
    """The smile a reviewer put at [start_s, end_s] (services/smiles/review.py),
    measured as an automatic one: the window is the high-confidence frames in
    it (of the longest segment it overlaps; module doc, 1), r is smoothed over
    that whole segment (5), IR is taken where an automatic window would start,
    at the AU12 valley before the reviewer's start (3, 4), and inside
    the window the onset runs from its first frame to the end of the longest
    increasing run of r, the offset from the start of the longest decreasing run
    after it to the window's last frame (6). No decreasing run: ``complete`` is
    False. Raises ValueError when fewer than three frames can be measured."""
    _check(df)
    order = np.argsort(df["timestamp"].to_numpy(float), kind="stable")
    df = df.iloc[order]
    t = df["timestamp"].to_numpy(float)
    rt = _dist(df, RIGHT_LIP_CORNER, INNER_LEFT_NOSTRIL)
    lt = _dist(df, LEFT_LIP_CORNER, INNER_LEFT_NOSTRIL)
    width = _dist(df, RIGHT_LIP_CORNER, LEFT_LIP_CORNER)
    au12 = df["AU12_r"].to_numpy(float)
    ok = high_confidence(df, params) & np.isfinite(au12 + rt + lt + width)
    dt = median_interval(t)
    inside = (t >= start_s - TIME_EPS) & (t <= end_s + TIME_EPS)
    best = None
    for lo, hi in segments(t, ok, params.max_gap_factor * dt):
        rows = np.flatnonzero(inside[lo : hi + 1]) + lo
        if len(rows) and (best is None or len(rows) > best[2] - best[1] + 1):
            best = (lo, int(rows[0]), int(rows[-1]), hi)
    if best is None or best[2] - best[1] < 2:
        raise ValueError(
            f"fewer than 3 measurable frames (confidence >= {params.min_confidence}) "
            f"in {start_s:.3f}-{end_s:.3f} s"
        )
    lo, a, b, hi = best
    c = _Cols(order, df["frame"].to_numpy(), t, au12, rt, lt, width)
    rt_s = smooth(rt[lo : hi + 1], dt, params)[a - lo : b - lo + 1]
    lt_s = smooth(lt[lo : hi + 1], dt, params)[a - lo : b - lo + 1]
    # IR where an automatic window would start: the AU12 valley before the
    # reviewer's start (step 3's start scan, on despiked AU12, within the segment)
    au_d = despike(au12[lo : hi + 1], dt, params)
    k = a
    while k > lo and au_d[k - 1 - lo] < au_d[k - lo]:
        k -= 1
    ir = float(np.mean(width[k : min(k + params.ir_frames, b + 1)])) / 2
    if not ir > 0:
        raise ValueError(f"the lip corners coincide at {t[k]:.3f} s: no radius")
    r = rt_s / ir
    rise = longest_run(r, +1)
    i1 = rise[1] if rise is not None else max(1, int(np.argmax(r)))
    fall = longest_run(r, -1, first=i1)
    last = b - a
    offset = (fall[0], last) if fall is not None and fall[0] < last else None
    return _smile(c, a, b, (0, i1), offset, ir, r, lt_s, False)


def high_confidence(df: pd.DataFrame, params: SmileParams = SmileParams()) -> np.ndarray:
    """Boolean mask: ``confidence >= min_confidence`` and ``success == 1``."""
    return (df["confidence"].to_numpy(float) >= params.min_confidence) & (df["success"].to_numpy(float) == 1)


def segments(t: np.ndarray, ok: np.ndarray, max_gap_s: float) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) row ranges of consecutive ``ok`` rows whose time
    steps are all in ``(0, max_gap_s]``."""
    out: list[tuple[int, int]] = []
    lo = None
    for i in range(len(t)):
        joins = lo is not None and ok[i] and 0 < t[i] - t[i - 1] <= max_gap_s + TIME_EPS
        if lo is not None and not joins:
            out.append((lo, i - 1))
            lo = None
        if lo is None and ok[i]:
            lo = i
    if lo is not None:
        out.append((lo, len(t) - 1))
    return out


def smooth(x: np.ndarray, dt: float, params: SmileParams = SmileParams()) -> np.ndarray:
    """Savitzky-Golay smoothing of a sequential trace (module doc, step 5)."""
    x = np.asarray(x, float)
    if params.smooth_window_s <= 0 or not np.isfinite(dt) or dt <= 0:
        return x.copy()
    n = 2 * int(round((params.smooth_window_s / dt - 1) / 2)) + 1
    n = max(n, 5)
    if n > len(x):
        n = len(x) if len(x) % 2 else len(x) - 1
    if n <= params.smooth_polyorder:
        return x.copy()
    return savgol_filter(x, n, params.smooth_polyorder, mode="interp")


def despike(x: np.ndarray, dt: float, params: SmileParams = SmileParams()) -> np.ndarray:
    """Running median over about ``smooth_window_s`` (odd, >= 3 frames)."""
    x = np.asarray(x, float)
    if params.smooth_window_s <= 0 or not np.isfinite(dt) or dt <= 0 or len(x) < 3:
        return x.copy()
    n = max(3, 2 * int(round((params.smooth_window_s / dt - 1) / 2)) + 1)
    return median_filter(x, size=min(n, len(x) - (1 - len(x) % 2)), mode="nearest")


def longest_run(x: np.ndarray, sign: int, first: int = 0) -> tuple[int, int] | None:
    """Longest strictly monotone run ``(i, j)``, ``j > i >= first``, of ``x``:
    strictly increasing for ``sign=+1``, decreasing for ``-1``.  Length is
    ``j - i`` steps; the earliest wins ties.  None if there is none."""
    steps = sign * np.diff(np.asarray(x, float)) > 0
    best, i = None, None
    for k in range(first, len(steps) + 1):
        if k < len(steps) and steps[k]:
            if i is None:
                i = k
            continue
        if i is not None and (best is None or k - i > best[1] - best[0]):
            best = (i, k)
        i = None
    return best


def _check(df: pd.DataFrame) -> None:
    need = ["frame", "timestamp", "confidence", "success", "AU12_r"]
    for i in (RIGHT_LIP_CORNER, LEFT_LIP_CORNER, INNER_LEFT_NOSTRIL):
        need += [f"x_{i}", f"y_{i}"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TableError("smile segmentation needs columns: " + ", ".join(missing))
    if "face_id" in df.columns and df["face_id"].nunique() > 1:
        raise TableError(
            "smile segmentation takes one face; select it first "
            f"(table has face_ids {sorted(df['face_id'].unique())})"
        )


def _dist(df: pd.DataFrame, i: int, j: int) -> np.ndarray:
    return np.hypot(
        df[f"x_{i}"].to_numpy(float) - df[f"x_{j}"].to_numpy(float),
        df[f"y_{i}"].to_numpy(float) - df[f"y_{j}"].to_numpy(float),
    )
