"""`dyadlab review`: look at the smiles against the video, correct them, and
measure agreement.

    dyadlab review VIDEO [--face adult|infant|ID] [--keep-speech] [--port N] [--no-browser]
    dyadlab review export VIDEO [--face ...] [--keep-speech] --eaf OUT.eaf
    dyadlab review import EDITED.eaf --video VIDEO [--tier NAME] [--face ...] --out smiles.csv
    dyadlab review agree A B [--out agreement.csv] [--min-iou 0.3] [--rate 30]

The page and the ELAN files work on the latest human review of a face when
there is one, else on its automatic smiles. Saving (the page's S, or
`import`) goes through the smiles service (Smiles.SaveReview), which measures
the corrected smiles again with the automatic smiles' code and stores a new
version; the reviewer is the identity of the token the command uses.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dyadlab import client, stack, storage, tables
from dyadlab import frames as ft
from dyadlab.cliutil import CliError, ProgressBar, face_choice, say, stream, upload, write_table
from dyadlab.config import Settings
from dyadlab.messages import ROLE_NAME
from dyadlab.review.backend import ROLE_LABEL, Face, ServiceBackend
from dyadlab.v1 import extractor_pb2, extractor_pb2_grpc, smiles_pb2_grpc

SUBCOMMANDS = ("page", "export", "import", "agree")
#: `import` statuses -> what the review says of each smile
IMPORT_STATUS = {"kept": "accepted", "moved": "edited", "added": "added"}


def add_parser(sub) -> None:
    rv = sub.add_parser("review", help="review and correct the smiles; ELAN round trips; agreement")
    rs = rv.add_subparsers(dest="review_cmd", required=True)
    pg = rs.add_parser("page", help="(the default) a page that plays the video against its smiles")
    pg.add_argument("video")
    _face_opts(pg)
    pg.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    pg.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    ex = rs.add_parser("export", help="write an ELAN file (.eaf) with the smiles, phases, speech, AU12")
    ex.add_argument("video")
    _face_opts(ex)
    ex.add_argument("--eaf", required=True, help="OUT.eaf (the AU12 trace goes next to it)")
    im = rs.add_parser("import", help="a coder's edited .eaf -> a reviewed smile table")
    im.add_argument("eaf")
    im.add_argument("--video", required=True, help="the video the .eaf was exported from")
    im.add_argument("--tier", default=None, help="the coder's tier (default: the smiles tier)")
    _face_opts(im)
    im.add_argument("--out", required=True, help="smiles.csv or smiles.parquet")
    ag = rs.add_parser("agree", help="agreement between two codings (.eaf files or smile tables)")
    ag.add_argument("a", help="the reference coding")
    ag.add_argument("b", help="the coding compared with it")
    ag.add_argument("--tier-a", default=None, help="tier of A when it is an .eaf")
    ag.add_argument("--tier-b", default=None, help="tier of B when it is an .eaf")
    ag.add_argument("--min-iou", type=float, default=0.3, help="overlap rule: events match at IoU >= this")
    ag.add_argument("--rate", type=float, default=30.0, help="frame grid for Cohen's kappa (Hz)")
    ag.add_argument("--out", default=None, help="agreement.csv (+ its _matches.csv)")


def _face_opts(p) -> None:
    p.add_argument(
        "--face", default=None, help="adult, infant or a face_id (default: every face with a role)"
    )
    p.add_argument("--keep-speech", action="store_true", help="keep smiles that overlap speech")


def normalise_argv(argv: list[str]) -> list[str]:
    """`dyadlab review VIDEO ...` is `dyadlab review page VIDEO ...`."""
    if argv[:1] == ["review"] and len(argv) > 1 and argv[1] not in (*SUBCOMMANDS, "-h", "--help"):
        return ["review", "page", *argv[1:]]
    return argv


def run(settings: Settings, args) -> int:
    return {"page": cmd_page, "export": cmd_export, "import": cmd_import, "agree": cmd_agree}[
        args.review_cmd
    ](settings, args)


# -- the analysis the review starts from -----------------------------------------------------
def _analyse(settings: Settings, st, store, video: Path, face_arg: str | None, one_face: bool):
    """Extract (cached by content) -> (frames ref, speech ref, faces to review)."""
    with client.channel(st.addrs["extractor"], settings) as ch:
        res = stream(
            extractor_pb2_grpc.ExtractorStub(ch).Extract(
                extractor_pb2.ExtractRequest(video=upload(store, video, "inputs")),
                timeout=settings.rpc_timeout_s,
            ),
            ProgressBar(),
        )
    found = [(f.face_id, ROLE_NAME.get(f.role, ""), f.frames_tracked) for f in res.faces]
    if not found:
        raise CliError("no face was found in the video: nothing to review")
    sel = face_choice(face_arg)
    which = sel.WhichOneof("select")
    if which == "face_id":
        chosen = [f for f in found if f[0] == sel.face_id]
    elif which == "role":
        chosen = [f for f in found if f[1] == ROLE_NAME[sel.role]]
    else:
        chosen = [f for f in found if f[1]] or [max(found, key=lambda f: f[2])]
        chosen.sort(key=lambda f: f[1] != "adult")  # the parent first
        if one_face:
            chosen = chosen[:1]
    if not chosen:
        raise CliError(f"--face {face_arg}: no such face; faces: " + ", ".join(_face_words(f) for f in found))
    faces = [
        Face(
            fid,
            ROLE_LABEL.get(role, f"face {fid}"),
            ft.INFANT_MIN_CONFIDENCE if role == "infant" else ft.MIN_CONFIDENCE,
        )
        for fid, role, _ in chosen
    ]
    speech = res.speech if res.HasField("speech") and res.speech.key else None
    return res.frames, speech, faces


def _face_words(f) -> str:
    return f"{f[0]} ({f[1] or 'no role'}, {f[2]} frames)"


def _backend(settings, st, store, args, video: Path, one_face: bool, ch) -> ServiceBackend:
    frames_ref, speech_ref, faces = _analyse(settings, st, store, video, args.face, one_face)
    return ServiceBackend(
        video_path=video,
        store=store,
        stub=smiles_pb2_grpc.SmilesStub(ch),
        frames_ref=frames_ref,
        speech_ref=speech_ref,
        faces=faces,
        keep_speech=args.keep_speech,
        timeout_s=settings.rpc_timeout_s,
        video_type=_video_type(video),
    )


def _video_type(video: Path) -> str:
    return {".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska"}.get(
        video.suffix.lower(), "video/mp4"
    )


def _video(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such file: {p}")
    return p


# -- the page -----------------------------------------------------------------------------
def cmd_page(settings: Settings, args) -> int:
    from dyadlab.review import server

    video = _video(args.video)
    store = storage.open_store(settings)
    with stack.ensure(settings, say) as st, client.channel(st.addrs["smiles"], settings) as ch:
        backend = _backend(settings, st, store, args, video, False, ch)
        backend.session()  # the smiles exist before the page asks (errors here, not in the page)
        with server.serve(backend, port=args.port) as srv:
            say(f"reviewing {len(backend.faces)} face(s): " + ", ".join(f.label for f in backend.faces))
            say("open this address (Ctrl-C stops the review page):")
            print(srv.url, flush=True)
            if not args.no_browser:
                import webbrowser

                threading.Thread(target=webbrowser.open, args=(srv.url,), daemon=True).start()
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                say("review page stopped")
    return 0


# -- ELAN ---------------------------------------------------------------------------------
def cmd_export(settings: Settings, args) -> int:
    from dyadlab.review import eaf

    video, out = _video(args.video), Path(args.eaf)
    if out.suffix.lower() != ".eaf":
        raise CliError(f"--eaf {out}: the file name must end in .eaf")
    store = storage.open_store(settings)
    with stack.ensure(settings, say) as st, client.channel(st.addrs["smiles"], settings) as ch:
        backend = _backend(settings, st, store, args, video, True, ch)
        face = backend.faces[0]
        table, review = backend.smiles(face)
        df = backend.frames()
        trace = df[df["face_id"] == face.face_id].sort_values("timestamp")
        out.parent.mkdir(parents=True, exist_ok=True)
        written = eaf.export_eaf(
            out,
            media=video.resolve(),
            smiles=table,
            speech=backend.speech() if backend.speech_ref is not None else None,
            trace=trace,
            face_label=face.label,
        )
    what = f"review v{review['version']}" if review else "automatic smiles"
    say(
        f"wrote {out}: face {face.face_id} ({face.label}), {len(table)} smiles ({what}); "
        + ", ".join(p.name for p in written[1:])
    )
    return 0


def cmd_import(settings: Settings, args) -> int:
    from dyadlab.review import eaf

    video, out = _video(args.video), Path(args.out)
    try:
        coded = eaf.read_eaf(args.eaf, args.tier)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    store = storage.open_store(settings)
    with stack.ensure(settings, say) as st, client.channel(st.addrs["smiles"], settings) as ch:
        backend = _backend(settings, st, store, args, video, True, ch)
        face = backend.faces[0]
        original, _ = backend.smiles(face)
        try:
            changes = eaf.edited_smiles(original, coded)
        except ValueError as e:
            raise CliError(str(e)) from None
        kept = [
            {
                **row,
                "status": IMPORT_STATUS[row["status"]],
                "smile_id": None if row["status"] == "added" else row["smile_id"],
            }
            for row in changes.to_dict("records")
            if row["status"] != "removed"
        ]
        res = backend.save_face(face, kept)
        for n in res.notes:
            say(f"note: {n}")
        table = tables.read_any(store.get_bytes(res.smiles.key), "review table")
    write_table(table, out)
    counts = changes["status"].value_counts().to_dict()
    say(
        f"review v{res.version} saved ({res.reviewer}): "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("kept", "moved", "added", "removed"))
        + f"; wrote {len(table)} smiles to {out}"
    )
    return 0


# -- agreement ----------------------------------------------------------------------------
def _coding(path: str, tier: str | None):
    from dyadlab.review import eaf

    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such file: {p}")
    try:
        if p.suffix.lower() == ".eaf":
            return eaf.read_eaf(p, tier)
        return tables.read_any(p.read_bytes(), p.name)
    except (ValueError, ft.TableError) as e:
        raise CliError(f"{p.name}: {e}") from None


def cmd_agree(settings: Settings, args) -> int:
    from dyadlab.review import agreement

    a, b = _coding(args.a, args.tier_a), _coding(args.b, args.tier_b)
    try:
        if "face_id" in a.columns and "face_id" in b.columns:
            per_face = agreement.agree_by_face(a, b, min_iou=args.min_iou, rate_hz=args.rate)
        else:
            per_face = {None: agreement.agree(a, b, min_iou=args.min_iou, rate_hz=args.rate)}
    except ValueError as e:
        raise CliError(str(e)) from None
    import pandas as pd

    rows, matches = [], []
    for fid, ag in per_face.items():
        print((f"face {fid}: " if fid is not None else "") + ag.summary())
        rows.append(ag.to_frame().assign(face_id=fid))
        matches.append(ag.matches_frame().assign(face_id=fid))
    if args.out:
        out = Path(args.out)
        write_table(pd.concat(rows, ignore_index=True), out)
        mpath = out.with_name(f"{out.stem}_matches{out.suffix}")
        write_table(pd.concat(matches, ignore_index=True), mpath)
        say(f"wrote {out} and {mpath.name}")
    return 0
