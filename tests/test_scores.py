"""Questionnaire and smile-table validation: every problem named, nothing dropped."""

from __future__ import annotations

import pandas as pd
import pytest

from dyadlab.frames import TableError
from services.stats import scores as sc


def good_scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "participant_id": ["p1", "p1", "p2", "p2"],
            "visit_month": [6, 12, 6, 12],
            "phq9": [3, 5, 0, 27],
            "aces": [0, 0, 4, 4],
            "pss": [12, 14, 40, 0],
            "pearls": [0, 1, 10, 0],
            "social_support": [80, 90.5, 100, 0],
        }
    )


def good_smiles() -> pd.DataFrame:
    rows = []
    for pid, visit, n in [("p1", 6, 3), ("p1", 12, 1), ("p2", 6, 2)]:
        for k in range(1, n + 1):
            rows.append(
                {
                    "participant_id": pid,
                    "visit_month": visit,
                    "smile_id": k,
                    **{f: 0.1 * k for f in sc.FEATURES},
                }
            )
    return pd.DataFrame(rows)


def test_valid_scores_pass_typed():
    df, notes = sc.validate_scores(good_scores())
    assert notes == []
    assert df["visit_month"].dtype.kind == "i" and df["phq9"].dtype.kind == "f"
    assert len(df) == 4


def test_out_of_range_scores_name_row_column_and_range():
    df = good_scores()
    df.loc[1, "phq9"] = 28
    df.loc[3, "pss"] = -1
    with pytest.raises(TableError) as e:
        sc.validate_scores(df)
    msg = str(e.value)
    assert "row 2, column 'phq9': 28 is outside PHQ-9's range [0, 27]" in msg
    assert "row 4, column 'pss': -1 is outside PSS's range [0, 40]" in msg


def test_non_numeric_and_duplicates_are_reported_together():
    df = good_scores().astype({"aces": object})
    df.loc[0, "aces"] = "three"
    df = pd.concat([df, df.iloc[[2]]], ignore_index=True)
    df.loc[4, "aces"] = 4
    with pytest.raises(TableError) as e:
        sc.validate_scores(df)
    msg = str(e.value)
    assert "row 1, column 'aces': 'three' is not a number" in msg
    assert "row 5: participant 'p2' visit 6 repeats row 3" in msg


def test_missing_columns_and_bad_visits():
    with pytest.raises(TableError, match="missing columns: pss, pearls"):
        sc.validate_scores(good_scores().drop(columns=["pss", "pearls"]))
    df = good_scores()
    df.loc[2, "visit_month"] = 9
    with pytest.raises(TableError, match="row 3, column 'visit_month': 9 is not one of 6, 12"):
        sc.validate_scores(df)


def test_missing_values_are_allowed_and_counted():
    df = good_scores()
    df.loc[[0, 3], "pearls"] = None
    out, notes = sc.validate_scores(df)
    assert out["pearls"].isna().sum() == 2
    assert any("PEARLS: 2 missing values" in n for n in notes)


def test_categories_follow_table_one():
    s = pd.Series([0, 4, 5, 9, 10, 14, 15, 19, 20, 27, None])
    cats = sc.SCALES["phq9"].category(s).tolist()
    assert cats[:10] == [
        "minimal",
        "minimal",
        "mild",
        "mild",
        "moderate",
        "moderate",
        "moderately severe",
        "moderately severe",
        "severe",
        "severe",
    ]
    assert pd.isna(cats[10])
    assert sc.SCALES["aces"].category(pd.Series([0, 1, 3, 4, 10])).tolist() == [
        "low",
        "intermediate",
        "intermediate",
        "high",
        "high",
    ]
    assert sc.SCALES["pss"].category(pd.Series([13, 14, 26, 27])).tolist() == [
        "low",
        "moderate",
        "moderate",
        "high",
    ]


def test_smiles_validation_and_join_report_unmatched_sessions():
    sm = sc.validate_smiles(good_smiles().sample(frac=1, random_state=1))
    assert sm[["participant_id", "visit_month", "smile_id"]].values.tolist()[:3] == [
        ["p1", 6, 1],
        ["p1", 6, 2],
        ["p1", 6, 3],
    ]
    scores, _ = sc.validate_scores(good_scores().iloc[[0, 1, 3]])
    joined, notes = sc.join(sm, scores)
    assert len(joined) == len(sm)
    assert any("p2 (month 12)" in n and "no smiles" in n for n in notes)
    assert any("p2 (month 6)" in n and "no scores" in n for n in notes)


def test_bad_smile_rows():
    df = good_smiles().astype({"onset_amplitude": object})
    df.loc[1, "smile_id"] = 1
    df.loc[4, "onset_amplitude"] = "big"
    with pytest.raises(TableError) as e:
        sc.validate_smiles(df)
    msg = str(e.value)
    assert "row 5, column 'onset_amplitude': 'big' is not a number" in msg
    assert "row 2: smile_id 1 repeats within participant 'p1' visit 6" in msg
