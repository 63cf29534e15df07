"""Import an OpenFace 2.x CSV (FeatureExtraction / FaceLandmarkVidMulti) as a frame table.

``read_openface_csv(source)`` returns ``(table, notes)``: the table is in the
shape of :mod:`dyadlab.frames` (OpenFace's own column names), the notes are
human-readable remarks for the user (what was found, what was dropped, what
downstream analysis will not be able to do).  Anything that would make the
table wrong raises :class:`dyadlab.frames.TableError` with a precise message;
rows are never dropped silently.

Formats accepted
----------------
OpenFace writes ``", "`` between fields, so headers and cells have a leading
space (``" timestamp"``); names are stripped.

* OpenFace 2.0.x FeatureExtraction: ``frame, timestamp, confidence, success,
  ...`` -- no ``face_id`` (one face per file); we set ``face_id`` to 0.
* OpenFace 2.1/2.2 FeatureExtraction and FaceLandmarkVidMulti: ``frame,
  face_id, timestamp, confidence, success, ...``.  FeatureExtraction always
  writes face_id 0; FaceLandmarkVidMulti writes one row per tracked face per
  frame, and we keep its ids.
* Any subset of the optional blocks, since each is switched on by a flag
  (``-pose -2Dfp -3Dfp -pdmparams -aus -gaze``): a file run with ``-aus`` only
  has no landmarks and imports with a note.

FaceLandmarkImg output (``face, confidence, ...``: no frame or timestamp) and
other tools' CSVs (e.g. py-feat's ``FaceRectX, ...``) are refused with a hint.

Columns kept (all float64 unless said otherwise)
------------------------------------------------
* required: ``frame`` (int), ``face_id`` (int), ``timestamp`` (seconds),
  ``confidence`` (must lie in [0, 1]), ``success`` (int, 0 or 1);
* ``role``: ``""`` for OpenFace's files; a ``role`` column (dyadlab's own CSV
  export, values ``adult``/``infant``/empty) is kept, so an exported table
  reads back the same;
* ``pose_Tx .. pose_Rz``; 2D landmarks ``x_0..x_67``, ``y_0..y_67`` (pixels);
* AU intensities ``AU##_r`` (0-5) and AU presence ``AU##_c`` (0/1, includes
  OpenFace's presence-only ``AU28_c``);
* gaze ``gaze_0_x .. gaze_1_z``, ``gaze_angle_x``, ``gaze_angle_y``;
* 3D landmarks ``X_n``, ``Y_n``, ``Z_n`` (mm, camera coordinates);
* rigid shape parameters ``p_scale, p_rx, p_ry, p_rz, p_tx, p_ty``.

Dropped (with a note): the 56 2D/3D eye-region landmarks ``eye_lmk_*`` (280
columns, unused downstream), the non-rigid shape parameters ``p_0..p_33``, and
any column OpenFace does not write.  Dropped columns are not parsed, so odd
values in them cannot cause errors.

Row numbers in messages
-----------------------
"data row N" counts data rows from 1 (the first row under the header is data
row 1); "line N+1" is the line in the file with the header as line 1, which is
also the row number a spreadsheet shows.

Empty cells / NaN (``nan``, ``-nan``, MSVC's ``-nan(ind)``, ...) in the
required columns are errors; in other columns they are kept as NaN and
counted in a note.
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import BinaryIO, TextIO, Union

import numpy as np
import pandas as pd

from dyadlab.frames import (
    LANDMARK_COLS,
    MIN_CONFIDENCE,
    OPENFACE_AUS,
    POSE_COLS,
    REQUIRED_COLS,
    ROLE_COL,
    ROLES,
    X_COLS,
    Y_COLS,
    TableError,
    column_order,
    validate,
)

__all__ = ["read_openface_csv", "DEFAULT_MAX_BYTES", "FILE_REQUIRED_COLS"]

#: Refuse inputs bigger than this (bytes) unless the caller raises the limit.
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

#: Columns the CSV itself must have (face_id is optional: 2.0 files lack it).
FILE_REQUIRED_COLS = [c for c in REQUIRED_COLS if c != "face_id"]
_INT_COLS = ("frame", "face_id", "success")

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO, TextIO]

# Columns we keep besides REQUIRED_COLS.
_KEEP_RE = re.compile(
    r"^(?:pose_[TR][xyz]"
    r"|[xyXYZ]_\d+"
    r"|AU\d\d_[rc]"
    r"|gaze_[01]_[xyz]|gaze_angle_[xy]"
    r"|p_scale|p_r[xyz]|p_t[xy])$"
)
# OpenFace columns we drop on purpose, by group name for the note.
_DROP_GROUPS = (
    (re.compile(r"^eye_lmk_[xyXYZ]_\d+$"), "eye-region landmarks eye_lmk_*"),
    (re.compile(r"^p_\d+$"), "non-rigid shape parameters p_0..p_33"),
)
# Besides pandas' defaults (nan, -nan, NaN, NA, 1.#IND, ...): what MSVC builds
# of OpenFace print for NaN.
_EXTRA_NA = ["nan(ind)", "-nan(ind)", "NAN(IND)", "-NAN(IND)"]

_MAX_LISTED = 5


def _where(i: int) -> str:
    """Position of 0-based data row index i, in both user conventions."""
    return f"data row {i + 1} (line {i + 2} of the file, header = line 1)"


def _short(v, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _list(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- input


def _read_bytes(source: Source, max_bytes: int) -> tuple[bytes, str]:
    """The raw bytes of source and a name for messages, enforcing max_bytes."""
    too_big = lambda size, name: TableError(
        f"{name} is {size / 2**20:.1f} MiB, over the import limit of "
        f"{max_bytes / 2**20:.1f} MiB (max_bytes={max_bytes})"
    )
    data: bytes | str | None  # a file object's read() (below) may give str or None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise too_big(len(data), "the uploaded data")
        return data, "the uploaded data"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = os.path.basename(path) or path
        try:
            size = os.stat(path).st_size
            if size > max_bytes:
                raise too_big(size, name)
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise TableError(f"cannot read OpenFace CSV {path!r}: {e.strerror or e}") from e
        if len(data) > max_bytes:  # grew while we looked
            raise too_big(len(data), name)
        return data, name
    if hasattr(source, "read"):
        name = os.path.basename(str(getattr(source, "name", ""))) or "the uploaded data"
        data = source.read(max_bytes + 1)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if data is None:
            data = b""
        if len(data) > max_bytes:
            raise too_big(len(data), name)
        return bytes(data), name
    raise TypeError(f"source must be a path, bytes or a file object, not {type(source).__name__}")


def _check_text(data: bytes, name: str) -> bytes:
    """Refuse empty and non-text input; return data without BOM / trailing blanks."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TableError(f"{name} is UTF-16 text; save it as a UTF-8 (or ASCII) CSV")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data or data.isspace():
        raise TableError(f"{name} is empty (no header, no rows)")
    if data.startswith(b"\x1f\x8b"):
        raise TableError(f"{name} is gzip-compressed, not a CSV; decompress it first")
    if data.startswith(b"PK\x03\x04"):
        raise TableError(
            f"{name} is a zip archive (or an .xlsx workbook), not a CSV; "
            "extract it or export the sheet as CSV first"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise TableError(f"{name} is not a CSV text file: binary data (NUL byte at byte offset {nul})")
    return data.rstrip(b" \t\r\n") + b"\n"


def _parse_header(data: bytes, name: str) -> tuple[list[str], int]:
    """Stripped column names and the offset where the data rows start."""
    end = data.find(b"\n")
    raw = data[:end]
    try:
        line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        raise TableError(
            f"{name} is not a CSV text file: the first line is not UTF-8 text (bad byte at offset {e.start})"
        ) from None
    if any(ord(ch) < 32 and ch != "\t" for ch in line):
        raise TableError(f"{name} is not a CSV text file: control characters in the first line")
    names = [c.strip() for c in next(csv.reader([line], skipinitialspace=True))]
    unnamed = [i + 1 for i, c in enumerate(names) if not c]
    if unnamed:
        raise TableError(
            f"{name}: header has empty column names at positions {_list(map(str, unnamed))} (1-based)"
        )
    seen, dups = set(), []
    for c in names:
        if c in seen and c not in dups:
            dups.append(c)
        seen.add(c)
    if dups:
        raise TableError(f"{name}: header repeats column names: {_list(dups)}")
    return names, end + 1


def _check_field_counts(body: bytes, n_fields: int, name: str) -> int:
    """Number of data rows; refuse blank, short (truncated) or long rows.

    Only called for unquoted files (OpenFace never quotes), where a comma count
    is exactly the field count.
    """
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    want = n_fields - 1
    for i, ln in enumerate(lines):
        if ln.count(b",") != want:
            if not ln.strip():
                raise TableError(
                    f"{name}: {_where(i)} is blank; remove blank lines "
                    "(every line after the header must be one frame)"
                )
            got = ln.count(b",") + 1
            hint = " (truncated file?)" if got < n_fields and i == len(lines) - 1 else ""
            raise TableError(f"{name}: {_where(i)} has {got} fields but the header has {n_fields}{hint}")
    return len(lines)


# --------------------------------------------------------------------------- parsing


def _classify(names: list[str]) -> tuple[list[str], dict[str, int], list[str]]:
    dropped_groups: dict[str, int]
    keep, dropped_groups, unknown = [], {}, []
    for c in names:
        if c == ROLE_COL:
            continue  # read as text in read_openface_csv
        if c in REQUIRED_COLS or _KEEP_RE.match(c):
            keep.append(c)
            continue
        for rx, label in _DROP_GROUPS:
            if rx.match(c):
                dropped_groups[label] = dropped_groups.get(label, 0) + 1
                break
        else:
            unknown.append(c)
    return keep, dropped_groups, unknown


def _missing_required_message(names: list[str], missing: list[str], name: str) -> str:
    msg = f"{name} is not a usable OpenFace CSV: missing required columns: " + ", ".join(missing)
    have = set(names)
    if "face" in have and "frame" not in have:
        msg += (
            " -- this looks like FaceLandmarkImg (single-image) output; run "
            "FeatureExtraction or FaceLandmarkVidMulti on the video instead"
        )
    elif "FaceRectX" in have or "FaceScore" in have:
        msg += " -- this looks like a py-feat result, not OpenFace output"
    elif len(names) == 1 and (";" in names[0] or "\t" in names[0]):
        sep = "';'" if ";" in names[0] else "tab"
        msg += f" -- the file seems to use {sep} as separator; OpenFace CSVs use ','"
    else:
        msg += f" (found {len(names)} columns: {_list(map(_clip, names), 8)})"
    return msg


def _parse(data: bytes, body_start: int, names: list[str], keep: list[str], name: str) -> pd.DataFrame:
    opts = dict(
        header=0,
        names=names,
        usecols=keep,
        skipinitialspace=True,
        skip_blank_lines=False,
        na_values=_EXTRA_NA,
        keep_default_na=True,
        encoding="utf-8",
        engine="c",
    )
    try:
        return pd.read_csv(io.BytesIO(data), dtype={c: "float64" for c in keep}, **opts)
    except UnicodeDecodeError as e:
        raise TableError(
            f"{name} is not UTF-8 text (bad byte near offset {body_start + e.start}); is it really a CSV?"
        ) from None
    except pd.errors.ParserError as e:
        raise TableError(f"{name} is not a well-formed CSV: {e}") from None
    except (ValueError, TypeError, OverflowError):
        pass  # some cell is not a number: find out exactly which
    raw = pd.read_csv(io.BytesIO(data), dtype=str, **opts)
    problems, total = [], 0
    for c in keep:
        col = raw[c]
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna().to_numpy() & col.notna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            total += int(bad.sum())
            problems.append(f"column {c!r} at {_where(i)}: {_short(col.iloc[i])}")
    if not problems:  # should not happen; report pandas' own reason
        raise TableError(f"{name}: could not read numeric values")
    raise TableError(
        f"{name}: non-numeric values in numeric columns ({total} cells); "
        "first per column: "
        + "; ".join(problems[:_MAX_LISTED])
        + (f"; ... ({len(problems) - _MAX_LISTED} more columns)" if len(problems) > _MAX_LISTED else "")
    )


def _check_required(df: pd.DataFrame, name: str) -> None:
    problems = []
    for c in REQUIRED_COLS:
        v = df[c].to_numpy()
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad))
            what = "empty/NaN" if np.isnan(v[i]) else f"{v[i]}"
            problems.append(
                f"column {c!r} is {what} at {_where(i)}"
                + (f" and {int(bad.sum()) - 1} more rows" if bad.sum() > 1 else "")
            )
    if problems:
        raise TableError(f"{name}: required columns must have a number in every row: " + "; ".join(problems))
    for c in _INT_COLS:
        v = df[c].to_numpy()
        bad = v != np.round(v)
        if bad.any():
            i = int(np.argmax(bad))
            raise TableError(f"{name}: column {c!r} must hold whole numbers; {_where(i)} has {v[i]!r}")
    v = df["success"].to_numpy()
    bad = (v != 0) & (v != 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise TableError(f"{name}: column 'success' must be 0 or 1; {_where(i)} has {v[i]:g}")
    v = df["confidence"].to_numpy()
    bad = (v < 0) | (v > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise TableError(
            f"{name}: column 'confidence' must lie in [0, 1]; "
            f"{_where(i)} has {v[i]:g} ({int(bad.sum())} rows out of range)"
        )


def _check_duplicates(df: pd.DataFrame, name: str) -> None:
    key = ["frame", "face_id"]
    dup = df.duplicated(key, keep="first").to_numpy()
    if not dup.any():
        return
    i = int(np.argmax(dup))
    f, fid = int(df["frame"].iat[i]), int(df["face_id"].iat[i])
    same = np.flatnonzero((df["frame"].to_numpy() == f) & (df["face_id"].to_numpy() == fid))
    raise TableError(
        f"{name}: duplicate row for frame {f}, face_id {fid} at {_where(i)}; "
        f"first seen at {_where(int(same[0]))} ({int(dup.sum())} duplicate rows in "
        "total). Each (frame, face_id) may appear once -- was a file appended twice?"
    )


# --------------------------------------------------------------------------- notes


def _notes(
    df: pd.DataFrame, had_face_id: bool, dropped: dict[str, int], unknown: list[str], name: str
) -> list[str]:
    notes = []
    ids = sorted(int(i) for i in df["face_id"].unique())
    ts = df["timestamp"]
    notes.append(
        f"read {len(df)} rows from {name}: {len(ids)} face(s) (face_id "
        f"{_list(map(str, ids), 10)}), frames {int(df['frame'].min())}-"
        f"{int(df['frame'].max())}, timestamps {ts.min():g}-{ts.max():g} s"
    )
    if had_face_id:
        notes.append(
            "face_id column present (OpenFace 2.1+/2.2 FeatureExtraction or "
            "FaceLandmarkVidMulti); face ids kept as in the file"
        )
    else:
        notes.append(
            "no face_id column (OpenFace 2.0 single-face FeatureExtraction file): all rows are face_id 0"
        )
    notes.append(
        "face roles (adult/infant) are unknown for imported files: role is empty; choose faces by face_id"
    )

    have = set(df.columns)
    lm_have = [c for c in LANDMARK_COLS if c in have]
    if not lm_have:
        notes.append(
            "no 2D landmark columns (x_0..x_67, y_0..y_67; OpenFace flag "
            "-2Dfp): landmark-based smile phases (lip-corner movement) "
            "cannot be computed from this file"
        )
    elif len(lm_have) < len(LANDMARK_COLS):
        miss = [c for c in X_COLS + Y_COLS if c not in have]
        notes.append(
            f"2D landmarks incomplete ({len(miss)} of {len(LANDMARK_COLS)} "
            f"columns missing: {_list(miss)}): landmark-based smile phases "
            "cannot be computed from this file"
        )
    aus_r = [c for c in df.columns if re.fullmatch(r"AU\d\d_r", c)]
    if "AU12_r" not in have:
        notes.append(
            "no AU12_r column (lip-corner puller intensity; OpenFace flag "
            "-aus): smile analysis needs it and will refuse this table"
            + ("" if aus_r else "; the file has no AU intensity columns at all")
        )
    missing_aus = [c for c in OPENFACE_AUS if c not in have]
    if aus_r and missing_aus and "AU12_r" in have:
        notes.append(f"AU intensity columns missing: {_list(missing_aus)}")
    if not any(c in have for c in POSE_COLS):
        notes.append("no head-pose columns (pose_*; OpenFace flag -pose)")

    for label, n in dropped.items():
        notes.append(f"dropped {n} {label} columns (not used by dyadlab)")
    if unknown:
        notes.append(f"dropped {len(unknown)} column(s) OpenFace does not write: {_list(unknown)}")

    opt = [c for c in df.columns if c not in REQUIRED_COLS and c != ROLE_COL]
    if opt:
        vals = df[opt].to_numpy()
        bad = ~np.isfinite(vals)
        if bad.any():
            r, k = np.argwhere(bad)[0]
            ncols = int(bad.any(axis=0).sum())
            notes.append(
                f"{int(bad.sum())} empty/NaN/infinite cells in {ncols} optional "
                f"column(s), kept as NaN; first: column {opt[k]!r} at "
                f"{_where(int(r))}"
            )

    n_fail = int((df["success"] == 0).sum())
    if n_fail:
        notes.append(
            f"{n_fail} of {len(df)} rows have success=0 (face not tracked); "
            "their values are meaningless and are skipped by analyses"
        )
    n_low = int(((df["success"] == 1) & (df["confidence"] < MIN_CONFIDENCE)).sum())
    if n_low:
        notes.append(
            f"{n_low} tracked rows have confidence below {MIN_CONFIDENCE} "
            "and will be left out of smile analysis"
        )
    for fid in ids:
        fr = df.loc[df["face_id"] == fid, "frame"]
        back = fr.diff().to_numpy() < 0
        if back.any():
            i = int(fr.index[int(np.argmax(back))])
            notes.append(
                f"face_id {fid}: frame numbers go backwards at {_where(i)}; rows are kept in file order"
            )
    return notes


def _roles(data: bytes, name: str, n: int) -> pd.Series:
    """The text `role` column of a dyadlab CSV export, validated."""
    r = (
        pd.read_csv(
            io.BytesIO(data),
            usecols=lambda c: c.strip() == ROLE_COL,
            dtype=str,
            skipinitialspace=True,
            keep_default_na=False,
        )
        .iloc[:, 0]
        .str.strip()
    )
    bad = ~r.isin(["", *ROLES])
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise TableError(
            f"{name}: column 'role' at {_where(i)}: {_short(r.iloc[i])} (use adult, infant or leave it empty)"
        )
    return r.reset_index(drop=True).iloc[:n]


# --------------------------------------------------------------------------- API


def read_openface_csv(
    source: Source,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[pd.DataFrame, list[str]]:
    """Read an OpenFace 2.x CSV into a frame table; return (table, notes).

    source: a path (str / PathLike), the file's bytes, or a binary or text file
    object.  Raises TableError for anything that would make the table wrong:
    input over ``max_bytes``, empty or non-text input, missing required
    columns (all named), non-numeric cells, NaN in required columns, bad
    frame/face_id/success/confidence values, ragged rows and duplicate
    (frame, face_id) rows -- each with column and row (see module docstring
    for the row convention).
    """
    data, name = _read_bytes(source, max_bytes)
    data = _check_text(data, name)
    names, body_start = _parse_header(data, name)

    missing = [c for c in FILE_REQUIRED_COLS if c not in names]
    if missing:
        raise TableError(_missing_required_message(names, missing, name))

    # _check_text left exactly one trailing newline, so a header-only file
    # has nothing after the header line.
    if body_start >= len(data):
        raise TableError(f"{name} has a header but no data rows")
    if b'"' not in data:
        _check_field_counts(data[body_start:], len(names), name)

    keep, dropped, unknown = _classify(names)
    df = _parse(data, body_start, names, keep, name)
    if len(df) == 0:
        raise TableError(f"{name} has a header but no data rows")

    had_face_id = "face_id" in df.columns
    if not had_face_id:
        df["face_id"] = 0.0
    _check_required(df, name)
    for c in _INT_COLS:
        df[c] = df[c].astype("int64")
    _check_duplicates(df, name)

    df[ROLE_COL] = _roles(data, name, len(df)) if ROLE_COL in names else ""
    df = df[column_order(list(df.columns))]
    notes = _notes(df, had_face_id, dropped, unknown, name)
    validate(df)
    return df, notes
