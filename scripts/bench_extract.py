"""Extraction speed, measured end to end on this machine (`make bench`).

    .venv/bin/python scripts/bench_extract.py --clip VIDEO:SECONDS:REQUIRED:AIM [--clip ...]
        [--frontends mesh,dlib] [--repeat N] [--skip-cli]

For every clip, in one run, on the same machine:

1. the input: VIDEO looped (its packets remuxed with PyAV, no re-encoding,
   timestamps continued) to >= SECONDS, cached under .cache/bench/;
2. decode only: `dyadlab.video.frames` over every frame, one process, in
   colour (the mesh front-end's input) and grey (dlib's);
3. per face front-end, the pipeline in process: `services.extractor.pipeline.extract`
   on a warm spawn ProcessPoolExecutor (the algorithm without the services);
4. per front-end, the whole command: wall time of `dyadlab extract LONG.mp4
   --out X.parquet [--frontend F]` as a subprocess (with and without
   --no-speech) against a stack started by `dyadlab up` in a temporary
   DYADLAB_HOME; every timed run is a real extraction (its results are
   removed from the store before the next run, and the CLI must not report
   "(cached)");
5. peak memory (VmHWM) of every extractor worker process, in process and
   in the stack.

Measurements run in --repeat rounds of all of them in turn (a shared host's
speed drifts by tens of percent over minutes; rounds make every median
sample the same conditions). Prints the medians as fps, times real time and
ratios to decoding and to the other front-end, and the clip's REQUIRED and
AIM fps for the whole command with the default front-end. No assertions on
speed: this reports numbers.
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
if str(ROOT) not in sys.path:  # the editable install (or PYTHONPATH) comes first
    sys.path.append(str(ROOT))

from dyadlab import video  # noqa: E402
from dyadlab.services import SERVICES  # noqa: E402
from dyadlab.stack import free_port  # noqa: E402
from dyadlab.video import loop as loop_video  # noqa: E402


# -- 1. the input ----------------------------------------------------------------------
# -- 2. decoding -------------------------------------------------------------------------
def time_decode(path: str, idx: video.VideoIndex, color: bool) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in video.frames(path, idx, 0, idx.n_frames, color=color))
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


def time_pipeline(path: str, idx: video.VideoIndex, ex: cf.Executor, workers: int, frontend: str):
    from services.extractor import pipeline

    t0 = time.perf_counter()
    res = pipeline.extract(path, pipeline.Options(frontend=frontend), ex, index=idx, workers=workers)
    return time.perf_counter() - t0, res


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident memory."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pool_pids(ex: cf.ProcessPoolExecutor) -> list[int]:
    return sorted(getattr(ex, "_processes", {}) or {})


def stack_worker_pids(env: dict) -> list[int]:
    """The extractor service's worker processes (children of its process)."""
    import psutil

    port = env["DYADLAB_EXTRACTOR_ADDR"].rsplit(":", 1)[1]
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "services.extractor" in cmd and p.children():
            try:
                if any(c.laddr.port == int(port) for c in p.net_connections("tcp")):
                    return [c.pid for c in p.children()]
            except (psutil.Error, OSError):
                continue
    return []


# -- 4. the whole command --------------------------------------------------------------------
CLI_TIMEOUT_S = 600


def cli(env: dict, *args: str, check: bool = True) -> tuple[float, str]:
    """Wall time and stderr of one `dyadlab` command. A command that hangs
    (seen once: grpc's Channel.close() deadlocking in a health check, a
    client-library bug - grpc/grpc#20026) is killed after CLI_TIMEOUT_S, said,
    and run once more."""
    for attempt in (1, 2):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                [str(ROOT / ".venv/bin/dyadlab"), *args],
                env=env,
                cwd=env["DYADLAB_HOME"],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
            )
            break
        except subprocess.TimeoutExpired:
            print(
                f"dyadlab {args[0]} hung for {CLI_TIMEOUT_S} s and was killed "
                f"(attempt {attempt}); timing the command again",
                flush=True,
            )
            if attempt == 2:
                raise SystemExit(f"dyadlab {' '.join(args)} hung twice") from None
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
    env = dict(
        os.environ,
        DYADLAB_HOME=str(home),
        **{var: f"127.0.0.1:{free_port()}" for var in (s.addr_env for s in SERVICES)},
    )
    for k in ("DYADLAB_STORE_DIR", "DYADLAB_S3_ENDPOINT"):
        env.pop(k, None)
    return env


def cli_round(env: dict, path: str, res: dict, frontend: str) -> str:
    """One real extraction without speech, its cached re-run, one real one with speech."""
    home = Path(env["DYADLAB_HOME"])
    out = home / "frames.parquet"
    fe = ["--frontend", frontend]
    drop_results(home / "store")
    dt, err = cli(env, "extract", path, "--out", str(out), "--no-speech", *fe)
    if "(cached)" in err:
        raise SystemExit(f"a first run reported a cache hit:\n{err}")
    if "no running stack" in err:
        raise SystemExit("the CLI did not use the running stack")
    res["no_speech"].append(dt)
    res["svc_no_speech"].append(service_seconds(err))
    dt, err = cli(env, "extract", path, "--out", str(out), "--no-speech", *fe)
    if "(cached)" not in err:
        raise SystemExit(f"the re-run was not a cache hit:\n{err}")
    res["cached"].append(dt)
    drop_results(home / "store")
    dt, err = cli(env, "extract", path, "--out", str(out), *fe)
    if "(cached)" in err:
        raise SystemExit(f"a first run with speech reported a cache hit:\n{err}")
    res["speech"].append(dt)
    res["svc_speech"].append(service_seconds(err))
    return err


# -- 5. report -------------------------------------------------------------------------------
def bench_clip(spec: str, frontends: list[str], repeat: int, workers: int, pool, env) -> None:
    path, seconds, required, aim = (spec.split(":") + ["", "", ""])[:4]
    src = Path(path)
    if not src.is_file():
        print(f"\n== {src.name}: not found ({src}); skipped")
        return
    seconds = float(seconds or 60)
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]  # a changed source is re-looped
    long = loop_video(src, ROOT / ".cache/bench" / f"{src.stem}.{tag}.loop{int(seconds)}s.mp4", seconds)
    idx = video.probe(long)
    n, fps = idx.n_frames, idx.avg_fps
    print(
        f"\n== {src.name} looped: {n} frames, {idx.width}x{idx.height}, {idx.duration_s:.1f} s "
        f"at {fps:.2f} fps; {os.cpu_count()} CPUs, {workers} workers, load "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    dec = {"colour": [], "grey": []}
    pipe = {f: [] for f in frontends}
    cl = {
        f: {k: [] for k in ("no_speech", "svc_no_speech", "cached", "speech", "svc_speech")}
        for f in frontends
    }
    last = {}
    for r in range(repeat):
        dec["colour"].append(time_decode(str(long), idx, True))
        dec["grey"].append(time_decode(str(long), idx, False))
        line = f"round {r + 1}: decode {dec['colour'][-1]:.2f} s colour, {dec['grey'][-1]:.2f} s grey"
        for fe in frontends:
            dt, last[fe] = time_pipeline(str(long), idx, pool, workers, fe)
            pipe[fe].append(dt)
            line += f"; {fe}: pipeline {dt:.2f} s"
            if env is not None:
                cli_round(env, str(long), cl[fe], fe)
                line += f", CLI {cl[fe]['no_speech'][-1]:.2f} s, with speech {cl[fe]['speech'][-1]:.2f} s"
        print(line, flush=True)
    for fe in frontends:
        print(f"{fe}: faces {[(f['role'], f['frames_tracked']) for f in last[fe].faces]}")
    med = statistics.median
    dec_fps = n / med(dec["colour"])
    rows = [
        ("decode only, colour (1 process)", med(dec["colour"]), ""),
        ("decode only, grey (1 process)", med(dec["grey"]), ""),
    ]
    for fe in frontends:
        rows.append((f"pipeline.extract {fe} ({workers} workers, warm)", med(pipe[fe]), fe))
        if env is not None:
            rows += [
                (f"dyadlab extract --no-speech --frontend {fe}", med(cl[fe]["no_speech"]), fe),
                (f"dyadlab extract --frontend {fe} (with speech)", med(cl[fe]["speech"]), fe),
                ("  cached re-run", med(cl[fe]["cached"]), fe),
            ]
    print(
        f"{f'measurement (median of {repeat})':48s} {'seconds':>8s} {'fps':>8s} "
        f"{'x real time':>11s} {'/ decode':>8s}"
    )
    for name, t, _ in rows:
        f = n / t
        print(f"{name:48s} {t:8.2f} {f:8.0f} {f / fps:11.1f} {f / dec_fps:8.2f}")
    if env is not None and required:
        fe = frontends[0]
        for what, key in (("--no-speech", "no_speech"), ("with speech", "speech")):
            f = n / med(cl[fe][key])
            line = (
                f"whole command, {fe}, {what}: {f:.0f} fps: requirement >= {float(required):.0f} "
                f"{'PASS' if f >= float(required) else 'FAIL'}; aim {float(aim or 0):.0f} "
                f"{'reached' if aim and f >= float(aim) else 'not reached'}"
            )
            for other in frontends[1:]:
                line += (
                    f"; {other}: {n / med(cl[other][key]):.0f} fps (ratio {fe}/{other} "
                    f"{med(cl[other][key]) / med(cl[fe][key]):.2f})"
                )
            print(line)
    mem = [peak_rss_mib(p) for p in pool_pids(pool)]
    print(f"peak memory per worker (in process, VmHWM): {', '.join(f'{m:.0f}' for m in mem)} MiB")
    if env is not None:
        sm = [peak_rss_mib(p) for p in stack_worker_pids(env)]
        print(
            f"peak memory per extractor worker in the stack: "
            f"{', '.join(f'{m:.0f}' for m in sm) or 'unknown'} MiB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--clip",
        action="append",
        required=True,
        metavar="VIDEO:SECONDS:REQUIRED:AIM",
        help="a real clip to loop to SECONDS; REQUIRED/AIM fps for the whole command",
    )
    ap.add_argument("--frontends", default="mesh,dlib", help="face front-ends, the default first")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="in-process pool size (default DYADLAB_WORKERS or the CPU count)",
    )
    ap.add_argument("--skip-cli", action="store_true", help="no stack, no CLI runs")
    args = ap.parse_args()
    from dyadlab.config import Settings

    workers = args.workers or Settings.from_env().workers
    frontends = [f for f in args.frontends.split(",") if f]
    env = None if args.skip_cli else stack_env()
    pool = pipeline_pool(workers)
    try:
        if env is not None:
            cli(env, "up", "--no-metrics")
        for spec in args.clip:
            bench_clip(spec, frontends, args.repeat, workers, pool, env)
    finally:
        pool.shutdown()
        if env is not None:
            cli(env, "down", check=False)
            shutil.rmtree(env["DYADLAB_HOME"], ignore_errors=True)


if __name__ == "__main__":
    main()
