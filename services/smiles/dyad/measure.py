"""All dyad measures at once: one result dict and one flat summary row per dyad.

:func:`measure` runs contingency, synchrony and shared affect on one
:class:`~.align.Aligned` pair; :func:`analyse_dyad` starts from two frame
tables (align, segment each person's smiles, measure).  In the summary row
``p2i`` = the infant answering the parent, ``i2p`` = the parent answering the
infant.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from dyadlab.frames import MIN_CONFIDENCE

from .align import Aligned, align, require_joint
from .contingency import contingency
from .shared import shared_affect
from .synchrony import synchrony


def measure(
    aligned: Aligned,
    parent_onsets_s,
    infant_onsets_s,
    *,
    contingency_window_s: float = 2.0,
    min_shift_s: float | None = None,
    sync_window_s: float = 4.0,
    sync_step_s: float = 0.5,
    max_lag_s: float = 3.0,
    shifts: int = 1000,
    seed: int = 0,
    parent_threshold: float = 1.5,
    infant_threshold: float = 1.5,
    peak_tolerance_s: float = 1.0,
    dyad_id=None,
) -> dict:
    """All measures: {"summary": row, "contingency", "synchrony", "shared_affect"}."""
    al = aligned
    require_joint(al)
    c = contingency(
        al,
        parent_onsets_s,
        infant_onsets_s,
        window_s=contingency_window_s,
        shifts=shifts,
        seed=seed,
        min_shift_s=min_shift_s,
    )
    s = synchrony(
        al, window_s=sync_window_s, step_s=sync_step_s, max_lag_s=max_lag_s, shifts=shifts, seed=seed
    )
    a = shared_affect(al, parent_threshold, infant_threshold, peak_tolerance_s)
    row = {} if dyad_id is None else {"dyad_id": dyad_id}
    row.update(al.counts())
    row.update(
        {
            "joint_fraction": al.n_joint / al.n,
            "rate_hz": al.rate,
            "duration_s": al.n / al.rate,
            "offset_s": al.offset_s,
            "parent_onsets": c["n_onsets_parent"],
            "infant_onsets": c["n_onsets_infant"],
            "parent_onsets_dropped": c["n_onsets_parent_given"] - c["n_onsets_parent"],
            "infant_onsets_dropped": c["n_onsets_infant_given"] - c["n_onsets_infant"],
        }
    )
    for key, d in (("p2i", c["parent_to_infant"]), ("i2p", c["infant_to_parent"])):
        row[f"contingency_{key}_observed"] = d["observed"]
        row[f"contingency_{key}_null_mean"] = d["null_mean"]
        row[f"contingency_{key}_p"] = d["p"]
    row.update(
        {
            "peak_lag_frames": (s["peak_lag_frames"] if s["peak_lag_frames"] is not None else np.nan),
            "peak_lag_s": s["peak_lag_s"],
            "peak_r": s["peak_r"],
            "sync_threshold": s["threshold"],
            "sync_significant": s["significant"],
            "sync_p": s["p"],
            "shared_fraction": a["fraction"],
            "shared_expected": a["expected"],
            "shared_ratio": a["ratio"],
            "shared_episodes": a["n_episodes"],
            "parent_threshold": float(parent_threshold),
            "infant_threshold": float(infant_threshold),
            "parent_min_confidence": al.parent_min_confidence,
            "infant_min_confidence": al.infant_min_confidence,
            "contingency_window_s": float(contingency_window_s),
            "min_shift_s": c["min_shift_s"],
            "sync_window_s": float(sync_window_s),
            "sync_step_s": float(sync_step_s),
            "max_lag_s": float(max_lag_s),
            "peak_tolerance_s": float(peak_tolerance_s),
            "shifts": int(shifts),
            "seed": seed,
        }
    )
    return {"summary": row, "contingency": c, "synchrony": s, "shared_affect": a}


def summary(aligned: Aligned, parent_onsets_s, infant_onsets_s, **params) -> dict:
    """One flat row per dyad (keys: see :func:`measure`; p2i = the infant
    answering the parent, i2p = the parent answering the infant)."""
    return measure(aligned, parent_onsets_s, infant_onsets_s, **params)["summary"]


def analyse_dyad(
    parent_df: pd.DataFrame,
    infant_df: pd.DataFrame,
    offset_s: float = 0.0,
    *,
    rate: float | None = None,
    parent_min_confidence: float = MIN_CONFIDENCE,
    infant_min_confidence: float = MIN_CONFIDENCE,
    parent_smile_params=None,
    infant_smile_params=None,
    **params,
) -> dict:
    """Align two frame tables, segment each person's smiles (``segment_smiles``
    with that person's min_confidence; needs the landmark columns) and
    measure.  Returns :func:`measure`'s dict plus "aligned" and "smiles"."""
    from ..segment import SmileParams, segment_smiles

    al = align(
        parent_df,
        infant_df,
        offset_s,
        rate,
        parent_min_confidence=parent_min_confidence,
        infant_min_confidence=infant_min_confidence,
    )
    pp = replace(parent_smile_params or SmileParams(), min_confidence=parent_min_confidence)
    ip = replace(infant_smile_params or SmileParams(), min_confidence=infant_min_confidence)
    sp, si = segment_smiles(parent_df, pp), segment_smiles(infant_df, ip)
    out = measure(al, sp, si, **params)
    out["aligned"], out["smiles"] = al, {"parent": sp, "infant": si}
    return out
