"""The review page's data, from the services: one video's frame table, speech
and each reviewed face's smiles (the latest human review when there is one,
else the automatic smiles), and saving a reviewer's corrections through the
smiles service (Smiles.SaveReview: the reviewer is the caller's token, and
the service measures the corrected smiles again and stores a new version).

This is the dyadlab.review.server.Backend that `dyadlab review` serves.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from dyadlab import frames as ft
from dyadlab import storage, tables
from dyadlab.v1 import common_pb2, smiles_pb2, smiles_pb2_grpc

if TYPE_CHECKING:
    import pandas as pd

#: shown on the page per face; the analysis' thresholds
ROLE_LABEL = {"adult": "parent", "infant": "infant"}
MAX_TRACE_POINTS = 20_000


@dataclass
class Face:
    face_id: int
    label: str
    min_confidence: float
    threshold: float = 1.5
    version: int = 0  # the review version the page shows (0: automatic smiles)


@dataclass
class ServiceBackend:
    """One video under review. `stub` is a SmilesStub on a channel that
    carries the reviewer's credentials."""

    video_path: Path
    store: storage.ObjectStore
    stub: smiles_pb2_grpc.SmilesStub
    frames_ref: common_pb2.ObjectRef
    speech_ref: common_pb2.ObjectRef | None
    faces: list[Face]
    keep_speech: bool = False
    timeout_s: float = 600.0
    video_type: str = "video/mp4"
    _frames: pd.DataFrame | None = field(default=None, repr=False)

    # -- what the page shows -----------------------------------------------------------
    def frames(self) -> pd.DataFrame:
        if self._frames is None:
            self._frames, _ = tables.read_frames(self.store.get_bytes(self.frames_ref.key))
        return self._frames

    def speech(self) -> list[tuple[float, float]]:
        if self.speech_ref is None or not self.speech_ref.key:
            return []
        sp = tables.read_any(self.store.get_bytes(self.speech_ref.key), "speech table")
        return [(float(a), float(b)) for a, b in zip(sp["start_s"], sp["end_s"])]

    def smiles(self, face: Face) -> tuple[pd.DataFrame, dict | None]:
        """The face's smiles: its latest review, else the automatic ones."""
        sel = common_pb2.FaceSelector(face_id=face.face_id)
        try:
            rev = self.stub.GetReview(
                smiles_pb2.GetReviewRequest(frames=self.frames_ref, face=sel), timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            rev = None
        if rev is not None:
            face.version = rev.version
            table = _csv(self.store.get_bytes(rev.smiles.key))
            return table, {"version": rev.version, "reviewer": rev.reviewer, "saved_at": rev.saved_at}
        face.version = 0
        req = smiles_pb2.AnalyzeRequest(
            frames=self.frames_ref,
            face=sel,
            keep_speech=self.keep_speech,
            params=smiles_pb2.SmileParams(min_confidence=face.min_confidence),
        )
        if self.speech_ref is not None:
            req.speech.CopyFrom(self.speech_ref)
        result = None
        for ev in self.stub.Analyze(req, timeout=self.timeout_s):
            if ev.HasField("result"):
                result = ev.result
        if result is None:
            raise RuntimeError("the smiles service ended without a result")
        if not result.smiles.key:
            import pandas as pd

            return pd.DataFrame(columns=["smile_id", "start_s", "end_s"]), None
        return _csv(self.store.get_bytes(result.smiles.key)), None

    def session(self) -> dict:
        df = self.frames()
        t_all = df["timestamp"].to_numpy(float)
        duration = float(t_all.max() + ft.median_interval(t_all)) if len(t_all) else 0.0
        fps = 1.0 / ft.median_interval(t_all) if len(t_all) > 1 else 30.0
        out: dict[str, Any] = {
            "title": "review",
            "video": {"duration_s": duration, "fps": fps},
            "speech": [list(s) for s in self.speech()],
            "faces": [],
            "review": None,
        }
        for face in self.faces:
            table, review = self.smiles(face)
            one = df[df["face_id"] == face.face_id].sort_values("timestamp")
            step = max(1, math.ceil(len(one) / MAX_TRACE_POINTS))
            one = one.iloc[::step]
            ok = one["success"].to_numpy(float) > 0
            out["faces"].append(
                {
                    "face_id": face.face_id,
                    "label": face.label,
                    "threshold": face.threshold,
                    "min_confidence": face.min_confidence,
                    "review_version": face.version,
                    "trace": {
                        "t": _list(one["timestamp"]),
                        "au12": _list(one["AU12_r"], ok),
                        "au06": _list(one["AU06_r"], ok) if "AU06_r" in one else [],
                        "confidence": _list(one["confidence"]),
                    },
                    "smiles": [_smile(r) for r in table.to_dict("records")],
                }
            )
            if review and (out["review"] is None or review["version"] >= out["review"]["version"]):
                out["review"] = review
        return out

    # -- saving -----------------------------------------------------------------------
    def save_face(self, face: Face, smiles) -> smiles_pb2.ReviewResult:
        """One face's whole list of smiles after review (dicts with smile_id,
        start_s, end_s, status) -> Smiles.SaveReview, as the next version."""
        req = smiles_pb2.ReviewRequest(
            frames=self.frames_ref,
            face=common_pb2.FaceSelector(face_id=face.face_id),
            params=smiles_pb2.SmileParams(min_confidence=face.min_confidence),
            base_version=face.version,
        )
        if self.speech_ref is not None:
            req.speech.CopyFrom(self.speech_ref)
        for s in smiles:
            rs = req.smiles.add(
                start_s=float(s["start_s"]), end_s=float(s["end_s"]), status=str(s.get("status") or "auto")
            )
            sid = _smile_id(s.get("smile_id"))
            if sid is not None:
                rs.smile_id = sid
        res = self.stub.SaveReview(req, timeout=self.timeout_s)
        face.version = res.version
        return res

    def save(self, payload: dict) -> dict:
        """The page's corrections -> Smiles.SaveReview per face -> the new session.
        Raises ValueError (the page shows it) for a request the service refuses."""
        faces = {f.face_id: f for f in self.faces}
        for entry in payload.get("faces", []):
            face = faces.get(int(entry.get("face_id", -1)))
            if face is None:
                raise ValueError(f"face {entry.get('face_id')!r} is not under review")
            try:
                self.save_face(face, entry.get("smiles", []))
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED):
                    raise ValueError(e.details()) from None
                raise
        return self.session()


def _smile_id(v) -> int | None:
    """A smile id from the page or an ELAN file: an automatic smile's number, or None (new)."""
    text = str(v).strip() if v is not None else ""
    try:
        f = float(text)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _csv(data: bytes) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(io.BytesIO(data))


def _list(col, ok=None) -> list:
    vals = col.to_numpy(float)
    return [
        None if (ok is not None and not ok[i]) or not math.isfinite(v) else round(float(v), 4)
        for i, v in enumerate(vals)
    ]


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _smile(row: dict) -> dict:
    feats = {
        k: (_num(v) if not isinstance(v, (bool, str)) else v)
        for k, v in row.items()
        if k
        not in ("face_id", "smile_id", "start_s", "onset_end_s", "offset_start_s", "end_s", "review_status")
    }
    return {
        "smile_id": int(row["smile_id"]),
        "start_s": _num(row["start_s"]),
        "onset_end_s": _num(row.get("onset_end_s")),
        "offset_start_s": _num(row.get("offset_start_s")),
        "end_s": _num(row["end_s"]),
        "status": str(row.get("review_status") or "auto")
        if isinstance(row.get("review_status"), str)
        else "auto",
        "features": feats,
    }
