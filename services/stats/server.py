"""The stats service: smiles + questionnaires in the store -> Tables II-IV,
Fig. 2 and an APA-style HTML report in the store; and the cohort simulator."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from pathlib import Path

import grpc
import pandas as pd
import prometheus_client as prom

from dyadlab import rpc, storage, tables
from dyadlab.config import Settings
from dyadlab.messages import object_ref
from dyadlab.v1 import common_pb2, stats_pb2, stats_pb2_grpc
from services.stats import inference, mlp, report, scores, simulate

log = logging.getLogger("dyadlab.stats")

COHORTS = prom.Counter("dyadlab_stats_cohorts_total", "Cohorts analysed")
CORRECTION = {
    stats_pb2.CORRECTION_NONE: "none",
    stats_pb2.CORRECTION_HOLM: "holm",
    stats_pb2.CORRECTION_FDR_BH: "fdr_bh",
}
MAX_TABLE_BYTES = 256 << 20
MAX_PARTICIPANTS = 100_000


class StatsService:
    name = "dyadlab.v1.Stats"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = storage.open_store(settings)

    def register(self, server: grpc.aio.Server) -> None:
        stats_pb2_grpc.add_StatsServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        import torch  # the MLP's; loaded before the service says it is ready

        torch.set_num_threads(max(1, self.settings.workers))

    async def stop(self) -> None:
        pass

    def _get(self, ref: common_pb2.ObjectRef, what: str) -> bytes:
        size = rpc.object_size(self.store, ref, what, f"{what} table")
        if size > MAX_TABLE_BYTES:
            raise rpc.UserError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the {what} table is {size >> 20} MiB, over {MAX_TABLE_BYTES >> 20} MiB",
            )
        return self.store.get_bytes(ref.key)

    def load(self, request: stats_pb2.CohortRequest) -> tuple[pd.DataFrame, pd.DataFrame, list[str], str]:
        """(smiles, scores, notes, content digest) of a request, validated."""
        h = hashlib.sha256()
        source = request.WhichOneof("smiles_source")
        if source == "smiles":
            data = self._get(request.smiles, "smiles")
            h.update(data)
            raw = tables.read_any(data)
        elif source == "sessions":
            parts = []
            for i, s in enumerate(request.sessions.sessions):
                if not s.participant_id or s.visit_month not in scores.VISITS:
                    raise rpc.UserError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"sessions[{i}]: participant_id must be set and visit_month one of {scores.VISITS}",
                    )
                data = self._get(s.smiles, f"sessions[{i}].smiles")
                h.update(s.participant_id.encode() + bytes([s.visit_month]) + data)
                t = tables.read_any(data)
                t["participant_id"], t["visit_month"] = s.participant_id, s.visit_month
                parts.append(t)
            if not parts:
                raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "sessions is empty")
            raw = pd.concat(parts, ignore_index=True)
        else:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "give smiles or sessions")
        sdata = self._get(request.scores, "scores")
        h.update(sdata)
        sc, notes = scores.validate_scores(tables.read_any(sdata))
        sm = scores.validate_smiles(raw)
        return sm, sc, notes, h.hexdigest()

    def analyze(
        self, request: stats_pb2.CohortRequest, report_progress: rpc.Report
    ) -> stats_pb2.CohortResult:
        t0 = time.perf_counter()
        report_progress("load", 0, 1, "")
        sm, sc, notes, digest = self.load(request)
        joined, join_notes = scores.join(sm, sc)
        notes += join_notes
        method = CORRECTION.get(request.correction)
        if method is None:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown correction {request.correction}")
        report_progress("tests", 0, 3, "Table III")
        t3 = inference.adjust(inference.welch_table(sm), method)
        report_progress("tests", 1, 3, "Table IV")
        t4 = inference.adjust(inference.anova_table(joined), method)
        report_progress("tests", 2, 3, "Fig. 2")
        corr = inference.adjust(inference.correlation_table(joined), method)
        report_progress("tests", 3, 3, "")
        dyad_anova = dyad_corr = None
        if request.dyads.key:
            dyads = scores.validate_dyads(tables.read_any(self._get(request.dyads, "dyads")))
            dj, dnotes = scores.join(dyads, sc)
            notes += [f"dyads: {n}" for n in dnotes]
            dyad_anova, dyad_corr = inference.dyad_tables(dj)
            dyad_anova = inference.adjust(dyad_anova, method)
            dyad_corr = inference.adjust(dyad_corr, method)
        t2 = None
        folds = request.mlp.folds or 5
        if not 2 <= folds <= 20 or not 0 <= request.mlp.seeds <= 50:
            raise rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, "mlp: folds must be 2..20, seeds 0..50")
        n_mlp = joined["participant_id"].nunique()
        if request.mlp.skip:
            pass
        elif n_mlp < 2 * folds:
            notes.append(
                f"Table II (MLP) skipped: {n_mlp} participants with smiles, at least "
                f"{2 * folds} are needed for {folds}-fold cross-validation"
            )
        else:
            res = mlp.run_grid(
                joined,
                seeds=range(request.mlp.seeds or 5),
                folds=folds,
                progress=lambda d, t: report_progress("mlp", d, t, ""),
            )
            t2 = res.table
            notes += [n for n in res.notes if n not in notes]
        n_part = sc["participant_id"].nunique()
        n_sess = len(sc)
        meta = {
            "summary": f"{n_part} participants, {n_sess} scored sessions, {len(sm)} smiles. "
            f"Multiple-comparison correction: {method}.",
            "footer": "Generated by dyadlab. Smiles are the unit of analysis in Tables III "
            "and IV, as in the source study; smiles of one mother are not "
            "independent, so p values are optimistic.",
        }
        report_progress("report", 0, 1, "")
        if request.dyads.key:
            digest = hashlib.sha256((digest + request.dyads.key).encode()).hexdigest()
        prefix = f"reports/{digest[:32]}-{method}-{'nomlp' if request.mlp.skip else 'mlp'}"
        with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
            files = report.write_all(
                Path(d),
                t2,
                t3,
                t4,
                corr,
                notes,
                meta,
                dyads=(dyad_anova, dyad_corr) if dyad_anova is not None else None,
            )
            refs = []
            for name, path in files.items():
                ctype = {"html": "text/html", "png": "image/png", "csv": "text/csv"}[name.rsplit(".", 1)[1]]
                refs.append(
                    common_pb2.NamedRef(
                        name=name,
                        ref=object_ref(self.store.put_file(f"{prefix}/{name}", path, content_type=ctype)),
                    )
                )
        COHORTS.inc()
        log.info(
            "cohort analysed",
            extra={"participants": n_part, "sessions": n_sess, "smiles": len(sm), "method": method},
        )
        return stats_pb2.CohortResult(
            files=refs,
            notes=notes,
            participants=n_part,
            sessions=n_sess,
            smiles=len(sm),
            seconds=time.perf_counter() - t0,
        )

    def simulate(self, request: stats_pb2.SimulateRequest) -> stats_pb2.SimulateResponse:
        if not 2 <= request.participants <= MAX_PARTICIPANTS:
            raise rpc.UserError(
                grpc.StatusCode.INVALID_ARGUMENT, f"participants must be 2..{MAX_PARTICIPANTS}"
            )
        cohort = simulate.simulate(
            request.participants, request.seed, simulate.Effects.null() if request.null_effects else None
        )
        prefix = f"simulated/n{request.participants}-s{request.seed}{'-null' if request.null_effects else ''}"
        refs = []
        with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
            for path in simulate.write(cohort, Path(d)).values():
                refs.append(
                    common_pb2.NamedRef(
                        name=path.name, ref=object_ref(self.store.put_file(f"{prefix}/{path.name}", path))
                    )
                )
        return stats_pb2.SimulateResponse(files=refs)


class _Servicer(stats_pb2_grpc.StatsServicer):
    def __init__(self, svc: StatsService):
        self.svc = svc

    @rpc.status_errors
    async def AnalyzeCohort(self, request, context):
        async for kind, value in rpc.progress_stream(lambda rep: self.svc.analyze(request, rep)):
            if kind == "progress":
                yield stats_pb2.CohortEvent(progress=rpc.progress(*value))
            else:
                yield stats_pb2.CohortEvent(result=value)

    @rpc.status_errors
    async def Simulate(self, request, context):
        return await asyncio.to_thread(self.svc.simulate, request)


def main() -> None:
    rpc.run(StatsService, lambda s: s.stats_addr)
