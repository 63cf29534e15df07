"""Human review of one face's smiles: a reviewer's corrections become a
reviewed smile table, kept as a new versioned record next to the automatic
result (which is never overwritten).

A correction is a smile the reviewer keeps, moves, accepts or adds, as its
window [start_s, end_s]; a smile the reviewer deleted is simply absent. Every
reviewed smile is measured again by the code that measures automatic smiles
(segment.smile_in_window, then features.smile_table): inside the reviewer's
window the onset end and the offset start are re-found from the radius r
(module docs of segment and features). The reviewer's boundaries are kept as
the smile's ``start_s`` and ``end_s`` (to the millisecond), so a table read
back from an ELAN file has exactly the coder's times; the phases and the
features come from the frames inside them. A smile the reviewer saw where
the face could not be measured (fewer than three high-confidence frames
inside it) stays in the table as an event, ``measured`` False, with no
features: it counts as a smile, it has no numbers.

Store layout (one prefix per frame table and face)::

    reviews/<frames sha256[:32]>/face<face_id>/v0001/record.json   who, when, from which version, the corrections
    reviews/<frames sha256[:32]>/face<face_id>/v0001/smiles.csv    the reviewed smile table

``smile_id`` keeps the automatic smile's number for a kept or moved smile; a
smile the reviewer added gets a number no automatic smile or earlier review
of the face used (a deleted smile's number is never given to another). Two columns say what the
review did: ``review_status`` (auto, accepted, edited, added) and
``review_version``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Sequence

import pandas as pd

from dyadlab import storage, tables

from .features import overlaps_speech, smile_table
from .segment import SmileParams, smile_in_window

#: what a reviewer may say of a smile
STATUSES = ("auto", "accepted", "edited", "added")
#: the record's format
RECORD_FORMAT = 1


class ReviewError(ValueError):
    """Corrections that cannot be applied (the reviewer's request is wrong)."""


class Conflict(RuntimeError):
    """Someone saved a newer review since the reviewer's base version."""


@dataclasses.dataclass(frozen=True)
class Correction:
    smile_id: int | None  # the automatic smile's id; None for a smile the reviewer added
    start_s: float
    end_s: float
    status: str = "accepted"

    def check(self, i: int) -> None:
        if self.status not in STATUSES:
            raise ReviewError(f"smile {i}: status {self.status!r} is not one of {', '.join(STATUSES)}")
        if not (0 <= self.start_s < self.end_s) or not pd.notna(self.end_s):
            raise ReviewError(
                f"smile {i}: start_s {self.start_s} and end_s {self.end_s} do not make a window"
            )


def reviewed_table(
    face_df: pd.DataFrame,
    corrections: Sequence[Correction],
    speech_segments: Iterable[tuple[float, float]] = (),
    face_id: int = 0,
    params: SmileParams | None = None,
    version: int = 0,
    first_new_id: int = 1,
) -> pd.DataFrame:
    """The reviewed smile table of one face (module doc). A smile the reviewer
    added gets the next id from `first_new_id` (past every id the face's
    automatic smiles and earlier reviews used: an id is never reused)."""
    params = params or SmileParams()
    speech = list(speech_segments)
    for i, c in enumerate(corrections):
        c.check(i)
    ids = [c.smile_id for c in corrections if c.smile_id is not None]
    if len(ids) != len(set(ids)):
        raise ReviewError("a smile_id appears twice in the corrections")
    next_id = max(max(ids, default=0) + 1, first_new_id)
    smiles, meta, unmeasured = [], [], []
    for c in sorted(corrections, key=lambda c: c.start_s):
        sid = c.smile_id
        if sid is None:
            sid, next_id = next_id, next_id + 1
        try:
            smiles.append(smile_in_window(face_df, c.start_s, c.end_s, params))
            meta.append((sid, c))
        except ValueError as e:  # the reviewer saw a smile the tracker could not measure
            unmeasured.append((sid, c, str(e)))
    table = smile_table(face_df, smiles, speech, face_id)
    # smile_table numbers 1..n in time order and measures the frames' window;
    # the review keeps the smiles' own ids and the reviewer's boundaries
    table["smile_id"] = [sid for sid, _ in meta]
    table["start_s"] = [c.start_s for _, c in meta]
    table["end_s"] = [c.end_s for _, c in meta]
    table["measured"] = True
    table["review_status"] = [c.status for _, c in meta]
    if unmeasured:
        # kept as events (they count in agreement and in the smile count), with
        # no features: the frames inside could not be measured
        rows = pd.DataFrame(
            {
                "face_id": face_id,
                "smile_id": [sid for sid, _, _ in unmeasured],
                "start_s": [c.start_s for _, c, _ in unmeasured],
                "end_s": [c.end_s for _, c, _ in unmeasured],
                "overlaps_speech": [overlaps_speech(c.start_s, c.end_s, speech) for _, c, _ in unmeasured],
                "complete": False,
                "start_cut": False,
                "n_frames": 0,
                "measured": False,
                "review_status": [c.status for _, c, _ in unmeasured],
            }
        )
        table = pd.concat([table, rows], ignore_index=True).sort_values("start_s", kind="stable")
        table = table.reset_index(drop=True)
    table["total_duration_s"] = table["end_s"] - table["start_s"]
    table["review_version"] = version
    return table


def unmeasured_notes(table: pd.DataFrame) -> list[str]:
    """A line per reviewed smile without features."""
    return [
        f"smile {r.smile_id} ({r.start_s:.2f}-{r.end_s:.2f} s): kept as the reviewer's event, "
        "not measured (too few frames with a measurable face inside it)"
        for r in table[~table["measured"].astype(bool)].itertuples()
    ]


# -- records in the store ----------------------------------------------------------------
def prefix(frames_sha256: str, face_id: int) -> str:
    return f"reviews/{frames_sha256[:32]}/face{face_id}"


def versions(store: storage.ObjectStore, pfx: str) -> list[int]:
    out = []
    for key in store.list(pfx + "/v"):
        part = key[len(pfx) + 2 :].split("/", 1)[0]
        if part.isdigit() and key.endswith("/record.json"):
            out.append(int(part))
    return sorted(out)


def _keys(pfx: str, version: int) -> tuple[str, str]:
    return f"{pfx}/v{version:04d}/record.json", f"{pfx}/v{version:04d}/smiles.csv"


def save(
    store: storage.ObjectStore,
    pfx: str,
    table: pd.DataFrame,
    *,
    base_version: int,
    reviewer: str,
    corrections: Sequence[Correction],
    source: dict,
    max_smile_id: int,
) -> dict:
    """Write the next version (refused with Conflict when it is not
    base_version + 1: someone saved in between). Returns the record, which
    keeps `max_smile_id`: the highest smile id the face has ever used
    (next_smile_id reads it instead of every earlier table)."""
    have = versions(store, pfx)
    latest = have[-1] if have else 0
    if base_version != latest:
        raise Conflict(
            f"review version {latest} was saved since this reviewer's version {base_version}; "
            "reload to see it, then apply the corrections again"
        )
    version = latest + 1
    table = table.assign(review_version=version)
    rec_key, csv_key = _keys(pfx, version)
    record = {
        "format": RECORD_FORMAT,
        "version": version,
        "base_version": base_version,
        "reviewer": reviewer,
        "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "smiles": csv_key,
        "source": source,
        "counts": table["review_status"].value_counts().to_dict(),
        "max_smile_id": int(max(max_smile_id, table["smile_id"].max() if len(table) else 0)),
        "corrections": [dataclasses.asdict(c) for c in corrections],
    }
    store.put_bytes(csv_key, tables.to_bytes(table, "csv"), content_type="text/csv")
    store.put_bytes(rec_key, json.dumps(record, indent=1).encode(), content_type="application/json")
    return record


def next_smile_id(store: storage.ObjectStore, pfx: str, automatic_ids: Iterable[int]) -> int:
    """The id a smile added in the next review gets: past the automatic
    smiles' ids and every id an earlier review used (the latest record says)."""
    have = versions(store, pfx)
    used = json.loads(store.get_bytes(_keys(pfx, have[-1])[0]))["max_smile_id"] if have else 0
    return int(max([used, *automatic_ids])) + 1


def load(store: storage.ObjectStore, pfx: str, version: int = 0) -> tuple[dict, pd.DataFrame] | None:
    """A review record and its table (version 0: the latest); None when there is none."""
    have = versions(store, pfx)
    if not have:
        return None
    v = version or have[-1]
    if v not in have:
        raise ReviewError(f"no review version {v} (there are {have[0]}..{have[-1]})")
    rec_key, csv_key = _keys(pfx, v)
    record = json.loads(store.get_bytes(rec_key))
    return record, tables.read_any(store.get_bytes(csv_key), "review table")
