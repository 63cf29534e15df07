"""The cohort runner: a manifest of sessions -> per-session smiles -> the cohort report.

    dyadlab cohort run MANIFEST.csv --scores scores.csv --out report/

1. The manifest is validated up front; every problem (unknown columns,
   missing files, duplicate sessions, unreadable videos) is reported at once
   with its row, before any work starts.
2. Every session's video is put into the object store under its content
   hash. A session's result is a record in the store whose key derives from
   the video's hash and the options: that record is what makes a session
   "finished". A rerun of the same command (after Ctrl-C, a killed process,
   a reboot) finds the records and only runs the rest.
3. Sessions run through the services (extractor, then smiles), several at a
   time. A failing session is listed in failures.csv; the others go on.
4. The smiles of every finished session go to the stats service, whose
   tables, figures and report.html land in the output directory together
   with sessions.csv (one row per session).

Dyad sessions (manifest column `dyad` = yes, or an `infant_video` filmed
separately with its `offset_s`) also get the parent-infant measures
(contingency, lagged synchrony, shared smiling); their per-dyad table
(dyads.csv) goes to the stats report beside the smiles.

As a Kubernetes indexed Job, each pod runs `dyadlab cohort run --shard I/N
--no-report` on its slice (session i belongs to shard i mod N, in the
manifest's sorted order), the records meet in the object store, and a final
`dyadlab cohort report` builds the report from them.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from dyadlab import storage, video
from dyadlab.frames import TableError
from dyadlab.messages import ROLE_NAME, face_selector, object_ref
from dyadlab.study import KEYS, VISITS
from dyadlab.v1 import (
    common_pb2,
    extractor_pb2,
    extractor_pb2_grpc,
    smiles_pb2,
    smiles_pb2_grpc,
    stats_pb2,
    stats_pb2_grpc,
)

REQUIRED = ["participant_id", "visit_month", "video"]
OPTIONAL = ["face", "openface_csv", "dyad", "infant_video", "offset_s"]
TRUE = {"1", "true", "yes", "y"}
RECORD_VERSION = "3"  # 3: the mesh front-end; records name their front-end and AU12 calibration


@dataclasses.dataclass
class Session:
    row: int  # 1-based data row of the manifest
    participant_id: str
    visit_month: int
    video: Path | None  # local file, or None when `key` names an object
    key: str = ""  # object-store key of the video (or of the OpenFace CSV)
    face: str = ""
    openface_csv: Path | None = None
    openface: bool = False  # the input is an OpenFace CSV, not a video
    dyad: bool = False  # also measure parent-infant contingency and synchrony
    infant_video: Path | None = None
    infant_key: str = ""  # the infant's own video, when filmed separately
    offset_s: float = 0.0
    sha256: str = ""
    infant_sha256: str = ""
    duration_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.participant_id}/{self.visit_month}"


class ManifestError(TableError):
    """Every problem of a manifest, one per line."""


def _resolve(value: str, base: Path, store: storage.ObjectStore) -> tuple[Path | None, str]:
    """A manifest cell as a local file (relative to the manifest) or an object key."""
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_file():
        return p, ""
    try:
        if store.exists(value):
            return None, value
    except storage.InvalidKey:
        pass
    return None, ""


def read_manifest(path: Path, store: storage.ObjectStore) -> list[Session]:
    """Parse and check a manifest; raise ManifestError listing every problem."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read the manifest: {e}") from None
    df.columns = [c.strip() for c in df.columns]
    problems = []
    missing = [c for c in REQUIRED if c not in df.columns]
    unknown = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown columns: {', '.join(unknown)} (known: {', '.join(REQUIRED + OPTIONAL)})")
    if missing:
        raise ManifestError("\n".join(problems))
    seen: dict[tuple[str, int], int]  # (participant, visit) -> its row
    sessions, seen = [], {}
    base = path.parent
    for i, r in enumerate(df.to_dict("records"), start=1):
        where = f"row {i}"
        pid = r["participant_id"].strip()
        if not pid:
            problems.append(f"{where}: participant_id is empty")
        try:
            visit = int(r["visit_month"])
            if visit not in VISITS:
                raise ValueError
        except ValueError:
            problems.append(
                f"{where}: visit_month {r['visit_month']!r} is not one of {', '.join(map(str, VISITS))}"
            )
            visit = -1
        if pid and visit > 0:
            if (pid, visit) in seen:
                problems.append(f"{where}: participant {pid!r} visit {visit} repeats row {seen[pid, visit]}")
            else:
                seen[pid, visit] = i
        face = r.get("face", "").strip()
        try:
            face_selector(face)
        except ValueError as e:
            problems.append(f"{where}: face {e}")
        s = Session(i, pid, visit, None, face=face)
        of = r.get("openface_csv", "").strip()
        if of:
            local, key = _resolve(of, base, store)
            if local is None and not key:
                problems.append(f"{where}: openface_csv {of!r}: no such file or object")
            s.openface_csv, s.key, s.openface = local, key, True
        v = r["video"].strip()
        if not v and not of:
            problems.append(f"{where}: video is empty (and no openface_csv)")
        elif v and not of:
            local, key = _resolve(v, base, store)
            if local is None and not key:
                problems.append(f"{where}: video {v!r}: no such file or object")
            elif local is not None:
                try:
                    s.duration_s = _readable(local)
                except video.VideoError as e:
                    problems.append(f"{where}: video {v!r} is unreadable: {e}")
            s.video, s.key = local, key
        iv = r.get("infant_video", "").strip()
        s.dyad = r.get("dyad", "").strip().lower() in TRUE or bool(iv)
        if iv:
            local, key = _resolve(iv, base, store)
            if local is None and not key:
                problems.append(f"{where}: infant_video {iv!r}: no such file or object")
            elif local is not None:
                try:
                    _readable(local)
                except video.VideoError as e:
                    problems.append(f"{where}: infant_video {iv!r} is unreadable: {e}")
            s.infant_video, s.infant_key = local, key
        off = r.get("offset_s", "").strip()
        if off:
            try:
                s.offset_s = float(off)
            except ValueError:
                problems.append(f"{where}: offset_s {off!r} is not a number of seconds")
        if s.dyad and s.openface:
            problems.append(f"{where}: dyad sessions need the video, not an OpenFace CSV")
        sessions.append(s)
    if problems:
        raise ManifestError("\n".join(problems))
    return sorted(sessions, key=lambda s: (s.participant_id, s.visit_month))


def _readable(path: Path) -> float:
    """Cheap up-front check (container and video stream open); the duration."""
    import av

    if path.stat().st_size == 0:
        raise video.VideoError("the file is empty (0 bytes)")
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if not c.streams.video:
                raise video.VideoError("no video stream")
            return float(c.duration or 0) / 1e6
    except av.error.FFmpegError:
        raise video.VideoError("not a video this program can read") from None


def shard(sessions: list[Session], index: int, count: int) -> list[Session]:
    """The slice of a sorted manifest that shard `index` of `count` runs."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    return [s for i, s in enumerate(sessions) if i % count == index]


# -- records ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
    keep_speech: bool = False  # drop smiles overlapping speech from the analysis (the paper)
    max_faces: int = 0
    frontend: str = ""  # the extractor's face front-end ("" = its default)

    def tag(self) -> str:
        return hashlib.sha256(json.dumps([RECORD_VERSION, dataclasses.asdict(self)]).encode()).hexdigest()[
            :12
        ]


def record_key(s: Session, opts: Options) -> str:
    """Where a finished session's record lives: derived from its content, so any
    run (any shard, any machine) that does the same work finds the same key."""
    ident = hashlib.sha256(
        f"{s.participant_id}|{s.visit_month}|{s.sha256}|{s.face}|{s.dyad}|"
        f"{s.infant_sha256}|{s.offset_s}".encode()
    ).hexdigest()
    return f"cohort/sessions/{ident[:32]}-{opts.tag()}.json"


def _stored(local: Path | None, key: str, store: storage.ObjectStore) -> tuple[str, str]:
    """(key, sha256) of an input: a local file is put under its content hash."""
    if local is not None:
        ref = storage.put_content(store, local)
        return ref.key, ref.sha256
    h = hashlib.sha256()
    with store.open(key) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return key, h.hexdigest()


def prepare(
    sessions: list[Session], store: storage.ObjectStore, say: Callable[[str], None] = lambda m: None
) -> None:
    """Hash every input and put local files into the store (content-addressed)."""
    for s in sessions:
        s.key, s.sha256 = _stored(s.openface_csv or s.video, s.key, store)
        if s.infant_video is not None or s.infant_key:
            s.infant_key, s.infant_sha256 = _stored(s.infant_video, s.infant_key, store)


# -- running sessions ------------------------------------------------------------------------
def run_session(
    s: Session,
    opts: Options,
    channels: dict[str, grpc.Channel],
    timeout_s: float,
    status: Callable[[str], None],
) -> dict:
    """Extract (cached by content) and segment one session; its record."""
    t0 = time.perf_counter()
    ref = common_pb2.ObjectRef(key=s.key, sha256=s.sha256)
    rec: dict[str, Any]
    rec = {
        "participant_id": s.participant_id,
        "visit_month": s.visit_month,
        "input_sha256": s.sha256,
        "face": s.face,
        "frames": 0,
        "duration_s": s.duration_s,
        "faces": 0,
        "face_id": -1,
        "role": "",
        "mean_confidence": None,
        "notes": [],
        "frontend": "",
        "au_calibration": "",
    }
    req = smiles_pb2.AnalyzeRequest(face=face_selector(s.face), keep_speech=True, plot=True)
    if s.openface:
        status("import")
        imp = extractor_pb2_grpc.ExtractorStub(channels["extractor"]).ImportOpenFace(
            extractor_pb2.ImportOpenFaceRequest(csv=ref), timeout=timeout_s
        )
        req.frames.CopyFrom(imp.frames)
        faces, rec["notes"] = imp.faces, list(imp.notes)
        rec["frames"] = int(imp.rows / max(1, len(imp.faces)))
    else:
        result = None
        call = extractor_pb2_grpc.ExtractorStub(channels["extractor"]).Extract(
            extractor_pb2.ExtractRequest(
                video=ref,
                options=extractor_pb2.ExtractOptions(max_faces=opts.max_faces, frontend=opts.frontend),
            ),
            timeout=timeout_s,
        )
        for ev in call:
            if ev.HasField("progress"):
                p = ev.progress
                status(f"{p.stage} {100 * p.done // p.total}%" if p.total > 1 else p.stage)
            else:
                result = ev.result
        if result is None:
            raise RuntimeError("the extractor ended without a result")
        req.frames.CopyFrom(result.frames)
        if result.HasField("speech"):
            req.speech.CopyFrom(result.speech)
        faces, rec["notes"] = result.faces, list(result.notes)
        rec.update(frames=result.video.frames, duration_s=result.video.duration_s, frontend=result.frontend)
    status("smiles")
    res = None
    for ev in smiles_pb2_grpc.SmilesStub(channels["smiles"]).Analyze(req, timeout=timeout_s):
        if ev.HasField("result"):
            res = ev.result
    if res is None:
        raise RuntimeError("the smiles service ended without a result")
    rec["notes"] += [n for n in res.notes if n not in rec["notes"]]
    rec["faces"] = len(faces)
    rec["face_id"] = res.face_id
    for f in faces:
        if f.face_id == res.face_id:
            rec["role"] = ROLE_NAME.get(f.role, "")
            rec["mean_confidence"] = round(f.mean_confidence, 4)
            rec["au_calibration"] = f.au_calibration
    rec.update(
        smiles_found=res.smiles_found,
        speech_checked=res.speech_checked,
        smiles_key=res.smiles.key,
        plot_key=res.plot.key,
        frames_key=req.frames.key,
    )
    if s.dyad:
        status("dyad")
        rec["dyad"] = run_dyad(s, channels, timeout_s, opts)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def run_dyad(
    s: Session, channels: dict[str, grpc.Channel], timeout_s: float, opts: Options | None = None
) -> dict:
    """The dyad measures of a session ({"summary_key", "files"}), or why there are none."""
    src = smiles_pb2.DyadSource(parent=common_pb2.ObjectRef(key=s.key, sha256=s.sha256), offset_s=s.offset_s)
    if s.infant_key:
        src.infant.CopyFrom(common_pb2.ObjectRef(key=s.infant_key, sha256=s.infant_sha256))
    try:
        res = None
        for ev in smiles_pb2_grpc.SmilesStub(channels["smiles"]).AnalyzeDyad(
            smiles_pb2.DyadRequest(
                source=src,
                extract=extractor_pb2.ExtractOptions(
                    max_faces=opts.max_faces if opts else 0, frontend=opts.frontend if opts else ""
                ),
            ),
            timeout=timeout_s,
        ):
            if ev.HasField("result"):
                res = ev.result
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return {"error": e.details()}  # e.g. no time with both faces: a note, not a failure
    assert res is not None  # the stream ends with its result
    files = {f.name: f.ref.key for f in res.files}
    return {
        "summary_key": files["dyad_summary.csv"],
        "page_key": files.get("dyad.html", ""),
        "joint_frames": res.joint_frames,
    }


@dataclasses.dataclass
class Outcome:
    done: list[dict]
    failed: list[dict]
    cached: int
    ran: int


def run_sessions(
    sessions: list[Session],
    opts: Options,
    store: storage.ObjectStore,
    addrs: dict[str, str],
    parallel: int,
    timeout_s: float,
    progress=None,
) -> Outcome:
    """Run every unfinished session, `parallel` at a time; records into the store."""
    from dyadlab import client

    done, failed, todo = [], [], []
    for s in sessions:
        key = record_key(s, opts)
        if store.exists(key):
            done.append(json.loads(store.get_bytes(key)))
        else:
            todo.append(s)
    cached = len(done)
    if progress:
        progress.start(len(sessions), cached, sum(s.duration_s for s in todo))
    lock = threading.Lock()
    channels = {n: client.channel(addrs[n]) for n in ("extractor", "smiles")}
    try:

        def work(s: Session):
            status = (lambda st: progress.status(s.label, st)) if progress else (lambda st: None)
            try:
                rec = run_session(s, opts, channels, timeout_s, status)
            except grpc.RpcError as e:
                return s, None, f"{e.code().name}: {e.details()}"
            except Exception as e:  # noqa: BLE001 — one session's failure must not stop the cohort
                return s, None, f"{type(e).__name__}: {e}"
            store.put_bytes(
                record_key(s, opts), json.dumps(rec, indent=1).encode(), content_type="application/json"
            )
            return s, rec, ""

        with cf.ThreadPoolExecutor(max(1, parallel)) as ex:
            for fut in cf.as_completed([ex.submit(work, s) for s in todo]):
                s, rec, err = fut.result()
                with lock:
                    if rec is not None:
                        done.append(rec)
                    else:
                        failed.append(
                            {
                                "row": s.row,
                                "participant_id": s.participant_id,
                                "visit_month": s.visit_month,
                                "reason": err,
                            }
                        )
                if progress:
                    progress.finished(s.label, s.duration_s, ok=rec is not None, reason=err)
    finally:
        for ch in channels.values():
            ch.close()
        if progress:
            progress.close()
    return Outcome(done, failed, cached, len(todo))


# -- the report ------------------------------------------------------------------------------
def apply_reviews(records: list[dict], smiles_channel: grpc.Channel, timeout_s: float) -> list[dict]:
    """The records with each session's smiles replaced by its face's latest
    human review, where there is one (`dyadlab review`; Smiles.GetReview).
    Looked up at report time, so a review saved after the run counts; each
    record says which review it used (review_version 0: the automatic smiles)."""
    stub = smiles_pb2_grpc.SmilesStub(smiles_channel)
    out = []
    for r in records:
        r = dict(r, review_version=0, reviewer="")
        if r.get("frames_key") and r.get("face_id", -1) >= 0:
            try:
                rev = stub.GetReview(
                    smiles_pb2.GetReviewRequest(
                        frames=common_pb2.ObjectRef(key=r["frames_key"]),
                        face=common_pb2.FaceSelector(face_id=r["face_id"]),
                    ),
                    timeout=timeout_s,
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                r.update(smiles_key=rev.smiles.key, review_version=rev.version, reviewer=rev.reviewer)
        out.append(r)
    return out


def collect(records: list[dict], store: storage.ObjectStore, keep_speech: bool):
    """The long smile table of every finished session, and sessions.csv's rows."""
    import pandas as pd

    parts, rows = [], []
    for r in sorted(records, key=lambda r: (r["participant_id"], r["visit_month"])):
        table = pd.read_csv(io.BytesIO(store.get_bytes(r["smiles_key"]))) if r.get("smiles_key") else None
        n_found = 0 if table is None else len(table)
        if table is not None and not keep_speech and "overlaps_speech" in table:
            table = table[~table["overlaps_speech"].astype(bool)]
        kept = 0 if table is None else len(table)
        if table is not None and kept:
            table = table.assign(participant_id=r["participant_id"], visit_month=r["visit_month"])
            table["smile_id"] = range(1, kept + 1)  # 1..n in time order among the kept smiles
            parts.append(table)
        rows.append(
            {
                "participant_id": r["participant_id"],
                "visit_month": r["visit_month"],
                "frames": r["frames"],
                "duration_s": round(r["duration_s"], 2),
                "faces": r["faces"],
                "face_id": r["face_id"],
                "role": r["role"],
                "mean_confidence": r["mean_confidence"],
                "smiles_found": n_found,
                "smiles_kept": kept,
                "smiles_dropped_speech": n_found - kept,
                "speech_checked": r.get("speech_checked", False),
                "dyad": "measured"
                if (r.get("dyad") or {}).get("summary_key")
                else (r["dyad"]["error"] if r.get("dyad") else ""),
                "review_version": r.get("review_version", 0),
                "frontend": r.get("frontend", ""),
                "au_calibration": r.get("au_calibration", ""),
                "processing_s": r["seconds"],
                "notes": " | ".join(r["notes"]),
            }
        )
    long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=KEYS + ["smile_id"])
    return long, pd.DataFrame(rows)


def collect_dyads(records: list[dict], store: storage.ObjectStore):
    """One row per dyad session with measures (None when no session is a dyad)."""
    import pandas as pd

    rows = []
    for r in sorted(records, key=lambda r: (r["participant_id"], r["visit_month"])):
        d = r.get("dyad")
        if d and d.get("summary_key"):
            row = pd.read_csv(io.BytesIO(store.get_bytes(d["summary_key"]))).iloc[0].to_dict()
            rows.append({"participant_id": r["participant_id"], "visit_month": r["visit_month"], **row})
    return pd.DataFrame(rows) if rows else None


def build_report(
    records: list[dict],
    scores_path: Path,
    out: Path,
    store: storage.ObjectStore,
    stats_addr: str,
    opts: Options,
    timeout_s: float,
    correction: stats_pb2.Correction,
    mlp: stats_pb2.MlpOptions,
    on_progress=None,
) -> stats_pb2.CohortResult:
    """Stats on the collected smiles; every file into `out` with sessions.csv."""
    from dyadlab import client

    long, sessions = collect(records, store, opts.keep_speech)
    dyads = collect_dyads(records, store)
    out.mkdir(parents=True, exist_ok=True)
    sessions.to_csv(out / "sessions.csv", index=False)
    dyads_ref = None
    if dyads is not None:
        dyads.to_csv(out / "dyads.csv", index=False)
        dyads_ref = object_ref(
            storage.put_content_bytes(
                store, dyads.to_csv(index=False).encode(), "dyads.csv", content_type="text/csv"
            )
        )
    smiles_ref = object_ref(
        storage.put_content_bytes(
            store, long.to_csv(index=False).encode(), "smiles.csv", content_type="text/csv"
        )
    )
    req = stats_pb2.CohortRequest(
        smiles=smiles_ref,
        scores=object_ref(storage.put_content(store, scores_path)),
        correction=correction,
        mlp=mlp,
    )
    if dyads_ref is not None:
        req.dyads.CopyFrom(dyads_ref)
    with client.channel(stats_addr) as ch:
        result = None
        for ev in stats_pb2_grpc.StatsStub(ch).AnalyzeCohort(req, timeout=timeout_s):
            if ev.HasField("progress"):
                if on_progress:
                    on_progress(ev.progress)
            else:
                result = ev.result
    if result is None:
        raise RuntimeError("the stats service ended without a result")
    for f in result.files:
        store.get_file(f.ref.key, out / Path(f.name).name)
    return result


def write_failures(failed: list[dict], out: Path) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(failed, columns=["row", "participant_id", "visit_month", "reason"]).sort_values(
        "row"
    ).to_csv(out / "failures.csv", index=False)
