"""Questionnaires, smile features and the cohort's tables ("Behind the Smile", Table I).

Two input tables:
- the questionnaire table: ``participant_id, visit_month, phq9, aces, pss,
  pearls, social_support`` — one row per (participant, visit);
- the long smile table: the smiles service's columns plus ``participant_id``
  and ``visit_month``, one row per smile, ``smile_id`` 1..n in time order
  within a session.

`validate_scores` and `validate_smiles` report every problem precisely (row
and column, rows counted from 1 below the header as a spreadsheet shows them
minus one) and never drop rows silently. Missing scores are allowed: each
analysis reports how many observations it excluded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from dyadlab.frames import TableError
from dyadlab.study import KEYS, VISITS


@dataclasses.dataclass(frozen=True)
class Scale:
    column: str
    label: str
    lo: float
    hi: float
    #: (category name, lowest score, highest score); None = no categories
    categories: tuple[tuple[str, float, float], ...] | None
    #: sample mean and SD of the seed study (Table I)
    mean: float
    sd: float

    def category(self, values: pd.Series) -> pd.Series:
        """Category name per score (NaN stays NaN)."""
        if self.categories is None:
            raise ValueError(f"{self.label} has no categories")
        out = pd.Series(pd.NA, index=values.index, dtype="object")
        for name, a, b in self.categories:
            out[(values >= a) & (values <= b)] = name
        return out


SCALES: dict[str, Scale] = {
    s.column: s
    for s in (
        Scale(
            "phq9",
            "PHQ-9",
            0,
            27,
            (
                ("minimal", 0, 4),
                ("mild", 5, 9),
                ("moderate", 10, 14),
                ("moderately severe", 15, 19),
                ("severe", 20, 27),
            ),
            3.19,
            4.16,
        ),
        Scale("aces", "ACEs", 0, 10, (("low", 0, 0), ("intermediate", 1, 3), ("high", 4, 10)), 2.07, 2.55),
        Scale("pss", "PSS", 0, 40, (("low", 0, 13), ("moderate", 14, 26), ("high", 27, 40)), 12.52, 6.66),
        Scale("pearls", "PEARLS", 0, 10, None, 0.47, 0.90),
        Scale("social_support", "Social Support", 0, 100, None, 82.80, 15.97),
    )
}
SCORE_COLUMNS = list(SCALES)
CATEGORICAL = [c for c, s in SCALES.items() if s.categories is not None]

#: Smile features analysed (the paper's Tables III/IV), with display names.
FEATURES: dict[str, str] = {
    "max_onset_speed": "Maximum Onset Speed",
    "max_offset_speed": "Maximum Offset Speed",
    "onset_amplitude": "Onset Amplitude",
    "offset_amplitude": "Offset Amplitude",
    "onset_duration_s": "Onset Duration",
    "offset_duration_s": "Offset Duration",
    "apex_duration_s": "Apex Duration",
    "total_duration_s": "Total Duration",
}


#: Per-dyad measures (the smiles service's dyad mode) analysed against the scores.
DYAD_MEASURES: dict[str, str] = {
    "contingency_p2i_observed": "Infant answers parent smiles (P within W)",
    "contingency_i2p_observed": "Parent answers infant smiles (P within W)",
    "peak_lag_s": "Peak lag, s (+: infant follows)",
    "peak_r": "Peak lagged cross-correlation",
    "shared_ratio": "Shared smiling / expected",
}


def _where(i: int) -> str:
    return f"row {i + 1}"


def _numeric(df: pd.DataFrame, col: str, problems: list[str], what: str) -> pd.Series:
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    bad = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    for i in np.flatnonzero(bad.to_numpy())[:5]:
        problems.append(f"{what} {_where(i)}, column {col!r}: {str(raw.iloc[i])[:40]!r} is not a number")
    if bad.sum() > 5:
        problems.append(f"{what} column {col!r}: {int(bad.sum()) - 5} more non-numeric values")
    return num


def _keys(df: pd.DataFrame, problems: list[str], what: str) -> pd.DataFrame:
    missing = [c for c in KEYS if c not in df.columns]
    if missing:
        raise TableError(f"{what} is missing columns: {', '.join(missing)}")
    out = df.copy()
    out["participant_id"] = out["participant_id"].astype(str).str.strip()
    empty = (out["participant_id"] == "") | df["participant_id"].isna()
    for i in np.flatnonzero(empty.to_numpy())[:5]:
        problems.append(f"{what} {_where(i)}, column 'participant_id': empty")
    visit = _numeric(out, "visit_month", problems, what)
    bad = visit.notna() & ~visit.isin(VISITS)
    for i in np.flatnonzero(bad.to_numpy())[:5]:
        problems.append(
            f"{what} {_where(i)}, column 'visit_month': {visit.iloc[i]:g} "
            f"is not one of {', '.join(map(str, VISITS))}"
        )
    for i in np.flatnonzero(visit.isna().to_numpy())[:5]:
        problems.append(f"{what} {_where(i)}, column 'visit_month': missing")
    out["visit_month"] = visit
    return out


def validate_scores(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The questionnaire table, typed and checked; (table, notes).

    Raises TableError listing every problem: missing columns, non-numeric
    values, out-of-range scores, duplicate (participant, visit) rows.
    Missing values are allowed (noted)."""
    what = "scores"
    missing = [c for c in KEYS + SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise TableError(f"scores table is missing columns: {', '.join(missing)}")
    problems: list[str] = []
    out = _keys(df, problems, what)
    for col, sc in SCALES.items():
        v = _numeric(out, col, problems, what)
        bad = v.notna() & ((v < sc.lo) | (v > sc.hi))
        for i in np.flatnonzero(bad.to_numpy())[:5]:
            problems.append(
                f"{what} {_where(i)}, column {col!r}: {v.iloc[i]:g} is outside "
                f"{sc.label}'s range [{sc.lo:g}, {sc.hi:g}]"
            )
        out[col] = v.astype(float)
    dup = out.duplicated(KEYS, keep=False) & out["visit_month"].notna()
    if dup.any():
        first: dict[tuple[object, object], int] = {}
        for i in np.flatnonzero(dup.to_numpy()):
            k = (out["participant_id"].iloc[i], out["visit_month"].iloc[i])
            if k in first:
                problems.append(
                    f"{what} {_where(i)}: participant {k[0]!r} visit {k[1]:g} repeats {_where(first[k])}"
                )
            else:
                first[k] = i
    if problems:
        raise TableError("; ".join(problems))
    notes = []
    for col in SCORE_COLUMNS:
        n = int(out[col].isna().sum())
        if n:
            notes.append(
                f"{SCALES[col].label}: {n} missing values (those sessions are excluded "
                "from analyses of this score)"
            )
    out["visit_month"] = out["visit_month"].astype(int)
    return out[KEYS + SCORE_COLUMNS + [c for c in out.columns if c not in KEYS + SCORE_COLUMNS]], notes


def validate_smiles(df: pd.DataFrame) -> pd.DataFrame:
    """The long smile table, typed and checked. Raises TableError with every problem."""
    what = "smiles"
    need = KEYS + ["smile_id"] + list(FEATURES)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TableError(f"smiles table is missing columns: {', '.join(missing)}")
    problems: list[str] = []
    out = _keys(df, problems, what)
    for col in ["smile_id"] + list(FEATURES):
        out[col] = _numeric(out, col, problems, what)
    bad = out["smile_id"].isna() | (out["smile_id"] < 1) | (out["smile_id"] % 1 != 0)
    for i in np.flatnonzero(bad.to_numpy())[:5]:
        problems.append(f"{what} {_where(i)}, column 'smile_id': must be a whole number >= 1")
    dup = out.duplicated(KEYS + ["smile_id"], keep="first") & ~bad
    for i in np.flatnonzero(dup.to_numpy())[:5]:
        problems.append(
            f"{what} {_where(i)}: smile_id {out['smile_id'].iloc[i]:g} repeats within "
            f"participant {out['participant_id'].iloc[i]!r} visit "
            f"{out['visit_month'].iloc[i]:g}"
        )
    if problems:
        raise TableError("; ".join(problems))
    out["visit_month"] = out["visit_month"].astype(int)
    out["smile_id"] = out["smile_id"].astype(int)
    return out.sort_values(KEYS + ["smile_id"], kind="stable").reset_index(drop=True)


def join(smiles: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Smiles with their session's scores; notes on sessions that do not match.

    A scored session with no smiles and smiles with no scores are both
    reported (by participant and visit), never silently dropped: the former
    keep their place in the scores table (zero smiles is a result), the
    latter are excluded from score analyses."""
    notes = []
    sess_sm = set(map(tuple, smiles[KEYS].drop_duplicates().itertuples(index=False)))
    sess_sc = set(map(tuple, scores[KEYS].itertuples(index=False)))
    no_smiles = sorted(sess_sc - sess_sm)
    no_scores = sorted(sess_sm - sess_sc)
    if no_smiles:
        notes.append(
            f"{len(no_smiles)} scored session(s) have no smiles: "
            + ", ".join(f"{p} (month {v})" for p, v in no_smiles[:10])
            + (" ..." if len(no_smiles) > 10 else "")
        )
    if no_scores:
        notes.append(
            f"{len(no_scores)} session(s) with smiles have no scores (excluded from "
            "score analyses): "
            + ", ".join(f"{p} (month {v})" for p, v in no_scores[:10])
            + (" ..." if len(no_scores) > 10 else "")
        )
    return smiles.merge(scores, on=KEYS, how="left", validate="many_to_one"), notes


def validate_dyads(df: pd.DataFrame) -> pd.DataFrame:
    """The per-dyad table (one row per session), typed and checked."""
    what = "dyads"
    missing = [c for c in KEYS + list(DYAD_MEASURES) if c not in df.columns]
    if missing:
        raise TableError(f"dyads table is missing columns: {', '.join(missing)}")
    problems: list[str] = []
    out = _keys(df, problems, what)
    for col in DYAD_MEASURES:
        out[col] = _numeric(out, col, problems, what).astype(float)
    dup = out.duplicated(KEYS, keep="first")
    for i in np.flatnonzero(dup.to_numpy())[:5]:
        problems.append(
            f"{what} {_where(i)}: participant {out['participant_id'].iloc[i]!r} visit "
            f"{out['visit_month'].iloc[i]:g} repeats"
        )
    if problems:
        raise TableError("; ".join(problems))
    out["visit_month"] = out["visit_month"].astype(int)
    return out
