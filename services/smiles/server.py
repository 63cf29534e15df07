"""The smiles service: a frame table (or a video, via the extractor) in the
store -> one face's smiles as CSV, plus a Fig.-1-style PNG, in the store."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import tempfile
from pathlib import Path

import grpc
import pandas as pd
import prometheus_client as prom

from dyadlab import client, rpc, storage
from dyadlab import frames as ft
from dyadlab import log as jsonlog
from dyadlab.config import Settings
from dyadlab.messages import ROLE_NAME, object_ref
from dyadlab.v1 import (common_pb2, extractor_pb2, extractor_pb2_grpc, smiles_pb2,
                        smiles_pb2_grpc)
from services.smiles import features, plot, segment

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
        smooth_window_s=msg.smooth_window_s or d.smooth_window_s)
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

    def register(self, server: grpc.aio.Server) -> None:
        smiles_pb2_grpc.add_SmilesServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        # The extractor is needed only for videos; it may start later.
        self.channel = client.aio_channel(self.settings.extractor_addr)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def load_table(self, ref: common_pb2.ObjectRef, what: str) -> tuple[pd.DataFrame, bytes, list[str]]:
        if not ref.key:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}.key is empty")
        storage.validate_key(ref.key)
        if not self.store.exists(ref.key):
            raise rpc.UserError(grpc.StatusCode.NOT_FOUND, f"no {what} at key {ref.key!r}")
        data = self.store.get_bytes(ref.key)
        df, notes = ft.read_table(data)
        return df, data, notes

    def load_speech(self, ref: common_pb2.ObjectRef) -> pd.DataFrame:
        """A speech table (start_s, end_s[, duration_s]) as Parquet or CSV."""
        storage.validate_key(ref.key)
        if not self.store.exists(ref.key):
            raise rpc.UserError(grpc.StatusCode.NOT_FOUND, f"no speech table at key {ref.key!r}")
        data = self.store.get_bytes(ref.key)
        try:
            df = (pd.read_parquet(io.BytesIO(data)) if data[:4] == b"PAR1"
                  else pd.read_csv(io.BytesIO(data), skipinitialspace=True))
        except Exception as e:  # noqa: BLE001 — pandas/pyarrow raise many kinds
            raise ft.TableError(f"speech table is not readable Parquet or CSV ({type(e).__name__})") from None
        missing = [c for c in ("start_s", "end_s") if c not in df.columns]
        if missing:
            raise ft.TableError("speech table is missing columns: " + ", ".join(missing))
        bad = ~(pd.to_numeric(df["start_s"], errors="coerce")
                <= pd.to_numeric(df["end_s"], errors="coerce"))
        if bad.any():
            raise ft.TableError(f"speech table row {int(bad.to_numpy().argmax()) + 1}: "
                                "start_s must be a number <= end_s")
        return df

    def analyze(self, frames: pd.DataFrame, frames_digest: str, speech: pd.DataFrame | None,
                face, keep_speech: bool, params: segment.SmileParams, want_plot: bool,
                notes: list[str], report: rpc.Report) -> smiles_pb2.AnalyzeResult:
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
        found = len(table)
        if speech is None:
            notes.append("no speech table: smiles overlapping speech were not removed")
        elif not keep_speech:
            table = features.drop_speech(table)
        dropped = found - len(table)
        SMILES.labels("yes").inc(len(table))
        SMILES.labels("no").inc(dropped)
        tag = hashlib.sha256(repr((frames_digest, fid, params, keep_speech,
                                   segs, VERSION)).encode()).hexdigest()[:24]
        res.smiles.CopyFrom(object_ref(self.store.put_bytes(
            f"smiles/{tag}/smiles.csv", ft.to_bytes(table, "csv"), content_type="text/csv")))
        if want_plot:
            report("plot", 0, 1, "")
            with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
                png = plot.smile_figure(one, smiles, segs, Path(d) / "smiles.png",
                                        title=f"face {fid}" + (f" ({one[ft.ROLE_COL].iloc[0]})"
                                                               if ft.ROLE_COL in one and one[ft.ROLE_COL].iloc[0] else ""),
                                        params=params)
                res.plot.CopyFrom(object_ref(self.store.put_file(f"smiles/{tag}/smiles.png", png,
                                                           content_type="image/png")))
        res.face_id, res.smiles_found, res.smiles_dropped_speech = fid, found, dropped
        res.notes.extend(notes)
        log.info("analysed", extra={"frames": jsonlog.short(frames_digest), "face_id": fid,
                                    "smiles": found, "dropped_speech": dropped})
        return res


class _Servicer(smiles_pb2_grpc.SmilesServicer):
    def __init__(self, svc: SmilesService):
        self.svc = svc

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
            stub = extractor_pb2_grpc.ExtractorStub(svc.channel)
            call = stub.Extract(extractor_pb2.ExtractRequest(video=request.video, options=request.extract),
                                timeout=svc.settings.rpc_timeout_s)
            result = None
            try:
                async for ev in call:
                    if ev.HasField("progress"):
                        p = ev.progress
                        yield smiles_pb2.AnalyzeEvent(progress=common_pb2.Progress(
                            stage=f"extract/{p.stage}", done=p.done, total=p.total, message=p.message))
                    else:
                        result = ev.result
            except grpc.aio.AioRpcError as e:
                # Pass the extractor's verdict on through (bad video, missing key, ...).
                raise rpc.UserError(e.code(), f"extractor: {e.details()}") from None
            if result is None:
                raise rpc.UserError(grpc.StatusCode.UNAVAILABLE, "extractor ended without a result")
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
                lambda report: svc.analyze(frames_df, digest, speech_df, face, request.keep_speech,
                                           params, request.plot, notes, report)):
            if kind == "progress":
                stage, done, total, msg = value
                yield smiles_pb2.AnalyzeEvent(progress=common_pb2.Progress(
                    stage=stage, done=done, total=total, message=msg))
            else:
                value.frames.CopyFrom(frames_ref)
                yield smiles_pb2.AnalyzeEvent(result=value)


def main() -> None:
    rpc.run(SmilesService, lambda s: s.smiles_addr)
