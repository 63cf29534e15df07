"""Real home parent-infant footage (the three shared 2UWdXP clips: webcam,
640x480 HEVC, variable frame rate; the infant in a high chair on the left,
the parent on the right, often turned away or hidden) through the extraction
pipeline: who is found, who is measured, who is who.

These clips skip (with the reason) where ../shared/data is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from dyadlab import video
from services.extractor import chunks, pipeline

from media import shared_video

CLIPS = {
    "peekaboo": "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4",
    "nomnomnom": "2UWdXP.joke2.rep3.take1.NomNomNom_h265.mp4",
    "tearingpaper": "2UWdXP.joke4.rep3.take1.TearingPaper_h265.mp4",
}


@pytest.fixture(scope="module")
def pool():
    ex = chunks.worker_pool(2)
    list(ex.map(chunks.warm_up, range(2)))
    yield ex
    ex.shutdown()


_cache: dict = {}


def extract(pool, name: str, frontend: str = "mesh", path=None):
    key = (name, frontend)
    if key not in _cache:
        p = path or shared_video(CLIPS[name])
        _cache[key] = pipeline.extract(str(p), pipeline.Options(frontend=frontend), pool, workers=2)
    return _cache[key]


def face(ex, role: str):
    f = next(f for f in ex.faces if f["role"] == role)
    return f, ex.table[ex.table.face_id == f["face_id"]]


def mean_x(df) -> float:
    seen = df[df.confidence > 0]
    xs = seen[[f"x_{i}" for i in range(68)]].to_numpy().mean(axis=1)
    return float(np.nanmean(xs)) if np.isfinite(xs).any() else float("nan")


@pytest.mark.parametrize("name", list(CLIPS))
def test_both_people_are_found_and_told_apart(pool, name):
    ex = extract(pool, name)
    roles = sorted(f["role"] for f in ex.faces if f["role"])
    assert roles == ["adult", "infant"], ex.faces
    (pf, pdf), (inf, idf) = face(ex, "adult"), face(ex, "infant")
    # measured rows lie where they should: the infant on the left half
    assert mean_x(idf) < 320
    if pf["frames_tracked"]:
        assert mean_x(pdf) > 320
    assert inf["frames_tracked"] >= 0.6 * ex.index.n_frames
    # what is not measured is empty, never guessed
    for df in (pdf, idf):
        unmeasured = df[df.success == 0]
        assert unmeasured[["x_48", "y_48", "X_48", "AU12_r"]].isna().all().all()
        assert (unmeasured.confidence < 0.8).all()


def test_peekaboo_parent_is_found_in_every_frame_measured_only_when_visible(pool):
    ex = extract(pool, "peekaboo")
    pf, pdf = face(ex, "adult")
    assert pf["frames_seen"] == ex.index.n_frames == 150
    f = pdf.frame.to_numpy() - 1
    # hands over the face (~22-60) and profile looking down (~80-128): not measured
    assert pdf.success.to_numpy()[(f >= 22) & (f <= 60)].mean() < 0.1
    assert pdf.success.to_numpy()[(f >= 80) & (f <= 128)].mean() < 0.1
    # facing the camera at the start and the end: measured, confidently
    end = pdf[(f >= 142)]
    assert (end.success == 1).all() and (end.confidence >= 0.8).all()


def test_mesh_front_end_measures_more_than_dlib_on_every_clip(pool):
    """The table of the closing note (scripts/compare_frontends.py prints it):
    frames each face was measured (success 1), new front-end against dlib."""
    for name in CLIPS:
        mesh, dlib = extract(pool, name), extract(pool, name, "dlib")
        for role in ("adult", "infant"):
            m = next((f["frames_tracked"] for f in mesh.faces if f["role"] == role), 0)
            d = next((f["frames_tracked"] for f in dlib.faces if f["role"] == role), 0)
            print(f"{name} {role}: mesh {m}, dlib {d}")
            assert m >= d, (name, role, m, d)
        m_seen = sum(f["frames_seen"] for f in mesh.faces if f["role"])
        d_seen = sum(f["frames_tracked"] for f in dlib.faces if f["role"])
        assert m_seen >= 1.5 * d_seen, (name, m_seen, d_seen)
        assert mesh.table.shape[1] == dlib.table.shape[1]  # one table shape
        assert dlib.table[["X_0", "Z_67"]].isna().all().all()  # dlib has no depth


def test_two_people_stay_two_through_a_looped_clip(pool, tmp_path):
    """Peekaboo looped four times (~42 s, chunked over two workers): at every
    loop point both people jump back to where the clip starts; there are
    still exactly two face_ids, and each keeps its role and its side."""
    long = video.loop(shared_video(CLIPS["peekaboo"]), tmp_path / "loop.mp4", 40)
    ex = extract(pool, "peekaboo-loop", path=long)
    assert ex.index.n_frames == 600
    assert len(ex.faces) == 2, ex.faces
    assert sorted(f["role"] for f in ex.faces) == ["adult", "infant"]
    (pf, pdf), (_inf, idf) = face(ex, "adult"), face(ex, "infant")
    for k in range(4):  # each pass: the same people, the same sides
        in_pass = lambda df, k=k: df[(df.frame > 150 * k) & (df.frame <= 150 * (k + 1))]
        assert mean_x(in_pass(pdf)) > 400 and mean_x(in_pass(idf)) < 320
        assert (in_pass(idf).success == 1).sum() >= 90
    assert pf["frames_seen"] >= 0.95 * 600
