"""How the extractor splits a video into chunks, and the deferred face
descriptors of tracks that start a chunk (speed levers that must not change
results: scripts/bench_extract.py measures the speed, these check the results).
"""

from __future__ import annotations

import copy
import io

import dlib
import numpy as np
import pytest

from dyadlab import video
from dyadlab.face import models, tracker
from services.extractor import chunks, identity

from media import media_path, shared_video


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_chunk_count_gives_whole_rounds_of_long_enough_chunks(workers):
    for n in [1, 50, 199, 400, 472, 800, 1888, 9000, 20000, 108000]:
        k = chunks.chunk_count(n, workers)
        assert k >= 1
        if k > 1:
            assert n / k >= chunks.MIN_CHUNK_FRAMES
        assert n / k <= chunks.MAX_CHUNK_FRAMES or k == -(-n // chunks.MAX_CHUNK_FRAMES)
        if workers > 1 and k >= workers:
            assert k % workers == 0, (n, workers, k)


def test_plan_covers_every_frame_and_starts_chunks_on_keyframes():
    idx = video.probe(media_path("WolfgangLanger_Pexels.mp4"))
    for k in (1, 2, 3, 4):
        plan = chunks.plan(idx, n_chunks=k)
        assert len(plan) == k
        assert plan[0][0] == 0 and plan[-1][1] == idx.n_frames
        assert all(a < b for a, b in plan)
        assert all(plan[i][1] == plan[i + 1][0] for i in range(k - 1))
        assert all(idx.keyframe[a] for a, _ in plan)  # keyframes every 72 frames
        sizes = [b - a for a, b in plan]
        assert max(sizes) - min(sizes) <= idx.n_frames / k  # each bound moves <= 1/4 chunk


def test_deferred_descriptors_give_the_same_identities():
    """Tracks found on a chunk's first frame keep a face chip; the join computes
    their descriptors only when it compares them, with the same values."""
    path = shared_video("2UWdXP.joke2.rep3.take1.NomNomNom_h265.mp4")
    idx = video.probe(path)
    results = [chunks.process(str(path), idx, a, b) for a, b in chunks.plan(idx, 30)]
    deferred = [t for r in results for t in r.tracks if t.chip is not None]
    assert deferred and all(t.embedding is None for t in deferred)
    eager = copy.deepcopy(results)
    for r in eager:
        for t in r.tracks:
            if t.chip is not None:
                t.embedding, t.chip = tracker.describe(t.chip), None
    assert identity.join(results) == identity.join(eager)
    # The chip gives dlib's descriptor of the face in the frame, bit for bit.
    first = next(video.frames(path, idx, 0, 1))[1]
    tr = tracker.FaceTracker(idx.width, idx.height, idx.avg_fps, defer_embeddings_on=0)
    tr.step(0, first)
    assert tr.tracks and tr.tracks[0].chip is not None
    lm = tr.tracks[0].lm
    x0, y0 = lm.min(axis=0)
    x1, y1 = lm.max(axis=0)
    m = 0.5 * max(x1 - x0, y1 - y0)
    L, T = int(max(0, x0 - m)), int(max(0, y0 - m))
    R, B = int(min(idx.width, x1 + m)), int(min(idx.height, y1 + m))
    crop = np.ascontiguousarray(np.repeat(first[T:B, L:R, None], 3, axis=2))
    shape = dlib.full_object_detection(
        dlib.rectangle(0, 0, R - L - 1, B - T - 1),
        [dlib.point(int(round(x - L)), int(round(y - T))) for x, y in lm],
    )
    direct = np.asarray(models.face_encoder().compute_face_descriptor(crop, shape), np.float32)
    assert np.array_equal(tracker.describe(tr.tracks[0].chip), direct)


def test_chunk_results_round_trip_with_chips():
    path = media_path("WolfgangLanger_Pexels.mp4")
    idx = video.probe(path)
    res = chunks.process(str(path), idx, 216, 300)
    assert res.tracks and res.tracks[0].chip is not None
    buf = io.BytesIO()
    np.savez(buf, **res.to_npz())
    buf.seek(0)
    with np.load(buf) as z:
        back = chunks.ChunkResult.from_npz(z)
    for a, b in zip(res.tracks, back.tracks):
        assert (a.chip is None) == (b.chip is None)
        assert a.chip is None or np.array_equal(a.chip, b.chip)
        assert (a.embedding is None) == (b.embedding is None)
