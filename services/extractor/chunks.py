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
from dyadlab.face.pose import PoseEstimator
from dyadlab.face.tracker import FaceTracker

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
    most = max(1, n_frames // MIN_CHUNK_FRAMES)      # chunks of >= MIN_CHUNK_FRAMES
    if k > most:
        k = most // workers * workers or most
    return k


def plan(index: video.VideoIndex, chunk_frames: int = 0,
         n_chunks: int | None = None) -> list[tuple[int, int]]:
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
    chip: np.ndarray | None = None     # (150, 150) uint8 when the descriptor was deferred


@dataclasses.dataclass
class ChunkResult:
    start: int
    stop: int
    frames_decoded: int
    frame: np.ndarray        # (m,) frame number of each observation
    tid: np.ndarray          # (m,) chunk-local track id
    landmarks: np.ndarray    # (m, 68, 2) float32
    confidence: np.ndarray   # (m,) float32
    pose: np.ndarray         # (m, 6) float32: Tx Ty Tz Rx Ry Rz
    tracks: list[TrackInfo]
    seconds: float
    stats: dict

    def to_npz(self) -> dict[str, np.ndarray]:
        t = self.tracks
        return {
            "meta": np.array([self.start, self.stop, self.frames_decoded], np.int64),
            "seconds": np.array([self.seconds]),
            "frame": self.frame, "tid": self.tid, "landmarks": self.landmarks,
            "confidence": self.confidence, "pose": self.pose,
            "t_tid": np.array([x.tid for x in t], np.int64),
            "t_span": np.array([(x.first, x.last) for x in t], np.int64).reshape(-1, 2),
            "t_rects": np.array([(*x.first_rect, *x.last_rect) for x in t], np.float64).reshape(-1, 8),
            "t_emb": np.array([x.embedding if x.embedding is not None else np.full(128, np.nan)
                               for x in t], np.float32).reshape(-1, 128),
            "t_has_chip": np.array([x.chip is not None for x in t], bool),
            "t_chip": np.array([x.chip for x in t if x.chip is not None],
                               np.uint8).reshape(-1, 150, 150),
        }

    @classmethod
    def from_npz(cls, z) -> "ChunkResult":
        tracks = []
        has_chip = z["t_has_chip"] if "t_has_chip" in z.files else np.zeros(len(z["t_tid"]), bool)
        chip_no = np.cumsum(has_chip) - 1
        for i, tid in enumerate(z["t_tid"]):
            e = z["t_emb"][i]
            r = z["t_rects"][i]
            tracks.append(TrackInfo(int(tid), int(z["t_span"][i, 0]), int(z["t_span"][i, 1]),
                                    tuple(r[:4]), tuple(r[4:]), None if np.isnan(e).any() else e,
                                    z["t_chip"][chip_no[i]] if has_chip[i] else None))
        start, stop, decoded = (int(v) for v in z["meta"])
        return cls(start, stop, decoded, z["frame"], z["tid"], z["landmarks"], z["confidence"],
                   z["pose"], tracks, float(z["seconds"][0]), {})


def _rect(lm: np.ndarray) -> tuple:
    x0, y0 = np.nanmin(lm, axis=0)
    x1, y1 = np.nanmax(lm, axis=0)
    return (float(x0), float(y0), float(x1), float(y1))


def process(path: str, index: video.VideoIndex, start: int, stop: int,
            max_faces: int = 2, verify_every: int = 0) -> ChunkResult:
    """Track faces in frames [start, stop): landmarks, confidence, head pose."""
    t0 = time.perf_counter()
    tracker = FaceTracker(index.width, index.height, index.avg_fps, max_faces=max_faces,
                          verify_every=verify_every, defer_embeddings_on=start)
    pose = PoseEstimator(index.width, index.height)
    fr, tid, lms, conf, poses = [], [], [], [], []
    spans: dict[int, list] = {}
    decoded = 0
    for no, img in video.frames(path, index, start, stop):
        decoded += 1
        for o in tracker.step(no, img):
            if not np.isfinite(o.lm).all():
                continue
            fr.append(no)
            tid.append(o.tid)
            lms.append(o.lm)
            conf.append(o.confidence)
            poses.append(pose(o.tid, o.lm))
            s = spans.get(o.tid)
            if s is None:
                s = spans[o.tid] = [no, no, _rect(o.lm), None]
            s[1] = no
            s[3] = o.lm
    tracks = []
    for t in tracker.close():
        if t.tid in spans:
            first, last, r0, lm_last = spans[t.tid]
            tracks.append(TrackInfo(t.tid, first, last, r0, _rect(lm_last), t.embedding, t.chip))
    m = len(fr)
    return ChunkResult(
        start, stop, decoded,
        np.asarray(fr, np.int64), np.asarray(tid, np.int64),
        np.asarray(lms, np.float32).reshape(m, 68, 2),
        np.asarray(conf, np.float32), np.asarray(poses, np.float32).reshape(m, 6),
        tracks, time.perf_counter() - t0, dict(tracker.stats, pid=os.getpid()))


_barrier = None


def worker_pool(n: int):
    """n spawned worker processes with dlib's models loaded; submit n
    `warm_up` probes and wait for them to know that all n are up."""
    import concurrent.futures as cf
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # never fork a process that runs gRPC
    return cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker,
                                  initargs=(ctx.Barrier(n),))


def init_worker(barrier=None) -> None:
    """Pool initializer: load dlib's models; keep the start-up barrier; exit
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
                os._exit(70)          # EX_SOFTWARE: nothing to clean up that the OS won't

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def warm_up(_: object = None) -> int:
    """Load dlib's models (idempotent). As a readiness probe in a pool made with
    `init_worker(barrier)`, it returns only once every worker has run it, so
    n probes prove n live workers."""
    from dyadlab.face import models
    models.load_all()
    if _barrier is not None:
        _barrier.wait(timeout=300)
    return os.getpid()
