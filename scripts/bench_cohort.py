"""Cohort throughput: video-seconds processed per wall-second by `dyadlab cohort
run`, with 1, 2 and 4 sessions in flight, and with 1 and 2 extractor worker
processes, in one run on this machine.

    .venv/bin/python scripts/bench_cohort.py [--sessions 8] [--seconds 60]

Each session is a distinct ~1-minute video (real clips looped, lengths
differing by a second so every file has its own content hash: no cache hits).
Every configuration runs on a fresh stack (`dyadlab up`, fresh store) and
times the whole command, hashing and uploading included; the report step
(stats with the MLP grid) is timed once on its own. Prints numbers only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_extract import cli, loop_video, stack_env  # noqa: E402

PYFEAT = ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "noface_face.mov"]
SHARED = ["d19.mp4", "d13.mp4", "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4", "s29.mp4"]
TARGET_MIN, TARGET_WALL_MIN = 94 * 3, 60


def sources(media: Path, shared: Path) -> list[Path]:
    out = [media / n for n in PYFEAT if (media / n).is_file()]
    out += [shared / "videos" / n for n in SHARED if (shared / "videos" / n).is_file()]
    if not out:
        raise SystemExit(f"no clips in {media} (run `make media`)")
    return out


def duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return float(c.duration or 0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--configs",
        default="1x1,2x1,2x2,2x4",
        help="WORKERSxIN_FLIGHT: extractor worker processes x sessions in flight",
    )
    ap.add_argument("--media", default=os.environ.get("DYADLAB_MEDIA", ROOT / ".cache/media"))
    ap.add_argument("--shared", default=os.environ.get("DYADLAB_SHARED_DATA", ROOT.parent / "shared/data"))
    args = ap.parse_args()
    srcs = sources(Path(args.media), Path(args.shared))
    cache = ROOT / ".cache" / "bench" / "cohort"
    clips = [
        loop_video(srcs[i % len(srcs)], cache / f"s{i:02d}-{srcs[i % len(srcs)].stem}.mp4", args.seconds + i)
        for i in range(args.sessions)
    ]
    total_s = sum(duration(c) for c in clips)
    work = Path(tempfile.mkdtemp(prefix="dyadlab-bench-cohort-"))
    manifest = work / "manifest.csv"
    manifest.write_text(
        "participant_id,visit_month,video\n"
        + "".join(f"B{i // 2 + 1:03d},{(6, 12)[i % 2]},{c}\n" for i, c in enumerate(clips))
    )
    sys.path.insert(0, str(ROOT))
    from services.stats import simulate

    sc = simulate.simulate((len(clips) + 1) // 2, 1).scores
    sc["participant_id"] = sc["participant_id"].str.replace("P", "B", regex=False)
    sc.to_csv(work / "scores.csv", index=False)
    print(
        f"{len(clips)} sessions, {total_s / 60:.1f} min of video ({total_s / len(clips):.0f} s each, "
        f"from {len(srcs)} real clips), {os.cpu_count()} CPUs"
    )
    rows = []
    report_s = None
    for workers, par in (tuple(map(int, c.split("x"))) for c in args.configs.split(",")):
        env = stack_env()
        env["DYADLAB_WORKERS"] = str(workers)
        try:
            cli(env, "up", "--no-metrics")
            wall, err = cli(
                env,
                "cohort",
                "run",
                str(manifest),
                "--out",
                str(work / f"p{par}"),
                "--no-report",
                "--parallel",
                str(par),
            )
            assert f"{len(clips)} sessions ran" in err, err
            rows.append((workers, par, wall, total_s / wall))
            print(
                f"  {workers} workers, {par} in flight: {wall:6.1f} s  {total_s / wall:5.2f}x real time",
                flush=True,
            )
            if report_s is None:
                report_s, _ = cli(
                    env,
                    "cohort",
                    "report",
                    str(manifest),
                    "--scores",
                    str(work / "scores.csv"),
                    "--out",
                    str(work / "report"),
                )
        finally:
            cli(env, "down", check=False)
            shutil.rmtree(env["DYADLAB_HOME"], ignore_errors=True)
    best = max(rows, key=lambda r: r[3])
    x = {(w, p): r for w, p, _, r in rows}
    print()
    print(f"{'worker processes':>16s} {'in flight':>9s} {'wall s':>8s} {'x real time':>12s}")
    for w, par, wall, r in rows:
        print(f"{w:>16d} {par:>9d} {wall:8.1f} {r:12.2f}")
    if (1, 1) in x and (2, 1) in x:
        print(f"scaling 1 -> 2 worker processes: {x[2, 1] / x[1, 1]:.2f}x")
    if (2, 1) in x and (2, 2) in x:
        print(f"scaling 1 -> 2 sessions in flight (2 workers): {x[2, 2] / x[2, 1]:.2f}x")
    print(f"report step (stats incl. the MLP grid): {report_s:.1f} s")
    need = TARGET_MIN / TARGET_WALL_MIN
    proj = TARGET_MIN * 60 / best[3] / 60 + report_s / 60
    print(
        f"projection for the seed cohort (94 x 3 min = {TARGET_MIN} min of video) with "
        f"{best[0]} workers, {best[1]} in flight: {proj:.0f} min wall; target < {TARGET_WALL_MIN} "
        f"min (>= {need:.1f}x real time): {'PASS' if best[3] >= need else 'FAIL'}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
