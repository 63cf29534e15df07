"""Split a video into chunks of frames and process one chunk (in a worker process).

Chunks let both cores work on one video (each worker decodes and landmarks
its own stretch from the keyframe before it) and make extraction resumable:
each finished chunk is stored, so a restarted job continues where it stopped.
Face identities are joined across chunks afterwards (`identity.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from dyadlab import video

#: Chunking. Each chunk costs a tracker start (a whole-frame search, ~30 ms)
#: and restarts tracking at its first frame, so chunks are as long as load
#: balancing allows: whole rounds of two chunks per worker (a worker that
#: finishes first takes the next chunk; none idles while another has a whole
#: chunk left), at least MIN_CHUNK_FRAMES and at most MAX_CHUNK_FRAMES (what an
#: interrupted job redoes per worker, and the progress granularity).
MIN_CHUNK_FRAMES = 200
MAX_CHUNK_FRAMES = 1800
CHUNKS_PER_WORKER = 2
#: Default of `Options.chunk_frames`: 0 = choose with `chunk_count`.
CHUNK_FRAMES = 0


def chunk_count(n_frames: int, workers: int) -> int:
    """How many chunks a video of `n_frames` is split into for `workers` processes."""
    if workers <= 1:
        return max(1, -(-n_frames // MAX_CHUNK_FRAMES))
    k = max(CHUNKS_PER_WORKER * workers, -(-n_frames // MAX_CHUNK_FRAMES))
    k = -(-k // workers) * workers
    most = max(1, n_frames // MIN_CHUNK_FRAMES)  # chunks of >= MIN_CHUNK_FRAMES
    if k > most:
        k = most // workers * workers or most
    return k


def plan(
    index: video.VideoIndex, chunk_frames: int = 0, n_chunks: int | None = None
) -> list[tuple[int, int]]:
    """[start, stop) frame ranges: `n_chunks` of equal length (or as many as
    make about `chunk_frames` each), each starting on the keyframe nearest to
    its even share when one lies within a quarter chunk (no wasted decoding
    before the first frame)."""
    n = index.n_frames
    k = n_chunks or max(1, round(n / max(1, chunk_frames or MIN_CHUNK_FRAMES)))
    k = max(1, min(k, n))
    keys = np.flatnonzero(index.keyframe)
    size = n / k
    bounds = [0]
    for i in range(1, k):
        target = round(i * size)
        near = keys[(keys > bounds[-1]) & (np.abs(keys - target) <= size / 4)]
        b = int(near[np.argmin(np.abs(near - target))]) if len(near) else target
        if b > bounds[-1]:
            bounds.append(b)
    bounds.append(n)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclasses.dataclass
class TrackInfo:
    tid: int
    first: int
    last: int
    first_rect: tuple
    last_rect: tuple
    embedding: np.ndarray | None
    chip: np.ndarray | None = None  # 150x150 (grey, or RGB x3) when the descriptor was deferred


@dataclasses.dataclass
class ChunkResult:
    """One chunk's observations (one per frame and tracked face).

    `success` is 1 where landmarks were measured; 0 where the face was seen
    (detected, tracked) but could not be measured (mesh front-end: profile,
    hands over the face) - its landmarks are NaN, never guesses.
    `landmarks3d` are image pixels + depth (pixels), NaN for dlib;
    `smile_logit`/`p_occluded` the appearance channel (its smile logit and
    P(mouth occluded)), NaN where not run.
    """

    start: int
    stop: int
    frames_decoded: int
    frame: np.ndarray  # (m,) frame number of each observation
    tid: np.ndarray  # (m,) chunk-local track id
    landmarks: np.ndarray  # (m, 68, 2) float32
    confidence: np.ndarray  # (m,) float32
    pose: np.ndarray  # (m, 6) float32: Tx Ty Tz Rx Ry Rz
    tracks: list[TrackInfo]
    seconds: float
    stats: dict
    success: np.ndarray | None = None  # (m,) bool
    box: np.ndarray | None = None  # (m, 4) float32 face box
    landmarks3d: np.ndarray | None = None  # (m, 68, 3) float32 pixels + depth
    landmarks_mm: np.ndarray | None = None  # (m, 68, 3) float32 X Y Z (mm, camera)
    smile_logit: np.ndarray | None = None  # (m,) float32
    p_occluded: np.ndarray | None = None  # (m,) float32

    def __post_init__(self):
        m = len(self.frame)
        if self.success is None:
            self.success = np.isfinite(self.landmarks).all(axis=(1, 2)) if m else np.zeros(0, bool)
        if self.box is None:
            self.box = np.array(
                [_rect(lm) if np.isfinite(lm).all() else (np.nan,) * 4 for lm in self.landmarks], np.float32
            ).reshape(m, 4)
        for name, shape in (
            ("landmarks3d", (m, 68, 3)),
            ("landmarks_mm", (m, 68, 3)),
            ("smile_logit", (m,)),
            ("p_occluded", (m,)),
        ):
            if getattr(self, name) is None:
                setattr(self, name, np.full(shape, np.nan, np.float32))

    def to_npz(self) -> dict[str, np.ndarray]:
        # __post_init__ fills in every optional array
        assert (
            self.success is not None
            and self.box is not None
            and self.landmarks3d is not None
            and self.landmarks_mm is not None
            and self.smile_logit is not None
            and self.p_occluded is not None
        )
        t = self.tracks
        chips = [x.chip for x in t if x.chip is not None]
        return {
            "meta": np.array([self.start, self.stop, self.frames_decoded], np.int64),
            "seconds": np.array([self.seconds]),
            "frame": self.frame,
            "tid": self.tid,
            "landmarks": self.landmarks,
            "confidence": self.confidence,
            "pose": self.pose,
            "success": self.success,
            "box": self.box,
            "landmarks3d": self.landmarks3d,
            "landmarks_mm": self.landmarks_mm,
            "smile_logit": self.smile_logit,
            "p_occluded": self.p_occluded,
            "t_tid": np.array([x.tid for x in t], np.int64),
            "t_span": np.array([(x.first, x.last) for x in t], np.int64).reshape(-1, 2),
            "t_rects": np.array([(*x.first_rect, *x.last_rect) for x in t], np.float64).reshape(-1, 8),
            "t_emb": np.array(
                [x.embedding if x.embedding is not None else np.full(128, np.nan) for x in t], np.float32
            ).reshape(-1, 128),
            "t_has_chip": np.array([x.chip is not None for x in t], bool),
            "t_chip": (
                np.stack(chips).astype(np.uint8) if chips else np.zeros((0, CHIP_PX, CHIP_PX), np.uint8)
            ),
        }

    @classmethod
    def from_npz(cls, z) -> ChunkResult:
        tracks = []
        has_chip = z["t_has_chip"] if "t_has_chip" in z.files else np.zeros(len(z["t_tid"]), bool)
        chip_no = np.cumsum(has_chip) - 1
        for i, tid in enumerate(z["t_tid"]):
            e = z["t_emb"][i]
            r = z["t_rects"][i]
            tracks.append(
                TrackInfo(
                    int(tid),
                    int(z["t_span"][i, 0]),
                    int(z["t_span"][i, 1]),
                    tuple(r[:4]),
                    tuple(r[4:]),
                    None if np.isnan(e).any() else e,
                    z["t_chip"][chip_no[i]] if has_chip[i] else None,
                )
            )
        start, stop, decoded = (int(v) for v in z["meta"])
        extra = {
            k: z[k]
            for k in ("success", "box", "landmarks3d", "landmarks_mm", "smile_logit", "p_occluded")
            if k in z.files
        }
        return cls(
            start,
            stop,
            decoded,
            z["frame"],
            z["tid"],
            z["landmarks"],
            z["confidence"],
            z["pose"],
            tracks,
            float(z["seconds"][0]),
            {},
            **extra,
        )


CHIP_PX = 150


def _rect(lm: np.ndarray) -> tuple:
    x0, y0 = np.nanmin(lm, axis=0)
    x1, y1 = np.nanmax(lm, axis=0)
    return (float(x0), float(y0), float(x1), float(y1))


def process(
    path: str,
    index: video.VideoIndex,
    start: int,
    stop: int,
    max_faces: int = 2,
    verify_every: int = 0,
    frontend: str = "",
) -> ChunkResult:
    """Track faces in frames [start, stop) with the named front-end (default: mesh)."""
    from services.extractor import frontends

    return frontends.get(frontend).process(path, index, start, stop, max_faces, verify_every)


_barrier = None


def worker_pool(n: int):
    """n spawned worker processes with the face models loaded; submit n
    `warm_up` probes and wait for them to know that all n are up."""
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC
    return cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker, initargs=(ctx.Barrier(n),))


def init_worker(barrier=None) -> None:
    """Pool initializer: load the face models; keep the start-up barrier; exit
    when the service process is gone."""
    global _barrier
    _barrier = barrier
    _exit_with_parent(os.getppid())
    warm_up()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A worker whose service died (SIGKILL, a crash) is re-parented; it then
    exits instead of living on as an orphan holding models and memory.
    (Not PR_SET_PDEATHSIG: that fires when the *thread* that spawned the
    worker ends, and the pool spawns workers from short-lived threads.)"""
    import threading

    def watch():
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(70)  # EX_SOFTWARE: nothing to clean up that the OS won't

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def warm_up(_: object = None) -> int:
    """Load the default front-end's models (idempotent; another front-end's
    load on first use). As a readiness probe in a pool made with
    `init_worker(barrier)`, it returns only once every worker has run it, so
    n probes prove n live workers."""
    from services.extractor import frontends

    try:
        import torch

        torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    except ImportError:
        pass
    frontends.get(frontends.DEFAULT).warm_up()
    if _barrier is not None:
        _barrier.wait(timeout=300)
    return os.getpid()
