"""Face front-ends side by side on real parent-infant clips: for each face,
frames found (tracked at all), measured (landmarks, success = 1) and
measurable (success and confidence at least the dyad default: 0.8 for the
parent, the paper's threshold; 0.5 for the infant), and the dyad's jointly
valid time (what `dyadlab dyad` needs: at least 2 s).

    .venv/bin/python scripts/compare_frontends.py [VIDEO ...]
        (default: the three 2UWdXP clips in ../shared/data/videos)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "videos"
CLIPS = [
    "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4",
    "2UWdXP.joke2.rep3.take1.NomNomNom_h265.mp4",
    "2UWdXP.joke4.rep3.take1.TearingPaper_h265.mp4",
]
MIN_CONF = {"adult": 0.8, "infant": 0.5}


def measure(path: str, frontend: str, pool, workers: int) -> dict:
    from dyadlab.frames import TableError
    from services.extractor import pipeline
    from services.smiles import dyad

    ex = pipeline.extract(path, pipeline.Options(frontend=frontend), pool, workers=workers)
    df = ex.table
    out = {"frames": ex.index.n_frames, "fps": ex.index.n_frames / ex.seconds}
    for f in ex.faces:
        sub = df[df.face_id == f["face_id"]]
        role = f["role"] or "other"
        if role in out:
            continue
        conf = MIN_CONF.get(role, 0.8)
        out[role] = (
            f.get("frames_seen", f["frames_tracked"]),
            f["frames_tracked"],
            int(((sub.success == 1) & (sub.confidence >= conf)).sum()),
        )
    try:
        p, i = dyad.split_faces(df)
        al = dyad.align(
            p,
            i,
            parent_min_confidence=MIN_CONF["adult"],
            infant_min_confidence=MIN_CONF["infant"],
            min_joint_s=0.0,
        )
        out["joint_s"] = al.n_joint / al.rate
    except (TableError, dyad.DyadError) as e:
        out["joint_s"] = 0.0
        out["why"] = str(e)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("videos", nargs="*")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    from services.extractor import chunks

    videos = a.videos or [str(SHARED / c) for c in CLIPS if (SHARED / c).exists()]
    if not videos:
        raise SystemExit(f"no videos given and none in {SHARED}")
    pool = chunks.worker_pool(a.workers)
    list(pool.map(chunks.warm_up, range(a.workers)))
    print(
        f"{'clip':14s} {'front-end':9s} {'frames':>6s} {'parent found/measured/measurable':>33s} "
        f"{'infant found/measured/measurable':>33s} {'joint s':>7s}"
    )
    try:
        for v in videos:
            for fe in ("mesh", "dlib"):
                r = measure(v, fe, pool, a.workers)
                fmt = lambda t: "/".join(map(str, t)) if t else "-"  # noqa: E731
                name = Path(v).name.split(".")[1] if Path(v).name.startswith("2UWdXP") else Path(v).stem
                print(
                    f"{name[:14]:14s} {fe:9s} {r['frames']:6d} {fmt(r.get('adult')):>33s} "
                    f"{fmt(r.get('infant')):>33s} {r['joint_s']:7.2f}",
                    flush=True,
                )
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
