"""Dyad alignment: two AU12 traces on one uniform grid (parent's clock).

Both traces are resampled onto one uniform grid from the later start to the
earlier end of the two recordings, at ``rate`` Hz (default: the parent's
median frame rate, rounded).  Grid point ``k`` is at ``t0 + k / rate``.  A
person's frame is *valid* when ``success == 1``, ``confidence >=
min_confidence`` (set per person: infant faces are often detected with lower
confidence) and AU12 is finite.  AU12 at a grid point is linearly
interpolated between the nearest valid frames on either side (an exact hit
takes that frame) when those two are at most ``max_gap_factor`` (1.5) x
``max(grid step, that person's own median frame interval)`` apart, and NaN
otherwise -- so a dropped or low-confidence frame (a 2-step hole at the grid
rate) is a hole on the grid too, while a 15 fps infant video on a 30 Hz grid
is still interpolated.  Timestamps, not frame counts, are used throughout:
VFR video works.

Clock: ``infant time + offset_s = parent time`` (package doc, Conventions).
Too little jointly valid time (``< min_joint_s``, default 2 s) raises
:class:`DyadError` naming the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dyadlab.frames import MIN_CONFIDENCE, TableError, median_interval, select_face

#: Jointly valid time needed before any measure is computed (s).
MIN_JOINT_S = 2.0
#: Neighbouring valid frames further apart than this x max(grid step, the
#: person's median interval) are not interpolated across.
MAX_GAP_FACTOR = 1.5

_EPS = 1e-9
_CHUNK = 4_000_000  # elements per batched array (memory bound)


class DyadError(ValueError):
    """The two recordings cannot be measured as a dyad; the message says why."""


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
        return {
            "n_grid_frames": self.n,
            "n_valid_parent": int(self.valid_parent.sum()),
            "n_valid_infant": int(self.valid_infant.sum()),
            "n_joint_frames": self.n_joint,
        }


def align(
    parent_df: pd.DataFrame,
    infant_df: pd.DataFrame,
    offset_s: float = 0.0,
    rate: float | None = None,
    *,
    parent_min_confidence: float = MIN_CONFIDENCE,
    infant_min_confidence: float = MIN_CONFIDENCE,
    max_gap_factor: float = MAX_GAP_FACTOR,
    min_joint_s: float = MIN_JOINT_S,
) -> Aligned:
    """Resample one parent and one infant frame table onto one grid (module
    doc).  ``infant time + offset_s = parent time``.  Raises TableError
    for unusable tables and DyadError when the recordings do not overlap or
    share less than ``min_joint_s`` of jointly valid time."""
    tp, ap, okp = _person(parent_df, "parent", parent_min_confidence, 0.0)
    ti, ai, oki = _person(infant_df, "infant", infant_min_confidence, float(offset_s))
    if rate is None:
        dt = median_interval(tp)
        if not np.isfinite(dt):
            raise DyadError(
                "cannot infer the frame rate: the parent table has fewer "
                "than two distinct timestamps; pass rate="
            )
        rate = float(max(1, round(1.0 / dt)))
    rate = float(rate)
    if not rate > 0:
        raise ValueError(f"rate must be > 0 Hz, got {rate}")
    t0, t1 = max(tp[0], ti[0]), min(tp[-1], ti[-1])
    if t1 < t0:
        raise DyadError(
            f"the recordings do not overlap: parent {tp[0]:.3f}-{tp[-1]:.3f} s, infant "
            f"{ti[0]:.3f}-{ti[-1]:.3f} s on the parent's clock (offset_s={offset_s:g}); "
            "check offset_s (infant time + offset_s = parent time)"
        )
    n = int(math.floor((t1 - t0) * rate + 1e-6)) + 1
    t = t0 + np.arange(n) / rate
    step = 1.0 / rate
    xp = _resample(tp[okp], ap[okp], t, max_gap_factor * max(step, median_interval(tp)))
    xi = _resample(ti[oki], ai[oki], t, max_gap_factor * max(step, median_interval(ti)))
    vp, vi = np.isfinite(xp), np.isfinite(xi)
    al = Aligned(
        t=t,
        au12_parent=xp,
        au12_infant=xi,
        valid_parent=vp,
        valid_infant=vi,
        joint=vp & vi,
        rate=rate,
        offset_s=float(offset_s),
        parent_min_confidence=float(parent_min_confidence),
        infant_min_confidence=float(infant_min_confidence),
        min_joint_s=float(min_joint_s),
    )
    require_joint(al)
    return al


def aligned_from_arrays(
    au12_parent, au12_infant, rate: float, t0: float = 0.0, min_joint_s: float = MIN_JOINT_S
) -> Aligned:
    """An Aligned pair from traces already on one grid (NaN = invalid)."""
    xp = np.asarray(au12_parent, float).copy()
    xi = np.asarray(au12_infant, float).copy()
    if xp.shape != xi.shape or xp.ndim != 1:
        raise ValueError(f"traces must be 1-D and equally long, got {xp.shape} and {xi.shape}")
    vp, vi = np.isfinite(xp), np.isfinite(xi)
    al = Aligned(
        t=t0 + np.arange(len(xp)) / float(rate),
        au12_parent=xp,
        au12_infant=xi,
        valid_parent=vp,
        valid_infant=vi,
        joint=vp & vi,
        rate=float(rate),
        min_joint_s=float(min_joint_s),
    )
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
            f"{need} ({al.min_joint_s:g} s)"
        )


def split_faces(df: pd.DataFrame, parent="adult", infant="infant") -> tuple[pd.DataFrame, pd.DataFrame]:
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
        raise TableError(
            f"{who} table has several faces {sorted(df['face_id'].unique())}; select one (split_faces)"
        )
    if not 0 <= min_conf <= 1:
        raise ValueError(f"{who} min_confidence must lie in [0, 1], got {min_conf}")
    t = df["timestamp"].to_numpy(float) + shift
    order = np.argsort(t, kind="stable")
    t = t[order]
    au = df["AU12_r"].to_numpy(float)[order]
    ok = (
        (df["success"].to_numpy(float)[order] == 1)
        & (df["confidence"].to_numpy(float)[order] >= min_conf)
        & np.isfinite(au)
    )
    keep = np.isfinite(t)
    t, au, ok = t[keep], au[keep], ok[keep]
    if not len(t):
        raise DyadError(f"the {who} table has no frames with a timestamp")
    return t, au, ok


def _resample(tv: np.ndarray, yv: np.ndarray, grid: np.ndarray, max_gap: float) -> np.ndarray:
    """Linear interpolation of valid samples (tv sorted) onto grid; NaN where
    the bracketing valid samples are more than max_gap apart."""
    out = np.full(len(grid), np.nan)
    if not len(tv):
        return out
    tv, first = np.unique(tv, return_index=True)  # duplicate stamps: keep first
    yv = yv[first]
    lo = np.searchsorted(tv, grid + _EPS, side="right") - 1  # last sample <= g
    hi = np.searchsorted(tv, grid - _EPS, side="left")  # first sample >= g
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
