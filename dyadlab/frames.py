"""The frame table: one row per (frame, face), in OpenFace 2.x's column names.

Both our own extraction and an imported OpenFace FeatureExtraction CSV end up
in this shape, so everything downstream (smiles, stats, dyad measures) reads
one format.

Landmarks follow the iBUG-68 scheme, 0-based, in image pixels, *subject's*
right/left: 36-41 right eye, 42-47 left eye, 48 right lip corner, 54 left lip
corner, 31-35 lower nose from the subject's right alar (31) through the
subnasale (33) to the left alar (35).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the CLI's start-up need not pay ~0.4 s for pandas
    import pandas as pd

N_LANDMARKS = 68
X_COLS = [f"x_{i}" for i in range(N_LANDMARKS)]
Y_COLS = [f"y_{i}" for i in range(N_LANDMARKS)]
LANDMARK_COLS = X_COLS + Y_COLS
#: OpenFace's 3D landmarks: millimetres, camera coordinates (x right, y down,
#: z away from the camera). NaN where the front-end has no depth (dlib).
LANDMARK3D_COLS = (
    [f"X_{i}" for i in range(N_LANDMARKS)]
    + [f"Y_{i}" for i in range(N_LANDMARKS)]
    + [f"Z_{i}" for i in range(N_LANDMARKS)]
)

#: The 17 intensity AUs OpenFace 2.x writes, in its order.
OPENFACE_AUS = [
    "AU01_r",
    "AU02_r",
    "AU04_r",
    "AU05_r",
    "AU06_r",
    "AU07_r",
    "AU09_r",
    "AU10_r",
    "AU12_r",
    "AU14_r",
    "AU15_r",
    "AU17_r",
    "AU20_r",
    "AU23_r",
    "AU25_r",
    "AU26_r",
    "AU45_r",
]

POSE_COLS = ["pose_Tx", "pose_Ty", "pose_Tz", "pose_Rx", "pose_Ry", "pose_Rz"]

#: Columns every frame table has, whatever produced it.
REQUIRED_COLS = ["frame", "face_id", "timestamp", "confidence", "success"]

#: Extra column (not OpenFace's): who the face is, "adult", "infant" or "".
ROLE_COL = "role"
ROLES = ("adult", "infant")

#: Frames kept for smile analysis (the seed paper's threshold).
MIN_CONFIDENCE = 0.8
#: The infant's default bar: infants' faces (three-quarter views, small, fast)
#: reach the paper's 0.8 far less often.
INFANT_MIN_CONFIDENCE = 0.5

#: Named landmark indices (0-based iBUG-68), used across services.
RIGHT_LIP_CORNER = 48
LEFT_LIP_CORNER = 54
#: The subject's left nostril point, just left of the subnasale (33): the
#: "inner left nostril" reference of the smile paper.
INNER_LEFT_NOSTRIL = 34
RIGHT_EYE_OUTER = 36
LEFT_EYE_OUTER = 45


class TableError(ValueError):
    """A frame table that downstream code cannot use; the message says why."""


def column_order(columns) -> list[str]:
    """OpenFace's order for known columns, then anything else as it came."""
    known = REQUIRED_COLS + [ROLE_COL] + POSE_COLS + LANDMARK_COLS + LANDMARK3D_COLS + OPENFACE_AUS
    present = set(columns)
    ordered = [c for c in known if c in present]
    return ordered + [c for c in columns if c not in set(ordered)]


def validate(df: pd.DataFrame, need_landmarks: bool = False, need_aus: tuple[str, ...] = ()) -> None:
    """Raise TableError naming every missing column or bad value kind."""
    missing = [c for c in REQUIRED_COLS if c not in df.columns]
    if need_landmarks:
        missing += [c for c in LANDMARK_COLS if c not in df.columns]
    missing += [c for c in need_aus if c not in df.columns]
    if missing:
        raise TableError("frame table is missing required columns: " + ", ".join(_compact(missing)))
    from pandas.api.types import is_numeric_dtype

    for c in REQUIRED_COLS:
        if not is_numeric_dtype(df[c]):
            raise TableError(f"column {c!r} must be numeric, got {df[c].dtype}")
    if len(df) and not df["confidence"].between(0, 1).all():
        bad = int((~df["confidence"].between(0, 1)).sum())
        raise TableError(f"column 'confidence' must lie in [0, 1]; {bad} rows do not")


def _compact(cols: list[str]) -> list[str]:
    """Show x_0..x_67 as one item instead of 68 when the whole block is missing."""
    out, s = [], set(cols)
    for block, name in ((X_COLS, "x_0..x_67"), (Y_COLS, "y_0..y_67")):
        if set(block) <= s:
            out.append(name)
            s -= set(block)
    return out + [c for c in cols if c in s]


def landmarks(df: pd.DataFrame) -> np.ndarray:
    """(n, 68, 2) float array of the landmark columns."""
    return np.stack([df[X_COLS].to_numpy(float), df[Y_COLS].to_numpy(float)], axis=-1)


def face_ids(df: pd.DataFrame) -> list[int]:
    return sorted(int(f) for f in df["face_id"].unique())


def select_face(df: pd.DataFrame, face: str | int | None) -> int:
    """Resolve a face selector ("adult", "infant", a face_id, or None) to a face_id.

    None picks the adult if roles are known, otherwise the face with most
    successful frames. Raises TableError with the choices when it cannot.
    """
    ids = face_ids(df)
    if not ids:
        raise TableError("frame table has no faces")
    if face is None or face == "":
        if ROLE_COL in df.columns and (df[ROLE_COL] == "adult").any():
            face = "adult"
        else:
            ok = df[df["success"] > 0].groupby("face_id").size()
            return int(ok.idxmax()) if len(ok) else ids[0]
    if isinstance(face, str) and face in ROLES:
        if ROLE_COL not in df.columns:
            raise TableError(
                f"face role {face!r} asked for, but this table has no roles; pick a face_id from {ids}"
            )
        hit = df.loc[df[ROLE_COL] == face, "face_id"].unique()
        if len(hit) == 0:
            raise TableError(f"no face has role {face!r}; faces: " + describe_faces(df))
        return int(hit[0])
    try:
        fid = int(face)
    except (TypeError, ValueError):
        raise TableError(f"face selector {face!r} is not adult, infant or a face_id") from None
    if fid not in ids:
        raise TableError(f"face_id {fid} is not in the table; faces: " + describe_faces(df))
    return fid


def describe_faces(df: pd.DataFrame) -> str:
    parts = []
    for fid in face_ids(df):
        sub = df[df["face_id"] == fid]
        role = ""
        if ROLE_COL in sub.columns and len(sub) and sub[ROLE_COL].iloc[0]:
            role = f" ({sub[ROLE_COL].iloc[0]})"
        parts.append(f"{fid}{role}: {int((sub['success'] > 0).sum())} frames")
    return "; ".join(parts)


def median_interval(t: np.ndarray) -> float:
    """Median of the positive time steps (s) of a time column; NaN with fewer
    than two distinct times. A frame table's sampling interval: robust to
    dropped frames and to the repeated times of several faces."""
    d = np.diff(np.asarray(t, float))
    d = d[d > 0]
    return float(np.median(d)) if len(d) else float("nan")
