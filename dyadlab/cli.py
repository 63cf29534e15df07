"""`dyadlab`: the command line. Every command talks gRPC to the services.

    dyadlab up | down | status
    dyadlab extract VIDEO_OR_OPENFACE_CSV --out frames.csv|frames.parquet
    dyadlab smiles VIDEO_OR_TABLE --out smiles.csv [--plot smiles.png]
                   [--keep-speech] [--face adult|infant|ID] [--reviewed]
    dyadlab review VIDEO | review export|import|agree ...   (dyadlab/review/cli.py)
    dyadlab dyad VIDEO [INFANT_VIDEO] [--offset S] --out DIR
    dyadlab stats SMILES --scores SCORES --out DIR [--correction holm|fdr_bh]
    dyadlab cohort simulate --participants N --seed S --out DIR
    dyadlab cohort run MANIFEST.csv --scores scores.csv --out report/
    dyadlab cohort report MANIFEST.csv --scores scores.csv --out report/
    dyadlab synth transform FACE --valence V --arousal A --out photo.png [--face-only] [--size PX] [--mask M.png]
    dyadlab synth matrix FACE --out matrix.png [--valences V ...] [--arousals A ...]
    dyadlab synth transfer VIDEO --parent FACE --infant FACE --out video.mp4 [--seed S]
    dyadlab synth train --images DIR --labels CSV [...]   (python -m services.synth.train)

Inputs are uploaded to the object store under their content hash (never
under their file name: names of participants stay on the user's machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import grpc

from dyadlab import client, services, stack, storage, tables
from dyadlab import frames as ft
from dyadlab.cliutil import (
    CliError,
    ProgressBar,
    face_choice,
    say,
    stream,
    upload,
    write_bytes,
    write_table,
)
from dyadlab.config import ConfigError, Settings
from dyadlab.messages import ROLE_NAME
from dyadlab.review import cli as review_cli
from dyadlab.v1 import (
    extractor_pb2,
    extractor_pb2_grpc,
    smiles_pb2,
    smiles_pb2_grpc,
    stats_pb2,
    stats_pb2_grpc,
    synth_pb2,
    synth_pb2_grpc,
)

TABLE_SUFFIXES = {".csv", ".parquet"}
#: the smile table's columns the `smiles` command prints
SHOW_COLUMNS = [
    c
    for c in tables.SMILE_COLUMNS
    if c not in ("face_id", "onset_duration_s", "apex_duration_s", "offset_duration_s")
]


# -- commands ----------------------------------------------------------------------
def cmd_up(settings: Settings, args) -> int:
    rec = stack.recorded(settings)
    if rec is not None:
        say(f"already running: {rec.addrs}")
        return 0
    st = stack.start(settings, metrics=not args.no_metrics)
    say("stack up: " + ", ".join(f"{n} {a} (pid {st.pids[n]})" for n, a in st.addrs.items()))
    say(f"store: {settings.s3_endpoint or settings.store_dir}; logs: {settings.home / 'logs'}")
    return 0


def cmd_down(settings: Settings, args) -> int:
    rec = stack.recorded(settings)
    if rec is None:
        say("no stack is running")
        return 0
    stack.stop(settings, rec)
    say("stack stopped")
    return 0


def cmd_status(settings: Settings, args) -> int:
    rec = stack.recorded(settings)
    addrs = rec.addrs if rec else stack.configured_addrs(settings)
    print(f"store: {'s3 ' + settings.s3_endpoint if settings.uses_s3 else settings.store_dir}")
    ok = True
    for name, addr in addrs.items():
        svc = services.get(name)
        state = client.health_status(addr, svc.grpc_name, settings=settings)
        pid = f" pid {rec.pids[name]}" if rec else ""
        optional = svc.optional and state == "NOT_SERVING"
        print(f"{name:10s} {addr:22s} {state}{pid}" + (" (optional)" if optional else ""))
        ok &= state == "SERVING" or optional
    if ok and not stack.same_store(addrs, settings, storage.store_id(storage.open_store(settings))):
        print(
            "note: these services work on another store (another DYADLAB_HOME or store): "
            "commands run here start an embedded stack on free ports instead"
        )
    from dyadlab import security

    print(f"security: {security.describe(settings, stack.audit_log_path(settings) if rec else '')}")
    for name, info in (rec.companions if rec else {}).items():
        print(stack.companion(name).describe(info))
    for note in rec.notes if rec else []:
        print(f"note: {note}")
    return 0 if ok else 3


def _extract_options(args) -> extractor_pb2.ExtractOptions:
    o = extractor_pb2.ExtractOptions(
        max_faces=args.max_faces, skip_speech=args.no_speech, frontend=args.frontend
    )
    if args.adult_face is not None:
        o.adult_face_id = args.adult_face
    return o


def cmd_extract(settings: Settings, args) -> int:
    src, out = Path(args.input), Path(args.out)
    store = storage.open_store(settings)
    with stack.ensure(settings, say) as st:
        with client.channel(st.addrs["extractor"], settings) as ch:
            stub = extractor_pb2_grpc.ExtractorStub(ch)
            if src.suffix.lower() == ".csv":
                ref = upload(store, src, "inputs")
                res = stub.ImportOpenFace(
                    extractor_pb2.ImportOpenFaceRequest(csv=ref), timeout=settings.rpc_timeout_s
                )
                notes, faces = list(res.notes), res.faces
            else:
                ref = upload(store, src, "inputs")
                res = stream(
                    stub.Extract(
                        extractor_pb2.ExtractRequest(video=ref, options=_extract_options(args)),
                        timeout=settings.rpc_timeout_s,
                    ),
                    ProgressBar(),
                )
                notes, faces = list(res.notes), res.faces
                v = res.video
                say(
                    f"{v.frames} frames, {v.width}x{v.height}, {v.duration_s:.1f} s"
                    f"{', variable frame rate' if v.variable_frame_rate else ''}"
                    f"{' (cached)' if res.cache_hit else f'; {res.seconds:.1f} s, {v.frames / max(res.seconds, 1e-9):.0f} fps'}"
                    f"{f'; face front-end {res.frontend}' if res.frontend else ''}"
                )
        data = store.get_bytes(res.frames.key)
    if out.suffix.lower() == ".parquet" and tables.is_parquet(data):
        # The service's Parquet as it is: no pandas round trip (importing
        # pandas alone is ~0.4 s of this command's run). The service's table
        # has a row per frame and face (a row per frame when no face is found).
        write_bytes(data, out)
        rows = res.rows if src.suffix.lower() == ".csv" else res.video.frames * max(1, len(faces))
    else:
        df, _ = tables.read_frames(data)
        write_table(df, out)
        rows = len(df)
    for f in faces:
        role = ROLE_NAME.get(f.role, "role unknown")
        seen = f", seen in {f.frames_seen}" if f.frames_seen > f.frames_tracked else ""
        say(
            f"face {f.face_id}: {role}, {f.frames_tracked} frames measured{seen}, "
            f"mean confidence {f.mean_confidence:.2f}"
        )
        if f.au_calibration:
            say(f"  AU12 scale: {f.au_calibration}")
    for n in notes:
        say(f"note: {n}")
    say(f"wrote {rows} rows to {out}")
    return 0


_face = face_choice


def cmd_smiles(settings: Settings, args) -> int:
    import pandas as pd

    src, out = Path(args.input), Path(args.out)
    face = _face(args.face)
    store = storage.open_store(settings)
    req = smiles_pb2.AnalyzeRequest(
        face=face,
        keep_speech=args.keep_speech,
        plot=args.plot is not None,
        params=smiles_pb2.SmileParams(au12_threshold=args.threshold or 0),
        reviewed=args.reviewed,
    )
    if src.suffix.lower() in TABLE_SUFFIXES:
        req.frames.CopyFrom(upload(store, src, "inputs"))
    else:
        req.video.CopyFrom(upload(store, src, "inputs"))
        req.extract.CopyFrom(_extract_options(args))
    with stack.ensure(settings, say) as st:
        with client.channel(st.addrs["smiles"], settings) as ch:
            res = stream(
                smiles_pb2_grpc.SmilesStub(ch).Analyze(req, timeout=settings.rpc_timeout_s), ProgressBar()
            )
    for n in res.notes:
        say(f"note: {n}")
    if res.face_id < 0:
        write_table(pd.DataFrame(columns=SHOW_COLUMNS), out)
        say(f"no faces, no smiles; wrote an empty table to {out}")
        return 0
    table = pd.read_csv(io.BytesIO(store.get_bytes(res.smiles.key)))
    write_table(table, out)
    if args.plot is not None and res.plot.key:
        store.get_file(res.plot.key, args.plot)
    kept = len(table)
    speech = (
        ""
        if not res.speech_checked
        else f", {res.smiles_dropped_speech} dropped for overlapping speech"
        if not args.keep_speech
        else f", {int(table['overlaps_speech'].sum()) if kept else 0} overlap speech (kept)"
    )
    source = f" (human review v{res.review_version})" if res.review_version else ""
    print(f"face {res.face_id}: {res.smiles_found} smiles found{source}{speech}")
    if kept:
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(table[[c for c in SHOW_COLUMNS if c in table.columns]].round(3).to_string(index=False))
    say(f"wrote {kept} smiles to {out}" + (f", plot to {args.plot}" if args.plot else ""))
    return 0


def cmd_dyad(settings: Settings, args) -> int:
    store = storage.open_store(settings)
    src = smiles_pb2.DyadSource(parent=upload(store, Path(args.video), "inputs"), offset_s=args.offset)
    if args.infant_video:
        src.infant.CopyFrom(upload(store, Path(args.infant_video), "inputs"))
    if args.parent_face is not None:
        src.parent_face_id = args.parent_face
    if args.infant_face is not None:
        src.infant_face_id = args.infant_face
    params = smiles_pb2.DyadParams(
        parent=smiles_pb2.SmileParams(
            au12_threshold=args.parent_threshold or 0, min_confidence=args.parent_min_confidence or 0
        ),
        infant=smiles_pb2.SmileParams(
            au12_threshold=args.infant_threshold or 0, min_confidence=args.infant_min_confidence or 0
        ),
        contingency_window_s=args.window,
        max_lag_s=args.max_lag,
        shifts=args.shifts,
        seed=args.seed,
    )
    with stack.ensure(settings, say) as st:
        with client.channel(st.addrs["smiles"], settings) as ch:
            res = stream(
                smiles_pb2_grpc.SmilesStub(ch).AnalyzeDyad(
                    smiles_pb2.DyadRequest(
                        source=src,
                        params=params,
                        extract=extractor_pb2.ExtractOptions(frontend=args.frontend),
                    ),
                    timeout=settings.rpc_timeout_s,
                ),
                ProgressBar(),
            )
    out = Path(args.out)
    _download_all(store, res.files, out)
    for n in res.notes:
        say(f"note: {n}")
    import csv

    with open(out / "dyad_summary.csv") as f:
        row = next(csv.DictReader(f))
    print(
        f"{res.joint_frames} frames with both faces; infant answers parent within the window: "
        f"{float(row['contingency_p2i_observed']):.2f} (p = {float(row['contingency_p2i_p']):.3f}); "
        f"peak lag {float(row['peak_lag_s']):+.2f} s (r = {float(row['peak_r']):.2f})"
    )
    say(f"wrote {len(res.files)} files to {out}; open {out / 'dyad.html'}")
    return 0


#: The extractor's face front-ends (services/extractor/frontends.py; the CLI
#: imports no service, so the names are repeated here and checked by a test).
FRONTEND_CHOICES = ["mesh", "dlib"]

CORRECTIONS = {
    "none": stats_pb2.CORRECTION_NONE,
    "holm": stats_pb2.CORRECTION_HOLM,
    "fdr_bh": stats_pb2.CORRECTION_FDR_BH,
}


def _download_all(store: storage.ObjectStore, files, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        store.get_file(f.ref.key, out / Path(f.name).name)


def cmd_stats(settings: Settings, args) -> int:
    store = storage.open_store(settings)
    out = Path(args.out)
    req = stats_pb2.CohortRequest(
        smiles=upload(store, Path(args.smiles), "inputs"),
        scores=upload(store, Path(args.scores), "inputs"),
        correction=CORRECTIONS[args.correction],
        mlp=stats_pb2.MlpOptions(skip=args.no_mlp, seeds=args.seeds, folds=args.folds),
    )
    with stack.ensure(settings, say) as st:
        with client.channel(st.addrs["stats"], settings) as ch:
            res = stream(
                stats_pb2_grpc.StatsStub(ch).AnalyzeCohort(req, timeout=settings.rpc_timeout_s), ProgressBar()
            )
    _download_all(store, res.files, out)
    for n in res.notes:
        say(f"note: {n}")
    say(f"{res.participants} participants, {res.sessions} sessions, {res.smiles} smiles; {res.seconds:.1f} s")
    say(f"wrote {len(res.files)} files to {out}; open {out / 'report.html'}")
    return 0


def cmd_simulate(settings: Settings, args) -> int:
    store = storage.open_store(settings)
    with stack.ensure(settings, say) as st:
        with client.channel(st.addrs["stats"], settings) as ch:
            res = stats_pb2_grpc.StatsStub(ch).Simulate(
                stats_pb2.SimulateRequest(
                    participants=args.participants, seed=args.seed, null_effects=args.null
                ),
                timeout=settings.rpc_timeout_s,
            )
    _download_all(store, res.files, Path(args.out))
    say(f"wrote {', '.join(f.name for f in res.files)} to {args.out}")
    return 0


class CohortProgress:
    """One bar over the cohort's video-seconds (ETA from it) with the sessions in
    flight and their stage; plain lines when stderr is not a terminal."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.running: dict[str, str] = {}
        self.bar = None
        self.n_done = self.total = 0
        self.t0 = 0.0

    def start(self, total: int, cached: int, video_s: float) -> None:
        import time

        self.t0, self.total, self.n_done = time.monotonic(), total, cached
        say(
            f"{total} sessions: {cached} already finished, {total - cached} to run "
            f"({video_s / 60:.1f} min of video)"
        )
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=round(video_s, 1),
                unit="video-s",
                file=sys.stderr,
                dynamic_ncols=True,
                desc=f"{cached}/{total} sessions",
            )

    def status(self, label: str, stage: str) -> None:
        if self.running.get(label) == stage:
            return
        self.running[label] = stage
        if self.bar is not None:
            self.bar.set_postfix_str("; ".join(f"{k} {v}" for k, v in self.running.items()))

    def finished(self, label: str, video_s: float, ok: bool, reason: str = "") -> None:
        import time

        self.running.pop(label, None)
        self.n_done += 1
        msg = f"{label}: {'done' if ok else 'FAILED: ' + reason}"
        if self.bar is not None:
            self.bar.update(round(video_s, 1))
            self.bar.set_description(f"{self.n_done}/{self.total} sessions")
            self.bar.write(f"dyadlab: {msg}", file=sys.stderr)
        else:
            say(f"[{self.n_done}/{self.total}, {time.monotonic() - self.t0:.0f} s] {msg}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, n = value.split("/")
        if i == "auto":  # a Kubernetes indexed Job gives each pod its index
            i = os.environ["JOB_COMPLETION_INDEX"]
        return int(i), int(n)
    except (ValueError, KeyError):
        raise CliError(
            f"--shard {value!r}: use I/N (e.g. 0/4), or auto/N inside an indexed Job (JOB_COMPLETION_INDEX)"
        ) from None


def cmd_cohort_run(settings: Settings, args) -> int:
    from dyadlab import cohort

    store = storage.open_store(settings)
    sessions = cohort.read_manifest(Path(args.manifest), store)
    scores_path = Path(args.scores) if args.scores else None
    if scores_path is not None and not scores_path.is_file():
        raise CliError(f"no such file: {scores_path}")
    if scores_path is None and not args.no_report:
        raise CliError("--scores is needed for the report (or give --no-report)")
    part = _shard(args.shard)
    if part is not None:
        sessions = cohort.shard(sessions, *part)
        say(f"shard {part[0]}/{part[1]}: {len(sessions)} sessions")
    opts = cohort.Options(keep_speech=args.keep_speech, max_faces=args.max_faces, frontend=args.frontend)
    say("checking and storing inputs")
    cohort.prepare(sessions, store, say)
    out = Path(args.out)
    with stack.ensure(settings, say) as st:
        outcome = cohort.run_sessions(
            sessions, opts, store, st.addrs, args.parallel, settings.rpc_timeout_s, CohortProgress()
        )
        say(
            f"{outcome.ran} sessions ran, {outcome.cached} were already finished, "
            f"{len(outcome.failed)} failed"
        )
        if outcome.failed:
            cohort.write_failures(outcome.failed, out)
            say(f"failures listed in {out / 'failures.csv'}")
        if not args.no_report:
            _report(settings, args, outcome.done, scores_path, out, st.addrs, opts, store)
    return 3 if outcome.failed else 0


def _report(settings, args, records, scores_path, out, addrs, opts, store) -> None:
    from dyadlab import cohort

    if args.reviewed:
        with client.channel(addrs["smiles"], settings) as ch:
            records = cohort.apply_reviews(records, ch, settings.rpc_timeout_s)
        n = sum(1 for r in records if r["review_version"])
        say(f"{n} of {len(records)} sessions use their latest human review; the others automatic smiles")
    stats_addr = addrs["stats"]
    bar = ProgressBar()
    try:
        res = cohort.build_report(
            records,
            scores_path,
            out,
            store,
            stats_addr,
            opts,
            settings.rpc_timeout_s,
            CORRECTIONS[args.correction],
            stats_pb2.MlpOptions(skip=args.no_mlp),
            on_progress=bar,
        )
    finally:
        bar.close()
    for n in res.notes:
        say(f"note: {n}")
    say(
        f"report: {out / 'report.html'} ({res.sessions} sessions, {res.smiles} smiles); "
        f"sessions.csv and the tables are beside it"
    )
    html = next((f.ref.key for f in res.files if f.name == "report.html"), "")
    say(f"in the object store: {html.rsplit('/', 1)[0]}/ (bucket {store.bucket})")


def cmd_cohort_report(settings: Settings, args) -> int:
    """The final step of a sharded run: the report from the records in the store."""
    from dyadlab import cohort

    store = storage.open_store(settings)
    sessions = cohort.read_manifest(Path(args.manifest), store)
    cohort.prepare(sessions, store, say)
    opts = cohort.Options(keep_speech=args.keep_speech, max_faces=args.max_faces, frontend=args.frontend)
    records, missing = [], []
    for s in sessions:
        key = cohort.record_key(s, opts)
        if store.exists(key):
            import json

            records.append(json.loads(store.get_bytes(key)))
        else:
            missing.append(s)
    if missing:
        say(
            f"{len(missing)} sessions are not finished: "
            + ", ".join(f"row {s.row} ({s.label})" for s in missing[:10])
        )
        if not args.partial:
            raise CliError("run the missing shards first, or give --partial to report what is there")
    with stack.ensure(settings, say) as st:
        _report(settings, args, records, Path(args.scores), Path(args.out), st.addrs, opts, store)
    return 3 if missing else 0


# -- synth ---------------------------------------------------------------------------
@contextlib.contextmanager
def _synth(settings: Settings):
    """A Synth stub on a SERVING synth service: the running stack's (`dyadlab
    up`), the configured one, or an embedded stack with its own TorchServe
    for this command (its start takes a while: it says how long)."""
    with stack.ensure(settings, say, serving=("synth",)) as st:
        state = client.health_status(st.addrs["synth"], services.get("synth").grpc_name, settings=settings)
        if state != "SERVING":
            raise CliError(
                f"the synth service is {state}: it needs TorchServe serving a trained model"
                + "".join(f"; {n}" for n in st.notes)
                + " (train one with `dyadlab synth train ... --export PATH`)"
            )
        with client.channel(st.addrs["synth"], settings) as ch:
            yield synth_pb2_grpc.SynthStub(ch)


def _face_image(store: storage.ObjectStore, path: str) -> synth_pb2.FaceImage:
    return synth_pb2.FaceImage(ref=upload(store, Path(path), "inputs"))


def _check_out(out: Path, suffixes: tuple[str, ...]) -> None:
    if out.suffix.lower() not in suffixes:
        raise CliError(f"--out {out}: the file name must end in {' or '.join(suffixes)}")


def cmd_synth_transform(settings: Settings, args) -> int:
    import json

    out = Path(args.out)
    _check_out(out, (".png",))
    store = storage.open_store(settings)
    req = synth_pb2.TransformRequest(
        image=_face_image(store, args.face),
        target=synth_pb2.VA(valence=args.valence, arousal=args.arousal),
        model=args.model or "",
        output_size=args.size,
        face_only=args.face_only or bool(args.size),
    )
    with _synth(settings) as stub:
        res = stub.Transform(req, timeout=settings.rpc_timeout_s)
    write_bytes(store.get_bytes(res.image.key), out)
    if args.mask:
        write_bytes(store.get_bytes(res.mask.key), Path(args.mask))
    if args.landmarks:
        lm = list(res.landmarks)
        write_bytes(json.dumps({"x": lm[:68], "y": lm[68:]}).encode(), Path(args.landmarks))
    for n in res.notes:
        say(f"note: {n}")
    ji, jo = res.judged_input, res.judged_output
    print(
        f"target VA ({args.valence:+.2f}, {args.arousal:+.2f}); judged: input "
        f"({ji.valence:+.2f}, {ji.arousal:+.2f}), output ({jo.valence:+.2f}, {jo.arousal:+.2f})"
    )
    say(f"wrote {', '.join(str(p) for p in (out, args.landmarks, args.mask) if p)}")
    return 0


def cmd_synth_matrix(settings: Settings, args) -> int:
    out = Path(args.out)
    _check_out(out, (".png",))
    store = storage.open_store(settings)
    req = synth_pb2.MatrixRequest(
        image=_face_image(store, args.face),
        valences=args.valences or [],
        arousals=args.arousals or [],
        model=args.model or "",
        cell_size=args.cell,
    )
    with _synth(settings) as stub:
        res = stub.Matrix(req, timeout=settings.rpc_timeout_s)
    write_bytes(store.get_bytes(res.image.key), out)
    for n in res.notes:
        say(f"note: {n}")
    err = [
        ((c.judged.valence - c.target.valence) ** 2 + (c.judged.arousal - c.target.arousal) ** 2) ** 0.5
        for c in res.cells
    ]
    say(
        f"wrote {out}: {len(res.cells)} faces; judge's mean VA distance from the targets "
        f"{sum(err) / max(1, len(err)):.2f}"
    )
    return 0


def cmd_synth_transfer(settings: Settings, args) -> int:
    out = Path(args.out)
    _check_out(out, (".mp4",))
    store = storage.open_store(settings)
    req = synth_pb2.TransferRequest(
        video=upload(store, Path(args.video), "inputs"),
        parent_face=_face_image(store, args.parent),
        infant_face=_face_image(store, args.infant),
        seed=args.seed,
        no_motion=args.no_motion,
        model=args.model or "",
        panel_height=args.height,
        min_confidence=args.min_confidence or 0,
    )
    if args.smooth is not None:
        req.smooth_s = args.smooth
    if args.adult_face is not None:
        req.extract.adult_face_id = args.adult_face
    with _synth(settings) as stub:
        res = stream(stub.Transfer(req, timeout=settings.rpc_timeout_s), ProgressBar())
    store.get_file(res.video.key, out)
    if args.va_table:
        store.get_file(res.va_table.key, args.va_table)
    for n in res.notes:
        say(f"note: {n}")
    say(
        f"wrote {out}: {res.frames} frames at {res.fps:.2f} fps (the input's timing); "
        f"real parent judged in {res.parent_frames_seen}, infant in {res.infant_frames_seen} frames; "
        f"{res.seconds:.1f} s ({res.frames / max(res.seconds, 1e-9):.1f} frames/s)"
    )
    return 0


def cmd_synth_train(settings: Settings, args) -> int:
    """`python -m services.synth.train ARGS` with this command's settings (a batch job)."""
    import subprocess

    env = dict(os.environ)
    env.update(settings.to_env())
    cmd = [sys.executable, "-m", "services.synth.train", *args.train_args]
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyadlab", description="Parent-infant smile analysis from video.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the local stack in the background")
    up.add_argument("--no-metrics", action="store_true", help="no Prometheus endpoints")
    sub.add_parser("down", help="stop the local stack")
    sub.add_parser("status", help="health of every service")

    def frontend_opt(sp):
        sp.add_argument(
            "--frontend",
            choices=FRONTEND_CHOICES,
            default="",
            help="face front-end: mesh (default; BlazeFace + face mesh, multi-view) or "
            "dlib (frontal only, for comparison)",
        )

    def extract_opts(sp):
        frontend_opt(sp)
        sp.add_argument("--max-faces", type=int, default=0, help="faces to track (default 2)")
        sp.add_argument("--no-speech", action="store_true", help="skip voice activity detection")
        sp.add_argument(
            "--adult-face",
            type=int,
            default=None,
            metavar="ID",
            help="face_id that is the adult (overrides the size heuristic)",
        )

    ex = sub.add_parser("extract", help="per-frame landmarks, AUs, pose (OpenFace columns)")
    ex.add_argument("input", help="a video, or an OpenFace 2.x CSV to import")
    ex.add_argument("--out", required=True, help="frames.csv or frames.parquet")
    extract_opts(ex)
    sm = sub.add_parser("smiles", help="segment one face's smiles")
    sm.add_argument("input", help="a video, or a frame table (.csv/.parquet)")
    sm.add_argument("--out", required=True, help="smiles.csv or smiles.parquet")
    sm.add_argument("--plot", default=None, help="write a PNG of AU12 and r with the phases")
    sm.add_argument(
        "--keep-speech",
        action="store_true",
        help="keep smiles that overlap speech (flagged in overlaps_speech)",
    )
    sm.add_argument("--face", default=None, help="adult, infant or a face_id (default: the adult)")
    sm.add_argument("--threshold", type=float, default=None, help="AU12 threshold (default 1.5)")
    sm.add_argument(
        "--reviewed",
        action="store_true",
        help="the face's latest human review (dyadlab review) when there is one",
    )
    extract_opts(sm)
    dy = sub.add_parser("dyad", help="parent and infant: contingency, synchrony, shared smiles")
    dy.add_argument("video", help="one video with both faces, or the parent's video")
    dy.add_argument("infant_video", nargs="?", default=None, help="the infant's own video")
    dy.add_argument(
        "--offset",
        type=float,
        default=0.0,
        help="seconds to add to the infant video's clock to reach the parent's",
    )
    dy.add_argument("--out", required=True, help="output directory")
    dy.add_argument("--parent-face", type=int, default=None, metavar="ID")
    dy.add_argument("--infant-face", type=int, default=None, metavar="ID")
    dy.add_argument("--parent-threshold", type=float, default=None, help="AU12 (default 1.5)")
    dy.add_argument("--infant-threshold", type=float, default=None, help="AU12 (default 1.5)")
    dy.add_argument("--parent-min-confidence", type=float, default=None, help="default 0.8")
    dy.add_argument("--infant-min-confidence", type=float, default=None, help="default 0.5")
    dy.add_argument("--window", type=float, default=0.0, help="contingency window W, s (default 2)")
    dy.add_argument("--max-lag", type=float, default=0.0, help="synchrony lags, s (default 3)")
    dy.add_argument("--shifts", type=int, default=0, help="null-model shifts (default 1000)")
    dy.add_argument("--seed", type=int, default=0)
    frontend_opt(dy)
    st = sub.add_parser("stats", help="relate smiles to questionnaires: Tables II-IV, Fig. 2, report")
    st.add_argument("smiles", help="long smile table (CSV/Parquet) with participant_id, visit_month")
    st.add_argument("--scores", required=True, help="questionnaire table (CSV/Parquet)")
    st.add_argument("--out", required=True, help="output directory")
    st.add_argument(
        "--correction",
        choices=list(CORRECTIONS),
        default="none",
        help="multiple-comparison control (default none, as the source study)",
    )
    st.add_argument("--no-mlp", action="store_true", help="skip Table II (the MLP grid)")
    st.add_argument("--seeds", type=int, default=0, help="MLP seeds (default 5)")
    st.add_argument("--folds", type=int, default=0, help="MLP cross-validation folds (default 5)")
    co = sub.add_parser("cohort", help="cohort tools")
    cosub = co.add_subparsers(dest="cohort_cmd", required=True)
    si = cosub.add_parser("simulate", help="a simulated cohort with planted effects")
    si.add_argument("--participants", type=int, default=94)
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--null", action="store_true", help="plant no effects")
    si.add_argument("--out", required=True, help="output directory")

    def cohort_opts(sp, report_only=False):
        sp.add_argument("manifest", help="CSV: participant_id, visit_month, video [, face, openface_csv]")
        sp.add_argument("--scores", required=report_only, help="questionnaire table (CSV/Parquet)")
        sp.add_argument("--out", required=True, help="report directory")
        sp.add_argument(
            "--keep-speech", action="store_true", help="keep smiles that overlap speech in the analysis"
        )
        sp.add_argument("--max-faces", type=int, default=0, help="faces to track (default 2)")
        frontend_opt(sp)
        sp.add_argument("--correction", choices=list(CORRECTIONS), default="none")
        sp.add_argument("--no-mlp", action="store_true", help="skip Table II")
        sp.add_argument(
            "--reviewed",
            action="store_true",
            help="use each session's latest human review (dyadlab review) where there is one; "
            "sessions.csv's review_version says which (0: automatic smiles)",
        )

    cr = cosub.add_parser("run", help="every session of a manifest, then the cohort report")
    cohort_opts(cr)
    cr.add_argument(
        "--parallel",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="sessions in flight (default: half the CPUs, at least 1). Each video is "
        "already split across the extractor's worker processes; on 2 cores one "
        "session in flight measured fastest (scripts/bench_cohort.py)",
    )
    cr.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only shard I of N (auto/N: the Kubernetes Job's index)",
    )
    cr.add_argument("--no-report", action="store_true", help="sessions only (a shard's job)")
    rp = cosub.add_parser("report", help="the report from finished sessions (after shards)")
    cohort_opts(rp, report_only=True)
    rp.add_argument("--partial", action="store_true", help="report even if sessions are missing")

    review_cli.add_parser(sub)
    sy = sub.add_parser("synth", help="avLandmarkGAN: expressions on novel faces (needs TorchServe)")
    sysub = sy.add_subparsers(dest="synth_cmd", required=True)
    tf = sysub.add_parser("transform", help="one face moved to a target valence/arousal")
    tf.add_argument("face", help="a photograph with one face (PNG, JPEG, ...)")
    tf.add_argument("--valence", type=float, required=True, help="target valence in [-1, 1]")
    tf.add_argument("--arousal", type=float, required=True, help="target arousal in [-1, 1]")
    tf.add_argument("--out", required=True, help="output PNG: the photo at its own size, the face changed")
    tf.add_argument(
        "--face-only", action="store_true", help="write the aligned face crop instead of the whole photo"
    )
    tf.add_argument(
        "--size",
        type=int,
        default=0,
        help="side of the face crop in pixels (implies --face-only; default: the model's)",
    )
    tf.add_argument(
        "--landmarks", default=None, help="also write the 68 target landmarks (JSON, output pixels)"
    )
    tf.add_argument("--mask", default=None, help="also write what the generator redrew (grey PNG, 255 = all)")
    tf.add_argument("--model", default=None, help="TorchServe model name (default synth)")
    mx = sysub.add_parser("matrix", help="an avImage matrix: one face over a valence x arousal grid")
    mx.add_argument("face", help="a photograph with one face")
    mx.add_argument("--out", required=True, help="output PNG")
    mx.add_argument(
        "--valences",
        nargs="+",
        type=float,
        default=None,
        metavar="V",
        help="columns (default: -1 -0.5 0 0.5 1)",
    )
    mx.add_argument(
        "--arousals",
        nargs="+",
        type=float,
        default=None,
        metavar="A",
        help="rows, shown high at the top (default: 1 0.5 0 -0.5 -1)",
    )
    mx.add_argument("--cell", type=int, default=0, help="pixels per cell (default 128)")
    mx.add_argument("--model", default=None)
    tr = sysub.add_parser("transfer", help="a real dyad's expressions on a novel parent and infant")
    tr.add_argument("video", help="a video with both the parent and the infant")
    tr.add_argument("--parent", required=True, help="photograph of the novel parent")
    tr.add_argument("--infant", required=True, help="photograph of the novel infant")
    tr.add_argument("--out", required=True, help="output MP4")
    tr.add_argument("--va-table", default=None, help="also write the per-frame VA table (CSV)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the rotation/resize motion")
    tr.add_argument("--no-motion", action="store_true", help="no rotation/resize post-processing")
    tr.add_argument(
        "--height",
        type=int,
        default=0,
        help="height of each photo's panel in pixels (default: the photos' own, at most 1080)",
    )
    tr.add_argument(
        "--smooth",
        type=float,
        default=None,
        help="seconds of moving average over the judged VA (default 0.3; 0 = none)",
    )
    tr.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="frames tracked below this keep the last VA (default 0.5)",
    )
    tr.add_argument(
        "--adult-face",
        type=int,
        default=None,
        metavar="ID",
        help="face_id that is the adult (overrides the extractor's heuristic)",
    )
    tr.add_argument("--model", default=None)
    tn = sysub.add_parser(
        "train", add_help=False, help="train a model (python -m services.synth.train; --help for its options)"
    )
    tn.add_argument("train_args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = review_cli.normalise_argv(argv)
    if argv[:2] == ["synth", "train"]:
        # Every argument (--help too) belongs to services.synth.train.
        args = argparse.Namespace(cmd="synth", synth_cmd="train", train_args=argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        cmd = {
            "up": cmd_up,
            "down": cmd_down,
            "status": cmd_status,
            "extract": cmd_extract,
            "smiles": cmd_smiles,
            "stats": cmd_stats,
            "dyad": cmd_dyad,
            "cohort": lambda s, a: {
                "simulate": cmd_simulate,
                "run": cmd_cohort_run,
                "report": cmd_cohort_report,
            }[a.cohort_cmd](s, a),
            "review": review_cli.run,
            "synth": lambda s, a: {
                "transform": cmd_synth_transform,
                "matrix": cmd_synth_matrix,
                "transfer": cmd_synth_transfer,
                "train": cmd_synth_train,
            }[a.synth_cmd](s, a),
        }[args.cmd]
        return cmd(settings, args)
    except grpc.RpcError as e:
        say(f"error: {e.code().name}: {e.details()}")
        return 2
    except (CliError, ConfigError, storage.StoreError, ft.TableError) as e:
        say(f"error: {e}")
        return 2
    except (TimeoutError, RuntimeError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`dyadlab status | grep -q ...`): stop quietly,
        # as Unix tools do; point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
