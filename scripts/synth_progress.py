"""A training run's progress in a minute: judged VA RMSE and the redrawn share
of a snapshot (or model file) on 48 validation faces moved to happy, sad and
surprise -- the numbers of the model card's trial table.

    DYADLAB_HOME=... .venv/bin/python scripts/synth_progress.py RUN@STEP \\
        [--faces synth/faces/<key>-128px.npz] [--set paste_colour=residual] [--n 48]
    .venv/bin/python scripts/synth_progress.py models/synth/MODEL.pt --faces ...

The faces are the validation split of the prepared faces in the object store
(`--faces`, default: the one prepared set at the model's size), resized
when their side differs from the model's; the same 48 (seeded) every time, so
rows of different steps and runs compare. The redrawn share is mean(1 - A)
over the crop (the learned mask; "-" without one); the blend is what the
model pastes (mask times the expression regions). Prints one line per target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyadlab.config import Settings  # noqa: E402
from dyadlab.storage import open_store  # noqa: E402
from services.synth import data as D  # noqa: E402
from services.synth import train as T  # noqa: E402
from services.synth.generate import Synthesizer  # noqa: E402

TARGETS = ("happy", "sad", "surprise")


def faces_key(store, size: int) -> str:
    """The one prepared face set of this side in the store (else say what to pass)."""
    keys = sorted(k for k in store.list("synth/faces/") if k.endswith(f"-{size}px.npz"))
    if len(keys) != 1:
        raise SystemExit(
            f"{len(keys)} prepared {size} px face sets under synth/faces/: name one with --faces"
            + (f" ({', '.join(keys)})" if keys else " (python -m services.synth.train prepares them)")
        )
    return keys[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="RUN@STEP (a snapshot in the store) or a model file")
    ap.add_argument("--faces", help="store key of the prepared faces")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="generate.SERVING settings"
    )
    ap.add_argument("--n", type=int, default=48, help="validation faces")
    a = ap.parse_args(argv)
    store = open_store(Settings.from_env())
    syn = Synthesizer.load(T.model_bytes(store, a.source), **dict(kv.split("=", 1) for kv in a.set))
    faces = D.FaceSet.from_bytes(store.get_bytes(a.faces or faces_key(store, syn.size))).split(val=True)
    if faces.size != syn.size:
        faces = faces.resized(syn.size)
    idx = np.random.default_rng(0).choice(len(faces.va), min(a.n, len(faces.va)), replace=False)
    x, pts = faces.images[idx], faces.landmarks[idx]
    before = syn.judge(x)
    for t in TARGETS:
        va = np.tile(np.asarray(D.TABLE_II[t], np.float32), (len(idx), 1))
        g = syn.generate(x, pts, va)
        after = syn.judge(g.images)
        redrawn = "-" if g.attention is None else f"{float((1 - g.attention).mean()):.3f}"
        print(
            f"{t:9s} VA RMSE {np.sqrt(((after - va) ** 2).mean()):.3f} "
            f"(no change {np.sqrt(((before - va) ** 2).mean()):.3f})  "
            f"redrawn {redrawn}  pasted {float(g.mask.mean()):.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
