"""Serve-and-return contingency: smile onsets and a circular-shift null.

Smile onsets (:func:`onset_indices`)
   A smile's onset is its ``start_s`` (the start of the rise).  Onset times
   go to the nearest grid index; onsets outside the grid or at frames that
   are not jointly valid are dropped, and duplicates merge.  Infant onsets
   are in the infant's own clock (``offset_s`` is added).

Contingency (:func:`contingency`)
   Observed: the fraction of trigger onsets followed by a responder onset
   within ``(0, W]`` s (``w = round(W * rate)`` grid frames, real time).
   ``parent_to_infant`` = the infant answering the parent, ``infant_to_parent``
   = the parent answering the infant.
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
   ``2 W``): ``|shift| >= min_shift_s`` circularly, in both directions
   (:func:`draw_shifts`, also used by the synchrony surrogates).
   ``p = (1 + #(null >= observed)) / (1 + shifts)``.
"""

from __future__ import annotations

import math

import numpy as np

from .align import _CHUNK, Aligned, DyadError, require_joint


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


def draw_shifts(n: int, min_shift: int, shifts: int, rng: np.random.Generator) -> np.ndarray:
    """``shifts`` circular shifts uniform on ``[min_shift, n - min_shift]``
    (|shift| >= min_shift either way round a circle of n)."""
    min_shift = max(1, int(min_shift))
    if n - min_shift < min_shift:
        raise DyadError(
            f"the timeline ({n} frames) is too short for circular shifts of "
            f"at least {min_shift} frames each way; need {2 * min_shift} frames"
        )
    return rng.integers(min_shift, n - min_shift + 1, size=int(shifts))


def shift_onsets(joint: np.ndarray, onset_idx: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(len(shifts), len(onset_idx)) real grid indices of the onsets shifted
    circularly over the compressed jointly valid timeline (module doc).
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


def contingency(
    aligned: Aligned,
    parent_onsets_s,
    infant_onsets_s,
    window_s: float = 2.0,
    shifts: int = 1000,
    seed: int = 0,
    min_shift_s: float | None = None,
) -> dict:
    """Serve-and-return contingency in both directions with a circular-shift
    null over jointly valid time (module doc).

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
    shifted_i = shift_onsets(al.joint, i_idx, s)  # (shifts, n_i)

    csum_p = np.cumsum(np.bincount(p_idx, minlength=T))
    csum_i = np.cumsum(np.bincount(i_idx, minlength=T))

    # parent -> infant: triggers fixed (parent), responses shifted (infant)
    obs_pi = _responded(p_idx, csum_i, w).mean() if len(p_idx) else np.nan
    null_pi = np.full(len(s), np.nan)
    if len(p_idx):
        rows = max(1, _CHUNK // max(T, 1))
        for a in range(0, len(s), rows):
            blk = shifted_i[a : a + rows]
            ind = np.zeros((len(blk), T), np.int32)
            np.put_along_axis(ind, blk, 1, axis=1)  # duplicates collapse: fine for "any"
            cs = np.cumsum(ind, axis=1, out=ind)
            trig = np.broadcast_to(p_idx, (len(blk), len(p_idx)))
            null_pi[a : a + rows] = _responded(trig, cs, w).mean(axis=1)
    # infant -> parent: triggers shifted (infant), responses fixed (parent)
    obs_ip = _responded(i_idx, csum_p, w).mean() if len(i_idx) else np.nan
    null_ip = _responded(shifted_i, csum_p, w).mean(axis=1) if len(i_idx) else np.full(len(s), np.nan)

    def direction(obs, null, trig):
        ok = len(trig) > 0
        return {
            "observed": float(obs),
            "null_mean": float(np.mean(null)) if ok else np.nan,
            "null_sd": float(np.std(null, ddof=1)) if ok and len(null) > 1 else np.nan,
            "p": float((1 + np.sum(null >= obs - 1e-12)) / (1 + len(null))) if ok else np.nan,
            "n_triggers": int(len(trig)),
            "n_responded": int(round(obs * len(trig))) if ok else 0,
            "null": null,
        }

    return {
        "parent_to_infant": direction(obs_pi, null_pi, p_idx),
        "infant_to_parent": direction(obs_ip, null_ip, i_idx),
        "n_onsets_parent": int(len(p_idx)),
        "n_onsets_infant": int(len(i_idx)),
        "n_onsets_parent_given": p_given,
        "n_onsets_infant_given": i_given,
        "n_joint_frames": al.n_joint,
        "window_s": float(window_s),
        "window_frames": w,
        "shifts": int(shifts),
        "min_shift_s": min_shift_s,
        "seed": seed,
    }
