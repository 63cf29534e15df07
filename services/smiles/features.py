"""Per-smile features ("Behind the Smile", Tables III/IV) and the speech flag.

For a smile with window times ``t``, smoothed radius ``r`` (units of IR) and
phase positions onset ``[i0, i1]``, offset ``[i2, i3]``:

* ``onset_amplitude  = r[i1] - r[i0]``; ``offset_amplitude = r[i2] - r[i3]``
* ``onset_duration_s = t[i1] - t[i0]``, ``apex_duration_s = t[i2] - t[i1]``,
  ``offset_duration_s = t[i3] - t[i2]``, ``total_duration_s = end_s - start_s``
* speed ``v_k = (r[k+1] - r[k-1]) / (t[k+1] - t[k-1])`` (central difference,
  real timestamps, VFR safe) at the frames *inside* a phase (both neighbours
  in the phase), or the phase's own rise over its time for a one-step phase;
  ``max_onset_speed = max v`` over the onset and ``max_offset_speed = max -v``
  over the offset: positive by construction, since r rises strictly through
  the onset and falls strictly through the offset; ``mean_onset_speed = onset_amplitude / onset_duration_s``
  and ``mean_offset_speed = offset_amplitude / offset_duration_s`` (average
  rates over the phase).
* ``au12_max``: max AU12_r from start to end.  ``au6_apex_mean``: mean AU06_r
  over the apex frames ``i1..i2`` (NaN without an AU06_r column);
  ``duchenne = au6_apex_mean >= 1.0`` (cheek raiser present at apex;
  ``<NA>`` when AU06 is unknown).
* ``symmetry = (ampR - ampL) / (ampR + ampL)`` with ``ampR`` the onset
  amplitude of r and ``ampL`` the same for ``r_left = |L| / IR`` over the same
  frames; positive = right corner (landmark 48) moved more.
* ``n_frames``: frames from start to end inclusive.
* ``start_cut``: the window reached the start of its high-confidence segment
  without an AU12 valley, so the onset may be truncated (treat its onset
  features with care).

Incomplete smiles (``complete=False``) have NaN offset fields and NaN apex
duration (the apex end is unknown); ``end_s`` is the last window frame, the
apex AU6 mean runs to it.

Speech: the paper counts vocalisations longer than 10 ms as speech and drops
smiles whose [start, end] overlaps one.  ``overlaps_speech`` is True when the
closed interval ``[start_s, end_s]`` intersects a speech segment lasting
``> MIN_SPEECH_S`` (compared with a 1e-9 s tolerance so a 10 ms segment
written as two float times does not count).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from dyadlab.tables import SMILE_COLUMNS

from .segment import Smile

#: Vocalisations must last longer than this (s) to count as speech.
MIN_SPEECH_S = 0.010
#: Mean apex AU06_r at or above which a smile is called Duchenne.
DUCHENNE_AU6 = 1.0

#: the paper's columns, in order (dyadlab.tables.SMILE_COLUMNS); dyadlab's extras follow
COLUMNS = list(SMILE_COLUMNS)
EXTRA_COLUMNS = [
    "complete",
    "mean_onset_speed",
    "mean_offset_speed",
    "ir_px",
    "au12_max",
    "au6_apex_mean",
    "duchenne",
    "symmetry",
    "n_frames",
    "start_cut",
]

NAN = float("nan")


def smile_table(
    df: pd.DataFrame,
    smiles: Sequence[Smile],
    speech_segments: Iterable[tuple[float, float]] = (),
    face_id: int = 0,
) -> pd.DataFrame:
    """One row per smile, ``smile_id`` 1..n in time order (module doc).

    ``df`` is the frame table the smiles were segmented from (AU06_r is read
    from it by row position); ``speech_segments`` are (start_s, end_s)."""
    speech = list(speech_segments)
    au6 = df["AU06_r"].to_numpy(float) if "AU06_r" in df.columns else None
    rows = []
    for n, s in enumerate(sorted(smiles, key=lambda s: s.start_s), start=1):
        row = {"face_id": face_id, "smile_id": n}
        row.update(_features(s, au6))
        row["overlaps_speech"] = overlaps_speech(s.start_s, s.end_s, speech)
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS + EXTRA_COLUMNS)
    table["duchenne"] = table["duchenne"].astype("boolean")
    for c in ("overlaps_speech", "complete", "start_cut"):
        table[c] = table[c].astype(bool)
    for c in ("face_id", "smile_id", "n_frames"):
        table[c] = table[c].astype(int)
    return table


def drop_speech(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a smile table that do not overlap speech (the paper's
    analysis set).  ``smile_id`` keeps its original numbering."""
    return table[~table["overlaps_speech"].astype(bool)].reset_index(drop=True)


def overlaps_speech(
    start_s: float,
    end_s: float,
    speech_segments: Iterable[tuple[float, float]],
    min_speech_s: float = MIN_SPEECH_S,
) -> bool:
    """True if ``[start_s, end_s]`` intersects a segment longer than
    ``min_speech_s`` (closed intervals)."""
    for a, b in speech_segments:
        if b - a > min_speech_s + 1e-9 and a <= end_s and b >= start_s:
            return True
    return False


def _features(s: Smile, au6: np.ndarray | None) -> dict:
    t, r = s.t, s.r
    i0, i1 = s.onset
    onset_amp = r[i1] - r[i0]
    onset_dur = t[i1] - t[i0]
    if s.offset is not None:
        i2, i3 = s.offset
        offset_amp = r[i2] - r[i3]
        offset_dur = t[i3] - t[i2]
        apex_dur = t[i2] - t[i1]
        max_off = float(np.max(-_speeds(r, t, i2, i3)))
        apex_end = i2
    else:
        offset_amp = offset_dur = apex_dur = max_off = NAN
        apex_end = s.end_pos
    amp_left = s.r_left[i1] - s.r_left[i0]
    au6_apex = au6[s.rows[i1 : apex_end + 1]] if au6 is not None else np.array([NAN])
    au6_apex = au6_apex[np.isfinite(au6_apex)]
    au6_mean = float(np.mean(au6_apex)) if len(au6_apex) else NAN
    return {
        "start_s": s.start_s,
        "onset_end_s": s.onset_end_s,
        "offset_start_s": s.offset_start_s,
        "end_s": s.end_s,
        "onset_amplitude": float(onset_amp),
        "offset_amplitude": float(offset_amp),
        "onset_duration_s": float(onset_dur),
        "apex_duration_s": float(apex_dur),
        "offset_duration_s": float(offset_dur),
        "total_duration_s": s.end_s - s.start_s,
        "max_onset_speed": float(np.max(_speeds(r, t, i0, i1))),
        "max_offset_speed": max_off,
        "complete": s.complete,
        "mean_onset_speed": _ratio(onset_amp, onset_dur),
        "mean_offset_speed": _ratio(offset_amp, offset_dur),
        "ir_px": s.ir,
        "au12_max": float(np.max(s.au12[i0 : s.end_pos + 1])),
        "au6_apex_mean": au6_mean,
        "duchenne": pd.NA if np.isnan(au6_mean) else bool(au6_mean >= DUCHENNE_AU6),
        "symmetry": _ratio(onset_amp - amp_left, onset_amp + amp_left),
        "n_frames": s.end_pos - i0 + 1,
        "start_cut": s.start_cut,
    }


def _speeds(r: np.ndarray, t: np.ndarray, a: int, b: int) -> np.ndarray:
    """dr/dt at the frames strictly inside the phase [a, b] (see module doc)."""
    if b - a < 2:
        return np.array([(r[b] - r[a]) / (t[b] - t[a])])
    return (r[a + 2 : b + 1] - r[a : b - 1]) / (t[a + 2 : b + 1] - t[a : b - 1])


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b != 0 and np.isfinite(b) else NAN
