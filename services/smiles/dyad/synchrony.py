"""Synchrony: lagged AU12 cross-correlation, windowed TLCC and surrogates.

Lag sign: ``r(lag)`` correlates ``parent[t]`` with ``infant[t + lag]``; a
positive lag means the infant follows the parent.

Exact masked Pearson ``r(lag)`` for ``lag = -L..L`` grid frames: for each
lag only pairs ``(parent[t], infant[t + lag])`` valid in both enter, with
their own means and variances.  The six sums (pair count, sums, sums of
squares, cross products) are cross-correlations of zero-filled series and
masks, computed with zero-padded real FFTs (no wrap-around).  Peak = argmax
r.  Windowed TLCC: windows of ``window_s`` every ``step_s``; the parent
window is fixed and the infant window slides by the lag (Boker et al. 2002);
a cell is NaN with fewer than half a window of valid pairs or a flat trace.
Surrogates: the infant trace *with its mask* is circularly shifted over the
whole grid (gaps keep their place in the infant's own series) by uniform
shifts with ``|s| > 2L``; each surrogate's statistic is ``max |r(lag)|``.
``threshold`` = its 95th percentile; ``significant = peak_r > threshold``
and ``p = (1 + #(null >= peak_r)) / (1 + valid surrogates)``.  Comparing the
signed peak with a null of absolute maxima is conservative.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sfft

from .align import _CHUNK, Aligned, DyadError, require_joint
from .contingency import draw_shifts

_VAR_EPS = 1e-9  # variance (of z-scored traces) below this: flat, r undefined


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

    return _pearson(xc(MX, MY), xc(X, MY), xc(MX, Y), xc(X2, MY), xc(MX, Y2), xc(X, Y), min_pairs)


def synchrony(
    aligned: Aligned,
    window_s: float = 4.0,
    step_s: float = 0.5,
    max_lag_s: float = 3.0,
    shifts: int = 1000,
    seed: int = 0,
    min_shift_s: float | None = None,
    alpha: float = 0.05,
) -> dict:
    """Lagged AU12 cross-correlation, windowed TLCC and circular-shift
    surrogates (module doc).  Positive lag = the infant follows.

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
        raise DyadError(f"max_lag_s={max_lag_s:g} ({L} frames) is not shorter than the grid ({n} frames)")
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
        idx = (base[None, :] - s[a : a + rows, None]) % n  # y_s[t] = y[t - s]
        ys, ms = y[idx], my[idx]
        b = [sfft.rfft(v, nfft, axis=-1, workers=-1) for v in (ys, ys * ys, ms)]
        rr = _lagged_r(a_side, b, nfft, lags, min_pairs)
        mx_abs = np.max(np.where(np.isnan(rr), -1.0, np.abs(rr)), axis=1)
        null[a : a + rows] = np.where(mx_abs < 0, np.nan, mx_abs)
    fin = null[np.isfinite(null)]
    threshold = float(np.percentile(fin, 100 * (1 - alpha))) if len(fin) else np.nan
    p = (
        float((1 + np.sum(fin >= peak_r - 1e-12)) / (1 + len(fin)))
        if len(fin) and np.isfinite(peak_r)
        else np.nan
    )

    tl, starts = _tlcc(
        x, y, vp, vi, L, max(2, int(round(window_s * al.rate))), max(1, int(round(step_s * al.rate)))
    )
    win = max(2, int(round(window_s * al.rate)))
    return {
        "lags": lags,
        "lags_s": lags / al.rate,
        "r": r,
        "n_pairs": n_pairs,
        "peak_lag_frames": int(lags[k]) if k is not None else None,
        "peak_lag_s": float(lags[k] / al.rate) if k is not None else np.nan,
        "peak_r": peak_r,
        "null_max_abs": null,
        "threshold": threshold,
        "significant": bool(np.isfinite(peak_r) and np.isfinite(threshold) and peak_r > threshold),
        "p": p,
        "n_surrogates": int(len(fin)),
        "tlcc": tl,
        "window_start_s": al.t[starts] if len(starts) else np.zeros(0),
        "window_center_s": (al.t[starts] + (win - 1) / (2 * al.rate)) if len(starts) else np.zeros(0),
        "window_s": float(window_s),
        "step_s": float(step_s),
        "max_lag_s": float(max_lag_s),
        "max_lag_frames": L,
        "shifts": int(shifts),
        "min_shift_frames": int(max(1, m)),
        "seed": seed,
        "alpha": alpha,
        "n_joint_frames": al.n_joint,
    }


def _tlcc(x, y, vp, vi, L, win, step):
    """(windows, lags) windowed lagged r: parent window [w0, w0+win) fixed,
    infant at t + lag; NaN with < win/2 valid pairs (module doc)."""
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
        Yl, Ml = Yv[a : a + rows], Mv[a : a + rows]
        stats = []
        for v in (Ml * mx, Ml * x0, Yl * mx, Ml * x0 * x0, Yl * Yl * mx, Yl * x0):
            c = np.zeros((v.shape[0], n + 1))
            np.cumsum(v, axis=1, out=c[:, 1:])
            stats.append((c[:, hi] - c[:, lo]).T)  # (windows, lags in chunk)
        out[:, a : a + rows] = _pearson(*stats, min_pairs=win / 2)
    return out, starts
