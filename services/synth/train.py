"""`python -m services.synth.train`: prepare faces, train the three stages, export.

    python -m services.synth.train --images DIR --labels legend.csv --run r64 \\
        [--size 64] [--steps-landmark N] [--steps-image N] [--steps-judge N] \\
        [--seed 0] [--export models/synth/synth-128-mask.pt]

A batch job (CLI, Kubernetes Job), not an RPC. Everything it makes goes to the
object store configured by the DYADLAB_* environment (the embedded default is
a local directory): face crops under synth/faces/, checkpoints under
synth/runs/<run>/, the exported model under synth/models/<run>.pt. Running the
same command again resumes where the last run stopped (same --run); a
finished stage is skipped. Progress bars on a terminal, one line per
`log_every` steps otherwise.

The exported model file (``export``) is what serving loads: one
``torch.save`` dict of plain state dicts and the config, read back with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from typing import cast

import torch

from services.synth import data as D
from services.synth import solver as S

MODEL_FORMAT = 1


def load_base(cfg: S.Config) -> dict | None:
    """The exported model named by ``cfg.base_model`` (None when unset)."""
    if not cfg.base_model:
        return None
    return torch.load(cfg.base_model, weights_only=True, map_location="cpu")


def with_base(cfg: S.Config, base: dict | None) -> S.Config:
    """`cfg` with the landmark and judge settings of the base model it reuses."""
    if base is None:
        return cfg
    b = S.Config.from_dict(base["config"])
    return dataclasses.replace(
        cfg, lm_hidden=b.lm_hidden, lm_layers=b.lm_layers, judge_base=b.judge_base, judge_size=b.judged_size
    )


def trained_stages(cfg: S.Config) -> tuple[str, ...]:
    """The stages this run trains: all three, or only the image converter on a base model."""
    return ("image",) if cfg.base_model else S.STAGES


def export(store, run: str, cfg: S.Config, image_step: int | None = None) -> bytes:
    """The serving model: G_l, G_i and the judge of a finished run (float32);
    G_l and the judge from the base model when the run has one.
    `image_step`: G_i of that snapshot instead (ablations, progress checks)."""
    base = load_base(cfg)
    parts = {}
    for stage, net in (("landmark", "G"), ("image", "G"), ("judge", "J")):
        if base is not None and stage != "image":
            parts[stage] = base["G_l" if stage == "landmark" else "judge"]
            continue
        if stage == "image" and image_step is not None:
            parts[stage] = S.load_snapshot(store, run, stage, image_step)["nets"][net]
            continue
        ck = S.load_checkpoint(store, run, stage)
        if ck is None or int(ck["step"]) < cfg.steps(stage):
            raise RuntimeError(f"stage {stage!r} of run {run!r} is not finished")
        parts[stage] = ck["nets"][net]
    bio = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "config": cfg.to_dict(),
            "G_l": parts["landmark"],
            "G_i": parts["image"],
            "judge": parts["judge"],
        },
        bio,
    )
    return bio.getvalue()


def export_snapshot(store, run: str, step: int) -> bytes:
    """The model a run's image snapshot at `step` makes (`export` with that G_i;
    G_l and the judge from the run's base model, or its own finished stages)."""
    cfg = S.Config.from_dict(json.loads(store.get_bytes(f"synth/runs/{run}/config.json")))
    return export(store, run, with_base(cfg, load_base(cfg)), image_step=step)


def model_bytes(store, source: str) -> bytes:
    """A model by name: an exported model file's path, or "RUN@STEP", a run's
    snapshot in `store` (`export_snapshot`)."""
    from pathlib import Path

    if Path(source).is_file():
        return Path(source).read_bytes()
    run, sep, step = source.rpartition("@")
    if not sep or not step.isdigit():
        raise FileNotFoundError(f"{source!r} is neither a model file nor RUN@STEP")
    return export_snapshot(store, run, int(step))


def _flag(text: str) -> bool:
    """A boolean option's value: 1/true/yes or 0/false/no."""
    t = text.strip().lower()
    if t in ("1", "true", "yes"):
        return True
    if t in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class Progress:
    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, step: int, total: int, row: dict) -> None:
        brief = " ".join(f"{k}={row[k]:.3f}" for k in ("D", "G", "J") if k in row)
        if self.tty:
            from tqdm import tqdm

            if stage != self.stage:
                self.close()
                self.stage = stage
                self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True)
            self.bar.n = step
            self.bar.set_postfix_str(brief)
            self.bar.refresh()
        else:
            print(
                f"synth train: {stage} {step}/{total} {brief} ({row['s_per_step']:.3f} s/step)",
                file=sys.stderr,
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dyadlab synth train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="directory of face images")
    ap.add_argument(
        "--labels",
        required=True,
        help="legend CSV (image, emotion) or AffectNet-style CSV (image, valence, arousal)",
    )
    ap.add_argument("--run", default="default", help="run name: checkpoints resume under it")
    ap.add_argument("--export", help="also write the exported model to this file")
    ap.add_argument("--stages", default=",".join(S.STAGES), help="comma-separated subset of stages")
    ap.add_argument("--workers", type=int, default=2, help="face-detection processes")
    ap.add_argument(
        "--landmark-from",
        metavar="RUN",
        help="image stage: use this run's landmark converter (ablations share one G_l)",
    )
    ap.add_argument(
        "--stop-after", type=int, metavar="STEP", help="stop each stage at this step (resumable; ablations)"
    )
    ap.add_argument(
        "--export-snapshot",
        type=int,
        metavar="STEP",
        help="export the image converter's snapshot at this step (to synth/models/<run>@<STEP>.pt and --export)",
    )
    for f in dataclasses.fields(S.Config):
        kind = _flag if isinstance(f.default, bool) else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    a = ap.parse_args(argv)

    from dyadlab.config import Settings
    from dyadlab.storage import open_store

    store = open_store(Settings.from_env())
    overrides = {
        f.name: getattr(a, f.name) for f in dataclasses.fields(S.Config) if getattr(a, f.name) is not None
    }
    cfg_key = f"synth/runs/{a.run}/config.json"
    if store.exists(cfg_key):
        cfg = S.Config.from_dict({**json.loads(store.get_bytes(cfg_key)), **overrides})
    else:
        cfg = S.Config(**overrides)
    base = load_base(cfg)
    cfg = with_base(cfg, base)
    store.put_bytes(cfg_key, json.dumps(cfg.to_dict(), indent=1).encode())
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    last = [0.0]

    def prep_progress(done, total):
        if time.time() - last[0] > 5 or done == total:
            last[0] = time.time()
            print(f"synth train: faces {done}/{total}", file=sys.stderr, flush=True)

    fs = D.load(a.images, a.labels, store, cfg.size, workers=a.workers, progress=prep_progress)
    train = fs.split(val=False)
    print(
        f"synth train: {len(train.va)} training / {int(fs.val.sum())} validation faces "
        f"({fs.meta['no_face']} images without a face), {time.time() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    bar = Progress()
    stages = [s for s in a.stages.split(",") if s and s in trained_stages(cfg)]
    G_l = None
    for stage in S.STAGES:
        if stage == "image" and stage in stages and base is not None:
            G_l = cast("S.LandmarkGenerator", S.build("landmark", cfg)["G"])
            G_l.load_state_dict(base["G_l"])
            G_l.eval()
        elif stage == "image" and stage in stages:
            ck = S.load_checkpoint(store, a.landmark_from or a.run, "landmark")
            if ck is None:
                raise SystemExit("the image stage needs a trained landmark stage in this run")
            G_l = cast(
                "S.LandmarkGenerator", S.nets_from_checkpoint("landmark", ck, cfg)["G"]
            )  # the landmark stage's G
        if stage in stages:
            S.train_stage(stage, train, store, a.run, cfg, G_l=G_l, stop_after=a.stop_after, progress=bar)
    bar.close()
    finished = all(
        (ck := S.load_checkpoint(store, a.run, s)) is not None and int(ck["step"]) >= cfg.steps(s)
        for s in trained_stages(cfg)
    )
    blob = None
    if a.export_snapshot is not None:
        blob, name = export_snapshot(store, a.run, a.export_snapshot), f"{a.run}@{a.export_snapshot}"
    elif finished:
        blob, name = export(store, a.run, cfg), a.run
    if blob is not None:
        store.put_bytes(f"synth/models/{name}.pt", blob)
        if a.export:
            from pathlib import Path

            Path(a.export).parent.mkdir(parents=True, exist_ok=True)
            Path(a.export).write_bytes(blob)
        print(
            f"synth train: exported synth/models/{name}.pt ({len(blob) / 1e6:.1f} MB) "
            f"after {time.time() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
