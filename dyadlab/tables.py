"""Tables as bytes: the one place that tells Parquet from CSV.

Frame tables (dyadlab's own Parquet, or an OpenFace 2.x / dyadlab CSV),
smile, speech, score and dyad tables all arrive as bytes from the store or a
file; they are read and written here. Machine-readable output keeps full
precision: CSV floats are written so that they read back to the same value
(pandas' shortest round-trip repr; read with float_precision="round_trip").
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from dyadlab.frames import TableError, validate

if TYPE_CHECKING:  # imported where used: the CLI's start-up need not pay ~0.4 s for pandas
    import pandas as pd

PARQUET_MAGIC = b"PAR1"

#: A smile table's columns, in order: one row per smile with the features of
#: "Behind the Smile" (Tables III/IV; services/smiles/features.py computes
#: them and documents each). dyadlab's further columns follow these.
SMILE_COLUMNS = (
    "face_id",
    "smile_id",
    "start_s",
    "onset_end_s",
    "offset_start_s",
    "end_s",
    "onset_amplitude",
    "offset_amplitude",
    "onset_duration_s",
    "apex_duration_s",
    "offset_duration_s",
    "total_duration_s",
    "max_onset_speed",
    "max_offset_speed",
    "overlaps_speech",
)


def is_parquet(data: bytes) -> bool:
    return data[:4] == PARQUET_MAGIC


def read_any(data: bytes, what: str = "table") -> pd.DataFrame:
    """A CSV or Parquet table from bytes. Raises TableError."""
    import pandas as pd

    try:
        if is_parquet(data):
            return pd.read_parquet(io.BytesIO(data))
        return pd.read_csv(io.BytesIO(data), skipinitialspace=True)
    except Exception as e:  # noqa: BLE001 — pandas/pyarrow raise many kinds
        raise TableError(f"{what} is not a readable CSV or Parquet table ({type(e).__name__})") from None


def read_frames(data: bytes) -> tuple[pd.DataFrame, list[str]]:
    """A frame table from Parquet (dyadlab's own) or CSV (OpenFace 2.x or a
    dyadlab export) bytes; returns (table, notes). Raises TableError."""
    if is_parquet(data):
        df = read_any(data, "the data")
        validate(df)
        return df, []
    from dyadlab.openface import read_openface_csv

    return read_openface_csv(data)


def to_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """Serialise a frame (or smile) table as 'parquet' or 'csv' (full precision)."""
    if fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    if fmt == "csv":
        return df.to_csv(index=False).encode()
    raise ValueError(f"unknown table format {fmt!r}")
