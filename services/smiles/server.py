"""The smiles service: a frame table (or a video, via the extractor) in the
store -> one face's smiles as CSV, plus a Fig.-1-style PNG, in the store."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import tempfile
import threading
from pathlib import Path

import grpc
import pandas as pd
import prometheus_client as prom

from dyadlab import client, rpc, security, storage, tables
from dyadlab import frames as ft
from dyadlab import log as jsonlog
from dyadlab.config import Settings
from dyadlab.messages import ROLE_NAME, object_ref
from dyadlab.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc, smiles_pb2, smiles_pb2_grpc
from services.smiles import dyad, dyad_page, features, plot, review, segment

log = logging.getLogger("dyadlab.smiles")

SMILES = prom.Counter("dyadlab_smiles_found_total", "Smiles found", ["kept"])
VERSION = "1"


def params_from(msg: smiles_pb2.SmileParams) -> segment.SmileParams:
    d = segment.SmileParams()
    p = dataclasses.replace(
        d,
        au12_threshold=msg.au12_threshold or d.au12_threshold,
        min_activations=msg.min_activations or d.min_activations,
        activation_window_s=msg.activation_window_s or d.activation_window_s,
        min_confidence=msg.min_confidence or d.min_confidence,
        smooth_window_s=msg.smooth_window_s or d.smooth_window_s,
    )
    problems = []
    if not 0 < p.au12_threshold <= 5:
        problems.append("au12_threshold must be in (0, 5]")
    if not 1 <= p.min_activations <= 1000:
        problems.append("min_activations must be 1..1000")
    if not 0 < p.activation_window_s <= 60:
        problems.append("activation_window_s must be in (0, 60]")
    if not 0 < p.min_confidence <= 1:
        problems.append("min_confidence must be in (0, 1]")
    if not 0 <= p.smooth_window_s <= 5:
        problems.append("smooth_window_s must be in [0, 5]")
    if problems:
        raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "params: " + "; ".join(problems))
    return p


INFANT_MIN_CONFIDENCE = ft.INFANT_MIN_CONFIDENCE


def dyad_params(msg: smiles_pb2.DyadParams) -> tuple[segment.SmileParams, segment.SmileParams, dict]:
    pp = params_from(msg.parent)
    ip = params_from(msg.infant)
    if not msg.infant.min_confidence:
        ip = dataclasses.replace(ip, min_confidence=INFANT_MIN_CONFIDENCE)
    m = {
        "contingency_window_s": msg.contingency_window_s or 2.0,
        "sync_window_s": msg.sync_window_s or 4.0,
        "max_lag_s": msg.max_lag_s or 3.0,
        "shifts": msg.shifts or 1000,
        "seed": msg.seed,
    }
    if not (
        0 < m["contingency_window_s"] <= 30
        and 0.5 <= m["sync_window_s"] <= 120
        and 0 < m["max_lag_s"] <= 30
        and 99 <= m["shifts"] <= 100_000
    ):
        raise rpc.UserError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "dyad params: contingency window (0, 30] s, synchrony window [0.5, 120] s, "
            "max lag (0, 30] s, shifts 99..100000",
        )
    return pp, ip, m


def _rest(rest: dict, video: str, face_id: int) -> str:
    v = rest.get((video, face_id), (0.0, ""))[0]
    return f"{v:.3f}" if v else "unknown (imported table)"


def _calibration(rest: dict, video: str, face_id: int) -> str:
    """How the extractor scaled this face's AU12 (role, neutral reference, channels)."""
    return rest.get((video, face_id), (0.0, ""))[1] or "unknown (imported table)"


def face_selector(msg: common_pb2.FaceSelector) -> str | int | None:
    which = msg.WhichOneof("select")
    if which == "face_id":
        return msg.face_id
    if which == "role":
        if msg.role not in (common_pb2.ROLE_UNSPECIFIED, *ROLE_NAME):
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role value {msg.role}")
        return ROLE_NAME.get(msg.role)
    return None


class SmilesService:
    name = "dyadlab.v1.Smiles"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = storage.open_store(settings)
        self.channel: grpc.aio.Channel | None = None
        #: one review saved at a time: versions are numbered by what is in the store
        self._review_lock = threading.Lock()

    def register(self, server: grpc.aio.Server) -> None:
        smiles_pb2_grpc.add_SmilesServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        # The extractor is needed only for videos; it may start later.
        self.channel = client.aio_channel(self.settings.extractor_addr, self.settings)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def load_table(self, ref: common_pb2.ObjectRef, what: str) -> tuple[pd.DataFrame, bytes, list[str]]:
        rpc.object_size(self.store, ref, what)
        data = self.store.get_bytes(ref.key)
        df, notes = tables.read_frames(data)
        return df, data, notes

    def load_speech(self, ref: common_pb2.ObjectRef) -> pd.DataFrame:
        """A speech table (start_s, end_s[, duration_s]) as Parquet or CSV."""
        rpc.object_size(self.store, ref, "speech", "speech table")
        df = tables.read_any(self.store.get_bytes(ref.key), "speech table")
        missing = [c for c in ("start_s", "end_s") if c not in df.columns]
        if missing:
            raise ft.TableError("speech table is missing columns: " + ", ".join(missing))
        bad = ~(pd.to_numeric(df["start_s"], errors="coerce") <= pd.to_numeric(df["end_s"], errors="coerce"))
        if bad.any():
            raise ft.TableError(
                f"speech table row {int(bad.to_numpy().argmax()) + 1}: start_s must be a number <= end_s"
            )
        return df

    def analyze_dyad(
        self,
        people: list[pd.DataFrame],
        parent_id,
        infant_id,
        offset_s: float,
        pp: segment.SmileParams,
        ip: segment.SmileParams,
        measures: dict,
        rest: dict,
        notes: list[str],
        report: rpc.Report,
    ) -> smiles_pb2.DyadResult:
        """Both people's frames -> the dyad's measures, tables, figures and page in the store."""
        report("dyad", 0, 2, "aligning")
        if len(people) == 1:
            both = people[0]
            parent_df, infant_df = dyad.split_faces(
                both,
                "adult" if parent_id is None else parent_id,
                "infant" if infant_id is None else infant_id,
            )
        else:
            parent_df = people[0][people[0]["face_id"] == ft.select_face(people[0], parent_id)]
            infant_df = people[1][people[1]["face_id"] == ft.select_face(people[1], infant_id)]
        try:
            result = dyad.analyse_dyad(
                parent_df,
                infant_df,
                offset_s,
                parent_min_confidence=pp.min_confidence,
                infant_min_confidence=ip.min_confidence,
                parent_smile_params=pp,
                infant_smile_params=ip,
                parent_threshold=pp.au12_threshold,
                infant_threshold=ip.au12_threshold,
                **measures,
            )
        except dyad.DyadError as e:
            raise rpc.UserError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        report("dyad", 1, 2, "figures")
        fid_p, fid_i = int(parent_df["face_id"].iloc[0]), int(infant_df["face_id"].iloc[0])
        used = {
            "parent face_id": fid_p,
            "infant face_id": fid_i,
            "infant offset (s)": offset_s,
            "parent AU12 threshold": pp.au12_threshold,
            "infant AU12 threshold": ip.au12_threshold,
            "parent minimum confidence": pp.min_confidence,
            "infant minimum confidence": ip.min_confidence,
            "parent AU12 resting mouth width (IOD)": _rest(rest, "parent", fid_p),
            "infant AU12 resting mouth width (IOD)": _rest(
                rest, "infant" if len(people) > 1 else "parent", fid_i
            ),
            "parent AU12 calibration": _calibration(rest, "parent", fid_p),
            "infant AU12 calibration": _calibration(rest, "infant" if len(people) > 1 else "parent", fid_i),
            **{k.replace("_", " "): v for k, v in measures.items()},
        }
        tag = hashlib.sha256(repr((result["summary"], used)).encode()).hexdigest()[:24]
        refs = []
        with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
            for name, path in dyad_page.write(Path(d), result, used, notes).items():
                refs.append(
                    common_pb2.NamedRef(
                        name=name, ref=object_ref(self.store.put_file(f"dyads/{tag}/{name}", path))
                    )
                )
        report("dyad", 2, 2, "")
        log.info("dyad analysed", extra={"joint_frames": int(result["summary"]["n_joint_frames"])})
        return smiles_pb2.DyadResult(
            files=refs, notes=notes, joint_frames=int(result["summary"]["n_joint_frames"])
        )

    def analyze(
        self,
        frames: pd.DataFrame,
        frames_digest: str,
        speech: pd.DataFrame | None,
        face,
        keep_speech: bool,
        params: segment.SmileParams,
        want_plot: bool,
        notes: list[str],
        report: rpc.Report,
        reviewed: bool = False,
    ) -> smiles_pb2.AnalyzeResult:
        report("smiles", 0, 1, "")
        res = smiles_pb2.AnalyzeResult(speech_checked=speech is not None)
        if not (frames["success"] > 0).any():
            notes.append("no face was found in any frame; no smiles to analyse")
            res.notes.extend(notes)
            res.face_id = -1
            return res
        fid = ft.select_face(frames, face)
        one = frames[frames["face_id"] == fid]
        ft.validate(one, need_aus=("AU12_r",))
        smiles = segment.segment_smiles(one, params)
        segs = [] if speech is None else list(zip(speech["start_s"], speech["end_s"]))
        table = features.smile_table(one, smiles, segs, face_id=fid)
        if reviewed:
            got = review.load(self.store, review.prefix(frames_digest, fid))
            if got is None:
                notes.append("no human review of this face yet: the automatic smiles")
            else:
                record, table = got
                res.review_version = record["version"]
                notes.append(f"smiles of the human review v{record['version']} ({record['saved_at']})")
        found = len(table)
        if speech is None:
            notes.append("no speech table: smiles overlapping speech were not removed")
        elif not keep_speech:
            table = features.drop_speech(table)
        dropped = found - len(table)
        SMILES.labels("yes").inc(len(table))
        SMILES.labels("no").inc(dropped)
        tag = hashlib.sha256(
            repr((frames_digest, fid, params, keep_speech, segs, VERSION, res.review_version)).encode()
        ).hexdigest()[:24]
        res.smiles.CopyFrom(
            object_ref(
                self.store.put_bytes(
                    f"smiles/{tag}/smiles.csv", tables.to_bytes(table, "csv"), content_type="text/csv"
                )
            )
        )
        if want_plot:
            report("plot", 0, 1, "")
            with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
                png = plot.smile_figure(
                    one,
                    smiles,
                    segs,
                    Path(d) / "smiles.png",
                    title=f"face {fid}"
                    + (
                        f" ({one[ft.ROLE_COL].iloc[0]})"
                        if ft.ROLE_COL in one and one[ft.ROLE_COL].iloc[0]
                        else ""
                    ),
                    params=params,
                )
                res.plot.CopyFrom(
                    object_ref(self.store.put_file(f"smiles/{tag}/smiles.png", png, content_type="image/png"))
                )
        res.face_id, res.smiles_found, res.smiles_dropped_speech = fid, found, dropped
        res.notes.extend(notes)
        log.info(
            "analysed",
            extra={
                "frames": jsonlog.short(frames_digest),
                "face_id": fid,
                "smiles": found,
                "dropped_speech": dropped,
            },
        )
        return res

    # -- human review (services/smiles/review.py) -----------------------------------------
    def _face_frames(self, frames_ref, face) -> tuple[pd.DataFrame, int, str]:
        frames, data, _ = self.load_table(frames_ref, "frames")
        fid = ft.select_face(frames, face)
        one = frames[frames["face_id"] == fid]
        ft.validate(one, need_aus=("AU12_r",))
        return one, fid, hashlib.sha256(data).hexdigest()

    def save_review(self, request: smiles_pb2.ReviewRequest, reviewer: str) -> smiles_pb2.ReviewResult:
        """A reviewer's corrections -> the next review version in the store."""
        one, fid, digest = self._face_frames(request.frames, face_selector(request.face))
        params = params_from(request.params)
        segs: list[tuple[float, float]] = []
        if request.speech.key:
            sp = self.load_speech(request.speech)
            segs = list(zip(sp["start_s"], sp["end_s"]))
        corrections = [
            review.Correction(
                s.smile_id if s.HasField("smile_id") else None, s.start_s, s.end_s, s.status or "auto"
            )
            for s in request.smiles
        ]
        with self._review_lock:
            return self._save_review(one, fid, digest, request, params, segs, corrections, reviewer)

    def _save_review(self, one, fid, digest, request, params, segs, corrections, reviewer):
        try:
            pfx = review.prefix(digest, fid)
            auto = features.smile_table(one, segment.segment_smiles(one, params), segs, face_id=fid)
            first_new = review.next_smile_id(self.store, pfx, auto["smile_id"])
            table = review.reviewed_table(one, corrections, segs, fid, params, first_new_id=first_new)
            record = review.save(
                self.store,
                pfx,
                table,
                base_version=request.base_version,
                reviewer=reviewer,
                corrections=corrections,
                max_smile_id=first_new - 1,
                source={
                    "frames": request.frames.key,
                    "frames_sha256": digest,
                    "face_id": fid,
                    "automatic_smiles": len(auto),
                    "speech": request.speech.key,
                },
            )
        except review.ReviewError as e:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except review.Conflict as e:
            raise rpc.UserError(grpc.StatusCode.ABORTED, str(e)) from None
        log.info(
            "review saved",
            extra={
                "frames": jsonlog.short(digest),
                "face_id": fid,
                "version": record["version"],
                "smiles": len(table),
            },
        )
        res = self._review_result(pfx, record, fid)
        res.notes.extend(review.unmeasured_notes(table))
        return res

    def get_review(self, request: smiles_pb2.GetReviewRequest) -> smiles_pb2.ReviewResult:
        _, fid, digest = self._face_frames(request.frames, face_selector(request.face))
        pfx = review.prefix(digest, fid)
        try:
            got = review.load(self.store, pfx, request.version)
        except review.ReviewError as e:
            raise rpc.UserError(grpc.StatusCode.NOT_FOUND, str(e)) from None
        if got is None:
            raise rpc.UserError(
                grpc.StatusCode.NOT_FOUND, f"face {fid} of this frame table has no review yet"
            )
        return self._review_result(pfx, got[0], fid)

    def _review_result(self, pfx: str, record: dict, fid: int) -> smiles_pb2.ReviewResult:
        rec_key = f"{pfx}/v{record['version']:04d}/record.json"
        return smiles_pb2.ReviewResult(
            smiles=object_ref(self.store.ref(record["smiles"])),
            record=object_ref(self.store.ref(rec_key)),
            version=record["version"],
            reviewer=record["reviewer"],
            saved_at=record["saved_at"],
            face_id=fid,
        )


class _Servicer(smiles_pb2_grpc.SmilesServicer):
    def __init__(self, svc: SmilesService):
        self.svc = svc

    def _extract(self, context, video: common_pb2.ObjectRef, options, label: str = "extract"):
        """Ask the extractor for a video's frames: an rpc.relay_progress stream
        (its progress, stages prefixed "<label>/", then the ExtractResult). The
        caller's deadline carries over."""
        stub = extractor_pb2_grpc.ExtractorStub(self.svc.channel)
        call = stub.Extract(
            extractor_pb2.ExtractRequest(video=video, options=options),
            timeout=rpc.downstream_timeout(context, self.svc.settings.rpc_timeout_s),
        )
        return rpc.relay_progress(call, label, peer="extractor")

    @rpc.status_errors
    async def Analyze(self, request, context):
        svc = self.svc
        params = params_from(request.params)
        face = face_selector(request.face)
        notes: list[str] = []
        speech_ref = request.speech if request.HasField("speech") else None
        source = request.WhichOneof("source")
        if source is None:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "give a video or a frames reference")
        if source == "video":
            async for kind, value in self._extract(context, request.video, request.extract):
                if kind == "progress":
                    yield smiles_pb2.AnalyzeEvent(progress=rpc.progress(*value))
                else:
                    result = value
            notes.extend(result.notes)
            frames_ref = result.frames
            if result.HasField("speech"):
                speech_ref = result.speech
        else:
            frames_ref = request.frames
        frames_df, data, table_notes = await asyncio.to_thread(svc.load_table, frames_ref, "frames")
        notes.extend(table_notes)
        speech_df = None
        if speech_ref is not None and speech_ref.key:
            speech_df = await asyncio.to_thread(svc.load_speech, speech_ref)
        digest = hashlib.sha256(data).hexdigest()
        async for kind, value in rpc.progress_stream(
            lambda report: svc.analyze(
                frames_df,
                digest,
                speech_df,
                face,
                request.keep_speech,
                params,
                request.plot,
                notes,
                report,
                request.reviewed,
            )
        ):
            if kind == "progress":
                yield smiles_pb2.AnalyzeEvent(progress=rpc.progress(*value))
            else:
                value.frames.CopyFrom(frames_ref)
                yield smiles_pb2.AnalyzeEvent(result=value)

    @rpc.status_errors
    async def AnalyzeDyad(self, request, context):
        svc = self.svc
        src = request.source
        if not src.parent.key:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "source.parent is empty")
        pp, ip, measures = dyad_params(request.params)
        people, notes, rest = [], [], {}
        for label, ref in (("parent", src.parent), ("infant", src.infant)):
            if label == "infant" and not ref.key:
                break
            if ref.key.lower().endswith((".csv", ".parquet")):
                df, _, tnotes = await asyncio.to_thread(svc.load_table, ref, f"{label} frames")
                notes += tnotes
            else:
                async for kind, value in self._extract(context, ref, request.extract, f"extract {label}"):
                    if kind == "progress":
                        yield smiles_pb2.DyadEvent(progress=rpc.progress(*value))
                    else:
                        result = value
                notes += [f"{label} video: {n}" for n in result.notes]
                rest.update({(label, f.face_id): (f.au12_rest_width, f.au_calibration) for f in result.faces})
                df, _, _ = await asyncio.to_thread(svc.load_table, result.frames, f"{label} frames")
            people.append(df)
        pid = src.parent_face_id if src.HasField("parent_face_id") else None
        iid = src.infant_face_id if src.HasField("infant_face_id") else None
        async for kind, value in rpc.progress_stream(
            lambda report: svc.analyze_dyad(
                people, pid, iid, src.offset_s, pp, ip, measures, rest, notes, report
            )
        ):
            if kind == "progress":
                yield smiles_pb2.DyadEvent(progress=rpc.progress(*value))
            else:
                yield smiles_pb2.DyadEvent(result=value)

    @rpc.status_errors
    async def SaveReview(self, request, context):
        return await asyncio.to_thread(self.svc.save_review, request, security.caller_name())

    @rpc.status_errors
    async def GetReview(self, request, context):
        return await asyncio.to_thread(self.svc.get_review, request)


def main() -> None:
    rpc.run(SmilesService, lambda s: s.smiles_addr)
