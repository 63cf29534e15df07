"""ELAN round trips: smiles out to an .eaf for human review, the coder's edits back in.

ELAN (https://archive.mpi.nl/tla/elan) is where research teams review codes.
`export_eaf` writes an .eaf (with pympi-ling's `pympi.Elan.Eaf`) that links the
video and holds, per face, a `smiles` tier (one annotation per smile, value =
its smile_id) and a `phases` tier (onset / apex / offset), a `speech` tier, and
the AU12 trace as a time series ELAN plots under the video. `read_eaf` reads a
smiles tier back and `edited_smiles` says what the coder changed (kept, moved,
added, removed): the input of the feature recomputation.

Times. ELAN stores integer milliseconds; every exported time is
`round(t * 1000)` of the smile table's seconds, so a boundary the coder did not
touch reads back equal to the millisecond and is "kept".

Tiers. One face (or no `face_id` column): `smiles-<face_label>` and
`phases-<face_label>` (`smiles` and `phases` when face_label is ""). Several
faces: `smiles-face<face_id>` and `phases-face<face_id>` per face (face_label
names one face's role, so it is not used then). `speech` is shared; it is only
written when speech segments are given (an empty tier means "checked, none").
Annotations on one ELAN tier may not overlap: overlapping smiles of one face
are an error, overlapping speech segments are merged.

Linked files (the .eaf's HEADER). The media: MEDIA_URL `file:///abs/path`,
RELATIVE_MEDIA_URL `./name.mp4` (or `../dir/name.mp4`) relative to the .eaf,
MIME_TYPE video/mp4 for .mp4. URLs are written the way ELAN writes them itself:
`file://` + the absolute path, not percent-encoded. The trace:
`<stem>_au12.csv` (MIME "unknown", ASSOCIATED_WITH the media URL, as ELAN
links a CSV) and `<stem>_tsconf.xml` (MIME "text/xml"), both
LINKED_FILE_DESCRIPTORs ("secondary linked files").

The time-series files, and what is NOT verified here. ELAN itself is not
installed where this was written: the format follows ELAN's sources
(mpi.eudico.client.annotator.timeseries: TimeSeriesConstants, csv.CSVReader)
and tsconf files ELAN wrote, but a person must confirm once that ELAN opens an
exported .eaf with the video, the tiers and the AU12 track in its time-series
viewer. What was chosen, and why:

* `<stem>_au12.csv`: comma separated, one row per trace sample, columns
  `time` (seconds, always written with a decimal point, e.g. `12.366667`, so
  that ELAN detects the "sec.msec" time format), `AU12`, then `AU06` and
  `confidence` when the trace has them; missing values are `NaN` (Java's
  Float.parseFloat reads it). The header row starts with `#`
  (`#time,AU12,AU06,confidence`): ELAN's CSV reader skips `#` lines and would
  otherwise read the header as a sample (a NaN sample that shifts a
  continuous-rate track by one sample).
* `<stem>_tsconf.xml` (the name ELAN expects: the .eaf's stem + `_tsconf.xml`)::

    <timeseries date="2025-01-01T12:00:00+00:00" version="1.0">
      <tracksource sample-type="Continuous Rate" source-url="file:///abs/x_au12.csv" time-column="0">
        <property key="provider" value="mpi.eudico.client.annotator.timeseries.csv.CSVServiceProvider"/>
        <track derivative="0" name="AU12">
          <property key="detect-range" value="false"/>
          <sample-position><pos col="1" row="0"/></sample-position>
          <description>AU12 (lip corner puller) intensity, face parent</description>
          <units>intensity</units>
          <range max="5.0" min="0.0"/>
          <color>220,40,40</color>
        </track>
        ... AU06 (col 2, 0-5), confidence (col 3, 0-1) when present
      </tracksource>
    </timeseries>

  sample-type is "Continuous Rate" when the trace is regularly sampled (every
  step within 1 ms of the median step, no missing time): ELAN then assumes a
  fixed rate estimated from the first 20 rows. A trace with gaps (dropped
  frames) gets "Discontinuous Rate", where ELAN reads (time, value) pairs and
  places every sample at its own time. ELAN resolves the tracksource by the
  absolute source-url: if the folder is moved, ELAN may ask for the CSV again.
"""

from __future__ import annotations

import math
import mimetypes
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
import pympi

SMILES, PHASES, SPEECH = "smiles", "phases", "speech"
SMILE_COLUMNS = ["start_s", "end_s", "smile_id"]
EDIT_COLUMNS = ["smile_id", "start_s", "end_s", "status"]
STATUSES = ("kept", "moved", "added", "removed")
NEW_ID = "new-{}"
CSV_PROVIDER = "mpi.eudico.client.annotator.timeseries.csv.CSVServiceProvider"
CONTINUOUS, DISCONTINUOUS = "Continuous Rate", "Discontinuous Rate"
#: ELAN's media MIME types by file extension (ELAN's MediaDescriptor constants)
MEDIA_MIME = {
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "mpg": "video/mpeg",
    "mpeg": "video/mpeg",
    "mov": "video/quicktime",
    "wav": "audio/x-wav",
}
#: trace column -> (CSV column, description, units, range, colour "r,g,b")
TRACKS = {
    "AU12_r": ("AU12", "AU12 (lip corner puller) intensity", "intensity", (0.0, 5.0), "220,40,40"),
    "AU06_r": ("AU06", "AU06 (cheek raiser) intensity", "intensity", (0.0, 5.0), "40,90,220"),
    "confidence": ("confidence", "face tracking confidence", "confidence", (0.0, 1.0), "120,120,120"),
}


# -- export ----------------------------------------------------------------------------------
def export_eaf(
    path: Path | str,
    *,
    media: Path | str,
    smiles: pd.DataFrame,
    speech: Sequence[tuple[float, float]] | pd.DataFrame | None,
    trace: pd.DataFrame | None,
    face_label: str = "parent",
) -> list[Path]:
    """Write `path` (.eaf) linking `media`, with the smile, phase and speech
    tiers, and (when `trace` is given) `<stem>_au12.csv` and
    `<stem>_tsconf.xml` next to it, linked as secondary files. Returns the
    written paths (.eaf first). Raises ValueError for an unusable smile,
    speech or trace table (module doc)."""
    eaf_path = Path(path)
    folder = eaf_path.parent
    media_url, media_rel = _urls(Path(media), folder)

    eaf = pympi.Elan.Eaf(author="dyadlab")
    eaf.remove_tier("default")  # pympi's new document has one; ELAN does not need it
    eaf.add_linked_file(media_url, relpath=media_rel, mimetype=media_mime(Path(media)))

    for suffix, face in _faces(smiles, face_label):
        smiles_tier, phases_tier = _tier(SMILES, suffix), _tier(PHASES, suffix)
        eaf.add_tier(smiles_tier)
        for sid, a, b in _smile_intervals(face, smiles_tier):
            eaf.add_annotation(smiles_tier, a, b, sid)
        if {"onset_end_s", "offset_start_s"} <= set(face.columns):
            eaf.add_tier(phases_tier)
            for a, b, phase in _phase_intervals(face):
                eaf.add_annotation(phases_tier, a, b, phase)

    if speech is not None:
        eaf.add_tier(SPEECH)
        for a, b in _speech_intervals(speech):
            eaf.add_annotation(SPEECH, a, b, "speech")

    written = [eaf_path]
    if trace is not None:
        csv_path = folder / f"{eaf_path.stem}_au12.csv"
        conf_path = folder / f"{eaf_path.stem}_tsconf.xml"
        table, sample_type = _trace_table(trace)
        _write_text(csv_path, _trace_csv(table))
        csv_url, csv_rel = _urls(csv_path, folder)
        _write_text(conf_path, tsconf_xml(csv_url, table, sample_type, face_label))
        conf_url, conf_rel = _urls(conf_path, folder)
        eaf.add_secondary_linked_file(csv_url, relpath=csv_rel, mimetype="unknown", assoc_with=media_url)
        eaf.add_secondary_linked_file(conf_url, relpath=conf_rel, mimetype="text/xml")
        written += [csv_path, conf_path]

    # ELAN numbers the annotations it creates from this property; pympi leaves it at 0
    eaf.properties = [(k, v) for k, v in eaf.properties if k != "lastUsedAnnotation"]
    eaf.properties.append(("lastUsedAnnotation", eaf.maxaid))
    _write_text(eaf_path, pympi.Elan.to_string(eaf, pretty=True), declaration=True)
    return written


def media_mime(media: Path) -> str:
    """The MIME type ELAN expects in a MEDIA_DESCRIPTOR for `media`."""
    ext = media.suffix.lower().lstrip(".")
    if ext in MEDIA_MIME:
        return MEDIA_MIME[ext]
    guess = mimetypes.guess_type(media.name)[0] or ""
    if guess.startswith(("video/", "audio/")):
        return guess.split("/")[0] + "/*"  # ELAN's generic video / audio types
    return "unknown"


def tsconf_xml(csv_url: str, table: pd.DataFrame, sample_type: str, face_label: str = "") -> str:
    """ELAN's time-series configuration for the trace CSV written from `table`
    (columns: time, then the track columns in TRACKS order): module doc."""
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    root = ET.Element("timeseries", {"date": date, "version": "1.0"})
    src = ET.SubElement(
        root, "tracksource", {"sample-type": sample_type, "source-url": csv_url, "time-column": "0"}
    )
    ET.SubElement(src, "property", {"key": "provider", "value": CSV_PROVIDER})
    by_csv = {v[0]: v for v in TRACKS.values()}
    for col, name in enumerate(table.columns):
        if name == "time":
            continue
        _, desc, units, (lo, hi), colour = by_csv[name]
        track = ET.SubElement(src, "track", {"derivative": "0", "name": name})
        ET.SubElement(track, "property", {"key": "detect-range", "value": "false"})
        ET.SubElement(ET.SubElement(track, "sample-position"), "pos", {"col": str(col), "row": "0"})
        ET.SubElement(track, "description").text = desc + (f", face {face_label}" if face_label else "")
        ET.SubElement(track, "units").text = units
        ET.SubElement(track, "range", {"max": repr(hi), "min": repr(lo)})
        ET.SubElement(track, "color").text = colour
    ET.indent(root, space="    ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _tier(kind: str, suffix: str) -> str:
    return f"{kind}-{suffix}" if suffix else kind


def _faces(smiles: pd.DataFrame, face_label: str) -> list[tuple[str, pd.DataFrame]]:
    """(tier suffix, that face's smiles) for each face of the smile table."""
    missing = [c for c in ("smile_id", "start_s", "end_s") if c not in smiles.columns]
    if missing:
        raise ValueError("smile table is missing columns: " + ", ".join(missing))
    if "face_id" in smiles.columns and smiles["face_id"].nunique(dropna=False) > 1:
        return [
            (f"face{_id_str(fid)}", face) for fid, face in smiles.groupby("face_id", sort=True, dropna=False)
        ]
    return [(face_label, smiles)]


def _ms(t: float, what: str) -> int:
    if not math.isfinite(t):
        raise ValueError(f"{what} is not a finite time: {t!r}")
    return round(t * 1000)


def _smile_intervals(face: pd.DataFrame, tier: str) -> list[tuple[str, int, int]]:
    rows = []
    for sid, start, end in zip(face["smile_id"], face["start_s"], face["end_s"]):
        name = _id_str(sid)
        a, b = _ms(float(start), f"smile {name} start_s"), _ms(float(end), f"smile {name} end_s")
        if b <= a:
            raise ValueError(f"smile {name}: end_s must be after start_s (to the millisecond)")
        rows.append((name, a, b))
    rows.sort(key=lambda r: (r[1], r[2]))
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"tier {tier}: smile_id values repeat: {', '.join(dup)}")
    for prev, cur in zip(rows, rows[1:]):
        if cur[1] < prev[2]:
            raise ValueError(f"tier {tier}: smiles {prev[0]} and {cur[0]} overlap; ELAN tiers cannot")
    return rows


def _phase_intervals(face: pd.DataFrame) -> list[tuple[int, int, str]]:
    """onset [start, onset_end], apex [onset_end, offset_start or end], offset
    [offset_start, end]; a phase with a missing (NaN) boundary or no length in
    whole milliseconds is left out (an incomplete smile has no offset_start)."""
    out = []
    for s in face.itertuples(index=False):
        t = [float(s.start_s), float(s.onset_end_s), float(s.offset_start_s), float(s.end_s)]
        ms = [round(x * 1000) if math.isfinite(x) else None for x in t]
        apex_end = ms[2] if ms[2] is not None else ms[3]
        for a, b, phase in ((ms[0], ms[1], "onset"), (ms[1], apex_end, "apex"), (ms[2], ms[3], "offset")):
            if a is not None and b is not None and b > a:
                out.append((a, b, phase))
    return sorted(out)


def _speech_intervals(speech: Sequence[tuple[float, float]] | pd.DataFrame) -> list[tuple[int, int]]:
    if isinstance(speech, pd.DataFrame):
        missing = [c for c in ("start_s", "end_s") if c not in speech.columns]
        if missing:
            raise ValueError("speech table is missing columns: " + ", ".join(missing))
        pairs: Iterable[tuple[float, float]] = zip(speech["start_s"], speech["end_s"])
    else:
        pairs = speech
    segs = []
    for i, (start, end) in enumerate(pairs):
        a, b = (
            _ms(float(start), f"speech segment {i + 1} start"),
            _ms(float(end), f"speech segment {i + 1} end"),
        )
        if b < a:
            raise ValueError(f"speech segment {i + 1}: end before start")
        if b > a:  # a segment shorter than 1 ms cannot be an ELAN annotation
            segs.append((a, b))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(segs):
        if merged and a < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _trace_table(trace: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The CSV's columns (time, AU12[, AU06][, confidence]) in time order, and the sample type."""
    missing = [c for c in ("timestamp", "AU12_r") if c not in trace.columns]
    if missing:
        raise ValueError("trace is missing columns: " + ", ".join(missing))
    if "face_id" in trace.columns and trace["face_id"].nunique() > 1:
        raise ValueError("trace has several faces (face_id); pass the rows of the face under review")
    table = pd.DataFrame({"time": pd.to_numeric(trace["timestamp"], errors="coerce").to_numpy(float)})
    for src, (name, *_) in TRACKS.items():
        if src in trace.columns:
            table[name] = pd.to_numeric(trace[src], errors="coerce").to_numpy(float)
    regular = table["time"].notna().all()
    table = table[np.isfinite(table["time"])].sort_values("time", kind="stable").reset_index(drop=True)
    if table.empty:
        raise ValueError("trace has no rows with a timestamp")
    steps = np.diff(table["time"].to_numpy())
    if len(steps):
        regular = regular and bool(np.all(np.abs(steps - np.median(steps)) <= 0.001) and np.median(steps) > 0)
    return table, CONTINUOUS if regular else DISCONTINUOUS


def _trace_csv(table: pd.DataFrame) -> str:
    lines = ["#" + ",".join(table.columns)]
    values = [table[c].to_numpy(float) for c in table.columns[1:]]
    for i, t in enumerate(table["time"].to_numpy(float)):
        cells = [f"{t:.6f}"] + [repr(float(v[i])) if math.isfinite(v[i]) else "NaN" for v in values]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _urls(target: Path, folder: Path) -> tuple[str, str | None]:
    """(absolute file URL, URL relative to `folder` or None) the way ELAN writes them."""
    absolute = target.resolve()
    url = "file://" + _slash(absolute.as_posix())
    try:
        rel = PurePath(os.path.relpath(absolute, folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        return url, None
    return url, rel if rel.startswith("../") else "./" + rel


def _slash(p: str) -> str:
    return p if p.startswith("/") else "/" + p  # C:/x -> /C:/x (file:///C:/x)


def _write_text(path: Path, text: str, declaration: bool = False) -> None:
    """Write via a temporary file renamed into place (no .bak file as pympi's
    to_file leaves; a reader never sees half a file)."""
    if declaration:
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("x", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- import ----------------------------------------------------------------------------------
def read_eaf(path: Path | str, tier: str | None = None) -> pd.DataFrame:
    """The annotations of one tier as a smile table (start_s, end_s, smile_id),
    sorted by start. The value is the smile_id (a string); an empty value
    gets a new id "new-1", "new-2", ... in time order. `tier=None` takes the
    only tier named `smiles*`. Raises ValueError for a file that is not an
    .eaf, a missing or ambiguous tier, or a tier ELAN did not time-align."""
    eaf = _open(Path(path))
    names = list(eaf.get_tier_names())
    listed = ", ".join(repr(n) for n in names) or "none"
    if tier is None:
        candidates = [n for n in names if n.startswith(SMILES)]
        if len(candidates) != 1:
            which = "no tier" if not candidates else f"{len(candidates)} tiers"
            raise ValueError(f"{path}: {which} named like 'smiles*'; choose one with tier= (tiers: {listed})")
        tier = candidates[0]
    elif tier not in names:
        raise ValueError(f"{path}: no tier {tier!r} (tiers: {listed})")
    if eaf.tiers[tier][1]:
        raise ValueError(f"{path}: tier {tier!r} holds reference annotations, not time-aligned ones")
    rows = []
    for start, end, value in eaf.get_annotation_data_for_tier(tier):
        if start is None or end is None:
            raise ValueError(f"{path}: tier {tier!r} has an annotation without aligned times ({value!r})")
        rows.append((start, end, (value or "").strip()))
    rows.sort(key=lambda r: (r[0], r[1]))
    used = {v for _, _, v in rows if v}
    k, out = 0, []
    for start, end, value in rows:
        if not value:
            k += 1
            while NEW_ID.format(k) in used:
                k += 1
            value = NEW_ID.format(k)
        out.append((start / 1000, end / 1000, value))
    df = pd.DataFrame(out, columns=SMILE_COLUMNS)
    df["smile_id"] = df["smile_id"].astype(object)
    return df


def _open(path: Path):
    """pympi's Eaf for `path`; ValueError (not pympi's bare Exception or KeyError) when it is no .eaf."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with path.open("rb") as f:
            root = next(ET.iterparse(f, events=("start",)))[1]
    except (ET.ParseError, StopIteration) as e:
        raise ValueError(f"{path} is not an ELAN .eaf file (not XML: {e})") from None
    if root.tag != "ANNOTATION_DOCUMENT":
        raise ValueError(f"{path} is not an ELAN .eaf file (root element <{root.tag}>)")
    try:
        return pympi.Elan.Eaf(str(path))
    except Exception as e:  # noqa: BLE001 — pympi raises bare Exception, KeyError, IndexError ...
        raise ValueError(f"{path} is not a readable ELAN .eaf file ({type(e).__name__}: {e})") from None


# -- what the coder changed ------------------------------------------------------------------
def edited_smiles(original: pd.DataFrame, eaf_table: pd.DataFrame) -> pd.DataFrame:
    """Compare one face's smile table with the table `read_eaf` read back:
    one row per smile (smile_id as a string, start_s, end_s, status), status
    "kept" (both boundaries equal to the millisecond; the original times are
    returned), "moved" (same id, a boundary changed; the EAF's times),
    "added" (an id not in the original; the EAF's times) or "removed" (an
    original id missing from the EAF; the original times). Sorted by start.
    Raises ValueError when ids repeat in either table."""
    for what, df in (("original", original), ("eaf_table", eaf_table)):
        missing = [c for c in ("smile_id", "start_s", "end_s") if c not in df.columns]
        if missing:
            raise ValueError(f"{what} is missing columns: " + ", ".join(missing))
    orig = _by_id(original, "original (pass one face's smiles)")
    new = _by_id(eaf_table, "the EAF tier")
    rows = []
    for sid, (a, b) in new.items():
        if sid not in orig:
            rows.append((sid, a, b, "added"))
            continue
        oa, ob = orig[sid]
        same = round(oa * 1000) == round(a * 1000) and round(ob * 1000) == round(b * 1000)
        rows.append((sid, oa, ob, "kept") if same else (sid, a, b, "moved"))
    rows += [(sid, a, b, "removed") for sid, (a, b) in orig.items() if sid not in new]
    out = pd.DataFrame(rows, columns=EDIT_COLUMNS)
    out["smile_id"] = out["smile_id"].astype(object)
    return out.sort_values(["start_s", "end_s", "smile_id"], kind="stable").reset_index(drop=True)


def _by_id(df: pd.DataFrame, what: str) -> dict[str, tuple[float, float]]:
    ids = [_id_str(v) for v in df["smile_id"]]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"smile_id repeats in {what}: {', '.join(dup)}")
    return {i: (float(a), float(b)) for i, a, b in zip(ids, df["start_s"], df["end_s"])}


def _id_str(v: object) -> str:
    """A smile_id as the annotation value: 3, 3.0 and "3" are all "3"."""
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v).strip()
