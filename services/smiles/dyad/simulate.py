"""Synthetic dyads (tests, benchmarks, demos): AU12 frame tables with known lag."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class SimulatedDyad:
    parent_df: pd.DataFrame
    infant_df: pd.DataFrame
    parent_onsets_s: np.ndarray  # parent's clock
    infant_onsets_s: np.ndarray  # infant's own clock


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


def simulate_dyad(
    duration_s: float = 180.0,
    fps: float = 30.0,
    *,
    lag_s: float | None = 0.8,
    follower: str = "infant",
    noise_sd: float = 0.2,
    jitter: float = 0.0,
    infant_fps: float | None = None,
    infant_offset_s: float = 0.0,
    mean_gap_s: float = 8.0,
    seed: int = 0,
) -> SimulatedDyad:
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
        return pd.DataFrame(
            {
                "frame": np.arange(len(t_own)),
                "face_id": fid,
                "timestamp": t_own,
                "confidence": 0.98,
                "success": 1,
                "AU12_r": np.clip(au, 0, 5),
            }
        )

    tp = stamps(fps, duration_s)
    ti = stamps(infant_fps or fps, duration_s - infant_offset_s)
    pdf = table(tp, tp, p_b, 0)
    idf = table(ti, ti + infant_offset_s, i_b, 1)
    pdf["role"], idf["role"] = "adult", "infant"
    keep_p = p_b[0][p_b[0] < duration_s]
    keep_i = i_b[0][(i_b[0] >= infant_offset_s) & (i_b[0] < duration_s)] - infant_offset_s
    return SimulatedDyad(pdf, idf, keep_p, keep_i)
