"""Property-based fuzzing (hypothesis) of the input parsers and the segmenter.

Each must either succeed or raise its documented error type — TableError for
the OpenFace importer (dyadlab/openface.py, via tables.read_frames too), the
questionnaire/smile-table validation (services/stats/scores.py) and the smile
segmenter (services/smiles/segment.py) — never anything else. Kept fast:
~150 examples per property, no deadline (another job may hold the CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dyadlab import frames as ft
from dyadlab import tables
from dyadlab.frames import TableError
from dyadlab.openface import read_openface_csv
from dyadlab.tables import read_any
from services.smiles import segment
from services.stats import scores

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- cells and tables ------------------------------------------------------------------
NUMS = st.one_of(st.integers(-10, 100), st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 5))
TEXT = st.sampled_from(
    [
        "",
        " ",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "abc",
        "1e400",
        "0x10",
        "1,5",
        '"',
        '""',
        "é",
        "\t",
        "null",
        "True",
        "-",
        "1.0.0",
        "1e-400",
    ]
)
CELL = st.one_of(NUMS, TEXT)


def _fmt(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return str(v)


OPENFACE_BASE = [
    "frame",
    "face_id",
    "timestamp",
    "confidence",
    "success",
    "AU12_r",
    "AU06_r",
    "x_48",
    "y_48",
    "x_54",
    "y_54",
    "x_33",
    "y_33",
    "pose_Rx",
    "gaze_0_x",
    "role",
]


@st.composite
def openface_csv(draw) -> bytes:
    """A plausible OpenFace CSV, then mutated: columns dropped/renamed/duplicated,
    cells replaced with hostile values, rows ragged, the file truncated, odd
    separators, BOM, CRLF."""
    cols = draw(
        st.lists(st.sampled_from(OPENFACE_BASE + ["FaceRectX", "junk", "frame"]), min_size=0, max_size=14)
    )
    if draw(st.booleans()):
        cols = [c for c in OPENFACE_BASE if c != "role"] + cols[:2]
    n = draw(st.integers(0, 12))
    rows = []
    for i in range(n):
        row = []
        for c in cols:
            if draw(st.integers(0, 9)) == 0:
                row.append(_fmt(draw(CELL)))
            elif c == "frame":
                row.append(str(i + 1))
            elif c == "face_id":
                row.append(str(draw(st.integers(0, 2))))
            elif c == "timestamp":
                row.append(f"{i / 30:.4f}")
            elif c == "confidence":
                row.append(f"{draw(st.floats(0, 1)):.3f}")
            elif c == "success":
                row.append(str(draw(st.integers(0, 1))))
            elif c == "role":
                row.append(draw(st.sampled_from(["", "adult", "infant", "dog"])))
            else:
                row.append(f"{draw(st.floats(-500, 500)):.3f}")
        if draw(st.integers(0, 14)) == 0:  # ragged row
            row = row[:-1] if row and draw(st.booleans()) else row + ["1"]
        rows.append(row)
    sep = draw(st.sampled_from([",", ", ", ", ", ", ", ";", "\t"]))
    nl = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = nl.join([sep.join(cols)] + [sep.join(r) for r in rows]) + draw(st.sampled_from(["", nl, nl * 3]))
    data = text.encode()
    if draw(st.integers(0, 9)) == 0:
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.integers(0, 7)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 15)) == 0:
        data += draw(st.binary(max_size=20))
    return data


def _check_table(df: pd.DataFrame, notes: list[str]) -> None:
    ft.validate(df)
    assert isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    assert np.isfinite(df[ft.REQUIRED_COLS].to_numpy(float)).all()
    assert not df.duplicated(["frame", "face_id"]).any()


# -- OpenFace importer -----------------------------------------------------------------
@FUZZ
@given(openface_csv())
def test_openface_import_succeeds_or_raises_table_error(data):
    try:
        df, notes = read_openface_csv(data)
    except TableError as e:
        assert str(e)
        return
    _check_table(df, notes)


@FUZZ
@given(st.binary(max_size=600))
def test_openface_import_of_random_bytes(data):
    try:
        df, notes = tables.read_frames(data)  # Parquet sniffing, then the CSV importer
    except TableError as e:
        assert str(e)
        return
    _check_table(df, notes)


# -- questionnaires and smile tables ----------------------------------------------------
SCORE_COLS = scores.KEYS + scores.SCORE_COLUMNS


@st.composite
def table(draw, columns: list[str]) -> pd.DataFrame:
    cols = [c for c in columns if draw(st.integers(0, 19))] + draw(
        st.lists(st.sampled_from(["extra", "visit_month"]), max_size=1)
    )
    n = draw(st.integers(0, 10))
    data = {}
    for c in dict.fromkeys(cols):
        if c == "participant_id":
            gen = st.one_of(st.sampled_from(["p1", "p2", " p3 ", ""]), st.none(), NUMS)
        elif c == "visit_month":
            gen = st.one_of(st.sampled_from([6, 12, 6.0, "6", 7, -1]), CELL, st.none())
        elif c == "smile_id":
            gen = st.one_of(st.integers(-1, 4), st.floats(0, 3), CELL)
        else:
            gen = st.one_of(st.integers(-5, 120), st.floats(-1, 50), CELL, st.none())
        data[c] = draw(st.lists(gen, min_size=n, max_size=n))
    return pd.DataFrame(data)


@FUZZ
@given(table(SCORE_COLS))
def test_validate_scores_succeeds_or_raises_table_error(df):
    try:
        out, notes = scores.validate_scores(df)
    except TableError as e:
        assert str(e)
        return
    assert set(out["visit_month"]) <= set(scores.VISITS)
    for col, sc in scores.SCALES.items():
        v = out[col].dropna()
        assert ((v >= sc.lo) & (v <= sc.hi)).all()
    assert not out.duplicated(scores.KEYS).any()


@FUZZ
@given(table(scores.KEYS + ["smile_id"] + list(scores.FEATURES)))
def test_validate_smiles_succeeds_or_raises_table_error(df):
    try:
        out = scores.validate_smiles(df)
    except TableError as e:
        assert str(e)
        return
    assert (out["smile_id"] >= 1).all()
    assert not out.duplicated(scores.KEYS + ["smile_id"]).any()


@FUZZ
@given(table(SCORE_COLS))
def test_scores_through_csv_bytes(df):
    """The service's path: bytes -> read_any -> validate_scores."""
    data = df.to_csv(index=False).encode()
    try:
        scores.validate_scores(read_any(data))
    except TableError as e:
        assert str(e)


# -- smile segmenter ----------------------------------------------------------------------
LM = (segment.RIGHT_LIP_CORNER, segment.LEFT_LIP_CORNER, segment.INNER_LEFT_NOSTRIL)
ODD = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e300, -1e-300])


@st.composite
def trace(draw) -> pd.DataFrame:
    n = draw(st.integers(0, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dt = draw(st.sampled_from([1 / 30, 1 / 25, 0.07, 0.001]))
    t = np.cumsum(rng.choice([dt, dt, dt, 2 * dt, 0.0, 5 * dt], size=n))
    if draw(st.booleans()):
        rng.shuffle(t)  # out of order
    # AU12: rest, ramps and plateaus, spikes
    au = (
        np.clip(
            np.convolve(rng.normal(0, 1.5, n), np.ones(5) / 5, "full")[2 : 2 + n]
            + rng.choice([0.0, 2.5], size=n, p=[0.6, 0.4]),
            0,
            5,
        )
        if n
        else np.zeros(0)
    )
    df = pd.DataFrame(
        {
            "frame": np.arange(1, n + 1) if draw(st.booleans()) else rng.integers(0, 5, n),
            "face_id": 0,
            "timestamp": t,
            "confidence": rng.choice([0.95, 0.9, 0.5, 0.0, 1.0], size=n),
            "success": rng.choice([1, 1, 1, 0], size=n),
            "AU12_r": au,
        }
    )
    base = {48: (40, 80), 54: (80, 80), segment.INNER_LEFT_NOSTRIL: (62, 55)}
    for i in LM:
        x0, y0 = base.get(i, (60, 60))
        spread = au * draw(st.sampled_from([0.0, 2.0]))
        df[f"x_{i}"] = x0 + (-spread if i == 48 else spread if i == 54 else 0) + rng.normal(0, 0.5, n)
        df[f"y_{i}"] = y0 + rng.normal(0, 0.5, n)
    for _ in range(draw(st.integers(0, 4))):  # hostile cells
        if n:
            col = draw(
                st.sampled_from(
                    ["AU12_r", "timestamp", "confidence"] + [f"{a}_{i}" for a in "xy" for i in LM]
                )
            )
            df.loc[draw(st.integers(0, n - 1)), col] = draw(ODD)
    if draw(st.integers(0, 9)) == 0:  # degenerate: nostril on a lip corner
        df[f"x_{LM[0]}"], df[f"y_{LM[0]}"] = df[f"x_{LM[1]}"], df[f"y_{LM[1]}"]
    return df


@FUZZ
@given(
    trace(),
    st.sampled_from(
        [
            segment.SmileParams(),
            segment.SmileParams(smooth_window_s=0.0),
            segment.SmileParams(au12_threshold=0.5, min_activations=1),
            segment.SmileParams(activation_window_s=0.05, smooth_window_s=5.0),
        ]
    ),
)
def test_segmenter_succeeds_or_raises_table_error(df, params):
    try:
        smiles = segment.segment_smiles(df, params)
    except TableError as e:
        assert str(e)
        return
    for s in smiles:
        assert s.start_s <= s.onset_end_s <= s.end_s
        assert len(s.t) == len(s.au12) == len(s.r) == len(s.rows)
        if s.complete:
            assert s.offset is not None and s.onset_end_s <= s.offset_start_s <= s.end_s


@FUZZ
@given(
    st.lists(
        st.sampled_from(["frame", "timestamp", "confidence", "success", "AU12_r", "face_id", "x_48", "y_48"]),
        unique=True,
    )
)
def test_segmenter_missing_columns_raise_table_error(cols):
    df = pd.DataFrame({c: [0.0, 1.0] for c in cols})
    with pytest.raises(TableError):
        segment.segment_smiles(df)
